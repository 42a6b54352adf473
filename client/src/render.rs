//! Human tables and `--json` objects for jobs and nodes.

use flamingo_common::bandwidth::{render_table, CollectiveCheckReport};
use flamingo_common::{JobRecord, RankRecord};
use flamingo_proto::v1 as pb;
use serde_json::{json, Value};

pub fn rank_json(rank: &RankRecord) -> Value {
    json!({
        "rank": rank.rank,
        "local_rank": rank.local_rank,
        "node": rank.node.as_str(),
        "state": rank.state.as_str(),
        "exit_code": rank.exit_code,
        "signal": rank.signal,
        "pid": rank.pid,
        "message": rank.message,
    })
}

pub fn job_json(job: &JobRecord) -> Value {
    let result = job
        .result_json
        .as_deref()
        .and_then(|text| serde_json::from_str::<Value>(text).ok());
    json!({
        "id": job.id.as_str(),
        "name": job.spec.name,
        "kind": job.spec.kind.label(),
        "submitter": job.spec.submitter,
        "state": job.state.as_str(),
        "nodes": job.spec.nodes,
        "slots_per_node": job.spec.slots_per_node,
        "world_size": job.spec.world_size(),
        "master_addr": job.master_addr,
        "master_port": job.master_port,
        "message": job.message,
        "ranks": job.ranks.iter().map(rank_json).collect::<Vec<_>>(),
        "result": result,
        "created_unix_ms": job.created_unix_ms,
        "started_unix_ms": job.started_unix_ms,
        "finished_unix_ms": job.finished_unix_ms,
        "attempt": job.attempt,
        "last_step": job.last_step,
        "restarts": job.restarts,
        "checkpoints": job.checkpoints.iter().map(checkpoint_json).collect::<Vec<_>>(),
        "excluded_nodes": job.excluded_nodes().iter().map(|node| node.as_str().to_string()).collect::<Vec<_>>(),
    })
}

pub fn checkpoint_json(checkpoint: &flamingo_common::CheckpointRecord) -> Value {
    json!({
        "step": checkpoint.step,
        "path": checkpoint.path,
        "unix_ms": checkpoint.unix_ms,
        "attempt": checkpoint.attempt,
        "data_cursor": serde_json::from_str::<Value>(&checkpoint.data_cursor_json).unwrap_or(Value::Null),
    })
}

/// `flamingoctl checkpoints JOB`: the committed checkpoints, oldest first.
pub fn checkpoints_text(job: &JobRecord) -> String {
    if job.checkpoints.is_empty() {
        return format!("job {} has no committed checkpoint yet\n", job.id);
    }
    let mut out = format!("{:>8} {:>8} {:<10} {}\n", "STEP", "ATTEMPT", "TIME", "PATH");
    for checkpoint in &job.checkpoints {
        out.push_str(&format!(
            "{:>8} {:>8} {:<10} {}\n",
            checkpoint.step,
            checkpoint.attempt,
            flamingo_common::format_unix_ms(checkpoint.unix_ms),
            checkpoint.path
        ));
    }
    out
}

fn duration_text(job: &JobRecord) -> String {
    match (job.started_unix_ms, job.finished_unix_ms) {
        (Some(started), Some(finished)) => format!("{:.1}s", (finished - started) as f64 / 1000.0),
        (Some(started), None) => {
            format!(
                "{:.1}s (running)",
                (flamingo_common::unix_ms() - started) as f64 / 1000.0
            )
        }
        _ => "-".to_string(),
    }
}

/// A job as `flamingoctl status` shows it: a table, or pretty JSON.
pub fn job(job: &JobRecord, json: bool) -> String {
    if json {
        format!(
            "{}\n",
            serde_json::to_string_pretty(&job_json(job)).expect("JSON values serialize")
        )
    } else {
        job_text(job)
    }
}

