// The memory path end to end, in one run:
//   fault service latency of a real agent core (as a resumed VM's faults are served:
//   servePage — readInto, the evictor's gate, UFFDIO_COPY, the evictor's keyed hash) for
//     (a) pages in the local ciphertext cache (normal class: the class key is held),
//     (a') the same for sensitive pages (a key request to the server per 64 pages),
//     (b) pages fetched from a real server on loopback (cache empty),
//   beside the minimal C userfaultfd handler (native/test/c-handler.c) on the same pages;
//   resume of the test guest post-copy to its first full verify pass, beside booting the
//   same guest from scratch to its ready line (both: every workload page touched).
//
//   node --import tsx bench/memory-path.ts [--pages 4096] [--guest-mem 256M] [--guest-mib 64] [--no-guest] [--json]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { startAgent, BufferPool, Evictor, servePage } from '../agent/index.js';
import { DEFAULT_FULL_POLICY } from '../policies/schema.js';
import { table } from '../cli/output.js';
import { FAULT_PAGE_BUFFERS, MEM_CHUNK_SIZE } from '../common/constants.js';
import { FaultThread, PAGE_SIZE, UffdListener, shimEnv } from '../native/index.js';
import { assign, enrolledDevice, pushImage, testUnlock } from '../test/helpers/fixtures.js';
import { lethe, startAgentProc, startServer, waitFor } from '../test/helpers/proc.js';
import { timeCHandler, timeClient } from './lib/fault-client.js';
import { percentile, sortedCopy } from './lib/stats.js';
import { randomBytes } from 'node:crypto';

const { values } = parseArgs({
  options: {
    pages: { type: 'string', default: '4096' },
    'guest-mem': { type: 'string', default: '256M' },
    'guest-mib': { type: 'string', default: '64' },
    'no-guest': { type: 'boolean', default: false },
    json: { type: 'boolean', default: false },
  },
});
const PAGES = Number(values.pages);
/** The scattered order's step: far past readahead, and coprime with the page count so each page is touched once. */
const SCATTER = 97;
const gcd = (a: number, b: number): number => (b === 0 ? a : gcd(b, a % b));
if (gcd(SCATTER, PAGES) !== 1) throw new Error(`--pages must not be a multiple of ${SCATTER} (the scattered pass would touch some pages twice)`);

function freshRam(name: string): string {
  const ram = path.join('/dev/shm', `lethe-bench-${process.pid}-${name}.ram`);
  fs.closeSync(fs.openSync(ram, 'w', 0o600));
  fs.truncateSync(ram, PAGES * PAGE_SIZE);
  return ram;
}

async function cHandler(dir: string): Promise<number[]> {
  const ram = freshRam('c');
  try {
    return await timeCHandler(path.join(dir, 'c.sock'), ram, PAGES);
  } finally {
    fs.rmSync(ram, { force: true });
  }
}

/**
 * Faults served by an agent core exactly as AgentVm serves a resumed guest's
 * (servePage: pooled buffer, the evictor's gate and its keyed hash of each page).
 */
async function agentFaults(dir: string, core: Awaited<ReturnType<typeof startAgent>>['core'], name: string, stride = 1): Promise<number[]> {
  const ram = freshRam(name);
  const sock = path.join(dir, `${name}.sock`);
  const pool = new BufferPool(FAULT_PAGE_BUFFERS, MEM_CHUNK_SIZE);
  // Not started: it only records what arrives, as a running one does on each fault.
  const evictor = new Evictor(core, { ramFd: -1, pages: PAGES, hold: () => Promise.reject(new Error('no VM')), faultInFlight: () => false }, DEFAULT_FULL_POLICY, () => {});
  let failure: Error | undefined;
  const listener = await UffdListener.listen(
    sock,
    (m) => {
      FaultThread.start(m, {
        onFault: async (f, t) => {
          await servePage(core, pool, evictor, f, t);
        },
        onError: (e) => (failure ??= e),
      });
    },
    (e) => (failure ??= e),
  );
  try {
    const lat = await timeClient(ram, PAGES, shimEnv(ram, sock), undefined, stride);
    if (failure) throw failure;
    return lat;
  } finally {
    await listener.close();
    evictor.destroy();
    pool.destroy();
    fs.rmSync(ram, { force: true });
  }
}

const us = (ns: number) => ns / 1000;
function summary(name: string, lat: number[]) {
  const s = sortedCopy(lat);
  return { name, p50us: us(percentile(s, 50)), p90us: us(percentile(s, 90)), p99us: us(percentile(s, 99)), meanUs: us(lat.reduce((a, b) => a + b, 0) / lat.length) };
}

