// The guest hint protocol's host-side words (docs/guest-hints.md): its limits and
// the policy line the host sends. Shared by the agent's HintChannel and by the
// policy checks, which refuse at check time what the guest driver would refuse.
import { LetheError } from './errors.js';

export const HINT_PROTOCOL_VERSION = 1;
/** Longest line either side sends, the '\n' included. */
export const HINT_MAX_LINE = 4096;
/** Most names in one policy list. */
export const HINT_MAX_NAMES = 128;
export const HINT_MIN_INTERVAL_MS = 100;
export const HINT_MAX_INTERVAL_MS = 86_400_000;
export const HINT_DRIVER_NAME = 'lethe-guestd';

export interface HintPolicy {
  /** How often the driver reports; 0: only when asked. */
  intervalMs: number;
  /** Guest process names (comm, the first 15 bytes count). */
  processes: string[];
  /** Guest cgroup paths; each names itself and everything below. */
  cgroups: string[];
  /** Guest files or directories whose page cache is sensitive. */
  files: string[];
}

/** Bytes a name may carry as they are; any other byte is sent as %XX. */
const PLAIN_BYTE = (b: number): boolean => b > 0x20 && b < 0x7f && b !== 0x25 /* % */ && b !== 0x2c /* , */ && b !== 0x3d; /* = */

export function percentEncode(name: string): string {
  let out = '';
  for (const b of Buffer.from(name, 'utf8')) out += PLAIN_BYTE(b) ? String.fromCharCode(b) : `%${b.toString(16).toUpperCase().padStart(2, '0')}`;
  return out;
}

/**
 * The `policy …` line for p, without its '\n'.
 * @throws LetheError BAD_REQUEST when p breaks a limit of docs/guest-hints.md.
 */
export function policyLine(p: HintPolicy): string {
  checkPolicy(p);
  const list = (names: string[]) => names.map(percentEncode).join(',');
  const line = `policy interval=${p.intervalMs} procs=${list(p.processes)} cgroups=${list(p.cgroups)} files=${list(p.files)}`;
  if (line.length + 1 > HINT_MAX_LINE) {
    throw new LetheError('BAD_REQUEST', `the hint policy takes ${line.length + 1} bytes, over the ${HINT_MAX_LINE}-byte line limit`, {
      hint: 'name fewer or shorter processes, cgroups and files (a directory covers its files)',
    });
  }
  return line;
}

function checkPolicy(p: HintPolicy): void {
  const bad = (what: string, hint: string) => new LetheError('BAD_REQUEST', `bad hint policy: ${what}`, { hint });
  const ms = p.intervalMs;
  if (!Number.isInteger(ms) || ms < 0 || ms > HINT_MAX_INTERVAL_MS || (ms > 0 && ms < HINT_MIN_INTERVAL_MS)) {
    throw bad(`interval ${JSON.stringify(ms)} ms`, `use 0 (only on request) or ${HINT_MIN_INTERVAL_MS} to ${HINT_MAX_INTERVAL_MS} ms`);
  }
  for (const [field, names, paths] of [['processes', p.processes, false], ['cgroups', p.cgroups, true], ['files', p.files, true]] as const) {
    if (names.length > HINT_MAX_NAMES) throw bad(`${names.length} ${field}`, `name at most ${HINT_MAX_NAMES}`);
    for (const n of names) {
      if (n === '' || n.includes('\0')) throw bad(`${field} entry ${JSON.stringify(n)}`, 'names are non-empty and hold no NUL byte');
      if (paths && !n.startsWith('/')) throw bad(`${field} entry '${n}' is not an absolute path`, `write it as '/${n}'`);
    }
  }
}
