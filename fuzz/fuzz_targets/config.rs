//! Fuzzes the configuration loader of the `tether` binary: `config::load`
//! (YAML file to `CloudConfig` / `EdgeConfig`, unknown fields refused), then
//! `CloudConfig::check` and `HubConfig::channel`, and the edge's derived
//! addresses. `src/config.rs` is compiled into this target with `#[path]`
//! because the root package has no library.
//!
//! The first byte selects the mode:
//! - even (raw): the rest is the file's text (lossy UTF-8).
//! - odd (structured): the rest picks up to 24 `key: value` lines among the
//!   real fields of the role (top level, `limits`, `preauth`,
//!   `front_limits`, `hub`, `authz`), with values that lean to edge cases
//!   (0, negative, huge, NaN, infinities, wrong types, addresses, ranges).
//!
//! Invariants: no panic; a refused file names the file; a refused `check`
//! names a config field on one line; an accepted cloud config has a
//! certificate lifetime of at least a minute, valid tunnel and pre-auth
//! limits, a port range in cluster mode, and a hub channel whose keepalive
//! timeout exceeds its interval; the limits survive a serde round trip.
#![no_main]

#[allow(dead_code, unreachable_pub)]
#[path = "../../src/config.rs"]
mod config;
// `config` checks its ranges with `crate::limits_check`.
#[allow(dead_code, unreachable_pub)]
#[path = "../../src/limits_check.rs"]
mod limits_check;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use config::{CloudConfig, EdgeConfig};
use libfuzzer_sys::fuzz_target;

/// One file per process, in memory when /dev/shm exists.
fn path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("tether-config-fuzz-{}.yaml", std::process::id()))
    })
}

const TOP_CLOUD: &[&str] = &[
    "tunnel_addr",
    "front_addr",
    "admin_addr",
    "drain_timeout_secs",
    "advertise_address",
    "tunnel_port",
    "cert_lifetime_hours",
    "cluster",
    "namespace",
    "replica_id",
    "tunnel_port_range",
    "patch_kubelet_port",
    "hub_addr",
    "peer_addr",
    "server_names",
    "egress_passthrough",
    "tunnel_cert",
    "tunnel_key",
    "front_cert",
    "front_key",
    "serving_ca_cert",
    "serving_ca_key",
    "state_dir",
    "bootstrap_addr",
    "sd_front_address",
    "edge_ca",
    "front_client_ca",
    "kubeconfig",
    "hub_api_token_file",
];
const TOP_EDGE: &[&str] = &[
    "node_name",
    "cloud_addr",
    "cloud_server_name",
    "ca",
    "cert",
    "key",
    "kubelet_url",
    "kubelet_ca",
    "kubelet_cert",
    "kubelet_key",
    "kubelet_server_name",
    "allow",
    "admin_addr",
    "backoff_base_ms",
    "backoff_max_secs",
    "drain_timeout_secs",
    "bootstrap_addr",
    "state_dir",
    "hub_addr",
    "hub_enabled",
    "hub_socket",
];
const LIMITS: &[&str] = &[
    "max_streams",
    "stream_window",
    "session_budget",
    "max_frame_size",
    "max_header_list_size",
    "max_send_buf",
    "ws_message_size",
    "ws_max_incoming",
    "keepalive_interval",
    "keepalive_timeout",
    "handshake_timeout",
];
const PREAUTH: &[&str] = &["max_pending", "max_pending_per_source", "handshake_timeout"];
const FRONT: &[&str] = &["max_connections", "max_header_bytes", "header_timeout_secs"];
const HUB: &[&str] = &[
    "max_message_bytes",
    "queue_capacity",
    "rate_qps",
    "rate_burst",
    "ack_timeout_secs",
    "max_attempts",
    "keepalive_interval_secs",
    "keepalive_timeout_secs",
];
const AUTHZ: &[&str] = &["users", "groups"];
const VALUES: &[&str] = &[
    "0",
    "1",
    "-1",
    "10",
    "30",
    "64",
    "1024",
    "65535",
    "65536",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "4e9",
    "0.5",
    "-0.0",
    "1e308",
    "1e309",
    ".nan",
    ".inf",
    "-.inf",
    "true",
    "false",
    "null",
    "~",
    "\"\"",
    "[]",
    "{}",
    "[a, b]",
    "127.0.0.1",
    "0.0.0.0:10004",
    "[::1]:10003",
    "::1",
    "10.0.0.0/8",
    "[10.0.0.0/8]",
    "10350-10999",
    "10999-10350",
    "-",
    "x",
    "edge-1",
    "http://127.0.0.1:10350",
    "https://[::1]:10250",
    "cloud.example:10004",
    "/tmp/x",
    "&a 1",
    "*a",
    "!!str 5",
    "'quoted: value'",
    "|\n  block",
];

/// Small reader over the fuzz input; yields zeros once exhausted.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn value(&mut self) -> String {
        let i = self.byte() as usize;
        match VALUES.get(i) {
            Some(v) => (*v).to_owned(),
            None if i % 2 == 0 => (u64::from(self.byte()) << (self.byte() % 56)).to_string(),
            None => {
                let n = (self.byte() % 24) as usize;
                let n = n.min(self.0.len());
                let (a, b) = self.0.split_at(n);
                self.0 = b;
                String::from_utf8_lossy(a).replace(['\n', '\r'], " ")
            }
        }
    }
}

