// Key release through a real server process on loopback: signed, batched
// POST /v1/device/keys from 1, 10 and 100 devices, each with its own
// DeviceClient (keep-alive HTTPS agent) and lease. Prints keys/s and latency
// per load, each divided by the raw crypto_box_seal rate measured in the same
// run (bench/lib/yardstick.ts), then whether the targets hold.
//
//   node --import tsx bench/key-release.ts [--batch 64] [--seconds 10] [--warmup 1]
//                                          [--offered 5000] [--json]
//
// Closed loop: every device sends its next request as soon as the last one
// answers, so the server is saturated and latency is mostly queueing.
// Open loop: requests arrive at random (Poisson) times at a fixed total rate
// (--offered keys/s) spread over the devices; latency counts from the
// scheduled send time, so a late send is not hidden.
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { closeIdentity } from '../agent/index.js';
import { table } from '../cli/output.js';
import { DISK_CHUNK_SIZE, MAX_BATCH, MEM_CHUNK_SIZE, STATE_CHUNK_SIZE } from '../common/constants.js';
import { openSealed, wipe } from '../common/crypto.js';
import { errorChain } from '../common/errors.js';
import { assign, enrolledDevice, pushImage, type TestDevice } from '../test/helpers/fixtures.js';
import { startServer, type ServerProc } from '../test/helpers/proc.js';
import { cpuMeter, percentile, sortedCopy } from './lib/stats.js';
import { sealRate, type Rate } from './lib/yardstick.js';

const IMAGE = 'bench-key-release';
const DEVICE_COUNTS = [1, 10, 100] as const;
const ENROLL_GROUP = 10;
const TARGET_KEYS_PER_SEC = 5000;
const TARGET_P99_MS = 20;
const TARGET_DEVICES = 100;
/** Other work on the machine skews every number; the report shows how busy it was. */
const loadAtStart = os.loadavg()[0];

interface Opts {
  batch: number;
  seconds: number;
  warmup: number;
  offered: number;
  pages: number;
  json: boolean;
}

interface Device {
  t: TestDevice;
  lease: string;
  /** First page this device asks for, so devices do not all ask for the same keys. */
  offset: number;
  sent: number;
}

interface Phase {
  load: 'closed' | 'open';
  devices: number;
  batch: number;
  /** keys/s offered, open loop only */
  offered?: number;
}

interface Row extends Phase {
  requests: number;
  keysPerSec: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
  /** keys/s ÷ raw crypto_box_seal/s */
  vsSeal: number;
  serverCpuPercent: number | null;
  benchCpuPercent: number;
}

function usage(msg: string): never {
  process.stderr.write(`lethe bench: error: ${msg}\n`);
  process.stderr.write('lethe bench: hint: node --import tsx bench/key-release.ts [--batch 64] [--seconds 10] [--warmup 1] [--offered 5000] [--json]\n');
  process.exit(2);
}

function positive(name: string, v: string, max = Infinity): number {
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0 || n > max) usage(`--${name} must be a number in (0, ${max}], got '${v}'`);
  return n;
}

function parseOpts(): Opts {
  let a;
  try {
    a = parseArgs({
      options: {
        batch: { type: 'string', default: '64' },
        seconds: { type: 'string', default: '10' },
        warmup: { type: 'string', default: '1' },
        offered: { type: 'string', default: String(TARGET_KEYS_PER_SEC) },
        json: { type: 'boolean', default: false },
      },
    }).values;
  } catch (e) {
    usage((e as Error).message);
  }
  const batch = positive('batch', a.batch!, MAX_BATCH);
  if (!Number.isInteger(batch)) usage(`--batch must be an integer, got '${a.batch}'`);
  return {
    batch,
    seconds: positive('seconds', a.seconds!, 60),
    warmup: positive('warmup', a.warmup!, 30),
    offered: positive('offered', a.offered!),
    pages: Math.max(256, batch), // every key in a batch is a distinct stored page
    json: a.json!,
  };
}

const progress = (opts: Opts, msg: string) => {
  if (!opts.json || process.stderr.isTTY) process.stderr.write(`lethe bench: ${msg}\n`);
};

/** `n` pages of random bytes: none is zero, so every page is a stored (sensitive) memory chunk. */
function memoryOf(pages: number): Buffer {
  return randomBytes(pages * MEM_CHUNK_SIZE);
}

