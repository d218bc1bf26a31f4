#!/usr/bin/env python3
"""A Fleet executor in Python, written from docs/protocol.md alone.

It serves one pool: reads `exec.request` entries from `<prefix>:exec:<pool>` (group `executors`),
answers each with `started`, one `chunk` per word of the reversed message, and a `result`, then
acks the request. The agent's `params.delay_ms` (default 0) is waited before each word, which
makes a task take a while, as a model's would: a task stops, writing nothing more, when it is
cancelled (`exec.cancel` on `<prefix>:exec:<pool>:control`) or reaches its `deadline_ms`, and
its claim is renewed while it runs. Undecodable entries are dead-lettered. Requests of dead
executors are taken over with XAUTOCLAIM.

    pip install -r requirements.txt
    REDIS_URL=redis://127.0.0.1:6379 FLEET_POOL=python python3 executor.py

Stops on SIGTERM / SIGINT: a task in hand stops at once and stays pending (unacknowledged), so
another executor of the pool takes it over after the claim idle bound.
"""

import os
import signal
import socket
import threading
import time
import uuid

import msgpack
import redis

PREFIX = os.environ.get("FLEET_PREFIX", "fleet")
POOL = os.environ.get("FLEET_POOL", "python")
STREAM = f"{PREFIX}:exec:{POOL}"
CONTROL = f"{STREAM}:control"
CALLBACKS = f"{PREFIX}:callbacks"
DLQ = f"{PREFIX}:dlq"
GROUP = "executors"
CONSUMER = f"py-executor-{socket.gethostname()}-{os.getpid()}"
CLAIM_IDLE_MS = int(os.environ.get("FLEET_CLAIM_IDLE_MS", "30000"))
REMEMBER_CANCELS_S = 600

running = True
# Set whenever a running task may have to stop (a cancel, a signal).
wake = threading.Event()
# task id -> when its cancel was seen; kept a while, as a cancel may come before its request.
cancelled: dict[str, float] = {}
cancelled_lock = threading.Lock()

# The body fields of an `exec.request` this executor needs, with their MessagePack types.
REQUIRED = {"session_id": str, "task_id": str, "attempt": int, "agent_id": str, "message": str, "deadline_ms": int}


def stop(*_):
    global running
    running = False
    wake.set()


def now_ms() -> int:
    return int(time.time() * 1000)


def uuid7() -> str:
    """A UUIDv7: 48 bits of ms timestamp, version 7, random rest."""
    raw = bytearray(now_ms().to_bytes(6, "big") + os.urandom(10))
    raw[6] = (raw[6] & 0x0F) | 0x70
    raw[8] = (raw[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(raw)))


def envelope(kind: str, body: dict, tp: str) -> dict:
    return {"v": "1", "kind": kind, "id": uuid7(), "tp": tp, "ts": str(now_ms()), "body": msgpack.packb(body)}


def decode(fields: dict, expected: str) -> tuple[dict, str]:
    """The body and `tp` of an entry of kind `expected`; raises on anything else."""
    if fields.get(b"v") != b"1":
        raise ValueError(f"unsupported envelope version {fields.get(b'v')!r}")
    kind = fields[b"kind"].decode()
    if kind != expected:
        raise ValueError(f"unknown kind {kind!r}")
    body = msgpack.unpackb(fields[b"body"])
    if not isinstance(body, dict):
        raise ValueError(f"{kind} body is not a map")
    return body, fields.get(b"tp", b"").decode()


def decode_request(fields: dict) -> tuple[dict, str]:
    req, tp = decode(fields, "exec.request")
    for name, typ in REQUIRED.items():
        value = req.get(name)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ValueError(f"exec.request field {name!r} is not {typ.__name__}: {value!r}")
    return req, tp


def dead_letter(r: redis.Redis, entry_id: bytes, fields: dict, reason: str) -> None:
    letter = {
        "stream": STREAM,
        "group": GROUP,
        "entry_id": entry_id,
        "reason": reason,
        "deliveries": "1",
        "consumer": CONSUMER,
        "ts": str(now_ms()),
    }
    letter.update({b"orig." + k: v for k, v in fields.items()})
    pipe = r.pipeline(transaction=False)
    pipe.xadd(DLQ, letter, maxlen=100_000, approximate=True)
    pipe.xack(STREAM, GROUP, entry_id)
    pipe.execute()


def follow_control(url: str, last: bytes | str) -> None:
    """Reads the pool's control stream after entry `last`, without a group (every executor of
    the pool sees every cancel), and remembers the cancelled tasks."""
    r = redis.Redis.from_url(url)
    while running:
        try:
            reply = r.xread({CONTROL: last}, count=256, block=1000) or []
        except redis.RedisError as e:
            print(f"control read failed: {e}", flush=True)
            time.sleep(0.5)
            continue
        for _, entries in reply:
            for entry_id, fields in entries:
                last = entry_id
                try:
                    body, _ = decode(fields, "exec.cancel")
                except Exception as e:  # a control entry is a hint: skip what does not decode
                    print(f"ignoring control entry {entry_id!r}: {e}", flush=True)
                    continue
                now = time.monotonic()
                with cancelled_lock:
                    for tid in [t for t, at in cancelled.items() if now - at > REMEMBER_CANCELS_S]:
                        del cancelled[tid]
                    cancelled[str(body.get("task_id"))] = now
                wake.set()


