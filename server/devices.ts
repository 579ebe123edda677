// Enrollment, device status, revoke and wipe (docs/escrow-protocol.md).
import { randomBytes } from 'node:crypto';
import { DEFAULT_ENROLL_TTL_S, type SealKind } from '../common/constants.js';
import { b64u, sha256 } from '../common/crypto.js';
import { iso } from '../common/duration.js';
import { LetheError } from '../common/errors.js';
import { decodeEnrollToken, encodeEnrollToken } from '../common/tokens.js';
import type { TEnrollRequest } from '../common/wire.js';
import { inTx, newId, type Ctx } from './context.js';
import { announcedTls } from './tls.js';

export type DeviceStatus = 'active' | 'revoked' | 'wipe-pending' | 'wiped';

export interface DeviceRow {
  id: string;
  name: string;
  sign_pk: Buffer;
  box_pk: Buffer;
  enrolled_at: number;
  last_seen: number | null;
  revoked_at: number | null;
  wipe_requested_at: number | null;
  wiped_at: number | null;
  revoke_acked_at: number | null;
  seal: SealKind;
}

export function deviceStatus(d: DeviceRow): DeviceStatus {
  if (d.wiped_at !== null) return 'wiped';
  if (d.wipe_requested_at !== null) return 'wipe-pending';
  if (d.revoked_at !== null) return 'revoked';
  return 'active';
}

export function getDevice(ctx: Ctx, id: string): Promise<DeviceRow | undefined> {
  return ctx.db.get<DeviceRow>('SELECT * FROM devices WHERE id = ?', id);
}

export async function mustGetDevice(ctx: Ctx, id: string): Promise<DeviceRow> {
  const d = await getDevice(ctx, id);
  if (!d) throw new LetheError('UNKNOWN_DEVICE', `no device '${id}'`, { hint: "list devices with 'lethe admin devices'" });
  return d;
}

export async function mintEnrollToken(ctx: Ctx, ttlSeconds = DEFAULT_ENROLL_TTL_S) {
  const secret = b64u.encode(randomBytes(24));
  const now = ctx.now();
  const expiresAt = now + ttlSeconds * 1000;
  await inTx(ctx, async (ctx) => {
    await ctx.db.run('INSERT INTO enroll_tokens(secret_sha256, created_at, expires_at) VALUES (?, ?, ?)', sha256(secret).toString('hex'), now, expiresAt);
    await ctx.audit.append('enroll.token', null, { expiresAt: iso(expiresAt) }, now);
  });
  const token = encodeEnrollToken({ u: ctx.publicUrl, f: ctx.data.fingerprint, s: secret });
  return { token, expiresAt: iso(expiresAt), url: ctx.publicUrl, fingerprint: ctx.data.fingerprint };
}

/** Registers a device with a one-time token; every bad token gets the same error. */
export async function enroll(ctx: Ctx, req: TEnrollRequest) {
  const invalid = () =>
    new LetheError('ENROLL_TOKEN_INVALID', 'enrollment token is invalid, expired or already used', {
      hint: "ask IT for a new token ('lethe admin enroll-token')",
    });
  let secret: string;
  try {
    secret = decodeEnrollToken(req.token).s;
  } catch {
    throw invalid();
  }
  const now = ctx.now();
  const id = newId('dev');
  // Single use across replicas: of two concurrent uses, the second UPDATE waits for the
  // first to commit, then finds used_at set and changes nothing.
  await inTx(ctx, async (ctx) => {
    const used = await ctx.db.run(
      'UPDATE enroll_tokens SET used_at = ?, device_id = ? WHERE secret_sha256 = ? AND used_at IS NULL AND expires_at > ?',
      now,
      id,
      sha256(secret).toString('hex'),
      now,
    );
    if (used.changes !== 1) throw invalid();
    const seal = req.seal ?? 'none';
    await ctx.db.run(
      'INSERT INTO devices(id, name, sign_pk, box_pk, enrolled_at, seal) VALUES (?, ?, ?, ?, ?, ?)',
      id,
      req.name,
      b64u.decode(req.signPublicKey),
      b64u.decode(req.boxPublicKey),
      now,
      seal,
    );
    await ctx.audit.append('enroll', id, { name: req.name, seal }, now);
  });
  ctx.metrics.inc('lethe_enrollments_total');
  return { deviceId: id, serverSignPublicKey: b64u.encode(ctx.data.signPublicKey) };
}

