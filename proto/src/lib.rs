//! placeholder: the orchestrator.v1 gRPC API
