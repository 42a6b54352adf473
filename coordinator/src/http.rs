//! The coordinator's HTTP side: the dashboard (its assets are compiled into
//! the binary, so it works on an air-gapped cluster), the JSON data API it
//! reads, and a Prometheus `/metrics` endpoint.
//!
//! - `GET /` — the dashboard (jobs list; `/?job=ID[,ID…]` a job page, or
//!   several jobs overlaid)
//! - `GET /api/jobs` — every job, newest last
//! - `GET /api/jobs/{id}` — one job with its checkpoints and restarts
//! - `GET /api/jobs/{id}/series?names=a,b&ranks=0,1&max_points=N` — curves,
//!   downsampled on the server to about N points each (default 2000; 0 for
//!   every point)
//! - `GET /api/jobs/{id}/events` — the job's timeline
//! - `GET /metrics` — Prometheus text format
//! - `GET /login?token=…` — sets the dashboard's cookie (see
//!   [`crate::dashboard_auth`]: every path needs the token when the cluster
//!   is secure)

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flamingo_common::{JobId, JobRecord, JobState, NodeRecord, RankState};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::metrics::SeriesQuery;
use crate::service::Coordinator;

const INDEX_HTML: &str = include_str!("../dashboard/index.html");
const APP_JS: &str = include_str!("../dashboard/app.js");
const APP_CSS: &str = include_str!("../dashboard/app.css");

/// Points per curve the data API returns unless asked otherwise.
pub const DEFAULT_MAX_POINTS: usize = 2000;

pub fn router(
    coordinator: Arc<Coordinator>,
    access: crate::dashboard_auth::DashboardAccess,
) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/assets/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route("/api/jobs", get(jobs))
        .route("/api/jobs/{id}", get(job))
        .route("/api/jobs/{id}/series", get(series))
        .route("/api/jobs/{id}/events", get(events))
        .route("/api/jobs/{id}/evals", get(evals))
        .route("/metrics", get(prometheus))
        .with_state(coordinator)
        .layer(axum::middleware::from_fn_with_state(
            access,
            crate::dashboard_auth::guard,
        ))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn job_summary(job: &JobRecord) -> Value {
    let count = |state: RankState| job.ranks.iter().filter(|r| r.state == state).count();
    json!({
        "id": job.id.as_str(),
        "name": job.spec.name,
        "kind": job.spec.kind.label(),
        "state": job.state.as_str(),
        "message": job.message,
        "nodes": job.spec.nodes,
        "placed_nodes": job.placed_nodes,
        "world_size": job.spec.world_size(),
        "attempt": job.attempt,
        "restarts": job.restarts.len(),
        "last_step": job.last_step,
        "running_ranks": count(RankState::Running),
        "created_unix_ms": job.created_unix_ms,
        "started_unix_ms": job.started_unix_ms,
        "finished_unix_ms": job.finished_unix_ms,
    })
}

async fn jobs(State(coordinator): State<Arc<Coordinator>>) -> Response {
    let jobs: Vec<Value> = coordinator.jobs().await.iter().map(job_summary).collect();
    Json(json!({ "jobs": jobs })).into_response()
}

async fn job(State(coordinator): State<Arc<Coordinator>>, Path(id): Path<String>) -> Response {
    let job = match coordinator.job(&JobId(id.clone())).await {
        Ok(job) => job,
        Err(_) => return error(StatusCode::NOT_FOUND, format!("no job {id}")),
    };
    let mut value = job_summary(&job);
    value["checkpoints"] = json!(job
        .checkpoints
        .iter()
        .map(|c| json!({ "step": c.step, "path": c.path, "unix_ms": c.unix_ms }))
        .collect::<Vec<_>>());
    value["restart_lines"] = json!(job.restarts);
    value["excluded_nodes"] = json!(job
        .excluded_nodes()
        .iter()
        .map(|node| node.as_str().to_string())
        .collect::<Vec<_>>());
    let keys = coordinator.metrics_store().keys(&id).unwrap_or_default();
    let mut names: Vec<&str> = keys.iter().map(|key| key.name.as_str()).collect();
    names.dedup();
    let mut ranks: Vec<u32> = keys.iter().map(|key| key.rank).collect();
    ranks.sort_unstable();
    ranks.dedup();
    value["metric_names"] = json!(names);
    value["metric_ranks"] = json!(ranks);
    Json(value).into_response()
}

