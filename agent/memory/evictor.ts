// The evictor: takes guest pages out of RAM as the policy manager decides —
// sensitive pages resident longer than the policy's idle time, pages the guest
// reported free, the oldest over the plaintext budget — and all sensitive ones
// before the lease runs out (docs/eviction.md).
//
//   fault      recordFault(page, data)     the page's keyed hash and the time it arrived
//   tick       candidates: PolicyManager.evictionSet(now, arrivals), no fault in flight
//   evict      hold the VM (QMP stop) ─▶ read each page from the RAM file ─▶ hash differs?
//              encrypt it into the cache as dirty ─▶ flush ─▶ punch the holes ─▶ drop the
//              keys ─▶ release the VM (cont)
//
// A page whose changes cannot be encrypted (no write key: offline) stays resident:
// a guest write is never dropped. The next touch of an evicted page faults through
// userfaultfd and the agent serves it again from the cache.
import fs from 'node:fs';
import sodium from 'sodium-native';
import { MEM_CHUNK_SIZE } from '../../common/constants.js';
import { secureBuffer, wipe } from '../../common/crypto.js';
import { errorChain, LetheError } from '../../common/errors.js';
import { punchHole } from '../../native/index.js';
import { PolicyManager, tickMs, type HintReport, type ManagerPolicy } from '../../policies/manager.js';
import type { AgentCore } from '../chunks/core.js';
import { BufferPool } from '../chunks/buffer-pool.js';

const PAGE = MEM_CHUNK_SIZE;
const HASH_BYTES = 16;
/**
 * The least time a key fetched beside a fault, for a page not resident, is kept: a
 * neighbour in guest-physical order is often touched seconds later, and dropping its
 * key sooner turns every fault into a key round trip.
 */
export const NEIGHBOUR_KEY_MIN_MS = 30_000;
/** How often an idle pass also looks for such keys. */
const KEY_SWEEP_MS = 5_000;
/** Pages handled in one pause of the VM. */
export const EVICT_BATCH = 4096;

/** What the evictor needs from the running VM. */
export interface EvictTarget {
  /** The guest's RAM file (tmpfs), open read-write. */
  ramFd: number;
  /** Guest RAM in pages. */
  pages: number;
  /** Stops the vCPUs until the returned release is called (nested holds are counted). */
  hold(reason: string): Promise<() => Promise<void>>;
  /** Whether a fault for this page is being served right now. */
  faultInFlight(page: number): boolean;
}

export interface EvictResult {
  evicted: number;
  /** Evicted pages whose content had changed: encrypted into the cache first. */
  dirty: number;
  /** Pages left resident: a fault in flight, or changes without a write key. */
  kept: number;
}

export class Evictor {
  readonly stats = { evicted: 0, dirty: 0, kept: 0, passes: 0, pauseMsLast: 0, pauseMsMax: 0, pauseMsTotal: 0, idle: 0, free: 0, budget: 0 };
  readonly manager: PolicyManager;
  /** When each page arrived (ms since the epoch), 0 when it is not resident. */
  private readonly since: Float64Array;
  /** The last `pages` evictions, a ring in the order pages went (each batch in arrival order). */
  private readonly evictOrder: Uint32Array;
  /** Each page's last eviction: its number in that order plus one (0: never evicted). */
  private readonly evictedAt: Float64Array;
  private evictions = 0;
  private readonly hashes: Buffer;
  private readonly scratchHash = Buffer.alloc(HASH_BYTES);
  private readonly hashKey = secureBuffer(32);
  private readonly zeroHash = Buffer.alloc(HASH_BYTES);
  private readonly pool = new BufferPool(1, PAGE);
  private timer?: NodeJS.Timeout;
  private lastKeySweep = 0;
  /** Changed pages the last passes kept because they had no write key. */
  private keyless: number[] = [];
  /** Called after each idle pass with what it did. */
  onPass?: (r: EvictResult) => void;
  private queue: Promise<unknown> = Promise.resolve();
  private stopped = false;
  private gate?: Promise<void>;

  constructor(
    private readonly core: AgentCore,
    private readonly vm: EvictTarget,
    policy: ManagerPolicy,
    private readonly log: (line: string) => void,
  ) {
    this.manager = new PolicyManager(policy, vm.pages, (p) => core.classOf('mem', p) ?? 'sensitive');
    this.since = new Float64Array(vm.pages);
    this.evictOrder = new Uint32Array(vm.pages);
    this.evictedAt = new Float64Array(vm.pages);
    this.hashes = Buffer.alloc(vm.pages * HASH_BYTES);
    sodium.randombytes_buf(this.hashKey);
    sodium.crypto_generichash(this.zeroHash, Buffer.alloc(PAGE), this.hashKey);
  }