/** One release of `batch` consecutive pages (wrapping), as a device faulting in a run of memory would. */
async function release(d: Device, batch: number, pages: number): Promise<void> {
  const start = (d.offset + d.sent++ * batch) % pages;
  const chunks = Array.from({ length: batch }, (_, j) => ({ kind: 'mem' as const, index: (start + j) % pages }));
  const res = await d.t.client.keys(d.lease, chunks);
  if (res.chunks.length !== batch) throw new Error(`asked for ${batch} keys, got ${res.chunks.length}`);
}

/** Checks once per device that a release opens with its box key to one sensitive key per page asked for. */
async function verifyRelease(d: Device, batch: number): Promise<void> {
  const chunks = Array.from({ length: batch }, (_, j) => ({ kind: 'mem' as const, index: j }));
  const res = await d.t.client.keys(d.lease, chunks);
  const keys = openSealed(d.t.id.box, Buffer.from(res.sealed, 'base64url'));
  try {
    if (keys.length !== batch * 32) throw new Error(`sealed keys are ${keys.length} bytes, expected ${batch * 32}`);
    if (res.chunks.some((c) => c.cls !== 'sensitive')) throw new Error('memory chunks were not released as sensitive');
  } finally {
    wipe(keys);
  }
}

async function enrollOne(s: ServerProc, i: number, opts: Opts): Promise<Device> {
  const t = await enrolledDevice(s, `bench-${i}`);
  try {
    await assign(s, t.deviceId, IMAGE);
    const lease = await t.client.lease(IMAGE);
    const d: Device = { t, lease: lease.leaseId, offset: (i * 37) % opts.pages, sent: 0 };
    await verifyRelease(d, opts.batch);
    return d;
  } catch (e) {
    dropDevice(t);
    throw e;
  }
}

function dropDevice(t: TestDevice): void {
  t.close();
  closeIdentity(t.id);
  fs.rmSync(t.home, { recursive: true, force: true });
}

/** Enrolls `n` devices through the real API, ENROLL_GROUP at a time; each takes a lease. */
async function enrollAll(s: ServerProc, n: number, opts: Opts, into: Device[]): Promise<void> {
  for (let i = 0; i < n; i += ENROLL_GROUP) {
    const group = await Promise.allSettled(Array.from({ length: Math.min(ENROLL_GROUP, n - i) }, (_, j) => enrollOne(s, i + j, opts)));
    for (const r of group) if (r.status === 'fulfilled') into.push(r.value);
    const failed = group.find((r) => r.status === 'rejected');
    if (failed) throw new Error(`failed to enroll bench device ${into.length}`, { cause: failed.reason });
  }
}

/**
 * Times requests that start inside the measured window and counts replies that
 * arrive inside it; the CPU meter covers the same window. The warm-up starts
 * when this is called and the window follows it.
 */
function recorder(opts: Opts, serverPid: number) {
  const start = performance.now() + opts.warmup * 1000;
  const end = start + opts.seconds * 1000;
  const latencies: number[] = [];
  let completed = 0;
  let meter: ReturnType<typeof cpuMeter> | undefined;
  let cpu: ReturnType<ReturnType<typeof cpuMeter>> | undefined;
  const t1 = setTimeout(() => (meter = cpuMeter(serverPid)), opts.warmup * 1000);
  const t2 = setTimeout(() => (cpu = meter?.()), (opts.warmup + opts.seconds) * 1000);
  return {
    end,
    done(sentAt: number, doneAt: number) {
      if (sentAt >= start && sentAt < end) latencies.push(doneAt - sentAt);
      if (doneAt >= start && doneAt < end) completed++;
    },
    finish(p: Phase, seal: number): Row {
      clearTimeout(t1);
      clearTimeout(t2);
      cpu ??= meter?.(); // the last reply came in before the window closed
      const sorted = sortedCopy(latencies);
      const keysPerSec = (completed * p.batch) / opts.seconds;
      return {
        ...p,
        requests: latencies.length,
        keysPerSec,
        p50Ms: percentile(sorted, 50),
        p99Ms: percentile(sorted, 99),
        maxMs: sorted[sorted.length - 1] ?? NaN,
        vsSeal: keysPerSec / seal,
        serverCpuPercent: cpu?.otherPercent ?? null,
        benchCpuPercent: cpu?.selfPercent ?? NaN,
      };
    },
  };
}

async function closedLoop(devs: Device[], p: Phase, opts: Opts, s: ServerProc, seal: number): Promise<Row> {
  const rec = recorder(opts, s.proc.pid!);
  await Promise.all(
    devs.map(async (d) => {
      for (;;) {
        const t0 = performance.now();
        if (t0 >= rec.end) return;
        await release(d, p.batch, opts.pages);
        rec.done(t0, performance.now());
      }
    }),
  );
  return rec.finish(p, seal);
}

