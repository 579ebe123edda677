// The fleet server's storage beside the embedded one, in one run: key releases
// (signed, batched POST /v1/device/keys, each audited in its own transaction) from
// 100 devices, and chunk serving, for
//   sqlite  one server process on SQLite files (the yardstick),
//   pg-1    one replica on PostgreSQL (the private test cluster, fsync on),
//   pg-2    two replicas on the same database, devices split between them.
// Closed loop (each device sends its next request when the last answers: capacity)
// and open loop (Poisson arrivals at --offered keys/s: latency at a fixed load).
// Each setup runs --warmup seconds of closed loop first, not counted: what is
// measured is a server past its JIT warm-up, as a fleet's runs all day. The CPU
// the closed loop took is split between the servers, PostgreSQL and this client.
//
//   node --import tsx bench/fleet.ts [--devices 100] [--batch 64] [--seconds 8] [--warmup 3] [--offered 2000] [--setups sqlite,pg-1,pg-2] [--json]
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { DeviceClient } from '../agent/index.js';
import { table } from '../cli/output.js';
import { DISK_CHUNK_SIZE, MEM_CHUNK_SIZE, STATE_CHUNK_SIZE } from '../common/constants.js';
import { assign, enrolledDevice, pushImage, type TestDevice } from '../test/helpers/fixtures.js';
import { freshDatabase } from '../test/helpers/pg.js';
import { startServer, tmpDir, type ServerProc } from '../test/helpers/proc.js';
import { percentile, processCpuSeconds, selfCpuSeconds, sortedCopy } from './lib/stats.js';

const { values } = parseArgs({
  options: {
    devices: { type: 'string', default: '100' },
    batch: { type: 'string', default: '64' },
    seconds: { type: 'string', default: '8' },
    warmup: { type: 'string', default: '3' },
    offered: { type: 'string', default: '2000' },
    pages: { type: 'string', default: '1024' },
    setups: { type: 'string', default: 'sqlite,pg-1,pg-2' },
    json: { type: 'boolean', default: false },
  },
});
const DEVICES = Number(values.devices);
const BATCH = Number(values.batch);
const SECONDS = Number(values.seconds);
const WARMUP = Number(values.warmup);
const OFFERED = Number(values.offered);
const PAGES = Number(values.pages);
const IMAGE = 'bench-fleet';
const UNLIMITED = ['--rate-enroll', 'off', '--rate-device', 'off', '--rate-device-address', 'off', '--max-connections', '4096'];
const loadAtStart = os.loadavg()[0];

type Setup = 'sqlite' | 'pg-1' | 'pg-2';

interface Dev {
  t: TestDevice;
  client: DeviceClient;
  lease: string;
  offset: number;
}

interface Result {
  setup: Setup;
  closedKeysPerSec: number;
  closedP50: number;
  closedP99: number;
  openKeysPerSec: number;
  openP50: number;
  openP99: number;
  serveMBps: number;
  /** CPU of the closed loop, in percent of one core: servers, PostgreSQL's processes, this client. */
  cpu: { servers: number; postgres: number; client: number };
}

const say = (m: string) => values.json || process.stderr.write(`bench: ${m}\n`);

async function servers(setup: Setup): Promise<ServerProc[]> {
  const db = setup === 'sqlite' ? [] : ['--db', freshDatabase('bench')];
  const first = await startServer({ db, runArgs: UNLIMITED });
  if (setup !== 'pg-2') return [first];
  const dir = path.join(tmpDir('lethe-replica-'), 'data');
  fs.cpSync(first.dir, dir, { recursive: true });
  return [first, await startServer({ dir, adminToken: first.adminToken, auditKey: first.auditKey, runArgs: UNLIMITED })];
}

