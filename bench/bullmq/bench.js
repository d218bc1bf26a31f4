#!/usr/bin/env node
// The peer in Fleet's benchmark: BullMQ with a no-op worker, on the same Redis, with the same
// payload size and the same method as `fleet-bench queue` (see docs/performance.md).
//
//   node bench.js --redis-url redis://127.0.0.1:6390 [--rate 1000 | --concurrency 256]
//                 [--duration 10] [--warmup 2] [--payload-bytes 64] [--worker-concurrency 256]
//                 [--label bullmq-max] [--json-out results.jsonl] [--single-thread]
//                 [--redis-pid PID]   (to report Redis's CPU and run-queue wait)
//                 [--round-trip]      (the client hears the job's progress and result back)
//
// A job is added with `queue.add` and processed by a `Worker` whose processor does nothing but
// note when it ran. Latency = processor invoked - intended add time (open loop: the schedule's
// time, so a stalled server is charged for the stall; closed loop: when the add was started).
//
// --round-trip measures what Fleet's whole path does, built on BullMQ: the processor reports one
// progress update (`job.updateProgress`, Fleet's chunk) and returns the payload (Fleet's result),
// and the producer's side hears both on BullMQ's event stream (`QueueEvents`, how a BullMQ client
// learns of a job's progress and completion). A job is done when its `completed` event reaches
// the client: latency first_chunk = progress event heard, final = completed event heard, each
// from the intended add time; the closed loop keeps `--concurrency` jobs not yet heard complete.
// The producer runs on a worker thread and the BullMQ Worker on the main thread, so the peer
// gets both cores like fleet-bench's tokio runtime (`--single-thread` runs both on one).
//
// Prints a table and one JSON line in fleet-bench's report format.
'use strict';

const { Worker: Thread, isMainThread, parentPort, workerData } = require('node:worker_threads');
const fs = require('node:fs');

const nowMs = () => Number(process.hrtime.bigint()) / 1e6;

function parseArgs(argv) {
  const a = {
    redisUrl: process.env.REDIS_URL || 'redis://127.0.0.1:6379',
    rate: 0,
    concurrency: 256,
    duration: 10,
    warmup: 2,
    payloadBytes: 64,
    workerConcurrency: 256,
    drain: 10,
    label: '',
    jsonOut: '',
    singleThread: false,
    redisPid: 0,
    roundTrip: false,
  };
  for (let i = 2; i < argv.length; i++) {
    const k = argv[i];
    const v = () => argv[++i];
    switch (k) {
      case '--redis-url': a.redisUrl = v(); break;
      case '--rate': a.rate = Number(v()); break;
      case '--concurrency': a.concurrency = Number(v()); break;
      case '--duration': a.duration = Number(v()); break;
      case '--warmup': a.warmup = Number(v()); break;
      case '--payload-bytes': a.payloadBytes = Number(v()); break;
      case '--worker-concurrency': a.workerConcurrency = Number(v()); break;
      case '--drain': a.drain = Number(v()); break;
      case '--label': a.label = v(); break;
      case '--json-out': a.jsonOut = v(); break;
      case '--single-thread': a.singleThread = true; break;
      case '--redis-pid': a.redisPid = Number(v()); break;
      case '--round-trip': a.roundTrip = true; break;
      default: throw new Error(`unknown argument ${k}`);
    }
  }
  if (!a.label) a.label = `bullmq${a.roundTrip ? '-rt' : ''}-${a.rate > 0 ? a.rate : 'max'}`;
  return a;
}

function connection(url) {
  const u = new URL(url);
  return {
    host: u.hostname || '127.0.0.1',
    port: Number(u.port || 6379),
    maxRetriesPerRequest: null,
  };
}

// Shared counters between the producer thread and the main thread.
const SENT = 0;        // jobs whose add was started
const DONE = 1;        // jobs processed
const OFFERED = 2;     // jobs intended inside the window
const ADD_ERRORS = 3;
const PRODUCER_DONE = 4;
const WINDOW_FINALS = 5; // --round-trip: completions heard of jobs intended inside the window
const HEARD = 6;         // --round-trip: completions heard inside the window

