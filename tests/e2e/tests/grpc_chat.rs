//! Chat over gRPC for backend callers, on the same path as REST: a session, a task streamed back
//! (StreamSessionEvents from the start and resumed from an event id), the task read, cancel and
//! close; tokens checked.

use std::time::Duration;

use fleet_e2e::AGENT;
use fleet_e2e::deliberation::{DelibFleet, DelibOptions, open_grpc_session};
use fleet_proto::orchestrator::v1 as pb;
use tonic::Code;

/// Reads `stream` until `done`; returns what it read.
async fn read_until(
    stream: &mut tonic::Streaming<pb::SessionEvent>,
    done: impl Fn(&pb::SessionEvent) -> bool,
) -> Vec<pb::SessionEvent> {
    let mut out = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(15), stream.message())
            .await
            .expect("an event within 15s")
            .unwrap()
            .expect("the stream goes on");
        let stop = done(&ev);
        out.push(ev);
        if stop {
            return out;
        }
    }
}

#[tokio::test]
async fn chat_over_grpc_streams_resumes_and_closes() {
    let fleet = DelibFleet::start(DelibOptions {
        chat_executor: true,
        ..Default::default()
    })
    .await;
    let mut grpc = fleet.grpc(0).await;
    let s = grpc
        .create_session(pb::CreateSessionRequest {
            agent_id: AGENT.into(),
            user_id: "u1".into(),
            metadata_json: r#"{"channel": "grpc"}"#.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let submitted = grpc
        .submit_task(pb::SubmitTaskRequest {
            session_id: s.session_id.clone(),
            session_token: s.session_token.clone(),
            message: "hello over grpc".into(),
            task_id: s.task_id.clone(),
            idempotency_key: "k1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (submitted.task_id.as_str(), submitted.status.as_str()),
        (s.task_id.as_str(), "queued")
    );

    // The token may also come as `authorization: Bearer`.
    let mut req = tonic::Request::new(pb::StreamSessionEventsRequest {
        session_id: s.session_id.clone(),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", s.session_token).parse().unwrap(),
    );
    let mut stream = grpc.stream_session_events(req).await.unwrap().into_inner();
    let events = read_until(&mut stream, |e| e.message_type == "chat_response").await;
    let kinds: Vec<&str> = events.iter().map(|e| e.message_type.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "chat_streaming",
            "chat_streaming",
            "chat_streaming",
            "chat_response"
        ]
    );
    assert!(events.iter().all(|e| e.task_id == s.task_id));
    assert!(
        events[3].json.contains("hello over grpc") && events[3].json.contains(&events[3].event_id)
    );
    drop(stream);

    // Resumed after the second event: the rest, once.
    let mut resumed = grpc
        .stream_session_events(pb::StreamSessionEventsRequest {
            session_id: s.session_id.clone(),
            session_token: s.session_token.clone(),
            last_event_id: events[1].event_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let rest = read_until(&mut resumed, |e| e.message_type == "chat_response").await;
    let ids: Vec<&str> = rest.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(
        ids,
        [events[2].event_id.as_str(), events[3].event_id.as_str()]
    );

    let task = grpc
        .get_task(pb::GetTaskRequest {
            session_id: s.session_id.clone(),
            session_token: s.session_token.clone(),
            task_id: s.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (task.state.as_str(), task.result.as_str()),
        ("completed", "hello over grpc")
    );
    let cancelled = grpc
        .cancel_task(pb::CancelTaskRequest {
            session_id: s.session_id.clone(),
            session_token: s.session_token.clone(),
            task_id: s.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cancelled.status, "completed",
        "a finished task stays finished"
    );

    // Closing ends the live stream with session_closed.
    let closed = grpc
        .close_session(pb::CloseSessionRequest {
            session_id: s.session_id.clone(),
            session_token: s.session_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.status, "closing");
    let tail = read_until(&mut resumed, |e| e.message_type == "session_closed").await;
    assert_eq!(tail.len(), 1);
    assert!(
        resumed.message().await.unwrap().is_none(),
        "the stream ends after session_closed"
    );
    let err = grpc
        .submit_task(pb::SubmitTaskRequest {
            session_id: s.session_id.clone(),
            session_token: s.session_token.clone(),
            message: "too late".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    fleet.stop().await;
}

#[tokio::test]
async fn session_calls_check_their_token() {
    let fleet = DelibFleet::start(DelibOptions::default()).await;
    let mut grpc = fleet.grpc(0).await;
    let a = open_grpc_session(&mut grpc).await;
    let b = open_grpc_session(&mut grpc).await;
    let submit = |token: &str| pb::SubmitTaskRequest {
        session_id: a.session_id.clone(),
        session_token: token.into(),
        message: "hi".into(),
        ..Default::default()
    };
    assert_eq!(
        grpc.submit_task(submit("")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        grpc.submit_task(submit("v1.x.1.sig"))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        grpc.submit_task(submit(&b.session_token))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let err = grpc
        .submit_task(pb::SubmitTaskRequest {
            metadata_json: "[1, 2]".into(),
            ..submit(&a.session_token)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = grpc
        .stream_session_events(pb::StreamSessionEventsRequest {
            session_id: a.session_id.clone(),
            session_token: a.session_token.clone(),
            last_event_id: "yesterday".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    fleet.stop().await;
}

#[tokio::test]
async fn get_metrics_shows_chat_tasks_waiting_for_their_pool() {
    // No chat executor: what is submitted waits in the agent's pool.
    let fleet = DelibFleet::start(DelibOptions::default()).await;
    let mut grpc = fleet.grpc(0).await;
    let s = open_grpc_session(&mut grpc).await;
    let before = grpc
        .get_metrics(pb::GetMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        before.exec_backlog.get(fleet::agent::DEFAULT_POOL),
        Some(&0),
        "every registered agent's pool is listed: {:?}",
        before.exec_backlog
    );
    for i in 0..3 {
        grpc.submit_task(pb::SubmitTaskRequest {
            session_id: s.session_id.clone(),
            session_token: s.session_token.clone(),
            message: format!("task {i}"),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let after = grpc
        .get_metrics(pb::GetMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        after.exec_backlog.get(fleet::agent::DEFAULT_POOL),
        Some(&3),
        "{:?}",
        after.exec_backlog
    );
    // Sent straight to the pool: nothing waits for the dispatchers.
    assert_eq!(after.dispatch_backlog, 0);
    fleet.stop().await;
}

#[tokio::test]
async fn an_open_session_gets_a_fresh_token_and_a_closed_one_does_not() {
    let fleet = DelibFleet::start(DelibOptions::default()).await;
    let mut grpc = fleet.grpc(0).await;
    let a = open_grpc_session(&mut grpc).await;
    let b = open_grpc_session(&mut grpc).await;
    let refresh = |sid: &str, token: &str| pb::RefreshSessionTokenRequest {
        session_id: sid.into(),
        session_token: token.into(),
    };

    // Another session's token, or none, gets nothing.
    let err = grpc
        .refresh_session_token(refresh(&a.session_id, &b.session_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = grpc
        .refresh_session_token(refresh(&a.session_id, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let fresh = grpc
        .refresh_session_token(refresh(&a.session_id, &a.session_token))
        .await
        .unwrap()
        .into_inner();
    assert!(fresh.expires_ms >= a.expires_ms, "{fresh:?} vs {a:?}");
    // The fresh token is the session's: it submits, and it closes.
    let submitted = grpc
        .submit_task(pb::SubmitTaskRequest {
            session_id: a.session_id.clone(),
            session_token: fresh.session_token.clone(),
            message: "hi".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!submitted.task_id.is_empty());
    grpc.close_session(pb::CloseSessionRequest {
        session_id: a.session_id.clone(),
        session_token: fresh.session_token.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let closed =
        fleet_test_support::eventually(Duration::from_secs(10), "the session closed", || {
            let mut grpc = grpc.clone();
            let req = refresh(&a.session_id, &fresh.session_token);
            async move { grpc.refresh_session_token(req).await.err() }
        })
        .await;
    assert_eq!(closed.code(), Code::FailedPrecondition, "{closed:?}");
    assert!(closed.message().contains("closed"), "{}", closed.message());
    fleet.stop().await;
}

#[tokio::test]
async fn a_session_event_stream_ends_when_its_token_expires() {
    let fleet = DelibFleet::start(DelibOptions::default()).await;
    let mut grpc = fleet.grpc(0).await;
    let s = open_grpc_session(&mut grpc).await;
    let expires_ms = fleet::time::now_ms() + 1_500;
    let short = fleet::session::TokenSigner::new(fleet_e2e::SECRET.as_bytes())
        .sign(&s.session_id, expires_ms);
    let mut events = grpc
        .stream_session_events(pb::StreamSessionEventsRequest {
            session_id: s.session_id.clone(),
            session_token: short.clone(),
            last_event_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // Nothing to read: the stream waits for events until the token expires, then ends.
    let end = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("the stream ends at the token's expiry")
        .unwrap_err();
    assert!(fleet::time::now_ms() >= expires_ms);
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    assert!(
        end.message().contains("RefreshSessionToken"),
        "{}",
        end.message()
    );
    // Calling again with it is refused; with a fresh token it is served.
    let again = |token: &str| pb::StreamSessionEventsRequest {
        session_id: s.session_id.clone(),
        session_token: token.into(),
        last_event_id: String::new(),
    };
    let err = grpc.stream_session_events(again(&short)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let fresh = grpc
        .refresh_session_token(pb::RefreshSessionTokenRequest {
            session_id: s.session_id.clone(),
            session_token: s.session_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    grpc.stream_session_events(again(&fresh.session_token))
        .await
        .unwrap();
    fleet.stop().await;
}
