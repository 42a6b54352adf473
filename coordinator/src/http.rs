//! The coordinator's HTTP side: the dashboard (its assets are compiled into
//! the binary, so it works on an air-gapped cluster), the JSON data API it
//! reads, and a Prometheus `/metrics` endpoint.
//!
//! - `GET /` — the dashboard (jobs list; `/?job=ID[,ID…]` a job page, or
//!   several jobs overlaid)
//! - `GET /api/jobs` — every job, newest last
//! - `GET /api/jobs/{id}` — one job with its checkpoints and restarts
//! - `GET /api/jobs/{id}/series?names=a,b&ranks=0,1&max_points=N` — curves,
//!   downsampled on the server to about N points each (default 2000; at most
//!   100,000, which 0 asks for; every point of a long job comes from
//!   `flamingoctl metrics`, a page at a time)
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
        .route("/api/jobs/{id}/skips", get(skips))
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

/// The most points one curve of `series` answers with (`max_points=0` asks
/// for this many).
pub const MAX_POINTS_LIMIT: usize = 100_000;
/// The most names or ranks one `series` request may list.
const MAX_LISTED: usize = 1024;

#[derive(Debug, Default, Deserialize)]
struct SeriesParams {
    names: Option<String>,
    ranks: Option<String>,
    max_points: Option<usize>,
}

impl SeriesParams {
    /// The store's query, or what is wrong with a parameter (by name).
    fn query(&self) -> Result<SeriesQuery, String> {
        let names = list(&self.names);
        let listed = list(&self.ranks);
        for (field, count) in [("names", names.len()), ("ranks", listed.len())] {
            if count > MAX_LISTED {
                return Err(format!(
                    "{field}: {count} listed, more than the {MAX_LISTED} one request may ask for"
                ));
            }
        }
        let mut ranks = Vec::with_capacity(listed.len());
        for rank in listed {
            match rank.parse() {
                Ok(rank) => ranks.push(rank),
                Err(_) => return Err(format!("ranks: '{rank}' is not a rank number")),
            }
        }
        let max_points = match self.max_points {
            None => DEFAULT_MAX_POINTS,
            Some(0) => MAX_POINTS_LIMIT,
            Some(points) if points > MAX_POINTS_LIMIT => {
                return Err(format!(
                    "max_points: {points} is more than {MAX_POINTS_LIMIT} (every point comes from `flamingoctl metrics --csv`)"
                ))
            }
            Some(points) => points,
        };
        Ok(SeriesQuery {
            names,
            ranks,
            max_points,
        })
    }
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
    params: Result<Query<SeriesParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let query = match params {
        Ok(Query(params)) => params.query(),
        Err(rejection) => Err(rejection.body_text()),
    };
    let query = match query {
        Ok(query) => query,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    if coordinator.job(&JobId(id.clone())).await.is_err() {
        return error(StatusCode::NOT_FOUND, format!("no job {id}"));
    }
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

/// The job's skipped samples by dataset and reason, with examples.
async fn skips(State(coordinator): State<Arc<Coordinator>>, Path(id): Path<String>) -> Response {
    if coordinator.job(&JobId(id.clone())).await.is_err() {
        return error(StatusCode::NOT_FOUND, format!("no job {id}"));
    }
    let store = coordinator.clone();
    let result = tokio::task::spawn_blocking(move || store.metrics_store().skip_reasons(&id)).await;
    match result {
        Ok(Ok(reasons)) => Json(json!({ "reasons": reasons })).into_response(),
        Ok(Err(failure)) => error(StatusCode::INTERNAL_SERVER_ERROR, failure.to_string()),
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

    use proptest::prelude::*;

    #[test]
    fn lists_split_on_commas_and_drop_blanks() {
        assert_eq!(list(&Some("a, b,,c".into())), vec!["a", "b", "c"]);
        assert!(list(&None).is_empty());
    }

    /// What the handler does with a query string: axum's extractor, then
    /// the checks.
    fn parse(query: &str) -> Result<SeriesQuery, String> {
        let uri: axum::http::Uri = format!("/api/jobs/x/series?{query}")
            .parse()
            .map_err(|error| format!("uri: {error}"))?;
        match Query::<SeriesParams>::try_from_uri(&uri) {
            Ok(Query(params)) => params.query(),
            Err(rejection) => Err(rejection.body_text()),
        }
    }

    #[test]
    fn bad_parameters_are_named() {
        let error = parse("ranks=0,x").expect_err("refused");
        assert!(error.contains("ranks: 'x'"), "{error}");
        let error = parse("max_points=1000001").expect_err("refused");
        assert!(
            error.contains("max_points: 1000001 is more than 100000"),
            "{error}"
        );
        let error = parse("max_points=-1").expect_err("refused");
        assert!(error.contains("max_points"), "{error}");
        let many = (0..2000)
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let error = parse(&format!("ranks={many}")).expect_err("refused");
        assert!(error.contains("ranks: 2000 listed"), "{error}");
        assert_eq!(
            parse("max_points=0").expect("ok").max_points,
            MAX_POINTS_LIMIT
        );
        assert_eq!(parse("").expect("ok").max_points, DEFAULT_MAX_POINTS);
    }

    fn encode(text: &str) -> String {
        text.bytes()
            .map(|byte| match byte {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (byte as char).to_string()
                }
                other => format!("%{other:02X}"),
            })
            .collect()
    }

    proptest! {
        // PROPTEST_CASES=100000 for a long run by hand.
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(500),
        ))]

        /// Any query string, however broken, is answered (a query or an
        /// error naming a parameter) and never asks for more than the
        /// limits.
        #[test]
        fn any_query_string_is_answered_within_the_limits(raw in ".{0,300}") {
            if let Ok(query) = parse(&raw) {
                prop_assert!(query.max_points >= 1 && query.max_points <= MAX_POINTS_LIMIT);
                prop_assert!(query.names.len() <= MAX_LISTED && query.ranks.len() <= MAX_LISTED);
            }
        }

        /// Well-formed parameters (names percent-encoded) come through as
        /// they were sent.
        #[test]
        fn well_formed_parameters_come_through(
            names in proptest::collection::vec("[^,]{1,12}", 0..6),
            ranks in proptest::collection::vec(any::<u32>(), 0..6),
            max_points in proptest::option::of(1usize..=MAX_POINTS_LIMIT),
        ) {
            let mut query = format!(
                "names={}&ranks={}",
                encode(&names.join(",")),
                ranks.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            );
            if let Some(points) = max_points {
                query.push_str(&format!("&max_points={points}"));
            }
            let parsed = parse(&query).map_err(TestCaseError::fail)?;
            let expected: Vec<String> = names
                .iter()
                .map(|name| name.trim().to_string())
                .filter(|name| !name.is_empty())
                .collect();
            prop_assert_eq!(parsed.names, expected);
            prop_assert_eq!(parsed.ranks, ranks);
            prop_assert_eq!(parsed.max_points, max_points.unwrap_or(DEFAULT_MAX_POINTS));
        }
    }
}
