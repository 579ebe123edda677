// Crash consistency of the agent: a real agent process (test/helpers/crash-agent.ts)
// writes disk chunks, flushes them, replaces the device state as a suspend does and
// checks in, and is killed (SIGKILL) at a named point of that path. Started again on
// the same home: every flushed write reaches the server, the device state it resumes
// and checks in is the old one or the whole new one, and its cache keeps nothing
// dirty that the server already has.
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { CHUNK_SIZE } from '../../common/constants.js';
import type { CrashPointName } from '../../common/crash-point.js';
import { assign, enrolledDevice, pushImage } from '../helpers/fixtures.js';
import { lethe, ROOT, startServer, tmpDir, type ServerProc } from '../helpers/proc.js';

const CHILD = path.join(ROOT, 'test', 'helpers', 'crash-agent.ts');
const IMAGE = 'crash-agent';
const hash = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** Each point, and the arrivals one work run makes at it. */
const AGENT_POINTS: [CrashPointName, number][] = [
  ['agent.checkin-part-sent', 1],
  ['agent.checkin-committed', 1],
  ['agent.state-chunk-written', 2],
];

interface Run {
  signal: string | null;
  code: number | null;
  reports: Record<string, unknown>[];
  stderr: string;
}

function child(mode: 'work' | 'recover', home: string, env: Record<string, string> = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, ['--import', 'tsx', CHILD, mode, home, IMAGE], { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    p.on('error', reject);
    p.on('close', (code, signal) =>
      resolve({ code, signal, stderr: err, reports: out.split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>) }),
    );
  });
}

const report = <T>(r: Run, key: string): T | undefined => r.reports.find((o) => key in o)?.[key] as T | undefined;

async function pulled(s: ServerProc, version: number): Promise<{ disk: Buffer; state: Buffer }> {
  const out = tmpDir('lethe-crash-agent-pull-');
  const p = await lethe(['image', 'pull', `${IMAGE}@${version}`, '--out', out], s.env);
  expect(p.code, p.stderr).to.equal(0);
  return { disk: fs.readFileSync(path.join(out, 'disk.raw')), state: fs.readFileSync(path.join(out, 'state.bin')) };
}

describe('crash consistency of the agent (SIGKILL during check-in and suspend)', function () {
  const rounds = Number(process.env.LETHE_CRASH_ITERATIONS ?? 2 * AGENT_POINTS.length);
  this.timeout(60_000 + rounds * 120_000);

  it(`keeps every flushed write, a whole device state and a clean cache (${rounds} crashes)`, async () => {
    const s = await startServer();
    try {
      const plain = { disk: randomBytes(40 * CHUNK_SIZE.disk), mem: randomBytes(8 * CHUNK_SIZE.mem), state: randomBytes(2 * CHUNK_SIZE.state) };
      await pushImage(s, IMAGE, { plain });
      const d = await enrolledDevice(s, 'crash-agent');
      await assign(s, d.deviceId, IMAGE);
      d.close();
      let state = hash(plain.state); // the device state of the version the device resumes
      for (let it = 0; it < rounds; it++) {
        const [point, most] = AGENT_POINTS[it % AGENT_POINTS.length];
        const where = `round ${it}: ${point}`;
        const at = 1 + Math.floor(Math.random() * most);
        const work = await child('work', d.home, { LETHE_CRASH_AT: `${point}:${at}` });
        expect(work.signal, `${where}: how the agent ended\n${work.stderr}`).to.equal('SIGKILL');
        const flushed = report<Record<string, string>>(work, 'flushed');
        expect(flushed, `${where}: the writes were flushed before the point`).to.not.equal(undefined);
        const newState = report<string>(work, 'newState')!;

        const again = await child('recover', d.home);
        expect(again.code, `${where}: the agent started again\n${again.stderr}`).to.equal(0);
        const resumes = report<string>(again, 'state');
        expect([state, newState], `${where}: the device state the agent resumes is the old one or the whole new one`).to.include(resumes);
        expect(report<number>(again, 'dirtyAfter'), `${where}: nothing dirty is left in the cache`).to.equal(0);
        const version = report<number>(again, 'checkedIn') ?? report<number>(again, 'version')!;

        const got = await pulled(s, version);
        for (const [i, h] of Object.entries(flushed!)) {
          const at = Number(i) * CHUNK_SIZE.disk;
          expect(hash(got.disk.subarray(at, at + CHUNK_SIZE.disk)), `${where}: flushed disk chunk ${i} in version ${version}`).to.equal(h);
        }
        expect(hash(got.state), `${where}: version ${version} has the state the agent resumed`).to.equal(resumes);
        state = resumes!;
      }
    } finally {
      await s.stop();
    }
  });
});
