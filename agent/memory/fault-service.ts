// Serves guest RAM on first touch (docs/uffd.md): each userfaultfd fault the shim
// hands over is answered with the page from the agent core, decrypted into a pooled
// buffer and installed once no eviction batch runs; a fault that cannot be served is
// retried, never answered with zeros. Install-ahead puts pages in place before the
// guest touches them, and the first-touch order is kept for trace-learned prefetch.
import { MEM_CHUNK_SIZE } from '../../common/constants.js';
import { errorChain } from '../../common/errors.js';
import { FaultThread, type Fault, type UffdMapping } from '../../native/index.js';
import type { BufferPool } from '../chunks/buffer-pool.js';
import { KEY_BATCH } from '../chunks/chunk-keys.js';
import type { AgentCore, ReadSource } from '../chunks/core.js';
import { backoffMs, sleep } from '../remote/backoff.js';
import type { Evictor } from './evictor.js';
import { Latencies } from './latencies.js';

/**
 * Every SAMPLE_EVERY-th page of guest RAM (its index a multiple of it) is never
 * installed ahead: its first touch faults, and stands for the pages of its group that
 * were installed ahead and so never fault. They join the first-touch order with it,
 * at its time, so the trace still knows when the guest reached them (docs/prefetch.md).
 */
export const SAMPLE_EVERY = 8;

/** A fault that could not be served is tried again after 250 ms, doubling to 5 s. */
const FAULT_RETRY_MS = 250;
const FAULT_RETRY_MAX_MS = 5_000;

/** What the fault service needs of the evictor. */
export type FaultEvictor = Pick<Evictor, 'quiet' | 'recordFault' | 'isResident' | 'manager' | 'evictedAfter'>;

/**
 * Serves one guest-RAM fault once, as a resumed VM's are served: the page from the
 * agent core into a pooled buffer, installed (with `gated`, a vCPU's fault: once no
 * eviction batch is running) and recorded by the evictor (then `installed`). Throws
 * if the page cannot be read; the caller retries, never answering with zeros.
 * Exported for the fault benchmark.
 */
export async function servePage(
  core: AgentCore,
  pool: BufferPool,
  evictor: Pick<Evictor, 'quiet' | 'recordFault' | 'evictedAfter'>,
  f: Fault,
  t: FaultThread,
  installed: () => void = () => {},
  gated = true,
): Promise<ReadSource> {
  const page = f.offset / MEM_CHUNK_SIZE;
  return pool.with(MEM_CHUNK_SIZE, async (buf) => {
    // A page evicted before brings the keys of the pages that left after it (Evictor.evictedAfter).
    const companions = () => evictor.evictedAfter(page, KEY_BATCH - 1);
    const src = await core.readInto('mem', page, buf, { resident: true, writable: true, companions });
    const data = src === 'zero' ? null : buf;
    if (gated) await evictor.quiet();
    if (t.resolve(f.pageAddress, data) !== 'present') {
      evictor.recordFault(page, data);
      installed();
    }
    return src;
  });
}

export class FaultService {
  faults = 0;
  zeroFaults = 0;
  /** Attempts to serve a fault that failed and were tried again. */
  faultRetries = 0;
  /**
   * How long the guest waited on its faults, from the agent taking a fault to the
   * page installed (retries included): all of them, and those that went to the
   * server (a vCPU stalled on the network).
   */
  readonly faultWait = { ms: 0, server: 0, serverMs: 0 };
  /**
   * How long each re-fault of a sensitive page took (a page the guest touched this
   * session, evicted since, touched again): the slow path of eviction users feel.
   */
  readonly sensitiveRefaults = new Latencies();
  /** Pages installed before the guest touched them (installAhead). */
  installedAhead = 0;
  private thread: FaultThread | undefined;
  private mapping: UffdMapping | undefined;
  private stopping = false;
  /** Pages whose fault is being served, with how many faults each. */
  private readonly inFlight = new Map<number, number>();
  /** Faults of vCPU threads being served. */
  private vcpuFaults = 0;
  /** QEMU's vCPU threads (setVcpuThreads); unknown until told, and then every fault counts as a vCPU's. */
  private vcpuThreads: ReadonlySet<number> | undefined;
  /** Pages in the order the guest first touched them this session (trace-learned prefetch). */
  private readonly touched: Uint8Array;
  private readonly firstTouch: Uint32Array;
  /** When each first touch came, in the guest's own time (guestMs()). */
  private readonly firstTouchAt: Uint32Array;
  private firstTouches = 0;
  private startedAt = performance.now();
  /** How long vCPUs waited on served faults, in all (guestMs() leaves it out). */
  private vcpuWaitMs = 0;
  private lastGuestMs = 0;

