// Replays a recorded access trace (docs/policy-simulate.md) under a policy, with
// the same PolicyManager the agent's evictor uses: how many faults, how many
// bytes from the server, how many key releases, and how long sensitive
// plaintext stayed in guest RAM — beside keeping everything and evicting
// everything, the two ends any policy sits between.
import { CHUNK_OVERHEAD } from '../common/constants.js';
import { LetheError } from '../common/errors.js';
import { PAGE_BYTES, PolicyManager, tickMs, type FrameRuns, type ManagerPolicy } from './manager.js';

export const TRACE_FORMAT = 'lethe-access';
export const TRACE_VERSION = 1;
/** Ciphertext of one guest page on the wire: format byte, nonce, tag. */
const PAGE_CIPHERTEXT = PAGE_BYTES + CHUNK_OVERHEAD;

export type TraceEvent = { t: number; fault: number } | { t: number; hint: { sensitive: FrameRuns; free: FrameRuns } };

export interface Trace {
  pages: number;
  events: TraceEvent[];
}

export interface SimResult {
  name: string;
  faults: number;
  /** Faults that had to fetch the page's ciphertext from the server. */
  serverFetches: number;
  bytesFetched: number;
  /**
   * Faults that needed a key release (audited): with memory all or hinted every guest
   * page is in the server's sensitive class and its key goes when the page is evicted,
   * so every fault does; with memory none, none does (one class key).
   */
  keyReleases: number;
  evictions: number;
  /** Σ over sensitive pages of the seconds their plaintext was resident. */
  sensitivePlaintextSeconds: number;
  /** The most sensitive plaintext resident at once, in bytes. */
  peakSensitiveBytes: number;
}

/** Parses an access trace (JSON lines); throws BAD_REQUEST naming the line. */
export function parseAccessTrace(text: string, file = 'trace'): Trace {
  const lines = text.split('\n');
  const fail = (n: number, msg: string): never => {
    throw new LetheError('BAD_REQUEST', `${file}:${n}: ${msg}`, { hint: 'record one with `lethe agent run IMAGE --vm --trace FILE`; see docs/policy-simulate.md' });
  };
  let header: { trace?: unknown; version?: unknown; pages?: unknown };
  try {
    header = JSON.parse(lines[0] ?? '');
  } catch {
    return fail(1, 'not a Lethe access trace (the first line is not JSON)');
  }
  if (typeof header !== 'object' || header === null) return fail(1, 'not a Lethe access trace (the first line is not an object)');
  if (header.trace !== TRACE_FORMAT || header.version !== TRACE_VERSION) return fail(1, `not a ${TRACE_FORMAT} trace, version ${TRACE_VERSION}`);
  const pages = header.pages;
  if (typeof pages !== 'number' || !Number.isInteger(pages) || pages <= 0 || pages > 1 << 24) return fail(1, `bad page count: ${JSON.stringify(pages)}`);
  const events: TraceEvent[] = [];
  let last = 0;
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i].trim();
    if (!line) continue;
    let e: Record<string, unknown>;
    try {
      e = JSON.parse(line);
    } catch {
      return fail(i + 1, 'not JSON');
    }
    if (typeof e !== 'object' || e === null) return fail(i + 1, 'an event is {"t", "fault"} or {"t", "hint"}');
    const t = e.t;
    if (typeof t !== 'number' || !(t >= last)) return fail(i + 1, `bad time ${JSON.stringify(t)}: times are ms from the start, in order`);
    last = t;
    if (typeof e.fault === 'number') {
      if (!Number.isInteger(e.fault) || e.fault < 0 || e.fault >= pages) return fail(i + 1, `page ${e.fault} is outside the guest's ${pages} pages`);
      events.push({ t, fault: e.fault });
    } else if (e.hint && typeof e.hint === 'object') {
      const h = e.hint as { sensitive?: unknown; free?: unknown };
      events.push({ t, hint: { sensitive: runs(h.sensitive, i + 1, fail), free: runs(h.free, i + 1, fail) } });
    } else {
      return fail(i + 1, 'an event is {"t", "fault"} or {"t", "hint"}');
    }
  }
  return { pages, events };
}

function runs(v: unknown, line: number, fail: (n: number, msg: string) => never): FrameRuns {
  if (v === undefined) return [];
  const ok = Array.isArray(v) && v.every((r) => Array.isArray(r) && r.length === 2 && r.every((x) => Number.isInteger(x) && x >= 0));
  return ok ? (v as FrameRuns) : fail(line, 'hint runs are [[first frame, count], …]');
}

