//! Tracing set-up shared by the binaries: `RUST_LOG`-style filtering via
//! `FLAMINGO_LOG` (default `info`), logs to stderr.

pub fn init_tracing(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLAMINGO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ignored_if_already_set = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
