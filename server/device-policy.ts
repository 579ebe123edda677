// What an image's policy asks of the device itself (docs/escrow-protocol.md):
// how its identity keys are kept at rest (checked at every grant and renewal),
// and a ceiling on the distinct sensitive chunk keys it is given per window.
// The ceiling's count lives in the database, inside the key release's own
// transaction, so it holds across server replicas and fails closed with it.
import { KEY_CEILING_FLOOR, type ChunkKind } from '../common/constants.js';
import { LetheError } from '../common/errors.js';
import type { Policy } from '../policies/schema.js';
import type { Ctx } from './context.js';
import type { DeviceRow } from './devices.js';
import { getImage, policyOf } from './images.js';

/** Throws DEVICE_UNSEALED when the device's seal kind is not one the policy allows. */
export function assertSealAllowed(d: DeviceRow, policy: Policy, image: string): void {
  if (policy.deviceSeal.includes(d.seal)) return;
  throw new LetheError('DEVICE_UNSEALED', `image '${image}' needs device keys sealed by ${policy.deviceSeal.join(' or ') || 'nothing this server knows'}; this device's are sealed by ${d.seal}`, {
    hint: `enroll the device again with 'lethe enroll TOKEN --seal ${policy.deviceSeal.find((k) => k !== 'none') ?? 'tpm'}'`,
  });
}

/** Key marks written per statement (5 parameters each, within both databases' limits). */
const MARKS_PER_STATEMENT = 256;

/** Sensitive chunks stored for a committed version: fixed once committed, so counted once per process. */
const sensitiveCounts = new Map<string, number>();
const COUNTS_MAX = 1024;

async function sensitiveChunks(ctx: Ctx, imageId: string, version: number): Promise<number> {
  const key = `${imageId}/${version}`;
  let n = sensitiveCounts.get(key);
  if (n === undefined) {
    n = (await ctx.db.get<{ n: number }>("SELECT COUNT(*) AS n FROM chunks WHERE image_id = ? AND version = ? AND cls = 'sensitive'", imageId, version))!.n;
    if (sensitiveCounts.size >= COUNTS_MAX) sensitiveCounts.clear();
    sensitiveCounts.set(key, n);
  }
  return n;
}

export async function ceilingFor(ctx: Ctx, policy: Policy, imageId: string, version: number): Promise<number> {
  const c = policy.keyCeiling;
  return 'count' in c ? c.count : Math.max(KEY_CEILING_FLOOR, Math.ceil(c.share * (await sensitiveChunks(ctx, imageId, version))));
}

export interface CeilingCheck {
  limit: number;
  /** distinct keys in the window, this request's included */
  keys: number;
  windowStart: number;
}

/** Thrown inside countKeys' savepoint so its rows roll back; the caller audits the alarm. */
export class CeilingReached extends Error {
  constructor(readonly check: CeilingCheck) {
    super('key ceiling reached');
  }
}

/**
 * Counts the sensitive keys of a read release against the device's window: a
 * key given again in the same window counts once. Call inside the release's
 * transaction; throws CeilingReached (after rolling back its own rows) when the
 * request would take the device past the ceiling.
 */
export async function countKeys(ctx: Ctx, d: DeviceRow, imageId: string, refs: { kind: ChunkKind; idx: number }[], limit: number, windowMs: number, now: number): Promise<CeilingCheck> {
  // One count per device and image, whichever replica releases: the window's row is read and written under its lock.
  await ctx.db.lock(`lethe.keys:${d.id}:${imageId}`);
  return ctx.db.savepoint(async () => {
    const w = await ctx.db.get<{ started_at: number; keys: number }>('SELECT started_at, keys FROM key_windows WHERE device_id = ? AND image_id = ?', d.id, imageId);
    const fresh = !w || now - w.started_at >= windowMs;
    const windowStart = fresh ? now : w.started_at;
    let keys = fresh ? 0 : w.keys;
    // One statement per batch: a key already given in this window changes no row and counts nothing.
    const unique = [...new Map(refs.map((r) => [`${r.kind}/${r.idx}`, r])).values()];
    for (let i = 0; i < unique.length; i += MARKS_PER_STATEMENT) {
      const part = unique.slice(i, i + MARKS_PER_STATEMENT);
      const r = await ctx.db.run(
        `INSERT INTO key_releases(device_id, image_id, kind, idx, released_at) VALUES ${part.map(() => '(?, ?, ?, CAST(? AS INTEGER), CAST(? AS BIGINT))').join(', ')}
         ON CONFLICT (device_id, image_id, kind, idx) DO UPDATE SET released_at = excluded.released_at WHERE key_releases.released_at < ?`,
        ...part.flatMap((k) => [d.id, imageId, k.kind, k.idx, now]),
        windowStart,
      );
      keys += r.changes;
    }
    const check = { limit, keys, windowStart };
    if (keys > limit) throw new CeilingReached(check);
    await ctx.db.run(
      'INSERT INTO key_windows(device_id, image_id, started_at, keys) VALUES (?, ?, ?, ?) ON CONFLICT (device_id, image_id) DO UPDATE SET started_at = excluded.started_at, keys = excluded.keys',
      d.id,
      imageId,
      windowStart,
      keys,
    );
    return check;
  });
}

/**
 * The key ceiling for a read release of `rows` under lease `l`; call inside the
 * release's transaction. Returns the error to throw once that transaction has
 * committed the alarm (and no keys.release), or undefined when the keys may go.
 */
export async function keyCeiling(
  ctx: Ctx,
  d: DeviceRow,
  l: { id: string; image_id: string; version: number; name: string },
  rows: { kind: ChunkKind; idx: number; cls: string }[],
  now: number,
): Promise<LetheError | undefined> {
  const sensitive = rows.filter((r) => r.cls === 'sensitive');
  if (sensitive.length === 0) return undefined;
  const policy = policyOf(await getImage(ctx, l.name));
  const limit = await ceilingFor(ctx, policy, l.image_id, l.version);
  try {
    await countKeys(ctx, d, l.image_id, sensitive, limit, policy.keyWindowMs, now);
    return undefined;
  } catch (e) {
    if (!(e instanceof CeilingReached)) throw e;
    await ctx.audit.append(
      'alarm.key-ceiling',
      d.id,
      { lease: l.id, image: l.name, version: l.version, ceiling: limit, asked: sensitive.length, windowStart: new Date(e.check.windowStart).toISOString() },
      now,
    );
    ctx.metrics.inc('lethe_key_ceiling_refusals_total');
    return ceilingError(limit, policy.keyWindowMs);
  }
}

function ceilingError(limit: number, windowMs: number): LetheError {
  return new LetheError('KEY_RELEASE_LIMIT', `this device reached its ceiling of ${limit} sensitive keys for the image within ${Math.round(windowMs / 1000)} s; nothing was released`, {
    hint: 'IT has been alerted (audit: alarm.key-ceiling); the ceiling resets when the window ends, or IT raises device.key-ceiling in the image policy',
  });
}
