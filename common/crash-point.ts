// Named points where the crash-consistency tests kill a server or agent process
// outright, as a power cut or the OOM killer would: no finally block, no exit
// handler, no flush runs after it. docs/crash-consistency.md lists the points and
// what must hold after a restart from each.
//
// LETHE_CRASH_AT=NAME:N sends the process SIGKILL the Nth time it reaches NAME.
// Unset, as it always is outside those tests, a point costs one comparison.

/** Every point, by the step of the write path it sits in. */
export const CRASH_POINTS = [
  // Any transaction of the server's database, the outermost one only.
  'sql.before-commit',
  'sql.after-commit',
  // An audit entry written, its transaction not committed yet.
  'audit.written',
  // An image push: a chunk stored, the version not committed; the commit done, not answered.
  'push.chunk-stored',
  'push.committed',
  // A device's check-in: its blobs stored, their rows not; the base's rows carried over, not
  // committed; the request done, not answered.
  'checkin.blobs-stored',
  'checkin.carried-over',
  'checkin.done',
  // Keys sealed to a device and audited, not sent yet.
  'keys.released',
  // The agent: a part of a check-in sent; the whole check-in committed at the server, the cache not told yet.
  'agent.checkin-part-sent',
  'agent.checkin-committed',
  // The agent's suspend: some of the new device state written to the cache.
  'agent.state-chunk-written',
] as const;

export type CrashPointName = (typeof CRASH_POINTS)[number];

const armed = parse(process.env.LETHE_CRASH_AT);
let hits = 0;

function parse(spec: string | undefined): { name: string; n: number } | undefined {
  if (!spec) return undefined;
  const m = /^([a-z.-]+):([1-9][0-9]*)$/.exec(spec);
  if (!m || !(CRASH_POINTS as readonly string[]).includes(m[1])) {
    throw new Error(`LETHE_CRASH_AT=${spec}: expected POINT:N, with POINT one of ${CRASH_POINTS.join(', ')}`);
  }
  return { name: m[1], n: Number(m[2]) };
}

/** Kills this process here if LETHE_CRASH_AT names this point and this is its Nth arrival. */
export function crashPoint(name: CrashPointName): void {
  if (armed === undefined || armed.name !== name) return;
  if (++hits < armed.n) return;
  process.kill(process.pid, 'SIGKILL');
}
