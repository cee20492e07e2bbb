//! Passthrough of the apiserver's `cluster` egress to in-cluster addresses.
//!
//! With an EgressSelectorConfiguration, kube-apiserver sends all of its
//! cluster-bound traffic to the front as HTTP CONNECT: kubelets, but also
//! admission webhooks, aggregated APIs (metrics-server, so `kubectl top`)
//! and the pod and service proxy. CONNECTs to edge nodes go through their
//! tunnels; CONNECTs to the networks listed here (the pod and service CIDRs)
//! are dialled directly from the cloud pod. Nothing else is dialled: an
//! address outside every listed network and not a node is refused (ADR 0012).

pub use tether_tunnel::Cidr;
