//! Test support: real servers on free ports, one key prefix per test, binaries as processes.
//!
//! * [`redis`] starts one `redis-server` per test process (nextest runs each test in a process
//!   of its own) on a free port (checking that the server answering there is the one it
//!   started), without persistence, and returns its URL. [`RedisServer::start`] starts a
//!   private one (e.g. to restart it).
//! * [`NatsServer::start`] starts `nats-server -js` on a port the server chooses, with its own
//!   store directory; [`NatsServer::restart`] stops and starts it on the same port and store.
//! * [`prefix`] gives each test its own key prefix, so tests never see each other's keys.
//! * [`FleetProcess`] runs one of Fleet's binaries (built by `cargo build --workspace --bins`)
//!   with its environment, reads the addresses it listens on from its log (start it on port 0),
//!   and can stop it with SIGTERM or SIGKILL.
//!
//! Every child is stopped by PID: on drop, and by a reaper process that kills it if the test
//! process dies first. The machine's own Redis and NATS on their standard ports are never used.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A port nobody listens on right now, and one this process has not been given before: the
/// kernel may hand out a port it just freed again, and two processes of one test told the same
/// port would see one of them fail to bind it.
fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral port");
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

/// A key prefix no other test uses.
pub fn prefix() -> String {
    format!("t{}", uuid::Uuid::new_v4().simple())
}

fn wait_for_port(port: u16, within: Duration, what: &str, child: &mut Child) {
    let deadline = Instant::now() + within;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening on {port}: {status}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{what} did not listen on {port} within {within:?}");
}

