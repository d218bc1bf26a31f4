//! What the agent and chat routes accept as ids and free text, and how they refuse the rest:
//! each rule's status, code and message, that a refused request stores nothing, that a refused
//! value is quoted short, and that valid unicode still goes through.

mod common;

use common::{AGENT, TestApp, assert_error, spawn_app};
use fleet::agent::{EXCERPT_CHARS, MAX_LABEL_CHARS, MAX_NAME_CHARS};
use fred::cmd;
use fred::prelude::*;
use reqwest::StatusCode;
use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `method path` (with `body` as JSON) as raw HTTP/1.1 and reads the whole answer. reqwest
/// cannot send these paths: its URL parser collapses a `.` or `..` segment, `%2E%2E` included,
/// before sending, as browsers and curl do. Answers the status and the JSON body (`null` when
/// empty).
async fn raw(app: &TestApp, method: &str, path: &str, body: Option<&Json>) -> (u16, Json) {
    let addr = app.base.trim_start_matches("http://");
    let body = body.map(Json::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tcp.read_to_end(&mut answer),
    )
    .await
    .expect("an answer within 5 s")
    .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if body.is_empty() {
        Json::Null
    } else {
        serde_json::from_str(body).unwrap()
    };
    (status, body)
}

/// Every key under the app's prefix, sorted: a refused request must leave them as they were.
async fn all_keys(app: &TestApp) -> Vec<String> {
    let mut keys: Vec<String> = app
        .redis
        .custom(cmd!("KEYS"), vec![format!("{}*", app.prefix)])
        .await
        .unwrap();
    keys.sort();
    keys
}