// BullMQ trims its event stream to this many entries (default 10,000). A job writes about five
// (waiting, active, progress, completed, ...), so the default holds two thousand jobs: a client
// that falls that far behind loses completions. Raised for --round-trip, as a user would.
const EVENTS_MAX_LEN = 200000;

// ---------------------------------------------------------------------------------------------
// Producer: adds jobs on schedule (open loop) or keeps `concurrency` unprocessed (closed loop).
// ---------------------------------------------------------------------------------------------
// What the run's Queue and Worker share: the Redis, and (--round-trip) the event stream's length.
function queueOpts(args) {
  const opts = { connection: connection(args.redisUrl) };
  if (args.roundTrip) opts.streams = { events: { maxLen: EVENTS_MAX_LEN } };
  return opts;
}

async function openQueue(args, queueName) {
  const { Queue } = require('bullmq');
  const queue = new Queue(queueName, queueOpts(args));
  await queue.waitUntilReady();
  return queue;
}

// --round-trip: the client's side of the event stream, read from its start (the queue is new),
// so no event written before the first read is missed.
async function openEvents(args, queueName) {
  const { QueueEvents } = require('bullmq');
  const events = new QueueEvents(queueName, { connection: connection(args.redisUrl), lastEventId: '0-0' });
  await events.waitUntilReady();
  return events;
}

// --round-trip: latencies of the jobs intended inside the window, as their events are heard.
function listen(events, { windowStart, windowEnd }, counters) {
  const heard = { final: [], first: [] };
  const inWindow = (t) => t >= windowStart && t < windowEnd;
  events.on('progress', ({ data }) => {
    const at = nowMs();
    if (data && inWindow(data.t)) heard.first.push(at - data.t);
  });
  events.on('completed', ({ returnvalue }) => {
    const at = nowMs();
    if (returnvalue && inWindow(returnvalue.t)) {
      heard.final.push(at - returnvalue.t);
      Atomics.add(counters, WINDOW_FINALS, 1);
    }
    if (inWindow(at)) Atomics.add(counters, HEARD, 1);
    Atomics.add(counters, DONE, 1);
    Atomics.notify(counters, DONE);
  });
  events.on('error', (e) => console.error('queue events error:', e.message));
  return heard;
}

async function produce(queue, { args, start, windowStart, windowEnd, counters }) {
  const payload = 'x'.repeat(Math.max(1, args.payloadBytes));
  const opts = { removeOnComplete: true, removeOnFail: true };
  const add = (intended) => {
    if (intended >= windowStart && intended < windowEnd) Atomics.add(counters, OFFERED, 1);
    Atomics.add(counters, SENT, 1);
    queue.add('j', { t: intended, p: payload }, opts).catch(() => {
      Atomics.add(counters, ADD_ERRORS, 1);
      Atomics.add(counters, DONE, 1);
    });
  };
  while (nowMs() < start) await sleep(Math.max(0, start - nowMs()));
  if (args.rate > 0) {
    const period = 1000 / args.rate;
    const pacer = startPacer(start, period, windowEnd);
    let i = 0;
    for (;;) {
      const due = Math.floor((nowMs() - start) / period) + 1;
      while (i < due) {
        const intended = start + i * period;
        if (intended >= windowEnd) break;
        add(intended);
        i++;
      }
      const next = start + i * period;
      if (next >= windowEnd) break;
      await pacer.tick();
    }
    pacer.stop();
  } else {
    for (;;) {
      const t = nowMs();
      if (t >= windowEnd) break;
      const sent = Atomics.load(counters, SENT);
      const done = Atomics.load(counters, DONE);
      if (sent - done < args.concurrency) {
        add(t);
        continue;
      }
      const w = Atomics.waitAsync(counters, DONE, done, Math.max(1, windowEnd - t));
      if (w.async) await w.value;
      // Let the add promises and their replies run.
      await new Promise(setImmediate);
    }
  }
  Atomics.store(counters, PRODUCER_DONE, 1);
  return queue;
}