/// The process id of the Redis server answering on `port` (`INFO server`); `Some(0)` when what
/// answers is not one, `None` when nothing answers yet.
fn redis_pid_on(port: u16) -> Option<u32> {
    use std::io::{Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    conn.write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
        .ok()?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    // A bulk string: `$<len>\r\n<text>\r\n`; read until the pid's line is in.
    while !reply.windows(11).any(|w| w == b"process_id:") || !reply.ends_with(b"\r\n") {
        let n = conn.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        reply.extend_from_slice(&buf[..n]);
        if reply[0] != b'$' {
            return Some(0);
        }
    }
    String::from_utf8_lossy(&reply)
        .lines()
        .find_map(|l| l.strip_prefix("process_id:")?.trim().parse().ok())
}

/// The client port a `nats-server` started with `-p -1` logs to `log` once it listens.
fn nats_port_from_log(log: &Path, within: Duration, child: &mut Child) -> u16 {
    const LISTENING: &str = "Listening for client connections on ";
    let deadline = Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(port) = text.lines().find_map(|l| {
            let addr = &l[l.find(LISTENING)? + LISTENING.len()..];
            addr.rsplit(':').next()?.trim().parse().ok()
        }) {
            return port;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("nats-server exited before listening: {status}; its log:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "nats-server did not listen within {within:?}; its log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills `pid` when this test process exits, however it exits.
fn reap_with_parent(pid: u32) {
    let me = std::process::id();
    let script =
        format!("while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill -9 {pid} 2>/dev/null");
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

fn which(program: &str) -> Option<PathBuf> {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin", "/sbin"].map(PathBuf::from));
    candidates.map(|d| d.join(program)).find(|p| p.is_file())
}

fn require(program: &str) -> PathBuf {
    which(program).unwrap_or_else(|| {
        panic!("`{program}` is not installed; the README's test command installs it (apt-get install redis-server nats-server)")
    })
}

/// A `redis-server` process of a test.
pub struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    /// Starts a private `redis-server` on a free port. A port is free when probed, but another
    /// process may take it before the server binds it: the server then exits, or the port
    /// answers with someone else's server; either way this tries the next free port.
    pub fn start() -> RedisServer {
        let mut why = String::new();
        for _ in 0..5 {
            match Self::try_start_on(free_port()) {
                Ok(server) => return server,
                Err(e) => why = e,
            }
        }
        panic!("redis-server did not start on any of 5 free ports; the last: {why}");
    }

    fn start_on(port: u16) -> RedisServer {
        Self::try_start_on(port).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start_on(port: u16) -> Result<RedisServer, String> {
        let child = Command::new(require("redis-server"))
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        reap_with_parent(child.id());
        let mut server = RedisServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "redis-server exited before listening on {port}: {status}"
                ));
            }
            match redis_pid_on(port) {
                Some(pid) if pid == server.child.id() => return Ok(server),
                // Another process holds the port; ours exits on its failed bind (drop kills it).
                Some(0) => return Err(format!("port {port} is taken by something else")),
                Some(pid) => return Err(format!("port {port} is taken by redis-server {pid}")),
                None if Instant::now() >= deadline => {
                    return Err(format!("redis-server did not listen on {port} within 10 s"));
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server and starts a new one on the same port (its data is gone).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        *self = Self::start_on(self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

static REDIS: OnceLock<RedisServer> = OnceLock::new();

/// The URL of this test process's `redis-server`, started on first use.
pub fn redis() -> String {
    REDIS.get_or_init(RedisServer::start).url()
}

/// A `nats-server -js` process of a test, with its own store directory.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        let store =
            std::env::temp_dir().join(format!("fleet-nats-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&store).expect("create nats store dir");
        // Port 0 here: the first start lets the server choose (`-p -1`) and reads the port
        // from its log, so no other process can take it between a probe and the bind.
        let mut s = NatsServer {
            child: None,
            port: 0,
            store,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = self.store.join("nats-server.log");
        let _ = std::fs::remove_file(&log);
        let port = if self.port == 0 {
            "-1".to_owned()
        } else {
            self.port.to_string()
        };
        let mut child = Command::new(require("nats-server"))
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
            .arg(&self.store)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        reap_with_parent(child.id());
        if self.port == 0 {
            self.port = nats_port_from_log(&log, Duration::from_secs(10), &mut child);
        }
        wait_for_port(
            self.port,
            Duration::from_secs(10),
            "nats-server",
            &mut child,
        );
        self.child = Some(child);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// Stops the server (SIGKILL when `hard`, else SIGTERM) and waits for it to exit.
    pub fn stop(&mut self, hard: bool) {
        if let Some(mut child) = self.child.take() {
            if hard {
                let _ = child.kill();
            } else {
                signal(child.id(), "TERM");
            }
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store directory.
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// Stops and starts it again, keeping its store.
    pub fn restart(&mut self) {
        self.stop(false);
        self.start_again();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop(true);
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// The directory Fleet's binaries were built into (the one holding this test's executable).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("test executable lives in target/<profile>/deps")
}

/// The path of Fleet binary `name`, which `cargo build --workspace --bins` builds.
pub fn bin_path(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (the README's test command does)",
        p.display()
    );
    p
}

/// One of Fleet's binaries running as a process.
pub struct FleetProcess {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl FleetProcess {
    /// Starts binary `name` with `args` and `env` (on top of a clean `RUST_LOG=info`).
    /// Its output goes to a log file, shown by [`FleetProcess::log`].
    pub fn spawn(name: &str, args: &[&str], env: &[(&str, String)]) -> FleetProcess {
        let log = std::env::temp_dir().join(format!(
            "fleet-{name}-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let out = std::fs::File::create(&log).expect("create process log");
        let err = out.try_clone().expect("clone log handle");
        let mut cmd = Command::new(bin_path(name));
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env("FLEET_LOG_FORMAT", "json")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        reap_with_parent(child.id());
        FleetProcess {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The address the process listens on for `name` (`admin`, `http` or `grpc`), from the
    /// `listening` line every binary logs once its ports are bound. Start a process on port 0
    /// and ask here, rather than hand it a free port that something else could take first.
    /// Panics with the log if the process exits first or has not said within `within`.
    pub async fn listening(&mut self, name: &str, within: Duration) -> SocketAddr {
        let deadline = Instant::now() + within;
        loop {
            let exited = !self.running();
            let log = self.log();
            if let Some(addr) = listening_addr(&log, name) {
                return addr;
            }
            assert!(!exited, "{} exited before it listened:\n{log}", self.name);
            assert!(
                Instant::now() < deadline,
                "{} logged no `listening` address `{name}` within {within:?}:\n{log}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then waits up to `within` for the exit. Returns its exit status.
    pub async fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        signal(child.id(), "TERM");
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for FleetProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.name, self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Address `name` of the first `listening` line of a JSON log (`FLEET_LOG_FORMAT=json`).
fn listening_addr(log: &str, name: &str) -> Option<SocketAddr> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|v| v["fields"]["message"] == "listening")?["fields"][name]
        .as_str()?
        .parse()
        .ok()
}

/// Polls `check` until it returns `Some`, up to `within`; panics with `what` otherwise.
/// For conditions no event announces (e.g. a value in Redis written by another process).
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client of a server's read timeout: connects to `addr`, sends `bytes` and then nothing more.
/// Returns the connection and when it connected.
pub async fn stalled_client(addr: SocketAddr, bytes: &[u8]) -> (tokio::net::TcpStream, Instant) {
    use tokio::io::AsyncWriteExt;
    let connected = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the server");
    tcp.write_all(bytes).await.expect("send the first bytes");
    (tcp, connected)
}

/// Reads what the server sends on `tcp` until it closes the connection (panics after
/// `within`); returns it, and when the close came, counted from `since`.
pub async fn until_closed(
    tcp: &mut tokio::net::TcpStream,
    since: Instant,
    within: Duration,
) -> (String, Duration) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    // A reset is a close too; what came before it is kept in `got`.
    let _ = tokio::time::timeout(within, tcp.read_to_end(&mut got))
        .await
        .expect("the server closes a stalled connection");
    (String::from_utf8_lossy(&got).into_owned(), since.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_address_is_read_from_the_json_log() {
        let log = concat!(
            "not json\n",
            r#"{"level":"INFO","fields":{"message":"loaded agents","admin":"1.2.3.4:5"}}"#,
            "\n",
            r#"{"level":"INFO","fields":{"message":"listening","http":"127.0.0.1:4101","admin":"127.0.0.1:4102"}}"#,
            "\n",
        );
        assert_eq!(
            listening_addr(log, "admin"),
            Some("127.0.0.1:4102".parse().unwrap())
        );
        assert_eq!(
            listening_addr(log, "http"),
            Some("127.0.0.1:4101".parse().unwrap())
        );
        assert_eq!(listening_addr(log, "grpc"), None);
        assert_eq!(listening_addr("", "admin"), None);
    }

    #[test]
    fn a_port_another_redis_server_holds_is_refused_not_shared() {
        let theirs = RedisServer::start();
        assert_eq!(redis_pid_on(theirs.port()), Some(theirs.pid()));
        let why = RedisServer::try_start_on(theirs.port())
            .err()
            .expect("a second server on a taken port");
        assert!(
            why.contains("taken by redis-server") || why.contains("exited before listening"),
            "{why}"
        );
        // The one holding the port still answers as itself.
        assert_eq!(redis_pid_on(theirs.port()), Some(theirs.pid()));
    }

    #[test]
    fn a_nats_server_listens_on_the_port_it_chose_and_again_after_a_restart() {
        let mut nats = NatsServer::start();
        let port = nats.port();
        assert_ne!(port, 0);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        nats.restart();
        assert_eq!(nats.port(), port);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    }

    #[test]
    fn a_port_something_else_holds_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let why = RedisServer::try_start_on(port)
            .err()
            .expect("no server on a taken port");
        assert!(
            why.contains("exited before listening") || why.contains("something else"),
            "{why}"
        );
    }
}
