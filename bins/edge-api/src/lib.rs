//! edge-api: REST (and gRPC) front door: sessions, tasks, agents, health.
