#!/usr/bin/env python3
"""Checks rendered manifests against the built Fleet binaries (run by deploy/validate.sh).

    check-against-binaries.py BIN_DIR MANIFEST.yaml...

Each MANIFEST is a rendered kustomization (`kubectl kustomize`) or a resolved compose file
(`docker compose config`). For every container running a Fleet binary (image `.../fleet/<bin>`
or compose `build.target: <bin>`) it checks that
  - every environment variable is one the binary reads (its `--help`, `[env: NAME`), or one the
    telemetry library reads (`RUST_LOG`, `OTEL_*`);
  - the binary accepts the values: it is started with the container's environment and args,
    with Redis at 127.0.0.1:1 (nothing listens there) and every listen address on port 0, and
    must get past its configuration (clap's formats and ranges, FLEET_SECRET, URLs) to fail on
    connecting to Redis;
  - container ports, probe ports and `prometheus.io/port` are ports it listens on;
and that every KEDA redis-streams trigger with `lagCount` also sets `activationLagCount`.
Needs PyYAML. Exits 1 on any problem, naming the manifest, object and variable.
"""
import base64
import os
import re
import subprocess
import sys

import yaml

LISTEN_VARS = ("FLEET_HTTP_ADDR", "FLEET_GRPC_ADDR", "FLEET_ADMIN_ADDR")
LIVENESS, READINESS = "/health", "/health/ready"

problems = []


def problem(where, msg):
    problems.append(f"{where}: {msg}")


def help_text(path, sub=()):
    """`--help` of the binary and of each of its subcommands (fleetctl's flags are theirs)."""
    text = subprocess.run([path, *sub, "--help"], capture_output=True, text=True,
                          timeout=30).stdout
    commands = re.search(r"^Commands:\n((?:  \S.*\n)+)", text, re.M)
    for line in commands.group(1).splitlines() if commands else []:
        name = line.split()[0]
        if name != "help":
            text += help_text(path, (*sub, name))
    return text


def help_of(path):
    text = help_text(path)
    env = set(re.findall(r"\[env: ([A-Z0-9_]+)", text))
    # Default listen ports: "--http-addr ... [default: 0.0.0.0:8001]" and edge-api's gRPC text.
    ports = {}
    for var, flag in (("FLEET_HTTP_ADDR", "http-addr"), ("FLEET_GRPC_ADDR", "grpc-addr"),
                      ("FLEET_ADMIN_ADDR", "admin-addr")):
        m = re.search(r"--%s <[A-Z_]+>(.*?)(?:\n\s*\n\s*-|\Z)" % flag, text, re.S)
        if not m:
            continue
        d = re.search(r"\[default: [^\]]*:(\d+)\]", m.group(1)) or re.search(
            r"Unset: [0-9.]+:(\d+)", m.group(1))
        if d:
            ports[var] = int(d.group(1))
    return env, ports


def fleet_bin(image, bins):
    name = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
    return name if name in bins and "/fleet/" in "/" + image else None


def k8s_containers(docs, src):
    cms = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d.get("kind") == "ConfigMap"}
    secrets = {}
    for d in docs:
        if d.get("kind") == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
            data.update(d.get("stringData") or {})
            secrets[d["metadata"]["name"]] = data
    for d in docs:
        if d.get("kind") not in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            continue
        pod = d["spec"]["template"]
        annotations = pod.get("metadata", {}).get("annotations") or {}
        for c in pod["spec"].get("containers", []):
            env, where = {}, f"{src} {d['kind']}/{d['metadata']['name']} container {c['name']}"
            for ef in c.get("envFrom", []):
                ref = ef.get("configMapRef") or ef.get("secretRef") or {}
                pool = cms if "configMapRef" in ef else secrets
                # A Secret made out of band (production) is not in the manifests.
                env.update(pool.get(ref.get("name"), {}))
            for e in c.get("env", []):
                if "value" in e:
                    env[e["name"]] = str(e["value"])
                    continue
                vf = e.get("valueFrom", {})
                ref = vf.get("configMapKeyRef") or vf.get("secretKeyRef")
                if not ref:
                    env[e["name"]] = ""
                    continue
                pool = cms if "configMapKeyRef" in vf else secrets
                if ref["name"] in pool and ref["key"] in pool[ref["name"]]:
                    env[e["name"]] = pool[ref["name"]][ref["key"]]
                elif "secretKeyRef" in vf:
                    env[e["name"]] = "out-of-band-secret-" + "x" * 32
                else:
                    problem(where, f"{e['name']}: ConfigMap {ref['name']} has no key {ref['key']}")
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            probes = []
            for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                get = (c.get(kind) or {}).get("httpGet")
                if get:
                    port = get["port"]
                    probes.append((kind, ports.get(port, port), get.get("path")))
            yield {
                "where": where, "image": c.get("image", ""), "env": env,
                "args": [str(a) for a in (c.get("command") or [])[1:] + (c.get("args") or [])],
                "ports": set(ports.values()), "probes": probes,
                "scrape_port": annotations.get("prometheus.io/port"),
            }


