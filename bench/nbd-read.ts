// NBD read throughput of the agent's export beside qemu-nbd serving the same
// raw image, same run:
//   sequential: nbdcopy of the whole export to null: (4 connections)
//   random:     4 KiB reads at seeded random offsets through one qemu-io (depth 1)
// for the agent warm in memory (the default: checked ciphertext kept in memory,
// after one pass), warm in the cache file only (--disk-memory-cache 0: each read
// checks and decrypts a blob from SQLite) and cold (empty cache: every chunk
// fetched from a real server on loopback, keys too).
//
//   node --import tsx bench/nbd-read.ts [--mib 128] [--reads 4000] [--phases cold,file,memory] [--reps 3] [--json]
import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { parseArgs } from 'node:util';
import { table } from '../cli/output.js';
import { assign, enrolledDevice, pushImage } from '../test/helpers/fixtures.js';
import { startAgentProc, startServer, tmpDir, waitFor } from '../test/helpers/proc.js';
import { control, type AgentStatus } from '../agent/index.js';

const run = promisify(execFile);
const { values } = parseArgs({
  options: {
    mib: { type: 'string', default: '128' },
    reads: { type: 'string', default: '4000' },
    phases: { type: 'string', default: 'cold,file,memory' },
    reps: { type: 'string', default: '3' },
    json: { type: 'boolean', default: false },
  },
});
const SIZE = Number(values.mib) * 1024 * 1024;
const READS = Number(values.reads);
type Phase = 'cold' | 'file' | 'memory';
const PHASES = values.phases.split(',') as Phase[];
const REPS = Number(values.reps);
const NAMES: Record<Phase, string> = { memory: 'warm, in memory', file: 'warm, cache file', cold: 'cold (server)' };
for (const p of PHASES) if (!['cold', 'file', 'memory'].includes(p)) throw new Error(`--phases: unknown phase "${p}" (cold, file, memory)`);

async function seq(uri: string): Promise<number> {
  const t0 = process.hrtime.bigint();
  await run('nbdcopy', [uri, 'null:']);
  return SIZE / 1e6 / (Number(process.hrtime.bigint() - t0) / 1e9);
}

/** IOPS of READS random 4 KiB reads (same offsets for every target). */
function random(uri: string, offsets: number[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const p = spawn('qemu-io', ['-f', 'raw', uri], { stdio: ['pipe', 'ignore', 'pipe'] });
    let err = '';
    p.stderr.on('data', (d) => (err += d));
    const t0 = process.hrtime.bigint();
    p.on('exit', (code) => (code === 0 ? resolve(offsets.length / (Number(process.hrtime.bigint() - t0) / 1e9)) : reject(new Error(`qemu-io: ${err}`))));
    p.stdin.end(offsets.map((o) => `read ${o} 4k\n`).join('') + 'quit\n');
  });
}