  constructor(
    private readonly core: AgentCore,
    private readonly pool: BufferPool,
    private readonly evictor: FaultEvictor,
    readonly pages: number,
    private readonly log: (line: string) => void,
    /** Called with each page the guest faults on (the access trace). */
    private readonly onFault: (page: number) => void = () => {},
  ) {
    this.touched = new Uint8Array(pages);
    this.firstTouch = new Uint32Array(pages);
    this.firstTouchAt = new Uint32Array(pages);
  }

  /** Starts serving the faults of this mapping on a thread of its own. */
  start(m: UffdMapping): void {
    this.mapping = m;
    this.startedAt = performance.now();
    this.thread = FaultThread.start(m, {
      onFault: (f, t) => this.serve(f, t),
      // A fault that cannot be served stays unanswered: the guest waits, it never runs on zeros.
      onError: (e) => this.log(`page fault not served: ${errorChain(e)}`),
    });
  }

  private async serve(f: Fault, t: FaultThread): Promise<void> {
    const page = f.offset / MEM_CHUNK_SIZE;
    const t0 = performance.now();
    const refault = this.touched[page] === 1 && this.evictor.manager.isSensitive(page);
    // A vCPU's fault waits for an eviction batch to end: the batch counts on that vCPU
    // staying blocked (VcpuHolds). Another thread's (QEMU's main loop reading a disk
    // block into guest RAM, say) goes in at once: that thread must run for QMP 'stop'
    // to be answered at all, and a page it faults on is not one the batch evicts.
    const vcpu = this.isVcpu(f.thread);
    if (vcpu) this.vcpuFaults++;
    this.inFlight.set(page, (this.inFlight.get(page) ?? 0) + 1);
    try {
      // A fault that cannot be served is retried, never answered with zeros: the
      // guest waits (the lease may come back, the server may be reachable again).
      for (let attempt = 0; ; attempt++) {
        try {
          const src = await servePage(this.core, this.pool, this.evictor, f, t, () => this.recordTouch(page, vcpu ? performance.now() - t0 : 0), vcpu);
          this.faults++;
          if (src === 'zero') this.zeroFaults++;
          const waited = performance.now() - t0;
          this.faultWait.ms += waited;
          if (refault) this.sensitiveRefaults.add(waited);
          if (vcpu) this.vcpuWaitMs += waited;
          if (src === 'server') {
            this.faultWait.server++;
            this.faultWait.serverMs += waited;
          }
          return;
        } catch (e) {
          if (this.stopping || !t.running) throw e;
          this.faultRetries++;
          if (attempt % 10 === 0) this.log(`page fault at offset ${f.offset} not served yet (attempt ${attempt + 1}; retrying): ${errorChain(e)}`);
          await sleep(backoffMs(FAULT_RETRY_MS, FAULT_RETRY_MAX_MS, attempt));
        }
      }
    } finally {
      if (vcpu) this.vcpuFaults--;
      const n = this.inFlight.get(page)! - 1;
      if (n === 0) this.inFlight.delete(page);
      else this.inFlight.set(page, n);
    }
  }

  /** A page went in for the guest, whose vCPU had been waiting `waitingMs` on it. */
  private recordTouch(page: number, waitingMs: number): void {
    this.onFault(page);
    if (this.touched[page]) return;
    const at = this.guestMs(waitingMs);
    this.addFirstTouch(page, at);
    if (page % SAMPLE_EVERY !== 0) return;
    // A sample page: the pages of its group installed ahead (resident, never faulted) come with it.
    for (let q = page + 1; q < Math.min(page + SAMPLE_EVERY, this.pages); q++) {
      if (!this.touched[q] && this.evictor.isResident(q)) this.addFirstTouch(q, at);
    }
  }

  private addFirstTouch(page: number, at: number): void {
    this.touched[page] = 1;
    this.firstTouchAt[this.firstTouches] = at;
    this.firstTouch[this.firstTouches++] = page;
  }

