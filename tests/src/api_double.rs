//! A scripted kube-apiserver DOUBLE for tests: an in-process plain-HTTP
//! server on loopback that speaks just enough of the Kubernetes API for
//! Tether's cluster mode, records every request exactly as it arrived
//! (method, path, query, content type, body) and plays the failures a real
//! apiserver produces. It is not a Kubernetes API server and must never be
//! mistaken for one: tests named `*_against_api_double_*` use it.
//!
//! What it models:
//! - objects in collections (`nodes`, `pods`, `configmaps` under `/api/v1`,
//!   `leases` under `/apis/coordination.k8s.io/v1`; a collection is named by
//!   its plural alone) with one global resourceVersion counter, like etcd;
//! - GET, list (`limit`, `fieldSelector` with `a.b=v` / `a.b!=v` terms,
//!   `labelSelector` with `k=v` / `k!=v` terms), POST (409 AlreadyExists),
//!   PUT with a resourceVersion precondition (409 Conflict on a stale one),
//!   DELETE with `DeleteOptions.preconditions.resourceVersion` (409 Conflict
//!   on a stale one), PATCH with `application/merge-patch+json` (RFC 7386),
//!   404 NotFound with a `Status` body;
//! - watches (`watch=true&resourceVersion=N`): replay of events after N from
//!   an event log, then live events; [`ApiDouble::end_watches`] ends them
//!   (a restart), [`ApiDouble::expire_watches`] sends `410 Gone` and makes
//!   older versions too old, forcing a relist;
//! - scripted faults per method and path ([`Fault`]), and read gates that hold
//!   the first N reads until all N arrived, to force races.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Barrier, mpsc, watch};
use tokio::task::JoinHandle;

type Body = BoxBody<Bytes, Infallible>;

/// One request as the double received it, and what it answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// HTTP method.
    pub method: Method,
    /// Path, without the query.
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The request body.
    pub body: Bytes,
    /// The status answered (0: the connection was dropped).
    pub status: u16,
}

impl Recorded {
    /// The query's `key=value` pairs, decoded.
    pub fn params(&self) -> BTreeMap<String, String> {
        parse_query(self.query.as_deref())
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A scripted failure, consumed by the next matching request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and a `Status` body.
    Status(u16),
    /// Drop the connection without answering (a transport error).
    Disconnect,
}

struct Gate {
    method: Method,
    path: String,
    remaining: usize,
    barrier: Arc<Barrier>,
}

struct WatchConn {
    plural: String,
    namespace: Option<String>,
    selector: Vec<Selector>,
    tx: mpsc::Sender<Bytes>,
}

#[derive(Clone)]
struct LoggedEvent {
    rv: u64,
    kind: &'static str,
    plural: String,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches from a version below this get 410 Gone.
    compacted: u64,
    /// plural -> (namespace or "", name) -> object.
    objects: HashMap<String, BTreeMap<(String, String), Value>>,
    events: Vec<LoggedEvent>,
    watches: Vec<WatchConn>,
    faults: HashMap<(Method, String), VecDeque<Fault>>,
    gates: Vec<Gate>,
    log: Vec<Recorded>,
}

/// The running double. Dropping it stops the server.
pub struct ApiDouble {
    /// Where it listens (loopback, port 0).
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changed: Arc<watch::Sender<u64>>,
    task: JoinHandle<()>,
}

impl Drop for ApiDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A Node object as the double stores it.
pub fn node(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}}
    })
}

/// A Pod object scheduled on `node_name` (unscheduled if None).
pub fn pod(namespace: &str, name: &str, node_name: Option<&str>) -> Value {
    let mut spec = json!({"containers": [{"name": "app", "image": "registry.example/app:1"}]});
    if let Some(n) = node_name {
        spec["nodeName"] = json!(n);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{namespace}-{name}")},
        "spec": spec,
        "status": {"phase": "Running"}
    })
}

