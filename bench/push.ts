// Command to acknowledgement on the push channel (docs/push.md), at 1, 100 and
// 1,000 connected devices, beside the heartbeat path measured in the same run.
// Devices are light clients speaking the real protocol (test/helpers/push-clients.ts):
// signed upgrade, pinned TLS, every command's signature checked, acknowledged
// on the socket (push) or over signed HTTP (heartbeat).
//
//   one       a wipe to one device while the others stay connected (20 devices in turn;
//             fewer when fewer are connected)
//   fan-out   a policy change on the image every device holds a lease on: one command
//             to each device at once
//   heartbeat the same fan-out to devices without the channel, checking in every
//             --heartbeat (30 s, the agent's default), first at a random point
//
// Latency is from the admin's request leaving this process to the command's
// arrival on the device (arrive), and to the acknowledgement the server recorded
// (ack: acked_at - issued_at, ms). Also: server memory per open channel (RSS of a
// server restarted after enrollment, before and after the devices connect).
//
//   node --import tsx bench/push.ts [--devices 1,100,1000] [--heartbeat 30s] [--heartbeat-devices 100] [--db sqlite|pg] [--json]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { table } from '../cli/output.js';
import { parseDuration } from '../common/duration.js';
import { PinnedClient } from '../common/http-client.js';
import { admin, pushImage } from '../test/helpers/fixtures.js';
import { freshDatabase } from '../test/helpers/pg.js';
import { startServer, type ServerProc } from '../test/helpers/proc.js';
import { closeLight, connectLight, enrollLight, heartbeatLight, lightCall, rssOf, type LightDevice } from '../test/helpers/push-clients.js';
import { percentile, sortedCopy } from './lib/stats.js';

const { values } = parseArgs({
  options: {
    devices: { type: 'string', default: '1,100,1000' },
    heartbeat: { type: 'string', default: '30s' },
    'heartbeat-devices': { type: 'string', default: '100' },
    db: { type: 'string', default: 'sqlite' },
    json: { type: 'boolean', default: false },
  },
});
const COUNTS = values.devices.split(',').map(Number);
const HEARTBEAT_MS = parseDuration(values.heartbeat, '--heartbeat');
const HB_DEVICES = Number(values['heartbeat-devices']);
const UNLIMITED = ['--rate-enroll', 'off', '--rate-device', 'off', '--rate-device-address', 'off'];
const say = (m: string) => values.json || process.stderr.write(`bench: ${m}\n`);
const loadAtStart = os.loadavg()[0];

interface Row {
  devices: number;
  path: 'push' | 'heartbeat';
  kind: 'one' | 'fan-out';
  n: number;
  arriveP50: number;
  arriveP99: number;
  ackP50: number;
  ackP99: number;
  kibPerConnection?: number;
}

const pct = (xs: number[]) => {
  const s = sortedCopy(xs);
  return [percentile(s, 50), percentile(s, 99)];
};

async function until(fn: () => boolean, ms: number, what: string): Promise<void> {
  const t0 = Date.now();
  while (!fn()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

async function pool<T>(items: T[], n: number, fn: (x: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: n }, async () => {
    while (next < items.length) await fn(items[next++]);
  }));
}

/** A server with `n` enrolled light devices, each assigned `image` and holding a lease on it. */
async function fleet(s: ServerProc, n: number, image: string, prefix: string): Promise<LightDevice[]> {
  // Light devices keep their keys in memory only: the image lets such a device lease it.
  await pushImage(s, image, { chunks: 1, policy: 'device:\n  seal: [tpm, passphrase, none]\n' });
  const devices = await enrollLight(s, n, prefix);
  const a = admin(s);
  const http = new PinnedClient(s.url, s.fingerprint);
  try {
    await pool(devices, 16, async (d) => {
      await a.json('POST', `/devices/${d.deviceId}/assignments`, { image });
      await lightCall(http, d, 'POST', '/v1/device/leases', { image });
    });
  } finally {
    a.close();
    http.close();
  }
  return devices;
}

/** Server-side acknowledgement latency of each command id (acked_at - issued_at). */
async function ackLatencies(s: ServerProc, ids: string[]): Promise<number[]> {
  const a = admin(s);
  const out: number[] = [];
  try {
    await pool(ids, 16, async (id) => {
      const v = await a.json<{ elapsedMs?: number }>('GET', `/commands/${id}`);
      if (v.elapsedMs !== undefined) out.push(v.elapsedMs);
    });
  } finally {
    a.close();
  }
  return out;
}