fn structured(inp: &mut Input<'_>, cloud: bool) -> String {
    let sections: &[(&str, &[&str])] = if cloud {
        &[
            ("", TOP_CLOUD),
            ("limits", LIMITS),
            ("preauth", PREAUTH),
            ("front_limits", FRONT),
            ("hub", HUB),
            ("authz", AUTHZ),
        ]
    } else {
        &[("", TOP_EDGE), ("limits", LIMITS), ("hub", HUB)]
    };
    let mut lines: Vec<Vec<String>> = vec![Vec::new(); sections.len()];
    for _ in 0..inp.byte() % 24 {
        if inp.0.is_empty() {
            break;
        }
        let s = inp.byte() as usize % sections.len();
        let keys = sections[s].1;
        let key = keys[inp.byte() as usize % keys.len()];
        let v = inp.value();
        lines[s].push(format!("{key}: {v}"));
    }
    let mut text = String::new();
    for ((name, _), ls) in sections.iter().zip(lines) {
        if ls.is_empty() {
            continue;
        }
        if name.is_empty() {
            for l in ls {
                text.push_str(&l);
                text.push('\n');
            }
        } else {
            text.push_str(name);
            text.push_str(":\n");
            for l in ls {
                text.push_str("  ");
                text.push_str(&l.replace('\n', "\n    "));
                text.push('\n');
            }
        }
    }
    text
}

fn load<T: for<'de> serde::Deserialize<'de> + Default>(text: &str) -> Option<T> {
    let p = path();
    std::fs::write(p, text).expect("write the config file");
    match config::load::<T>(Some(p)) {
        Ok(c) => Some(c),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(
                msg.contains(&p.display().to_string()),
                "error does not name the file: {msg}"
            );
            None
        }
    }
}

fn refusal_names_a_field(e: &anyhow::Error) {
    let msg = format!("{e:#}");
    assert!(
        msg.contains("config field"),
        "refusal names no field: {msg}"
    );
    assert!(!msg.contains('\n'), "refusal on several lines: {msg}");
}

/// Equal up to the f64 seconds of the serde form: 1 µs, or a few parts in
/// 10^16 of long durations.
fn close(a: Duration, b: Duration) -> bool {
    a.abs_diff(b) <= Duration::from_micros(1).max(a.max(b).mul_f64(1e-15))
}

fn check_cloud(c: &CloudConfig) {
    match c.check() {
        Ok(()) => {
            assert!(c.cert_lifetime().expect("checked") >= Duration::from_secs(60));
            c.limits.validate().expect("checked limits");
            c.preauth.validate().expect("checked preauth");
            if c.cluster {
                let r = c.port_range().expect("checked range");
                assert!(r.start() <= r.end());
                assert!(c.advertise_address.is_some());
            }
        }
        Err(e) => refusal_names_a_field(&e),
    }
    match c.hub.channel() {
        Ok(ch) => {
            assert!(ch.keepalive_timeout > ch.keepalive_interval);
            assert!(ch.queue_capacity > 0 && ch.max_attempts > 0 && ch.max_message >= 1024);
            assert!(!ch.ack_timeout.is_zero());
            if let Some((qps, burst)) = ch.rate {
                assert!(qps > 0.0 && burst >= 1.0);
            }
        }
        Err(e) => refusal_names_a_field(&e),
    }
    let sans = c.sans();
    assert!(!sans.is_empty() && sans.windows(2).all(|w| w[0] < w[1]));
    // The limits' serde forms round-trip (durations to within 1 µs, or 1e-15 of their length).
    let l: tether_tunnel::TunnelLimits =
        serde_json::from_str(&serde_json::to_string(&c.limits).expect("ser")).expect("de");
    assert_eq!(
        (
            l.max_streams,
            l.stream_window,
            l.max_frame_size,
            l.max_header_list_size
        ),
        (
            c.limits.max_streams,
            c.limits.stream_window,
            c.limits.max_frame_size,
            c.limits.max_header_list_size
        )
    );
    assert_eq!(
        (l.max_send_buf, l.ws_message_size, l.ws_max_incoming),
        (
            c.limits.max_send_buf,
            c.limits.ws_message_size,
            c.limits.ws_max_incoming
        )
    );
    assert!(close(l.keepalive_interval, c.limits.keepalive_interval));
    assert!(close(l.keepalive_timeout, c.limits.keepalive_timeout));
    assert!(close(l.handshake_timeout, c.limits.handshake_timeout));
    let f: tether_cloudstream::FrontLimits =
        serde_json::from_str(&serde_json::to_string(&c.front_limits).expect("ser")).expect("de");
    assert_eq!(format!("{f:?}"), format!("{:?}", c.front_limits));
    let a: tether_cloudstream::Authorizer =
        serde_json::from_str(&serde_json::to_string(&c.authz).expect("ser")).expect("de");
    assert_eq!(format!("{a:?}"), format!("{:?}", c.authz));
}

fn check_edge(c: &EdgeConfig) {
    if let Err(e) = c.hub.channel() {
        refusal_names_a_field(&e);
    }
    match (&c.cloud_addr, &c.bootstrap_addr) {
        (None, None) => {
            refusal_names_a_field(&c.bootstrap_addr().expect_err("no address"));
            if c.cloud_server_name.is_none() {
                refusal_names_a_field(&c.cloud_server_name().expect_err("no address"));
            }
        }
        (Some(_), None) => assert!(c.bootstrap_addr().expect("derived").ends_with(":10002")),
        (_, Some(b)) => assert_eq!(&c.bootstrap_addr().expect("given"), b),
    }
    if let Some(n) = &c.cloud_server_name {
        assert_eq!(&c.cloud_server_name().expect("given"), n);
    }
    let _ = c.file_credentials();
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let cloud = mode & 2 == 0;
    let text = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        structured(&mut Input(rest), cloud)
    };
    if cloud || mode % 2 == 0 {
        if let Some(c) = load::<CloudConfig>(&text) {
            check_cloud(&c);
        }
    }
    if !cloud || mode % 2 == 0 {
        if let Some(c) = load::<EdgeConfig>(&text) {
            check_edge(&c);
        }
    }
});
