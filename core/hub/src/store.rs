//! Durable queues (placeholder until the store lands).