async function devices(ss: ServerProc[]): Promise<Dev[]> {
  const mem = randomBytes(PAGES * MEM_CHUNK_SIZE);
  await pushImage(ss[0], IMAGE, { plain: { mem, disk: randomBytes(DISK_CHUNK_SIZE), state: randomBytes(STATE_CHUNK_SIZE) } });
  const out: Dev[] = [];
  for (let i = 0; i < DEVICES; i += 10) {
    const group = await Promise.all(
      Array.from({ length: Math.min(10, DEVICES - i) }, async (_, k) => {
        const n = i + k;
        const s = ss[n % ss.length];
        const t = await enrolledDevice(ss[0], `bench-${n}`);
        await assign(ss[0], t.deviceId, IMAGE);
        const client = s === ss[0] ? t.client : new DeviceClient({ ...t.id, info: { ...t.id.info, server: s.url } });
        const lease = (await client.lease(IMAGE)).leaseId;
        return { t, client, lease, offset: (n * BATCH) % PAGES };
      }),
    );
    out.push(...group);
  }
  return out;
}

function refs(d: Dev, round: number) {
  const start = (d.offset + round * BATCH) % PAGES;
  return Array.from({ length: BATCH }, (_, i) => ({ kind: 'mem' as const, index: (start + i) % PAGES }));
}

/** CPU seconds used so far by every process named `postgres` (the test cluster's server and backends). */
function postgresCpuSeconds(): number {
  let total = 0;
  for (const pid of fs.readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
    try {
      if (fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === 'postgres') total += processCpuSeconds(Number(pid)) ?? 0;
    } catch {
      // gone meanwhile
    }
  }
  return total;
}

/** Snapshots the CPU of the servers, PostgreSQL and this process; the returned call gives percent of one core since. */
function cpuSplit(ss: ServerProc[]) {
  const used = () => ({ servers: ss.reduce((n, s) => n + (processCpuSeconds(s.proc.pid!) ?? 0), 0), postgres: postgresCpuSeconds(), client: selfCpuSeconds() });
  const t0 = performance.now();
  const a = used();
  return () => {
    const wall = (performance.now() - t0) / 1000;
    const b = used();
    return { servers: (100 * (b.servers - a.servers)) / wall, postgres: (100 * (b.postgres - a.postgres)) / wall, client: (100 * (b.client - a.client)) / wall };
  };
}

async function closedLoop(devs: Dev[], seconds = SECONDS): Promise<{ keysPerSec: number; lat: number[] }> {
  const lat: number[] = [];
  const end = performance.now() + seconds * 1000;
  let keys = 0;
  const t0 = performance.now();
  await Promise.all(
    devs.map(async (d) => {
      for (let round = 0; performance.now() < end; round++) {
        const t = performance.now();
        await d.client.keys(d.lease, refs(d, round));
        lat.push(performance.now() - t);
        keys += BATCH;
      }
    }),
  );
  return { keysPerSec: keys / ((performance.now() - t0) / 1000), lat };
}

async function openLoop(devs: Dev[]): Promise<{ keysPerSec: number; lat: number[] }> {
  const lat: number[] = [];
  const perSec = OFFERED / BATCH;
  const t0 = performance.now();
  const end = t0 + SECONDS * 1000;
  const pending: Promise<void>[] = [];
  let at = t0;
  let keys = 0;
  for (let i = 0; at < end; i++) {
    at += (-Math.log(1 - Math.random()) / perSec) * 1000;
    const wait = at - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    const d = devs[i % devs.length];
    const scheduled = at;
    pending.push(
      d.client.keys(d.lease, refs(d, i)).then(() => {
        lat.push(performance.now() - scheduled);
        keys += BATCH;
      }),
    );
  }
  await Promise.all(pending);
  return { keysPerSec: keys / ((performance.now() - t0) / 1000), lat };
}

/** Chunks served, 16 per request, from 10 devices at once: MB/s of ciphertext. */
async function serve(devs: Dev[]): Promise<number> {
  const end = performance.now() + (SECONDS * 1000) / 2;
  const t0 = performance.now();
  let bytes = 0;
  await Promise.all(
    devs.slice(0, 10).map(async (d) => {
      for (let round = 0; performance.now() < end; round++) {
        const start = (d.offset + round * 16) % PAGES;
        const blobs = await d.client.chunks(d.lease, Array.from({ length: 16 }, (_, i) => ({ kind: 'mem' as const, index: (start + i) % PAGES })));
        for (const b of blobs) bytes += b.length;
      }
    }),
  );
  return bytes / 1e6 / ((performance.now() - t0) / 1000);
}

