//! The chat routes as a client uses them: open a session, submit, read, cancel, close; and every
//! bad input refused with a JSON error that changes nothing.

mod common;

use std::time::Duration;

use common::{AGENT, Session, TestApp, assert_error, spawn_app};
use fleet::envelope::TaskCommand;
use fleet::task::{Retention, TaskOp, TaskStore};
use fleet::time::now_ms;
use fred::interfaces::{HashesInterface, KeysInterface};
use reqwest::{Method, StatusCode};
use serde_json::{Value as Json, json};

#[tokio::test]
async fn init_opens_a_session_whose_token_works() {
    let app = spawn_app(&[]).await;
    app.put_agent(AGENT).await;

    let resp = app
        .http
        .post(app.url("/api/v1/chat/init"))
        .json(&json!({"agent_id": AGENT, "user_id": "u1", "metadata": {"lang": "en"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body: Json = resp.json().await.unwrap();
    let sid = body["session_id"].as_str().unwrap();
    let token = body["session_token"].as_str().unwrap();
    let task_id = body["task_id"].as_str().unwrap();
    assert!(!sid.is_empty() && !token.is_empty() && !task_id.is_empty());
    assert_eq!(body["agent_id"], AGENT);
    assert_eq!(body["agent_name"], format!("Agent {AGENT}"));
    assert_eq!(
        body["websocket_url"],
        format!("ws://127.0.0.1:8002/ws/chat/{sid}?token={token}")
    );
    assert_eq!(
        body["sse_url"],
        format!("http://127.0.0.1:8002/sse/chat/{sid}")
    );
    let expires_at = body["expires_at"].as_str().unwrap();
    assert!(
        expires_at.len() == 24 && expires_at.ends_with('Z') && expires_at.contains('T'),
        "RFC 3339 with ms: {expires_at}"
    );

    let s = Session {
        id: sid.to_owned(),
        token: token.to_owned(),
        first_task: task_id.to_owned(),
        init: body.clone(),
    };
    let status = app.status(&s).await;
    assert_eq!(status["session_id"], sid);
    assert_eq!(status["state"], "open");
    assert_eq!(status["agent_id"], AGENT);
    assert_eq!(status["user_id"], "u1");
    assert_eq!(status["metadata"]["lang"], "en");
    assert_eq!(status["totals"]["tasks"], 0);
    assert_eq!(status["websocket_connected"], false);

    // The task id init reserved is readable, as reserved.
    let resp = app
        .authed(
            Method::GET,
            &format!("/api/v1/chat/{sid}/tasks/{task_id}"),
            token,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let task: Json = resp.json().await.unwrap();
    assert_eq!(task["state"], "reserved");
    app.stop().await;
}

#[tokio::test]
async fn a_token_lasts_as_long_as_the_session_ttl_and_an_open_session_gets_a_fresh_one() {
    let two_days = 2 * 86_400;
    let app = spawn_app(&["--session-ttl-secs", &two_days.to_string()]).await;
    let s = app.open_session().await;
    let at_least = |secs: i64| fleet::time::rfc3339_ms(now_ms() + secs * 1000 - 60_000);
    let first = s.init["expires_at"].as_str().unwrap().to_owned();
    assert!(first >= at_least(two_days), "{first}");

    let path = format!("/api/v1/chat/session/{}/token", s.id);
    let resp = app
        .authed(Method::POST, &path, &s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let fresh: Json = resp.json().await.unwrap();
    let token = fresh["session_token"].as_str().unwrap();
    // Made now: it lasts at least as long as the first (the same token when both were made in
    // the same millisecond).
    assert!(fresh["expires_at"].as_str().unwrap() >= first.as_str());
    let resp = app
        .authed(
            Method::GET,
            &format!("/api/v1/chat/session/{}/status", s.id),
            token,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "the fresh token works");

    // Without a valid token, none; a closed session gets none either.
    let resp = app
        .authed(Method::POST, &path, "not-a-token")
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let _: i64 = app
        .redis
        .hset(app.keys.session(&s.id), ("state", "closed"))
        .await
        .unwrap();
    let resp = app.authed(Method::POST, &path, token).send().await.unwrap();
    assert_error(resp, StatusCode::CONFLICT, "session_closed").await;
    app.stop().await;
}

#[tokio::test]
async fn init_urls_follow_the_forwarded_scheme_or_the_configured_base() {
    let app = spawn_app(&[]).await;
    app.put_agent(AGENT).await;
    let body: Json = app
        .http
        .post(app.url("/api/v1/chat/init"))
        .header("x-forwarded-proto", "https")
        .json(&json!({"agent_id": AGENT}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sid = body["session_id"].as_str().unwrap();
    assert!(
        body["websocket_url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("wss://127.0.0.1:8002/ws/chat/{sid}?token=")),
        "{body}"
    );
    assert_eq!(
        body["sse_url"],
        format!("https://127.0.0.1:8002/sse/chat/{sid}")
    );
    app.stop().await;

    let app = spawn_app(&["--public-ws-url", "wss://chat.example.com"]).await;
    app.put_agent(AGENT).await;
    let body: Json = app
        .http
        .post(app.url("/api/v1/chat/init"))
        .json(&json!({"agent_id": AGENT}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sid = body["session_id"].as_str().unwrap();
    let token = body["session_token"].as_str().unwrap();
    assert_eq!(
        body["websocket_url"],
        format!("wss://chat.example.com/ws/chat/{sid}?token={token}")
    );
    assert_eq!(
        body["sse_url"],
        format!("https://chat.example.com/sse/chat/{sid}")
    );
    app.stop().await;
}

#[tokio::test]
async fn init_urls_over_http2_name_the_host_the_client_called() {
    use tower::ServiceExt;

    let app = spawn_app(&[]).await;
    app.put_agent(AGENT).await;
    // HTTP/2 has no `Host` header: the host the client called is the request's `:authority`.
    let channel = tonic::transport::Endpoint::from_shared(app.base.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let req = http::Request::post(app.url("/api/v1/chat/init"))
        .header("content-type", "application/json")
        .body(tonic::body::Body::new(axum::body::Body::from(
            json!({"agent_id": AGENT}).to_string(),
        )))
        .unwrap();
    let resp = channel.oneshot(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::CREATED);
    let bytes = axum::body::to_bytes(axum::body::Body::new(resp.into_body()), 1 << 20)
        .await
        .unwrap();
    let body: Json = serde_json::from_slice(&bytes).unwrap();
    let sid = body["session_id"].as_str().unwrap();
    let token = body["session_token"].as_str().unwrap();
    assert_eq!(
        body["websocket_url"],
        format!("ws://127.0.0.1:8002/ws/chat/{sid}?token={token}")
    );
    assert_eq!(
        body["sse_url"],
        format!("http://127.0.0.1:8002/sse/chat/{sid}")
    );
    app.stop().await;
}

#[tokio::test]
async fn init_refuses_unknown_agents_and_bad_bodies() {
    let app = spawn_app(&[]).await;
    let init = |body: Json| {
        app.http
            .post(app.url("/api/v1/chat/init"))
            .json(&body)
            .send()
    };
    let resp = init(json!({"agent_id": "nobody"})).await.unwrap();
    let message = assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;
    assert!(message.contains("nobody"), "{message}");

    let resp = init(json!({"metadata": {}})).await.unwrap();
    let message = assert_error(resp, StatusCode::BAD_REQUEST, "invalid_json").await;
    assert!(message.contains("agent_id"), "{message}");

    let resp = init(json!({"agent_id": ""})).await.unwrap();
    let message = assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert_eq!(message, "agent_id is required");
    assert_eq!(app.tasks_stream_len().await, 0);
    app.stop().await;
}

#[tokio::test]
async fn submit_sends_the_task_to_its_agents_pool_and_it_is_readable() {
    let app = spawn_app(&[]).await;
    let s = app.open_session().await;

    let resp = app
        .submit(&s, json!({"message": "hello", "metadata": {"k": 1}}))
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let body: Json = resp.json().await.unwrap();
    let tid = body["task_id"].as_str().unwrap().to_owned();
    assert_eq!(body["status"], "queued");
    assert!(body.get("duplicate").is_none(), "{body}");

    let task = app.task_json(&s, &tid).await;
    assert_eq!(task["task_id"], tid.as_str());
    assert_eq!(task["session_id"], s.id.as_str());
    assert_eq!(task["agent_id"], AGENT);
    assert_eq!(task["state"], "dispatched");
    assert_eq!(task["pool"], fleet::agent::DEFAULT_POOL);
    assert_eq!(task["attempt"], 1);
    assert_eq!(task["message"], "hello");
    assert_eq!(task["metadata"]["k"], 1);
    let deadline = task["deadline_ms"].as_i64().unwrap();
    assert!(deadline > task["created_ms"].as_i64().unwrap());

    // The executor's request, straight to the agent's pool: nothing for the dispatchers.
    let requests = app.exec_requests(fleet::agent::DEFAULT_POOL).await;
    assert_eq!(requests.len(), 1, "{requests:?}");
    let r = &requests[0];
    assert_eq!(
        (r.session_id.as_str(), r.task_id.as_str()),
        (s.id.as_str(), tid.as_str())
    );
    assert_eq!((r.agent_id.as_str(), r.attempt), (AGENT, 1));
    assert_eq!(r.message, "hello");
    assert_eq!(r.metadata, json!({"k": 1}));
    assert_eq!(r.deadline_ms, deadline);
    assert_eq!(app.tasks_stream_len().await, 0);
    app.stop().await;
}

#[tokio::test]
async fn without_direct_dispatch_submit_queues_the_task_for_the_dispatchers() {
    let app = spawn_app(&["--direct-dispatch", "false"]).await;
    let s = app.open_session().await;

    let resp = app
        .submit(&s, json!({"message": "hello", "metadata": {"k": 1}}))
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let body: Json = resp.json().await.unwrap();
    let tid = body["task_id"].as_str().unwrap().to_owned();
    assert_eq!(body["status"], "queued");

    let task = app.task_json(&s, &tid).await;
    assert_eq!(task["state"], "queued");
    assert!(task.get("pool").is_none(), "{task}");
    assert_eq!(task["message"], "hello");

    let commands = app.task_commands().await;
    assert_eq!(commands.len(), 1);
    let TaskCommand::Submit(submit) = &commands[0] else {
        panic!("expected task.submit, got {:?}", commands[0]);
    };
    assert_eq!(submit.task_id, tid);
    assert_eq!(submit.session_id, s.id);
    assert_eq!(submit.metadata, json!({"k": 1}));
    assert_eq!(submit.deadline_ms, task["deadline_ms"].as_i64().unwrap());
    assert!(
        app.exec_requests(fleet::agent::DEFAULT_POOL)
            .await
            .is_empty()
    );
    app.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_retry_returns_the_same_task_and_writes_once() {
    let app = spawn_app(&[]).await;
    let s = app.open_session().await;
    let send = |key: &'static str| {
        app.authed(
            Method::POST,
            &format!("/api/v1/chat/{}/task", s.id),
            &s.token,
        )
        .header("Idempotency-Key", key)
        .json(&json!({"message": "once"}))
        .send()
    };

    let first = send("key-1").await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Json = first.json().await.unwrap();
    let retry = send("key-1").await.unwrap();
    assert_eq!(retry.status(), StatusCode::ACCEPTED);
    let retry: Json = retry.json().await.unwrap();
    assert_eq!(retry["task_id"], first["task_id"]);
    assert_eq!(retry["duplicate"], true);
    // The task as it is now: its request went to its pool with the first submit.
    assert_eq!(retry["status"], "dispatched");
    let sent = || async { app.exec_requests(fleet::agent::DEFAULT_POOL).await.len() };
    assert_eq!(sent().await, 1);
    assert_eq!(app.tasks_total(&s).await, 1);

    let other: Json = send("key-2").await.unwrap().json().await.unwrap();
    assert_ne!(other["task_id"], first["task_id"]);
    assert_eq!(sent().await, 2);
    app.stop().await;
}

#[tokio::test]
async fn a_retry_of_a_submit_that_failed_to_send_its_task_sends_it() {
    let app = spawn_app(&[]).await;
    let s = app.open_session().await;
    let pool = fleet::agent::DEFAULT_POOL;
    // The pool's stream is the wrong type: the XADD of the request fails after `create` stored
    // the task.
    let stream = app.keys.exec(pool);
    let _: () = app
        .redis
        .set(&stream, "not a stream", None, None, false)
        .await
        .unwrap();
    let send = || {
        app.authed(
            Method::POST,
            &format!("/api/v1/chat/{}/task", s.id),
            &s.token,
        )
        .header("Idempotency-Key", "retry-me")
        .json(&json!({"message": "please run"}))
        .send()
    };
    let resp = send().await.unwrap();
    assert_error(resp, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;

    // Redis is well again; the client retries as the 503 asked.
    let _: i64 = app.redis.del(&stream).await.unwrap();
    let retry = send().await.unwrap();
    assert_eq!(retry.status(), StatusCode::ACCEPTED);
    let retry: Json = retry.json().await.unwrap();
    assert_eq!(retry["duplicate"], true);
    let requests = app.exec_requests(pool).await;
    assert_eq!(requests.len(), 1, "the retry sent the task");
    assert_eq!(requests[0].task_id, retry["task_id"].as_str().unwrap());
    assert_eq!(requests[0].message, "please run");
    assert_eq!(app.tasks_total(&s).await, 1);

    // Sent now: a further retry sends nothing more.
    let again: Json = send().await.unwrap().json().await.unwrap();
    assert_eq!(again["task_id"], retry["task_id"]);
    assert_eq!(app.exec_requests(pool).await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn the_idempotency_key_may_come_in_the_body() {
    let app = spawn_app(&[]).await;
    let s = app.open_session().await;
    let first: Json = app
        .submit(
            &s,
            json!({"message": "once", "idempotency_key": "body-key"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let retry: Json = app
        .submit(
            &s,
            json!({"message": "once", "idempotency_key": "body-key"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(retry["task_id"], first["task_id"]);
    assert_eq!(retry["duplicate"], true);
    assert_eq!(app.exec_requests(fleet::agent::DEFAULT_POOL).await.len(), 1);

    let resp = app
        .authed(
            Method::POST,
            &format!("/api/v1/chat/{}/task", s.id),
            &s.token,
        )
        .header("Idempotency-Key", "header-key")
        .json(&json!({"message": "which?", "idempotency_key": "body-key"}))
        .send()
        .await
        .unwrap();
    let message = assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(message.contains("differ"), "{message}");
    assert_eq!(app.tasks_total(&s).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn a_reserved_task_id_is_used_by_the_submit_that_names_it() {
    let app = spawn_app(&[]).await;
    let s = app.open_session().await;

    let resp = app
        .authed(
            Method::POST,
            &format!("/api/v1/chat/session/{}/task", s.id),
            &s.token,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let reserved: Json = resp.json().await.unwrap();
    assert_eq!(reserved["status"], "reserved");
    let tid = reserved["task_id"].as_str().unwrap().to_owned();
    assert_ne!(tid, s.first_task);

    let resp = app
        .submit(&s, json!({"message": "with my id", "task_id": tid}))
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let body: Json = resp.json().await.unwrap();
    assert_eq!(body["task_id"], tid.as_str());
    assert_eq!(body["status"], "queued");
    let task = app.task_json(&s, &tid).await;
    assert_eq!(task["state"], "dispatched");
    assert_eq!(task["message"], "with my id");

    // Submitting the same task id again is answered as a duplicate and writes nothing.
    let again: Json = app
        .submit(&s, json!({"message": "with my id", "task_id": tid}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["task_id"], tid.as_str());
    assert_eq!(again["duplicate"], true);
    let sent = || async { app.exec_requests(fleet::agent::DEFAULT_POOL).await };
    assert_eq!(sent().await.len(), 1);

    // The id init reserved works the same way.
    let first: Json = app
        .submit(&s, json!({"message": "first", "task_id": s.first_task}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["task_id"], s.first_task.as_str());
    let ids: Vec<String> = sent().await.into_iter().map(|r| r.task_id).collect();
    assert_eq!(ids, vec![tid, s.first_task.clone()]);
    app.stop().await;
}

/// Stream length and session totals, to prove a refused request changed nothing.
async fn snapshot(app: &TestApp, s: &Session) -> (u64, i64) {
    (app.tasks_stream_len().await, app.tasks_total(s).await)
}

#[tokio::test]
async fn bad_tokens_are_refused_before_anything_changes() {
    let app = spawn_app(&[]).await;
    let a = app.open_session().await;
    let b = app.open_session().await;
    let before = snapshot(&app, &a).await;
    let submit_path = format!("/api/v1/chat/{}/task", a.id);
    let body = json!({"message": "hi"});

    let resp = app
        .http
        .post(app.url(&submit_path))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    assert_error(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;

    let other_secret = fleet::session::TokenSigner::new(b"another-secret-of-32-bytes-long!");
    let refused = [
        ("Bearer garbage".to_owned(), StatusCode::UNAUTHORIZED),
        (format!("Basic {}", a.token), StatusCode::UNAUTHORIZED),
        (
            format!("Bearer {}", other_secret.sign(&a.id, now_ms() + 60_000)),
            StatusCode::UNAUTHORIZED,
        ),
        (
            format!("Bearer {}", app.signer().sign(&a.id, now_ms() - 1_000)),
            StatusCode::UNAUTHORIZED,
        ),
        (format!("Bearer {}", b.token), StatusCode::FORBIDDEN),
    ];
    for (header, status) in refused {
        let code = if status == StatusCode::FORBIDDEN {
            "forbidden"
        } else {
            "unauthorized"
        };
        let resp = app
            .http
            .post(app.url(&submit_path))
            .header("authorization", &header)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_error(resp, status, code).await;
        for (method, path) in [
            (Method::GET, format!("/api/v1/chat/session/{}/status", a.id)),
            (Method::POST, format!("/api/v1/chat/session/{}/task", a.id)),
            (Method::DELETE, format!("/api/v1/chat/session/{}", a.id)),
            (
                Method::DELETE,
                format!("/api/v1/chat/{}/tasks/{}", a.id, a.first_task),
            ),
        ] {
            let resp = app
                .http
                .request(method, app.url(&path))
                .header("authorization", &header)
                .send()
                .await
                .unwrap();
            assert_error(resp, status, code).await;
        }
    }
    assert_eq!(snapshot(&app, &a).await, before);
    assert_eq!(app.status(&a).await["state"], "open");

    // A well-signed token for a session that does not exist reaches the lookup: 404.
    let ghost = Session {
        id: uuid::Uuid::now_v7().to_string(),
        token: String::new(),
        first_task: String::new(),
        init: Json::Null,
    };
    let ghost_token = app.signer().sign(&ghost.id, now_ms() + 60_000);
    for (method, path) in [
        (Method::POST, format!("/api/v1/chat/{}/task", ghost.id)),
        (
            Method::GET,
            format!("/api/v1/chat/session/{}/status", ghost.id),
        ),
        (
            Method::POST,
            format!("/api/v1/chat/session/{}/task", ghost.id),
        ),
        (Method::DELETE, format!("/api/v1/chat/session/{}", ghost.id)),
    ] {
        let resp = app
            .authed(method, &path, &ghost_token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;
    }
    assert_eq!(snapshot(&app, &a).await, before);
    app.stop().await;
}

#[tokio::test]
async fn bad_bodies_are_refused_with_json_errors_and_change_nothing() {
    let app = spawn_app(&["--max-body-bytes", "1024", "--max-message-bytes", "256"]).await;
    let s = app.open_session().await;
    let path = format!("/api/v1/chat/{}/task", s.id);
    let before = snapshot(&app, &s).await;

    let raw = |content_type: &'static str, body: String| {
        app.authed(Method::POST, &path, &s.token)
            .header("content-type", content_type)
            .body(body)
            .send()
    };

    let big = json!({"message": "x".repeat(4096)}).to_string();
    let resp = raw("application/json", big).await.unwrap();
    let message = assert_error(resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert!(message.contains("limit of 1024 bytes"), "{message}");

    let resp = raw("application/json", "{not json".into()).await.unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, "invalid_json").await;

    let resp = raw("text/plain", json!({"message": "hi"}).to_string())
        .await
        .unwrap();
    let message = assert_error(resp, StatusCode::BAD_REQUEST, "invalid_json").await;
    assert!(message.contains("Content-Type"), "{message}");

    let resp = raw("application/json", "{}".into()).await.unwrap();
    let message = assert_error(resp, StatusCode::BAD_REQUEST, "invalid_json").await;
    assert!(message.contains("message"), "{message}");

    let resp = raw("application/json", r#"{"message": 5}"#.into())
        .await
        .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, "invalid_json").await;

    let resp = app.submit(&s, json!({"message": "   "})).await;
    assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;

    let resp = app.submit(&s, json!({"message": "y".repeat(300)})).await;
    let message = assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(message.contains("256"), "{message}");

    let resp = app
        .authed(Method::POST, &path, &s.token)
        .header("Idempotency-Key", "k".repeat(200))
        .json(&json!({"message": "hi"}))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;

    // A task id the client names must be a valid one: a bad one is a bad request, not a
    // missing task.
    for bad in ["my task", "", &"t".repeat(129)] {
        let resp = app
            .submit(&s, json!({"message": "hi", "task_id": bad}))
            .await;
        let message = assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert!(message.contains("task_id"), "{message}");
    }

    assert_eq!(snapshot(&app, &s).await, before);
    assert_eq!(before, (0, 0));
    app.stop().await;
}

#[tokio::test]
async fn a_body_declared_over_the_limit_is_refused_before_it_is_sent() {
    let app = spawn_app(&["--max-body-bytes", "1024"]).await;
    let s = app.open_session().await;
    let before = snapshot(&app, &s).await;
    let routes = [
        ("POST", format!("/api/v1/chat/{}/task", s.id)),
        ("POST", "/api/v1/chat/init".to_owned()),
        ("PUT", "/api/v1/agents/big".to_owned()),
    ];
    for ((method, path), expect) in routes.iter().flat_map(|r| [(r, true), (r, false)]) {
        // Headers only, as a client does that waits for `100 Continue` (or, without `Expect`,
        // a slow one) before it sends its body: the answer must not wait for the body.
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: edge\r\nauthorization: Bearer {}\r\n\
             content-type: application/json\r\ncontent-length: 1025\r\n{}\r\n",
            s.token,
            if expect {
                "expect: 100-continue\r\n"
            } else {
                ""
            },
        );
        let (_tcp, head) = app.raw_answer_head(&request).await;
        // Not `100 Continue`: the client would send a body that is refused anyway.
        assert!(head.starts_with("http/1.1 413"), "{method} {path}: {head}");
        assert!(head.contains("application/json"), "{method} {path}: {head}");
        assert!(
            head.contains("connection: close"),
            "{method} {path}: {head}"
        );
    }
    // The same body, sent: the same answer, through the same extractor.
    let resp = app.submit(&s, json!({"message": "x".repeat(2000)})).await;
    let message = assert_error(resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert!(message.contains("limit of 1024 bytes"), "{message}");
    assert_eq!(snapshot(&app, &s).await, before);
    app.stop().await;
}

#[tokio::test]
async fn cancelling_a_task_sends_task_cancel_and_an_ended_task_answers_its_state() {
    let app = spawn_app(&[]).await;
    let s = app.open_session().await;
    let submitted: Json = app
        .submit(&s, json!({"message": "long job"}))
        .await
        .json()
        .await
        .unwrap();
    let tid = submitted["task_id"].as_str().unwrap().to_owned();
    let task_path = format!("/api/v1/chat/{}/tasks/{tid}", s.id);

    let resp = app
        .authed(Method::DELETE, &task_path, &s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let body: Json = resp.json().await.unwrap();
    assert_eq!(body, json!({"task_id": tid, "status": "cancelling"}));
    let commands = app.task_commands().await;
    assert_eq!(commands.len(), 1);
    let TaskCommand::Cancel(cancel) = &commands[0] else {
        panic!("expected task.cancel, got {:?}", commands[0]);
    };
    assert_eq!(cancel.task_id, tid);
    assert_eq!(cancel.session_id, s.id);

    // The dispatcher ends it (done here directly, as the dispatcher would).
    let store = TaskStore::new(app.redis.clone(), app.keys.clone(), Retention::default());
    store
        .apply(
            &s.id,
            &[TaskOp::end(
                "cancel",
                &tid,
                "cancelled",
                "cancelled by the client",
                String::new(),
            )],
        )
        .await
        .unwrap();

    let resp = app
        .authed(Method::DELETE, &task_path, &s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Json = resp.json().await.unwrap();
    assert_eq!(body, json!({"task_id": tid, "status": "cancelled"}));
    assert_eq!(app.tasks_stream_len().await, 1, "no second task.cancel");

    let task = app.task_json(&s, &tid).await;
    assert_eq!(task["state"], "cancelled");
    assert_eq!(task["error"]["error_type"], "cancelled");
    assert!(task["finished_ms"].as_i64().is_some());
    assert_eq!(app.status(&s).await["totals"]["cancelled"], 1);

    let resp = app
        .authed(
            Method::DELETE,
            &format!("/api/v1/chat/{}/tasks/no-such-task", s.id),
            &s.token,
        )
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(app.tasks_stream_len().await, 1);

    // The id init reserved is no task yet: nothing to cancel, nothing counted.
    let resp = app
        .authed(
            Method::DELETE,
            &format!("/api/v1/chat/{}/tasks/{}", s.id, s.first_task),
            &s.token,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Json = resp.json().await.unwrap();
    assert_eq!(body, json!({"task_id": s.first_task, "status": "reserved"}));
    assert_eq!(
        app.tasks_stream_len().await,
        1,
        "no task.cancel for a reserved id"
    );
    assert_eq!(app.status(&s).await["totals"]["cancelled"], 1);
    app.stop().await;
}

#[tokio::test]
async fn closing_a_session_sends_session_close_and_a_closed_session_refuses_work() {
    let app = spawn_app(&[]).await;
    let s = app.open_session().await;
    let session_path = format!("/api/v1/chat/session/{}", s.id);

    let resp = app
        .authed(Method::DELETE, &session_path, &s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let body: Json = resp.json().await.unwrap();
    assert_eq!(body, json!({"session_id": s.id, "status": "closing"}));
    let commands = app.task_commands().await;
    assert!(
        matches!(&commands[..], [TaskCommand::SessionClose(c)] if c.session_id == s.id),
        "{commands:?}"
    );

    // The dispatcher closes it (done here directly, as the dispatcher would).
    let store = TaskStore::new(app.redis.clone(), app.keys.clone(), Retention::default());
    store
        .apply(&s.id, &[TaskOp::session("close", String::new())])
        .await
        .unwrap();

    let resp = app
        .authed(Method::DELETE, &session_path, &s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Json = resp.json().await.unwrap();
    assert_eq!(body, json!({"session_id": s.id, "status": "closed"}));

    let resp = app.submit(&s, json!({"message": "too late"})).await;
    assert_error(resp, StatusCode::CONFLICT, "session_closed").await;
    let resp = app
        .authed(
            Method::POST,
            &format!("/api/v1/chat/session/{}/task", s.id),
            &s.token,
        )
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::CONFLICT, "session_closed").await;
    assert_eq!(app.tasks_stream_len().await, 1);
    assert_eq!(app.status(&s).await["state"], "closed");
    app.stop().await;
}

/// Submits until one is refused as overloaded (the backlog is sampled in the background);
/// returns that answer and the number of entries on `stream` before it.
async fn submit_until_overloaded(
    app: &TestApp,
    s: &Session,
    stream: &str,
) -> (reqwest::Response, u64) {
    fleet_test_support::eventually(
        Duration::from_secs(10),
        "submits refused as overloaded",
        || async {
            let before = app.stream_len(stream).await;
            let resp = app.submit(s, json!({"message": "more"})).await;
            (resp.status() == StatusCode::TOO_MANY_REQUESTS).then_some((resp, before))
        },
    )
    .await
}

#[tokio::test]
async fn a_deep_backlog_of_the_agents_pool_is_answered_with_429_and_retry_after() {
    let app = spawn_app(&["--max-backlog", "1"]).await;
    let s = app.open_session().await;
    // No executor has started, so the pool's stream has no group yet: every entry counts.
    let pool = app.keys.exec(fleet::agent::DEFAULT_POOL);
    for _ in 0..2 {
        let resp = app.submit(&s, json!({"message": "fill"})).await;
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
    }
    let (resp, before) = submit_until_overloaded(&app, &s, &pool).await;
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_error(resp, StatusCode::TOO_MANY_REQUESTS, "overloaded").await;
    assert_eq!(
        app.stream_len(&pool).await,
        before,
        "a refused submit sends nothing"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_deep_backlog_of_the_dispatchers_is_answered_with_429_and_retry_after() {
    let app = spawn_app(&["--max-backlog", "1", "--direct-dispatch", "false"]).await;
    let s = app.open_session().await;
    // The dispatchers' group exists but nobody reads: every submit adds to its backlog.
    fleet::stream::groups::ensure_group(
        &app.redis,
        &app.keys.tasks(),
        fleet::keys::GROUP_DISPATCHERS,
    )
    .await
    .unwrap();
    for _ in 0..2 {
        let resp = app.submit(&s, json!({"message": "fill"})).await;
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
    }
    let (resp, before) = submit_until_overloaded(&app, &s, &app.keys.tasks()).await;
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_error(resp, StatusCode::TOO_MANY_REQUESTS, "overloaded").await;
    assert_eq!(app.tasks_stream_len().await, before);
    app.stop().await;
}