def is_cancelled(task_id: str) -> bool:
    with cancelled_lock:
        return task_id in cancelled


class Stopped(Exception):
    """The task must stop: `acked` says whether its request is done with (cancel, deadline) or
    left pending for another executor (shutdown)."""

    def __init__(self, acked: bool):
        self.acked = acked


def pause(r: redis.Redis, entry_id: bytes, req: dict, seconds: float, claim: list[float]) -> None:
    """Waits `seconds`, renewing the claim on the request, unless the task must stop first."""
    until = time.monotonic() + seconds
    while True:
        if not running:
            raise Stopped(acked=False)
        if is_cancelled(req["task_id"]) or now_ms() >= req["deadline_ms"]:
            raise Stopped(acked=True)
        now = time.monotonic()
        if now >= until:
            return
        if now >= claim[0]:
            # Resets the entry's idle time (JUSTID keeps its delivery count): no other executor
            # takes over a request that is still being worked on.
            r.xclaim(STREAM, GROUP, CONSUMER, 0, [entry_id], justid=True)
            claim[0] = now + CLAIM_IDLE_MS / 3000
        wake.wait(min(until, claim[0], now + (req["deadline_ms"] - now_ms()) / 1000) - now)
        wake.clear()


def run_task(r: redis.Redis, entry_id: bytes, req: dict, tp: str) -> None:
    """Streams the message's words in reverse order.

    The answer is the same each run, so a request taken over from a dead executor runs again
    under the request's own attempt, numbered as before: what was applied already is dropped
    (docs/protocol.md, "Runs again"; an executor whose answer may differ would write
    attempt + deliveries - 1).
    """
    params = req.get("params")
    delay_ms = params.get("delay_ms", 0) if isinstance(params, dict) else 0
    delay = delay_ms / 1000 if isinstance(delay_ms, (int, float)) and delay_ms > 0 else 0
    task = {"session_id": req["session_id"], "task_id": req["task_id"], "attempt": req["attempt"]}
    words = req["message"].split()[::-1]
    answer = " ".join(words)
    callbacks = [("started", {**task, "seq": 1, "executor": CONSUMER})]
    for i, word in enumerate(words):
        content = word if i == len(words) - 1 else word + " "
        callbacks.append(("chunk", {**task, "seq": i + 2, "index": i, "content": content}))
    callbacks.append(("result", {**task, "seq": len(words) + 2, "content": answer, "metadata": {"executor": "python"}}))
    if not delay:
        # All at once: one round trip.
        pipe = r.pipeline(transaction=False)
        for kind, body in callbacks:
            pipe.xadd(CALLBACKS, envelope(kind, body, tp))
        pipe.execute()
        return
    claim = [time.monotonic() + CLAIM_IDLE_MS / 3000]
    for kind, body in callbacks:
        if kind == "chunk":
            pause(r, entry_id, req, delay, claim)
        r.xadd(CALLBACKS, envelope(kind, body, tp))


def handle(r: redis.Redis, entry_id: bytes, fields: dict) -> None:
    try:
        req, tp = decode_request(fields)
    except Exception as e:  # anything undecodable is dead-lettered, never retried
        dead_letter(r, entry_id, fields, f"undecodable entry: {e}")
        return
    # A task cancelled or past its deadline before it started is not run.
    if not is_cancelled(req["task_id"]) and req["deadline_ms"] > now_ms():
        try:
            run_task(r, entry_id, req, tp)
        except Stopped as s:
            if not s.acked:
                return  # shutting down: left pending for another executor
    r.xack(STREAM, GROUP, entry_id)


def serve(r: redis.Redis) -> None:
    last_claim = 0.0
    while running:
        if time.time() - last_claim > CLAIM_IDLE_MS / 2000:
            last_claim = time.time()
            _, claimed, *_ = r.xautoclaim(STREAM, GROUP, CONSUMER, CLAIM_IDLE_MS, "0-0", count=16)
            for entry_id, fields in claimed:
                if not running:
                    return
                if fields:
                    handle(r, entry_id, fields)
                else:  # deleted from the stream while pending (Redis 6.2 still lists it)
                    r.xack(STREAM, GROUP, entry_id)
        for _, entries in r.xreadgroup(GROUP, CONSUMER, {STREAM: ">"}, count=16, block=500) or []:
            for entry_id, fields in entries:
                if not running:
                    return  # the rest stay pending, for another executor
                handle(r, entry_id, fields)


def main() -> None:
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    r = redis.Redis.from_url(url)
    try:
        r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise
    # Where the control stream ends now, read before any request: `XREAD ... $` in the thread
    # would start wherever the stream ends when that first read runs, and miss a cancel written
    # for a request this process already took.
    newest = r.xrevrange(CONTROL, count=1)
    start = newest[0][0] if newest else "0-0"
    threading.Thread(target=follow_control, args=(url, start), daemon=True).start()
    print(f"serving {STREAM} as {CONSUMER}", flush=True)
    while running:
        try:
            serve(r)
        except redis.RedisError as e:  # e.g. Redis restarting: what is in hand stays pending
            print(f"redis failed: {e}; retrying", flush=True)
            time.sleep(1)
    # Deleting a consumer drops its pending entries for good: only when it holds none.
    if not r.xpending_range(STREAM, GROUP, "-", "+", 1, consumername=CONSUMER):
        r.xgroup_delconsumer(STREAM, GROUP, CONSUMER)
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
