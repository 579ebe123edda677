// Trace-learned prefetch order (docs/prefetch.md, "Trace-learned order"), as
// in vTube and REAP: each session's agent uploads the order in which its guest
// first touched memory pages; a resume asks for an order aggregated over
// traces and fetches pages in that order ahead of faults. Pages are
// guest-physical indices, so traces of one version carry over to the image's
// other versions. A device's trace is its own (invariant 11): the server keeps
// one per device and image, and another device's order takes it only once an
// admin trusts the device for the image (server/branches.ts setTrusted).
import { LetheError } from '../common/errors.js';
import { MAX_CURVE_POINTS, MAX_TRACE_PAGES, PAGES_CONTENT_TYPE, TIMED_TRACE_CONTENT_TYPE, decodePages, type TouchCurve } from '../common/wire.js';
import { inTx, type Ctx } from './context.js';
import type { DeviceRow } from './devices.js';
import { chunkCount, getImage, getVersion } from './images.js';
import { liveLease } from './leases.js';

/** A timed trace: a page index and a time per page. */
export const MAX_TRACE_BODY = MAX_TRACE_PAGES * 8;

/** A first-touch trace: its pages, first touch first, and (when the agent sent them) their times. */
export interface Trace {
  pages: Uint32Array;
  /** Milliseconds from the guest starting to each page's first touch, not decreasing. */
  times?: Uint32Array;
}
/**
 * Traces an order is aggregated from at most: the asking device's own and the
 * newest of the image's trusted devices'.
 */
export const TRACES_KEPT = 8;

/**
 * Orders pages by their mean normalised rank over `traces`: a page at position
 * i of a trace of length n ranks i / n there, and 1.0 in a trace that lacks it.
 * Ties go to the page more traces hold, then to the lower index. Only pages
 * some trace holds and below `memChunks` are listed. Each trace lists a page at
 * most once (parseTrace refuses repeats), and there are at most TRACES_KEPT.
 */
export function aggregateOrder(traces: readonly Uint32Array[], memChunks: number): Uint32Array {
  // Dense per-page arrays, only as long as the highest page held.
  const bound = Math.min(memChunks, highestPage(traces) + 1);
  const rankSum = new Float64Array(bound);
  const held = new Uint16Array(bound);
  for (const trace of traces) {
    const n = trace.length;
    for (let i = 0; i < n; i++) {
      const p = trace[i];
      if (p >= bound) continue;
      rankSum[p] += i / n;
      held[p]++;
    }
  }
  let count = 0;
  for (let p = 0; p < bound; p++) if (held[p] > 0) count++;
  const order = new Uint32Array(count);
  let k = 0;
  for (let p = 0; p < bound; p++) if (held[p] > 0) order[k++] = p;
  // The sum of ranks orders as the mean does: every page is scored over all traces.
  for (let p = 0; p < bound; p++) rankSum[p] += traces.length - held[p];
  return order.sort((a, b) => rankSum[a] - rankSum[b] || held[b] - held[a] || a - b);
}

function highestPage(traces: readonly Uint32Array[]): number {
  let max = -1;
  for (const trace of traces) for (let i = 0; i < trace.length; i++) if (trace[i] > max) max = trace[i];
  return max;
}

/**
 * The touch curve of traces with times (common/wire.ts HDR_TOUCH_CURVE): at up to
 * MAX_CURVE_POINTS counts k, the earliest time any of them had touched k pages.
 * Empty when none has times.
 */
export function touchCurve(traces: readonly Trace[]): TouchCurve {
  const timed = traces.flatMap((t) => (t.times && t.times.length > 0 ? [t.times] : []));
  if (timed.length === 0) return [];
  const longest = Math.max(...timed.map((t) => t.length));
  const points = Math.min(MAX_CURVE_POINTS, longest);
  const curve: TouchCurve = [];
  for (let j = 1; j <= points; j++) {
    const k = Math.ceil((j * longest) / points);
    let ms = Infinity;
    for (const times of timed) if (times.length >= k) ms = Math.min(ms, times[k - 1]);
    curve.push([k, ms]);
  }
  return curve;
}

