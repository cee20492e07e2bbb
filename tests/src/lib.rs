//! Test support for Tether: a fixture kubelet, kubectl-like clients, and a
//! harness that runs the real cloud and edge roles in-process.

pub mod fixture;
pub mod harness;
pub mod kubectl;
