// The agent's prefetch planning and its half of trace-learned prefetch
// (docs/prefetch.md): which chunks come before the guest runs (the startup buffer)
// and which in the background, in what order; and the session's first-touch order,
// which goes back to the server to order the next resume.
import { CHUNK_OVERHEAD, CHUNK_SIZE, MEM_CHUNK_SIZE, type ChunkKind } from '../../common/constants.js';
import { errorChain } from '../../common/errors.js';
import { MAX_TRACE_PAGES, type TAgentPolicy, type TouchCurve } from '../../common/wire.js';
import { prefetchPlan, startupPages } from '../../policies/manager.js';
import type { AgentCore } from '../chunks/core.js';
import type { DeviceClient } from '../remote/device-client.js';
import type { ChunkRef } from '../remote/fetcher.js';
import type { LinkFigures } from '../remote/link-meter.js';
import type { AgentVm } from '../vm/runner.js';

/** The session's first-touch order goes to the server this long after the resume (and at stop or suspend). */
export const TRACE_UPLOAD_AFTER_MS = 30_000;

/**
 * The order a session uploads: the pages the guest faulted on, first touch first,
 * then the rest of the order it was given. Pages installed ahead never fault, so a
 * session that installed ahead keeps the learned order's knowledge of them instead
 * of dropping it; the pages it saw fault (sensitive ones, and those it touched
 * before they were installed) still lead.
 */
export function firstTouchesAndLearned(touched: Uint32Array, learned: Uint32Array): Uint32Array {
  if (learned.length === 0) return touched;
  const seen = new Set(touched);
  const out = new Uint32Array(touched.length + learned.length);
  out.set(touched);
  let n = touched.length;
  for (const p of learned) if (!seen.has(p)) (seen.add(p), (out[n++] = p));
  return out.subarray(0, n);
}

/**
 * Pages fetched first to measure the link for an automatic startup buffer: before
 * the link's rate is known the background stream asks in two requests of about 64
 * pages at once, and the second answer's time after the first is the rate.
 */
export const PROBE_PAGES = 128;

/** What to prefetch for a resume: the startup buffer, then the rest in the background. */
export interface PrefetchPlan {
  startup: ChunkRef[];
  rest: ChunkRef[];
  /** Pages in the server's learned order. */
  learned: number;
  /** The policy's cap on background prefetch (bytes/s), if any. */
  bandwidth: number | null;
  /** The image's touch curve, when `prefetch.startup: auto` and timed traces gave one: the buffer is sized at fetchStartup(). */
  curve: TouchCurve;
}

export interface PrefetchContext {
  core: AgentCore;
  client: DeviceClient;
  /** Prefetch at all (`--no-prefetch` turns it off). */
  enabled: boolean;
  /** The agent resumes a VM (`--vm`): its prefetch starts with the resume, in the plan's order. */
  wantsVm: boolean;
  leaseId(): string;
  /** Whether a lease is held (a trace is uploaded under it). */
  hasLease(): boolean;
  policy(): TAgentPolicy;
  vm(): AgentVm | undefined;
  stopped(): boolean;
  log(line: string): void;
  /** The link as the fetcher measured it, for the log. */
  link?(): LinkFigures;
}

/** "a link measured at 41 ms and 2.4 MB/s (requests of 6 pages, 6 at a time)", or nothing before a measurement. */
function linkText(l: LinkFigures | undefined): string {
  if (!l || l.rttMs === null || l.bytesPerSec === null) return '';
  return ` over a link measured at ${l.rttMs.toFixed(0)} ms and ${(l.bytesPerSec / 1e6).toFixed(1)} MB/s (requests of ${l.pace.batch} pages, ${l.pace.depth} at a time)`;
}

/**
 * Pages handed on batch by batch as they come, to a reader that takes them as an
 * async iterable: the startup buffer's pages go into guest RAM while the rest of
 * the buffer is still on the network. end() after the last batch; fail() makes the
 * reader throw.
 */
export class PageFeed implements AsyncIterable<readonly number[]> {
  private readonly batches: (readonly number[])[] = [];
  private done = false;
  private error: unknown;
  private wake: (() => void) | undefined;

  push(pages: readonly number[]): void {
    if (pages.length > 0) this.batches.push(pages);
    this.wake?.();
  }

  end(): void {
    this.done = true;
    this.wake?.();
  }

