//! The deployment artifacts (Dockerfile, deploy/compose, deploy/k8s) stay true to the code.
//!
//! Every YAML file under deploy/ is parsed, and whatever can drift is checked against the code
//! itself, not against a copy of it:
//! * the environment variables each binary reads and the addresses it listens on come from
//!   running the built binary's `--help` (clap prints `[env: NAME]` and `[default: ...]`), plus
//!   the variables the telemetry library reads (`RUST_LOG`, the standard `OTEL_*` ones);
//! * the admin routes (probes, healthchecks, metrics) from `shared/src/admin.rs`, the
//!   ws-gateway routes (Ingress paths) from `bins/ws-gateway/src`;
//! * stream and consumer-group names (KEDA) from `fleet::keys`.
//!
//! Kustomize overlays are rendered with `kubectl kustomize` when kubectl is installed (it is on
//! Fleet's dev and CI machines); the base and the components are also checked as written.
//! Every problem is listed at once, each naming its file, object and field.
//!
//! Run after `cargo build --workspace --bins` (scripts/test.sh does it).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use fleet::agent::AgentsFile;
use fleet::keys::{self, Keys};
use serde::Deserialize;
use serde_yaml::Value;

/// Fleet's service binaries: each has one Deployment, one compose service and one image.
const BINS: &[&str] = &[
    "edge-api",
    "dispatcher",
    "callback-worker",
    "ws-gateway",
    "exec-worker",
    "nats-bridge",
];
/// The CLI: an image of its own, no Deployment.
const CLI: &str = "fleetctl";
/// Workers scaled on their consumer group's lag (KEDA), with two replicas in compose.
const SCALED: &[&str] = &["dispatcher", "callback-worker", "exec-worker"];
/// Binaries whose non-admin ports must be reachable through a Service.
const SERVED: &[&str] = &["edge-api", "ws-gateway"];
/// Read by the telemetry library, not by clap: allowed on every Fleet container.
const LIBRARY_ENV: &[&str] = &[
    "RUST_LOG",
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_EXPORT_TIMEOUT",
];
/// The variables that set where a binary listens (the design's configuration names); other
/// `*_ADDR` variables (`FLEET_CONTEXT_ADDR`, ...) are addresses it dials.
const LISTEN_VARS: &[&str] = &["FLEET_HTTP_ADDR", "FLEET_GRPC_ADDR", "FLEET_ADMIN_ADDR"];
/// The liveness and readiness routes every binary's admin server has.
const LIVENESS: &str = "/health";
const READINESS: &str = "/health/ready";
/// Images are `fleet/<binary>`, optionally behind a registry and with a tag.
const IMAGE_NAMESPACE: &str = "fleet";
const HEALTHCHECK_BIN: &str = "/usr/local/bin/fleet-healthcheck";
const HEALTHCHECK_SOURCE: &str = "deploy/docker/healthcheck.rs";

// ------------------------------------------------------------------------------------------
// Problems

#[derive(Default)]
struct Problems(BTreeSet<String>);

impl Problems {
    fn add(&mut self, at: impl Display, msg: impl Display) {
        self.0.insert(format!("{at}: {msg}"));
    }

    fn check(&mut self, ok: bool, at: impl Display, msg: impl Display) {
        if !ok {
            self.add(at, msg);
        }
    }

    fn assert_none(self, what: &str) {
        assert!(
            self.0.is_empty(),
            "{} problem(s) in {what}:\n  - {}\n",
            self.0.len(),
            self.0.into_iter().collect::<Vec<_>>().join("\n  - ")
        );
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

// ------------------------------------------------------------------------------------------
// What the code says

/// One option of a binary, as its `--help` describes it.
#[derive(Default)]
struct Opt {
    default: Option<String>,
    /// The option's description (where "Unset: ..." defaults are spelled out).
    help: String,
}

/// One binary, as its `--help` describes it.
struct Binary {
    name: &'static str,
    /// Environment variable -> its option.
    env: BTreeMap<String, Opt>,
}

impl Binary {
    fn reads(&self, var: &str) -> bool {
        self.env.contains_key(var) || LIBRARY_ENV.contains(&var)
    }

    fn default(&self, var: &str) -> Option<&str> {
        self.env.get(var).and_then(|o| o.default.as_deref())
    }

    /// The variable naming the address of its health routes: the admin server, or the REST
    /// port for edge-api (which serves them there).
    fn health_var(&self) -> Option<&'static str> {
        ["FLEET_ADMIN_ADDR", "FLEET_HTTP_ADDR"]
            .into_iter()
            .find(|v| self.env.contains_key(*v))
    }

    /// Where the binary listens when `var` is unset: clap's default, else the first address
    /// its description gives ("Unset: 0.0.0.0:50055, ...").
    fn listen_default(&self, var: &str) -> Option<String> {
        let opt = self.env.get(var)?;
        opt.default
            .iter()
            .map(String::as_str)
            .chain(opt.help.split_whitespace())
            .map(|w| w.trim_matches(|c: char| matches!(c, ',' | ';' | '.' | '(' | ')' | '`')))
            .find(|w| w.parse::<SocketAddr>().is_ok())
            .map(str::to_owned)
    }

    /// The ports it listens on, by variable, given the values a deployment sets.
    fn listen(
        &self,
        value: impl Fn(&str) -> Option<String>,
    ) -> Result<BTreeMap<String, u16>, String> {
        let mut out = BTreeMap::new();
        for var in LISTEN_VARS.iter().filter(|v| self.env.contains_key(**v)) {
            let v = value(var)
                .or_else(|| self.listen_default(var))
                .ok_or_else(|| {
                    format!(
                        "{var} is unset and {}'s --help gives no default address",
                        self.name
                    )
                })?;
            let addr: SocketAddr = v
                .parse()
                .map_err(|e| format!("{var}={v:?} is not a socket address: {e}"))?;
            out.insert((*var).to_owned(), addr.port());
        }
        Ok(out)
    }

    fn describe_listen(ports: &BTreeMap<String, u16>) -> String {
        ports
            .iter()
            .map(|(k, p)| format!("{k} -> {p}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn env_list(&self) -> String {
        self.env.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// Reads each option of a clap `--help`: `[env: NAME=...]` / `[env: NAME]`, `[default: ...]`
/// and its description.
fn parse_help(text: &str) -> BTreeMap<String, Opt> {
    let mut out = BTreeMap::new();
    let mut env: Option<String> = None;
    let mut opt = Opt::default();
    let flush = |out: &mut BTreeMap<String, Opt>, env: &mut Option<String>, opt: &mut Opt| {
        let o = std::mem::take(opt);
        if let Some(e) = env.take() {
            out.insert(e, o);
        }
    };
    for line in text.lines() {
        let t = line.trim_start();
        let new_option =
            t.starts_with("--") || (t.starts_with('-') && t.as_bytes().get(2) == Some(&b','));
        if new_option {
            flush(&mut out, &mut env, &mut opt);
            continue;
        }
        if let Some(i) = t.find("[env: ") {
            let rest = &t[i + "[env: ".len()..];
            let name = rest.split(['=', ']']).next().unwrap_or_default().trim();
            if !name.is_empty() {
                env = Some(name.to_owned());
            }
        } else if let Some(i) = t.find("[default: ") {
            let rest = &t[i + "[default: ".len()..];
            let end = rest.find(']').unwrap_or(rest.len());
            opt.default = Some(rest[..end].to_owned());
        } else {
            opt.help.push_str(t);
            opt.help.push(' ');
        }
    }
    flush(&mut out, &mut env, &mut opt);
    out
}

fn load_binaries(p: &mut Problems) -> BTreeMap<&'static str, Binary> {
    let dir = fleet_test_support::target_dir();
    let mut out = BTreeMap::new();
    for &name in BINS {
        let path = dir.join(name);
        if !path.is_file() {
            p.add(
                path.display(),
                "missing: run `cargo build --workspace --bins` before this test",
            );
            continue;
        }
        let bin = fleet_test_support::bin_path(name);
        let output = Command::new(&bin)
            .arg("--help")
            .env_clear()
            .output()
            .unwrap_or_else(|e| panic!("run {} --help: {e}", bin.display()));
        let text = String::from_utf8_lossy(&output.stdout);
        let env = parse_help(&text);
        if !output.status.success() || env.is_empty() {
            p.add(
                format!("{name} --help"),
                format!(
                    "lists no environment variables (exit {}): the drift checks need its clap \
                     config. Output: {:?}",
                    output.status,
                    text.chars().take(300).collect::<String>()
                ),
            );
            continue;
        }
        out.insert(name, Binary { name, env });
    }
    out
}

/// The paths of `.route("...")` calls in Rust sources.
fn routes_in(files: &[PathBuf]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let mut rest = text.as_str();
        while let Some(i) = rest.find(".route(") {
            rest = &rest[i + ".route(".len()..];
            let t = rest.trim_start();
            if let Some(s) = t.strip_prefix('"')
                && let Some(end) = s.find('"')
            {
                out.insert(s[..end].to_owned());
            }
        }
    }
    out
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(dir, &mut |p| {
        if p.extension().is_some_and(|e| e == "rs") {
            out.push(p.to_path_buf());
        }
    });
    out
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, f);
        } else {
            f(&p);
        }
    }
}

struct Code {
    bins: BTreeMap<&'static str, Binary>,
    admin_routes: BTreeSet<String>,
    ws_routes: BTreeSet<String>,
    dockerfile: Dockerfile,
}

impl Code {
    fn load(p: &mut Problems) -> Code {
        let root = root();
        let admin_routes = routes_in(&[root.join("shared/src/admin.rs")]);
        for r in [LIVENESS, READINESS, "/metrics"] {
            p.check(
                admin_routes.contains(r),
                "shared/src/admin.rs",
                format!(
                    "the admin router no longer serves {r}; the probes and healthchecks use it"
                ),
            );
        }
        let ws_routes = routes_in(&rust_files(&root.join("bins/ws-gateway/src")));
        p.check(
            !ws_routes.is_empty(),
            "bins/ws-gateway/src",
            "no .route(\"...\") found: cannot check the Ingress paths",
        );
        Code {
            bins: load_binaries(p),
            admin_routes,
            ws_routes,
            dockerfile: Dockerfile::load(&root.join("Dockerfile"), p),
        }
    }
}