// The open loop's clock. Latency runs from the intended time, so however late the producer
// adds a job is in every number; setTimeout has whole-millisecond granularity, as large as what
// is measured at 1,000/s. A thread of its own sleeps to each intended time with Atomics.wait
// (sub-millisecond) and wakes the producer, as fleet-bench's pacer does for Fleet.
const PACER = `
const { workerData: { start, period, end, sab } } = require('node:worker_threads');
const pace = new Int32Array(sab);
const nowMs = () => Number(process.hrtime.bigint()) / 1e6;
for (;;) {
  const now = nowMs();
  const next = start + (now < start ? 0 : Math.floor((now - start) / period) + 1) * period;
  if (next >= end || Atomics.load(pace, 1) !== 0) break;
  Atomics.wait(pace, 2, 0, next - now); // nothing notifies slot 2: a precise sleep
  Atomics.add(pace, 0, 1);
  Atomics.notify(pace, 0);
}
Atomics.add(pace, 0, 1);
Atomics.notify(pace, 0);
`;

function startPacer(start, period, end) {
  const sab = new SharedArrayBuffer(12);
  const pace = new Int32Array(sab); // 0: ticks, 1: stop, 2: never written
  const thread = new Thread(PACER, { eval: true, workerData: { start, period, end, sab } });
  thread.unref();
  let seen = 0;
  return {
    async tick() {
      const w = Atomics.waitAsync(pace, 0, seen);
      if (w.async) await w.value;
      seen = Atomics.load(pace, 0);
    },
    stop() {
      Atomics.store(pace, 1, 1);
    },
  };
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

if (!isMainThread) {
  // Connect first, say so, then wait for the timetable (so a slow start is not a backlog).
  // Messages from the main thread: the timetable, then (--round-trip) 'finish' once the window's
  // jobs are heard complete or the drain gave up.
  const { args, queueName } = workerData;
  let finish;
  const finished = new Promise((r) => (finish = r));
  Promise.all([openQueue(args, queueName), args.roundTrip ? openEvents(args, queueName) : null])
    .then(([queue, events]) => {
      parentPort.on('message', (m) => {
        if (m === 'finish') return finish();
        const counters = new Int32Array(workerData.sab);
        const heard = events ? listen(events, m, counters) : null;
        produce(queue, { ...workerData, ...m, counters })
          .then(async () => {
            await (events ? finished : sleep(200));
            await queue.close();
            if (events) await events.close();
            parentPort.postMessage({ done: true, heard });
          })
          .catch((e) => parentPort.postMessage(`error: ${e.stack || e}`));
      });
      parentPort.postMessage('ready');
    })
    .catch((e) => parentPort.postMessage(`error: ${e.stack || e}`));
  return;
}

// ---------------------------------------------------------------------------------------------
// Main thread: the no-op worker, the measurements, the report.
// ---------------------------------------------------------------------------------------------
function parseInfo(text) {
  const s = { cpu: 0, commands: 0, usedMemory: 0, cmd: {} };
  let sys = 0;
  let user = 0;
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    const i = line.indexOf(':');
    if (i < 0) continue;
    const k = line.slice(0, i);
    const v = line.slice(i + 1);
    if (k === 'used_cpu_sys') sys = Number(v);
    else if (k === 'used_cpu_user') user = Number(v);
    else if (k === 'total_commands_processed') s.commands = Number(v);
    else if (k === 'used_memory') s.usedMemory = Number(v);
    else if (k.startsWith('cmdstat_')) {
      const f = Object.fromEntries(v.split(',').map((kv) => kv.split('=')));
      s.cmd[k.slice(8)] = [Number(f.calls || 0), Number(f.usec || 0)];
    }
  }
  s.cpu = sys + user;
  return s;
}

async function snapshot(redis) {
  let text = '';
  for (const sec of ['cpu', 'stats', 'memory', 'commandstats']) text += (await redis.info(sec)) + '\n';
  return parseInfo(text);
}

const r3 = (x) => Math.round(x * 1000) / 1000;
const r2 = (x) => Math.round(x * 100) / 100;