/** The acknowledgement latencies of `ids`, once the server has recorded all of them. */
async function allAcked(s: ServerProc, ids: string[]): Promise<number[]> {
  for (let i = 0; ; i++) {
    const lat = await ackLatencies(s, ids);
    if (lat.length === ids.length) return lat;
    if (i > 600) throw new Error(`${ids.length - lat.length} command(s) never acknowledged`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function policyRound(s: ServerProc, image: string, devices: LightDevice[], round: number, waitMs: number): Promise<{ arrive: number[]; ids: string[] }> {
  const counts = devices.map((d) => d.got.length);
  const a = admin(s);
  const t0 = performance.now();
  try {
    await a.json('PUT', `/images/${image}/policy`, { policy: `device:\n  seal: [tpm, passphrase, none]\neviction:\n  idle: ${30 + round}s\n` });
  } finally {
    a.close();
  }
  await until(() => devices.every((d, i) => d.got.length > counts[i]), waitMs, `round ${round}: every device's command`);
  const arrive = devices.map((d, i) => d.got[counts[i]].at - t0);
  return { arrive, ids: devices.map((d, i) => d.got[counts[i]].cmd.id) };
}

async function serverFor(): Promise<ServerProc> {
  return startServer({ runArgs: UNLIMITED, ...(values.db === 'pg' ? { db: ['--db', freshDatabase()] } : {}) });
}

async function pushRows(n: number): Promise<Row[]> {
  let s = await serverFor();
  let devices: LightDevice[] = [];
  try {
    say(`${n} device(s): enrolling, leasing`);
    devices = await fleet(s, n, 'fleet', 'push');
    // A server that served nothing yet: its RSS before and after the channels open.
    await s.stop();
    s = await s.restart();
    await new Promise((r) => setTimeout(r, 2000));
    const before = rssOf(s.proc.pid!);
    const key = fs.readFileSync(path.join(s.dir, 'signing.key')).subarray(32);
    await connectLight(s, devices, key);
    await new Promise((r) => setTimeout(r, 2000));
    // Below 100 connections the difference is lost in the heap's own growth: not reported.
    const kib = n >= 100 ? (rssOf(s.proc.pid!) - before) / n / 1024 : undefined;
    say(`${n} device(s): connected${kib === undefined ? '' : `; ${kib.toFixed(1)} KiB of server memory each`}`);

    const rounds = n === 1 ? 20 : n <= 100 ? 5 : 2;
    const fan = { arrive: [] as number[], ids: [] as string[] };
    const fanAck: number[] = [];
    for (let r = 1; r <= rounds; r++) {
      const x = await policyRound(s, 'fleet', devices, r, 60_000);
      fan.arrive.push(...x.arrive);
      fan.ids.push(...x.ids);
      // The next round starts once the server has recorded every acknowledgement of this one.
      fanAck.push(...(await allAcked(s, x.ids)));
    }

    const one = { arrive: [] as number[], ids: [] as string[] };
    const a = admin(s);
    try {
      for (const d of devices.slice(0, 20)) {
        const k = d.got.length;
        const t0 = performance.now();
        await a.json('POST', `/devices/${d.deviceId}/wipe`);
        await until(() => d.got.length > k, 30_000, 'the wipe');
        one.arrive.push(d.got[k].at - t0);
        one.ids.push(d.got[k].cmd.id);
      }
    } finally {
      a.close();
    }
    const oneAck = await allAcked(s, one.ids);
    const row = (kind: 'one' | 'fan-out', arrive: number[], ack: number[]): Row => {
      const [a50, a99] = pct(arrive);
      const [k50, k99] = pct(ack);
      return { devices: n, path: 'push', kind, n: arrive.length, arriveP50: a50, arriveP99: a99, ackP50: k50, ackP99: k99, kibPerConnection: kib };
    };
    return [row('one', one.arrive, oneAck), row('fan-out', fan.arrive, fanAck)];
  } finally {
    closeLight(devices);
    await s.stop();
  }
}

async function heartbeatRow(n: number): Promise<Row> {
  const s = await serverFor();
  const http = new PinnedClient(s.url, s.fingerprint);
  let stop = () => {};
  try {
    say(`heartbeat path: ${n} device(s) checking in every ${HEARTBEAT_MS / 1000} s`);
    const devices = await fleet(s, n, 'fleet-hb', 'hb');
    const key = fs.readFileSync(path.join(s.dir, 'signing.key')).subarray(32);
    stop = heartbeatLight(http, devices, key, HEARTBEAT_MS);
    // Every device has checked in once (its phase is random): the round starts from a steady state.
    await new Promise((r) => setTimeout(r, HEARTBEAT_MS));
    const x = await policyRound(s, 'fleet-hb', devices, 1, 3 * HEARTBEAT_MS);
    const ack = await allAcked(s, x.ids);
    const [a50, a99] = pct(x.arrive);
    const [k50, k99] = pct(ack);
    return { devices: n, path: 'heartbeat', kind: 'fan-out', n: x.arrive.length, arriveP50: a50, arriveP99: a99, ackP50: k50, ackP99: k99 };
  } finally {
    stop();
    http.close();
    await s.stop();
  }
}

const rows: Row[] = [];
for (const n of COUNTS) rows.push(...(await pushRows(n)));
const hb = await heartbeatRow(HB_DEVICES);
rows.push(hb);

if (values.json) {
  console.log(JSON.stringify({ db: values.db, heartbeatMs: HEARTBEAT_MS, rows, loadAtStart, loadAtEnd: os.loadavg()[0] }));
} else {
  const f = (x: number) => (Number.isFinite(x) ? x.toFixed(x < 10 ? 1 : 0) : '-');
  console.log(
    table(
      ['devices', 'path', 'command', 'n', 'arrive p50 ms', 'arrive p99 ms', 'ack p50 ms', 'ack p99 ms', 'p99 ÷ heartbeat p99', 'KiB/conn'],
      rows.map((r) => [
        r.devices,
        r.path,
        r.kind,
        r.n,
        f(r.arriveP50),
        f(r.arriveP99),
        f(r.ackP50),
        f(r.ackP99),
        (r.ackP99 / hb.ackP99).toFixed(3),
        r.kibPerConnection === undefined ? '-' : r.kibPerConnection.toFixed(1),
      ]),
    ),
  );
  console.log(`(${values.db}; heartbeat every ${HEARTBEAT_MS / 1000} s; load average ${loadAtStart.toFixed(2)} at start, ${os.loadavg()[0].toFixed(2)} at end; 2 cores)`);
}
