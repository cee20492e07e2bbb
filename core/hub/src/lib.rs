//! The cloud-edge message channel shared by cloudhub and edgehub: the
//! KubeEdge-shaped message model, its framing, acknowledged and
//! de-duplicated delivery, and the durable queues behind it.

pub mod store;
