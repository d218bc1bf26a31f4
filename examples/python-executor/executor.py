#!/usr/bin/env python3
"""A Fleet executor in Python, written from docs/protocol.md alone.

It serves one pool: reads `exec.request` entries from `<prefix>:exec:<pool>` (group `executors`),
answers each with `started`, one `chunk` per word of the reversed message, and a `result`, then
acks the request. Undecodable entries are dead-lettered. Requests of dead executors are taken
over with XAUTOCLAIM.

    pip install -r requirements.txt
    REDIS_URL=redis://127.0.0.1:6379 FLEET_POOL=python python3 executor.py

Stops cleanly on SIGTERM / SIGINT.
"""

import os
import signal
import socket
import time
import uuid

import msgpack
import redis

PREFIX = os.environ.get("FLEET_PREFIX", "fleet")
POOL = os.environ.get("FLEET_POOL", "python")
STREAM = f"{PREFIX}:exec:{POOL}"
CALLBACKS = f"{PREFIX}:callbacks"
DLQ = f"{PREFIX}:dlq"
GROUP = "executors"
CONSUMER = f"py-executor-{socket.gethostname()}-{os.getpid()}"
CLAIM_IDLE_MS = int(os.environ.get("FLEET_CLAIM_IDLE_MS", "30000"))

running = True


def stop(*_):
    global running
    running = False


def uuid7() -> str:
    """A UUIDv7: 48 bits of ms timestamp, version 7, random rest."""
    ms = int(time.time() * 1000)
    raw = bytearray(ms.to_bytes(6, "big") + os.urandom(10))
    raw[6] = (raw[6] & 0x0F) | 0x70
    raw[8] = (raw[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(raw)))


def envelope(kind: str, body: dict, tp: str) -> dict:
    return {
        "v": "1",
        "kind": kind,
        "id": uuid7(),
        "tp": tp,
        "ts": str(int(time.time() * 1000)),
        "body": msgpack.packb(body),
    }


def decode(fields: dict) -> tuple[str, dict, str]:
    if fields.get(b"v") != b"1":
        raise ValueError(f"unsupported envelope version {fields.get(b'v')!r}")
    kind = fields[b"kind"].decode()
    if kind != "exec.request":
        raise ValueError(f"unknown kind {kind!r} on {STREAM}")
    body = msgpack.unpackb(fields[b"body"])
    for name in ("session_id", "task_id", "attempt", "message", "deadline_ms"):
        if name not in body:
            raise ValueError(f"exec.request without {name!r}")
    return kind, body, fields.get(b"tp", b"").decode()


def dead_letter(r: redis.Redis, entry_id: bytes, fields: dict, reason: str) -> None:
    letter = {
        "stream": STREAM,
        "group": GROUP,
        "entry_id": entry_id,
        "reason": reason,
        "deliveries": "1",
        "consumer": CONSUMER,
        "ts": str(int(time.time() * 1000)),
    }
    letter.update({b"orig." + k: v for k, v in fields.items()})
    pipe = r.pipeline(transaction=False)
    pipe.xadd(DLQ, letter, maxlen=100_000, approximate=True)
    pipe.xack(STREAM, GROUP, entry_id)
    pipe.execute()


def run_task(r: redis.Redis, req: dict, tp: str) -> None:
    """Streams the message's words in reverse order; all callbacks of a task in one pipeline.

    The answer is the same each run, so a request taken over from a dead executor runs again
    under the request's own attempt, numbered as before: what was applied already is dropped
    (docs/protocol.md, "Runs again"; an executor whose answer may differ would write
    attempt + deliveries - 1).
    """
    task = {"session_id": req["session_id"], "task_id": req["task_id"], "attempt": req["attempt"]}
    words = req["message"].split()[::-1]
    answer = " ".join(words)
    callbacks = [("started", {**task, "seq": 1, "executor": CONSUMER})]
    for i, word in enumerate(words):
        content = word if i == len(words) - 1 else word + " "
        callbacks.append(("chunk", {**task, "seq": i + 2, "index": i, "content": content}))
    callbacks.append(("result", {**task, "seq": len(words) + 2, "content": answer, "metadata": {"executor": "python"}}))
    pipe = r.pipeline(transaction=False)
    for kind, body in callbacks:
        pipe.xadd(CALLBACKS, envelope(kind, body, tp))
    pipe.execute()


def handle(r: redis.Redis, entry_id: bytes, fields: dict) -> None:
    try:
        _, req, tp = decode(fields)
    except Exception as e:  # anything undecodable is dead-lettered, never retried
        dead_letter(r, entry_id, fields, f"undecodable entry: {e}")
        return
    if req["deadline_ms"] > time.time() * 1000:
        run_task(r, req, tp)
    r.xack(STREAM, GROUP, entry_id)


def main() -> None:
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    try:
        r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise
    print(f"serving {STREAM} as {CONSUMER}", flush=True)
    last_claim = 0.0
    while running:
        if time.time() - last_claim > CLAIM_IDLE_MS / 2000:
            last_claim = time.time()
            _, claimed, *_ = r.xautoclaim(STREAM, GROUP, CONSUMER, CLAIM_IDLE_MS, "0-0", count=16)
            for entry_id, fields in claimed:
                if fields:
                    handle(r, entry_id, fields)
        for _, entries in r.xreadgroup(GROUP, CONSUMER, {STREAM: ">"}, count=16, block=500) or []:
            for entry_id, fields in entries:
                handle(r, entry_id, fields)
    r.xgroup_delconsumer(STREAM, GROUP, CONSUMER)
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