export async function listDevices(ctx: Ctx) {
  const rows = await ctx.db.all<DeviceRow>('SELECT * FROM devices ORDER BY enrolled_at, id');
  const assigned = await ctx.db.all<{ device_id: string; name: string }>(
    'SELECT a.device_id, i.name FROM assignments a JOIN images i ON i.id = a.image_id ORDER BY i.name',
  );
  const images = new Map<string, string[]>();
  for (const a of assigned) (images.get(a.device_id) ?? images.set(a.device_id, []).get(a.device_id)!).push(a.name);
  return rows.map((d) => ({
    id: d.id,
    name: d.name,
    status: deviceStatus(d),
    enrolledAt: iso(d.enrolled_at),
    lastSeen: d.last_seen === null ? null : iso(d.last_seen),
    revokeAckedAt: d.revoke_acked_at === null ? null : iso(d.revoke_acked_at),
    seal: d.seal,
    images: images.get(d.id) ?? [],
  }));
}

export async function revokeDevice(ctx: Ctx, id: string) {
  await mustGetDevice(ctx, id);
  const now = ctx.now();
  await inTx(ctx, async (ctx) => {
    // Only the first of two concurrent revokes (on any replica) changes the row and is audited.
    const r = await ctx.db.run('UPDATE devices SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL', now, id);
    if (r.changes !== 1) return;
    await ctx.db.run('UPDATE leases SET ended_at = ? WHERE device_id = ? AND ended_at IS NULL', now, id);
    await ctx.audit.append('device.revoke', id, {}, now);
  });
  return { id, status: deviceStatus(await mustGetDevice(ctx, id)) };
}

/**
 * Queues a wipe: handed out at the next heartbeat, even to a revoked device. A
 * device that acknowledged its revocation erased what a wipe erases then, and
 * cannot sign any more: its wipe is done at once (`erasedAt` says when it erased).
 */
export async function wipeDevice(ctx: Ctx, id: string) {
  const d = await mustGetDevice(ctx, id);
  const now = ctx.now();
  const erasedAt = d.revoke_acked_at === null ? undefined : iso(d.revoke_acked_at);
  await inTx(ctx, async (ctx) => {
    const r = await ctx.db.run('UPDATE devices SET wipe_requested_at = ? WHERE id = ? AND wipe_requested_at IS NULL AND wiped_at IS NULL', now, id);
    if (r.changes !== 1) return;
    await ctx.db.run('UPDATE leases SET ended_at = ? WHERE device_id = ? AND ended_at IS NULL', now, id);
    if (erasedAt) await ctx.db.run('UPDATE devices SET wiped_at = ? WHERE id = ?', now, id);
    else await ctx.db.run('INSERT INTO commands(id, device_id, type, issued_at) VALUES (?, ?, ?, ?)', newId('cmd'), id, 'wipe', now);
    await ctx.audit.append('device.wipe', id, erasedAt ? { erasedAt } : {}, now);
  });
  return { id, status: deviceStatus(await mustGetDevice(ctx, id)), ...(erasedAt ? { erasedAt } : {}) };
}

/**
 * A revoked device saying it erased its keys and cache (revocation implies a
 * wipe on the device, docs/lease-state.md). Recorded and audited once
 * (`revoke.ack`); a wipe still pending is done by it. Gives the device nothing.
 */
export async function ackRevoke(ctx: Ctx, d: DeviceRow, detail?: string) {
  if (d.revoked_at === null) throw new LetheError('CONFLICT', 'this device is not revoked: there is nothing to acknowledge');
  const now = ctx.now();
  if (d.revoke_acked_at === null) {
    await inTx(ctx, async (ctx) => {
      const r = await ctx.db.run('UPDATE devices SET revoke_acked_at = ?, last_seen = ? WHERE id = ? AND revoke_acked_at IS NULL', now, now, d.id);
      if (r.changes !== 1) return;
      await ctx.audit.append('revoke.ack', d.id, detail ? { detail } : {}, now);
      if (d.wipe_requested_at !== null && d.wiped_at === null) await wipeDoneByRevokeAck(ctx, d.id, now);
    });
  }
  const after = await mustGetDevice(ctx, d.id);
  return { id: d.id, status: deviceStatus(after), acknowledgedAt: iso(after.revoke_acked_at!) };
}

