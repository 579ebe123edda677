// Crash consistency of the server: a real server process is killed (SIGKILL) at a
// named point of its write paths (common/crash-point.ts) while a workload pushes
// an image version, enrolls a device, releases keys to it and takes a check-in of
// its disk writes and new device state. After each restart: nothing the server
// acknowledged is lost, devices see no half-written version, the audit chain
// verifies, and every key release a device received has its audit record.
//
// Each point gets its turn with a random arrival count; LETHE_CRASH_ITERATIONS
// runs more, and LETHE_CRASH_SEED replays a run (the seed is in the test's title).
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { CHUNK_KINDS, CHUNK_SIZE, type ChunkKind } from '../../common/constants.js';
import { startAgent, type RunningAgent } from '../../agent/daemon/start.js';
import { DeviceClient } from '../../agent/remote/device-client.js';
import { closeIdentity, loadIdentity } from '../../agent/keys/identity.js';
import { assign, enrolledDevice, pushImage, testUnlock } from '../helpers/fixtures.js';
import { lethe, startServer, tmpDir, type ServerProc } from '../helpers/proc.js';
import { serverDb } from '../helpers/server-db.js';
import type { CrashPointName } from '../../common/crash-point.js';
import { seededRandom } from '../../fuzz/ts/engine.js';

/** The server's points, and how many arrivals one round of the workload makes at most (roughly). */
const SERVER_POINTS: [CrashPointName, number][] = [
  ['sql.before-commit', 120],
  ['sql.after-commit', 120],
  ['audit.written', 10],
  ['push.chunk-stored', 50],
  ['push.committed', 1],
  ['checkin.blobs-stored', 2],
  ['checkin.carried-over', 1],
  ['checkin.done', 2],
  ['keys.released', 3],
];

const DISK_CHUNKS = 40; // 5 MiB: a check-in of 36 written chunks goes in two requests
const WRITTEN = Array.from({ length: 36 }, (_, i) => i + 2);
const IMAGE = 'crash';

type Plain = Record<ChunkKind, Buffer>;

function randomPlain(): Plain {
  return { disk: randomBytes(DISK_CHUNKS * CHUNK_SIZE.disk), mem: randomBytes(8 * CHUNK_SIZE.mem), state: randomBytes(2 * CHUNK_SIZE.state) };
}

/** What the workload started, and what the server acknowledged of it. */
interface Round {
  agent?: RunningAgent; // the workload's agent while it runs
  pushed?: Plain; // attempted
  pushAcked?: number; // its version
  deviceId?: string;
  home?: string;
  released: { leaseId: string; refs: { kind: ChunkKind; index: number }[] }[];
  base?: number; // the version the device's check-in lease was on
  writes?: { disk: Map<number, Buffer>; state: Buffer };
  checkinAcked?: number;
}

async function agentOn(home: string, log: string[]): Promise<RunningAgent> {
  const agent = await startAgent({
    home,
    image: IMAGE,
    cacheBytes: 1 << 26,
    heartbeatMs: 60_000,
    prefetch: false,
    nbd: null,
    push: false,
    unlock: testUnlock(),
    log: (l) => log.push(l),
  });
  try {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`the agent on ${home} got no lease in 60 s:\n${log.slice(-20).join('\n')}`)), 60_000);
    });
    await Promise.race([agent.lease.whenActive(), late]).finally(() => clearTimeout(timer));
  } catch (e) {
    agent.stop();
    await agent.done.catch(() => {});
    throw e;
  }
  return agent;
}

async function stopAgent(agent: RunningAgent | undefined): Promise<void> {
  if (!agent) return;
  agent.stop();
  await agent.done.catch(() => {});
}

/** One pass of the workload; each step records what the server acknowledged as soon as it answers. */
async function workload(s: ServerProc, r: Round, log: string[]): Promise<void> {
  r.pushed = randomPlain();
  r.pushAcked = (await pushImage(s, IMAGE, { plain: r.pushed })).version;
  const d = await enrolledDevice(s, 'crash-laptop');
  r.deviceId = d.deviceId;
  r.home = d.home;
  try {
    await assign(s, d.deviceId, IMAGE);
    const lease = await d.client.lease(IMAGE);
    for (const refs of [[{ kind: 'mem' as const, index: 0 }, { kind: 'mem' as const, index: 1 }], [{ kind: 'disk' as const, index: 3 }]]) {
      await d.client.keys(lease.leaseId, refs);
      r.released.push({ leaseId: lease.leaseId, refs });
    }
  } finally {
    d.close();
  }
  let agent: RunningAgent | undefined;
  try {
    agent = r.agent = await agentOn(d.home, log);
    r.base = agent.core.manifest!.version;
    r.writes = { disk: new Map(WRITTEN.map((i) => [i, randomBytes(CHUNK_SIZE.disk)])), state: randomBytes(3 * CHUNK_SIZE.state - 100) };
    for (const [i, data] of r.writes.disk) await agent.core.write('disk', i, data);
    await agent.core.replaceState(r.writes.state);
    agent.core.flush();
    const id = await loadIdentity(d.home, testUnlock());
    const client = new DeviceClient(id);
    try {
      r.checkinAcked = (await agent.core.checkin(client)).version;
    } finally {
      client.close();
      closeIdentity(id);
    }
  } finally {
    await stopAgent(agent);
  }
}

