//! The KubeEdge-shaped message and its wire form.
//!
//! ```json
//! {"header":{"msg_id":"..","parent_msg_id":"..","timestamp":1700000000000,
//!            "resourceversion":"42","sync":false},
//!  "route":{"source":"app","group":"resource","operation":"update","resource":"ns/pod/x"},
//!  "content":{...}}
//! ```
//!
//! Content is any JSON value, or bytes: bytes travel base64-encoded with
//! `header.content_encoding = "base64"` (a Tether extension KubeEdge peers
//! ignore). On the wire each message is one frame: a 4-byte big-endian length
//! and the JSON.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Route group reserved for the channel's own messages (acks, errors,
/// keepalives, failure reports). Applications cannot publish to it.
pub const HUB_GROUP: &str = "tether.hub";

/// What a message carries.
#[derive(Clone, Debug, PartialEq)]
pub enum Content {
    /// Nothing.
    None,
    /// A JSON value.
    Json(Value),
    /// Opaque bytes.
    Bytes(Bytes),
}

/// The message header.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Unique id; assigned on publish when empty.
    #[serde(default)]
    pub msg_id: String,
    /// The message this one answers (acks, sync responses).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent_msg_id: String,
    /// Milliseconds since the Unix epoch; set on publish when 0.
    #[serde(default)]
    pub timestamp: i64,
    /// The resource's version; a message older than one already delivered
    /// for the same resource is dropped.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resourceversion: String,
    /// A request that expects a response message.
    #[serde(default)]
    pub sync: bool,
    /// `base64` on the wire when the content is bytes; [`Content`] says it
    /// in memory, so this stays `None` there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) content_encoding: Option<String>,
}

/// Where a message goes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// The sending module.
    #[serde(default)]
    pub source: String,
    /// The receiving module group (subscriptions filter on it).
    pub group: String,
    /// What to do: insert, update, delete, query, response, ...
    pub operation: String,
    /// What it is about, e.g. `namespace/pod/name`.
    #[serde(default)]
    pub resource: String,
}

/// One message.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// Identity, causality and versioning.
    pub header: Header,
    /// Addressing.
    pub route: Route,
    /// Payload.
    pub content: Content,
}

/// Why a message or frame was rejected. The text reaches the sender.
#[derive(Debug, thiserror::Error)]
pub enum BadMessage {
    /// Not JSON, or not a message object.
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
    /// No route, or a route without group or operation.
    #[error("message has no route (route.group and route.operation are required)")]
    NoRoute,
    /// Larger than the channel's limit.
    #[error("message of {size} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Content marked base64 that is not.
    #[error("content_encoding is base64 but the content is not a base64 string")]
    Encoding,
    /// A message id longer than 128 bytes or with control characters.
    #[error("msg_id must be 1-128 printable characters")]
    BadId,
    /// Applications may not use the reserved group.
    #[error("route.group {HUB_GROUP:?} is reserved for the channel itself")]
    Reserved,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    header: Header,
    route: Option<Route>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    content: Value,
}

impl Message {
    /// A message with JSON content and no id yet.
    pub fn new(route: Route, content: Content) -> Self {
        Self {
            header: Header::default(),
            route,
            content,
        }
    }

    /// The JSON form.
    pub fn to_json(&self) -> Vec<u8> {
        let mut header = self.header.clone();
        let content = match &self.content {
            Content::None => Value::Null,
            Content::Json(v) => {
                header.content_encoding = None;
                v.clone()
            }
            Content::Bytes(b) => {
                header.content_encoding = Some("base64".to_owned());
                Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
        };
        serde_json::to_vec(&Wire {
            header,
            route: Some(self.route.clone()),
            content,
        })
        .expect("a message always serializes")
    }

    /// Parses and validates the JSON form (`max` bytes at most).
    pub fn from_json(json: &[u8], max: usize) -> Result<Self, BadMessage> {
        if json.len() > max {
            return Err(BadMessage::TooLarge {
                size: json.len(),
                max,
            });
        }
        let wire: Wire = serde_json::from_slice(json)?;
        let route = wire.route.ok_or(BadMessage::NoRoute)?;
        if route.group.is_empty() || route.operation.is_empty() {
            return Err(BadMessage::NoRoute);
        }
        let content = match (wire.header.content_encoding.as_deref(), wire.content) {
            (Some("base64"), Value::String(s)) => Content::Bytes(
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|_| BadMessage::Encoding)?
                    .into(),
            ),
            (Some("base64"), _) => return Err(BadMessage::Encoding),
            (_, Value::Null) => Content::None,
            (_, v) => Content::Json(v),
        };
        let mut header = wire.header;
        header.content_encoding = None;
        Ok(Self {
            header,
            route,
            content,
        })
    }

