//! KubeEdge EdgeStream sessions (issue 12): unmodified `edgecore` edges dial
//! `/v1/kubeedge/connect` on the tunnel port with the certificates they
//! already hold. [`codec`] reads and writes their wire, [`KubeEdgeSession`]
//! carries front requests over it behind [`crate::NodeSession`], and
//! [`KubeEdgeTrust`] decides which certificates are admitted, and as which
//! node. See `docs/kubeedge-compat.md` and ADR 0017.

pub mod codec;
mod driver;
mod pipe;
mod request;
mod session;
mod state;
mod trust;
pub(crate) mod upgrade;

pub use session::{KubeEdgeOptions, KubeEdgeSession, StreamEndHook};
pub use trust::{Admitted, KubeEdgeTrust, LEGACY_CN, Refusal, TrustConfig};

/// The path KubeEdge edges upgrade on.
pub const KUBEEDGE_PATH: &str = "/v1/kubeedge/connect";
/// Header in which the edge names its node (`edged.hostnameOverride`).
pub const HOSTNAME_HEADER: &str = "sessionhostnameoverride";
/// Header in which the edge names its address.
pub const INTERNAL_IP_HEADER: &str = "sessioninternalip";
