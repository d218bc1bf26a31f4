//! What grpcurl needs with no proto file: server reflection (v1 and v1alpha) lists the services
//! and serves their descriptors; the standard health service answers for the orchestrator and
//! the server as a whole. Tested with the tonic reflection and health clients over a socket.

use fleet_e2e::deliberation::{DelibFleet, DelibOptions};
use prost::Message;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::{v1, v1alpha};

const SERVICE: &str = "orchestrator.v1.OrchestratorService";

async fn ask_v1(
    client: &mut v1::server_reflection_client::ServerReflectionClient<tonic::transport::Channel>,
    request: v1::server_reflection_request::MessageRequest,
) -> v1::server_reflection_response::MessageResponse {
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    answers
        .message()
        .await
        .unwrap()
        .unwrap()
        .message_response
        .unwrap()
}

#[tokio::test]
async fn reflection_and_health_answer_as_grpcurl_needs() {
    let fleet = DelibFleet::start(DelibOptions::default()).await;
    let channel = fleet.channel(0).await;

    // grpcurl -plaintext host:port list
    let mut reflection = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let v1::server_reflection_response::MessageResponse::ListServicesResponse(list) = ask_v1(
        &mut reflection,
        v1::server_reflection_request::MessageRequest::ListServices(String::new()),
    )
    .await
    else {
        panic!("not a list");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }

    // grpcurl -plaintext host:port describe orchestrator.v1.OrchestratorService
    let v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files) = ask_v1(
        &mut reflection,
        v1::server_reflection_request::MessageRequest::FileContainingSymbol(SERVICE.into()),
    )
    .await
    else {
        panic!("not a descriptor");
    };
    let file = files
        .file_descriptor_proto
        .iter()
        .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap())
        .find(|f| f.package() == "orchestrator.v1")
        .expect("the orchestrator file");
    let methods: Vec<&str> = file.service[0].method.iter().map(|m| m.name()).collect();
    for m in [
        "Deliberate",
        "StreamDeliberation",
        "GetDeliberationResult",
        "ProcessPlanningEvent",
        "StreamSessionEvents",
    ] {
        assert!(methods.contains(&m), "{m} missing");
    }
    assert!(
        file.message_type
            .iter()
            .any(|m| m.name() == "DeliberateRequest")
    );

    // Older grpcurl versions ask v1alpha.
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let answer = alpha
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("not a list");
    };
    assert!(list.service.iter().any(|s| s.name == SERVICE));

    // grpcurl -plaintext host:port grpc.health.v1.Health/Check
    let mut health = HealthClient::new(channel);
    for service in ["", SERVICE] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "`{service}`");
    }
    let err = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    fleet.stop().await;
}
