// The Debian 12 guest (docs/debian-guest.md), boot beside post-copy resume, in one run
// with a real server, agents and QEMU (TCG):
//   boot (the yardstick): lethe vm snapshot --guest debian, QEMU start to both ready
//     lines (the workload's, and the user agents' once ssh-agent holds its key)
//   resume, cold: a fresh device, empty cache, no prefetch: agent start to the
//     workload's first full verify pass and the first ssh-add -l answered
//   resume, learned: the same, on another fresh device, after a recording session on a
//     device the admin trusts left its first-touch order (startup buffer in that order)
// and for each resume the page faults, demand requests and bytes fetched by then.
//
//   node --import tsx bench/debian-guest.ts [--startup 48MiB] [--record-passes 8] [--json]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { table } from '../cli/output.js';
import { setImagePolicy } from './lib/image-policy.js';
import { resumeOnFreshDevice } from './lib/resume.js';
import { verifyPasses } from '../test/helpers/guest.js';
import { lethe, startServer, type ServerProc } from '../test/helpers/proc.js';

const { values } = parseArgs({
  options: {
    startup: { type: 'string', default: '48MiB' },
    'record-passes': { type: 'string', default: '8' },
    json: { type: 'boolean', default: false },
  },
});
const IMAGE = 'debian';
const MEM = '256M';
const WORKLOAD_MIB = 16;
const sshAnswered = (log: string) => /guest: LETHE-SSH seq=\d+ keys=1 marked=1/.test(log);

interface Run {
  name: string;
  seconds: number;
  faults: number;
  demandRequests: number;
  mibFetched: number;
  startupPages: number;
}

const setPolicy = (s: ServerProc, dir: string, text: string) => setImagePolicy(s, dir, IMAGE, text);

/** One resume on a fresh device until `ready`; what it took by then. */
async function resume(s: ServerProc, name: string, args: string[], ready: (log: string) => boolean): Promise<Run & { deviceId: string; log: string }> {
  const r = await resumeOnFreshDevice(s, IMAGE, name, args, ready);
  const f = r.status.fetch;
  return { name, seconds: r.seconds, faults: r.status.vm!.faults, demandRequests: f.demandBatches, mibFetched: f.bytes / 2 ** 20, startupPages: r.startupPages, deviceId: r.deviceId, log: r.log };
}

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lethe-bench-debian-'));
  const s = await startServer();
  try {
    const snap = path.join(dir, 'snap');
    const shot = await lethe(['vm', 'snapshot', '--guest', 'debian', '--out', snap, '--mem', MEM, '--workload-mib', String(WORKLOAD_MIB), '--ssh-every', '2s', '--accel', 'tcg', '--timeout', '10m', '--json']);
    if (shot.code !== 0) throw new Error(`snapshot failed: ${shot.stderr}`);
    const boot = JSON.parse(shot.stdout) as { bootToReadySeconds: number };
    const push = await lethe(['image', 'push', IMAGE, '--disk', path.join(snap, 'disk.raw'), '--memory', path.join(snap, 'ram.bin'), '--state', path.join(snap, 'state.bin')], s.env);
    if (push.code !== 0) throw new Error(`push failed: ${push.stderr}`);
    fs.rmSync(snap, { recursive: true, force: true });
    const ready = (log: string) => verifyPasses(log).length >= 1 && sshAnswered(log);

    await setPolicy(s, dir, 'sensitive:\n  memory: none\n');
    const cold = await resume(s, 'resume, cold (no prefetch)', ['--no-prefetch'], ready);
    await setPolicy(s, dir, 'sensitive:\n  memory: none\nprefetch:\n  order: none\n');
    const passes = Number(values['record-passes']);
    const recording = await resume(s, 'recording', [], (log) => verifyPasses(log).length >= passes && sshAnswered(log));
    if (!/first-touch order of \d+ page\(s\) uploaded/.test(recording.log)) throw new Error('the recording session left no first-touch order at the server');
    const t = await lethe(['image', 'trust', IMAGE, recording.deviceId], s.env);
    if (t.code !== 0) throw new Error(`image trust failed: ${t.stderr}`);
    // Background prefetch too slow to matter: what the startup buffer holds decides.
    await setPolicy(s, dir, `sensitive:\n  memory: none\nprefetch:\n  startup: ${values.startup}\n  order: trace\n  bandwidth: 16KiB/s\n`);
    const learned = await resume(s, `resume, learned order (startup ${values.startup})`, [], ready);

    const runs = [cold, learned].map(({ deviceId: _d, log: _l, ...r }) => r);
    const out = { guest: { mem: MEM, workloadMib: WORKLOAD_MIB }, bootToReadySeconds: boot.bootToReadySeconds, runs };
    if (values.json) {
      console.log(JSON.stringify(out, null, 2));
      return;
    }
    console.log(`Debian 12 guest (${MEM} RAM, ${WORKLOAD_MIB} MiB workload, systemd, ssh-agent), TCG; ready = first full verify pass and ssh-add -l answered`);
    console.log(
      table(
        ['', 's to ready', '÷ boot', 'faults', 'demand requests', 'MiB fetched', 'startup pages'],
        [
          ['boot (yardstick)', boot.bootToReadySeconds.toFixed(1), '1.00', '-', '-', '-', '-'],
          ...runs.map((r) => [r.name, r.seconds.toFixed(1), (r.seconds / boot.bootToReadySeconds).toFixed(2), r.faults, r.demandRequests, r.mibFetched.toFixed(1), r.startupPages]),
        ],
      ),
    );
  } finally {
    await s.stop();
    fs.rmSync(path.dirname(s.dir), { recursive: true, force: true }); // the server's data: a copy of every image pushed
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

await main();
