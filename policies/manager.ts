// The policy manager: turns events (pages arriving and leaving, the guest
// driver's reports, the clock, the lease) into decisions — which guest pages to
// evict, in what order to prefetch. Pure: it keeps no clock and does no I/O, so
// the agent's evictor and `lethe policy simulate` make the same decisions.
import { MEM_CHUNK_SIZE } from '../common/constants.js';
import { framesToPages, type FrameRun, type HintReport } from '../common/hint-protocol.js';
import type { Policy } from './schema.js';

export type { FrameRun, HintReport } from '../common/hint-protocol.js';

/** The parts of a policy the manager decides with. */
export type ManagerPolicy = Pick<
  Policy,
  'memoryMode' | 'evictIdleMs' | 'evictBudgetBytes' | 'freePages' | 'onLeaseExpiry' | 'prefetchStartupBytes' | 'prefetchOrder'
>;

/** A report's runs of guest frames (not pages: see framesToPages). */
export type FrameRuns = FrameRun[];

export interface EvictionDecision {
  pages: number[];
  /** How many of `pages` each rule chose (a page counts once, for the first rule that chose it). */
  why: { idle: number; free: number; budget: number };
}

export type LeaseAction = { evict: 'sensitive' | 'all'; suspend: boolean };

/** A guest RAM page: one memory chunk. */
export const PAGE_BYTES = MEM_CHUNK_SIZE;

/** Eviction passes run this often: a quarter of the idle time, within [100 ms, 5 s]. */
export const tickMs = (idleMs: number): number => Math.min(5_000, Math.max(100, idleMs / 4));

/**
 * Resident pages are described by their arrival time (ms, any clock the caller
 * keeps consistently; 0 = not resident), indexed by page.
 */
export type Arrivals = ArrayLike<number>;

export class PolicyManager {
  private hinted: Uint8Array;
  private free: Uint8Array;

  /**
   * @param serverClass tells whether the server keeps a page in the sensitive
   *   class (per-page keys); `memory: all` evicts exactly those.
   */
  constructor(
    public policy: ManagerPolicy,
    readonly pages: number,
    private readonly serverClass: (page: number) => 'sensitive' | 'normal' = () => 'sensitive',
  ) {
    this.hinted = new Uint8Array(pages);
    this.free = new Uint8Array(pages);
  }

  /**
   * Call when the guest driver sends a complete report: it replaces the last one.
   * Frames outside the guest's RAM (in the PCI hole, or past its end) are ignored.
   */
  hintReport(r: Pick<HintReport, 'sensitive' | 'free'>): void {
    const memBytes = this.pages * PAGE_BYTES;
    this.hinted.fill(0);
    this.free.fill(0);
    mark(this.hinted, framesToPages(r.sensitive, memBytes));
    mark(this.free, framesToPages(r.free, memBytes));
  }

  /** Whether the policy counts this page's plaintext as sensitive now. */
  isSensitive(page: number): boolean {
    switch (this.policy.memoryMode) {
      case 'none':
        return false;
      case 'hinted':
        return this.hinted[page] === 1;
      default:
        return this.hinted[page] === 1 || this.serverClass(page) === 'sensitive';
    }
  }

  /** Whether the guest reported this page free in its last report. */
  isFree(page: number): boolean {
    return this.free[page] === 1;
  }

  /**
   * The pages to evict now: sensitive pages resident for the idle time, pages
   * the guest reported free (`free-pages: evict`), then, over the plaintext
   * budget, the oldest sensitive pages left.
   */
  evictionSet(now: number, arrivals: Arrivals): EvictionDecision {
    const p = this.policy;
    const out: number[] = [];
    const why = { idle: 0, free: 0, budget: 0 };
    if (p.memoryMode === 'none') return { pages: out, why };
    const keep: number[] = [];
    for (let page = 0; page < this.pages; page++) {
      const at = arrivals[page];
      if (!at) continue;
      const sensitive = this.isSensitive(page);
      if (sensitive && now - at >= p.evictIdleMs) {
        why.idle++;
      } else if (p.freePages === 'evict' && this.free[page] === 1) {
        why.free++;
      } else {
        if (sensitive) keep.push(page);
        continue;
      }
      out.push(page);
    }
    if (p.evictBudgetBytes !== null) {
      const allowed = Math.floor(p.evictBudgetBytes / PAGE_BYTES);
      if (keep.length > allowed) {
        keep.sort((a, b) => arrivals[a] - arrivals[b] || a - b);
        for (const page of keep.slice(0, keep.length - allowed)) {
          out.push(page);
          why.budget++;
        }
      }
    }
    out.sort((a, b) => a - b);
    return { pages: out, why };
  }

  /** What to do when the lease is about to run out without a renewal. */
  leaseEnding(): LeaseAction {
    switch (this.policy.onLeaseExpiry) {
      case 'evict-all':
        return { evict: 'all', suspend: false };
      case 'suspend':
        // Everything out first (a suspend needs the server, which may be gone), then the suspend is tried.
        return { evict: 'all', suspend: true };
      default:
        return { evict: 'sensitive', suspend: false };
    }
  }
}

/**
 * vTube's startup rule: how many pages of the order to fetch before the guest runs
 * so that the rest, streaming in order at `pagesPerMs`, never arrives after the
 * guest first needs it. `curve` gives, at counts k_j, the time t_j (ms from the
 * guest starting) by which guests of the image had touched k_j pages; pages past
 * k_(j-1) are not touched before t_(j-1), so B ≥ k_j − t_(j-1) · pagesPerMs for
 * every point (t_0 = 0), rounded up, at most `orderLength`. Assumes the guest takes
 * its pages in the order's order; one that strays faults for them, as without a buffer.
 */
export function startupPages(curve: readonly (readonly [number, number])[], pagesPerMs: number, orderLength: number): number {
  let need = 0;
  let before = 0;
  for (const [k, t] of curve) {
    need = Math.max(need, k - before * pagesPerMs);
    before = t;
  }
  return Math.min(orderLength, Math.max(0, Math.ceil(need)));
}

/**
 * The order to prefetch the RAM pages of a guest of `pages` pages in, split into the
 * startup buffer (fetched before the guest runs) and the rest (in the background,
 * capped). `learned` is the server's trace-learned first-touch order; `present` tells
 * which pages the image stores (zero pages need no fetch). Order `none` turns off the
 * background prefetch only: the startup buffer is filled in address order.
 */
export function prefetchPlan(
  p: Pick<ManagerPolicy, 'prefetchOrder' | 'prefetchStartupBytes'>,
  pages: number,
  learned: ArrayLike<number>,
  present: (page: number) => boolean,
): { startup: number[]; rest: number[] } {
  const seen = new Uint8Array(pages);
  const order: number[] = [];
  const take = (page: number) => {
    if (page < pages && !seen[page] && present(page)) {
      seen[page] = 1;
      order.push(page);
    }
  };
  if (p.prefetchOrder === 'trace') for (let i = 0; i < learned.length; i++) take(learned[i]);
  for (let page = 0; page < pages; page++) take(page);
  const n = Math.min(order.length, Math.floor(p.prefetchStartupBytes / PAGE_BYTES));
  return { startup: order.slice(0, n), rest: p.prefetchOrder === 'none' ? [] : order.slice(n) };
}

/** Marks page runs, which framesToPages keeps within the guest's pages. */
function mark(set: Uint8Array, runs: readonly FrameRun[]): void {
  for (const [first, count] of runs) set.fill(1, first, first + count);
}