/** The device's keys in a new home with no cache: what the server gives this device, not what it kept. */
function serverView(home: string): string {
  const copy = tmpDir('lethe-crash-view-');
  for (const f of fs.readdirSync(home)) {
    if (/^cache\.db|\.sock$/.test(f)) continue;
    fs.cpSync(path.join(home, f), path.join(copy, f), { recursive: true });
  }
  return copy;
}

/** Every chunk of the version the agent's lease is on, read through it (keys released, blobs checked). */
async function readAll(agent: RunningAgent): Promise<Plain & { version: number }> {
  const core = agent.core;
  const out = { version: core.manifest!.version } as Plain & { version: number };
  for (const kind of CHUNK_KINDS) {
    const size = core.sizeOf(kind);
    const buf = Buffer.alloc(size);
    for (let i = 0; i * CHUNK_SIZE[kind] < size; i++) {
      const part = buf.subarray(i * CHUNK_SIZE[kind], Math.min((i + 1) * CHUNK_SIZE[kind], size));
      if (core.entry(kind, i)) await core.readInto(kind, i, part); // not in the manifest: a zero chunk
    }
    out[kind] = buf;
  }
  return out;
}

function samePlain(a: Plain, b: Plain): boolean {
  return CHUNK_KINDS.every((k) => a[k].equals(b[k]));
}