    /// Checks what an application may publish and fills in the id and
    /// timestamp when missing.
    pub fn prepare(&mut self) -> Result<(), BadMessage> {
        if self.route.group.is_empty() || self.route.operation.is_empty() {
            return Err(BadMessage::NoRoute);
        }
        if self.route.group == HUB_GROUP {
            return Err(BadMessage::Reserved);
        }
        if self.header.msg_id.is_empty() {
            self.header.msg_id = new_id();
        } else if !valid_id(&self.header.msg_id) {
            return Err(BadMessage::BadId);
        }
        if self.header.timestamp == 0 {
            self.header.timestamp = now_millis();
        }
        Ok(())
    }

    /// A channel message (ack, error, keepalive, failure report).
    pub(crate) fn control(operation: &str, parent: &str, content: Content) -> Self {
        Self {
            header: Header {
                msg_id: new_id(),
                parent_msg_id: parent.to_owned(),
                timestamp: now_millis(),
                ..Header::default()
            },
            route: Route {
                source: HUB_GROUP.to_owned(),
                group: HUB_GROUP.to_owned(),
                operation: operation.to_owned(),
                resource: String::new(),
            },
            content,
        }
    }

    /// True for the channel's own messages.
    pub fn is_control(&self) -> bool {
        self.route.group == HUB_GROUP
    }
}

fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// A unique id: a per-process random prefix and a counter, in hex. Unique
/// across restarts without a random draw per message.
pub fn new_id() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let mut b = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .expect("the system random source works");
        u64::from_le_bytes(b)
    });
    format!(
        "{prefix:016x}{:016x}",
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> Route {
        Route {
            source: "app".into(),
            group: "resource".into(),
            operation: "update".into(),
            resource: "default/pod/web".into(),
        }
    }

    #[test]
    fn json_and_bytes_round_trip() {
        for content in [
            Content::Json(serde_json::json!({"a": [1, 2]})),
            Content::Bytes(Bytes::from_static(b"\x00\xffbin")),
            Content::None,
        ] {
            let mut m = Message::new(route(), content);
            m.prepare().unwrap();
            let back = Message::from_json(&m.to_json(), 1 << 20).unwrap();
            assert_eq!(back, m);
        }
    }

    #[test]
    fn kubeedge_json_parses() {
        let j = br#"{"header":{"msg_id":"5f7c","parent_msg_id":"","timestamp":1,"resourceversion":"7","sync":true},
                     "route":{"source":"edged","group":"meta","operation":"query","resource":"ns/configmap/c"},
                     "content":"text"}"#;
        let m = Message::from_json(j, 4096).unwrap();
        assert!(m.header.sync);
        assert_eq!(m.header.resourceversion, "7");
        assert_eq!(m.content, Content::Json(Value::String("text".into())));
    }

    #[test]
    fn bad_input_is_named() {
        let e = |j: &[u8]| Message::from_json(j, 64).unwrap_err().to_string();
        assert!(e(b"{not json").starts_with("malformed message"));
        assert!(e(br#"{"header":{}}"#).contains("no route"));
        assert!(e(br#"{"header":{},"route":{"group":"","operation":"x"}}"#).contains("no route"));
        assert!(e(&[b' '; 65]).contains("exceeds the 64-byte limit"));
        let mut m = Message::new(
            Route {
                group: HUB_GROUP.into(),
                operation: "x".into(),
                ..route()
            },
            Content::None,
        );
        assert!(matches!(m.prepare(), Err(BadMessage::Reserved)));
    }
}
