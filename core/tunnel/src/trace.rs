//! W3C trace context across the tunnel.
//!
//! Request spans are created with the target [`TARGET`]; the binary's
//! OpenTelemetry layer exports only that target, so connection and session
//! spans (long-lived, one per client connection or node) never become the
//! root of every request's trace. Without that layer every function here is a
//! cheap no-op: spans carry no OpenTelemetry context and nothing is injected.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The tracing target of spans exported as OpenTelemetry spans.
pub const TARGET: &str = "tether::trace";

/// Makes `span` a child of the W3C trace context in `headers`, when they carry
/// a valid `traceparent`. Returns the incoming `traceparent`, to be recorded
/// on the span as the caller's.
pub fn adopt_parent(span: &Span, headers: &HeaderMap) -> Option<String> {
    let incoming = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)?;
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if cx.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed (tracing off)
        // or the span is disabled: nothing to link then.
        let _ = span.set_parent(cx);
    }
    Some(incoming)
}

/// Writes `span`'s context as `traceparent` (and `tracestate`) into
/// `headers`, replacing any the caller sent, so the next hop is a child of
/// `span`. Leaves the headers alone when tracing is off.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    headers.remove("traceparent");
    headers.remove("tracestate");
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_opentelemetry_layer_nothing_is_injected() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        let span = tracing::info_span!(target: "tether::trace", "t");
        assert_eq!(
            adopt_parent(&span, &headers).as_deref(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        inject(&span, &mut headers);
        // The caller's header passes through untouched when tracing is off.
        assert_eq!(
            headers["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
    }
}
