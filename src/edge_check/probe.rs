//! The network probes behind `tether edge --check`: a TLS handshake that
//! records the cloud's certificate chain (verified separately, so a wrong CA
//! pin is told apart from every other TLS failure), the tunnel admission probe
//! and the kubelet request. Each returns plain-text reasons, never ANSI.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;

/// The cloud's certificate chain as presented: end entity, then intermediates.
pub(super) use tether_pki::Chain;

/// Connects to the first of `addrs` that answers, within `timeout`.
pub(super) async fn connect(addrs: &[SocketAddr], timeout: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addrs)).await {
        Err(_) => Err(format!(
            "no answer within {} s (packets dropped by a firewall, or a wrong address)",
            timeout.as_secs_f64()
        )),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err("connection refused: nothing listens there".into())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(tcp)) => Ok(tcp),
    }
}

/// A TLS handshake to the tunnel port that records the server's chain
/// without judging it (that is [`verify_chain`]'s job). Returns the chain
/// and the negotiated protocol version.
pub(super) async fn handshake(
    tcp: TcpStream,
    server_name: &ServerName<'static>,
    timeout: Duration,
) -> Result<(Chain, String), String> {
    let provider = tether_pki::provider();
    let recorder = tether_pki::UnverifiedServer::new(provider.clone());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tokio::time::timeout(
        timeout,
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(server_name.clone(), tcp),
    )
    .await
    .map_err(|_| format!("no TLS answer within {} s", timeout.as_secs_f64()))?
    .map_err(|e| e.to_string())?;
    let version = tls
        .get_ref()
        .1
        .protocol_version()
        .map(|v| format!("{v:?}").replace("TLSv1_", "TLS 1."))
        .unwrap_or_default();
    let chain = recorder
        .seen()
        .ok_or("the server presented no certificate")?;
    Ok((chain, version))
}

/// Why the cloud's certificate does not verify.
pub(super) enum ChainError {
    /// Not signed by any of the pinned CAs (unknown issuer, or a CA of the
    /// same name whose key did not sign it).
    UnknownIssuer,
    /// Valid, but not for the name the edge expects.
    WrongName(String),
    /// Outside its validity period.
    Expired,
    /// Not valid yet.
    NotYetValid,
    /// Anything else (bad signature, unusable CA file, ...).
    Other(String),
}

/// Verifies `chain` against the pinned `cas` for `server_name` exactly as the
/// agent's TLS does (rustls' WebPKI verifier with those roots).
pub(super) fn verify_chain(
    chain: &Chain,
    cas: &[CertificateDer<'static>],
    server_name: &ServerName<'static>,
) -> Result<(), ChainError> {
    use rustls::CertificateError as C;
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots
            .add(ca.clone())
            .map_err(|e| ChainError::Other(format!("the pinned CA is unusable: {e}")))?;
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        tether_pki::provider(),
    )
    .build()
    .map_err(|e| ChainError::Other(e.to_string()))?;
    let (ee, intermediates) = chain.split_first().ok_or(ChainError::UnknownIssuer)?;
    match verifier.verify_server_cert(ee, intermediates, server_name, &[], UnixTime::now()) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InvalidCertificate(e)) => Err(match e {
            // A CA with the issuer's name but another key (every Tether CA
            // is called tether-edge-ca) gives a bad signature, not an
            // unknown issuer: a wrong pin all the same.
            C::UnknownIssuer | C::BadSignature => ChainError::UnknownIssuer,
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                ChainError::WrongName(e.to_string())
            }
            C::Expired | C::ExpiredContext { .. } => ChainError::Expired,
            C::NotValidYet | C::NotValidYetContext { .. } => ChainError::NotYetValid,
            other => ChainError::Other(other.to_string()),
        }),
        Err(e) => Err(ChainError::Other(e.to_string())),
    }
}

/// What the tunnel listener said to an authenticated upgrade request.
pub(super) enum Admission {
    /// The certificate passed TLS, identity and the deny list.
    Admitted,
    /// Refused with this status and reason (403 "... revoked" for a revoked one).
    Refused(u16, String),
}

/// Asks the cloud whether it admits this node certificate: the real mTLS
/// handshake, then a WebSocket upgrade on the tunnel path offering a protocol
/// version no cloud speaks. The listener answers the deny list (403, revoked)
/// before it looks at the version (400), so the answer is definitive, and no
/// session is opened: a real `tether.v1` upgrade would replace the session of
/// an agent already running on this node.
pub(super) async fn admission(
    tcp: TcpStream,
    tls: Arc<rustls::ClientConfig>,
    server_name: &ServerName<'static>,
    host: &str,
    node: &str,
    timeout: Duration,
) -> Result<Admission, String> {
    let work = async {
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS handshake with the node certificate failed: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn.with_upgrades());
        let req = hyper::Request::get(tether_tunnel::TUNNEL_PATH)
            .header("host", host)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-protocol", CHECK_PROTOCOL)
            .header(tether_tunnel::NODE_HEADER, node)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        // The cloud checks the client certificate after the TLS 1.3
        // handshake, so its refusal (an alert) surfaces here.
        let resp = send.send_request(req).await.map_err(|e| chain_text(&e))?;
        let status = resp.status().as_u16();
        if status == 101 {
            return Ok(Admission::Admitted);
        }
        // The refusal's body runs to the end of the connection, which the
        // cloud drops without a TLS close_notify: keep what arrived.
        let mut body = Vec::new();
        let mut incoming = resp.into_body();
        while body.len() < 4096 {
            match incoming.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        body.extend_from_slice(data);
                    }
                }
                _ => break,
            }
        }
        body.truncate(4096);
        let body = String::from_utf8_lossy(&body).trim().to_owned();
        let unsupported = status == 400 && body.contains("unsupported tunnel protocol");
        Ok(if unsupported {
            Admission::Admitted
        } else {
            Admission::Refused(status, body)
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer within {} s", timeout.as_secs_f64()))?
}

/// The WebSocket subprotocol of the admission probe: deliberately not one
/// the cloud speaks, so an admitted certificate gets 400 and no session.
const CHECK_PROTOCOL: &str = "tether.check";

/// `GET /healthz` to the kubelet over `tcp` (TLS when `tls` is given);
/// returns the status line. Any answer means the kubelet is reachable.
pub(super) async fn kubelet_get(
    tcp: TcpStream,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    authority: &str,
    timeout: Duration,
) -> Result<String, String> {
    let work = async {
        let req = hyper::Request::get("/healthz")
            .header("host", authority)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let status = match tls {
            Some((cfg, name)) => {
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                request(TokioIo::new(tls), req).await?
            }
            None => request(TokioIo::new(tcp), req).await?,
        };
        Ok(format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or_default()
        ))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no HTTP answer within {} s", timeout.as_secs_f64()))?
}

async fn request<I>(
    io: TokioIo<I>,
    req: hyper::Request<Empty<Bytes>>,
) -> Result<hyper::StatusCode, String>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = send.send_request(req).await.map_err(|e| chain_text(&e))?;
    Ok(resp.status())
}

/// An error and its causes on one line ("a: b: c").
pub(super) fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cur = s.source();
    }
    text
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC` (proleptic Gregorian).
pub(super) fn utc(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(-1), "1969-12-31 23:59:59 UTC");
    }
}
