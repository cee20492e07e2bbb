//! Test support for Tether: a fixture kubelet and kubectl-like clients.

pub mod fixture;
pub mod kubectl;
