// What the console's pages show, read from the database: counts for the
// overview, a device's leases, the lost-laptop exposure report, image sizes.
import { iso } from '../../common/duration.js';
import { auditEntries, deviceReport, verifyAudit, type VerifyResult } from '../audit-read.js';
import type { Ctx } from '../context.js';
import { listDevices, mustGetDevice } from '../devices.js';
import { REPLICA_DEAD_MS } from '../push.js';

export type DeviceView = Awaited<ReturnType<typeof listDevices>>[number];

/** Minutes of key releases the overview charts. */
export const RELEASE_MINUTES = 15;

export async function keyReleasesPerMinute(ctx: Ctx, now: number): Promise<{ minute: string; keys: number; sensitive: number }[]> {
  const from = Math.floor(now / 60_000) * 60_000 - (RELEASE_MINUTES - 1) * 60_000;
  const rows = await ctx.db.all<{ ts: string; data: string }>("SELECT ts, data FROM audit WHERE type = 'keys.release' AND ts >= ? ORDER BY seq", iso(from));
  const buckets = Array.from({ length: RELEASE_MINUTES }, (_, i) => ({ minute: iso(from + i * 60_000).slice(11, 16), keys: 0, sensitive: 0 }));
  for (const r of rows) {
    const i = Math.floor((Date.parse(r.ts) - from) / 60_000);
    if (i < 0 || i >= RELEASE_MINUTES) continue;
    const d = JSON.parse(r.data) as { count?: number; sensitive?: number };
    buckets[i].keys += d.count ?? 0;
    buckets[i].sensitive += d.sensitive ?? 0;
  }
  return buckets;
}

export async function replicas(ctx: Ctx, now: number) {
  const rows = await ctx.db.all<{ id: string; started_at: number; seen_at: number; sessions: number }>(
    'SELECT r.id, r.started_at, r.seen_at, (SELECT COUNT(*) FROM push_sessions s WHERE s.replica = r.id) AS sessions FROM replicas r ORDER BY r.started_at',
  );
  return rows.map((r) => ({
    id: r.id,
    startedAt: iso(Number(r.started_at)),
    seenAt: iso(Number(r.seen_at)),
    healthy: now - Number(r.seen_at) < REPLICA_DEAD_MS,
    channels: Number(r.sessions),
  }));
}

/** Entries an operator should look at: alarms, failed logins, refused leases. */
export const ALARM_TYPES = ['alarm.key-ceiling', 'alarm.device-refused', 'user.login-failed', 'lease.refused'];

export async function recentAlarms(ctx: Ctx, now: number, limit = 20) {
  const rows = await ctx.db.all<{ seq: number; ts: string; type: string; device: string | null; data: string }>(
    `SELECT seq, ts, type, device, data FROM audit WHERE type IN (${ALARM_TYPES.map(() => '?').join(', ')}) AND ts >= ? ORDER BY seq DESC LIMIT ${limit}`,
    ...ALARM_TYPES,
    iso(now - 7 * 86_400_000),
  );
  return rows.map((r) => ({ seq: Number(r.seq), ts: r.ts, type: r.type, device: r.device, data: JSON.parse(r.data) as Record<string, unknown> }));
}

export interface LeaseView {
  id: string;
  image: string;
  version: number;
  createdAt: string;
  expiresAt: string;
  endedAt: string | null;
  /** When its keys stopped being good: ended, or expired. */
  over: boolean;
}

export async function deviceLeases(ctx: Ctx, deviceId: string, now: number, limit = 50): Promise<LeaseView[]> {
  const rows = await ctx.db.all<{ id: string; name: string; version: number; created_at: number; expires_at: number; ended_at: number | null }>(
    `SELECT l.id, i.name, l.version, l.created_at, l.expires_at, l.ended_at FROM leases l JOIN images i ON i.id = l.image_id WHERE l.device_id = ? ORDER BY l.created_at DESC LIMIT ${limit}`,
    deviceId,
  );
  return rows.map((r) => ({
    id: r.id,
    image: r.name,
    version: Number(r.version),
    createdAt: iso(Number(r.created_at)),
    expiresAt: iso(Number(r.expires_at)),
    endedAt: r.ended_at === null ? null : iso(Number(r.ended_at)),
    over: r.ended_at !== null || Number(r.expires_at) <= now,
  }));
}