async function openLoop(devs: Device[], p: Phase, opts: Opts, s: ServerProc, seal: number): Promise<Row> {
  const rec = recorder(opts, s.proc.pid!);
  const meanGapMs = (1000 * p.batch) / p.offered!;
  const inflight: Promise<void>[] = [];
  let failure: unknown;
  let next = performance.now();
  for (let j = 0; next < rec.end && failure === undefined; j++) {
    const wait = next - performance.now();
    if (wait > 0) await sleep(wait);
    const sentAt = next;
    inflight.push(
      release(devs[j % devs.length], p.batch, opts.pages).then(
        () => rec.done(sentAt, performance.now()),
        (e) => void (failure ??= e),
      ),
    );
    next += -Math.log(1 - Math.random()) * meanGapMs; // exponential gaps: Poisson arrivals
  }
  await Promise.all(inflight);
  if (failure !== undefined) throw failure;
  return rec.finish(p, seal);
}

function phases(opts: Opts): Phase[] {
  return [
    { load: 'closed', devices: 1, batch: 1 },
    ...DEVICE_COUNTS.map((devices) => ({ load: 'closed' as const, devices, batch: opts.batch })),
    { load: 'open', devices: TARGET_DEVICES, batch: opts.batch, offered: opts.offered },
  ];
}

const fmt = (n: number, digits = 0) => (Number.isFinite(n) ? n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits }) : '-');
const ratio = (r: number) => (r >= 10 ? r.toFixed(1) : r >= 0.1 ? r.toFixed(2) : r.toFixed(3));
const loadName = (r: Row) => (r.load === 'closed' ? 'closed' : `open ${fmt(r.offered!)}/s`);

function targets(rows: Row[], opts: Opts) {
  const batched = rows.filter((r) => r.load === 'closed' && r.batch > 1);
  const worst = Math.min(...batched.map((r) => r.keysPerSec));
  const closed = rows.find((r) => r.load === 'closed' && r.devices === TARGET_DEVICES && r.batch === opts.batch)!;
  const open = rows.find((r) => r.load === 'open')!;
  return {
    keysPerSec: { want: TARGET_KEYS_PER_SEC, worstBatched: worst, holds: worst >= TARGET_KEYS_PER_SEC },
    p99At100Devices: {
      wantMs: TARGET_P99_MS,
      closedLoopMs: closed.p99Ms,
      holds: closed.p99Ms <= TARGET_P99_MS,
      openLoop: { offeredKeysPerSec: open.offered!, achievedKeysPerSec: open.keysPerSec, p99Ms: open.p99Ms, holds: open.p99Ms <= TARGET_P99_MS },
    },
  };
}

function report(opts: Opts, seals: Rate[], seal: number, rows: Row[]): string {
  const t = targets(rows, opts);
  const yes = (b: boolean) => (b ? 'holds' : 'MISSES');
  const batched = rows.filter((r) => r.load === 'closed' && r.batch > 1);
  return [
    `key release: node ${process.version}, ${os.cpus().length} cpus (${os.cpus()[0]?.model.trim() ?? '?'}), load average ${loadAtStart.toFixed(2)} at start, ` +
      `${opts.seconds} s a load after ${opts.warmup} s warm-up`,
    `yardstick: raw crypto_box_seal of 32 bytes, in-process: ${fmt(seal)} seals/s (${seals.map((r) => fmt(r.perSec)).join(' before, ')} after)`,
    '',
    table(
      ['load', 'devices', 'batch', 'requests', 'keys/s', 'p50 ms', 'p99 ms', 'max ms', 'keys/s ÷ seals/s', 'server cpu', 'bench cpu'],
      rows.map((r) => [
        loadName(r),
        r.devices,
        r.batch,
        fmt(r.requests),
        fmt(r.keysPerSec),
        fmt(r.p50Ms, 2),
        fmt(r.p99Ms, 2),
        fmt(r.maxMs, 1),
        ratio(r.vsSeal),
        r.serverCpuPercent === null ? null : `${fmt(r.serverCpuPercent)}%`,
        `${fmt(r.benchCpuPercent)}%`,
      ]),
    ),
    '',
    `target ≥ ${fmt(TARGET_KEYS_PER_SEC)} sealed keys/s batched: ${yes(t.keysPerSec.holds)} (` +
      batched.map((r) => `${r.devices} dev ${fmt(r.keysPerSec)}`).join(', ') +
      ')',
    `target p99 ≤ ${TARGET_P99_MS} ms at ${TARGET_DEVICES} devices, closed loop: ${yes(t.p99At100Devices.holds)} (p99 ${fmt(t.p99At100Devices.closedLoopMs, 1)} ms)`,
    `target p99 ≤ ${TARGET_P99_MS} ms at ${TARGET_DEVICES} devices, open loop at ${fmt(opts.offered)} keys/s: ${yes(t.p99At100Devices.openLoop.holds)} ` +
      `(p99 ${fmt(t.p99At100Devices.openLoop.p99Ms, 1)} ms, ${fmt(t.p99At100Devices.openLoop.achievedKeysPerSec)} keys/s served)`,
  ].join('\n');
}