impl ApiDouble {
    /// Starts the double on 127.0.0.1, port 0.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let changed = Arc::new(watch::channel(0).0);
        let task = tokio::spawn(serve(listener, state.clone(), changed.clone()));
        Ok(Self {
            addr,
            state,
            changed,
            task,
        })
    }

    /// A kube client configuration pointing at the double.
    pub fn config(&self) -> kube::Config {
        let mut cfg = kube::Config::new(
            format!("http://{}", self.addr)
                .parse()
                .expect("loopback URL"),
        );
        cfg.connect_timeout = Some(Duration::from_secs(5));
        cfg.read_timeout = Some(Duration::from_secs(30));
        cfg
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("double lock")
    }

    /// Stores `object` (creating or replacing it) and tells matching watches.
    pub fn put(&self, plural: &str, object: Value) -> u64 {
        let mut st = self.lock();
        let key = key_of(&object);
        let kind = if st.objects.get(plural).is_some_and(|m| m.contains_key(&key)) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.store(plural, kind, object)
    }

    /// Deletes an object and tells matching watches.
    pub fn delete(&self, plural: &str, namespace: &str, name: &str) -> bool {
        let mut st = self.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let Some(mut object) = st.objects.get_mut(plural).and_then(|m| m.remove(&key)) else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.emit(plural, "DELETED", object, true);
        true
    }

    /// Changes objects without any watch hearing of it, as if the events
    /// were lost; only a relist shows the change.
    pub fn put_unseen(&self, plural: &str, object: Value) {
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        let mut object = object;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(&object);
        st.objects
            .entry(plural.to_owned())
            .or_default()
            .insert(key, object);
    }

    /// Deletes an object without any watch hearing of it.
    pub fn delete_unseen(&self, plural: &str, namespace: &str, name: &str) {
        let mut st = self.lock();
        st.rv += 1;
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(m) = st.objects.get_mut(plural) {
            m.remove(&key);
        }
    }

    /// The stored object.
    pub fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.lock();
        st.objects
            .get(plural)?
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Ends every open watch cleanly (the apiserver's watch timeout, or a
    /// restart): clients re-watch from their last version.
    pub fn end_watches(&self) {
        self.lock().watches.clear();
    }

    /// Sends `410 Gone` to every open watch and makes every version up to
    /// now too old to watch from, so clients must relist.
    pub fn expire_watches(&self) {
        let mut st = self.lock();
        // Watches from before now are refused; a relist's version is fine.
        st.compacted = st.rv;
        let gone = gone_event(st.rv);
        for w in std::mem::take(&mut st.watches) {
            let _ = w.tx.try_send(gone.clone());
        }
    }

    /// Open watch connections.
    pub fn open_watches(&self) -> usize {
        let mut st = self.lock();
        st.watches.retain(|w| !w.tx.is_closed());
        st.watches.len()
    }

    /// The next requests of `method` to `path` fail with `faults`, in order.
    pub fn fail_next(&self, method: Method, path: &str, faults: &[Fault]) {
        self.lock()
            .faults
            .entry((method, path.to_owned()))
            .or_default()
            .extend(faults.iter().copied());
    }

    /// Holds the answers to the next `n` requests of `method` to `path` until
    /// all `n` have arrived, then sends them together: concurrent clients then
    /// surely read the same version and race on the write.
    pub fn gate(&self, method: Method, path: &str, n: usize) {
        self.lock().gates.push(Gate {
            method,
            path: path.to_owned(),
            remaining: n,
            barrier: Arc::new(Barrier::new(n)),
        });
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().log.clone()
    }

    /// Requests so far of `method` to `path`.
    pub fn requests_to(&self, method: &Method, path: &str) -> Vec<Recorded> {
        self.lock()
            .log
            .iter()
            .filter(|r| r.method == *method && r.path == path)
            .cloned()
            .collect()
    }

    /// Waits until `pred` holds for the request log, or `timeout` passes.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Recorded]) -> bool) -> bool {
        let mut rx = self.changed.subscribe();
        tokio::time::timeout(timeout, async {
            loop {
                // A snapshot, so `pred` may call back into the double.
                let log = self.lock().log.clone();
                if pred(&log) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
    }

    /// Waits until `pred` holds for the stored objects, or `timeout` passes.
    pub async fn wait_for_objects(
        &self,
        timeout: Duration,
        pred: impl Fn(&HashMap<String, BTreeMap<(String, String), Value>>) -> bool,
    ) -> bool {
        let mut rx = self.changed.subscribe();
        tokio::time::timeout(timeout, async {
            loop {
                let objects = self.lock().objects.clone();
                if pred(&objects) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
    }
}

fn key_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or("").to_owned(),
        meta["name"].as_str().unwrap_or("").to_owned(),
    )
}

impl State {
    /// Stores with a fresh version and emits the event.
    fn store(&mut self, plural: &str, kind: &'static str, mut object: Value) -> u64 {
        self.rv += 1;
        let rv = self.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(&object);
        self.objects
            .entry(plural.to_owned())
            .or_default()
            .insert(key, object.clone());
        self.emit(plural, kind, object, true);
        rv
    }

    fn emit(&mut self, plural: &str, kind: &'static str, object: Value, live: bool) {
        let ev = LoggedEvent {
            rv: self.rv,
            kind,
            plural: plural.to_owned(),
            object,
        };
        if live {
            let line = event_line(ev.kind, &ev.object);
            self.watches.retain(|w| {
                if !w.matches(&ev) {
                    return true;
                }
                match w.tx.try_send(line.clone()) {
                    Ok(()) => true,
                    // The client went away (a replica shut down): forget it.
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                    // Bounded per watch; a test that overflows it is broken.
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        panic!("api double watch buffer full")
                    }
                }
            });
        }
        self.events.push(ev);
    }
}

impl WatchConn {
    fn matches(&self, ev: &LoggedEvent) -> bool {
        ev.plural == self.plural
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| ev.object["metadata"]["namespace"] == ns)
            && selects(&self.selector, &ev.object)
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("json");
    line.push(b'\n');
    Bytes::from(line)
}

fn gone_event(current: u64) -> Bytes {
    event_line(
        "ERROR",
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "Expired", "code": 410,
            "message": format!("too old resource version (current {current})"),
        }),
    )
}