const TRACE_HINT = `send the page indices as little-endian uint32, 4 bytes each (${PAGES_CONTENT_TYPE}), or those and then as many first-touch times in ms (${TIMED_TRACE_CONTENT_TYPE})`;

/** Checks a trace body; throws BAD_REQUEST naming the first problem. */
export function parseTrace(contentType: string | undefined, body: Buffer, memChunks: number): Trace {
  const type = (contentType ?? '').split(';')[0].trim().toLowerCase();
  const timed = type === TIMED_TRACE_CONTENT_TYPE;
  if (type !== PAGES_CONTENT_TYPE && !timed) {
    throw new LetheError('BAD_REQUEST', `a trace must be sent as ${PAGES_CONTENT_TYPE} or ${TIMED_TRACE_CONTENT_TYPE}, not '${contentType ?? ''}'`, { hint: TRACE_HINT });
  }
  if (body.length === 0) throw new LetheError('BAD_REQUEST', 'the trace is empty', { hint: 'upload a trace once the guest has touched a page' });
  const unit = timed ? 8 : 4;
  if (body.length % unit !== 0) {
    throw new LetheError('BAD_REQUEST', `the trace is ${body.length} bytes, not a multiple of ${unit}`, { hint: TRACE_HINT });
  }
  const all = decodePages(body);
  const pages = timed ? all.subarray(0, all.length / 2) : all;
  assertPagesValid(pages, memChunks);
  if (!timed) return { pages };
  const times = all.subarray(all.length / 2);
  for (let i = 1; i < times.length; i++) {
    if (times[i] < times[i - 1]) {
      throw new LetheError('BAD_REQUEST', `the time at position ${i} (${times[i]} ms) is earlier than the one before it (${times[i - 1]} ms)`, {
        hint: 'list first touches in the order they happened',
      });
    }
  }
  return { pages, times };
}

/** A stored trace: its body as uploaded, and its page count (twice as many numbers: it came with times). */
function storedTrace(data: Buffer, pages: number): Trace {
  const all = decodePages(data);
  return all.length === 2 * pages ? { pages: all.subarray(0, pages), times: all.subarray(pages) } : { pages: all };
}

/** Throws BAD_REQUEST at the first page past the end of memory or seen before. */
function assertPagesValid(pages: Uint32Array, memChunks: number): void {
  const seen = new Uint8Array(memChunks);
  for (let i = 0; i < pages.length; i++) {
    const p = pages[i];
    if (p >= memChunks) {
      throw new LetheError('BAD_REQUEST', `page ${p} at position ${i} is past the end of memory (the lease's version has ${memChunks} pages)`);
    }
    if (seen[p]) {
      throw new LetheError('BAD_REQUEST', `page ${p} appears at positions ${pages.indexOf(p)} and ${i}`, {
        hint: 'a first-touch trace lists each page once',
      });
    }
    seen[p] = 1;
  }
}

/** The memory page count of the lease's version, with the lease (which must be live). */
async function leaseMemory(ctx: Ctx, d: DeviceRow, leaseId: string) {
  const l = await liveLease(ctx, d, leaseId);
  const img = await getImage(ctx, l.name);
  const memChunks = chunkCount((await getVersion(ctx, img, l.version)).mem_size, 'mem');
  return { l, memChunks };
}

/**
 * Stores a lease's trace in its device's one slot for the image (replacing
 * the device's older trace, from any lease) and audits the upload; nothing is
 * stored if the trace is refused or the audit entry cannot be written. `kept`
 * is the number of traces the image keeps, one per device that uploaded.
 */
