//! nats-bridge: JetStream <-> Redis Streams.
