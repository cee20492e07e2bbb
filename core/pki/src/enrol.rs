//! The enrolment wire, shared by the cloud's bootstrap server and the edge's
//! certificate manager: where the CA is served, where certificates are
//! requested, and the request body. It lives here, beside the bootstrap
//! token and the CSR checks, so that the edge speaks it without linking
//! the cloud's code.

use serde::{Deserialize, Serialize};

/// Where the CA is served.
pub const CA_PATH: &str = "/ca.crt";
/// Where certificates are requested.
pub const ENROL_PATH: &str = "/edge.crt";

/// The enrolment request body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnrolRequest {
    /// The node to enrol; must match the CSR subject.
    pub node_name: String,
    /// PEM CSR for `system:node:<nodeName>`.
    pub csr: String,
}