/// One `fieldSelector` term.
#[derive(Clone, Debug)]
struct Selector {
    path: Vec<String>,
    value: String,
    equal: bool,
}

fn parse_selector(s: &str) -> Result<Vec<Selector>, String> {
    s.split(',')
        .filter(|t| !t.is_empty())
        .map(|term| {
            let (path, value, equal) = if let Some((p, v)) = term.split_once("!=") {
                (p, v, false)
            } else if let Some((p, v)) = term.split_once("==") {
                (p, v, true)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, v, true)
            } else {
                return Err(format!("bad field selector term {term:?}"));
            };
            Ok(Selector {
                path: path.split('.').map(str::to_owned).collect(),
                value: value.to_owned(),
                equal,
            })
        })
        .collect()
}

/// `labelSelector` equality terms (`k=v`, `k==v`, `k!=v`); set-based terms
/// are refused, as the double does not model them.
fn parse_label_selector(s: &str) -> Result<Vec<Selector>, String> {
    s.split(',')
        .filter(|t| !t.is_empty())
        .map(|term| {
            let (key, value, equal) = if let Some((k, v)) = term.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, v, true)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, v, true)
            } else {
                return Err(format!(
                    "the api double takes equality label selectors only, not {term:?}"
                ));
            };
            Ok(Selector {
                // Label keys hold dots and slashes: one path step, not split.
                path: vec!["metadata".into(), "labels".into(), key.trim().to_owned()],
                value: value.trim().to_owned(),
                equal,
            })
        })
        .collect()
}

fn selects(selector: &[Selector], object: &Value) -> bool {
    selector.iter().all(|s| {
        let mut v = object;
        for p in &s.path {
            v = &v[p.as_str()];
        }
        let actual = v.as_str().unwrap_or("");
        (actual == s.value) == s.equal
    })
}

fn parse_query(q: Option<&str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(decode(k), decode(v));
    }
    out
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "reason": reason, "message": message, "code": code,
    })
}

fn error(code: u16, reason: &str, message: &str) -> Response<Body> {
    full(
        StatusCode::from_u16(code).expect("status code"),
        &status_body(code, reason, message),
    )
}