// ------------------------------------------------------------------------------------------
// YAML

#[derive(Clone)]
struct Doc {
    /// The file, or the overlay it was rendered from.
    src: String,
    v: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        str_at(&self.v, &["kind"]).unwrap_or_default()
    }

    fn name(&self) -> &str {
        str_at(&self.v, &["metadata", "name"]).unwrap_or_default()
    }

    fn at(&self) -> String {
        format!("{}: {}/{}", self.src, self.kind(), self.name())
    }
}

fn parse_yaml(text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for de in serde_yaml::Deserializer::from_str(text) {
        let mut v = Value::deserialize(de).map_err(|e| e.to_string())?;
        v.apply_merge().map_err(|e| e.to_string())?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

fn load_docs(path: &Path, p: &mut Problems) -> Vec<Doc> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            p.add(rel(path), format!("cannot read: {e}"));
            return Vec::new();
        }
    };
    match parse_yaml(&text) {
        Ok(vs) => vs.into_iter().map(|v| Doc { src: rel(path), v }).collect(),
        Err(e) => {
            p.add(rel(path), format!("not valid YAML: {e}"));
            Vec::new()
        }
    }
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}

fn seq_at<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    at(v, path)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn int(v: Option<&Value>) -> Option<i64> {
    v.and_then(|v| {
        v.as_i64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
    })
}

fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_mapping)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), scalar(v)?)))
                .collect()
        })
        .unwrap_or_default()
}

fn truthy(s: &str) -> bool {
    matches!(
        s.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on" | "y"
    )
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(dir, &mut |p| {
        if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p.to_path_buf());
        }
    });
    out
}

/// `host:port` of a redis:// or nats:// URL (default port when none is given).
fn host_port(url: &str, default_port: u16) -> Option<(String, u16)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let hostport = authority.rsplit('@').next()?;
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
        _ => (hostport, default_port),
    };
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

// ------------------------------------------------------------------------------------------
// Dockerfile

#[derive(Default)]
struct Stage {
    name: String,
    from: String,
    args: BTreeMap<String, String>,
    expose: BTreeSet<u16>,
    healthcheck: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    copies: Vec<String>,
    runs: Vec<String>,
    user: Option<String>,
}

#[derive(Default)]
struct Dockerfile {
    stages: Vec<Stage>,
}

impl Dockerfile {
    fn load(path: &Path, p: &mut Problems) -> Dockerfile {
        let Ok(text) = std::fs::read_to_string(path) else {
            p.add(rel(path), "missing");
            return Dockerfile::default();
        };
        // Join continuation lines, drop comments.
        let mut lines = Vec::new();
        let mut cur = String::new();
        for line in text.lines() {
            let t = line.trim();
            if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
                continue;
            }
            if let Some(body) = t.strip_suffix('\\') {
                cur.push_str(body);
                cur.push(' ');
            } else {
                cur.push_str(t);
                lines.push(std::mem::take(&mut cur));
            }
        }
        let mut stages: Vec<Stage> = Vec::new();
        for line in lines {
            let (instr, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
            let rest = rest.trim();
            let instr = instr.to_ascii_uppercase();
            if instr == "FROM" {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let name = match words.as_slice() {
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => (*name).to_owned(),
                    _ => String::new(),
                };
                stages.push(Stage {
                    name,
                    from: words.first().copied().unwrap_or_default().to_owned(),
                    ..Stage::default()
                });
                continue;
            }
            let Some(stage) = stages.last_mut() else {
                continue; // global ARGs before the first FROM
            };
            match instr.as_str() {
                "ARG" => {
                    let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
                    stage
                        .args
                        .insert(k.trim().to_owned(), v.trim().trim_matches('"').to_owned());
                }
                "EXPOSE" => {
                    for port in rest.split_whitespace() {
                        match port.split('/').next().unwrap_or_default().parse() {
                            Ok(n) => {
                                stage.expose.insert(n);
                            }
                            Err(_) => p.add(
                                format!("Dockerfile: stage {}", stage.name),
                                format!("EXPOSE {port} is not a port number"),
                            ),
                        }
                    }
                }
                "HEALTHCHECK" => {
                    stage.healthcheck = rest
                        .find("CMD")
                        .and_then(|i| serde_json::from_str(rest[i + 3..].trim()).ok());
                    if stage.healthcheck.is_none() && !rest.eq_ignore_ascii_case("NONE") {
                        p.add(
                            format!("Dockerfile: stage {}", stage.name),
                            "HEALTHCHECK must be exec form: CMD [\"...\"] (there is no shell)",
                        );
                    }
                }
                "ENTRYPOINT" => stage.entrypoint = serde_json::from_str(rest).ok(),
                "COPY" => stage.copies.push(rest.to_owned()),
                "RUN" => stage.runs.push(rest.to_owned()),
                "USER" => stage.user = Some(rest.to_owned()),
                _ => {}
            }
        }
        Dockerfile { stages }
    }

    fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The stage and the stages it is built FROM, nearest first.
    fn chain(&self, name: &str) -> Vec<&Stage> {
        let mut out = Vec::new();
        let mut cur = self.stage(name);
        while let Some(s) = cur {
            if out.iter().any(|o: &&Stage| o.name == s.name) {
                break;
            }
            out.push(s);
            cur = self.stage(&s.from);
        }
        out
    }
}

fn check_dockerfile(code: &Code, p: &mut Problems) {
    let df = &code.dockerfile;
    let root = root();
    // Every binary is built and copied out by the builder.
    let bins_arg = df
        .stages
        .iter()
        .find_map(|s| s.args.get("FLEET_BINS").map(|v| (s, v)));
    match bins_arg {
        None => p.add(
            "Dockerfile",
            "no ARG FLEET_BINS (the list of binaries the builder builds)",
        ),
        Some((stage, list)) => {
            let listed: BTreeSet<&str> = list.split_whitespace().collect();
            for b in BINS.iter().copied().chain([CLI]) {
                p.check(
                    listed.contains(b),
                    format!("Dockerfile: stage {}: ARG FLEET_BINS", stage.name),
                    format!("does not list {b}"),
                );
            }
            p.check(
                stage.runs.iter().any(|r| r.contains(HEALTHCHECK_SOURCE)),
                format!("Dockerfile: stage {}", stage.name),
                format!("does not build {HEALTHCHECK_SOURCE} (the images' HEALTHCHECK)"),
            );
        }
    }
    p.check(
        root.join(HEALTHCHECK_SOURCE).is_file(),
        HEALTHCHECK_SOURCE,
        "missing",
    );

    for b in BINS.iter().copied().chain([CLI]) {
        let at = format!("Dockerfile: stage {b}");
        let Some(stage) = df.stage(b) else {
            p.add("Dockerfile", format!("no stage (target) named {b}"));
            continue;
        };
        let exe = format!("/usr/local/bin/{b}");
        p.check(
            stage.entrypoint.as_deref() == Some(std::slice::from_ref(&exe)),
            &at,
            format!(
                "ENTRYPOINT must be [\"{exe}\"], found {:?}",
                stage.entrypoint
            ),
        );
        p.check(
            stage
                .copies
                .iter()
                .any(|c| c.contains("--from=builder") && c.contains(&format!("/out/{b} "))),
            &at,
            format!("no COPY --from=builder /out/{b}"),
        );
        let chain = df.chain(b);
        let runtime: Vec<&&Stage> = chain.iter().take_while(|s| s.name != "builder").collect();
        for s in &runtime {
            p.check(
                s.runs.is_empty(),
                format!("Dockerfile: stage {}", s.name),
                format!("RUN in a runtime stage of {b}: the runtime image has no shell"),
            );
        }
        match runtime.iter().find_map(|s| s.user.as_deref()) {
            Some(u) => p.check(
                !matches!(u.split(':').next(), Some("root" | "0")),
                &at,
                format!("USER {u} is root"),
            ),
            None => p.add(&at, "no USER: the image would run as root"),
        }
        if b == CLI {
            continue;
        }
        let Some(bin) = code.bins.get(b) else {
            continue;
        };
        let listen = match bin.listen(|_| None) {
            Ok(l) => l,
            Err(e) => {
                p.add(format!("{b} --help"), e);
                continue;
            }
        };
        let ports: BTreeSet<u16> = listen.values().copied().collect();
        p.check(
            stage.expose == ports,
            &at,
            format!(
                "EXPOSE {:?} differs from the ports {b} listens on by default ({})",
                stage.expose,
                Binary::describe_listen(&listen)
            ),
        );
        let Some(var) = bin.health_var() else {
            p.add(
                format!("{b} --help"),
                "no FLEET_ADMIN_ADDR nor FLEET_HTTP_ADDR",
            );
            continue;
        };
        let expected = vec![
            HEALTHCHECK_BIN.to_owned(),
            var.to_owned(),
            listen[var].to_string(),
            READINESS.to_owned(),
        ];
        p.check(
            stage.healthcheck.as_ref() == Some(&expected),
            &at,
            format!(
                "HEALTHCHECK CMD must be {expected:?} (the health route on the port {b} \
                 serves it on), found {:?}",
                stage.healthcheck
            ),
        );
    }
}

// ------------------------------------------------------------------------------------------
// Kubernetes

/// A set of manifests checked together: the base, the base with one component, or one
/// rendered overlay.
struct K8sSet {
    label: String,
    docs: Vec<Doc>,
    /// Secrets created out of band are documented by `*.example.yaml` templates.
    secret_templates: Vec<Doc>,
    rendered: bool,
}

struct Pod<'a> {
    doc: &'a Doc,
    labels: BTreeMap<String, String>,
    spec: &'a Value,
}

impl K8sSet {
    fn of_kind<'a>(&'a self, kind: &str) -> impl Iterator<Item = &'a Doc> + use<'a> {
        let kind = kind.to_owned();
        self.docs.iter().filter(move |d| d.kind() == kind)
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Doc> {
        self.of_kind(kind).find(|d| d.name() == name)
    }

    fn pods(&self) -> Vec<Pod<'_>> {
        self.docs
            .iter()
            .filter(|d| matches!(d.kind(), "Deployment" | "StatefulSet" | "DaemonSet"))
            .filter_map(|d| {
                Some(Pod {
                    doc: d,
                    labels: string_map(at(&d.v, &["spec", "template", "metadata", "labels"])),
                    spec: at(&d.v, &["spec", "template", "spec"])?,
                })
            })
            .collect()
    }

    fn secret(&self, name: &str) -> Option<&Doc> {
        self.find("Secret", name)
            .or_else(|| self.secret_templates.iter().find(|d| d.name() == name))
    }
}