#[derive(Debug, Deserialize)]
struct SeriesParams {
    names: Option<String>,
    ranks: Option<String>,
    max_points: Option<usize>,
}

fn list(text: &Option<String>) -> Vec<String> {
    text.as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_string)
        .collect()
}

async fn series(
    State(coordinator): State<Arc<Coordinator>>,
    Path(id): Path<String>,
    Query(params): Query<SeriesParams>,
) -> Response {
    if coordinator.job(&JobId(id.clone())).await.is_err() {
        return error(StatusCode::NOT_FOUND, format!("no job {id}"));
    }
    let mut ranks = Vec::new();
    for rank in list(&params.ranks) {
        match rank.parse() {
            Ok(rank) => ranks.push(rank),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("ranks: '{rank}' is not a rank number"),
                )
            }
        }
    }
    let query = SeriesQuery {
        names: list(&params.names),
        ranks,
        max_points: params.max_points.unwrap_or(DEFAULT_MAX_POINTS),
    };
    let store = coordinator.clone();
    // A big job's scan runs off the async threads.
    let result =
        tokio::task::spawn_blocking(move || store.metrics_store().series(&id, &query)).await;
    match result {
        Ok(Ok(series)) => Json(json!({ "series": series })).into_response(),
        Ok(Err(failure)) => error(StatusCode::INTERNAL_SERVER_ERROR, failure.to_string()),
        Err(failure) => error(StatusCode::INTERNAL_SERVER_ERROR, failure.to_string()),
    }
}

async fn events(State(coordinator): State<Arc<Coordinator>>, Path(id): Path<String>) -> Response {
    if coordinator.job(&JobId(id.clone())).await.is_err() {
        return error(StatusCode::NOT_FOUND, format!("no job {id}"));
    }
    match coordinator.metrics_store().events(&id) {
        Ok(events) => Json(json!({ "events": events })).into_response(),
        Err(failure) => error(StatusCode::INTERNAL_SERVER_ERROR, failure.to_string()),
    }
}

/// The job's benchmark scores (`flamingoctl eval --job`), in arrival order.
async fn evals(State(coordinator): State<Arc<Coordinator>>, Path(id): Path<String>) -> Response {
    if coordinator.job(&JobId(id.clone())).await.is_err() {
        return error(StatusCode::NOT_FOUND, format!("no job {id}"));
    }
    match coordinator.metrics_store().evals(&id) {
        Ok(evals) => Json(json!({ "evals": evals })).into_response(),
        Err(failure) => error(StatusCode::INTERNAL_SERVER_ERROR, failure.to_string()),
    }
}

/// The coordinator's state in Prometheus' text format.
pub async fn prometheus_text(coordinator: &Coordinator) -> String {
    let jobs = coordinator.jobs().await;
    let nodes = coordinator.nodes().await;
    let mut out = String::new();
    cluster_families(&mut out, &jobs, &nodes);
    let live: Vec<&JobRecord> = jobs.iter().filter(|job| !job.state.is_terminal()).collect();
    job_families(&mut out, &jobs, &live);
    metric_families(&mut out, coordinator, &live);
    out
}

