//! Fleet's gRPC API, generated from `proto/` by tonic-prost-build (vendored `protoc`, no system
//! install needed).
//!
//! | module | service | Fleet's side |
//! |---|---|---|
//! | [`orchestrator::v1`] | `orchestrator.v1.OrchestratorService` | server (edge-api, :50055) and client (tests, tools) |
//! | [`context::v1`] | `context.v1.ContextService` (`GetContext`) | client: hydrates agent requests when `FLEET_CONTEXT_ADDR` is set |
//! | [`planning::v1`] | `planning.v1.PlanningService` (`UpdateTask`) | client: reports subtask endings when `FLEET_PLANNING_ADDR` is set |
//!
//! The `.proto` files document every field; `docs/grpc.md` shows a grpcurl session.
//! [`FILE_DESCRIPTOR_SET`] feeds gRPC server reflection.

/// `orchestrator.v1`: the service edge-api serves.
pub mod orchestrator {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("orchestrator.v1");
    }
}

/// `context.v1`: the Context service's `GetContext`, which the dispatcher calls.
pub mod context {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("context.v1");
    }
}

/// `planning.v1`: the Planning service's `UpdateTask`, which the callback-worker and the
/// dispatcher call (`fleet::planning::notifier`).
pub mod planning {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("planning.v1");
    }
}

/// The encoded `FileDescriptorSet` of `orchestrator.v1`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("orchestrator_descriptor");

/// The encoded `FileDescriptorSet` of the client-only services (`context.v1`, `planning.v1`),
/// for test servers that want reflection.
pub const CLIENTS_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("clients_descriptor");

/// The full name of the orchestrator service, as health checks and reflection name it.
pub const ORCHESTRATOR_SERVICE: &str = "orchestrator.v1.OrchestratorService";

/// A lazily connecting channel to the gRPC service at `addr` (`http://host:port`, or
/// `host:port`), with `timeout` for connecting and for each call.
pub fn lazy_channel(
    addr: &str,
    timeout: std::time::Duration,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    Ok(tonic::transport::Endpoint::from_shared(uri)?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_lazy())
}

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn the_descriptor_set_holds_the_orchestrator_service() {
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let file = set
            .file
            .iter()
            .find(|f| f.package() == "orchestrator.v1")
            .expect("orchestrator.v1 file");
        assert_eq!(file.service[0].name(), "OrchestratorService");
        assert!(
            file.service[0]
                .method
                .iter()
                .any(|m| m.name() == "Deliberate")
        );
    }
}