  /** Call from the fault handler with the content about to be installed (null: a zero page). */
  recordFault(page: number, data: Buffer | null): void {
    const out = this.hashOf(page);
    if (data) sodium.crypto_generichash(out, data, this.hashKey);
    else this.zeroHash.copy(out);
    this.since[page] = Date.now();
  }

  isResident(page: number): boolean {
    return this.since[page] !== 0;
  }

  /**
   * Up to `max` pages evicted after this one, in the order they went, and not
   * resident since: a guest touching an evicted page again tends to touch next the
   * pages that arrived after it and left with it, so their keys are asked for in
   * the same round trip as this page's (AgentCore.readInto, `companions`).
   */
  evictedAfter(page: number, max: number): number[] {
    const out: number[] = [];
    const at = this.evictedAt[page];
    if (at === 0) return out;
    const n = this.since.length;
    // Ring slot s holds the s-th eviction until the (s + n)-th overwrites it: a page
    // counts only while its own last eviction is the one in the slot.
    for (let s = at; s < this.evictions && s < at + 4 * max && out.length < max; s++) {
      const p = this.evictOrder[s % n];
      if (this.evictedAt[p] === s + 1 && this.since[p] === 0) out.push(p);
    }
    return out;
  }

  /** Resident pages, with how many of them are sensitive. */
  residentCounts(): { pages: number; sensitive: number } {
    let pages = 0;
    let sensitive = 0;
    for (let p = 0; p < this.since.length; p++) {
      if (this.since[p] === 0) continue;
      pages++;
      if (this.sensitive(p)) sensitive++;
    }
    return { pages, sensitive };
  }

  get idleMs(): number {
    return this.manager.policy.evictIdleMs;
  }

  /** Call when the lease brings a policy: the next pass decides by it. */
  setPolicy(p: ManagerPolicy): void {
    this.manager.policy = p;
  }

  /** Call with each complete report of the guest driver. */
  hintReport(r: HintReport): void {
    this.manager.hintReport(r);
  }