/** The newest expiry among a device's leases still running (null: none runs). */
export async function leaseExpiries(ctx: Ctx, now: number): Promise<Map<string, string>> {
  const rows = await ctx.db.all<{ device_id: string; exp: number }>(
    'SELECT device_id, MAX(expires_at) AS exp FROM leases WHERE ended_at IS NULL AND expires_at > ? GROUP BY device_id',
    now,
  );
  return new Map(rows.map((r) => [r.device_id, iso(Number(r.exp))]));
}

export async function deviceView(ctx: Ctx, id: string): Promise<DeviceView> {
  const d = await mustGetDevice(ctx, id);
  return (await listDevices(ctx)).find((x) => x.id === d.id)!;
}

/**
 * What a heartbeat said was resident: sensitive bytes held by the agent, sensitive
 * guest pages. Null when its last report says nothing of it (an older agent, a
 * report cut for size): unknown, never shown as zero.
 */
export function residentOf(report: Record<string, unknown> | null): { at: string; sensitiveBytes: number; guestSensitivePages: number | null } | null {
  if (!report || typeof report.at !== 'string' || typeof report.resident !== 'object' || report.resident === null) return null;
  const r = report.resident as { sensitiveBytes?: unknown; guestPages?: { sensitive?: unknown } | null };
  if (typeof r.sensitiveBytes !== 'number') return null;
  const num = (v: unknown) => (typeof v === 'number' && Number.isFinite(v) && v >= 0 ? v : 0);
  return {
    at: report.at,
    sensitiveBytes: num(r.sensitiveBytes),
    guestSensitivePages: r.guestPages && typeof r.guestPages === 'object' ? num(r.guestPages.sensitive) : null,
  };
}

/**
 * The lost-laptop report: what the device was given at or after `since` (keys,
 * sensitive keys, chunks, by image), its leases and when they ran out, and what
 * it said was resident at its last heartbeat.
 */
export async function exposure(ctx: Ctx, id: string, since: number, now: number) {
  const device = await deviceView(ctx, id);
  const report = await deviceReport(ctx.db, device.id, since);
  const byImage = new Map<string, { keys: number; sensitive: number; chunks: number }>();
  for (const e of report.entries) {
    const d = e.data as { image?: string; count?: number; sensitive?: number };
    if (!d.image || (e.type !== 'keys.release' && e.type !== 'chunks.serve')) continue;
    const b = byImage.get(d.image) ?? byImage.set(d.image, { keys: 0, sensitive: 0, chunks: 0 }).get(d.image)!;
    if (e.type === 'keys.release') (b.keys += d.count ?? 0), (b.sensitive += d.sensitive ?? 0);
    else b.chunks += d.count ?? 0;
  }
  // The leases table loses a removed image's leases; the audit log keeps their grants and renewals.
  const leases = await deviceLeases(ctx, device.id, now);
  const running = leases.filter((l) => !l.over).sort((a, b) => b.expiresAt.localeCompare(a.expiresAt));
  const granted = report.entries.filter((e) => e.type === 'lease.grant' || e.type === 'lease.renew').map((e) => (e.data as { expiresAt?: string }).expiresAt ?? '');
  const ends = [
    ...leases.filter((l) => l.over).map((l) => (l.endedAt !== null && l.endedAt < l.expiresAt ? l.endedAt : l.expiresAt)),
    ...(running.length === 0 ? granted.filter((t) => t !== '' && Date.parse(t) <= now) : []),
  ];
  const lastRanOut = ends.sort().pop() ?? null;
  return {
    device,
    since: iso(since),
    summary: report.summary,
    byImage: [...byImage.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([image, v]) => ({ image, ...v })),
    leases,
    running,
    lastRanOut,
    /** Leases granted or renewed in the window, from the audit log. */
    leaseEntries: granted.length,
    resident: residentOf(device.lastReport),
    entries: report.entries,
  };
}

/** Verification of the whole chain is a read of the whole log: done at most this often per replica, one run at a time. */
const VERIFY_EVERY_MS = 30_000;
const verified = new WeakMap<object, { at: number; result: Promise<VerifyResult> }>();

export async function chainStatus(ctx: Ctx, now: number): Promise<{ at: string; result: VerifyResult }> {
  let v = verified.get(ctx.data);
  if (!v || now - v.at > VERIFY_EVERY_MS) {
    v = { at: now, result: verifyAudit(ctx.db, { serverKey: ctx.data.signPublicKey }) };
    verified.set(ctx.data, v);
    v.result.catch(() => verified.delete(ctx.data));
  }
  return { at: iso(v.at), result: await v.result };
}

export { auditEntries };
