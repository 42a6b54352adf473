//! Process set-up shared by the daemons: tracing with `RUST_LOG`-style
//! filtering via `FLAMINGO_LOG` (default `info`) to stderr, spans exported
//! over OTLP when an endpoint is configured, and shutdown on SIGTERM or
//! SIGINT.
//!
//! OTLP uses the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (the
//! collector's base URL; `/v1/traces` is appended) or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the full URL), over HTTP with
//! protobuf bodies. Exported spans: `launch`, `rendezvous`, `checkpoint`,
//! `restart` (and whatever else flamingo's crates open at info level).

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

/// Keeps span export running; dropping it sends what is still queued.
#[derive(Default)]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("otlp", &self.provider.is_some())
            .finish()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(error) = provider.shutdown() {
                eprintln!("OTLP: could not send the last spans: {error}");
            }
        }
    }
}

/// Whether an OTLP endpoint is configured in the environment.
pub fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|value| !value.is_empty()))
}

fn otlp_provider(
    service: &str,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, crate::CommonError> {
    let failed =
        |message: String| crate::CommonError::invalid("OTEL_EXPORTER_OTLP_ENDPOINT", message);
    // The blocking HTTP client must not be built on an async runtime's
    // thread, so the exporter is built on a thread of its own.
    let exporter = std::thread::spawn(|| {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
    })
    .join()
    .map_err(|_| failed("building the OTLP exporter panicked".to_string()))?
    .map_err(|error| failed(error.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_string())
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Logs to stderr filtered by `FLAMINGO_LOG` (else `default_filter`);
/// with an OTLP endpoint configured, flamingo's spans also go there as
/// service `service`. Keep the returned guard until the process ends.
pub fn init_tracing(default_filter: &str, service: &str) -> Telemetry {
    use opentelemetry::trace::TracerProvider as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLAMINGO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let mut telemetry = Telemetry::default();
    let otlp = if otlp_configured() {
        match otlp_provider(service) {
            Ok(provider) => {
                let tracer = provider.tracer("flamingo");
                telemetry.provider = Some(provider);
                let ours = tracing_subscriber::filter::Targets::new()
                    .with_target("flamingo_coordinator", tracing::Level::INFO)
                    .with_target("flamingo_worker", tracing::Level::INFO)
                    .with_target("flamingo_engine", tracing::Level::INFO)
                    .with_target("flamingo_data", tracing::Level::INFO)
                    .with_target("flamingo_data_service", tracing::Level::INFO);
                Some(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_filter(ours),
                )
            }
            Err(error) => {
                eprintln!("OTLP: not exporting spans: {error}");
                None
            }
        }
    } else {
        None
    };
    let _ignored_if_already_set = tracing_subscriber::registry()
        .with(fmt)
        .with(otlp)
        .try_init();
    telemetry
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