  fail(e: unknown): void {
    this.error = e ?? new Error('the page feed failed');
    this.end();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<readonly number[]> {
    for (;;) {
      const next = this.batches.shift();
      if (next) yield next;
      else if (this.error !== undefined) throw this.error;
      else if (this.done) return;
      else await new Promise<void>((r) => (this.wake = r));
    }
  }
}

export class Prefetcher {
  /** Background prefetch progress, for the status. */
  readonly progress = { done: 0, total: 0 };
  private running = false;
  /** The order the server gave this session (trace-learned prefetch), for the next upload. */
  private learnedOrder: Uint32Array = new Uint32Array(0);
  /**
   * The session traces the image: the policy orders prefetch by the learned order and
   * the server has none yet. Nothing is installed ahead then, so every page the guest
   * touches faults (from the cache once prefetch brought it) and the upload holds
   * every first touch. Sampling (SAMPLE_EVERY) would miss most pages touched alone,
   * and the next device would wait on the network for each of them.
   */
  private tracing = false;
  private traceTimer: NodeJS.Timeout | undefined;
  /** After a suspend the order is at the server and the lease has ended. */
  suspended = false;

  constructor(private readonly c: PrefetchContext) {}

  /** Background prefetch: `first` (guest RAM in the learned order), then every chunk not cached, under the policy's cap. */
  start(first: ChunkRef[] = [], bandwidth: number | null = null): void {
    const { core, log } = this.c;
    // `prefetch.order: none` turns background prefetch off (the startup buffer still comes).
    if (!this.c.enabled || this.running || this.c.policy().prefetchOrder === 'none') return;
    this.running = true;
    // Each stored chunk once (zero chunks are not stored), `first` first.
    const all: ChunkRef[] = [];
    const count = (kind: ChunkKind) => Math.ceil(core.sizeOf(kind) / CHUNK_SIZE[kind]);
    const seen = { state: new Uint8Array(count('state')), mem: new Uint8Array(count('mem')), disk: new Uint8Array(count('disk')) };
    const add = (r: ChunkRef) => {
      if (seen[r.kind][r.index] || !core.entry(r.kind, r.index)) return;
      seen[r.kind][r.index] = 1;
      all.push(r);
    };
    first.forEach(add);
    if (this.tracing && this.c.wantsVm) log('no learned order for this image yet: this session traces it (pages go to the cache ahead of the guest, none into guest RAM, so each first touch faults and the trace misses none)');
    for (const kind of ['state', 'mem', 'disk'] as ChunkKind[]) for (let index = 0; index < seen[kind].length; index++) add({ kind, index });
    core
      .prefetchChunks(all, {
        bandwidth,
        onProgress: (d, t) => {
          this.progress.done = d;
          this.progress.total = t;
        },
        // Pages of guest RAM whose plaintext may stay go in as they arrive (install-ahead).
        onBatch: async (refs) => void (!this.tracing && (await this.c.vm()?.installAhead(refs.filter((r) => r.kind === 'mem').map((r) => r.index)))),
      })
      .then(
        () => {
          const vm = this.c.vm();
          log(`prefetch done: ${this.progress.done} of ${this.progress.total} chunks in the cache${vm ? `, ${vm.installedAhead} page(s) of guest RAM installed ahead` : ''}${linkText(this.c.link?.())}`);
        },
        (e) => !this.c.stopped() && log(`prefetch stopped: ${errorChain(e)}`),
      )
      .finally(() => (this.running = false));
  }

  /**
   * After a new lease: a disk-only agent starts the background prefetch; with a VM
   * running it picks up again in the plan's order (a VM still to come starts its own
   * once resumed, after its startup buffer).
   */
  resume(): void {
    if (!this.c.wantsVm) this.start();
    else if (this.c.vm()) this.plan().then((p) => this.start(p.rest, p.bandwidth), (e) => this.c.log(`prefetch not restarted: ${errorChain(e)}`));
  }

  /**
   * Guest RAM to prefetch: the startup buffer (before the guest runs) and the rest, by
   * the policy and the server's learned order. With `prefetch.startup: auto` and a
   * touch curve the startup buffer is left empty here: fetchStartup() sizes it.
   */
  async plan(): Promise<PrefetchPlan> {
    const { core } = this.c;
    const p = this.c.policy();
    let learned: { order: Uint32Array; curve: TouchCurve } = { order: new Uint32Array(0), curve: [] };
    if (this.c.enabled && p.prefetchOrder === 'trace') {
      learned = await this.c.client.prefetchOrder(this.c.leaseId()).catch((e) => {
        this.c.log(`no learned prefetch order: ${errorChain(e)}`);
        return learned;
      });
    }
    const pages = core.sizeOf('mem') / MEM_CHUNK_SIZE;
    this.learnedOrder = learned.order;
    this.tracing = this.c.enabled && p.prefetchOrder === 'trace' && learned.order.length === 0;
    const curve = p.prefetchStartupAuto ? learned.curve : [];
    const sized = { ...p, prefetchStartupBytes: curve.length > 0 ? 0 : p.prefetchStartupBytes };
    const plan = this.c.enabled ? prefetchPlan(sized, pages, learned.order, (pg) => core.entry('mem', pg) !== undefined) : { startup: [], rest: [] };
    const refs = (pages: number[]): ChunkRef[] => pages.map((index) => ({ kind: 'mem', index }));
    return { startup: refs(plan.startup), rest: refs(plan.rest), learned: learned.order.length, bandwidth: p.prefetchBandwidth, curve };
  }

