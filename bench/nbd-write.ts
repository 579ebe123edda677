// Copies onto the agent's disk one after another, each beside a copy onto qemu-nbd
// on a LUKS image of the same bytes (the peer, its malloc thresholds fixed:
// lib/nbd-disks.ts): per copy, MB/s, the ratio, and what each cost in CPU time, with the
// agent's page faults and how much its slot file grew. The first copy onto a cached
// disk is the one that takes new write keys and leaves the version's blobs stale.
//
//   node --import tsx bench/nbd-write.ts [--size 1024] [--copies 4] [--agents 2]
import { execFile, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs, promisify } from 'node:util';
import { lethe, startServer, tmpDir } from '../test/helpers/proc.js';
import { luksArgs, luksCopy, qemuNbd, randomDisk, withAgentExport } from './lib/nbd-disks.js';

const run = promisify(execFile);
const { values } = parseArgs({ options: { size: { type: 'string', default: '1024' }, copies: { type: 'string', default: '4' }, agents: { type: 'string', default: '2' } } });
const MiB = 1024 * 1024;
const size = Number(values.size) * MiB;
const COPIES = Number(values.copies);
const AGENTS = Number(values.agents);

/** A process's CPU seconds and page faults (minor and major), from /proc. */
function usage(pid: number): { cpu: number; faults: number } {
  const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return { cpu: (Number(f[11]) + Number(f[12])) / 100, faults: Number(f[7]) + Number(f[9]) };
}

async function main(): Promise<void> {
  const s = await startServer();
  const dir = tmpDir('lethe-bench-write-');
  const procs: ChildProcess[] = [];
  try {
    const raw = path.join(dir, 'disk.raw');
    randomDisk(raw, size);
    const luks = path.join(dir, 'disk.luks');
    await luksCopy(raw, luks);
    const peerUri = await qemuNbd(dir, 'luks', luksArgs(luks), procs);
    const peer = procs[procs.length - 1];
    const source = path.join(dir, 'source.raw');
    fs.copyFileSync(raw, source);
    const pushed = await lethe(['image', 'push', 'guest', '--disk', raw], s.env);
    if (pushed.code !== 0) throw new Error(`image push failed: ${pushed.stderr}`);
    console.log(`${size / MiB} MiB disk, nbdcopy of a file onto it; the peer: qemu-nbd on a LUKS copy`);
    for (let a = 0; a < AGENTS; a++) {
      await withAgentExport(s, 'guest', size, [], async ({ uri, home, agent }) => {
        const slots = path.join(home, 'cache-disk.blobs');
        for (let i = 0; i < COPIES; i++) {
          const grown0 = fs.statSync(slots).size;
          const a0 = usage(agent.proc.pid!);
          const s0 = usage(s.proc.pid!);
          const t0 = process.hrtime.bigint();
          await run('nbdcopy', [source, uri]);
          const t = Number(process.hrtime.bigint() - t0) / 1e9;
          const a1 = usage(agent.proc.pid!);
          const s1 = usage(s.proc.pid!);
          const p0 = usage(peer.pid!);
          const l0 = process.hrtime.bigint();
          await run('nbdcopy', [source, peerUri]);
          const lt = Number(process.hrtime.bigint() - l0) / 1e9;
          const p1 = usage(peer.pid!);
          const grown = (fs.statSync(slots).size - grown0) / MiB;
          console.log(
            `agent ${a} copy ${i}${i === 0 ? ' (first)' : ''}: ${(size / 1e6 / t).toFixed(0)} MB/s, ${(lt / t).toFixed(2)}× LUKS (${(size / 1e6 / lt).toFixed(0)} MB/s) | CPU s: agent ${(a1.cpu - a0.cpu).toFixed(2)}, server ${(s1.cpu - s0.cpu).toFixed(2)}, peer ${(p1.cpu - p0.cpu).toFixed(2)} | agent page faults ${a1.faults - a0.faults}, slot file +${grown.toFixed(0)} MiB`,
          );
        }
      });
    }
  } finally {
    for (const p of procs) p.kill();
    await s.stop();
    fs.rmSync(path.dirname(s.dir), { recursive: true, force: true }); // the server's data: a copy of every image pushed
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