pub fn job_text(job: &JobRecord) -> String {
    let mut out = format!(
        "job       {}\nkind      {}\nstate     {}\nlayout    {} node(s) × {} slot(s) = {} rank(s)\n",
        job.id,
        job.spec.kind.label(),
        job.state.as_str(),
        job.spec.nodes,
        job.spec.slots_per_node,
        job.spec.world_size()
    );
    if !job.master_addr.is_empty() {
        out.push_str(&format!(
            "master    {}:{}\n",
            job.master_addr, job.master_port
        ));
    }
    out.push_str(&format!("duration  {}\n", duration_text(job)));
    if !job.message.is_empty() {
        out.push_str(&format!("message   {}\n", job.message));
    }
    if job.spec.kind.restartable() {
        out.push_str(&format!(
            "step      {}\nrestarts  {} of {}\n",
            job.last_step,
            job.restarts.len(),
            job.spec.policy.max_restarts
        ));
        for line in &job.restarts {
            out.push_str(&format!("          {line}\n"));
        }
        match job.latest_checkpoint() {
            Some(checkpoint) => out.push_str(&format!(
                "latest    step {} {}\n",
                checkpoint.step, checkpoint.path
            )),
            None => out.push_str("latest    no checkpoint committed yet\n"),
        }
        let excluded = job.excluded_nodes();
        if !excluded.is_empty() {
            out.push_str(&format!(
                "excluded  {}\n",
                excluded
                    .iter()
                    .map(|node| node.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if !job.ranks.is_empty() {
        out.push_str(&format!(
            "\n{:>5} {:<12} {:>5} {:<9} {:>6} {:>8}  {}\n",
            "RANK", "NODE", "LOCAL", "STATE", "EXIT", "PID", "MESSAGE"
        ));
        for rank in &job.ranks {
            let exit = match (rank.exit_code, rank.signal) {
                (_, Some(signal)) => format!("sig{signal}"),
                (Some(code), None) => code.to_string(),
                (None, None) => "-".to_string(),
            };
            out.push_str(&format!(
                "{:>5} {:<12} {:>5} {:<9} {:>6} {:>8}  {}\n",
                rank.rank,
                rank.node.as_str(),
                rank.local_rank,
                rank.state.as_str(),
                exit,
                rank.pid.map_or("-".to_string(), |pid| pid.to_string()),
                rank.message
            ));
        }
    }
    if let Some(report) = job
        .result_json
        .as_deref()
        .and_then(|text| serde_json::from_str::<CollectiveCheckReport>(text).ok())
    {
        out.push('\n');
        out.push_str(&render_table(&report));
    }
    out
}

pub fn jobs_text(jobs: &[JobRecord]) -> String {
    let mut out = format!(
        "{:<22} {:<17} {:<10} {:>6} {:>10}  {}\n",
        "JOB", "KIND", "STATE", "RANKS", "DURATION", "MESSAGE"
    );
    for job in jobs {
        out.push_str(&format!(
            "{:<22} {:<17} {:<10} {:>6} {:>10}  {}\n",
            job.id.as_str(),
            job.spec.kind.label(),
            job.state.as_str(),
            job.spec.world_size(),
            duration_text(job),
            job.message
        ));
    }
    out
}

pub fn node_json(node: &pb::Node) -> Value {
    json!({
        "node": node.node_id,
        "address": node.address,
        "slots": node.slots,
        "free_slots": node.free_slots,
        "gpu": node.gpu,
        "draining": node.draining,
    })
}

pub fn nodes_text(nodes: &[pb::Node]) -> String {
    let mut out = format!(
        "{:<14} {:<16} {:>5} {:>5} {:<4} {}\n",
        "NODE", "ADDRESS", "SLOTS", "FREE", "GPU", "DRAINING"
    );
    for node in nodes {
        out.push_str(&format!(
            "{:<14} {:<16} {:>5} {:>5} {:<4} {}\n",
            node.node_id,
            node.address,
            node.slots,
            node.free_slots,
            if node.gpu { "yes" } else { "no" },
            if node.draining { "yes" } else { "no" }
        ));
    }
    out
}

/// `flamingoctl metrics`: one row per report; the value columns are the
/// union of the reports' names, sorted.
/// A job's eval reports in arrival order: one row per shot count, or the
/// reports as JSON (OpenFlamingo's results entries, with the step).
pub fn evals(reports: &[flamingo_proto::v1::EvalReport], json: bool) -> String {
    if json {
        let values: Vec<Value> = reports
            .iter()
            .map(|report| {
                let scores: Vec<Value> = report
                    .scores
                    .iter()
                    .map(|score| {
                        json!({"shots": score.shots, "trials": score.trials,
                            "mean": score.mean, "stddev": score.stddev})
                    })
                    .collect();
                json!({
                    "step": report.step,
                    "dataset": report.dataset,
                    "metric": report.metric,
                    "selection": report.selection,
                    "samples": report.samples,
                    "checkpoint": report.checkpoint,
                    "unix_ms": report.unix_ms,
                    "scores": scores,
                })
            })
            .collect();
        return serde_json::to_string_pretty(&values).unwrap_or_default() + "\n";
    }
    if reports.is_empty() {
        return "no eval scores stored (flamingoctl eval --job JOB stores them)\n".to_string();
    }
    let mut out = format!(
        "{:>8}  {:<14} {:<13} {:<7} {:>5}  {:>10}  {:>8}  {:>7}\n",
        "step", "dataset", "metric", "demos", "shots", "mean", "stddev", "trials"
    );
    for report in reports {
        for score in &report.scores {
            out.push_str(&format!(
                "{:>8}  {:<14} {:<13} {:<7} {:>5}  {:>10.4}  {:>8.4}  {:>7}\n",
                report.step,
                report.dataset,
                report.metric,
                report.selection,
                score.shots,
                score.mean,
                score.stddev,
                score.trials.len()
            ));
        }
    }
    out
}

pub fn metrics(points: &[flamingo_proto::v1::MetricPoint], json: bool, csv: bool) -> String {
    if json {
        let values: Vec<Value> = points
            .iter()
            .map(|point| {
                let fields: std::collections::BTreeMap<&String, &f64> =
                    point.values.iter().collect();
                json!({
                    "step": point.step,
                    "rank": point.rank,
                    "attempt": point.attempt,
                    "unix_ms": point.unix_ms,
                    "values": fields,
                })
            })
            .collect();
        return serde_json::to_string_pretty(&values).unwrap_or_default() + "\n";
    }
    let names: std::collections::BTreeSet<&String> = points
        .iter()
        .flat_map(|point| point.values.keys())
        .collect();
    let cell = |point: &flamingo_proto::v1::MetricPoint, name: &String| {
        point
            .values
            .get(name)
            .map_or(String::new(), |value| format!("{value}"))
    };
    let mut out = String::new();
    if csv {
        let header: Vec<String> = ["step", "rank", "attempt", "unix_ms"]
            .iter()
            .map(|s| s.to_string())
            .chain(names.iter().map(|name| name.to_string()))
            .collect();
        out.push_str(&header.join(","));
        out.push('\n');
        for point in points {
            let mut row = vec![
                point.step.to_string(),
                point.rank.to_string(),
                point.attempt.to_string(),
                point.unix_ms.to_string(),
            ];
            row.extend(names.iter().map(|name| cell(point, name)));
            out.push_str(&row.join(","));
            out.push('\n');
        }
        return out;
    }
    out.push_str(&format!("{:>8} {:>5} {:>8}", "STEP", "RANK", "ATTEMPT"));
    for name in &names {
        out.push_str(&format!(" {:>14}", name.to_uppercase()));
    }
    out.push('\n');
    for point in points {
        out.push_str(&format!(
            "{:>8} {:>5} {:>8}",
            point.step, point.rank, point.attempt
        ));
        for name in &names {
            let value = point
                .values
                .get(*name)
                .map_or("-".to_string(), |value| format!("{value:.6}"));
            out.push_str(&format!(" {value:>14}"));
        }
        out.push('\n');
    }
    out
}