  /**
   * Fetches the plan's startup buffer into the cache, before the guest runs. With a
   * touch curve (`prefetch.startup: auto`), the first PROBE_PAGES of the order are
   * fetched and the link measured (the fetcher's rate), and the buffer is as many
   * pages as vTube's rule asks at that rate (policies/manager.ts startupPages): the
   * rest of the order then streams in ahead of the guest. Returns the plan with the buffer moved into `startup`, how
   * many pages were fetched, and the rate it was sized for (bytes/s: measured, or the
   * policy's cap when lower; none when every page was cached). Each batch's pages go
   * to `feed` once cached.
   */
  async fetchStartup(pf: PrefetchPlan, feed?: PageFeed): Promise<PrefetchPlan & { fetched: number; rate?: number }> {
    const { core } = this.c;
    const o = { onBatch: async (refs: ChunkRef[]) => feed?.push(refs.map((r) => r.index)) };
    if (pf.curve.length === 0 || pf.rest.length === 0) {
      return { ...pf, fetched: pf.startup.length > 0 ? await core.prefetchChunks(pf.startup, o) : 0 };
    }
    // The link's rate as the fetcher measured it over the probe (the bytes of the answers
    // over the link time they took); else the probe's pages over its whole time, round
    // trip included, which reads a slow link's rate low and asks for a longer buffer.
    const t0 = performance.now();
    let fetched = 0;
    let probed = 0;
    while (probed < pf.rest.length && fetched < PROBE_PAGES) {
      const next = pf.rest.slice(probed, probed + PROBE_PAGES);
      fetched += await core.prefetchChunks(next, o);
      probed += next.length;
    }
    const ms = Math.max(performance.now() - t0, 1);
    const measured = this.c.link?.().bytesPerSec;
    const linkPagesPerMs = measured ? measured / 1000 / (MEM_CHUNK_SIZE + CHUNK_OVERHEAD) : fetched === 0 ? Infinity : fetched / ms;
    // Pages a millisecond, as the background stream will take them, no faster than the policy's cap.
    const pagesPerMs = Math.min(linkPagesPerMs, pf.bandwidth ? pf.bandwidth / MEM_CHUNK_SIZE / 1000 : Infinity);
    const n = Math.max(probed, startupPages(pf.curve, pagesPerMs, pf.rest.length));
    if (n > probed) fetched += await core.prefetchChunks(pf.rest.slice(probed, n), o);
    const rate = Number.isFinite(pagesPerMs) ? pagesPerMs * 1000 * MEM_CHUNK_SIZE : undefined;
    return { ...pf, startup: pf.rest.slice(0, n), rest: pf.rest.slice(n), fetched, rate };
  }

  /** The first-touch order goes up TRACE_UPLOAD_AFTER_MS after the resume. */
  scheduleTraceUpload(): void {
    this.traceTimer = setTimeout(() => void this.uploadTrace(), TRACE_UPLOAD_AFTER_MS);
  }

  cancelTraceUpload(): void {
    clearTimeout(this.traceTimer);
  }

  /** The session's first-touch order goes to the server (trace-learned prefetch); a later upload replaces it. */
  uploadTrace(): Promise<void> {
    const vm = this.c.vm();
    // The server takes the first MAX_TRACE_PAGES touches (a guest over 8 GiB touches more).
    const order = vm && firstTouchesAndLearned(vm.firstTouchOrder(), vm.installedAhead > 0 ? this.learnedOrder : new Uint32Array(0)).subarray(0, MAX_TRACE_PAGES);
    if (!vm || !order || order.length === 0 || !this.c.hasLease() || this.suspended) return Promise.resolve();
    // Each first touch with its time; pages of the learned order that never faulted
    // (installed ahead) were in place by now at the latest.
    const touchedAt = vm.firstTouchTimes();
    const times = new Uint32Array(order.length).fill(Math.max(vm.guestMs(), touchedAt.at(-1) ?? 0));
    times.set(touchedAt.subarray(0, order.length));
    return this.c.client.uploadTrace(this.c.leaseId(), order, times).then(
      () => this.c.log(`first-touch order of ${order.length} page(s) uploaded for trace-learned prefetch`),
      (e) => this.c.log(`first-touch order not uploaded: ${errorChain(e)}`),
    );
  }
}
