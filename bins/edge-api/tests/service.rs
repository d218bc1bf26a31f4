//! Everything around the chat routes: agent configs and their API keys, health and metrics,
//! JSON fallbacks, startup checks and shutdown.

mod common;

use std::time::Duration;

use clap::Parser;
use common::{SECRET, assert_error, spawn_app, spawn_app_with};
use edge_api::{App, Config};
use reqwest::StatusCode;
use serde_json::{Value as Json, json};

#[tokio::test]
async fn agents_can_be_created_read_listed_replaced_and_deleted() {
    let app = spawn_app(&[]).await;
    let url = app.url("/api/v1/agents/coder");

    let resp = app
        .http
        .put(&url)
        .json(&json!({
            "id": "ignored",
            "name": "Coder",
            "pool": "gpu",
            "role": "DEV",
            "timeout_secs": 60,
            "params": {"model": "m1"}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let created: Json = resp.json().await.unwrap();
    assert_eq!(
        created,
        json!({"id": "coder", "name": "Coder", "pool": "gpu", "role": "DEV",
               "timeout_secs": 60, "params": {"model": "m1"}})
    );

    let resp = app.http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Json>().await.unwrap(), created);

    let resp = app
        .http
        .put(&url)
        .json(&json!({"name": "Coder 2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let replaced: Json = resp.json().await.unwrap();
    assert_eq!(replaced["name"], "Coder 2");
    assert_eq!(replaced["pool"], "default");
    assert!(replaced.get("role").is_none(), "{replaced}");

    app.put_agent("alpha").await;
    let list: Json = app
        .http
        .get(app.url("/api/v1/agents"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["alpha", "coder"]);

    let resp = app.http.delete(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = app.http.get(&url).send().await.unwrap();
    assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;
    let resp = app.http.delete(&url).send().await.unwrap();
    assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;

    // Invalid configs are refused and stored nowhere.
    let resp = app
        .http
        .put(&url)
        .json(&json!({"name": "  "}))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    let resp = app
        .http
        .put(app.url("/api/v1/agents/bad%20id"))
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    let resp = app
        .http
        .put(&url)
        .json(&json!({"pool": "gpu"}))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, "invalid_json").await;
    // A deadline past the limit would overflow every task's deadline.
    for timeout in [fleet::agent::MAX_TIMEOUT_SECS + 1, u64::MAX] {
        let resp = app
            .http
            .put(&url)
            .json(&json!({"name": "x", "timeout_secs": timeout}))
            .send()
            .await
            .unwrap();
        let message = assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert!(message.contains("timeout_secs"), "{message}");
    }
    let resp = app.http.get(&url).send().await.unwrap();
    assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;
    app.stop().await;
}

#[tokio::test]
async fn agent_routes_need_an_api_key_when_keys_are_configured() {
    let app = spawn_app(&["--api-keys", "key-one,key-two"]).await;
    let url = app.url("/api/v1/agents/guarded");
    let body = json!({"name": "Guarded"});

    let resp = app.http.put(&url).json(&body).send().await.unwrap();
    assert_error(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let resp = app
        .http
        .put(&url)
        .header("x-api-key", "key-three")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
    for resp in [
        app.http.get(&url).send().await.unwrap(),
        app.http.delete(&url).send().await.unwrap(),
        app.http
            .get(app.url("/api/v1/agents"))
            .send()
            .await
            .unwrap(),
    ] {
        assert_error(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    let stored: Option<String> =
        fred::prelude::HashesInterface::hget(&app.redis, app.keys.agent("guarded"), "name")
            .await
            .unwrap();
    assert_eq!(stored, None, "a refused PUT stores nothing");

    let resp = app
        .http
        .put(&url)
        .header("x-api-key", "key-two")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = app
        .http
        .get(&url)
        .bearer_auth("key-one")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = app
        .http
        .get(app.url("/api/v1/agents"))
        .header("x-api-key", "key-one")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = app
        .http
        .delete(&url)
        .header("x-api-key", "key-one")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    // Session routes are not guarded by API keys: init stays open.
    let resp = app
        .http
        .post(app.url("/api/v1/chat/init"))
        .json(&json!({"agent_id": "guarded"}))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;
    app.stop().await;
}

#[tokio::test]
async fn health_routes_answer_and_metrics_are_prometheus_text() {
    let app = spawn_app(&[]).await;
    for path in ["/health", "/health/", "/health/ready", "/health/detailed"] {
        let resp = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let body: Json = resp.json().await.unwrap();
        assert!(body["status"].is_string(), "{path}: {body}");
    }
    let detailed: Json = app
        .http
        .get(app.url("/health/detailed"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(detailed["service"], "edge-api");
    assert_eq!(detailed["redis"]["reachable"], true);
    assert_eq!(detailed["streams"][0]["stream"], app.keys.tasks());
    assert_eq!(detailed["streams"][0]["group"], "dispatchers");

    for path in ["/metrics", "/health/metrics"] {
        let resp = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        let text = resp.text().await.unwrap();
        assert!(
            text.contains("fleet_http_requests_total{")
                && text.contains(r#"route="/health/detailed""#)
                && text.contains("fleet_http_request_duration_seconds_bucket{"),
            "{text}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_answer_json() {
    let app = spawn_app(&[]).await;
    let resp = app.http.get(app.url("/nope")).send().await.unwrap();
    assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;

    let resp = app
        .http
        .get(app.url("/api/v1/chat/init"))
        .send()
        .await
        .unwrap();
    let allow = resp.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("POST"), "{allow}");
    assert_error(resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;

    let resp = app.http.post(app.url("/health")).send().await.unwrap();
    assert_error(resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    app.stop().await;
}

#[tokio::test]
async fn an_answer_given_before_the_body_is_read_says_connection_close() {
    use tokio::io::AsyncWriteExt;

    let app = spawn_app(&[]).await;
    app.put_agent("demo").await;
    let body = r#"{"agent_id":"demo"}"#;
    let ghost = app.signer().sign("ghost", i64::MAX);
    // Answered before the body arrives (it is never sent): a client must not send its next
    // request on this connection, which cannot serve it, and is told so.
    for (what, head) in [
        (
            "no token",
            "POST /api/v1/chat/s1/task HTTP/1.1\r\n".to_owned(),
        ),
        (
            "a token of another session",
            format!("POST /api/v1/chat/s1/task HTTP/1.1\r\nauthorization: Bearer {ghost}\r\n"),
        ),
        ("no route", "POST /api/v1/nope HTTP/1.1\r\n".to_owned()),
        (
            "another method",
            "PATCH /api/v1/chat/init HTTP/1.1\r\n".to_owned(),
        ),
    ] {
        let request = format!(
            "{head}host: edge\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let (_tcp, answer) = app.raw_answer_head(&request).await;
        assert!(answer.starts_with("http/1.1 4"), "{what}: {answer}");
        assert!(answer.contains("connection: close"), "{what}: {answer}");
    }
    let request = format!(
        "POST /api/v1/chat/init HTTP/1.1\r\nhost: edge\r\ncontent-type: text/plain\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    let (_tcp, answer) = app.raw_answer_head(&request).await;
    assert!(answer.starts_with("http/1.1 400"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");

    // A body read to its end leaves the connection open for the next request, refused or not.
    let request = format!(
        "POST /api/v1/chat/init HTTP/1.1\r\nhost: edge\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (mut tcp, answer) = app.raw_answer_head(&request).await;
    assert!(answer.starts_with("http/1.1 201"), "{answer}");
    assert!(!answer.contains("connection: close"), "{answer}");
    let length: usize = answer
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .expect("content-length")
        .trim()
        .parse()
        .unwrap();
    let mut rest = vec![0u8; length];
    tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut rest)
        .await
        .unwrap();
    let bad = r#"{"agent_id":5}"#;
    let next = format!(
        "POST /api/v1/chat/init HTTP/1.1\r\nhost: edge\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{bad}",
        bad.len()
    );
    tcp.write_all(next.as_bytes()).await.unwrap();
    let answer = common::read_head(&mut tcp).await;
    assert!(answer.starts_with("http/1.1 400"), "{answer}");
    assert!(!answer.contains("connection: close"), "{answer}");
    app.stop().await;
}

async fn build_error(args: &[&str]) -> String {
    let cfg = Config::try_parse_from(common::args(&fleet_test_support::prefix(), args))
        .expect("test config parses");
    match App::build(cfg).await {
        Ok(_) => panic!("expected a startup error for {args:?}"),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test]
async fn startup_refuses_a_missing_or_short_secret_unless_dev() {
    let err = build_error(&[]).await;
    assert!(
        err.contains("FLEET_SECRET is required; pass --dev for a development default"),
        "{err}"
    );
    let err = build_error(&["--secret", "short"]).await;
    assert!(err.contains("at least 16 bytes"), "{err}");
    let err = build_error(&["--dev", "--secret", "short"]).await;
    assert!(err.contains("at least 16 bytes"), "{err}");

    // --dev without a secret starts, and its tokens work.
    let app = spawn_app_with(&["--dev"]).await;
    let s = app.open_session().await;
    assert_eq!(app.status(&s).await["state"], "open");
    app.stop().await;
}

#[tokio::test]
async fn startup_loads_the_agents_file_and_refuses_a_bad_one() {
    let dir = std::env::temp_dir().join(format!("edge-api-{}", fleet_test_support::prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("agents.toml");
    std::fs::write(
        &good,
        "[[agents]]\nid = \"filed\"\nname = \"From the file\"\npool = \"p1\"\n",
    )
    .unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "agents: [{id: 'bad id', name: x}]\n").unwrap();

    let app = spawn_app(&["--agents-file", good.to_str().unwrap()]).await;
    let resp = app
        .http
        .post(app.url("/api/v1/chat/init"))
        .json(&json!({"agent_id": "filed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body: Json = resp.json().await.unwrap();
    assert_eq!(body["agent_name"], "From the file");
    app.stop().await;

    let err = build_error(&["--secret", SECRET, "--agents-file", bad.to_str().unwrap()]).await;
    assert!(
        err.contains("FLEET_AGENTS_FILE") && err.contains("bad id"),
        "{err}"
    );
    let missing = dir.join("missing.toml");
    let err = build_error(&[
        "--secret",
        SECRET,
        "--agents-file",
        missing.to_str().unwrap(),
    ])
    .await;
    assert!(err.contains("missing.toml"), "{err}");
    let err = build_error(&["--secret", SECRET, "--public-ws-url", "https://x.example"]).await;
    assert!(err.contains("ws:// or wss://"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn cancelling_the_token_stops_run_promptly_and_frees_the_port() {
    let app = spawn_app(&[]).await;
    let resp = app.http.get(app.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let health = app.url("/health");
    let started = std::time::Instant::now();
    app.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5));

    let after = reqwest::Client::new()
        .get(health)
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(after.is_err(), "nothing listens after run() returned");
}

#[tokio::test]
async fn shutdown_waits_for_requests_in_flight_at_most_the_grace_period() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = spawn_app(&["--shutdown-grace-secs", "1"]).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // The server answers `100 Continue` once the handler starts reading the body: from then on
    // the request is in flight, and this client never sends the body.
    let head = format!(
        "POST /api/v1/chat/init HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\nExpect: 100-continue\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );

    let started = std::time::Instant::now();
    app.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), app.server)
        .await
        .expect("run() returns soon after the grace period")
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "the stalled request was waited for about the 1s grace period, not {took:?}"
    );
}

#[tokio::test]
async fn a_request_in_flight_when_shutdown_begins_still_gets_its_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = spawn_app(&["--shutdown-grace-secs", "10"]).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let body = r#"{"agent_id": "nobody"}"#;
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/v1/chat/init HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 100 Continue"));

    app.shutdown.cancel();
    fleet_test_support::eventually(
        Duration::from_secs(5),
        "the listener to stop taking connections",
        || async {
            tokio::net::TcpStream::connect(&addr)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    conn.write_all(body.as_bytes()).await.unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains(r#""code":"not_found""#), "{answer}");

    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), app.server)
        .await
        .expect("run() returns once the request is answered")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
}