def compose_containers(doc, src):
    for name, s in (doc.get("services") or {}).items():
        target = (s.get("build") or {}).get("target")
        env = s.get("environment") or {}
        if isinstance(env, list):
            env = dict(x.split("=", 1) if "=" in x else (x, "") for x in env)
        ports = set()
        for p in s.get("ports") or []:
            t = p.get("target") if isinstance(p, dict) else str(p).rsplit(":", 1)[-1].split("/")[0]
            ports.add(int(t))
        cmd = s.get("command") or []
        yield {
            "where": f"{src} service {name}", "image": f"fleet/{target}" if target else "",
            "env": {k: "" if v is None else str(v) for k, v in env.items()},
            "args": [cmd] if isinstance(cmd, str) else [str(a) for a in cmd],
            "ports": ports, "probes": [], "scrape_port": None,
        }


def check_container(c, bins, bin_dir, root):
    b = fleet_bin(c["image"], bins)
    if not b:
        return
    known, default_ports = bins[b]
    where = f"{c['where']} ({b})"
    for k in sorted(c["env"]):
        if k not in known and k != "RUST_LOG" and not k.startswith("OTEL_"):
            problem(where, f"sets {k}, which {b} does not read (see `{b} --help`)")
    listen = dict(default_ports)
    for var in LISTEN_VARS:
        v = c["env"].get(var, "")
        if var in listen and v.rsplit(":", 1)[-1].isdigit():
            listen[var] = int(v.rsplit(":", 1)[-1])
    served = set(listen.values())
    admin = listen.get("FLEET_ADMIN_ADDR", listen.get("FLEET_HTTP_ADDR"))
    for p in sorted(c["ports"] - served):
        problem(where, f"port {p} is not one {b} listens on ({sorted(served)})")
    for kind, port, path in c["probes"]:
        if port != admin:
            problem(where, f"{kind} on port {port}, but {b} serves health on {admin}")
        want = LIVENESS if kind == "livenessProbe" else READINESS
        if path != want and not (kind == "startupProbe" and path in (LIVENESS, READINESS)):
            problem(where, f"{kind} path {path}, expected {want}")
    if c["scrape_port"] is not None and str(c["scrape_port"]) != str(admin):
        problem(where, f"prometheus.io/port {c['scrape_port']}, but {b} serves /metrics on {admin}")

    env = {k: v for k, v in c["env"].items() if not k.startswith("OTEL_")}
    scheme = env.get("REDIS_URL", "redis://").split("://", 1)[0]
    env.update({"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OTEL_SDK_DISABLED": "true",
                "REDIS_URL": f"{scheme}://127.0.0.1:1"})
    for var in LISTEN_VARS:
        if var in known:
            env[var] = "127.0.0.1:0"
    if "NATS_URL" in env:
        env["NATS_URL"] = "nats://127.0.0.1:1"
    if env.get("FLEET_AGENTS_FILE"):
        env["FLEET_AGENTS_FILE"] = os.path.join(root, "deploy/agents.example.toml")
    argv = [os.path.join(bin_dir, b)] + c["args"]
    if b == "fleetctl" and not c["args"]:
        argv += ["dlq", "list"]
    try:
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        problem(where, f"`{' '.join(argv)}` with the manifest's environment did not stop")
        return
    if "cannot connect to Redis" not in r.stderr:
        lines = [l for l in r.stderr.splitlines() if l.strip()][:6]
        problem(where, f"{b} refuses this configuration (exit {r.returncode}):\n    "
                + "\n    ".join(lines))


def check_keda(docs, src):
    for d in docs:
        if d.get("kind") != "ScaledObject":
            continue
        for i, t in enumerate(d["spec"].get("triggers", [])):
            m = t.get("metadata") or {}
            if "lagCount" in m and "activationLagCount" not in m:
                problem(f"{src} ScaledObject/{d['metadata']['name']} trigger {i}",
                        "lagCount without activationLagCount (KEDA refuses the trigger)")


def main():
    bin_dir, manifests = sys.argv[1], sys.argv[2:]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = ["edge-api", "dispatcher", "callback-worker", "ws-gateway", "exec-worker",
             "nats-bridge", "fleetctl"]
    bins = {n: help_of(os.path.join(bin_dir, n)) for n in names}
    checked = 0
    for path in manifests:
        src = os.path.basename(path)
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]
        if len(docs) == 1 and "services" in docs[0]:
            containers = compose_containers(docs[0], src)
        else:
            containers = k8s_containers(docs, src)
            check_keda(docs, src)
        for c in containers:
            if fleet_bin(c["image"], bins):
                checked += 1
            check_container(c, bins, bin_dir, root)
    for p in problems:
        print("  " + p, file=sys.stderr)
    print(f"{checked} Fleet containers in {len(manifests)} manifests checked against "
          f"{bin_dir}: {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
