// The guest hint protocol's host-side words (docs/guest-hints.md): its limits, the
// policy line the host sends, the report the guest sends back and where its frames
// lie in the guest's RAM file. Shared by the agent's HintChannel, the policy manager
// and the policy checks, which refuse at check time what the guest driver would refuse.
import { LetheError } from './errors.js';

export const HINT_PROTOCOL_VERSION = 1;
/** The virtio-serial port's name (guest-driver/guestd.h PORT_NAME). */
export const HINT_PORT_NAME = 'org.lethe.hint';
/** Longest line either side sends, the '\n' included. */
export const HINT_MAX_LINE = 4096;
/** Most names in one policy list. */
export const HINT_MAX_NAMES = 128;
export const HINT_MIN_INTERVAL_MS = 100;
export const HINT_MAX_INTERVAL_MS = 86_400_000;
export const HINT_DRIVER_NAME = 'lethe-guestd';

/** A guest frame: x86's 4 KiB page. */
const FRAME_BYTES = 4096;
/**
 * q35's RAM layout (QEMU 7.2 hw/i386/pc_q35.c, pc_q35_init): RAM of at least
 * 0xb0000000 bytes (2.75 GiB) is split into 2 GiB at 0 and the rest at 4 GiB; less
 * lies whole at 0. The RAM file holds the low part, then the high part.
 */
const Q35_SPLIT_FROM_BYTES = 0xb000_0000;
const Q35_LOW_BYTES = 0x8000_0000;
const Q35_HIGH_FIRST_PFN = 0x1_0000_0000 / FRAME_BYTES;

/** [first frame number, number of frames]: guest-physical frames, 4 KiB each. */
export type FrameRun = [pfn: number, count: number];

/** A complete report of the guest driver. */
export interface HintReport {
  seq: number;
  sensitive: FrameRun[];
  free: FrameRun[];
  sensitiveFrames: number;
  freeFrames: number;
  /** Processes that matched the policy's processes or cgroups. */
  procs: number;
}

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

/**
 * The guest's frame runs as runs of pages of its RAM file (page = file offset ÷ 4096)
 * for a q35 guest of memBytes of RAM. Frames in the PCI hole below 4 GiB and frames
 * past the RAM are left out; a run across either is cut.
 */
export function framesToPages(runs: readonly FrameRun[], memBytes: number): FrameRun[] {
  const pages = Math.floor(memBytes / FRAME_BYTES);
  const low = memBytes >= Q35_SPLIT_FROM_BYTES ? Q35_LOW_BYTES / FRAME_BYTES : pages;
  const out: FrameRun[] = [];
  /** The part of [pfn, end) within frames [from, to), moved to pages from `page` on. */
  const cut = (pfn: number, end: number, from: number, to: number, page: number) => {
    const first = Math.max(pfn, from);
    const last = Math.min(end, to);
    if (first < last) out.push([first - from + page, last - first]);
  };
  for (const [pfn, count] of runs) {
    cut(pfn, pfn + count, 0, low, 0);
    if (pages > low) cut(pfn, pfn + count, Q35_HIGH_FIRST_PFN, Q35_HIGH_FIRST_PFN + pages - low, low);
  }
  return out;
}