function redisCost(a, b, secs, tasks) {
  const per = (x) => (tasks > 0 ? x / tasks : 0);
  const cpu = Math.max(0, b.cpu - a.cpu);
  const commands = b.commands - a.commands;
  const top = Object.entries(b.cmd)
    .map(([cmd, [calls, usec]]) => {
      const [c0, u0] = a.cmd[cmd] || [0, 0];
      return { cmd, calls: calls - c0, usec: usec - u0 };
    })
    .filter((c) => c.calls > 0 && c.cmd !== 'info')
    .sort((x, y) => y.usec - x.usec || (x.cmd < y.cmd ? -1 : 1))
    .map((c) => ({ ...c, calls_per_task: r2(per(c.calls)), usec_per_task: r2(per(c.usec)) }));
  return {
    cpu_s: r3(cpu),
    cpu_util: secs > 0 ? r3(cpu / secs) : 0,
    cpu_us_per_task: r2(per(cpu * 1e6)),
    commands,
    commands_per_task: r2(per(commands)),
    top,
    used_memory_bytes: b.usedMemory,
  };
}

function percentiles(samples) {
  const n = samples.length;
  if (n === 0) return { count: 0, mean: 0, p50: 0, p90: 0, p99: 0, p999: 0, max: 0 };
  const s = Float64Array.from(samples).sort();
  const at = (q) => r3(s[Math.min(n, Math.max(1, Math.ceil(q * n))) - 1]);
  let sum = 0;
  for (const x of s) sum += x;
  return { count: n, mean: r3(sum / n), p50: at(0.5), p90: at(0.9), p99: at(0.99), p999: at(0.999), max: r3(s[n - 1]) };
}

function procStatus(pid) {
  try {
    const t = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const f = (name) => Number((t.match(new RegExp(`^${name}:\\s+(\\d+)`, 'm')) || [])[1] || 0);
    return { rss: f('VmRSS'), hwm: f('VmHWM') };
  } catch {
    return { rss: 0, hwm: 0 };
  }
}

