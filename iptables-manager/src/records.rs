//! Tunnel-port records: which cloud replica (by IP) owns which tunnel port.
//! The JSON is KubeEdge's `tunnelportrecord.kubeedge.io` annotation:
//! `{"ipTunnelPort":{"10.0.0.5":10351},"port":{"10351":true}}`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

/// The KubeEdge-compatible wire form.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelPortRecord {
    /// Replica IP -> tunnel port.
    #[serde(rename = "ipTunnelPort", default)]
    pub ip_tunnel_port: BTreeMap<String, u16>,
    /// Tunnel ports in use.
    #[serde(default)]
    pub port: BTreeMap<String, bool>,
}

impl TunnelPortRecord {
    /// The record one replica publishes about itself.
    pub fn single(ip: IpAddr, port: u16) -> Self {
        Self {
            ip_tunnel_port: [(ip.to_string(), port)].into(),
            port: [(port.to_string(), true)].into(),
        }
    }
}

/// One validated record: connections to `port` go to `replica`'s stream port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    /// The tunnel port.
    pub port: u16,
    /// The replica that owns it.
    pub replica: IpAddr,
}

/// A validated, port-sorted set of records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Records {
    /// Entries sorted by port; ports are unique.
    pub entries: Vec<Entry>,
}

/// Why records were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// Not valid JSON of the expected shape.
    #[error("malformed tunnel-port record: {0}")]
    Malformed(String),
    /// A key of `ipTunnelPort` is not an IP address.
    #[error("malformed tunnel-port record: {0:?} is not an IP address")]
    BadIp(String),
    /// A key of `port` is not a port number.
    #[error("malformed tunnel-port record: port key {0:?} is not a port number")]
    BadPortKey(String),
    /// A port outside the allowed range.
    #[error("tunnel port {port} of {replica} is outside the allowed range {min}-{max}")]
    OutOfRange {
        /// The port.
        port: u16,
        /// Its replica.
        replica: IpAddr,
        /// Range start.
        min: u16,
        /// Range end.
        max: u16,
    },
    /// Two replicas claim one port.
    #[error("conflicting tunnel-port records: port {port} is claimed by both {a} and {b}")]
    Conflict {
        /// The port.
        port: u16,
        /// One claimant.
        a: IpAddr,
        /// The other.
        b: IpAddr,
    },
}

impl Records {
    /// Parses and validates KubeEdge-compatible JSON.
    pub fn parse(json: &[u8], allowed: &RangeInclusive<u16>) -> Result<Self, RecordError> {
        let raw: TunnelPortRecord =
            serde_json::from_slice(json).map_err(|e| RecordError::Malformed(e.to_string()))?;
        Self::from_record(&raw, allowed)
    }

    /// Validates a wire record.
    pub fn from_record(
        raw: &TunnelPortRecord,
        allowed: &RangeInclusive<u16>,
    ) -> Result<Self, RecordError> {
        for key in raw.port.keys() {
            key.parse::<u16>()
                .map_err(|_| RecordError::BadPortKey(key.clone()))?;
        }
        let mut by_port: BTreeMap<u16, IpAddr> = BTreeMap::new();
        for (ip, &port) in &raw.ip_tunnel_port {
            let replica: IpAddr = ip.parse().map_err(|_| RecordError::BadIp(ip.clone()))?;
            if !allowed.contains(&port) {
                return Err(RecordError::OutOfRange {
                    port,
                    replica,
                    min: *allowed.start(),
                    max: *allowed.end(),
                });
            }
            if let Some(&other) = by_port.get(&port) {
                let (a, b) = if other < replica {
                    (other, replica)
                } else {
                    (replica, other)
                };
                return Err(RecordError::Conflict { port, a, b });
            }
            by_port.insert(port, replica);
        }
        Ok(Self {
            entries: by_port
                .into_iter()
                .map(|(port, replica)| Entry { port, replica })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANGE: RangeInclusive<u16> = 10350..=10999;

    #[test]
    fn parses_kubeedge_json() {
        let r = Records::parse(
            br#"{"ipTunnelPort":{"10.0.0.6":10352,"10.0.0.5":10351},"port":{"10351":true,"10352":true}}"#,
            &RANGE,
        )
        .unwrap();
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.entries[0].port, 10351);
        assert_eq!(r.entries[0].replica.to_string(), "10.0.0.5");
        assert_eq!(Records::parse(b"{}", &RANGE).unwrap(), Records::default());
    }

    #[test]
    fn refuses_bad_input_with_the_cause() {
        let e = |j: &str| {
            Records::parse(j.as_bytes(), &RANGE)
                .unwrap_err()
                .to_string()
        };
        assert!(e("{not json").contains("malformed"));
        assert!(e(r#"{"ipTunnelPort":{"nope":10351}}"#).contains("\"nope\" is not an IP"));
        assert!(e(r#"{"ipTunnelPort":{"10.0.0.5":80}}"#).contains("outside the allowed range"));
        assert!(
            e(r#"{"ipTunnelPort":{"10.0.0.5":10351,"10.0.0.6":10351}}"#)
                .contains("claimed by both 10.0.0.5 and 10.0.0.6")
        );
        assert!(e(r#"{"ipTunnelPort":{},"extra":1}"#).contains("unknown field"));
        assert!(e(r#"{"port":{"x":true}}"#).contains("port key"));
    }
}