describe('crash consistency of the server (SIGKILL at named points)', function () {
  const seed = Number(process.env.LETHE_CRASH_SEED ?? Math.floor(Math.random() * 2 ** 31));
  const iterations = Number(process.env.LETHE_CRASH_ITERATIONS ?? SERVER_POINTS.length);
  this.timeout(120_000 + iterations * 120_000);

  it(`loses nothing acknowledged, shows no half-written version, keeps the chain (seed ${seed}, ${iterations} crashes)`, async () => {
    const pick = seededRandom(seed); // a failing run is replayed with LETHE_CRASH_SEED
    let s = await startServer();
    const pushes: Plain[] = []; // every push attempted, acknowledged or not
    const devices: string[] = [];
    const checkins: { version: number; expect: Plain }[] = [];
    let lastPush = 0;
    let log: string[] = [];
    try {
      // A first version, pushed before any crash: there is always one to lease.
      const first = randomPlain();
      pushes.push(first);
      lastPush = (await pushImage(s, IMAGE, { plain: first })).version;
      /** After a restart: the chain, the devices, key releases, the shared version and the check-ins of `rounds`. */
      const verifyAfter = async (s: ServerProc, where: string, rounds: Round[]) => {
        const verify = JSON.parse((await lethe(['audit', 'verify', '--json'], s.env)).stdout) as { ok: boolean; reason?: string };
        expect(verify.ok, `${where}: ${verify.reason}`).to.equal(true);

        for (const r of rounds) {
          if (r.pushed) pushes.push(r.pushed);
          if (r.pushAcked) lastPush = r.pushAcked;
          if (r.deviceId && r.home) devices.push(r.deviceId);
        }
        const listed = JSON.parse((await lethe(['admin', 'devices', '--json'], s.env)).stdout) as { devices: { id: string }[] };
        const ids = new Set(listed.devices.map((d) => d.id));
        for (const id of devices) expect(ids.has(id), `${where}: enrolled device ${id} is kept`).to.equal(true);

        // Every key release a device received is in the chain.
        const db = await serverDb(s);
        const recorded = (await db.sql.all<{ data: string }>("SELECT data FROM audit WHERE type = 'keys.release'")).map((e) => JSON.parse(e.data) as { lease: string; chunks: Record<string, [number, number][]> });
        await db.close();
        for (const r of rounds) {
          for (const rel of r.released) {
            const covered = rel.refs.every((ref) => recorded.some((e) => e.lease === rel.leaseId && (e.chunks[ref.kind] ?? []).some(([a, b]) => a <= ref.index && ref.index <= b)));
            expect(covered, `${where}: keys released to lease ${rel.leaseId} (${JSON.stringify(rel.refs)}) have their audit record`).to.equal(true);
          }
        }

        // A new device sees the latest push, whole: at least the last acknowledged, and exactly one that was sent.
        const viewer = await enrolledDevice(s, 'viewer');
        await assign(s, viewer.deviceId, IMAGE).catch(() => {});
        viewer.close();
        const va = await agentOn(viewer.home, log);
        try {
          const seen = await readAll(va);
          expect(seen.version, `${where}: the shared version`).to.be.at.least(lastPush);
          expect(pushes.some((p) => samePlain(p, seen)), `${where}: version ${seen.version} is one push, whole`).to.equal(true);
        } finally {
          await stopAgent(va);
        }

        // The check-in's device resumes its whole check-in, or none of it.
        for (const r of rounds) {
          if (!r.home || r.base === undefined || !r.writes) continue;
          const base = pushes.find((p) => p === r.pushed)!;
          const withWrites: Plain = { disk: Buffer.from(base.disk), mem: base.mem, state: r.writes.state };
          for (const [i, data] of r.writes.disk) data.copy(withWrites.disk, i * CHUNK_SIZE.disk);
          const a = await agentOn(serverView(r.home), log);
          try {
            const seen = await readAll(a);
            if (r.checkinAcked !== undefined) {
              expect(seen.version, `${where}: the acknowledged check-in`).to.equal(r.checkinAcked);
              expect(samePlain(seen, withWrites), `${where}: the acknowledged check-in's content`).to.equal(true);
              checkins.push({ version: r.checkinAcked, expect: withWrites });
            } else {
              const whole = samePlain(seen, withWrites) || samePlain(seen, base);
              expect(whole, `${where}: version ${seen.version} is the base ${r.base} or the whole check-in`).to.equal(true);
            }
          } finally {
            await stopAgent(a);
          }
        }
      };
      for (let it = 0; it < iterations; it++) {
        const [point, most] = SERVER_POINTS[it % SERVER_POINTS.length];
        const at = 1 + pick(most);
        const where = `iteration ${it}: ${point}:${at}`;
        await s.stop();
        log = [];
        const rounds: Round[] = [];
        const down = s;
        try {
          s = await down.restart(undefined, { LETHE_CRASH_AT: `${point}:${at}` });
        } catch (e) {
          // The server's own start runs transactions: it may die there, before it listens.
          expect(String(e), `${where}: the server did not start`).to.match(/exited \(null\) before listening/);
          s = await down.restart(undefined, {});
          await verifyAfter(s, where, rounds);
          continue;
        }
        const exited = new Promise<string | null>((res) => s.proc.once('exit', (_c, sig) => res(sig)));
        // Rounds until the server dies at its point (the arrival count may need more than one).
        for (let n = 0; n < 4 && s.proc.exitCode === null && s.proc.signalCode === null; n++) {
          const r: Round = { released: [] };
          rounds.push(r);
          // An agent waiting for a lease from the dead server would wait for ever: it stops with the server.
          void exited.then(() => r.agent?.stop());
          await workload(s, r, log).catch(async (e: unknown) => {
            // The server's end may reach this process after the client saw its connection go.
            const ended = await Promise.race([exited.then(() => true), new Promise<boolean>((res) => setTimeout(() => res(false), 10_000))]);
            if (!ended) throw new Error(`${where}: the workload failed with the server up: ${String(e)}\n${log.join('\n')}`);
          });
        }
        const reached = s.proc.exitCode !== null || s.proc.signalCode !== null;
        if (!reached) await s.kill9();
        expect(reached, `${where}: the workload reached the point in ${rounds.length} rounds`).to.equal(true);
        expect(await exited, `${where}: how the server ended\n${s.stderr()}`).to.equal('SIGKILL');
        s = await s.restart(undefined, {});

        await verifyAfter(s, where, rounds);
      }
      // Every acknowledged check-in, after all the crashes that came later (pulled as an admin would).
      for (const c of checkins) {
        const out = tmpDir('lethe-crash-pull-');
        const p = await lethe(['image', 'pull', `${IMAGE}@${c.version}`, '--out', out], s.env);
        expect(p.code, p.stderr).to.equal(0);
        const got: Plain = { disk: fs.readFileSync(path.join(out, 'disk.raw')), mem: fs.readFileSync(path.join(out, 'ram.bin')), state: fs.readFileSync(path.join(out, 'state.bin')) };
        expect(samePlain(got, c.expect), `check-in ${c.version} after every crash`).to.equal(true);
      }
      expect(checkins.length + pushes.length, 'the workload got somewhere').to.be.greaterThan(0);
    } finally {
      await s.stop();
    }
  });
});