/// Jobs, ranks, nodes and free slots.
fn cluster_families(out: &mut String, jobs: &[JobRecord], nodes: &[(NodeRecord, u32)]) {
    use flamingo_common::prometheus::{family, sample};
    family(out, "flamingo_jobs", "gauge", "Jobs by state.");
    for state in [
        JobState::Pending,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Stopped,
    ] {
        let count = jobs.iter().filter(|job| job.state == state).count();
        let name = state.as_str().to_lowercase();
        sample(out, "flamingo_jobs", &[("state", &name)], count as f64);
    }
    family(
        out,
        "flamingo_ranks",
        "gauge",
        "Ranks of live jobs by state.",
    );
    for state in [RankState::Assigned, RankState::Running] {
        let count: usize = jobs
            .iter()
            .map(|job| job.ranks.iter().filter(|r| r.state == state).count())
            .sum();
        let name = state.as_str().to_lowercase();
        sample(out, "flamingo_ranks", &[("state", &name)], count as f64);
    }
    family(out, "flamingo_nodes", "gauge", "Registered nodes.");
    let draining = nodes.iter().filter(|(node, _)| node.draining).count();
    let ready = (nodes.len() - draining) as f64;
    sample(out, "flamingo_nodes", &[("state", "ready")], ready);
    sample(
        out,
        "flamingo_nodes",
        &[("state", "draining")],
        draining as f64,
    );
    family(
        out,
        "flamingo_free_slots",
        "gauge",
        "Free rank slots over all nodes.",
    );
    let free: u32 = nodes.iter().map(|(_, free)| free).sum();
    sample(out, "flamingo_free_slots", &[], f64::from(free));
}

/// Each live job's step, and every job's restarts.
fn job_families(out: &mut String, jobs: &[JobRecord], live: &[&JobRecord]) {
    use flamingo_common::prometheus::{family, sample};
    family(
        out,
        "flamingo_job_step",
        "gauge",
        "Last step rank 0 reported.",
    );
    for job in live {
        let labels = [("job", job.id.as_str()), ("name", job.spec.name.as_str())];
        sample(out, "flamingo_job_step", &labels, job.last_step as f64);
    }
    family(
        out,
        "flamingo_job_restarts_total",
        "counter",
        "Restarts of the job's group.",
    );
    for job in jobs {
        let labels = [("job", job.id.as_str())];
        let restarts = job.restarts.len() as f64;
        sample(out, "flamingo_job_restarts_total", &labels, restarts);
    }
}

/// What the jobs' metric reports say: step rates and latest values of live
/// jobs, stored and dropped reports of every job.
fn metric_families(out: &mut String, coordinator: &Coordinator, live: &[&JobRecord]) {
    use flamingo_common::prometheus::{family, sample};
    let summaries = coordinator.metrics_store().summaries();
    let live_ids: std::collections::BTreeSet<&str> =
        live.iter().map(|job| job.id.as_str()).collect();
    family(
        out,
        "flamingo_job_step_rate",
        "gauge",
        "Steps per second over the last minute.",
    );
    for (id, summary) in &summaries {
        if let (true, Some(rate)) = (live_ids.contains(id.as_str()), summary.step_rate) {
            sample(out, "flamingo_job_step_rate", &[("job", id)], rate);
        }
    }
    family(
        out,
        "flamingo_job_last_value",
        "gauge",
        "Rank 0's latest value of each metric (loss_laion, loss_mmc4, lr, ...).",
    );
    for (id, summary) in summaries
        .iter()
        .filter(|(id, _)| live_ids.contains(id.as_str()))
    {
        for (name, value) in &summary.latest {
            let labels = [("job", id.as_str()), ("metric", name.as_str())];
            sample(out, "flamingo_job_last_value", &labels, *value);
        }
    }
    family(
        out,
        "flamingo_metric_points_total",
        "counter",
        "Metric reports stored for the job.",
    );
    for (id, summary) in &summaries {
        let labels = [("job", id.as_str())];
        sample(
            out,
            "flamingo_metric_points_total",
            &labels,
            summary.points as f64,
        );
    }
    family(
        out,
        "flamingo_metric_reports_dropped_total",
        "counter",
        "Reports ranks could not send in time (counted, never waited for).",
    );
    for (id, summary) in &summaries {
        let labels = [("job", id.as_str())];
        let dropped = summary.dropped as f64;
        sample(
            out,
            "flamingo_metric_reports_dropped_total",
            &labels,
            dropped,
        );
    }
}

async fn prometheus(State(coordinator): State<Arc<Coordinator>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        prometheus_text(&coordinator).await,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_on_commas_and_drop_blanks() {
        assert_eq!(list(&Some("a, b,,c".into())), vec!["a", "b", "c"]);
        assert!(list(&None).is_empty());
    }
}
