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
