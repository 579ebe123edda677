// Prefetch and policies, in one run with a real server, agents and QEMU (TCG):
//   a resume of the test guest on a fresh device (empty cache) to its first full verify
//   pass, (1) with no prefetch — the yardstick — (2) with a startup buffer in address
//   order and (3) with the same buffer in the trace-learned order a recording session left
//   at the server: demand requests, chunks fetched on demand, bytes fetched, time;
//   then sensitive plaintext-seconds under each default policy, replaying the access trace
//   the recording session wrote (lethe policy simulate), beside its two baselines.
//
//   node --import tsx bench/prefetch.ts [--guest-mem 128M] [--guest-mib 16] [--startup 24MiB] [--record-passes 20] [--json]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { table } from '../cli/output.js';
import { setImagePolicy } from './lib/image-policy.js';
import { resumeOnFreshDevice } from './lib/resume.js';
import { loadPolicyFile } from '../policies/index.js';
import { parseAccessTrace, simulateWithBaselines } from '../policies/simulate.js';
import { verifyPasses } from '../test/helpers/guest.js';
import { ROOT, lethe, startServer, type ServerProc } from '../test/helpers/proc.js';

const { values } = parseArgs({
  options: {
    'guest-mem': { type: 'string', default: '128M' },
    'guest-mib': { type: 'string', default: '16' },
    startup: { type: 'string', default: '24MiB' },
    /** Verify passes the recording session runs: its trace should outlast the policies' idle times. */
    'record-passes': { type: 'string', default: '20' },
    json: { type: 'boolean', default: false },
  },
});

const IMAGE = 'bench';

interface Run {
  name: string;
  demandRequests: number;
  demandChunks: number;
  mibFetched: number;
  startupPages: number;
  secondsToVerify: number;
}

const setPolicy = (s: ServerProc, dir: string, text: string) => setImagePolicy(s, dir, IMAGE, text);

/** One resume on a fresh device to the first full verify pass (or `until` passes); what it fetched by then. */
async function resume(s: ServerProc, name: string, args: string[], until = 1): Promise<Run & { log: string }> {
  const r = await resumeOnFreshDevice(s, IMAGE, name, args, (log) => verifyPasses(log).length >= until);
  const f = r.status.fetch;
  return { name, demandRequests: f.demandBatches, demandChunks: f.demandChunks, mibFetched: f.bytes / 2 ** 20, startupPages: r.startupPages, secondsToVerify: r.seconds, log: r.log };
}

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lethe-bench-prefetch-'));
  const s = await startServer();
  try {
    const snap = path.join(dir, 'snap');
    const shot = await lethe(['vm', 'snapshot', '--out', snap, '--mem', String(values['guest-mem']), '--workload-mib', String(values['guest-mib']), '--interval', '4s', '--accel', 'tcg', '--json']);
    if (shot.code !== 0) throw new Error(`snapshot failed: ${shot.stderr}`);
    const push = await lethe(['image', 'push', IMAGE, '--disk', path.join(snap, 'disk.raw'), '--memory', path.join(snap, 'ram.bin'), '--state', path.join(snap, 'state.bin')], s.env);
    if (push.code !== 0) throw new Error(`push failed: ${push.stderr}`);

    // The recording session: short idle time so re-faults show re-use; the guest driver reports the workload.
    await setPolicy(s, dir, 'sensitive:\n  memory: all\n  processes: [lethe-workload]\neviction:\n  idle: 1s\nprefetch:\n  order: none\nhints:\n  interval: 1s\n');
    const trace = path.join(dir, 'session.trace.jsonl');
    const recording = await resume(s, 'recording', ['--trace', trace], Number(values['record-passes']));
    if (!/first-touch order of \d+ page\(s\) uploaded/.test(recording.log)) throw new Error('the recording session left no first-touch order at the server');

    const startup = String(values.startup);
    const slow = '  bandwidth: 16KiB/s\n'; // background prefetch too slow to matter: the startup buffer decides
    await setPolicy(s, dir, 'sensitive:\n  memory: none\n');
    const none = await resume(s, 'no prefetch (yardstick)', ['--no-prefetch']);
    await setPolicy(s, dir, `sensitive:\n  memory: none\nprefetch:\n  startup: ${startup}\n  order: address\n${slow}`);
    const address = await resume(s, `startup buffer ${startup}, address order`, []);
    await setPolicy(s, dir, `sensitive:\n  memory: none\nprefetch:\n  startup: ${startup}\n  order: trace\n${slow}`);
    const learned = await resume(s, `startup buffer ${startup}, trace-learned order`, []);
    const runs = [none, address, learned].map(({ log: _log, ...r }) => r);

    const t = parseAccessTrace(fs.readFileSync(trace, 'utf8'), trace);
    const policies = ['laptop-default', 'finance-strict', 'developer-hinted'].map((n) => {
      const { policy } = loadPolicyFile(path.join(ROOT, 'policies', `${n}.yaml`));
      return { policy: n, results: simulateWithBaselines(policy, t) };
    });
    const out = { guest: { mem: values['guest-mem'], workloadMib: Number(values['guest-mib']) }, runs, trace: { pages: t.pages, events: t.events.length }, policies };
    if (values.json) {
      console.log(JSON.stringify(out, null, 2));
      return;
    }
    console.log(`resume of the test guest (${values['guest-mem']} RAM, ${values['guest-mib']} MiB workload) on a fresh device to its first full verify pass`);
    console.log(
      table(
        ['', 'startup pages', 'demand requests', '÷ none', 'chunks on demand', 'MiB fetched', 's to verify'],
        runs.map((r) => [r.name, r.startupPages, r.demandRequests, (r.demandRequests / none.demandRequests).toFixed(2), r.demandChunks, r.mibFetched.toFixed(1), r.secondsToVerify.toFixed(1)]),
      ),
    );
    const span = t.events.length ? t.events[t.events.length - 1].t / 1000 : 0;
    console.log(`\nsensitive plaintext under each default policy, replaying the recording session's trace (${t.events.length} events over ${span.toFixed(0)} s)`);
    console.log(
      table(
        ['policy', 'run', 'faults', 'key releases', 'sensitive plaintext s', '÷ no eviction', 'peak sensitive MiB'],
        policies.flatMap(({ policy, results }) =>
          results.map((r) => [
            policy,
            r.name,
            r.faults,
            r.keyReleases,
            r.sensitivePlaintextSeconds.toFixed(1),
            (r.sensitivePlaintextSeconds / results.find((x) => x.name === 'no eviction')!.sensitivePlaintextSeconds).toFixed(3),
            (r.peakSensitiveBytes / 2 ** 20).toFixed(1),
          ]),
        ),
      ),
    );
  } finally {
    await s.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

await main();