async function run(opts: Opts, s: ServerProc, devs: Device[]): Promise<void> {
  progress(opts, `server ${s.url} (pid ${s.proc.pid}); pushing ${opts.pages} memory pages`);
  await pushImage(s, IMAGE, {
    plain: { mem: memoryOf(opts.pages), disk: randomBytes(DISK_CHUNK_SIZE), state: randomBytes(STATE_CHUNK_SIZE) },
  });
  progress(opts, `enrolling ${TARGET_DEVICES} devices, ${ENROLL_GROUP} at a time`);
  await enrollAll(s, Math.max(...DEVICE_COUNTS), opts, devs);

  const seals = [sealRate(1000)];
  const rows: Row[] = [];
  for (const p of phases(opts)) {
    progress(opts, `${p.load} loop: ${p.devices} device${p.devices === 1 ? '' : 's'}, batch ${p.batch}${p.offered ? `, ${fmt(p.offered)} keys/s offered` : ''}`);
    const drive = p.load === 'closed' ? closedLoop : openLoop;
    rows.push(await drive(devs.slice(0, p.devices), p, opts, s, seals[0].perSec));
  }
  seals.push(sealRate(1000));
  const seal = seals.reduce((a, r) => a + r.perSec, 0) / seals.length;
  for (const r of rows) r.vsSeal = r.keysPerSec / seal;

  if (opts.json) {
    const env = { node: process.version, cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model.trim() ?? null, loadAverageAtStart: loadAtStart };
    const { json: _, ...o } = opts;
    process.stdout.write(
      JSON.stringify({ bench: 'key-release', env, opts: o, yardstick: { sealsPerSec: seal, runs: seals }, rows, targets: targets(rows, opts) }) + '\n',
    );
  } else {
    process.stdout.write(report(opts, seals, seal, rows) + '\n');
  }
}

/** Whether the server died, and the first lines it wrote that look like a reason (a native abort prints a long stack). */
function serverState(s: ServerProc): string {
  const { exitCode, signalCode } = s.proc;
  const died = signalCode ? `the server process died (${signalCode})` : exitCode !== null ? `the server process exited (${exitCode})` : '';
  const why = s
    .stderr()
    .split('\n')
    .filter((l) => /error|assert|fatal|abort/i.test(l))
    .slice(0, 3)
    .map((l) => l.trim());
  const parts = [died, ...why].filter(Boolean);
  return parts.length ? ` (${parts.join('; ')})` : '';
}

async function main(): Promise<void> {
  const opts = parseOpts();
  progress(opts, 'starting a server process');
  // The server's capacity is what is measured: its rate limits (one device or one
  // address past a few hundred requests a second) would cut the closed loops short.
  const s = await startServer({ runArgs: ['--rate-enroll', 'off', '--rate-device', 'off', '--rate-device-address', 'off'] });
  const devs: Device[] = [];
  // A signal to the bench alone would orphan the server.
  const onSignal = (sig: NodeJS.Signals) => {
    s.proc.kill('SIGTERM');
    process.exit(sig === 'SIGINT' ? 130 : 143);
  };
  process.once('SIGINT', onSignal).once('SIGTERM', onSignal);
  try {
    await run(opts, s, devs);
  } catch (e) {
    // A request fails as soon as the connection drops, a moment before the exit is reported.
    if (s.proc.exitCode === null && s.proc.signalCode === null) await Promise.race([once(s.proc, 'exit'), sleep(500)]);
    throw new Error(`key release bench failed${serverState(s)}`, { cause: e });
  } finally {
    for (const d of devs) dropDevice(d.t);
    await s.stop();
    fs.rmSync(path.dirname(s.dir), { recursive: true, force: true });
    process.off('SIGINT', onSignal).off('SIGTERM', onSignal);
  }
}

main().catch((e) => {
  process.stderr.write(`lethe bench: error: ${errorChain(e)}\n`);
  process.exitCode = 1;
});
