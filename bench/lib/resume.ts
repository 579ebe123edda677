// One resume of an image's guest by an agent process on a fresh device (empty
// cache), until the guest is `ready`; what the agent says of it then. The benches
// that compare resumes share it.
import { control, type AgentStatus } from '../../agent/index.js';
import { assign, enrolledDevice } from '../../test/helpers/fixtures.js';
import { verifyPasses } from '../../test/helpers/guest.js';
import { startAgentProc, waitFor, type ServerProc } from '../../test/helpers/proc.js';

export interface Resumed {
  seconds: number;
  status: AgentStatus;
  /** Pages the startup buffer brought before the guest ran. */
  startupPages: number;
  log: string;
  deviceId: string;
}

/** @throws Error when the guest's workload reports a bad page, or it is not ready in 10 minutes. */
export async function resumeOnFreshDevice(s: ServerProc, image: string, name: string, args: string[], ready: (log: string) => boolean): Promise<Resumed> {
  const d = await enrolledDevice(s, `bench-${name.replace(/\W+/g, '-')}`);
  await assign(s, d.deviceId, image);
  const t0 = Date.now();
  const a = await startAgentProc(d.home, image, ['--vm', '--accel', 'tcg', '--log-guest-console', ...args]);
  try {
    await waitFor(async () => ready(a.log()) || undefined, 600_000, `${name}: ready`);
    const seconds = (Date.now() - t0) / 1000;
    const status = await control<AgentStatus>(d.home, { cmd: 'status' });
    for (const p of verifyPasses(a.log())) if (p.bad !== 0) throw new Error(`bad pages in ${name}: pass ${p.pass} bad=${p.bad}`);
    a.proc.kill('SIGTERM');
    await a.exited;
    const startup = /startup buffer: (\d+) page/.exec(a.log());
    return { seconds, status, startupPages: startup ? Number(startup[1]) : 0, log: a.log(), deviceId: d.deviceId };
  } finally {
    if (a.proc.exitCode === null) a.proc.kill('SIGKILL');
    d.close();
  }
}