async fn put_agent(app: &TestApp, id: &str, body: Json) -> reqwest::Response {
    app.http
        .put(app.url(&format!("/api/v1/agents/{id}")))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn init(app: &TestApp, body: Json) -> reqwest::Response {
    app.http
        .post(app.url("/api/v1/chat/init"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_agent_with_unicode_name_role_and_tenant_is_stored_and_chatted_with() {
    let app = spawn_app(&[]).await;
    // The longest name, in characters of three bytes each.
    let name = format!(
        "Agent 智能体 ünïcødé 🚀 {}",
        "名".repeat(MAX_NAME_CHARS - 20)
    );
    assert_eq!(name.chars().count(), MAX_NAME_CHARS);
    let tenant = "société-α";
    let body = json!({
        "name": name,
        "pool": "gpu-1.a:b",
        "role": "Architecte logiciel ✓",
        "tenant_id": tenant,
    });
    let resp = put_agent(&app, "agent-ü", body.clone()).await;
    // Not an id (the id rules are ASCII), and quoted in the refusal.
    let message = assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(
        message.starts_with("agent id `agent-ü` must be"),
        "{message}"
    );

    let resp = put_agent(&app, "coder-1", body).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let stored: Json = app
        .http
        .get(app.url("/api/v1/agents/coder-1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stored["name"], name);
    assert_eq!(stored["role"], "Architecte logiciel ✓");
    assert_eq!(stored["tenant_id"], tenant);
    assert_eq!(stored["pool"], "gpu-1.a:b");

    // Ids made only of dots, other than `.` and `..`, are still ids.
    let resp = put_agent(&app, "...", json!({"name": "Dots"})).await;
    assert_eq!(resp.status(), StatusCode::CREATED);

    let user = format!("usuário {}", "用".repeat(MAX_LABEL_CHARS - 8));
    let resp = init(
        &app,
        json!({"agent_id": "coder-1", "tenant_id": tenant, "user_id": user}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let session: Json = resp.json().await.unwrap();
    let status = app
        .get_json(
            &format!(
                "/api/v1/chat/session/{}/status",
                session["session_id"].as_str().unwrap()
            ),
            session["session_token"].as_str().unwrap(),
        )
        .await;
    assert_eq!(status["user_id"], user);
    assert_eq!(status["tenant_id"], tenant);
    assert_eq!(status["agent_name"], name);
    app.stop().await;
}

#[tokio::test]
async fn agent_fields_that_break_their_rules_are_refused_and_store_nothing() {
    let app = spawn_app(&[]).await;
    let before = all_keys(&app).await;
    let cases = [
        (
            json!({"name": "Coder", "role": "r".repeat(100_000)}),
            "role is 100000 characters; the limit is 128",
        ),
        (
            json!({"name": "Coder", "role": "DEV\u{0}"}),
            "role must not hold control characters (U+0000 at character 4)",
        ),
        (
            json!({"name": "Coder", "role": "\u{1b}[31mDEV"}),
            "role must not hold control characters (U+001B at character 1)",
        ),
        (
            json!({"name": "Coder", "tenant_id": "t".repeat(129)}),
            "tenant_id is 129 characters; the limit is 128",
        ),
        (
            json!({"name": "Coder", "tenant_id": "acme\r\nx-admin: 1"}),
            "tenant_id must not hold control characters (U+000D at character 5)",
        ),
        (
            json!({"name": "Co\u{0}der"}),
            "name must not hold control characters (U+0000 at character 3)",
        ),
        (
            json!({"name": "x".repeat(257)}),
            "name is 257 characters; the limit is 256",
        ),
        (
            json!({"name": " \t "}),
            "name must be 1-256 characters, not only spaces",
        ),
        (
            json!({"name": "Coder", "pool": ".."}),
            "pool `..` must be 1-128 characters of A-Z a-z 0-9 - _ . : other than `.` and `..`",
        ),
        (
            json!({"name": "Coder", "pool": "gpu\u{0}"}),
            "pool `gpu\\0` must be 1-128 characters",
        ),
    ];
    for (body, want) in cases {
        let resp = put_agent(&app, "coder", body.clone()).await;
        let message = assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert!(
            message.starts_with(want),
            "{body}: {message:?}, want {want:?}"
        );
    }
    assert_eq!(
        all_keys(&app).await,
        before,
        "a refused agent is stored nowhere"
    );
    let resp = app
        .http
        .get(app.url("/api/v1/agents/coder"))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;
    app.stop().await;
}

#[tokio::test]
async fn dot_and_dot_dot_are_refused_as_agent_ids() {
    let app = spawn_app(&[]).await;
    let before = all_keys(&app).await;
    let body = json!({"name": "Sneaky"});
    for (path, id) in [
        ("/api/v1/agents/%2E%2E", ".."),
        ("/api/v1/agents/%2e%2e", ".."),
        ("/api/v1/agents/.%2E", ".."),
        ("/api/v1/agents/%2E", "."),
    ] {
        let (status, answer) = raw(&app, "PUT", path, Some(&body)).await;
        assert_eq!(status, 400, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_request", "{answer}");
        assert_eq!(
            answer["error"]["message"],
            format!(
                "agent id `{id}` must be 1-128 characters of A-Z a-z 0-9 - _ . : other than `.` and `..`"
            ),
        );
        for method in ["GET", "DELETE"] {
            let (status, answer) = raw(&app, method, path, None).await;
            assert_eq!(status, 404, "{method} {path}: {answer}");
            assert_eq!(answer["error"]["code"], "not_found");
        }
    }
    assert_eq!(
        all_keys(&app).await,
        before,
        "no agent `.` or `..` is stored"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_long_invalid_id_is_quoted_short() {
    let app = spawn_app(&[]).await;
    let long = "x".repeat(10_000);
    let resp = put_agent(&app, &long, json!({"name": "Long"})).await;
    let message = assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert_eq!(
        message,
        format!(
            "agent id `{}…` must be 1-128 characters of A-Z a-z 0-9 - _ . : other than `.` and `..`",
            "x".repeat(EXCERPT_CHARS)
        )
    );
    let resp = app
        .http
        .get(app.url(&format!("/api/v1/agents/{long}")))
        .send()
        .await
        .unwrap();
    let message = assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(
        message,
        format!("agent `{}…` not found", "x".repeat(EXCERPT_CHARS))
    );
    // Cut between characters, never inside one; NUL and the like escaped.
    let resp = put_agent(
        &app,
        &format!("%00{}", "%C3%A9".repeat(5_000)),
        json!({"name": "Long"}),
    )
    .await;
    let message = assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(
        message.starts_with(&format!("agent id `\\0{}…` must be", "é".repeat(63))),
        "{message}"
    );
    let resp = init(&app, json!({"agent_id": long})).await;
    let message = assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(
        message,
        format!("agent `{}…` not found", "x".repeat(EXCERPT_CHARS))
    );
    app.stop().await;
}

#[tokio::test]
async fn dot_and_dot_dot_are_refused_as_task_ids() {
    let app = spawn_app(&[]).await;
    let s = app.open_session().await;
    for id in [".", ".."] {
        let resp = app
            .submit(&s, json!({"message": "hi", "task_id": id}))
            .await;
        let message = assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert_eq!(
            message,
            "task_id must be 1-128 characters of A-Z a-z 0-9 - _ . : other than `.` and `..`"
        );
    }
    assert_eq!(app.tasks_total(&s).await, 0, "no task was created");
    assert_eq!(app.exec_requests("default").await.len(), 0);
    // Nor can one be read or cancelled (a raw request: reqwest collapses the segment).
    for path in ["%2E%2E", "%2E"] {
        for method in ["GET", "DELETE"] {
            let addr = app.base.trim_start_matches("http://");
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!(
                "{method} /api/v1/chat/{}/tasks/{path} HTTP/1.1\r\nhost: {addr}\r\n\
                 authorization: Bearer {}\r\nconnection: close\r\n\r\n",
                s.id, s.token
            );
            tcp.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            tcp.read_to_string(&mut answer).await.unwrap();
            assert!(
                answer.starts_with("HTTP/1.1 404"),
                "{method} {path}: {answer}"
            );
            assert!(answer.contains(r#""code":"not_found""#), "{answer}");
        }
    }
    // A task id made only of dots, other than those two, is still one.
    let resp = app
        .submit(&s, json!({"message": "hi", "task_id": "..."}))
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let task = app.task_json(&s, "...").await;
    assert_eq!(task["message"], "hi");
    app.stop().await;
}

#[tokio::test]
async fn session_user_and_tenant_ids_are_bounded_and_free_of_control_characters() {
    let app = spawn_app(&[]).await;
    app.put_agent(AGENT).await;
    let before = all_keys(&app).await;
    let cases = [
        (
            json!({"agent_id": AGENT, "user_id": "u".repeat(100_000)}),
            "user_id is 100000 characters; the limit is 128",
        ),
        (
            json!({"agent_id": AGENT, "user_id": "u".repeat(129)}),
            "user_id is 129 characters; the limit is 128",
        ),
        (
            json!({"agent_id": AGENT, "user_id": "alice\u{0}"}),
            "user_id must not hold control characters (U+0000 at character 6)",
        ),
        (
            json!({"agent_id": AGENT, "user_id": "alice\nroot"}),
            "user_id must not hold control characters (U+000A at character 6)",
        ),
        (
            json!({"agent_id": AGENT, "tenant_id": "t".repeat(129)}),
            "tenant_id is 129 characters; the limit is 128",
        ),
        (
            json!({"agent_id": AGENT, "tenant_id": "acme\u{7f}"}),
            "tenant_id must not hold control characters (U+007F at character 5)",
        ),
    ];
    for (body, want) in cases {
        let resp = init(&app, body.clone()).await;
        let message = assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert_eq!(message, want, "{body}");
    }
    assert_eq!(all_keys(&app).await, before, "no session was opened");

    // At the limit, and empty (none), both still open a session.
    for user in ["u".repeat(MAX_LABEL_CHARS), String::new()] {
        let resp = init(&app, json!({"agent_id": AGENT, "user_id": user})).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
    }
    app.stop().await;
}
