//! Test support for Tether: a fixture kubelet, kubectl-like clients, a
//! scripted kube-apiserver double, a harness that runs the real cloud and
//! edge roles in-process, and an emulated long link.

pub mod api_double;
pub mod fixture;
pub mod harness;
pub mod kubectl;
pub mod kubeedge_edge;
pub mod ownership;
pub mod replicas;
pub mod slowloris;
pub mod spdy;
pub mod wan;

/// Runs a test's body within `limit`: a hung test fails with "test timed
/// out" instead of holding CI until its own deadline, and an error fails it
/// with the error's whole chain.
pub async fn bounded(
    limit: std::time::Duration,
    body: impl std::future::Future<Output = anyhow::Result<()>>,
) {
    tokio::time::timeout(limit, body)
        .await
        .expect("test timed out")
        .expect("test failed");
}
