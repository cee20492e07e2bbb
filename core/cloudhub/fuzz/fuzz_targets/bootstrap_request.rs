//! Fuzzes what the bootstrap server parses from anonymous clients before any
//! state is touched: the `Authorization: Bearer` token
//! (`BootstrapToken::from_str`) and the enrolment body
//! (`tether_cloudhub::check_enrol_body`: JSON, node name, CSR signature and
//! subject). When a body passes, the CSR is signed by a test CA exactly as
//! `enrol` would, and the certificate must name the requested node.
//!
//! The first byte selects the mode:
//! - even (raw): the rest is the body, and also the `Authorization` value.
//!   A refusal is a 400 that names the node only when the JSON parsed; a
//!   token that parses prints back as its input.
//! - odd (structured): a body built around a real CSR for `edge-1`, with a
//!   fuzzed node name, CSR edits (PEM text or DER bytes) and unknown
//!   fields. The untouched CSR with `edge-1` must pass, an unknown field
//!   must not, and the untouched CSR for any other name must not.
#![no_main]

use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use tether_cloudhub::check_enrol_body;
use tether_pki::enrol::EnrolRequest;
use tether_pki::{BootstrapToken, Ca, Identity, NODES_GROUP, valid_node_name};

const NODE: &str = "edge-1";

struct Fixture {
    ca: Ca,
    csr: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        ca: Ca::generate("fuzz-ca").expect("test CA"),
        csr: tether_pki::node_csr(NODE).expect("test CSR").0,
    })
}

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
    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn string(&mut self) -> String {
        let n = self.byte() as usize % 80;
        String::from_utf8_lossy(self.take(n)).into_owned()
    }
}

/// Checks a refusal or an acceptance of `body`.
fn check(body: &[u8]) -> Result<EnrolRequest, (StatusCode, String, String)> {
    let res = check_enrol_body(body);
    match &res {
        Err((code, node, reason)) => {
            assert_eq!(*code, StatusCode::BAD_REQUEST, "{reason}");
            assert!(!reason.is_empty());
            let parsed = serde_json::from_slice::<EnrolRequest>(body);
            match &parsed {
                Err(_) => {
                    assert!(node.is_empty(), "node {node:?} from unparsable JSON");
                    assert!(reason.starts_with("malformed request"), "{reason}");
                }
                Ok(r) => assert_eq!(node, &r.node_name),
            }
        }
        Ok(r) => {
            assert!(valid_node_name(&r.node_name), "{:?}", r.node_name);
            // What `enrol` signs when the token or renewal is good: it must
            // not fail (a single-use token is spent by then), and the
            // certificate names exactly this node, in the nodes group only.
            let pem = fixture()
                .ca
                .sign_node_csr(&r.csr, &r.node_name, &[], Duration::from_secs(3600))
                .expect("a checked CSR signs");
            let der = tether_pki::load_certs_pem(pem.as_bytes()).expect("issued PEM parses");
            let id = Identity::from_der(&der[0]).expect("issued certificate parses");
            assert_eq!(id.node_name(), Some(r.node_name.as_str()));
            assert_eq!(id.organizations, vec![NODES_GROUP.to_owned()]);
            assert!(id.ips.is_empty());
            // The canonical JSON of an accepted request is accepted too.
            let again = check_enrol_body(&serde_json::to_vec(r).expect("serializes"))
                .expect("re-encoded request passes");
            assert_eq!((&again.node_name, &again.csr), (&r.node_name, &r.csr));
        }
    }
    res
}

/// The bearer extraction of `enrol`, then the token parser.
fn check_token(value: &[u8]) {
    let Ok(v) = http::HeaderValue::from_bytes(value) else {
        return;
    };
    let Some(bearer) = v.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
        return;
    };
    if let Ok(t) = BootstrapToken::from_str(bearer) {
        // Only the canonical form parses: lowercase hex of fixed lengths.
        assert_eq!(t.expose(), bearer.trim());
        let back = BootstrapToken::from_str(&t.expose()).expect("printed token parses");
        assert_eq!(
            (back.ca_hash, &back.id, back.secret_hash()),
            (t.ca_hash, &t.id, t.secret_hash())
        );
        assert_eq!(t.id.len(), 16);
    }
}

/// Edits `s` at a fuzz-chosen place: delete some bytes, insert some.
fn splice(s: &mut Vec<u8>, inp: &mut Input<'_>) {
    let at = (u16::from_le_bytes([inp.byte(), inp.byte()]) as usize) % (s.len() + 1);
    let del = (inp.byte() as usize % 8).min(s.len() - at);
    let ins = inp.byte() as usize % 8;
    let new = inp.take(ins).to_vec();
    s.splice(at..at + del, new);
}

fn structured(inp: &mut Input<'_>) {
    let f = fixture();
    let node_mode = inp.byte() % 3;
    let node = match node_mode {
        0 => NODE.to_owned(),
        1 => inp.string(),
        _ => {
            let mut n = NODE.as_bytes().to_vec();
            splice(&mut n, inp);
            String::from_utf8_lossy(&n).into_owned()
        }
    };
    let csr_mode = inp.byte() % 4;
    let csr = match csr_mode {
        0 => f.csr.clone(),
        1 => {
            let mut pem = f.csr.as_bytes().to_vec();
            for _ in 0..1 + inp.byte() % 3 {
                splice(&mut pem, inp);
            }
            String::from_utf8_lossy(&pem).into_owned()
        }
        2 => {
            let b64: String = f.csr.lines().filter(|l| !l.starts_with("-----")).collect();
            let mut der = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("PEM body is base64");
            for _ in 0..1 + inp.byte() % 3 {
                splice(&mut der, inp);
            }
            format!(
                "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
                base64::engine::general_purpose::STANDARD.encode(der)
            )
        }
        _ => inp.string(),
    };
    let extra = inp.byte() % 4 == 0;
    let mut body = serde_json::json!({"nodeName": node, "csr": csr});
    if extra {
        body["nodeIp"] = serde_json::json!("10.0.0.1");
    }
    let res = check(&serde_json::to_vec(&body).expect("serializes"));
    if extra {
        assert!(res.is_err(), "unknown field accepted");
    } else if csr_mode == 0 {
        assert_eq!(res.is_ok(), node == NODE, "node {node:?}: {:?}", res.err());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let _ = check(rest);
        check_token(rest);
    } else {
        structured(&mut Input(rest));
    }
});