async function main(): Promise<void> {
  const dir = tmpDir('lethe-bench-nbd-');
  const raw = path.join(dir, 'disk.raw');
  fs.writeFileSync(raw, randomBytes(SIZE));
  const offsets = Array.from({ length: READS }, (_, i) => (((i * 2654435761) >>> 0) % (SIZE / 4096)) * 4096);
  const s = await startServer();
  const qsock = path.join(dir, 'qemu-nbd.sock');
  const qnbd = spawn('qemu-nbd', ['-f', 'raw', '-k', qsock, '-x', 'guest', '-t', '-e', '8', raw], { stdio: 'ignore' });
  const agents: Awaited<ReturnType<typeof startAgentProc>>[] = [];
  try {
    await pushImage(s, 'guest', { plain: { disk: fs.readFileSync(raw), mem: Buffer.alloc(0), state: Buffer.alloc(0) } });
    await waitFor(async () => fs.existsSync(qsock) || undefined, 10_000, 'qemu-nbd');
    const qemuUri = `nbd+unix:///guest?socket=${qsock}`;

    type Pair = { agent: number; qemuNbd: number };
    const results: Partial<Record<Phase, { seqMBs: Pair; randIops: Pair }>> = {};
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    /** Runs `agent` and the yardstick back to back REPS times (alternating, so load drifts hit both); medians. */
    async function paired(agent: () => Promise<number>, yardstick: () => Promise<number>, reps: number): Promise<Pair> {
      const a: number[] = [];
      const q: number[] = [];
      for (let i = 0; i < reps; i++) {
        a.push(await agent());
        q.push(await yardstick());
      }
      return { agent: median(a), qemuNbd: median(q) };
    }
    async function withAgent<T>(phase: Phase, use: (uri: string) => Promise<T>): Promise<T> {
      const d = await enrolledDevice(s);
      await assign(s, d.deviceId, 'guest');
      // nbdcopy and qemu-io are not the agent's QEMU: they connect by opt-in (--nbd-peers user).
      const args = ['--nbd-peers', 'user', ...(phase === 'cold' ? ['--no-prefetch'] : phase === 'file' ? ['--disk-memory-cache', '0'] : [])];
      const agent = await startAgentProc(d.home, 'guest', args);
      agents.push(agent);
      try {
        const st = () => control<AgentStatus>(d.home, { cmd: 'status' });
        await waitFor(async () => (await st()).nbd?.address ?? undefined, 20_000, 'the export');
        if (phase !== 'cold') await waitFor(async () => { const x = await st(); return x.prefetch.total > 0 && x.prefetch.done === x.prefetch.total; }, 120_000, 'prefetch');
        const uri = `nbd+unix:///guest?socket=${path.join(d.home, 'nbd.sock')}`;
        if (phase === 'memory') await seq(uri);
        return await use(uri);
      } finally {
        await agent.stop();
        d.close();
      }
    }
    // cold: a fresh device (empty cache) for each measurement; file: ciphertext
    // prefetched into the cache file, none kept in memory; memory: the default
    // memory cache of checked ciphertext, filled by one pass first.
    for (const phase of PHASES) {
      if (phase === 'cold') {
        const randIops = await paired(() => withAgent('cold', (u) => random(u, offsets)), () => random(qemuUri, offsets), 1);
        const seqMBs = await paired(() => withAgent('cold', (u) => seq(u)), () => seq(qemuUri), 1);
        results.cold = { seqMBs, randIops };
      } else {
        results[phase] = await withAgent(phase, async (uri) => ({
          randIops: await paired(() => random(uri, offsets), () => random(qemuUri, offsets), REPS),
          seqMBs: await paired(() => seq(uri), () => seq(qemuUri), REPS),
        }));
      }
    }
    const r = { mib: values.mib, reads: READS, reps: REPS, ...results };
    if (values.json) {
      process.stdout.write(JSON.stringify(r) + '\n');
      return;
    }
    console.log(`disk: ${values.mib} MiB of random data; ${READS} random 4 KiB reads at depth 1; yardstick qemu-nbd on the same raw file, run beside each measurement`);
    console.log(`medians of ${REPS} alternating runs (cold: one run each, on a fresh device)`);
    const shown = (['memory', 'file', 'cold'] as const).filter((p) => results[p]);
    console.log(
      table(
        ['agent', 'seq MB/s', 'qemu-nbd', '×', 'random 4K IOPS', 'qemu-nbd', '×'],
        shown.map((p) => {
          const x = results[p]!;
          return [NAMES[p], x.seqMBs.agent.toFixed(0), x.seqMBs.qemuNbd.toFixed(0), (x.seqMBs.agent / x.seqMBs.qemuNbd).toFixed(2), x.randIops.agent.toFixed(0), x.randIops.qemuNbd.toFixed(0), (x.randIops.agent / x.randIops.qemuNbd).toFixed(2)];
        }),
      ),
    );
    console.log('warm, in memory: the default --disk-memory-cache (256 MiB) holds the disk after one pass; warm, cache file: --disk-memory-cache 0');
    console.log('target: warm ≥ 0.8× qemu-nbd (which serves from the page cache)');
  } finally {
    for (const a of agents) await a.stop();
    qnbd.kill();
    await s.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
