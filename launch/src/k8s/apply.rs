//! Applying the objects through the API server (server-side apply), and
//! deleting a job's agents when it ended.

use anyhow::Context;
use serde_json::Value;

/// The API server of the kubeconfig's current context (`$KUBECONFIG`,
/// `~/.kube/config`), or of the pod's service account inside a cluster.
pub async fn client() -> anyhow::Result<kube::Client> {
    let config = kube::Config::infer().await.map_err(|error| {
        anyhow::anyhow!(
            "no Kubernetes cluster to apply to ({error}): set KUBECONFIG or ~/.kube/config, or add --dry-run and pipe the objects to `kubectl apply -f -`"
        )
    })?;
    Ok(kube::Client::try_from(config)?)
}

/// Deletes a Job and its pods (the agents' Job when their job ended).
pub async fn delete_job(client: &kube::Client, namespace: &str, name: &str) -> anyhow::Result<()> {
    use kube::api::{Api, DeleteParams};
    let api: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), namespace);
    api.delete(name, &DeleteParams::background())
        .await
        .with_context(|| format!("deleting Job {namespace}/{name}"))?;
    Ok(())
}

/// Applies `objects` in order with server-side apply (field manager
/// `flamingoctl`, taking over fields another manager set); returns one line
/// per object. Applying the same objects again changes nothing.
pub async fn apply(client: &kube::Client, objects: &[Value]) -> anyhow::Result<Vec<String>> {
    use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
    let params = PatchParams::apply("flamingoctl").force();
    let mut applied = Vec::new();
    for object in objects {
        let field = |name: &str| -> anyhow::Result<&str> {
            object
                .pointer(name)
                .and_then(Value::as_str)
                .with_context(|| format!("a rendered object has no {name}: {object}"))
        };
        let (api_version, kind) = (field("/apiVersion")?, field("/kind")?);
        let (namespace, name) = (field("/metadata/namespace")?, field("/metadata/name")?);
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, kind),
            &plural(kind),
        );
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
        let dynamic: DynamicObject = serde_json::from_value(object.clone())?;
        api.patch(name, &params, &Patch::Apply(&dynamic))
            .await
            .map_err(|error| {
                let hint = match &error {
                    kube::Error::Api(status) if status.code == 404 => format!(
                        "; does the namespace exist? kubectl create namespace {namespace}"
                    ),
                    kube::Error::Api(status) if status.message.contains("immutable") => format!(
                        "; a {kind} of that name exists from an earlier launch: kubectl -n {namespace} delete {} {name}",
                        kind.to_ascii_lowercase()
                    ),
                    _ => String::new(),
                };
                anyhow::anyhow!("applying {kind} {namespace}/{name}: {error}{hint}")
            })?;
        applied.push(format!("{kind} {namespace}/{name} applied"));
    }
    Ok(applied)
}

/// The resource path's plural of a kind: `NetworkPolicy` → `networkpolicies`.
fn plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    match lower.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{lower}s"),
    }
}