fn reason_of(code: u16) -> &'static str {
    match code {
        404 => "NotFound",
        409 => "Conflict",
        410 => "Expired",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

async fn serve(listener: TcpListener, state: Arc<Mutex<State>>, changed: Arc<watch::Sender<u64>>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let changed = changed.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                let changed = changed.clone();
                async move { handle(req, state, changed).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// The parts of a Kubernetes API path.
struct Target {
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_target(path: &str) -> Option<Target> {
    // The core group (`/api/v1/`) or a named one (`/apis/<group>/<version>/`).
    let rest = match path.strip_prefix("/api/v1/") {
        Some(rest) => rest,
        None => {
            let rest = path.strip_prefix("/apis/")?;
            let mut parts = rest.splitn(3, '/');
            let (_group, _version) = (parts.next()?, parts.next()?);
            parts.next()?
        }
    };
    let segs: Vec<&str> = rest.split('/').collect();
    let (namespace, segs) = match segs.as_slice() {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        other => (None, other),
    };
    let (plural, name, sub) = match segs {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(*n), None),
        [p, n, s] => (*p, Some(*n), Some(*s)),
        _ => return None,
    };
    Some(Target {
        plural: plural.to_owned(),
        namespace,
        name: name.map(str::to_owned),
        subresource: sub.map(str::to_owned),
    })
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    changed: Arc<watch::Sender<u64>>,
) -> Result<Response<Body>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut rec = Recorded {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        content_type: parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
        status: 0,
    };
    let (fault, barrier) = {
        let mut st = state.lock().expect("double lock");
        let fault = st
            .faults
            .get_mut(&(rec.method.clone(), rec.path.clone()))
            .and_then(VecDeque::pop_front);
        let barrier = st
            .gates
            .iter_mut()
            .find(|g| g.method == rec.method && g.path == rec.path && g.remaining > 0)
            .map(|g| {
                g.remaining -= 1;
                g.barrier.clone()
            });
        (fault, barrier)
    };
    let resp = match fault {
        Some(Fault::Disconnect) => None,
        Some(Fault::Status(code)) => {
            Some(error(code, reason_of(code), "scripted by the api double"))
        }
        None => Some(respond(&rec, &state)),
    };
    // Answer only once every gated request has been answered from the same
    // state: none of their clients can have written in between.
    if let Some(b) = barrier {
        b.wait().await;
    }
    rec.status = resp.as_ref().map_or(0, |r| r.status().as_u16());
    state.lock().expect("double lock").log.push(rec);
    changed.send_modify(|n| *n += 1);
    resp.ok_or_else(|| std::io::Error::other("scripted disconnect"))
}

fn respond(rec: &Recorded, state: &Arc<Mutex<State>>) -> Response<Body> {
    let Some(t) = parse_target(&rec.path) else {
        return error(404, "NotFound", "the api double does not serve this path");
    };
    let params = rec.params();
    let mut st = state.lock().expect("double lock");
    let ns = t.namespace.clone().unwrap_or_default();
    match (&rec.method, &t.name, &t.subresource) {
        (&Method::GET, None, None) => {
            let fields = parse_selector(params.get("fieldSelector").map_or("", |s| s));
            let labels = parse_label_selector(params.get("labelSelector").map_or("", |s| s));
            let selector = match (fields, labels) {
                (Ok(mut f), Ok(l)) => {
                    f.extend(l);
                    f
                }
                (Err(e), _) | (_, Err(e)) => return error(400, "BadRequest", &e),
            };
            if params.get("watch").map(String::as_str) == Some("true") {
                return watch(&mut st, t, selector, &params);
            }
            let items: Vec<Value> = st
                .objects
                .get(&t.plural)
                .map(|m| {
                    m.values()
                        .filter(|o| t.namespace.is_none() || o["metadata"]["namespace"] == ns)
                        .filter(|o| selects(&selector, o))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            full(
                StatusCode::OK,
                &json!({
                    "apiVersion": "v1",
                    "kind": "List",
                    "metadata": {"resourceVersion": st.rv.to_string()},
                    "items": items,
                }),
            )
        }
        (&Method::GET, Some(name), None) => {
            match st
                .objects
                .get(&t.plural)
                .and_then(|m| m.get(&(ns.clone(), name.clone())))
            {
                Some(o) => full(StatusCode::OK, o),
                None => not_found(&t.plural, name),
            }
        }
        (&Method::POST, None, None) => {
            let mut object: Value = match serde_json::from_slice(&rec.body) {
                Ok(v) => v,
                Err(e) => return error(400, "BadRequest", &e.to_string()),
            };
            object["metadata"]["namespace"] = json!(ns);
            let key = key_of(&object);
            if st
                .objects
                .get(&t.plural)
                .is_some_and(|m| m.contains_key(&key))
            {
                return error(
                    409,
                    "AlreadyExists",
                    &format!("{} {:?} already exists", t.plural, key.1),
                );
            }
            st.store(&t.plural, "ADDED", object);
            let stored = st.objects[&t.plural][&key].clone();
            full(StatusCode::CREATED, &stored)
        }
        (&Method::PUT, Some(name), None) => {
            let object: Value = match serde_json::from_slice(&rec.body) {
                Ok(v) => v,
                Err(e) => return error(400, "BadRequest", &e.to_string()),
            };
            let key = (ns.clone(), name.clone());
            let Some(current) = st.objects.get(&t.plural).and_then(|m| m.get(&key)) else {
                return not_found(&t.plural, name);
            };
            if let Some(rv) = object["metadata"]["resourceVersion"].as_str()
                && current["metadata"]["resourceVersion"] != rv
            {
                return error(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                        t.plural
                    ),
                );
            }
            if key_of(&object).1 != *name {
                return error(400, "BadRequest", "name in body does not match the path");
            }
            st.store(&t.plural, "MODIFIED", object);
            full(StatusCode::OK, &st.objects[&t.plural][&key].clone())
        }
        (&Method::DELETE, Some(name), None) => {
            // An empty body is a delete without options.
            let options: Value = if rec.body.is_empty() {
                json!({})
            } else {
                match serde_json::from_slice(&rec.body) {
                    Ok(v) => v,
                    Err(e) => return error(400, "BadRequest", &e.to_string()),
                }
            };
            let key = (ns.clone(), name.clone());
            let Some(current) = st.objects.get(&t.plural).and_then(|m| m.get(&key)) else {
                return not_found(&t.plural, name);
            };
            if let Some(rv) = options["preconditions"]["resourceVersion"].as_str()
                && current["metadata"]["resourceVersion"] != rv
            {
                return error(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {} {name:?}: the ResourceVersion in the precondition ({rv}) does not match the ResourceVersion in record ({}). The object might have been modified",
                        t.plural,
                        current["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap_or("")
                    ),
                );
            }
            let mut object = st
                .objects
                .get_mut(&t.plural)
                .and_then(|m| m.remove(&key))
                .expect("present");
            st.rv += 1;
            let rv = st.rv;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            st.emit(&t.plural, "DELETED", object, true);
            // Like the apiserver for kinds deleted at once (no graceful
            // deletion, no finalizers): a success Status.
            full(
                StatusCode::OK,
                &json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Success",
                    "details": {"name": name, "kind": t.plural},
                }),
            )
        }
        (&Method::PATCH, Some(name), sub) => {
            if rec.content_type.as_deref() != Some("application/merge-patch+json") {
                return error(
                    415,
                    "UnsupportedMediaType",
                    "the api double takes merge patches only",
                );
            }
            let patch: Value = match serde_json::from_slice(&rec.body) {
                Ok(v) => v,
                Err(e) => return error(400, "BadRequest", &e.to_string()),
            };
            let key = (ns.clone(), name.clone());
            let Some(mut object) = st.objects.get(&t.plural).and_then(|m| m.get(&key)).cloned()
            else {
                return not_found(&t.plural, name);
            };
            match sub.as_deref() {
                // The status subresource changes status only.
                Some("status") => merge_patch(&mut object["status"], &patch["status"]),
                None => merge_patch(&mut object, &patch),
                Some(_) => return error(404, "NotFound", "unknown subresource"),
            }
            st.store(&t.plural, "MODIFIED", object);
            full(StatusCode::OK, &st.objects[&t.plural][&key].clone())
        }
        _ => error(405, "MethodNotAllowed", "the api double does not do this"),
    }
}

fn not_found(plural: &str, name: &str) -> Response<Body> {
    error(404, "NotFound", &format!("{plural} {name:?} not found"))
}

fn watch(
    st: &mut State,
    t: Target,
    selector: Vec<Selector>,
    params: &BTreeMap<String, String>,
) -> Response<Body> {
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    if from != 0 && from < st.compacted {
        // Like etcd after compaction: the client must relist.
        let _ = tx.try_send(gone_event(st.rv));
    } else {
        let conn = WatchConn {
            plural: t.plural,
            namespace: t.namespace,
            selector,
            tx,
        };
        let missed: Vec<LoggedEvent> = st
            .events
            .iter()
            .filter(|e| e.rv > from && conn.matches(e))
            .cloned()
            .collect();
        for e in missed {
            conn.tx
                .try_send(event_line(e.kind, &e.object))
                .expect("api double watch buffer full");
        }
        st.watches.push(conn);
    }
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response")
}

/// Starts a double and says so in the error if it cannot.
pub async fn start() -> anyhow::Result<ApiDouble> {
    ApiDouble::start().await.context("start the api double")
}
