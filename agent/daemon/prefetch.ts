// The agent's prefetch planning and its half of trace-learned prefetch
// (docs/prefetch.md): which chunks come before the guest runs (the startup buffer)
// and which in the background, in what order; and the session's first-touch order,
// which goes back to the server to order the next resume.
import { CHUNK_SIZE, MEM_CHUNK_SIZE, type ChunkKind } from '../../common/constants.js';
import { errorChain } from '../../common/errors.js';
import { MAX_TRACE_PAGES, type TAgentPolicy } from '../../common/wire.js';
import { prefetchPlan } from '../../policies/manager.js';
import type { AgentCore } from '../chunks/core.js';
import type { DeviceClient } from '../remote/device-client.js';
import type { ChunkRef } from '../remote/fetcher.js';
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
}

export class Prefetcher {
  /** Background prefetch progress, for the status. */
  readonly progress = { done: 0, total: 0 };
  private running = false;
  /** The order the server gave this session (trace-learned prefetch), for the next upload. */
  private learnedOrder: Uint32Array = new Uint32Array(0);
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
    for (const kind of ['state', 'mem', 'disk'] as ChunkKind[]) for (let index = 0; index < seen[kind].length; index++) add({ kind, index });
    core
      .prefetchChunks(all, {
        bandwidth,
        onProgress: (d, t) => {
          this.progress.done = d;
          this.progress.total = t;
        },
        // Pages of guest RAM whose plaintext may stay go in as they arrive (install-ahead).
        onBatch: async (refs) => void (await this.c.vm()?.installAhead(refs.filter((r) => r.kind === 'mem').map((r) => r.index))),
      })
      .then(
        () => {
          const vm = this.c.vm();
          log(`prefetch done: ${this.progress.done} of ${this.progress.total} chunks in the cache${vm ? `, ${vm.installedAhead} page(s) of guest RAM installed ahead` : ''}`);
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

  /** Guest RAM to prefetch: the startup buffer (before the guest runs) and the rest, by the policy and the server's learned order. */
  async plan(): Promise<{ startup: ChunkRef[]; rest: ChunkRef[]; learned: number; bandwidth: number | null }> {
    const { core } = this.c;
    const p = this.c.policy();
    let learned: Uint32Array = new Uint32Array(0);
    if (this.c.enabled && p.prefetchOrder === 'trace') {
      learned = await this.c.client.prefetchOrder(this.c.leaseId()).catch((e) => {
        this.c.log(`no learned prefetch order: ${errorChain(e)}`);
        return new Uint32Array(0);
      });
    }
    const pages = core.sizeOf('mem') / MEM_CHUNK_SIZE;
    this.learnedOrder = learned;
    const plan = this.c.enabled ? prefetchPlan(p, pages, learned, (pg) => core.entry('mem', pg) !== undefined) : { startup: [], rest: [] };
    const refs = (pages: number[]): ChunkRef[] => pages.map((index) => ({ kind: 'mem', index }));
    return { startup: refs(plan.startup), rest: refs(plan.rest), learned: learned.length, bandwidth: p.prefetchBandwidth };
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
    if (!order || order.length === 0 || !this.c.hasLease() || this.suspended) return Promise.resolve();
    return this.c.client.uploadTrace(this.c.leaseId(), order).then(
      () => this.c.log(`first-touch order of ${order.length} page(s) uploaded for trace-learned prefetch`),
      (e) => this.c.log(`first-touch order not uploaded: ${errorChain(e)}`),
    );
  }
}
