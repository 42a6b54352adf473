//! Process set-up shared by the daemons: tracing with `RUST_LOG`-style
//! filtering via `FLAMINGO_LOG` (default `info`) to stderr, and shutdown on
//! SIGTERM or SIGINT.

pub fn init_tracing(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLAMINGO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ignored_if_already_set = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// A token cancelled on the first SIGTERM or SIGINT. Call inside a tokio
/// runtime; the daemons drain and stop when it fires.
pub fn shutdown_on_signals() -> tokio_util::sync::CancellationToken {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signalled = shutdown.clone();
    tokio::spawn(async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler cannot fail in a fresh runtime");
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        signalled.cancel();
    });
    shutdown
}