async function faultLatency(dir: string) {
  const s = await startServer();
  const rows: ReturnType<typeof summary>[] = [];
  try {
    const mem = randomBytes(PAGES * PAGE_SIZE);
    const state = Buffer.concat([Buffer.from('QEVM\0\0\0\x03', 'latin1'), randomBytes(1000)]);
    await pushImage(s, 'normal', { plain: { disk: randomBytes(128 * 1024), mem, state }, policy: 'sensitive:\n  memory: false\n' });
    await pushImage(s, 'sensitive', { plain: { disk: randomBytes(128 * 1024), mem, state } });
    rows.push(summary('C handler (yardstick)', await cHandler(dir)));
    const device = async (image: string, name: string) => {
      const d = await enrolledDevice(s, name);
      await assign(s, d.deviceId, image);
      d.close();
      return { home: d.home, image, cacheBytes: 64 * PAGES * PAGE_SIZE, heartbeatMs: 30_000, log: () => {}, nbd: null, prefetch: false, unlock: testUnlock() };
    };
    const run = async <T>(opts: Parameters<typeof startAgent>[0], fn: (a: Awaited<ReturnType<typeof startAgent>>) => Promise<T>): Promise<T> => {
      const agent = await startAgent(opts);
      try {
        await agent.lease.whenActive();
        return await fn(agent);
      } finally {
        agent.stop();
        await agent.done;
      }
    };
    // Empty caches: pages touched in order (readahead brings the next 15 with each fetch), then scattered (each fault a round trip).
    rows.push(summary('(b) from the server, in order', await run(await device('normal', 'bench-b'), (a) => agentFaults(dir, a.core, 'server'))));
    rows.push(summary('(b) from the server, scattered', await run(await device('normal', 'bench-b2'), (a) => agentFaults(dir, a.core, 'server2', SCATTER))));
    for (const image of ['normal', 'sensitive'] as const) {
      const opts = await device(image, `bench-${image}`);
      await run(opts, (a) => a.core.prefetchAll());
      // A fresh agent on the same home: the ciphertext is cached, no key is held yet but the class key.
      rows.push(summary(image === 'normal' ? '(a) cached, normal' : "(a') cached, sensitive", await run(opts, (a) => agentFaults(dir, a.core, `cached-${image}`))));
    }
  } finally {
    await s.stop();
  }
  return rows;
}

async function resumeVsBoot(dir: string) {
  const snap = path.join(dir, 'snap');
  const shot = await lethe(['vm', 'snapshot', '--out', snap, '--mem', String(values['guest-mem']), '--workload-mib', String(values['guest-mib']), '--accel', 'tcg', '--json']);
  if (shot.code !== 0) throw new Error(`snapshot failed: ${shot.stderr}`);
  const bootSeconds = JSON.parse(shot.stdout).bootToReadySeconds as number;
  const s = await startServer();
  try {
    const push = await lethe(['image', 'push', 'vm', '--disk', path.join(snap, 'disk.raw'), '--memory', path.join(snap, 'ram.bin'), '--state', path.join(snap, 'state.bin')], s.env);
    if (push.code !== 0) throw new Error(`push failed: ${push.stderr}`);
    const results: { cache: string; runningS: number; readyS: number }[] = [];
    const d = await enrolledDevice(s, 'bench-vm');
    await assign(s, d.deviceId, 'vm');
    d.close();
    for (const cache of ['empty', 'warm'] as const) {
      const t0 = Date.now();
      const agent = await startAgentProc(d.home, 'vm', ['--vm', '--accel', 'tcg', '--log-guest-console', '--no-prefetch']);
      try {
        await waitFor(async () => /VM resumed post-copy/.test(agent.log()) || undefined, 120_000, 'the resume');
        const runningS = (Date.now() - t0) / 1000;
        await waitFor(async () => /guest: LETHE-VERIFY pass=/.test(agent.log()) || undefined, 300_000, 'a verify pass');
        results.push({ cache, runningS, readyS: (Date.now() - t0) / 1000 });
      } finally {
        agent.proc.kill('SIGTERM');
        await agent.exited;
      }
    }
    return { bootSeconds, results };
  } finally {
    await s.stop();
  }
}

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lethe-bench-mem-'));
  try {
    const rows = await faultLatency(dir);
    const c = rows[0].p50us;
    const out = { pages: PAGES, faults: rows.map((r) => ({ ...r, p50VsC: r.p50us / c })), guest: values['no-guest'] ? null : await resumeVsBoot(dir) };
    if (values.json) {
      console.log(JSON.stringify(out, null, 2));
      return;
    }
    console.log(`fault service latency, ${PAGES} pages each (targets: (a) p50 ≤ 1.5× the C handler, (b) p50 ≤ 300 µs)`);
    console.log(
      table(
        ['', 'p50 µs', 'p90 µs', 'p99 µs', 'mean µs', 'p50 ÷ C'],
        out.faults.map((r) => [r.name, r.p50us.toFixed(1), r.p90us.toFixed(1), r.p99us.toFixed(1), r.meanUs.toFixed(1), r.p50VsC.toFixed(2)]),
      ),
    );
    if (out.guest) {
      console.log(`\ntest guest, ${values['guest-mem']} RAM, ${values['guest-mib']} MiB workload: boot from scratch to ready ${out.guest.bootSeconds.toFixed(2)} s`);
      console.log(
        table(
          ['resume (agent process start to …)', 'guest running s', 'first full verify pass s', '÷ boot'],
          out.guest.results.map((r) => [`cache ${r.cache}`, r.runningS.toFixed(2), r.readyS.toFixed(2), (r.readyS / out.guest!.bootSeconds).toFixed(2)]),
        ),
      );
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

await main();