fn selector_matches(sel: &Value, labels: &BTreeMap<String, String>) -> bool {
    let ml = string_map(sel.get("matchLabels"));
    let labels_ok = ml.iter().all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = seq_at(sel, &["matchExpressions"]).iter().all(|e| {
        let key = str_at(e, &["key"]).unwrap_or_default();
        let values: Vec<String> = seq_at(e, &["values"]).iter().filter_map(scalar).collect();
        let have = labels.get(key);
        match str_at(e, &["operator"]).unwrap_or_default() {
            "In" => have.is_some_and(|h| values.contains(h)),
            "NotIn" => have.is_none_or(|h| !values.contains(h)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

fn map_selects(sel: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The containerPort a port reference (number or name) means in a pod, if any.
fn resolve_port(spec: &Value, port: &Value) -> Option<u16> {
    let ports = seq_at(spec, &["containers"])
        .iter()
        .flat_map(|c| seq_at(c, &["ports"]));
    match port {
        Value::Number(n) => {
            let n = u16::try_from(n.as_u64()?).ok()?;
            ports
                .clone()
                .any(|p| int(p.get("containerPort")) == Some(i64::from(n)))
                .then_some(n)
        }
        Value::String(name) => ports
            .clone()
            .find(|p| str_at(p, &["name"]) == Some(name))
            .and_then(|p| int(p.get("containerPort")))
            .and_then(|n| u16::try_from(n).ok()),
        _ => None,
    }
}

/// One environment variable a container gets, and where from.
struct EnvVar {
    name: String,
    field: String,
    value: Option<String>,
    from_secret: bool,
}

fn container_env(set: &K8sSet, c: &Value, at_: &str, p: &mut Problems) -> Vec<EnvVar> {
    let mut out = Vec::new();
    for (i, from) in seq_at(c, &["envFrom"]).iter().enumerate() {
        let prefix = str_at(from, &["prefix"]).unwrap_or_default();
        let (kind, r) = if let Some(r) = from.get("configMapRef") {
            ("ConfigMap", r)
        } else if let Some(r) = from.get("secretRef") {
            ("Secret", r)
        } else {
            continue;
        };
        let name = str_at(r, &["name"]).unwrap_or_default();
        let optional = r.get("optional").and_then(Value::as_bool) == Some(true);
        let doc = if kind == "Secret" {
            set.secret(name)
        } else {
            set.find(kind, name)
        };
        let Some(doc) = doc else {
            if !optional {
                p.add(
                    at_,
                    format!("envFrom[{i}]: {kind} {name} is not in the manifests: cannot check its variables"),
                );
            }
            continue;
        };
        for section in ["data", "stringData"] {
            for (k, v) in string_map(doc.v.get(section)) {
                out.push(EnvVar {
                    name: format!("{prefix}{k}"),
                    field: format!("envFrom[{i}] ({kind} {name}, from {})", doc.src),
                    value: (kind == "ConfigMap").then_some(v),
                    from_secret: kind == "Secret",
                });
            }
        }
    }
    for (i, e) in seq_at(c, &["env"]).iter().enumerate() {
        let name = str_at(e, &["name"]).unwrap_or_default().to_owned();
        let field = format!("env[{i}] {name}");
        let mut var = EnvVar {
            name,
            field: field.clone(),
            value: e.get("value").and_then(scalar),
            from_secret: false,
        };
        if let Some(r) = at(e, &["valueFrom", "configMapKeyRef"]) {
            let cm = str_at(r, &["name"]).unwrap_or_default();
            let key = str_at(r, &["key"]).unwrap_or_default();
            let optional = r.get("optional").and_then(Value::as_bool) == Some(true);
            match set.find("ConfigMap", cm) {
                Some(doc) => {
                    var.value = string_map(doc.v.get("data")).get(key).cloned();
                    p.check(
                        var.value.is_some() || optional,
                        at_,
                        format!("{field}: ConfigMap {cm} has no key {key}"),
                    );
                }
                None => p.check(
                    optional,
                    at_,
                    format!("{field}: ConfigMap {cm} is not in the manifests"),
                ),
            }
        }
        if let Some(r) = at(e, &["valueFrom", "secretKeyRef"]) {
            var.from_secret = true;
            let s = str_at(r, &["name"]).unwrap_or_default();
            let key = str_at(r, &["key"]).unwrap_or_default();
            match set.secret(s) {
                Some(doc) => {
                    let keys: BTreeSet<String> = ["data", "stringData"]
                        .iter()
                        .flat_map(|sec| string_map(doc.v.get(*sec)).into_keys())
                        .collect();
                    p.check(
                        keys.contains(key),
                        at_,
                        format!("{field}: Secret {s} ({}) has no key {key}", doc.src),
                    );
                }
                None => p.add(
                    at_,
                    format!(
                        "{field}: Secret {s} is neither in the manifests nor documented by a \
                         *.example.yaml template"
                    ),
                ),
            }
        }
        out.push(var);
    }
    out
}

fn value_of<'a>(vars: &'a [EnvVar], name: &str) -> Option<&'a EnvVar> {
    vars.iter().rev().find(|v| v.name == name)
}

/// What the checks of one set learn about each Fleet Deployment.
struct FleetPod {
    deployment: String,
    bin: &'static str,
    env: Vec<EnvVar>,
    listen: BTreeMap<String, u16>,
}

impl FleetPod {
    fn effective(&self, code: &Code, var: &str) -> Option<String> {
        value_of(&self.env, var)
            .and_then(|v| v.value.clone())
            .or_else(|| code.bins.get(self.bin)?.default(var).map(str::to_owned))
    }
}

fn image_repo(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => image,
    }
}

fn image_follows_convention(image: &str, bin: &str) -> bool {
    let repo = image_repo(image);
    let want = format!("{IMAGE_NAMESPACE}/{bin}");
    repo == want || repo.ends_with(&format!("/{want}"))
}

fn check_fleet_deployment(
    code: &Code,
    set: &K8sSet,
    doc: &Doc,
    bin: &Binary,
    p: &mut Problems,
) -> Option<FleetPod> {
    let spec = at(&doc.v, &["spec", "template", "spec"])?;
    let c = seq_at(spec, &["containers"])
        .iter()
        .find(|c| str_at(c, &["name"]) == Some(bin.name))?;
    let at_ = format!("{} container {}", doc.at(), bin.name);

    let image = str_at(c, &["image"]).unwrap_or_default();
    // As written, the base names the local image; overlays may put a registry in front.
    let image_ok = if set.rendered {
        image_follows_convention(image, bin.name)
    } else {
        image_repo(image) == format!("{IMAGE_NAMESPACE}/{}", bin.name)
    };
    p.check(
        image_ok,
        &at_,
        format!(
            "image {image:?} does not follow the Dockerfile's convention \
             [registry/]{IMAGE_NAMESPACE}/{}[:tag] (target {})",
            bin.name, bin.name
        ),
    );

    let env = container_env(set, c, &at_, p);
    for v in &env {
        p.check(
            bin.reads(&v.name),
            &at_,
            format!(
                "{} sets {}, which {} does not read (its --help lists {}; besides RUST_LOG and \
                 the OTEL_* variables of LIBRARY_ENV)",
                v.field,
                v.name,
                bin.name,
                bin.env_list(),
            ),
        );
        if v.name == "FLEET_DEV" && v.value.as_deref().is_some_and(truthy) {
            p.add(
                &at_,
                format!(
                    "{}: FLEET_DEV=true signs tokens with a public secret",
                    v.field
                ),
            );
        }
    }
    if bin.env.contains_key("FLEET_SECRET") {
        p.check(
            value_of(&env, "FLEET_SECRET").is_some_and(|v| v.from_secret),
            &at_,
            format!(
                "FLEET_SECRET must come from a Secret (secretKeyRef): {} refuses to start without it",
                bin.name
            ),
        );
    }

    let lookup = |var: &str| value_of(&env, var).and_then(|v| v.value.clone());
    let listen = match bin.listen(lookup) {
        Ok(l) => l,
        Err(e) => {
            p.add(&at_, e);
            return None;
        }
    };
    let pod = FleetPod {
        deployment: doc.name().to_owned(),
        bin: bin.name,
        env,
        listen,
    };
    let listen_desc = Binary::describe_listen(&pod.listen);
    let declared: Vec<(Option<&str>, i64)> = seq_at(c, &["ports"])
        .iter()
        .map(|port| {
            (
                str_at(port, &["name"]),
                int(port.get("containerPort")).unwrap_or(-1),
            )
        })
        .collect();
    for (i, (name, n)) in declared.iter().enumerate() {
        p.check(
            pod.listen.values().any(|l| i64::from(*l) == *n),
            &at_,
            format!(
                "ports[{i}] ({}) containerPort {n}: {} listens on no such port ({listen_desc})",
                name.unwrap_or("unnamed"),
                bin.name
            ),
        );
    }
    for (var, port) in &pod.listen {
        p.check(
            declared.iter().any(|(_, n)| *n == i64::from(*port)),
            &at_,
            format!(
                "ports: no containerPort {port}, where {var} makes {} listen",
                bin.name
            ),
        );
    }

    let health_port = bin.health_var().and_then(|v| pod.listen.get(v)).copied();
    for (probe, path) in [("livenessProbe", LIVENESS), ("readinessProbe", READINESS)] {
        let Some(get) = at(c, &[probe, "httpGet"]) else {
            p.add(
                &at_,
                format!("{probe}: missing (httpGet {path} on the admin port)"),
            );
            continue;
        };
        let got = str_at(get, &["path"]).unwrap_or_default();
        p.check(
            got == path && code.admin_routes.contains(got),
            &at_,
            format!(
                "{probe}.httpGet.path {got:?}: must be {path} (admin routes: {:?})",
                code.admin_routes
            ),
        );
        let port = get.get("port").and_then(|v| resolve_port(spec, v));
        p.check(
            port.is_some() && port == health_port,
            &at_,
            format!(
                "{probe}.httpGet.port {:?} is port {port:?}, but {} serves {path} on {health_port:?} ({listen_desc})",
                get.get("port").and_then(scalar),
                bin.name
            ),
        );
    }

    let grace: i64 = pod
        .effective(code, "FLEET_SHUTDOWN_GRACE_SECS")
        .and_then(|g| g.parse().ok())
        .unwrap_or(0);
    let pre_stop = int(at(c, &["lifecycle", "preStop", "sleep", "seconds"])).unwrap_or(0);
    match int(spec.get("terminationGracePeriodSeconds")) {
        Some(t) => p.check(
            t > grace + pre_stop,
            &at_,
            format!(
                "terminationGracePeriodSeconds {t} must exceed preStop sleep {pre_stop} + \
                 FLEET_SHUTDOWN_GRACE_SECS {grace}, or the kubelet kills work in hand"
            ),
        ),
        None => p.add(
            &at_,
            format!("terminationGracePeriodSeconds unset (must exceed FLEET_SHUTDOWN_GRACE_SECS {grace})"),
        ),
    }

    let non_root = [c, spec].iter().any(|v| {
        at(v, &["securityContext", "runAsNonRoot"]).and_then(Value::as_bool) == Some(true)
    });
    p.check(non_root, &at_, "securityContext.runAsNonRoot is not true");
    p.check(
        at(c, &["securityContext", "readOnlyRootFilesystem"]).and_then(Value::as_bool)
            == Some(true),
        &at_,
        "securityContext.readOnlyRootFilesystem is not true",
    );
    p.check(
        at(c, &["securityContext", "allowPrivilegeEscalation"]).and_then(Value::as_bool)
            == Some(false),
        &at_,
        "securityContext.allowPrivilegeEscalation is not false",
    );
    p.check(
        seq_at(c, &["securityContext", "capabilities", "drop"])
            .iter()
            .any(|d| d.as_str() == Some("ALL")),
        &at_,
        "securityContext.capabilities.drop does not contain ALL",
    );
    for r in [
        ["requests", "cpu"],
        ["requests", "memory"],
        ["limits", "memory"],
    ] {
        p.check(
            at(c, &["resources", r[0], r[1]]).is_some(),
            &at_,
            format!("resources.{}.{} unset", r[0], r[1]),
        );
    }

    if let Some(file) = pod.effective(code, "FLEET_AGENTS_FILE") {
        let mounted = seq_at(c, &["volumeMounts"]).iter().any(|m| {
            let mp = str_at(m, &["mountPath"]).unwrap_or("\0");
            file == mp || file.starts_with(&format!("{}/", mp.trim_end_matches('/')))
        });
        p.check(
            mounted,
            &at_,
            format!("FLEET_AGENTS_FILE={file} is under no volumeMount"),
        );
    }
    if bin.name == "exec-worker"
        && pod.effective(code, "FLEET_EXEC_MODE").as_deref() == Some("command")
    {
        p.add(
            &at_,
            "FLEET_EXEC_MODE=command runs `sh -c`, which the fleet/exec-worker image does not have",
        );
    }

    let annotations = string_map(at(&doc.v, &["spec", "template", "metadata", "annotations"]));
    if let Some(port) = annotations.get("prometheus.io/port") {
        p.check(
            health_port.map(|h| h.to_string()).as_ref() == Some(port),
            &at_,
            format!("annotation prometheus.io/port {port} is not the metrics port {health_port:?}"),
        );
    }
    if let Some(path) = annotations.get("prometheus.io/path") {
        p.check(
            code.admin_routes.contains(path),
            &at_,
            format!("annotation prometheus.io/path {path} is not an admin route"),
        );
    }
    Some(pod)
}

/// The Fleet binary a Deployment runs: the one its containers are named after.
fn fleet_bin_of(doc: &Doc) -> Option<&'static str> {
    let names: Vec<&str> = seq_at(&doc.v, &["spec", "template", "spec", "containers"])
        .iter()
        .filter_map(|c| str_at(c, &["name"]))
        .collect();
    BINS.iter().copied().find(|b| names.contains(b))
}

fn check_k8s_set(code: &Code, set: &K8sSet, p: &mut Problems) {
    let label = &set.label;
    let pods = set.pods();

    // One Deployment per binary.
    let mut fleet: BTreeMap<&'static str, Vec<&Doc>> = BTreeMap::new();
    for d in set.of_kind("Deployment") {
        if let Some(b) = fleet_bin_of(d) {
            fleet.entry(b).or_default().push(d);
        }
    }
    for b in BINS {
        let found = fleet.get(b).map(Vec::as_slice).unwrap_or_default();
        p.check(
            found.len() == 1,
            label,
            format!(
                "{b}: expected exactly one Deployment with a container named {b}, found {} ({})",
                found.len(),
                found.iter().map(|d| d.at()).collect::<Vec<_>>().join(", ")
            ),
        );
    }
    let mut fleet_pods: BTreeMap<&'static str, FleetPod> = BTreeMap::new();
    for (b, docs) in &fleet {
        let Some(bin) = code.bins.get(b) else {
            continue; // reported by load_binaries
        };
        for d in docs {
            if let Some(pod) = check_fleet_deployment(code, set, d, bin, p) {
                fleet_pods.insert(b, pod);
            }
        }
    }

    // The same settings wherever they must agree.
    for var in ["FLEET_PREFIX", "FLEET_FANOUT_SHARDS", "REDIS_URL"] {
        let values: BTreeSet<String> = fleet_pods
            .values()
            .filter_map(|pod| pod.effective(code, var))
            .collect();
        p.check(
            values.len() <= 1,
            label,
            format!("{var} differs between Fleet Deployments: {values:?}"),
        );
    }

    check_services(code, set, &pods, &fleet_pods, p);
    check_network_policies(set, &pods, &fleet_pods, p);
    check_autoscaling(code, set, &fleet_pods, p);

    // Every Fleet Deployment has a PodDisruptionBudget.
    for (b, pod) in &fleet_pods {
        let labels = pods
            .iter()
            .find(|x| x.doc.kind() == "Deployment" && x.doc.name() == pod.deployment)
            .map(|x| x.labels.clone())
            .unwrap_or_default();
        let covered = set.of_kind("PodDisruptionBudget").any(|pdb| {
            at(&pdb.v, &["spec", "selector"]).is_some_and(|s| selector_matches(s, &labels))
        });
        p.check(
            covered,
            label,
            format!("{b}: no PodDisruptionBudget selects its pods"),
        );
    }
    for pdb in set.of_kind("PodDisruptionBudget") {
        let sel = at(&pdb.v, &["spec", "selector"]);
        p.check(
            sel.is_some_and(|s| pods.iter().any(|x| selector_matches(s, &x.labels))),
            pdb.at(),
            "spec.selector selects no pods",
        );
    }

    // The agents the fleet loads have an executor for their pool (rendered: the generated
    // ConfigMap holds the file).
    if let Some(ew) = fleet_pods.get("exec-worker") {
        let pool = ew.effective(code, "FLEET_POOL").unwrap_or_default();
        for cm in set.of_kind("ConfigMap") {
            for (key, text) in string_map(cm.v.get("data")) {
                if !text.contains("[[agents]]") {
                    continue;
                }
                let dir = std::env::temp_dir().join(format!("fleet-deploy-{}", std::process::id()));
                std::fs::create_dir_all(&dir).expect("temp dir");
                let path = dir.join(&key);
                std::fs::write(&path, &text).expect("write agents file");
                match AgentsFile::load(&path) {
                    Ok(f) => {
                        for a in f.agents {
                            p.check(
                                a.pool == pool,
                                cm.at(),
                                format!(
                                    "data.{key}: agent {} uses pool {:?}, but the exec-worker \
                                     Deployment serves FLEET_POOL={pool:?}",
                                    a.id, a.pool
                                ),
                            );
                        }
                    }
                    Err(e) => p.add(cm.at(), format!("data.{key} does not load: {e}")),
                }
            }
        }
    }
}

fn check_services(
    code: &Code,
    set: &K8sSet,
    pods: &[Pod<'_>],
    fleet_pods: &BTreeMap<&'static str, FleetPod>,
    p: &mut Problems,
) {
    let pod_of = |name: &str| {
        pods.iter()
            .find(|x| x.doc.kind() == "Deployment" && x.doc.name() == name)
    };
    // Service -> (selected pods, port name -> target port number)
    let mut service_ports: BTreeMap<String, BTreeMap<String, u16>> = BTreeMap::new();
    for svc in set.of_kind("Service") {
        let sel = string_map(at(&svc.v, &["spec", "selector"]));
        let selected: Vec<&Pod<'_>> = pods
            .iter()
            .filter(|x| map_selects(&sel, &x.labels))
            .collect();
        if selected.is_empty() {
            p.add(svc.at(), format!("spec.selector {sel:?} selects no pods"));
            continue;
        }
        let mut ports = BTreeMap::new();
        for (i, port) in seq_at(&svc.v, &["spec", "ports"]).iter().enumerate() {
            let target = port.get("targetPort").or_else(|| port.get("port"));
            let resolved: Vec<Option<u16>> = selected
                .iter()
                .map(|x| target.and_then(|t| resolve_port(x.spec, t)))
                .collect();
            p.check(
                resolved.iter().all(Option::is_some),
                svc.at(),
                format!(
                    "spec.ports[{i}].targetPort {:?} is not a containerPort of {}",
                    target.and_then(scalar),
                    selected
                        .iter()
                        .map(|x| x.doc.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            if let Some(Some(n)) = resolved.first() {
                let key = str_at(port, &["name"]).map(str::to_owned);
                let num = int(port.get("port")).map(|n| n.to_string());
                for k in key.into_iter().chain(num) {
                    ports.insert(k, *n);
                }
            }
        }
        service_ports.insert(svc.name().to_owned(), ports);
    }

    // The front doors' ports are reachable through a Service; edge-api stays private.
    for b in SERVED {
        let Some(pod) = fleet_pods.get(b) else {
            continue;
        };
        let Some(x) = pod_of(&pod.deployment) else {
            continue;
        };
        let health = code.bins[b].health_var();
        let svcs: Vec<&Doc> = set
            .of_kind("Service")
            .filter(|s| map_selects(&string_map(at(&s.v, &["spec", "selector"])), &x.labels))
            .collect();
        for (var, port) in &pod.listen {
            if Some(var.as_str()) == health && var == "FLEET_ADMIN_ADDR" {
                continue;
            }
            let exposed = svcs.iter().any(|s| {
                service_ports
                    .get(s.name())
                    .is_some_and(|m| m.values().any(|n| n == port))
            });
            p.check(
                exposed,
                &set.label,
                format!("{b}: no Service exposes port {port} ({var})"),
            );
        }
        if *b == "edge-api" {
            for s in &svcs {
                let ty = str_at(&s.v, &["spec", "type"]).unwrap_or("ClusterIP");
                p.check(
                    ty == "ClusterIP",
                    s.at(),
                    format!("spec.type {ty}: edge-api is a private ClusterIP service (the seed's decision)"),
                );
            }
        }
    }

    // Ingresses route to real Services and ports; never to edge-api.
    let edge_services: BTreeSet<&str> = fleet_pods
        .get("edge-api")
        .and_then(|pod| pod_of(&pod.deployment))
        .map(|x| {
            set.of_kind("Service")
                .filter(|s| map_selects(&string_map(at(&s.v, &["spec", "selector"])), &x.labels))
                .map(Doc::name)
                .collect()
        })
        .unwrap_or_default();
    let gw_services: BTreeSet<&str> = fleet_pods
        .get("ws-gateway")
        .and_then(|pod| pod_of(&pod.deployment))
        .map(|x| {
            set.of_kind("Service")
                .filter(|s| map_selects(&string_map(at(&s.v, &["spec", "selector"])), &x.labels))
                .map(Doc::name)
                .collect()
        })
        .unwrap_or_default();
    let mut gateway_hosts = BTreeSet::new();
    for ing in set.of_kind("Ingress") {
        let tls_hosts: BTreeSet<String> = seq_at(&ing.v, &["spec", "tls"])
            .iter()
            .flat_map(|t| seq_at(t, &["hosts"]).iter().filter_map(scalar))
            .collect();
        for (r, rule) in seq_at(&ing.v, &["spec", "rules"]).iter().enumerate() {
            let host = str_at(rule, &["host"]).unwrap_or_default();
            for (i, path) in seq_at(rule, &["http", "paths"]).iter().enumerate() {
                let field = format!("spec.rules[{r}].http.paths[{i}]");
                let svc = str_at(path, &["backend", "service", "name"]).unwrap_or_default();
                let port = at(path, &["backend", "service", "port"])
                    .and_then(|p| p.get("name").or_else(|| p.get("number")))
                    .and_then(scalar)
                    .unwrap_or_default();
                match service_ports.get(svc) {
                    None => p.add(
                        ing.at(),
                        format!("{field}: backend Service {svc:?} not found"),
                    ),
                    Some(ports) => p.check(
                        ports.contains_key(&port),
                        ing.at(),
                        format!("{field}: Service {svc} has no port {port:?}"),
                    ),
                }
                p.check(
                    !edge_services.contains(svc),
                    ing.at(),
                    format!("{field}: routes to edge-api, which must stay private (ClusterIP, reached by the Gateway)"),
                );
                if gw_services.contains(svc) {
                    gateway_hosts.insert((host.to_owned(), tls_hosts.contains(host)));
                    let prefix = str_at(path, &["path"]).unwrap_or("/");
                    p.check(
                        code.ws_routes.iter().any(|r| r.starts_with(prefix)),
                        ing.at(),
                        format!(
                            "{field}.path {prefix:?} matches no ws-gateway route ({:?})",
                            code.ws_routes
                        ),
                    );
                    let ann = string_map(at(&ing.v, &["metadata", "annotations"]));
                    for a in ["proxy-read-timeout", "proxy-send-timeout"] {
                        let key = format!("nginx.ingress.kubernetes.io/{a}");
                        let secs: i64 = ann.get(&key).and_then(|v| v.parse().ok()).unwrap_or(0);
                        p.check(
                            secs >= 3600,
                            ing.at(),
                            format!("metadata.annotations.{key} must be >= 3600 for long-lived WebSockets and SSE (is {secs})"),
                        );
                    }
                }
            }
        }
    }
    // edge-api hands clients the gateway's public URL: the Ingress host.
    if let Some(edge) = fleet_pods.get("edge-api")
        && let Some(url) = edge.effective(code, "FLEET_PUBLIC_WS_URL")
        && !gateway_hosts.is_empty()
    {
        let (scheme, rest) = url.split_once("://").unwrap_or(("", &url));
        let host = rest.split(['/', ':']).next().unwrap_or_default();
        let matched = gateway_hosts
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, tls)| if *tls { "wss" } else { "ws" });
        p.check(
            matched == Some(scheme),
            &set.label,
            format!(
                "edge-api FLEET_PUBLIC_WS_URL={url} does not match the ws-gateway Ingress \
                 (hosts, with TLS: {gateway_hosts:?})"
            ),
        );
    }
}

fn check_network_policies(
    set: &K8sSet,
    pods: &[Pod<'_>],
    fleet_pods: &BTreeMap<&'static str, FleetPod>,
    p: &mut Problems,
) {
    let policies: Vec<&Doc> = set.of_kind("NetworkPolicy").collect();
    if policies.is_empty() {
        p.add(&set.label, "no NetworkPolicy");
        return;
    }
    p.check(
        policies.iter().any(|np| {
            at(&np.v, &["spec", "podSelector"])
                .is_some_and(|s| s.as_mapping().is_none_or(|m| m.is_empty()))
                && seq_at(&np.v, &["spec", "ingress"]).is_empty()
                && seq_at(&np.v, &["spec", "policyTypes"])
                    .iter()
                    .any(|t| t.as_str() == Some("Ingress"))
        }),
        &set.label,
        "no default-deny ingress NetworkPolicy (podSelector {} and no ingress rule)",
    );
    for np in &policies {
        let Some(sel) = at(&np.v, &["spec", "podSelector"]) else {
            p.add(np.at(), "spec.podSelector missing");
            continue;
        };
        let selected: Vec<&Pod<'_>> = pods
            .iter()
            .filter(|x| selector_matches(sel, &x.labels))
            .collect();
        if selected.is_empty() {
            p.add(np.at(), "spec.podSelector selects no pods");
            continue;
        }
        for (r, rule) in seq_at(&np.v, &["spec", "ingress"]).iter().enumerate() {
            for (i, port) in seq_at(rule, &["ports"]).iter().enumerate() {
                let Some(pv) = port.get("port") else { continue };
                for x in &selected {
                    p.check(
                        resolve_port(x.spec, pv).is_some(),
                        np.at(),
                        format!(
                            "spec.ingress[{r}].ports[{i}].port {:?} is not a containerPort of {}",
                            scalar(pv),
                            x.doc.name()
                        ),
                    );
                }
            }
        }
    }
    // edge-api: only from the Gateway's namespace(s), never from anywhere.
    if let Some(edge) = fleet_pods.get("edge-api")
        && let Some(x) = pods
            .iter()
            .find(|x| x.doc.kind() == "Deployment" && x.doc.name() == edge.deployment)
    {
        let mine: Vec<&&Doc> = policies
            .iter()
            .filter(|np| {
                at(&np.v, &["spec", "podSelector"]).is_some_and(|s| {
                    s.as_mapping().is_some_and(|m| !m.is_empty()) && selector_matches(s, &x.labels)
                })
            })
            .collect();
        let from_gateway = mine.iter().any(|np| {
            seq_at(&np.v, &["spec", "ingress"]).iter().any(|rule| {
                seq_at(rule, &["from"]).iter().any(|f| {
                    string_map(at(f, &["namespaceSelector", "matchLabels"]))
                        .get("fleet.io/gateway")
                        .is_some_and(|v| v == "true")
                })
            })
        });
        p.check(
            from_gateway,
            &set.label,
            "edge-api: no NetworkPolicy lets in the Gateway's namespace (namespaceSelector fleet.io/gateway: \"true\")",
        );
        for np in &mine {
            for (r, rule) in seq_at(&np.v, &["spec", "ingress"]).iter().enumerate() {
                p.check(
                    !seq_at(rule, &["from"]).is_empty(),
                    np.at(),
                    format!("spec.ingress[{r}] has no `from`: it opens edge-api to every pod"),
                );
            }
        }
    }
}

fn expected_stream(code: &Code, bin: &str, pod: &FleetPod) -> Option<(String, &'static str)> {
    let prefix = pod.effective(code, "FLEET_PREFIX")?;
    let k = Keys::new(&prefix);
    match bin {
        "dispatcher" => Some((k.tasks(), keys::GROUP_DISPATCHERS)),
        "callback-worker" => Some((k.callbacks(), keys::GROUP_CALLBACK_WORKERS)),
        "exec-worker" => Some((
            k.exec(&pod.effective(code, "FLEET_POOL")?),
            keys::GROUP_EXECUTORS,
        )),
        _ => None,
    }
}

fn check_autoscaling(
    code: &Code,
    set: &K8sSet,
    fleet_pods: &BTreeMap<&'static str, FleetPod>,
    p: &mut Problems,
) {
    let by_deployment: BTreeMap<&str, &FleetPod> = fleet_pods
        .values()
        .map(|pod| (pod.deployment.as_str(), pod))
        .collect();
    let scaled: Vec<&Doc> = set.of_kind("ScaledObject").collect();
    let hpas: Vec<&Doc> = set.of_kind("HorizontalPodAutoscaler").collect();
    let mut targets: BTreeMap<String, Vec<String>> = BTreeMap::new();

    for so in &scaled {
        let target = str_at(&so.v, &["spec", "scaleTargetRef", "name"]).unwrap_or_default();
        let kind = str_at(&so.v, &["spec", "scaleTargetRef", "kind"]).unwrap_or("Deployment");
        targets.entry(target.to_owned()).or_default().push(so.at());
        let Some(pod) = by_deployment.get(target).filter(|_| kind == "Deployment") else {
            p.add(
                so.at(),
                format!("spec.scaleTargetRef {kind}/{target} is not a Fleet Deployment"),
            );
            continue;
        };
        let Some((stream, group)) = expected_stream(code, pod.bin, pod) else {
            p.add(
                so.at(),
                format!("{} is not scaled on a stream's lag", pod.bin),
            );
            continue;
        };
        let triggers = seq_at(&so.v, &["spec", "triggers"]);
        let redis: Vec<(usize, &Value)> = triggers
            .iter()
            .enumerate()
            .filter(|(_, t)| str_at(t, &["type"]) == Some("redis-streams"))
            .collect();
        if redis.is_empty() {
            p.add(so.at(), "spec.triggers: no redis-streams trigger");
        }
        for (i, t) in redis {
            let m = string_map(t.get("metadata"));
            let f = format!("spec.triggers[{i}].metadata");
            p.check(
                m.get("stream") == Some(&stream),
                so.at(),
                format!(
                    "{f}.stream {:?} is not the stream {} reads: {stream:?} (FLEET_PREFIX and \
                     fleet::keys)",
                    m.get("stream"),
                    pod.bin
                ),
            );
            p.check(
                m.get("consumerGroup").map(String::as_str) == Some(group),
                so.at(),
                format!(
                    "{f}.consumerGroup {:?} is not {}'s group {group:?} (fleet::keys)",
                    m.get("consumerGroup"),
                    pod.bin
                ),
            );
            p.check(
                m.get("lagCount")
                    .and_then(|l| l.parse::<u64>().ok())
                    .is_some_and(|l| l > 0),
                so.at(),
                format!(
                    "{f}.lagCount must be a positive number (scale on the group's lag), is {:?}",
                    m.get("lagCount")
                ),
            );
            let redis_url = pod.effective(code, "REDIS_URL").unwrap_or_default();
            let want = host_port(&redis_url, 6379);
            if let Some(addr) = m.get("address") {
                let got = addr
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)));
                p.check(
                    got.is_some() && got == want,
                    so.at(),
                    format!(
                        "{f}.address {addr:?} is not the host:port of REDIS_URL={redis_url} that \
                         {} uses",
                        pod.bin
                    ),
                );
            } else if let Some(var) = m.get("addressFromEnv") {
                p.check(
                    value_of(&pod.env, var).is_some(),
                    so.at(),
                    format!(
                        "{f}.addressFromEnv {var}: the {} container has no such variable",
                        pod.bin
                    ),
                );
            } else if !m.contains_key("host") {
                p.add(so.at(), format!("{f}: no address, addressFromEnv or host"));
            }
        }
    }
    for h in &hpas {
        let target = str_at(&h.v, &["spec", "scaleTargetRef", "name"]).unwrap_or_default();
        targets.entry(target.to_owned()).or_default().push(h.at());
        p.check(
            by_deployment.contains_key(target),
            h.at(),
            format!("spec.scaleTargetRef {target} is not a Fleet Deployment"),
        );
    }
    for (target, by) in &targets {
        p.check(
            by.len() == 1,
            &set.label,
            format!(
                "Deployment {target} has {} autoscalers: {}",
                by.len(),
                by.join(", ")
            ),
        );
        if let Some(d) = set.find("Deployment", target) {
            p.check(
                d.v.get("spec").and_then(|s| s.get("replicas")).is_none(),
                d.at(),
                "spec.replicas is set on an autoscaled Deployment: every apply would reset the autoscaler's count",
            );
        }
    }
    if !scaled.is_empty() || !hpas.is_empty() {
        for b in SCALED {
            if let Some(pod) = fleet_pods.get(b) {
                p.check(
                    targets.contains_key(&pod.deployment),
                    &set.label,
                    format!("{b}: not autoscaled, although this set has autoscalers"),
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Kustomize

fn kustomization_in(dir: &Path) -> Option<PathBuf> {
    ["kustomization.yaml", "kustomization.yml", "Kustomization"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
}

/// The resource documents of a kustomization as written (resources and components; patches
/// are applied only by rendering).
fn raw_resources(dir: &Path, p: &mut Problems, seen: &mut BTreeSet<PathBuf>) -> Vec<Doc> {
    let Some(k) = kustomization_in(dir) else {
        p.add(rel(dir), "no kustomization.yaml");
        return Vec::new();
    };
    let Some(kdoc) = load_docs(&k, p).into_iter().next() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for field in ["resources", "components"] {
        for r in seq_at(&kdoc.v, &[field]).iter().filter_map(Value::as_str) {
            let path = dir.join(r);
            let Ok(path) = path.canonicalize() else {
                p.add(rel(&k), format!("{field}: {r} does not exist"));
                continue;
            };
            if !seen.insert(path.clone()) {
                continue;
            }
            if path.is_dir() {
                out.extend(raw_resources(&path, p, seen));
            } else {
                out.extend(load_docs(&path, p));
            }
        }
    }
    out
}

/// Every file a kustomization under deploy/k8s refers to.
fn referenced_files(k8s: &Path, p: &mut Problems) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    walk(k8s, &mut |f| {
        if f.file_name().is_some_and(|n| n == "kustomization.yaml") {
            out.insert(f.canonicalize().unwrap_or_else(|_| f.to_path_buf()));
            let dir = f.parent().expect("parent");
            for d in load_docs(f, p) {
                let mut refs: Vec<&str> = Vec::new();
                for field in ["resources", "components", "patchesStrategicMerge"] {
                    refs.extend(seq_at(&d.v, &[field]).iter().filter_map(Value::as_str));
                }
                refs.extend(
                    seq_at(&d.v, &["patches"])
                        .iter()
                        .filter_map(|x| str_at(x, &["path"])),
                );
                for g in ["configMapGenerator", "secretGenerator"] {
                    for gen_ in seq_at(&d.v, &[g]) {
                        for fld in ["files", "envs"] {
                            refs.extend(seq_at(gen_, &[fld]).iter().filter_map(|x| {
                                x.as_str().map(|s| s.rsplit('=').next().unwrap_or(s))
                            }));
                        }
                    }
                }
                for r in refs {
                    if let Ok(path) = dir.join(r).canonicalize() {
                        out.insert(path);
                    }
                }
            }
        }
    });
    out
}

/// `to` relative to the directory `from` (kustomize refuses absolute resource paths).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from = from.canonicalize().unwrap_or_else(|_| from.to_path_buf());
    let to = to.canonicalize().unwrap_or_else(|_| to.to_path_buf());
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::new();
    for _ in from.components().skip(common) {
        out.push("..");
    }
    for c in to.components().skip(common) {
        out.push(c);
    }
    out
}

fn kubectl_available() -> bool {
    Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
}

// ------------------------------------------------------------------------------------------
// Compose

/// Compose's variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err},
/// ${VAR?err}, $VAR and $$.
fn interpolate(s: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {s:?}"))?;
            let expr = &r[..end];
            rest = &r[end + 1..];
            let name_end = expr
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(expr.len());
            let (name, op) = expr.split_at(name_end);
            let val = env.get(name);
            let value = if let Some(d) = op.strip_prefix(":-") {
                val.filter(|v| !v.is_empty())
                    .cloned()
                    .unwrap_or_else(|| d.to_owned())
            } else if let Some(d) = op.strip_prefix('-') {
                val.cloned().unwrap_or_else(|| d.to_owned())
            } else if let Some(m) = op.strip_prefix(":?") {
                val.filter(|v| !v.is_empty())
                    .cloned()
                    .ok_or_else(|| format!("{name} is required: {m}"))?
            } else if let Some(m) = op.strip_prefix('?') {
                val.cloned()
                    .ok_or_else(|| format!("{name} is required: {m}"))?
            } else {
                val.cloned().unwrap_or_default()
            };
            out.push_str(&value);
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.push_str(
                env.get(&rest[..end])
                    .map(String::as_str)
                    .unwrap_or_default(),
            );
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Names used in ${...} in a text, with whether they are required (`?`) or have a default.
fn referenced_vars(text: &str) -> BTreeMap<String, bool> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        rest = &rest[i + 2..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = rest[..end].to_owned();
        let op = &rest[end..];
        let required = op.starts_with(":?") || op.starts_with('?') || op.starts_with('}');
        let e = out.entry(name).or_insert(false);
        *e |= required;
    }
    out
}

fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_owned(),
                v.trim().trim_matches('"').trim_matches('\'').to_owned(),
            )
        })
        .collect()
}

fn duration_secs(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    })
}