  /** Starts (or restarts, after stop()) the idle passes. */
  start(): void {
    this.stopped = false;
    clearTimeout(this.timer);
    this.schedule();
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => {
      this.evictIdle()
        .then((r) => this.onPass?.(r))
        .catch((e) => this.log(`eviction pass failed: ${errorChain(e)}`))
        .finally(() => this.schedule());
    }, tickMs(this.idleMs));
  }

  private sensitive(page: number): boolean {
    return this.manager.isSensitive(page);
  }

  /** Evicts what the policy manager picks: idle sensitive pages, free pages, the oldest over the budget. */
  evictIdle(now = Date.now()): Promise<EvictResult> {
    return this.serial(async () => {
      const decision = this.manager.evictionSet(now, this.since);
      const due = decision.pages;
      this.stats.idle += decision.why.idle;
      this.stats.free += decision.why.free;
      this.stats.budget += decision.why.budget;
      const r = await this.evictPages(due);
      // A changed page kept for want of a write key (it did not come beside its fault)
      // gets one asked for again, without waiting: it goes at a later pass.
      const keyless = this.keyless.splice(0);
      if (keyless.length > 0) this.core.ensureWriteKeys('mem', keyless).catch((e) => this.log(`write keys for eviction: ${errorChain(e)}`));
      // Keys fetched beside a fault for neighbours the guest did not touch go too. They are
      // at least NEIGHBOUR_KEY_MIN_MS old, so a look every KEY_SWEEP_MS is enough (it walks every key).
      if (now - this.lastKeySweep >= KEY_SWEEP_MS) {
        this.lastKeySweep = now;
        this.core.dropKeysWithoutPlaintext('mem', Math.max(this.idleMs, NEIGHBOUR_KEY_MIN_MS), (p) => this.vm.faultInFlight(p));
      }
      return r;
    });
  }

  /**
   * Evicts every resident sensitive page — or, with `scope` 'all', every resident
   * page (lease about to run out, wipe, an order from the user).
   */
  evictResident(why: string, scope: 'sensitive' | 'all' = 'sensitive'): Promise<EvictResult> {
    return this.serial(async () => {
      const all: number[] = [];
      for (let p = 0; p < this.since.length; p++) if (this.since[p] !== 0 && (scope === 'all' || this.sensitive(p))) all.push(p);
      const r = await this.evictPages(all);
      const pages = scope === 'all' ? 'page(s)' : 'sensitive page(s)';
      if (r.evicted > 0) this.log(`evicted ${r.evicted} ${pages} (${why}), ${r.dirty} of them changed`);
      if (r.kept > 0) this.log(`${r.kept} ${pages} stay resident (${why}): their changes have no write key`);
      return r;
    });
  }

  /**
   * Encrypts every resident page whose content changed since it arrived into the
   * cache as dirty, without evicting it. The caller holds the VM (suspend).
   * @returns how many pages were written
   */
  captureDirty(): Promise<number> {
    return this.serial(async () => {
      const changed: number[] = [];
      await this.pool.with(PAGE, async (buf) => {
        for (let p = 0; p < this.since.length; p++) if (this.since[p] !== 0 && this.changed(p, buf)) changed.push(p);
      });
      await this.core.ensureWriteKeys('mem', changed);
      await this.pool.with(PAGE, async (buf) => {
        for (const p of changed) {
          this.readPage(p, buf);
          await this.core.write('mem', p, buf);
          this.recordFault(p, buf);
        }
      });
      this.core.flush();
      return changed.length;
    });
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => {});
    return run;
  }

  private readPage(page: number, buf: Buffer): void {
    const n = fs.readSync(this.vm.ramFd, buf, 0, PAGE, page * PAGE);
    if (n !== PAGE) throw new LetheError('VM_FAILED', `short read of guest page ${page} from the RAM file: ${n} bytes`);
  }

  /** Reads the page into buf and tells whether it differs from what arrived. */
  private changed(page: number, buf: Buffer): boolean {
    this.readPage(page, buf);
    sodium.crypto_generichash(this.scratchHash, buf, this.hashKey);
    return !this.scratchHash.equals(this.hashOf(page));
  }

  /** The arrival hash of a page, in place. */
  private hashOf(page: number): Buffer {
    return this.hashes.subarray(page * HASH_BYTES, (page + 1) * HASH_BYTES);
  }

  private async evictPages(pages: number[]): Promise<EvictResult> {
    const result: EvictResult = { evicted: 0, dirty: 0, kept: 0 };
    for (let at = 0; at < pages.length; at += EVICT_BATCH) {
      const r = await this.evictBatch(pages.slice(at, at + EVICT_BATCH));
      result.evicted += r.evicted;
      result.dirty += r.dirty;
      result.kept += r.kept;
    }
    this.stats.passes++;
    return result;
  }

  /** Resolves when no eviction batch is under way; the fault handler waits for it before installing a page. */
  quiet(): Promise<void> {
    return this.gate ?? Promise.resolve();
  }

  private async evictBatch(batch: number[]): Promise<EvictResult> {
    if (batch.length === 0) return { evicted: 0, dirty: 0, kept: 0 };
    let open!: () => void;
    this.gate = new Promise((r) => (open = r));
    const release = await this.vm.hold('eviction').catch((e) => {
      this.gate = undefined;
      open();
      throw e;
    });
    const t0 = performance.now();
    const out: number[] = [];
    let dirty = 0;
    let kept = 0;
    try {
      await this.pool.with(PAGE, async (buf) => {
        for (const p of batch) {
          if (this.since[p] === 0) continue;
          if (this.vm.faultInFlight(p)) {
            kept++;
            continue;
          }
          if (this.changed(p, buf)) {
            if (!this.core.hasWriteKey('mem', p)) {
              this.keyless.push(p);
              kept++;
              continue;
            }
            await this.core.write('mem', p, buf);
            dirty++;
          }
          out.push(p);
        }
      });
      // The cache holds every changed page durably before a byte of RAM goes.
      this.core.flush();
      for (let i = 0; i < out.length; ) {
        let j = i + 1;
        while (j < out.length && out[j] === out[j - 1] + 1) j++;
        punchHole(this.vm.ramFd, out[i] * PAGE, (j - i) * PAGE);
        i = j;
      }
      // Recorded in arrival order: the order a guest that comes back touches them in.
      out.sort((a, b) => this.since[a] - this.since[b]);
      for (const p of out) {
        this.evictOrder[this.evictions % this.since.length] = p;
        this.evictedAt[p] = ++this.evictions;
        this.since[p] = 0;
        this.core.evict('mem', p);
      }
    } finally {
      this.gate = undefined;
      open();
      await release();
      const ms = performance.now() - t0;
      this.stats.pauseMsLast = ms;
      this.stats.pauseMsMax = Math.max(this.stats.pauseMsMax, ms);
      this.stats.pauseMsTotal += ms;
    }
    this.stats.evicted += out.length;
    this.stats.dirty += dirty;
    this.stats.kept += kept;
    return { evicted: out.length, dirty, kept };
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  destroy(): void {
    this.stop();
    wipe(this.hashKey);
    this.pool.destroy();
  }
}
