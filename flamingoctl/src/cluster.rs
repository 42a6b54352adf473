//! `flamingoctl up`, `down` and `nodes`: the local cluster and what the
//! coordinator knows of its nodes.

use std::process::ExitCode;

use flamingo_launch::cluster::{self, UpOptions};

use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    #[arg(long, default_value_t = 2)]
    nodes: u32,
    #[arg(long, default_value_t = 2)]
    slots_per_node: u32,
    /// Coordinator port (another free one if taken).
    #[arg(long, default_value_t = 7070)]
    port: u16,
    #[arg(long, default_value_t = 10)]
    lease_ttl_seconds: u32,
    /// Storage the data service may read (a folder, or a URL prefix such as
    /// s3://bucket/laion/), repeatable; default: the state dir's `work`
    /// and `data` folders.
    #[arg(long = "allow-prefix", value_delimiter = ',')]
    allow_prefix: Vec<String>,
    /// Let admins launch command jobs (`flamingoctl launch -- CMD`), which
    /// run any program on every node. Off by default.
    #[arg(long)]
    allow_command_jobs: bool,
    /// Coordinators to run: with more than one they elect a leader through
    /// etcd and the others stand by to take over (on the next ports).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=7))]
    coordinators: u32,
    /// One data-service replica for the whole cluster, instead of one per
    /// node feeding that node's ranks.
    #[arg(long)]
    one_data_service: bool,
}

pub async fn up(args: &UpArgs, context: &Context) -> anyhow::Result<ExitCode> {
    let options = UpOptions {
        nodes: args.nodes,
        slots_per_node: args.slots_per_node,
        port: args.port,
        lease_ttl_seconds: args.lease_ttl_seconds,
        allow_prefixes: args.allow_prefix.clone(),
        allow_command_jobs: args.allow_command_jobs,
        coordinators: args.coordinators,
        one_data_service: args.one_data_service,
    };
    let state = cluster::up(&context.state_dir, &options).await?;
    if let Some([_, cert, _]) = &state.admin {
        eprintln!(
            "credentials: admin certificate {} (flamingoctl uses it with this state dir)",
            cert.display()
        );
    }
    if context.json {
        println!("{}", serde_json::to_string_pretty(&state)?);
    } else {
        println!("coordinator {}", state.coordinator);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn down(context: &Context) -> anyhow::Result<ExitCode> {
    let stopped = cluster::down(&context.state_dir)?;
    match (stopped, context.json) {
        (Some(state), true) => println!(
            "{}",
            serde_json::json!({"stopped": true, "coordinator": state.coordinator})
        ),
        (Some(_), false) => println!("local cluster stopped"),
        (None, true) => println!("{}", serde_json::json!({"stopped": false})),
        (None, false) => println!(
            "no local cluster recorded in {}; nothing to stop",
            context.state_dir.display()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn nodes(context: &Context) -> anyhow::Result<ExitCode> {
    let nodes = context.session().await?.nodes().await?;
    if context.json {
        let values: Vec<_> = nodes
            .iter()
            .map(flamingo_client::render::node_json)
            .collect();
        println!("{}", serde_json::to_string_pretty(&values)?);
    } else {
        print!("{}", flamingo_client::render::nodes_text(&nodes));
    }
    Ok(ExitCode::SUCCESS)
}