fn compose_env(
    svc: &Value,
    env: &BTreeMap<String, String>,
    at_: &str,
    p: &mut Problems,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match svc.get("environment") {
        Some(Value::Mapping(m)) => {
            for (k, v) in m {
                let (Some(k), v) = (k.as_str(), scalar(v).unwrap_or_default()) else {
                    continue;
                };
                match interpolate(&v, env) {
                    Ok(v) => {
                        out.insert(k.to_owned(), v);
                    }
                    Err(e) => p.add(at_, format!("environment.{k}: {e} (with .env.example)")),
                }
            }
        }
        Some(Value::Sequence(s)) => {
            for item in s.iter().filter_map(Value::as_str) {
                let (k, v) = item.split_once('=').unwrap_or((item, ""));
                match interpolate(v, env) {
                    Ok(v) => {
                        out.insert(k.to_owned(), v);
                    }
                    Err(e) => p.add(at_, format!("environment {k}: {e}")),
                }
            }
        }
        _ => {}
    }
    out
}

fn check_compose(code: &Code, p: &mut Problems) {
    let root = root();
    let dir = root.join("deploy/compose");
    let file = dir.join("compose.yaml");
    let src = rel(&file);
    let Some(doc) = load_docs(&file, p).into_iter().next() else {
        p.add(&src, "missing or empty");
        return;
    };
    let env_example = dir.join(".env.example");
    let env = match std::fs::read_to_string(&env_example) {
        Ok(t) => parse_env_file(&t),
        Err(_) => {
            p.add(rel(&env_example), "missing");
            BTreeMap::new()
        }
    };
    // .env.example and compose.yaml agree on the variables.
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    let used = referenced_vars(&text);
    for (name, required) in &used {
        p.check(
            !*required || env.contains_key(name),
            &src,
            format!("${{{name}}} is required but .env.example does not set it"),
        );
    }
    for name in env.keys() {
        p.check(
            used.contains_key(name) || name.starts_with("COMPOSE_"),
            rel(&env_example),
            format!("{name} is used nowhere in compose.yaml"),
        );
    }

    let Some(services) = doc.v.get("services").and_then(Value::as_mapping) else {
        p.add(&src, "no services");
        return;
    };
    let services: BTreeMap<String, &Value> = services
        .iter()
        .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v)))
        .collect();
    let service_env: BTreeMap<&str, BTreeMap<String, String>> = services
        .iter()
        .map(|(n, s)| {
            (
                n.as_str(),
                compose_env(s, &env, &format!("{src}: services.{n}"), p),
            )
        })
        .collect();
    let command_of = |name: &str| -> String {
        match services.get(name).and_then(|s| s.get("command")) {
            Some(Value::Sequence(s)) => s.iter().filter_map(scalar).collect::<Vec<_>>().join(" "),
            Some(v) => scalar(v).unwrap_or_default(),
            None => String::new(),
        }
    };

    let exec_pool = service_env
        .get("exec-worker")
        .and_then(|e| e.get("FLEET_POOL").cloned())
        .or_else(|| {
            code.bins
                .get("exec-worker")?
                .default("FLEET_POOL")
                .map(str::to_owned)
        });

    for &b in BINS {
        let matching: Vec<&String> = services
            .iter()
            .filter(|(n, s)| *n == b || str_at(s, &["build", "target"]) == Some(b))
            .map(|(n, _)| n)
            .collect();
        if matching.len() != 1 || matching[0] != b {
            p.add(
                &src,
                format!(
                    "expected exactly one service {b} built from target {b}, found {matching:?}"
                ),
            );
            continue;
        }
        let svc = services[b];
        let at_ = format!("{src}: services.{b}");
        let Some(bin) = code.bins.get(b) else {
            continue;
        };

        // Image and build: the one Dockerfile, target = binary.
        let image =
            interpolate(str_at(svc, &["image"]).unwrap_or_default(), &env).unwrap_or_default();
        p.check(
            image_follows_convention(&image, b),
            &at_,
            format!("image {image:?} is not {IMAGE_NAMESPACE}/{b}[:tag]"),
        );
        let context = str_at(svc, &["build", "context"]).unwrap_or(".");
        let dockerfile = str_at(svc, &["build", "dockerfile"]).unwrap_or("Dockerfile");
        let df = dir.join(context).join(dockerfile).canonicalize().ok();
        p.check(
            df.is_some() && df == root.join("Dockerfile").canonicalize().ok(),
            &at_,
            format!("build.context {context:?} + build.dockerfile {dockerfile:?} is not the repository's Dockerfile"),
        );
        p.check(
            str_at(svc, &["build", "target"]) == Some(b) && code.dockerfile.stage(b).is_some(),
            &at_,
            format!("build.target must be the Dockerfile stage {b}"),
        );

        // Environment.
        let vars = &service_env[b];
        for name in vars.keys() {
            p.check(
                bin.reads(name),
                &at_,
                format!(
                    "environment.{name}: {b} does not read it (its --help lists {}; besides \
                     RUST_LOG and the OTEL_* variables of LIBRARY_ENV)",
                    bin.env_list(),
                ),
            );
        }
        if let Some(v) = vars.get("FLEET_DEV") {
            p.check(
                !truthy(v),
                &at_,
                "environment.FLEET_DEV=true signs tokens with a public secret",
            );
        }
        if bin.env.contains_key("FLEET_SECRET") {
            p.check(
                vars.get("FLEET_SECRET").is_some_and(|s| s.len() >= 16),
                &at_,
                format!(
                    "environment.FLEET_SECRET unset or shorter than 16 bytes: {b} refuses to start"
                ),
            );
        }
        let effective = |var: &str| -> Option<String> {
            vars.get(var)
                .cloned()
                .or_else(|| bin.default(var).map(str::to_owned))
        };
        let listen = match bin.listen(|v| vars.get(v).cloned()) {
            Ok(l) => l,
            Err(e) => {
                p.add(&at_, e);
                continue;
            }
        };
        let listen_desc = Binary::describe_listen(&listen);
        let mut published = BTreeSet::new();
        for (i, port) in seq_at(svc, &["ports"]).iter().enumerate() {
            let target = match port {
                Value::Mapping(_) => int(port.get("target")),
                v => scalar(v)
                    .and_then(|s| interpolate(&s, &env).ok())
                    .and_then(|s| s.rsplit(':').next()?.split('/').next()?.parse().ok()),
            };
            match target.and_then(|t| u16::try_from(t).ok()) {
                Some(t) if listen.values().any(|l| *l == t) => {
                    published.insert(t);
                }
                _ => p.add(
                    &at_,
                    format!(
                        "ports[{i}] {}: the container side is not a port {b} listens on ({listen_desc})",
                        scalar(port).unwrap_or_else(|| format!("{port:?}"))
                    ),
                ),
            }
        }
        if SERVED.contains(&b) {
            for (var, port) in &listen {
                if var == "FLEET_ADMIN_ADDR" {
                    continue;
                }
                p.check(
                    published.contains(port),
                    &at_,
                    format!("ports: {port} ({var}) is not published"),
                );
            }
        }

        // Replicas of the scalable workers.
        if SCALED.contains(&b) {
            let replicas = int(at(svc, &["deploy", "replicas"])).unwrap_or(1);
            p.check(
                replicas >= 2,
                &at_,
                format!("deploy.replicas is {replicas}: run at least two of each scalable worker"),
            );
        }

        // Health: the image's HEALTHCHECK, or an explicit one of the same form.
        if at(svc, &["healthcheck", "disable"]).and_then(Value::as_bool) == Some(true) {
            p.add(
                &at_,
                "healthcheck.disable: the depends_on conditions need it",
            );
        }
        if let Some(test) = at(svc, &["healthcheck", "test"]) {
            let test: Vec<String> = test
                .as_sequence()
                .map(|s| s.iter().filter_map(scalar).collect())
                .unwrap_or_default();
            let var = bin.health_var().unwrap_or_default();
            let want = vec![
                "CMD".to_owned(),
                HEALTHCHECK_BIN.to_owned(),
                var.to_owned(),
                listen.get(var).map(u16::to_string).unwrap_or_default(),
                READINESS.to_owned(),
            ];
            p.check(
                test == want,
                &at_,
                format!("healthcheck.test {test:?} must be {want:?} (no shell in the image)"),
            );
        }

        // Graceful shutdown fits in stop_grace_period (Docker's default is 10 s).
        let grace: f64 = effective("FLEET_SHUTDOWN_GRACE_SECS")
            .and_then(|g| g.parse().ok())
            .unwrap_or(0.0);
        let stop = str_at(svc, &["stop_grace_period"])
            .and_then(duration_secs)
            .unwrap_or(10.0);
        p.check(
            stop > grace,
            &at_,
            format!("stop_grace_period {stop}s must exceed FLEET_SHUTDOWN_GRACE_SECS {grace}s"),
        );

        // Redis (AOF), NATS (JetStream) and the collector are services of this file.
        let depends: BTreeMap<String, Option<String>> = match svc.get("depends_on") {
            Some(Value::Mapping(m)) => m
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        k.as_str()?.to_owned(),
                        str_at(v, &["condition"]).map(str::to_owned),
                    ))
                })
                .collect(),
            Some(Value::Sequence(s)) => s
                .iter()
                .filter_map(|v| Some((v.as_str()?.to_owned(), None)))
                .collect(),
            _ => BTreeMap::new(),
        };
        for d in depends.keys() {
            p.check(
                services.contains_key(d),
                &at_,
                format!("depends_on.{d}: no such service"),
            );
        }
        let need_healthy = |var: &str, default_port: u16, what: &str, p: &mut Problems| {
            let Some(url) = effective(var) else {
                p.add(&at_, format!("environment.{var} unset"));
                return None;
            };
            let host = host_port(&url, default_port).map(|(h, _)| h);
            match host.as_deref().filter(|h| services.contains_key(*h)) {
                Some(h) => {
                    p.check(
                        depends.get(h) == Some(&Some("service_healthy".to_owned())),
                        &at_,
                        format!("depends_on.{h}.condition must be service_healthy ({what})"),
                    );
                    p.check(
                        at(services[h], &["healthcheck", "test"]).is_some(),
                        format!("{src}: services.{h}"),
                        "no healthcheck, but Fleet services wait for it to be healthy",
                    );
                    Some(h.to_owned())
                }
                None => {
                    p.add(
                        &at_,
                        format!("environment.{var}={url}: its host is not a service of this file"),
                    );
                    None
                }
            }
        };
        if let Some(redis) = need_healthy("REDIS_URL", 6379, "Redis", p) {
            let cmd = command_of(&redis);
            p.check(
                cmd.contains("--appendonly yes"),
                format!("{src}: services.{redis}"),
                format!("command {cmd:?} does not turn AOF on (--appendonly yes)"),
            );
        }
        if bin.env.contains_key("NATS_URL")
            && let Some(nats) = need_healthy("NATS_URL", 4222, "NATS", p)
        {
            let cmd = command_of(&nats);
            p.check(
                cmd.split_whitespace()
                    .any(|a| a == "-js" || a == "--jetstream"),
                format!("{src}: services.{nats}"),
                format!("command {cmd:?} does not enable JetStream (-js)"),
            );
        }
        match vars.get("OTEL_EXPORTER_OTLP_ENDPOINT") {
            Some(url) => {
                let host = host_port(url, 4317).map(|(h, _)| h).unwrap_or_default();
                p.check(
                    services.contains_key(&host),
                    &at_,
                    format!("environment.OTEL_EXPORTER_OTLP_ENDPOINT={url}: {host:?} is not a service of this file"),
                );
            }
            None => p.add(
                &at_,
                "environment.OTEL_EXPORTER_OTLP_ENDPOINT unset: traces go nowhere",
            ),
        }

        // Agents file: mounted from a file that loads, at the path the binary reads.
        if matches!(b, "edge-api" | "dispatcher") {
            match vars.get("FLEET_AGENTS_FILE") {
                None => p.add(&at_, "environment.FLEET_AGENTS_FILE unset"),
                Some(path) => {
                    let mount = seq_at(svc, &["volumes"])
                        .iter()
                        .filter_map(Value::as_str)
                        .find_map(|v| {
                            let mut parts = v.split(':');
                            let (host, cont) = (parts.next()?, parts.next()?);
                            (cont == path).then(|| dir.join(host))
                        });
                    match mount {
                        None => p.add(
                            &at_,
                            format!("FLEET_AGENTS_FILE={path} is not a mounted file (volumes)"),
                        ),
                        Some(host) => match AgentsFile::load(&host) {
                            Err(e) => {
                                p.add(&at_, format!("volumes: {} does not load: {e}", rel(&host)))
                            }
                            Ok(f) => {
                                for a in f.agents {
                                    p.check(
                                        Some(&a.pool) == exec_pool.as_ref(),
                                        &at_,
                                        format!(
                                            "agent {} in {} uses pool {:?}, but services.exec-worker serves {exec_pool:?}",
                                            a.id,
                                            rel(&host),
                                            a.pool
                                        ),
                                    );
                                }
                            }
                        },
                    }
                }
            }
        }
        if b == "exec-worker" {
            p.check(
                vars.get("FLEET_EXEC_MODE").map(String::as_str) == Some("echo"),
                &at_,
                "environment.FLEET_EXEC_MODE must be echo (the image has no shell for command mode)",
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// The tests

#[test]
fn every_yaml_under_deploy_parses_and_every_k8s_file_is_used() {
    let mut p = Problems::default();
    let root = root();
    let files = yaml_files(&root.join("deploy"));
    assert!(!files.is_empty(), "no YAML under deploy/");
    for f in &files {
        let docs = load_docs(f, &mut p);
        p.check(!docs.is_empty(), rel(f), "no YAML document in it");
    }
    let k8s = root.join("deploy/k8s");
    let referenced = referenced_files(&k8s, &mut p);
    for f in yaml_files(&k8s) {
        let template = f.to_string_lossy().ends_with(".example.yaml");
        p.check(
            template || referenced.contains(&f.canonicalize().unwrap_or(f.clone())),
            rel(&f),
            "no kustomization uses this file: it would silently drift (name templates *.example.yaml)",
        );
    }
    // Every agents file under deploy/ loads.
    walk(&root.join("deploy"), &mut |f| {
        if f.extension().is_some_and(|e| e == "toml")
            && std::fs::read_to_string(f).is_ok_and(|t| t.contains("[[agents]]"))
            && let Err(e) = AgentsFile::load(f)
        {
            p.add(rel(f), format!("does not load as an agents file: {e}"));
        }
    });
    p.assert_none("parsing deploy/");
}

#[test]
fn dockerfile_builds_every_binary_with_its_ports_and_healthcheck() {
    let mut p = Problems::default();
    let code = Code::load(&mut p);
    check_dockerfile(&code, &mut p);
    p.assert_none("Dockerfile");
}

#[test]
fn compose_matches_the_code() {
    let mut p = Problems::default();
    let code = Code::load(&mut p);
    check_compose(&code, &mut p);
    p.assert_none("deploy/compose");
}

#[test]
fn kubernetes_manifests_match_the_code() {
    let mut p = Problems::default();
    let code = Code::load(&mut p);
    let root = root();
    let k8s = root.join("deploy/k8s");
    let templates: Vec<Doc> = yaml_files(&k8s)
        .iter()
        .filter(|f| f.to_string_lossy().ends_with(".example.yaml"))
        .flat_map(|f| load_docs(f, &mut p))
        .collect();

    // As written: the base, and the base with each component.
    let base = raw_resources(&k8s.join("base"), &mut p, &mut BTreeSet::new());
    check_k8s_set(
        &code,
        &K8sSet {
            label: "deploy/k8s/base".into(),
            docs: base.clone(),
            secret_templates: templates.clone(),
            rendered: false,
        },
        &mut p,
    );
    let mut components = Vec::new();
    walk(&k8s.join("components"), &mut |f| {
        if f.file_name().is_some_and(|n| n == "kustomization.yaml") {
            components.push(f.parent().expect("parent").to_path_buf());
        }
    });
    for c in &components {
        let mut docs = base.clone();
        docs.extend(raw_resources(c, &mut p, &mut BTreeSet::new()));
        check_k8s_set(
            &code,
            &K8sSet {
                label: format!("deploy/k8s/base + {}", rel(c)),
                docs,
                secret_templates: templates.clone(),
                rendered: false,
            },
            &mut p,
        );
    }

    // Image overrides name images that exist (a wrong name is silently ignored by kustomize).
    walk(&k8s, &mut |f| {
        if f.file_name().is_some_and(|n| n == "kustomization.yaml") {
            for d in load_docs(f, &mut p) {
                for (i, img) in seq_at(&d.v, &["images"]).iter().enumerate() {
                    let name = str_at(img, &["name"]).unwrap_or_default();
                    p.check(
                        BINS.iter().any(|b| name == format!("{IMAGE_NAMESPACE}/{b}")),
                        rel(f),
                        format!("images[{i}].name {name:?} is no Fleet image ({IMAGE_NAMESPACE}/<binary>)"),
                    );
                    if let Some(new_name) = str_at(img, &["newName"]) {
                        p.check(
                            image_follows_convention(new_name, name.rsplit('/').next().unwrap_or_default()),
                            rel(f),
                            format!("images[{i}].newName {new_name:?} breaks the convention [registry/]{IMAGE_NAMESPACE}/<binary>"),
                        );
                    }
                }
            }
        }
    });

    // Rendered: every overlay, patches applied.
    let mut overlays = Vec::new();
    if let Ok(entries) = std::fs::read_dir(k8s.join("overlays")) {
        for e in entries.flatten() {
            if kustomization_in(&e.path()).is_some() {
                overlays.push(e.path());
            }
        }
    }
    overlays.sort();
    p.check(!overlays.is_empty(), "deploy/k8s/overlays", "no overlay");
    if kubectl_available() {
        // Every overlay, and every component on top of the base (the HPA fallback is in none).
        let mut renders: Vec<(String, PathBuf)> = overlays
            .iter()
            .map(|o| (format!("kubectl kustomize {}", rel(o)), o.clone()))
            .collect();
        let scratch =
            std::env::temp_dir().join(format!("fleet-deploy-render-{}", std::process::id()));
        for c in &components {
            let dir = scratch.join(c.file_name().expect("component name"));
            std::fs::create_dir_all(&dir).expect("scratch dir");
            std::fs::write(
                dir.join("kustomization.yaml"),
                format!(
                    "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
                     resources:\n  - {}\ncomponents:\n  - {}\n",
                    relative(&dir, &k8s.join("base")).display(),
                    relative(&dir, c).display()
                ),
            )
            .expect("write kustomization");
            renders.push((
                format!("kubectl kustomize deploy/k8s/base + {}", rel(c)),
                dir,
            ));
        }
        for (label, o) in &renders {
            let out = Command::new("kubectl")
                .arg("kustomize")
                .arg(o)
                .output()
                .expect("run kubectl kustomize");
            let label = label.clone();
            if !out.status.success() {
                p.add(&label, String::from_utf8_lossy(&out.stderr).trim());
                continue;
            }
            let docs = match parse_yaml(&String::from_utf8_lossy(&out.stdout)) {
                Ok(vs) => vs
                    .into_iter()
                    .map(|v| Doc {
                        src: format!("{label} (rendered)"),
                        v,
                    })
                    .collect(),
                Err(e) => {
                    p.add(&label, format!("output is not YAML: {e}"));
                    continue;
                }
            };
            let set = K8sSet {
                label,
                docs,
                secret_templates: templates.clone(),
                rendered: true,
            };
            check_k8s_set(&code, &set, &mut p);
            p.check(
                set.of_kind("Namespace").count() == 1,
                &set.label,
                "expected exactly one Namespace",
            );
        }
    } else {
        eprintln!(
            "NOTE: kubectl not found: the overlays ({}) were not rendered; only the base and the \
             components were checked as written. Install kubectl to check them too.",
            overlays
                .iter()
                .map(|o| rel(o))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for scratch in ["fleet-deploy", "fleet-deploy-render"] {
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("{scratch}-{}", std::process::id())),
        );
    }
    p.assert_none("deploy/k8s");
}

/// The images' HEALTHCHECK program answers as Docker expects: exit 0 on 2xx, 1 otherwise.
#[test]
fn healthcheck_program_reports_ready_and_not_ready() {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    let root = root();
    let out_dir = std::env::temp_dir().join(format!("fleet-healthcheck-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join("fleet-healthcheck");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let built = Command::new(rustc)
        .args(["--edition", "2021", "-O", "-o"])
        .arg(&exe)
        .arg(root.join(HEALTHCHECK_SOURCE))
        .output()
        .expect("run rustc");
    assert!(
        built.status.success(),
        "{HEALTHCHECK_SOURCE} does not compile:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );

    // A stand-in admin server: 200 on /health/ready, 503 elsewhere.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            // Read the whole request head before answering.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let req = String::from_utf8_lossy(&head);
            let status = if req.starts_with("GET /health/ready ") {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            let _ = write!(s, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let run = |env: Option<String>, default_port: u16, path: &str| {
        let mut cmd = Command::new(&exe);
        cmd.env_clear()
            .args(["FLEET_ADMIN_ADDR", &default_port.to_string(), path]);
        if let Some(v) = env {
            cmd.env("FLEET_ADMIN_ADDR", v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let expect = |(code, said): (Option<i32>, String), want: i32, why: &str| {
        assert_eq!(code, Some(want), "{why}: fleet-healthcheck said {said:?}");
    };
    expect(
        run(Some(format!("0.0.0.0:{port}")), 1, READINESS),
        0,
        "the address variable wins over the default port; 0.0.0.0 means loopback",
    );
    expect(run(None, port, READINESS), 0, "the default port");
    expect(run(None, port, "/health/detailed"), 1, "a 503 is unhealthy");
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    expect(
        run(None, closed, READINESS),
        1,
        "nothing listening is unhealthy",
    );
    expect(
        run(Some("not-an-address".into()), port, READINESS),
        1,
        "a bad address is unhealthy",
    );
    let _ = std::fs::remove_dir_all(&out_dir);
}
