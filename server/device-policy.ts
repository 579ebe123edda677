// What an image's policy asks of the device itself (docs/escrow-protocol.md):
// how its identity keys are kept at rest (checked at every grant and renewal),
// and a ceiling on the distinct sensitive chunk keys it is given per window.
// The ceiling's count lives in the database, inside the key release's own
// transaction, so it holds across server replicas and fails closed with it.
import { KEY_CEILING_FLOOR, type ChunkKind } from '../common/constants.js';
import { LetheError } from '../common/errors.js';
import { storedPolicy } from '../policies/policy.js';
import type { Policy } from '../policies/schema.js';
import type { Ctx } from './context.js';
import type { DeviceRow } from './devices.js';

/** Throws DEVICE_UNSEALED when the device's seal kind is not one the policy allows. */
export function assertSealAllowed(d: DeviceRow, policy: Policy, image: string): void {
  if (policy.deviceSeal.includes(d.seal)) return;
  throw new LetheError('DEVICE_UNSEALED', `image '${image}' needs device keys sealed by ${policy.deviceSeal.join(' or ') || 'nothing this server knows'}; this device's are sealed by ${d.seal}`, {
    hint: `enroll the device again with 'lethe enroll TOKEN --seal ${policy.deviceSeal.find((k) => k !== 'none') ?? 'tpm'}'`,
  });
}

/** Key marks written per statement (5 parameters each, within both databases' limits). */
const MARKS_PER_STATEMENT = 256;

/**
 * What a committed version's rows say that never changes once it is committed (its
 * count of sensitive chunks, the generations of its normal ones), read once per
 * process: at 200 GiB each such query reads 1.6 million rows, and every lease grant,
 * renewal or key release may ask. At most 1,024 versions are kept.
 */
export function perCommittedVersion<T>(read: (ctx: Ctx, imageId: string, version: number) => Promise<T>) {
  const kept = new Map<string, T>();
  return async (ctx: Ctx, imageId: string, version: number): Promise<T> => {
    const key = `${imageId}/${version}`;
    if (kept.has(key)) return kept.get(key)!;
    const v = await read(ctx, imageId, version);
    if (kept.size >= 1024) kept.clear();
    kept.set(key, v);
    return v;
  };
}

const sensitiveChunks = perCommittedVersion(
  async (ctx, imageId, version) => (await ctx.db.get<{ n: number }>("SELECT COUNT(*) AS n FROM chunks WHERE image_id = ? AND version = ? AND cls = 'sensitive'", imageId, version))!.n,
);

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

/** Thrown by keyCeiling inside the release's transaction, which rolls back; ceilingRefused audits it. */
export class CeilingReached extends Error {
  constructor(
    readonly check: CeilingCheck,
    readonly asked: number,
    readonly windowMs: number,
  ) {
    super('key ceiling reached');
  }
}

/**
 * Counts the sensitive keys of a read release against the device's window: a
 * key given again in the same window counts once. Call inside the release's
 * transaction; throws CeilingReached when the request would take the device past
 * the ceiling (the transaction must roll back: its marks are written).
 */
export async function countKeys(ctx: Ctx, d: DeviceRow, imageId: string, refs: { kind: ChunkKind; idx: number }[], limit: number, windowMs: number, now: number): Promise<CeilingCheck> {
  // One count per device and image, whichever replica releases: the upsert locks the
  // window's row until the transaction ends, and reads it as last committed.
  const w = (await ctx.db.get<{ started_at: number; keys: number }>(
    `INSERT INTO key_windows(device_id, image_id, started_at, keys) VALUES (?, ?, CAST(? AS BIGINT), 0)
     ON CONFLICT (device_id, image_id) DO UPDATE SET keys = key_windows.keys RETURNING started_at, keys`,
    d.id,
    imageId,
    now,
  ))!;
  const fresh = now - w.started_at >= windowMs;
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
  if (keys > limit) throw new CeilingReached(check, refs.length, windowMs);
  await ctx.db.run('UPDATE key_windows SET started_at = ?, keys = ? WHERE device_id = ? AND image_id = ?', windowStart, keys, d.id, imageId);
  return check;
}

/**
 * The key ceiling for a read release of `rows` under lease `l`; call inside the
 * release's transaction. Throws CeilingReached when the keys may not go: that
 * transaction rolls back, and the caller hands it to ceilingRefused.
 */
export async function keyCeiling(
  ctx: Ctx,
  d: DeviceRow,
  l: { image_id: string; version: number; image_policy: string | null },
  rows: { kind: ChunkKind; idx: number; cls: string }[],
  now: number,
): Promise<void> {
  const sensitive = rows.filter((r) => r.cls === 'sensitive');
  if (sensitive.length === 0) return;
  const policy = storedPolicy(l.image_policy);
  const limit = await ceilingFor(ctx, policy, l.image_id, l.version);
  await countKeys(ctx, d, l.image_id, sensitive, limit, policy.keyWindowMs, now);
}

/** Audits a release refused at the key ceiling (`alarm.key-ceiling`); returns the error to answer with. */
export async function ceilingRefused(ctx: Ctx, d: DeviceRow, l: { id: string; name: string; version: number }, e: CeilingReached, now: number): Promise<LetheError> {
  const { limit, windowStart } = e.check;
  await ctx.audit.commit(
    'alarm.key-ceiling',
    d.id,
    { lease: l.id, image: l.name, version: l.version, ceiling: limit, asked: e.asked, windowStart: new Date(windowStart).toISOString() },
    now,
  );
  ctx.metrics.inc('lethe_key_ceiling_refusals_total');
  return ceilingError(limit, e.windowMs);
}

function ceilingError(limit: number, windowMs: number): LetheError {
  return new LetheError('KEY_RELEASE_LIMIT', `this device reached its ceiling of ${limit} sensitive keys for the image within ${Math.round(windowMs / 1000)} s; nothing was released`, {
    hint: 'IT has been alerted (audit: alarm.key-ceiling); the ceiling resets when the window ends, or IT raises device.key-ceiling in the image policy',
  });
}
