//! OpenTelemetry traces: the tracing layer that turns Tether's request spans
//! (target [`tether_tunnel::trace::TARGET`]) into OpenTelemetry spans, and
//! the OTLP exporter behind it. Off unless an endpoint is configured.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;

/// Building the OTLP exporter failed.
#[derive(Debug, thiserror::Error)]
#[error("OTLP trace exporter for {endpoint}: {source}")]
pub struct ExporterError {
    endpoint: String,
    source: opentelemetry_otlp::ExporterBuildError,
}

/// A provider that batches spans to an OTLP/gRPC collector at `endpoint`
/// (for example `http://otel-collector:4317`). Must be called inside a Tokio
/// runtime: the gRPC client lives on it. Call `shutdown()` on exit to flush.
pub fn otlp_provider(endpoint: &str, service: &str) -> Result<SdkTracerProvider, ExporterError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|source| ExporterError {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    Ok(SdkTracerProvider::builder()
        .with_resource(resource(service))
        .with_batch_exporter(exporter)
        .build())
}

/// The resource every span carries: `service.name` and the version.
pub fn resource(service: &str) -> Resource {
    Resource::builder()
        .with_service_name(service.to_owned())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build()
}

/// The layer exporting Tether's request spans through `provider`. Only spans
/// with the trace target are exported, whatever the log filter says, so the
/// per-connection and per-session spans never become a request's parent.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tether"))
        .with_filter(Targets::new().with_target(tether_tunnel::trace::TARGET, tracing::Level::INFO))
}