// Microseconds some task waited for a CPU since boot (/proc/pressure/cpu), or null.
function pressureUs() {
  try {
    const m = fs.readFileSync('/proc/pressure/cpu', 'utf8').match(/^some .*total=(\d+)/m);
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

// CPU seconds (user + system, all threads) and run-queue wait seconds of a process.
function procTimes(pid) {
  let cpu = 0;
  let wait = 0;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    cpu = (Number(f[11]) + Number(f[12])) / 100;
    for (const t of fs.readdirSync(`/proc/${pid}/task`)) {
      try {
        wait += Number(fs.readFileSync(`/proc/${pid}/task/${t}/schedstat`, 'utf8').split(' ')[1]) / 1e9;
      } catch {}
    }
  } catch {}
  return { cpu, wait };
}

function table(r) {
  const L = [];
  L.push(`== ${r.label} (${r.system} / ${r.mode}) ==`);
  L.push(`  window                 ${r.window_s.toFixed(1)} s`);
  L.push(`  throughput             ${Math.round(r.throughput_per_s)} jobs/s (${r.completed} completed, ${r.offered} offered, ${r.errors} errors, ${r.incomplete} incomplete)`);
  const c = (x, w = 9) => String(x).padStart(w);
  L.push(`  ${'latency (ms)'.padEnd(22)} ${c('count')} ${c('p50')} ${c('p90')} ${c('p99')} ${c('p99.9')} ${c('max')} ${c('mean')}`);
  for (const [name, p] of Object.entries(r.latency_ms)) {
    L.push(`  ${name.padEnd(22)} ${c(p.count)} ${c(p.p50.toFixed(3))} ${c(p.p90.toFixed(3))} ${c(p.p99.toFixed(3))} ${c(p.p999.toFixed(3))} ${c(p.max.toFixed(3))} ${c(p.mean.toFixed(3))}`);
  }
  if (r.redis) {
    L.push(`  redis cpu              ${r.redis.cpu_s.toFixed(2)} s (${Math.round(r.redis.cpu_util * 100)}% of a core), ${r.redis.cpu_us_per_task.toFixed(1)} us/job`);
    L.push(`  redis commands         ${r.redis.commands} (${r.redis.commands_per_task.toFixed(2)}/job)`);
    for (const t of r.redis.top.slice(0, 8)) {
      L.push(`    ${t.cmd.padEnd(20)} ${t.calls_per_task.toFixed(2)} calls/job, ${t.usec_per_task.toFixed(2)} us/job`);
    }
  }
  if (r.host) {
    const p = r.host.cpu_pressure_pct;
    L.push(`  host                   ${r.host.cpus} cpus, load ${r.host.loadavg_1m.toFixed(2)}, run-queue wait of the measured processes ${r.host.runq_wait_s.toFixed(2)} s, cpu pressure ${p === null ? 'n/a' : `${p}% of the window`}`);
  }
  for (const pr of r.processes) {
    L.push(`  ${`${pr.name} [${pr.pid}]`.padEnd(22)} rss ${pr.rss_kb} KiB, peak ${pr.hwm_kb} KiB, cpu ${pr.cpu_s.toFixed(2)} s (${pr.cpu_us_per_task.toFixed(1)} us/job), waited for a cpu ${pr.runq_wait_s.toFixed(2)} s`);
  }
  return L.join('\n');
}

async function main() {
  const args = parseArgs(process.argv);
  const { Worker } = require('bullmq');
  const IORedis = require('ioredis');
  const queueName = `fleet-bench-${process.pid}`;
  const info = new IORedis(args.redisUrl, { maxRetriesPerRequest: null });

  const sab = new SharedArrayBuffer(8 * 4);
  const counters = new Int32Array(sab);
  const samples = [];
  let completed = 0;
  // Set once everything is connected.
  let start = Infinity;
  let windowStart = Infinity;
  let windowEnd = Infinity;

  const noop = async (job) => {
    const at = nowMs();
    const t = job.data.t;
    if (t >= windowStart && t < windowEnd) samples.push(at - t);
    if (at >= windowStart && at < windowEnd) completed++;
    Atomics.add(counters, DONE, 1);
    Atomics.notify(counters, DONE);
  };
  // --round-trip: one progress update (the chunk), then the payload back (the result).
  const echo = async (job) => {
    await job.updateProgress(job.data);
    return job.data;
  };
  const worker = new Worker(queueName, args.roundTrip ? echo : noop, {
    ...queueOpts(args),
    concurrency: args.workerConcurrency,
  });
  worker.on('error', (e) => console.error('worker error:', e.message));
  await worker.waitUntilReady();

  const timetable = () => {
    start = nowMs() + 200;
    windowStart = start + args.warmup * 1000;
    windowEnd = windowStart + args.duration * 1000;
    return { start, windowStart, windowEnd };
  };
  let producerDone;
  let th = null;
  let heard = null;
  let events = null;
  if (args.singleThread) {
    const q = await openQueue(args, queueName);
    events = args.roundTrip ? await openEvents(args, queueName) : null;
    const times = timetable();
    heard = events ? listen(events, times, counters) : null;
    producerDone = produce(q, { args, ...times, counters }).then(async () => {
      await sleep(200);
      await q.close();
    });
  } else {
    th = new Thread(__filename, { workerData: { args, queueName, sab } });
    let ready;
    const isReady = new Promise((r) => (ready = r));
    producerDone = new Promise((resolve, reject) => {
      th.on('message', (m) => {
        if (m === 'ready') ready();
        else if (m && m.done) {
          heard = m.heard;
          resolve();
        } else reject(new Error(m));
      });
      th.on('error', reject);
    });
    await Promise.race([isReady, producerDone]);
    th.postMessage(timetable());
  }

  const cpuAt = () => {
    const u = process.cpuUsage();
    return (u.user + u.system) / 1e6;
  };
  await sleep(Math.max(0, windowStart - nowMs()));
  const r0 = await snapshot(info);
  const c0 = cpuAt();
  const own0 = procTimes(process.pid);
  const red0 = args.redisPid ? procTimes(args.redisPid) : null;
  const psi0 = pressureUs();
  const t0 = nowMs();
  await sleep(Math.max(0, windowEnd - nowMs()));
  const r1 = await snapshot(info);
  const c1 = cpuAt();
  const own1 = procTimes(process.pid);
  const red1 = args.redisPid ? procTimes(args.redisPid) : null;
  const psi1 = pressureUs();
  const t1 = nowMs();
  const doneInWindow = args.roundTrip ? Atomics.load(counters, HEARD) : completed;

  // Drain: every job of the window processed (--round-trip: heard complete by the client).
  const finals = () => (args.roundTrip ? Atomics.load(counters, WINDOW_FINALS) : samples.length);
  const giveUp = nowMs() + args.drain * 1000;
  while (nowMs() < giveUp && finals() < Atomics.load(counters, OFFERED)) await sleep(20);
  if (th && args.roundTrip) th.postMessage('finish');
  await producerDone;
  if (events) await events.close();
  const offered = Atomics.load(counters, OFFERED);
  const incomplete = Math.max(0, offered - finals());
  const latency = heard
    ? { final: percentiles(heard.final), first_chunk: percentiles(heard.first) }
    : { final: percentiles(samples) };
  const mem = procStatus(process.pid);

  await worker.close(true);
  try {
    const { Queue } = require('bullmq');
    const q = new Queue(queueName, { connection: connection(args.redisUrl) });
    await q.obliterate({ force: true });
    await q.close();
  } catch (e) {
    console.error('cleanup:', e.message);
  }
  await info.quit();

  const secs = args.duration;
  const cpu = Math.max(0, c1 - c0);
  const report = {
    kind: 'fleet-bench-report',
    mode: args.roundTrip ? 'bullmq-round-trip' : 'bullmq',
    label: args.label,
    system: 'bullmq',
    config: {
      load: args.rate > 0 ? `${args.rate}/s` : `max (closed loop, ${args.concurrency} in flight)`,
      rate: args.rate > 0 ? args.rate : null,
      concurrency: args.rate > 0 ? null : args.concurrency,
      worker_concurrency: args.workerConcurrency,
      payload_bytes: args.payloadBytes,
      duration_s: args.duration,
      warmup_s: args.warmup,
      threads: args.singleThread ? 1 : 2,
      bullmq: require('bullmq/package.json').version,
      ioredis: require('ioredis/package.json').version,
      node: process.version,
      job_options: 'removeOnComplete, removeOnFail',
      round_trip: args.roundTrip,
      events_max_len: args.roundTrip ? EVENTS_MAX_LEN : null,
    },
    window_s: secs,
    offered,
    completed: doneInWindow,
    throughput_per_s: Math.round(doneInWindow / secs),
    errors: Atomics.load(counters, ADD_ERRORS),
    incomplete,
    latency_ms: latency,
    redis: redisCost(r0, r1, secs, doneInWindow),
    processes: [
      {
        name: args.roundTrip ? 'node (bullmq client + worker)' : 'node (bullmq producer + worker)',
        pid: process.pid,
        rss_kb: mem.rss,
        hwm_kb: mem.hwm,
        cpu_s: r3(cpu),
        runq_wait_s: r3(Math.max(0, own1.wait - own0.wait)),
        cpu_us_per_task: doneInWindow > 0 ? r2((cpu * 1e6) / doneInWindow) : 0,
      },
    ].concat(
      red0 && red1
        ? [
            {
              name: 'redis-server',
              pid: args.redisPid,
              rss_kb: procStatus(args.redisPid).rss,
              hwm_kb: procStatus(args.redisPid).hwm,
              cpu_s: r3(red1.cpu - red0.cpu),
              runq_wait_s: r3(Math.max(0, red1.wait - red0.wait)),
              cpu_us_per_task: doneInWindow > 0 ? r2(((red1.cpu - red0.cpu) * 1e6) / doneInWindow) : 0,
            },
          ]
        : [],
    ),
    bench_cpu_s: r3(cpu),
    host: {
      cpu_pressure_pct: psi0 !== null && psi1 !== null ? Math.round(((psi1 - psi0) / ((t1 - t0) * 1000)) * 100) : null,
      loadavg_1m: Number(fs.readFileSync('/proc/loadavg', 'utf8').split(' ')[0]),
      runq_wait_s: r3(Math.max(0, own1.wait - own0.wait) + (red0 && red1 ? Math.max(0, red1.wait - red0.wait) : 0)),
      cpus: require('node:os').cpus().length,
    },
    extra: { queue: queueName },
  };
  console.log(table(report));
  const line = JSON.stringify(report);
  console.log(line);
  if (args.jsonOut) fs.appendFileSync(args.jsonOut, line + '\n');
  process.exit(0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
