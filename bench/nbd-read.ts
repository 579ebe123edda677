// The agent's NBD export beside two yardsticks serving the same bytes, same run:
// qemu-nbd on the plain raw file (the limit) and qemu-nbd on a LUKS copy (QEMU's own
// AES-XTS: the peer, what a user who wants an encrypted local disk would run).
//   sequential read:  nbdcopy of the whole export to null: (4 connections)
//   random read:      4 KiB reads at seeded random offsets through one qemu-io, at depth 1
//                     and at depth 16 (aio_read in groups of 16, each group awaited)
//   sequential write: nbdcopy of a file of the disk's size into the export: the first copy, then
//                     REPS more (the agent's first write of a chunk takes a new cache slot; later
//                     ones reuse the slots earlier writes left)
// for each disk size, the agent
//   warm, in memory: the default (checked ciphertext kept in memory, after one pass)
//   warm, file:      --disk-memory-cache 0, after one pass (each read preads the pieces it covers from
//                    the cache's slot file and checks them against the tags kept at that pass)
//   cold:            an empty cache (every chunk fetched from a real server on loopback, keys too)
//   first read:      the agent started again over a full cache file: each chunk's first read
//                    since the start (its blob checked), one pass after each restart
//
//   node --import tsx bench/nbd-read.ts [--sizes 128,1024] [--reads 4000] [--phases memory,file,first,cold,write] [--reps 3] [--json]
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { parseArgs } from 'node:util';
import { table } from '../cli/output.js';
import { lethe, startServer, tmpDir, type ServerProc } from '../test/helpers/proc.js';
import { aeadBackend } from '../native/index.js';
import { dropFromPageCache, luksArgs, luksCopy, qemuNbd, randomDisk, withAgentExport } from './lib/nbd-disks.js';

const run = promisify(execFile);
const { values } = parseArgs({
  options: {
    sizes: { type: 'string', default: '128,1024' },
    reads: { type: 'string', default: '4000' },
    phases: { type: 'string', default: 'memory,file,first,cold,write' },
    reps: { type: 'string', default: '3' },
    json: { type: 'boolean', default: false },
  },
});
const MiB = 1024 * 1024;
const SIZES = values.sizes.split(',').map((s) => Number(s) * MiB);
const READS = Number(values.reads);
type Phase = 'memory' | 'file' | 'first' | 'cold' | 'write';
const PHASES = values.phases.split(',') as Phase[];
const REPS = Number(values.reps);
const NAMES: Record<Phase, string> = { memory: 'warm, in memory', file: 'warm, cache file', first: 'first read after start', cold: 'cold (server)', write: 'sequential write' };
for (const p of PHASES) if (!(p in NAMES)) throw new Error(`--phases: unknown phase "${p}" (${Object.keys(NAMES).join(', ')})`);
for (const s of SIZES) if (!(s > 0 && s % MiB === 0)) throw new Error(`--sizes: give whole MiB, e.g. 128,1024,4096`);

/** MB/s of nbdcopy from `from` to `to` of `bytes`. */
async function copy(from: string, to: string, bytes: number): Promise<number> {
  const t0 = process.hrtime.bigint();
  await run('nbdcopy', [from, to], { maxBuffer: 1 << 20 });
  return bytes / 1e6 / (Number(process.hrtime.bigint() - t0) / 1e9);
}

/** Reads a group keeps in flight in the deep random phase. */
const DEPTH = 16;

/**
 * IOPS of random 4 KiB reads (the same offsets for every target): one at a time, or
 * with `depth`, that many at once (a group of aio_reads, awaited before the next).
 */