/**
 * Replays `trace` under `policy`. Each fault installs its page (from the cache if
 * it was fetched before, else from the server); eviction passes run every
 * tickMs(idle) of trace time, as the agent's do.
 */
export function simulate(name: string, policy: ManagerPolicy, trace: Trace): SimResult {
  const m = new PolicyManager(policy, trace.pages);
  // Arrival time + 1 so that 0 means "not resident" even for a page that came at t = 0.
  const arrivals = new Float64Array(trace.pages);
  const cached = new Uint8Array(trace.pages);
  const r: SimResult = { name, faults: 0, serverFetches: 0, bytesFetched: 0, keyReleases: 0, evictions: 0, sensitivePlaintextSeconds: 0, peakSensitiveBytes: 0 };
  const tick = tickMs(policy.evictIdleMs);
  let clock = 0;
  let nextPass = tick;
  // Sensitive plaintext accrues between steps for every resident sensitive page.
  let sensitive = 0;
  const recount = () => {
    sensitive = 0;
    for (let p = 0; p < trace.pages; p++) if (arrivals[p] && m.isSensitive(p)) sensitive++;
  };
  const advance = (to: number) => {
    r.sensitivePlaintextSeconds += (sensitive * (to - clock)) / 1000;
    r.peakSensitiveBytes = Math.max(r.peakSensitiveBytes, sensitive * PAGE_BYTES);
    clock = to;
  };
  // The earliest time a pass can evict anything: passes before it are skipped, which
  // changes no result (nothing between events changes but the clock) and keeps a
  // long, quiet trace of a big guest from costing a walk of every page each tick.
  let due = 0;
  const earliestIdle = () => {
    let d = Number.POSITIVE_INFINITY;
    for (let p = 0; p < trace.pages; p++) if (arrivals[p] && m.isSensitive(p)) d = Math.min(d, arrivals[p] - 1 + policy.evictIdleMs);
    return d;
  };
  const pass = (at: number) => {
    advance(at);
    for (const p of m.evictionSet(at + 1, arrivals).pages) {
      if (m.isSensitive(p)) sensitive--;
      arrivals[p] = 0;
      r.evictions++;
    }
    due = earliestIdle();
  };
  for (const e of trace.events) {
    while (nextPass <= e.t) {
      if (nextPass >= due) {
        pass(nextPass);
        nextPass += tick;
      } else {
        // To the tick at or after `due`, or past this event when nothing is due before it.
        nextPass = due <= e.t ? Math.ceil(due / tick) * tick : (Math.floor(e.t / tick) + 1) * tick;
      }
    }
    advance(e.t);
    if ('hint' in e) {
      m.hintReport(e.hint);
      recount();
      due = 0; // free pages and sensitivity changed: the next pass decides
      continue;
    }
    if (arrivals[e.fault]) continue; // resident: the guest's access is no fault
    r.faults++;
    if (!cached[e.fault]) {
      cached[e.fault] = 1;
      r.serverFetches++;
      r.bytesFetched += PAGE_CIPHERTEXT;
    }
    // The hints decide what is evicted for idleness, not which keys are released (buildPolicy: sensitiveMemory).
    if (policy.memoryMode !== 'none') r.keyReleases++;
    if (m.isSensitive(e.fault)) sensitive++;
    arrivals[e.fault] = e.t + 1;
    r.peakSensitiveBytes = Math.max(r.peakSensitiveBytes, sensitive * PAGE_BYTES);
    if (policy.evictBudgetBytes !== null || (policy.freePages === 'evict' && m.isFree(e.fault))) due = 0;
    else if (m.isSensitive(e.fault)) due = Math.min(due, e.t + policy.evictIdleMs);
  }
  const end = trace.events.length ? trace.events[trace.events.length - 1].t : 0;
  pass(end);
  r.sensitivePlaintextSeconds = Math.round(r.sensitivePlaintextSeconds * 1000) / 1000;
  return r;
}

/**
 * The policy beside its two ends: nothing evicted (the same sensitivity, so the
 * plaintext-seconds compare) and every sensitive page evicted at the first pass.
 */
export function simulateWithBaselines(policy: ManagerPolicy, trace: Trace): SimResult[] {
  const mode = policy.memoryMode === 'none' ? 'all' : policy.memoryMode;
  return [
    simulate('policy', policy, trace),
    simulate('no eviction', { ...policy, memoryMode: mode, evictIdleMs: Number.POSITIVE_INFINITY, evictBudgetBytes: null, freePages: 'keep' }, trace),
    simulate('evict everything', { ...policy, memoryMode: mode, evictIdleMs: 0, evictBudgetBytes: null }, trace),
  ];
}