async function measure(setup: Setup): Promise<Result> {
  say(`${setup}: starting, enrolling ${DEVICES} devices`);
  const ss = await servers(setup);
  const devs: Dev[] = [];
  try {
    devs.push(...(await devices(ss)));
    say(`${setup}: warm-up, ${WARMUP} s`);
    if (WARMUP > 0) await closedLoop(devs, WARMUP);
    say(`${setup}: closed loop`);
    const cpu = cpuSplit(ss);
    const closed = await closedLoop(devs);
    const closedCpu = cpu();
    say(`${setup}: open loop at ${OFFERED} keys/s`);
    const open = await openLoop(devs);
    say(`${setup}: chunk serving`);
    const serveMBps = await serve(devs);
    const c = sortedCopy(closed.lat);
    const o = sortedCopy(open.lat);
    return {
      setup,
      closedKeysPerSec: closed.keysPerSec,
      closedP50: percentile(c, 50),
      closedP99: percentile(c, 99),
      openKeysPerSec: open.keysPerSec,
      openP50: percentile(o, 50),
      openP99: percentile(o, 99),
      serveMBps,
      cpu: closedCpu,
    };
  } finally {
    for (const d of devs) {
      if (d.client !== d.t.client) d.client.close();
      d.t.close();
    }
    for (const s of ss) await s.stop();
  }
}

const results: Result[] = [];
for (const setup of values.setups!.split(',') as Setup[]) results.push(await measure(setup));
const by = (s: Setup) => results.find((r) => r.setup === s) ?? ({ closedKeysPerSec: NaN, serveMBps: NaN } as Result);
const ratios = {
  pg1VsSqliteClosed: by('pg-1').closedKeysPerSec / by('sqlite').closedKeysPerSec,
  pg2VsPg1Closed: by('pg-2').closedKeysPerSec / by('pg-1').closedKeysPerSec,
  pg1VsSqliteServe: by('pg-1').serveMBps / by('sqlite').serveMBps,
};
if (values.json) {
  console.log(JSON.stringify({ loadAtStart, devices: DEVICES, batch: BATCH, offered: OFFERED, warmup: WARMUP, results, ratios }, null, 2));
} else {
  const f = (n: number, d = 0) => n.toFixed(d);
  console.log(`load average at start ${loadAtStart.toFixed(2)}; ${DEVICES} devices, ${BATCH} keys a request, ${os.cpus().length} cores shared by servers, PostgreSQL and this client`);
  console.log(
    table(
      ['setup', 'closed keys/s', 'p50 ms', 'p99 ms', `open ${OFFERED}/s: keys/s`, 'p50 ms', 'p99 ms', 'serve MB/s'],
      results.map((r) => [r.setup, f(r.closedKeysPerSec), f(r.closedP50, 1), f(r.closedP99, 1), f(r.openKeysPerSec), f(r.openP50, 1), f(r.openP99, 1), f(r.serveMBps, 1)]),
    ),
  );
  console.log(`closed loop CPU, % of one core (${os.cpus().length} cores): ${results.map((r) => `${r.setup}: servers ${f(r.cpu.servers)}, PostgreSQL ${f(r.cpu.postgres)}, client ${f(r.cpu.client)}`).join('; ')}`);
  console.log(`PostgreSQL one replica ÷ SQLite, closed loop: ${ratios.pg1VsSqliteClosed.toFixed(2)}× (target ≥ 0.7×)`);
  console.log(`two replicas ÷ one, closed loop: ${ratios.pg2VsPg1Closed.toFixed(2)}× (target ≥ 1.3×)`);
  console.log(`chunk serving, PostgreSQL ÷ SQLite: ${ratios.pg1VsSqliteServe.toFixed(2)}×`);
}