export async function uploadTrace(ctx: Ctx, d: DeviceRow, leaseId: string, contentType: string | undefined, body: Buffer) {
  const { l, memChunks } = await leaseMemory(ctx, d, leaseId);
  const { pages } = parseTrace(contentType, body, memChunks);
  const now = ctx.now();
  let kept = 0;
  await inTx(ctx, async (ctx) => {
    // A new id even when the trace replaced is the newest: cached orders are keyed by trace ids.
    // Ids are chosen one upload at a time, whichever replica takes it.
    await ctx.db.lock('lethe.traces');
    const id = (await ctx.db.get<{ id: number }>('SELECT COALESCE(MAX(id), 0) + 1 AS id FROM traces'))!.id;
    // The device's one slot: its older trace (from any lease) gives way.
    await ctx.db.run('DELETE FROM traces WHERE (image_id = ? AND device_id = ?) OR lease_id = ?', l.image_id, d.id, l.id);
    await ctx.db.run(
      'INSERT INTO traces(id, image_id, version, device_id, lease_id, created_at, pages, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
      id,
      l.image_id,
      l.version,
      d.id,
      l.id,
      now,
      pages.length,
      body,
    );
    kept = (await ctx.db.get<{ n: number }>('SELECT COUNT(*) AS n FROM traces WHERE image_id = ?', l.image_id))!.n;
    await ctx.audit.append('trace.upload', d.id, { lease: l.id, image: l.name, version: l.version, count: pages.length }, now);
  });
  return { image: l.name, version: l.version, pages: pages.length, kept };
}

// Per server, the orders computed last, by the traces they came from:
// aggregating millions of pages holds the event loop for a while, and resumes
// between uploads reuse them.
const cached = new WeakMap<Ctx, Map<string, { order: Uint32Array; curve: TouchCurve }>>();
const ORDERS_CACHED = 64;

/**
 * The traces a device's order comes from, ascending: its own, and the newest
 * of the other devices the image trusts and that are still active (not revoked
 * or wiped), TRACES_KEPT in all at most. An untrusted device's traces reach no
 * other device however many it uploads.
 */
async function traceIds(ctx: Ctx, imageId: string, deviceId: string): Promise<number[]> {
  // The newest only: a database from before one slot per device may hold several.
  const own = await ctx.db.all<{ id: number }>('SELECT id FROM traces WHERE image_id = ? AND device_id = ? ORDER BY id DESC LIMIT 1', imageId, deviceId);
  // A revoked or wiped device's traces stop counting at once, trusted or not.
  const trusted = await ctx.db.all<{ id: number }>(
    `SELECT t.id FROM traces t
       JOIN trusted_tracers r ON r.image_id = t.image_id AND r.device_id = t.device_id
       JOIN devices d ON d.id = t.device_id
     WHERE t.image_id = ? AND t.device_id != ? AND d.revoked_at IS NULL AND d.wipe_requested_at IS NULL AND d.wiped_at IS NULL
     ORDER BY t.id DESC LIMIT CAST(? AS INTEGER)`,
    imageId,
    deviceId,
    TRACES_KEPT - own.length,
  );
  return [...own, ...trusted].map((r) => r.id).sort((a, b) => a - b);
}

/**
 * The aggregated prefetch order for the lease's device and image, how many traces
 * it came from, and their touch curve (empty when none came with times).
 */
export async function prefetchOrder(ctx: Ctx, d: DeviceRow, leaseId: string): Promise<{ order: Uint32Array; traces: number; curve: TouchCurve }> {
  const { l, memChunks } = await leaseMemory(ctx, d, leaseId);
  const ids = await traceIds(ctx, l.image_id, d.id);
  const key = `${l.image_id}:${memChunks}:${ids.join(',')}`;
  let memo = cached.get(ctx);
  if (!memo) cached.set(ctx, (memo = new Map()));
  const hit = memo.get(key);
  if (hit) return { ...hit, traces: ids.length };
  const traces: Trace[] = [];
  for (const id of ids) {
    const row = (await ctx.db.get<{ data: Buffer; pages: number }>('SELECT data, pages FROM traces WHERE id = ?', id))!;
    traces.push(storedTrace(row.data, Number(row.pages)));
  }
  const order = aggregateOrder(traces.map((t) => t.pages), memChunks);
  const curve = touchCurve(traces);
  // Bounded: removed images' orders do not stay for the server's lifetime.
  if (memo.size >= ORDERS_CACHED) memo.clear();
  memo.set(key, { order, curve });
  return { order, traces: ids.length, curve };
}