function random(uri: string, offsets: number[], depth = 1): Promise<number> {
  return new Promise((resolve, reject) => {
    const p = spawn('qemu-io', ['-f', 'raw', uri], { stdio: ['pipe', 'ignore', 'pipe'] });
    let err = '';
    p.stderr.on('data', (d) => (err += d));
    const t0 = process.hrtime.bigint();
    p.on('exit', (code) => (code === 0 ? resolve(offsets.length / (Number(process.hrtime.bigint() - t0) / 1e9)) : reject(new Error(`qemu-io: ${err}`))));
    const cmds = depth === 1 ? offsets.map((o) => `read ${o} 4k\n`) : offsets.map((o, i) => `aio_read -q ${o} 4k\n${(i + 1) % depth === 0 ? 'aio_flush\n' : ''}`);
    p.stdin.end(cmds.join('') + 'aio_flush\nquit\n');
  });
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

interface Row {
  size: string;
  phase: Phase;
  /** MB/s (sequential) or IOPS (random), medians. */
  seq: { agent: number; plain: number; luks: number };
  rand?: { agent: number; plain: number; luks: number };
  /** The same at depth 16. */
  deep?: { agent: number; plain: number; luks: number };
  /** Of the agent's reads in this phase, the share the native read proxy answered (the rest went to JavaScript). */
  proxied?: number;
  /** The write phase's first copy (one run), apart from the copies after it. */
  first?: boolean;
}

async function oneSize(s: ServerProc, size: number, image: string): Promise<Row[]> {
  const dir = tmpDir('lethe-bench-nbd-');
  const procs: ChildProcess[] = [];
  try {
    const raw = path.join(dir, 'disk.raw');
    randomDisk(raw, size);
    const luks = path.join(dir, 'disk.luks');
    await luksCopy(raw, luks);
    const plainUri = await qemuNbd(dir, 'plain', ['-f', 'raw', raw], procs);
    const luksUri = await qemuNbd(dir, 'luks', luksArgs(luks), procs);
    const source = path.join(dir, 'source.raw'); // what the write phase copies in
    if (PHASES.includes('write')) fs.copyFileSync(raw, source);
    // lethe image push streams the file: a disk of 4 GiB does not fit one Buffer.
    const pushed = await lethe(['image', 'push', image, '--disk', raw], s.env);
    if (pushed.code !== 0) throw new Error(`image push failed: ${pushed.stderr}`);
    await dropFromPageCache(s.dir);
    const offsets = Array.from({ length: READS }, (_, i) => (((i * 2654435761) >>> 0) % (size / 4096)) * 4096);

    /** Runs the agent's measurement and both yardsticks REPS times, alternating, so load drifts hit all three; medians. */
    async function three(agent: () => Promise<number>, yardstick: (uri: string) => Promise<number>, reps: number) {
      const a: number[] = [];
      const p: number[] = [];
      const l: number[] = [];
      for (let i = 0; i < reps; i++) {
        a.push(await agent());
        p.push(await yardstick(plainUri));
        l.push(await yardstick(luksUri));
      }
      return { agent: median(a), plain: median(p), luks: median(l) };
    }
    let proxied: number | undefined;
    async function withAgent<T>(phase: Phase, use: (uri: string, restart: () => Promise<void>) => Promise<T>): Promise<T> {
      const args = phase === 'cold' ? ['--no-prefetch'] : phase === 'file' ? ['--disk-memory-cache', '0'] : [];
      return withAgentExport(s, image, size, args, async ({ uri, status, restart }) => {
        // Warm: each chunk read once since the start (for the file, its blob checked and its pieces' tags kept).
        if (phase === 'memory' || phase === 'file') await copy(uri, 'null:', size);
        const before = (await status()).nbd!;
        const result = await use(uri, restart);
        const after = (await status()).nbd!;
        const reads = (after.requests.read ?? 0) - (before.requests.read ?? 0);
        proxied = reads > 0 ? (after.proxied.reads - before.proxied.reads) / reads : undefined;
        return result;
      });
    }
    const label = `${size / MiB} MiB`;
    const rows: Row[] = [];
    for (const phase of PHASES) {
      if (phase === 'cold') {
        // A fresh device (empty cache) for each measurement.
        const rand = await three(() => withAgent('cold', (u) => random(u, offsets)), (u) => random(u, offsets), 1);
        const seq = await three(() => withAgent('cold', (u) => copy(u, 'null:', size)), (u) => copy(u, 'null:', size), 1);
        rows.push({ size: label, phase, seq, rand, proxied });
      } else if (phase === 'first') {
        // One device, its agent started again before each pass: every read is a chunk's first since the start.
        rows.push(
          await withAgent('first', async (uri, restart) => {
            const again = <T>(f: () => Promise<T>) => async () => (await restart(), f());
            return {
              size: label,
              phase,
              rand: await three(again(() => random(uri, offsets)), (u) => random(u, offsets), REPS),
              seq: await three(again(() => copy(uri, 'null:', size)), (u) => copy(u, 'null:', size), REPS),
            };
          }),
        );
      } else if (phase === 'write') {
        // The first copy onto the agent's disk puts every chunk in a new slot (the image's
        // blob keeps its own); later ones reuse the slots earlier writes left. Both shown.
        await withAgent('write', async (uri) => {
          rows.push({ size: label, phase, first: true, seq: await three(() => copy(source, uri, size), (u) => copy(source, u, size), 1) });
          rows.push({ size: label, phase, seq: await three(() => copy(source, uri, size), (u) => copy(source, u, size), REPS) });
        });
      } else {
        rows.push(
          await withAgent(phase, async (uri) => ({
            size: label,
            phase,
            rand: await three(() => random(uri, offsets), (u) => random(u, offsets), REPS),
            deep: await three(() => random(uri, offsets, DEPTH), (u) => random(u, offsets, DEPTH), REPS),
            seq: await three(() => copy(uri, 'null:', size), (u) => copy(u, 'null:', size), REPS),
          })).then((r) => ({ ...r, proxied })),
        );
      }
    }
    return rows;
  } finally {
    for (const p of procs) p.kill();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const s = await startServer();
  const rows: Row[] = [];
  try {
    for (const [i, size] of SIZES.entries()) rows.push(...(await oneSize(s, size, `guest${i}`)));
  } finally {
    await s.stop();
    fs.rmSync(path.dirname(s.dir), { recursive: true, force: true }); // the server's data: a copy of every image pushed
  }
  if (values.json) {
    process.stdout.write(JSON.stringify({ reads: READS, reps: REPS, cipher: aeadBackend(), rows }) + '\n');
    return;
  }
  console.log(`disks of random data; ${READS} random 4 KiB reads at depth 1 and at depth ${DEPTH}; yardsticks qemu-nbd on the same bytes, plain and LUKS (AES-XTS), run beside each measurement`);
  console.log(`medians of ${REPS} alternating runs (cold and first write: one run each; cold on a fresh device)`);
  console.log(`the agent's chunk cipher in native code: ${aeadBackend()} (native/aead.cc; LETHE_AEAD=libsodium runs libsodium's)`);
  const f = (n: number) => n.toFixed(0);
  const x = (a: number, b: number) => (a / b).toFixed(2);
  console.log(
    table(
      ['disk', 'agent', 'seq MB/s', 'plain', 'LUKS', '×plain', '×LUKS', '4K IOPS', 'plain', 'LUKS', '×plain', '×LUKS', `4K IOPS QD${DEPTH}`, 'plain', 'LUKS', '×plain', '×LUKS', 'proxied'],
      rows.map((r) => [
        r.size,
        r.first ? 'first write' : NAMES[r.phase],
        f(r.seq.agent), f(r.seq.plain), f(r.seq.luks), x(r.seq.agent, r.seq.plain), x(r.seq.agent, r.seq.luks),
        ...[r.rand, r.deep].flatMap((q) => (q ? [f(q.agent), f(q.plain), f(q.luks), x(q.agent, q.plain), x(q.agent, q.luks)] : ['-', '-', '-', '-', '-'])),
        r.proxied === undefined ? '-' : `${(100 * r.proxied).toFixed(0)}%`,
      ]),
    ),
  );
  console.log("proxied: of the agent's reads in the phase, the share the native read proxy answered without JavaScript");
  console.log('targets (issue #19): warm reads ≥ 1.2× LUKS at every size; ≥ 0.8× plain where the disk fits in memory, ≥ 0.5× at 4 GiB; writes ≥ 1× LUKS');
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