  /**
   * Install-ahead: puts these pages of guest RAM in place before the guest touches
   * them, so its first touch does not fault. Only a page the policy does not count
   * as sensitive, whose chunk is in the server's normal class, qualifies: such
   * plaintext may stay on the device for the whole lease, while sensitive pages
   * keep coming on demand (each key release audited) and keep a true first-touch
   * trace. Pages resident, being faulted or reported free are skipped, and so are
   * sample pages (SAMPLE_EVERY), which keep the trace of the rest. Before each
   * page the loop yields, so a fault that arrived goes first. Call once their
   * ciphertext is cached (prefetch); returns how many it installed.
   */
  async installAhead(pages: Iterable<number>): Promise<number> {
    let n = 0;
    for (const page of pages) {
      await new Promise((r) => setImmediate(r));
      if (this.stopping || !this.thread?.running) break;
      if (!this.mayInstallAhead(page)) continue;
      // A page that cannot be read now is left to its fault, which retries and reports.
      if (await this.installPage(page).catch(() => false)) n++;
    }
    this.installedAhead += n;
    return n;
  }

  private mayInstallAhead(page: number): boolean {
    const m = this.evictor.manager;
    if (page >= this.pages || page % SAMPLE_EVERY === 0 || this.core.classOf('mem', page) !== 'normal') return false;
    return !m.isSensitive(page) && !m.isFree(page) && !this.evictor.isResident(page) && !this.inFlight.has(page);
  }

  /** One page as a fault would install it, without counting as the guest's touch. */
  private installPage(page: number): Promise<boolean> {
    return this.pool.with(MEM_CHUNK_SIZE, async (buf) => {
      const src = await this.core.readInto('mem', page, buf, { resident: true, writable: true });
      const data = src === 'zero' ? null : buf;
      await this.evictor.quiet();
      // The guest may have faulted it meanwhile: then its fault's copy stands.
      if (this.stopping || this.thread!.resolveOffset(page * MEM_CHUNK_SIZE, data) === 'present') return false;
      this.evictor.recordFault(page, data);
      return true;
    });
  }

  /** How many pages the guest has touched (firstTouchOrder().length, without the copy). */
  get firstTouchCount(): number {
    return this.firstTouches;
  }

  /** The pages the guest touched this session, first touch first. */
  firstTouchOrder(): Uint32Array {
    return this.firstTouch.slice(0, this.firstTouches);
  }

  /** When each of firstTouchOrder()'s touches came, in the guest's own time (guestMs(); not decreasing). */
  firstTouchTimes(): Uint32Array {
    return this.firstTouchAt.slice(0, this.firstTouches);
  }

  /**
   * The guest's own time: whole ms since it started, less what its vCPUs spent waiting
   * on faults (`waitingMs` more for a fault still being waited on). A trace timed so
   * says how fast the guest takes pages when they are there, not how slow this
   * session's link was: the startup rule needs the former (prefetch.startup: auto).
   * Never goes back.
   */
  guestMs(waitingMs = 0): number {
    this.lastGuestMs = Math.max(this.lastGuestMs, Math.round(performance.now() - this.startedAt - this.vcpuWaitMs - waitingMs));
    return this.lastGuestMs;
  }

  /**
   * Wakes every thread waiting on a fault in guest RAM. One waiting on a page that
   * is present goes on; one on a page still missing faults again, and that fault is
   * served as any other: a fault the agent took but holds no record of (a guest
   * blocked while no fault is in flight) is taken again. Installs nothing, so it is
   * safe at any time. False when no mapping is being served.
   */
  wakeAll(): boolean {
    if (!this.thread?.running || !this.mapping) return false;
    this.thread.wake(this.mapping.hello.base, this.mapping.hello.length);
    return true;
  }

  faultInFlight(page: number): boolean {
    return this.inFlight.has(page);
  }

  /** Tells which of QEMU's threads run vCPUs (QMP query-cpus-fast). */
  setVcpuThreads(ids: Iterable<number>): void {
    this.vcpuThreads = new Set(ids);
  }

  /** Whether a fault of this thread counts as a vCPU's: yes unless the vCPU threads are known and it is not one. */
  isVcpu(thread: number): boolean {
    return !this.vcpuThreads || thread === 0 || this.vcpuThreads.has(thread);
  }

  /** Whether a vCPU is blocked in a fault being served (a hold then goes on without QMP 'stop': VcpuHolds). */
  vcpuBlocked(): boolean {
    return this.vcpuFaults > 0;
  }

  /** Faults already taken finish or fail; no new page is installed ahead. */
  halt(): void {
    this.stopping = true;
  }

  /** Stops the fault thread (after QEMU is gone). */
  stop(): void {
    this.stopping = true;
    this.thread?.stop();
  }
}
