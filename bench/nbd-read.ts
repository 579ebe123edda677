// NBD read throughput of the agent's export beside qemu-nbd serving the same
// raw image, same run:
//   sequential: nbdcopy of the whole export to null: (4 connections)
//   random:     4 KiB reads at seeded random offsets through one qemu-io (depth 1)
// for the agent hot (checked ciphertext in memory, the default), warm (ciphertext
// in the cache file only, each read checked and decrypted from it) and cold
// (empty cache: every chunk fetched from a real server on loopback, keys too).
//
//   node --import tsx bench/nbd-read.ts [--mib 128] [--reads 4000] [--phases cold,warm,hot] [--json]
import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { parseArgs } from 'node:util';
import { table } from '../cli/output.js';
import { assign, enrolledDevice, pushImage } from '../test/helpers/fixtures.js';
import { startAgentProc, startServer, tmpDir, waitFor } from '../test/helpers/proc.js';
import { control } from '../agent/control.js';
import type { AgentStatus } from '../agent/daemon.js';

const run = promisify(execFile);
const { values } = parseArgs({
  options: {
    mib: { type: 'string', default: '128' },
    reads: { type: 'string', default: '4000' },
    phases: { type: 'string', default: 'cold,warm,hot' },
    json: { type: 'boolean', default: false },
  },
});
const SIZE = Number(values.mib) * 1024 * 1024;
const READS = Number(values.reads);
const PHASES = values.phases.split(',') as ('cold' | 'warm' | 'hot')[];
for (const p of PHASES) if (!['cold', 'warm', 'hot'].includes(p)) throw new Error(`--phases: unknown phase "${p}" (cold, warm, hot)`);

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

    const results: Record<string, { seqMBs: number; randIops: number }> = {};
    // cold: empty cache; warm: ciphertext prefetched into the cache file, none kept
    // in memory; hot: the default memory cache of checked ciphertext, filled by one pass.
    for (const phase of PHASES) {
      const d = await enrolledDevice(s);
      await assign(s, d.deviceId, 'guest');
      const args = phase === 'cold' ? ['--no-prefetch'] : phase === 'warm' ? ['--disk-memory-cache', '0'] : [];
      const agent = await startAgentProc(d.home, 'guest', args);
      agents.push(agent);
      const st = () => control<AgentStatus>(d.home, { cmd: 'status' });
      await waitFor(async () => (await st()).nbd?.address ?? undefined, 20_000, 'the export');
      if (phase !== 'cold') await waitFor(async () => { const x = await st(); return x.prefetch.total > 0 && x.prefetch.done === x.prefetch.total; }, 120_000, 'prefetch');
      const uri = `nbd+unix:///guest?socket=${path.join(d.home, 'nbd.sock')}`;
      if (phase === 'hot') await seq(uri);
      // Random first (a sequential pass would warm the cache).
      const randIops = await random(uri, offsets);
      const seqMBs = await seq(uri);
      results[phase] = { seqMBs, randIops };
      await agent.stop();
      d.close();
    }
    const q = { seqMBs: await seq(qemuUri), randIops: await random(qemuUri, offsets) };
    const r = { mib: values.mib, reads: READS, qemuNbd: q, ...results };
    if (values.json) {
      process.stdout.write(JSON.stringify(r) + '\n');
      return;
    }
    console.log(`disk: ${values.mib} MiB of random data; ${READS} random 4 KiB reads at depth 1; yardstick qemu-nbd on the same raw file`);
    console.log(
      table(
        ['target', 'sequential MB/s', '× qemu-nbd', 'random 4K IOPS', '× qemu-nbd'],
        [
          ['qemu-nbd (yardstick)', q.seqMBs.toFixed(0), '1.000', q.randIops.toFixed(0), '1.000'],
          ...(['hot', 'warm', 'cold'] as const).filter((p) => results[p]).map((p) => [
            `lethe agent, ${p}`,
            results[p].seqMBs.toFixed(0),
            (results[p].seqMBs / q.seqMBs).toFixed(3),
            results[p].randIops.toFixed(0),
            (results[p].randIops / q.randIops).toFixed(3),
          ]),
        ],
      ),
    );
    console.log('hot: checked ciphertext in memory (the default 256 MiB holds the disk); warm: ciphertext in the cache file only (--disk-memory-cache 0); cold: empty cache');
    for (const p of (['hot', 'warm'] as const).filter((p) => results[p])) {
      console.log(`target ≥ 0.8× qemu-nbd, ${p}: sequential ${(results[p].seqMBs / q.seqMBs).toFixed(2)}×, random ${(results[p].randIops / q.randIops).toFixed(2)}×`);
    }
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
