//! The chat RPCs: who calls for which session (the token in `session_token` or in
//! `authorization` metadata, read as REST reads the header; a session id that must be given),
//! and where a session's event stream ends.

mod common;

use common::{AGENT, spawn_app};
use fleet::events::{ServerMessage, message_type};
use fleet::task::{Retention, TaskOp, TaskStore};
use fleet::time::now_ms;
use fleet_proto::orchestrator::v1 as pb;
use serde_json::json;
use tonic::{Code, Request};

/// A request carrying `authorization: <value>` metadata.
fn with_authorization<T>(msg: T, value: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("authorization", value.parse().unwrap());
    req
}

#[tokio::test]
async fn the_authorization_metadata_is_read_as_rest_reads_the_header() {
    let app = spawn_app(&[]).await;
    let s = app.open_session().await;
    let mut grpc = app.grpc().await;
    let submit = |message: &str| pb::SubmitTaskRequest {
        session_id: s.id.clone(),
        message: message.into(),
        ..Default::default()
    };

    // The scheme is case-insensitive (RFC 9110), and spaces around the token do not count.
    for (i, value) in [
        format!("Bearer {}", s.token),
        format!("bearer {}", s.token),
        format!("BEARER  {} ", s.token),
    ]
    .iter()
    .enumerate()
    {
        let submitted = grpc
            .submit_task(with_authorization(submit(&format!("hi {i}")), value))
            .await
            .unwrap_or_else(|e| panic!("`{value}` should be accepted: {e:?}"))
            .into_inner();
        assert!(!submitted.duplicate, "{submitted:?}");
        let task = grpc
            .get_task(with_authorization(
                pb::GetTaskRequest {
                    session_id: s.id.clone(),
                    task_id: submitted.task_id.clone(),
                    ..Default::default()
                },
                value,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(task.message, format!("hi {i}"));
    }
    assert_eq!(app.tasks_total(&s).await, 3);

    // Another scheme is no bearer token.
    let err = grpc
        .submit_task(with_authorization(
            submit("no"),
            &format!("Basic {}", s.token),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("session token is required"),
        "{err:?}"
    );
    assert_eq!(app.tasks_total(&s).await, 3);
    app.stop().await;
}

#[tokio::test]
async fn a_session_call_without_a_session_id_is_invalid_argument() {
    let app = spawn_app(&[]).await;
    app.put_agent(AGENT).await;
    let s = app.open_session().await;
    let mut grpc = app.grpc().await;
    let token = s.token.clone();
    let check = |result: Result<(), tonic::Status>, rpc: &str| {
        let err = result.expect_err(rpc);
        assert_eq!(err.code(), Code::InvalidArgument, "{rpc}: {err:?}");
        assert_eq!(err.message(), "session_id is required", "{rpc}");
    };
    check(
        grpc.submit_task(pb::SubmitTaskRequest {
            session_token: token.clone(),
            message: "hi".into(),
            ..Default::default()
        })
        .await
        .map(drop),
        "SubmitTask",
    );
    check(
        grpc.get_task(pb::GetTaskRequest {
            session_token: token.clone(),
            task_id: s.first_task.clone(),
            ..Default::default()
        })
        .await
        .map(drop),
        "GetTask",
    );
    check(
        grpc.cancel_task(pb::CancelTaskRequest {
            session_token: token.clone(),
            task_id: s.first_task.clone(),
            ..Default::default()
        })
        .await
        .map(drop),
        "CancelTask",
    );
    check(
        grpc.close_session(pb::CloseSessionRequest {
            session_token: token.clone(),
            ..Default::default()
        })
        .await
        .map(drop),
        "CloseSession",
    );
    check(
        grpc.refresh_session_token(pb::RefreshSessionTokenRequest {
            session_token: token.clone(),
            ..Default::default()
        })
        .await
        .map(drop),
        "RefreshSessionToken",
    );
    check(
        grpc.stream_session_events(with_authorization(
            pb::StreamSessionEventsRequest::default(),
            &format!("Bearer {token}"),
        ))
        .await
        .map(drop),
        "StreamSessionEvents",
    );
    assert_eq!(app.tasks_total(&s).await, 0);
    assert_eq!(app.tasks_stream_len().await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_closed_sessions_stream_resumed_after_its_last_event_ends() {
    let app = spawn_app(&[]).await;
    let s = app.open_session().await;
    // The dispatcher closes it (done here directly, as the dispatcher would).
    let closed = ServerMessage::new(
        message_type::SESSION_CLOSED,
        &s.id,
        None,
        json!({"reason": "closed by the client"}),
    );
    TaskStore::new(app.redis.clone(), app.keys.clone(), Retention::default())
        .apply(&s.id, &[TaskOp::session("close", closed.to_json())])
        .await
        .unwrap();
    let mut grpc = app.grpc().await;
    // A token that expires soon: a stream waiting for events that never come would end with
    // UNAUTHENTICATED then, instead of ending cleanly.
    let token = app.signer().sign(&s.id, now_ms() + 2_000);
    let events = |last_event_id: &str| pb::StreamSessionEventsRequest {
        session_id: s.id.clone(),
        session_token: token.clone(),
        last_event_id: last_event_id.into(),
    };

    let mut all = grpc
        .stream_session_events(events(""))
        .await
        .unwrap()
        .into_inner();
    let last = all
        .message()
        .await
        .unwrap()
        .expect("the session_closed event");
    assert_eq!(last.message_type, message_type::SESSION_CLOSED);
    assert!(all.message().await.unwrap().is_none());

    // A client resuming after that event (it missed the end of the stream) gets the end too.
    let mut resumed = grpc
        .stream_session_events(events(&last.event_id))
        .await
        .unwrap()
        .into_inner();
    let next = resumed.message().await;
    assert!(matches!(next, Ok(None)), "the stream should end: {next:?}");
    app.stop().await;
}