/** Call inside the revoke acknowledgement's transaction: its pending wipe commands count as acknowledged. */
async function wipeDoneByRevokeAck(ctx: Ctx, id: string, now: number): Promise<void> {
  const pending = await ctx.db.all<{ id: string }>("SELECT id FROM commands WHERE device_id = ? AND type = 'wipe' AND acked_at IS NULL", id);
  const result = JSON.stringify({ ok: true, detail: 'erased at revocation' });
  for (const c of pending) {
    await ctx.db.run('UPDATE commands SET acked_at = ?, result = ? WHERE id = ?', now, result, c.id);
    await ctx.audit.append('wipe.ack', id, { command: c.id, ok: true, via: 'revoke.ack' }, now);
  }
  await ctx.db.run('UPDATE devices SET wiped_at = ? WHERE id = ?', now, id);
}

export async function heartbeat(ctx: Ctx, d: DeviceRow) {
  const now = ctx.now();
  const commands = await ctx.db.all<{ id: string; type: 'wipe'; issued_at: number; delivered_at: number | null }>(
    'SELECT id, type, issued_at, delivered_at FROM commands WHERE device_id = ? AND acked_at IS NULL ORDER BY issued_at',
    d.id,
  );
  await inTx(ctx, async (ctx) => {
    await ctx.db.run('UPDATE devices SET last_seen = ? WHERE id = ?', now, d.id);
    for (const c of commands.filter((c) => c.delivered_at === null)) {
      // Delivered (and audited) once, however many replicas answer the device's heartbeats at once.
      const r = await ctx.db.run('UPDATE commands SET delivered_at = ? WHERE id = ? AND delivered_at IS NULL', now, c.id);
      if (r.changes === 1) await ctx.audit.append('wipe.delivered', d.id, { command: c.id }, now);
    }
  });
  // The signed head anchors the log on the device (docs/audit-log.md, Anchors).
  const checkpoint = await ctx.audit.latestCheckpoint();
  const nextTls = await announcedTls(ctx);
  return {
    serverTime: iso(now),
    status: deviceStatus(d),
    commands: commands.map((c) => ({ id: c.id, type: c.type, issuedAt: iso(c.issued_at) })),
    ...(checkpoint ? { checkpoint } : {}),
    ...(nextTls ? { nextTls } : {}),
  };
}

export async function ackCommand(ctx: Ctx, d: DeviceRow, commandId: string, ok: boolean, detail?: string) {
  const c = await ctx.db.get<{ id: string; type: string; acked_at: number | null }>('SELECT * FROM commands WHERE id = ? AND device_id = ?', commandId, d.id);
  if (!c) throw new LetheError('UNKNOWN_COMMAND', `no command '${commandId}' for this device`);
  const now = ctx.now();
  if (c.acked_at !== null) return { id: c.id, acked: true };
  await inTx(ctx, async (ctx) => {
    if (ok) {
      const r = await ctx.db.run('UPDATE commands SET acked_at = ?, result = ? WHERE id = ? AND acked_at IS NULL', now, JSON.stringify({ ok, detail }), c.id);
      if (r.changes !== 1) return;
      if (c.type === 'wipe') await ctx.db.run('UPDATE devices SET wiped_at = ? WHERE id = ?', now, d.id);
    } else {
      // A failed wipe stays pending and is handed out again at the next heartbeat.
      await ctx.db.run('UPDATE commands SET delivered_at = NULL, result = ? WHERE id = ?', JSON.stringify({ ok, detail }), c.id);
    }
    await ctx.audit.append('wipe.ack', d.id, { command: c.id, ok, ...(detail ? { detail } : {}) }, now);
  });
  return { id: c.id, acked: ok };
}
