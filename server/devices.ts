// Enrollment, device status, revoke and wipe (docs/escrow-protocol.md).
import { randomBytes } from 'node:crypto';
import { DEFAULT_ENROLL_TTL_S, type SealKind } from '../common/constants.js';
import { b64u, sha256, verify } from '../common/crypto.js';
import { rotationMessage } from '../common/signing.js';
import { iso } from '../common/duration.js';
import { LetheError } from '../common/errors.js';
import { decodeEnrollToken, encodeEnrollToken } from '../common/tokens.js';
import type { TEnrollRequest } from '../common/wire.js';
import { inTx, newId, type Ctx } from './context.js';
import { announcedTls } from './tls.js';
import { connectedDevices } from './push.js';
import { signCommand, type CommandType, type TSignedCommand } from '../common/push.js';

/** The notification channel a replica listens on for commands to push; the payload is the device id. */
export const PUSH_CHANNEL = 'lethe_push';

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
  /** JSON: the status of its last heartbeat, with `at` (what was resident, its lease state). */
  last_report: string | null;
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
  const connected = await connectedDevices(ctx);
  return rows.map((d) => ({
    id: d.id,
    name: d.name,
    status: deviceStatus(d),
    /** A push channel is open to a live replica now (docs/push.md). */
    connected: connected.has(d.id),
    enrolledAt: iso(d.enrolled_at),
    lastSeen: d.last_seen === null ? null : iso(d.last_seen),
    revokeAckedAt: d.revoke_acked_at === null ? null : iso(d.revoke_acked_at),
    seal: d.seal,
    images: images.get(d.id) ?? [],
    /** The status its agent gave at its last heartbeat: resident plaintext and the lease state. */
    lastReport: d.last_report === null ? null : (JSON.parse(d.last_report) as Record<string, unknown>),
  }));
}

export async function revokeDevice(ctx: Ctx, id: string) {
  await mustGetDevice(ctx, id);
  const now = ctx.now();
  const command = await inTx(ctx, async (ctx) => {
    // Only the first of two concurrent revokes (on any replica) changes the row and is audited.
    const r = await ctx.db.run('UPDATE devices SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL', now, id);
    if (r.changes !== 1) return undefined;
    await ctx.db.run('UPDATE leases SET ended_at = ? WHERE device_id = ? AND ended_at IS NULL', now, id);
    const command = await issueCommand(ctx, id, 'revoke', {}, now);
    await ctx.audit.append('device.revoke', id, { command }, now);
    return command;
  });
  return { id, status: deviceStatus(await mustGetDevice(ctx, id)), ...(command ? { command } : {}) };
}

export interface CommandRow {
  id: string;
  device_id: string;
  type: CommandType;
  seq: number;
  payload: string | null;
  issued_at: number;
  delivered_at: number | null;
  delivered_via: string | null;
  acked_at: number | null;
  result: string | null;
}

/**
 * Inside a transaction: gives the device a command, numbered after its last one,
 * and tells the replica holding its push channel once the transaction commits.
 */
export async function issueCommand(ctx: Ctx, deviceId: string, type: CommandType, extra: { lease?: string; image?: string } = {}, now = ctx.now()): Promise<string> {
  // The row lock orders two replicas numbering commands for one device.
  const row = await ctx.db.get<{ push_seq: number }>('UPDATE devices SET push_seq = push_seq + 1 WHERE id = ? RETURNING push_seq', deviceId);
  if (!row) throw new LetheError('UNKNOWN_DEVICE', `no device '${deviceId}'`);
  const id = newId('cmd');
  await ctx.db.run(
    'INSERT INTO commands(id, device_id, type, issued_at, seq, payload) VALUES (?, ?, ?, ?, ?, ?)',
    id,
    deviceId,
    type,
    now,
    row.push_seq,
    Object.keys(extra).length ? JSON.stringify(extra) : null,
  );
  await ctx.db.notify(PUSH_CHANNEL, deviceId);
  return id;
}

/**
 * Inside a transaction: ends the open leases that `where` selects, and pushes each
 * running one's device a lease-end (its keys go now, not at its next renewal).
 */
export async function endLeases(ctx: Ctx, where: string, params: unknown[], now: number): Promise<void> {
  const open = await ctx.db.all<{ id: string; device_id: string; expires_at: number }>(`SELECT id, device_id, expires_at FROM leases WHERE ${where} AND ended_at IS NULL`, ...params);
  if (open.length === 0) return;
  await ctx.db.run(`UPDATE leases SET ended_at = ? WHERE ${where} AND ended_at IS NULL`, now, ...params);
  for (const l of open) if (l.expires_at > now) await issueCommand(ctx, l.device_id, 'lease-end', { lease: l.id }, now);
}

/** The command as the device gets it, signed by the server (docs/push.md). */
export function signedCommand(ctx: Ctx, c: CommandRow): TSignedCommand {
  const extra = c.payload ? (JSON.parse(c.payload) as { lease?: string; image?: string }) : {};
  return signCommand(ctx.data.signingKey, { v: 1, device: c.device_id, seq: c.seq, id: c.id, type: c.type, issuedAt: iso(c.issued_at), ...extra });
}

/** Commands the device has not acknowledged, oldest first. */
export function pendingCommands(ctx: Ctx, deviceId: string, afterSeq = 0): Promise<CommandRow[]> {
  return ctx.db.all<CommandRow>('SELECT * FROM commands WHERE device_id = ? AND acked_at IS NULL AND seq > ? ORDER BY seq', deviceId, afterSeq);
}

/** Commands whose delivery is audited (TYPE.delivered): those that take keys or data away. A policy or rotate delivery is kept in the commands table; its acknowledgement is audited. */
const AUDITED_DELIVERY = new Set<CommandType>(['wipe', 'revoke', 'lease-end']);

/** Records that commands reached the device (`via` push or heartbeat): once each; a wipe, revoke or lease-end audited as TYPE.delivered. */
export async function markDelivered(ctx: Ctx, deviceId: string, commands: CommandRow[], via: 'push' | 'heartbeat', now = ctx.now()): Promise<void> {
  const fresh = commands.filter((c) => c.delivered_at === null);
  if (fresh.length === 0) return;
  await inTx(ctx, async (ctx) => {
    // Delivered (and audited) once, however many replicas reach the device at once. Rows
    // first, the audit chain after: no row lock is taken while holding the chain's.
    const marked: CommandRow[] = [];
    for (const c of fresh) {
      const r = await ctx.db.run('UPDATE commands SET delivered_at = ?, delivered_via = ? WHERE id = ? AND delivered_at IS NULL', now, via, c.id);
      if (r.changes === 1) marked.push(c);
    }
    for (const c of marked) {
      if (AUDITED_DELIVERY.has(c.type)) await ctx.audit.append(`${c.type}.delivered` as `${'wipe' | 'revoke' | 'lease-end'}.delivered`, deviceId, { command: c.id, via }, now);
    }
  });
}

/** A command as an admin sees it (`lethe admin wipe --wait` polls this). */
export async function commandStatus(ctx: Ctx, id: string) {
  const c = await ctx.db.get<CommandRow>('SELECT * FROM commands WHERE id = ?', id);
  if (!c) throw new LetheError('UNKNOWN_COMMAND', `no command '${id}'`, { hint: "the wipe or revoke answer names its command" });
  const result = c.result ? (JSON.parse(c.result) as { ok: boolean; detail?: string; zeroedAfterMs?: number }) : undefined;
  return {
    id: c.id,
    device: c.device_id,
    type: c.type,
    seq: c.seq,
    issuedAt: iso(c.issued_at),
    deliveredAt: c.delivered_at === null ? null : iso(c.delivered_at),
    deliveredVia: c.delivered_via,
    ackedAt: c.acked_at === null ? null : iso(c.acked_at),
    ...(result ? { result } : {}),
    ...(c.acked_at !== null ? { elapsedMs: c.acked_at - c.issued_at } : {}),
  };
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
  const command = await inTx(ctx, async (ctx) => {
    const r = await ctx.db.run('UPDATE devices SET wipe_requested_at = ? WHERE id = ? AND wipe_requested_at IS NULL AND wiped_at IS NULL', now, id);
    if (r.changes !== 1) return undefined;
    await ctx.db.run('UPDATE leases SET ended_at = ? WHERE device_id = ? AND ended_at IS NULL', now, id);
    if (erasedAt) {
      await ctx.db.run('UPDATE devices SET wiped_at = ? WHERE id = ?', now, id);
      await ctx.audit.append('device.wipe', id, { erasedAt }, now);
      return undefined;
    }
    const command = await issueCommand(ctx, id, 'wipe', {}, now);
    await ctx.audit.append('device.wipe', id, { command }, now);
    return command;
  });
  return { id, status: deviceStatus(await mustGetDevice(ctx, id)), ...(erasedAt ? { erasedAt } : {}), ...(command ? { command } : {}) };
}

/**
 * A revoked device saying it erased its keys and cache (revocation implies a
 * wipe on the device, docs/lease-state.md). Recorded and audited once
 * (`revoke.ack`); a wipe still pending is done by it. Gives the device nothing.
 */
export async function ackRevoke(ctx: Ctx, d: DeviceRow, detail?: string, zeroedAfterMs?: number) {
  if (d.revoked_at === null) throw new LetheError('CONFLICT', 'this device is not revoked: there is nothing to acknowledge');
  const now = ctx.now();
  if (d.revoke_acked_at === null) {
    await inTx(ctx, async (ctx) => {
      const r = await ctx.db.run('UPDATE devices SET revoke_acked_at = ?, last_seen = ? WHERE id = ? AND revoke_acked_at IS NULL', now, now, d.id);
      if (r.changes !== 1) return;
      // The revoke command (if the revocation made one) is answered by this.
      const cmd = await ctx.db.get<CommandRow>("SELECT * FROM commands WHERE device_id = ? AND type = 'revoke' AND acked_at IS NULL ORDER BY seq DESC", d.id);
      const result = { ok: true, ...(detail ? { detail } : {}), ...(zeroedAfterMs !== undefined ? { zeroedAfterMs } : {}) };
      if (cmd) await ctx.db.run("UPDATE commands SET acked_at = ?, result = ? WHERE device_id = ? AND type = 'revoke' AND acked_at IS NULL", now, JSON.stringify(result), d.id);
      await ctx.audit.append(
        'revoke.ack',
        d.id,
        {
          ...(detail ? { detail } : {}),
          ...(cmd ? { command: cmd.id, elapsedMs: now - cmd.issued_at } : {}),
          ...(zeroedAfterMs !== undefined ? { zeroedAfterMs } : {}),
        },
        now,
      );
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

/** The most of a heartbeat's status kept (the console shows it); a bigger one is kept without its detail. */
const MAX_REPORT = 4096;

export async function heartbeat(ctx: Ctx, d: DeviceRow, status?: Record<string, unknown>) {
  const now = ctx.now();
  const commands = await pendingCommands(ctx, d.id);
  let report = status === undefined ? null : JSON.stringify({ ...status, at: iso(now) });
  if (report !== null && report.length > MAX_REPORT) report = JSON.stringify({ at: iso(now), truncated: true });
  await ctx.db.run('UPDATE devices SET last_seen = ?, last_report = COALESCE(?, last_report) WHERE id = ?', now, report, d.id);
  await markDelivered(ctx, d.id, commands, 'heartbeat', now);
  // The signed head anchors the log on the device (docs/audit-log.md, Anchors).
  const checkpoint = await ctx.audit.latestCheckpoint();
  const nextTls = await announcedTls(ctx);
  return {
    serverTime: iso(now),
    status: deviceStatus(d),
    commands: commands.map((c) => ({ id: c.id, type: c.type, seq: c.seq, issuedAt: iso(c.issued_at), signed: signedCommand(ctx, c) })),
    ...(checkpoint ? { checkpoint } : {}),
    ...(nextTls ? { nextTls } : {}),
  };
}

/**
 * The device carried out a command (or could not: `ok` false hands it out again).
 * Recorded once and audited as TYPE.ack, with the time from the command to the
 * acknowledgement and, as the device measured it, from its arrival to keys zeroed.
 */
export async function ackCommand(ctx: Ctx, d: DeviceRow, commandId: string, ok: boolean, detail?: string, zeroedAfterMs?: number) {
  const c = await ctx.db.get<CommandRow>('SELECT * FROM commands WHERE id = ? AND device_id = ?', commandId, d.id);
  if (!c) throw new LetheError('UNKNOWN_COMMAND', `no command '${commandId}' for this device`);
  if (c.type === 'revoke') {
    if (ok) await ackRevoke(ctx, d, detail, zeroedAfterMs);
    return { id: c.id, acked: ok };
  }
  const now = ctx.now();
  if (c.acked_at !== null) return { id: c.id, acked: true };
  const result = JSON.stringify({ ok, ...(detail ? { detail } : {}), ...(zeroedAfterMs !== undefined ? { zeroedAfterMs } : {}) });
  await inTx(ctx, async (ctx) => {
    // An acknowledgement that overtook the record of its delivery (a push is recorded after it is sent): delivered now.
    const overtook = c.delivered_at === null && (await ctx.db.run("UPDATE commands SET delivered_at = ?, delivered_via = 'push' WHERE id = ? AND delivered_at IS NULL", now, c.id)).changes === 1;
    if (ok) {
      const r = await ctx.db.run('UPDATE commands SET acked_at = ?, result = ? WHERE id = ? AND acked_at IS NULL', now, result, c.id);
      if (r.changes !== 1) return;
      if (c.type === 'wipe') {
        await ctx.db.run('UPDATE devices SET wiped_at = ? WHERE id = ?', now, d.id);
        // A wiped device erased what a revocation asks; a revoke it had not answered is answered by this.
        await ctx.db.run(
          "UPDATE commands SET acked_at = ?, result = ? WHERE device_id = ? AND type = 'revoke' AND acked_at IS NULL",
          now,
          JSON.stringify({ ok: true, detail: `erased by the wipe (${c.id})` }),
          d.id,
        );
      }
    } else {
      // A failed command stays pending and is handed out again (push or heartbeat).
      await ctx.db.run('UPDATE commands SET delivered_at = NULL, result = ? WHERE id = ?', result, c.id);
    }
    if (overtook && AUDITED_DELIVERY.has(c.type)) await ctx.audit.append(`${c.type}.delivered` as `${'wipe' | 'lease-end'}.delivered`, d.id, { command: c.id, via: 'push' }, now);
    await ctx.audit.append(
      `${c.type}.ack`,
      d.id,
      { command: c.id, ok, ...(detail ? { detail } : {}), elapsedMs: now - c.issued_at, ...(zeroedAfterMs !== undefined ? { zeroedAfterMs } : {}) },
      now,
    );
  });
  return { id: c.id, acked: ok };
}

/**
 * The device replaces its own keys (docs/device-keys.md, Rotation): the request is
 * signed with the current key, and the new signing key signs the new public keys.
 * From the commit on, only the new keys count. A repeat of the same keys (the
 * device did not hear the answer) is answered the same and changes nothing.
 */
export async function rotateDeviceKeys(ctx: Ctx, d: DeviceRow, signPublicKey: string, boxPublicKey: string, proof: string) {
  const signPk = b64u.decode(signPublicKey);
  const boxPk = b64u.decode(boxPublicKey);
  if (!verify(signPk, rotationMessage(d.id, signPublicKey, boxPublicKey), b64u.decode(proof))) {
    throw new LetheError('BAD_REQUEST', 'the new signing key did not sign the new keys', { hint: 'sign "LETHE-ROTATE-V1\\nDEVICE\\nSIGN\\nBOX" with the new key' });
  }
  if (signPk.equals(d.sign_pk) && boxPk.equals(d.box_pk)) return { id: d.id, rotated: false };
  const now = ctx.now();
  await inTx(ctx, async (ctx) => {
    const r = await ctx.db.run('UPDATE devices SET sign_pk = ?, box_pk = ? WHERE id = ? AND sign_pk = ?', signPk, boxPk, d.id, d.sign_pk);
    if (r.changes !== 1) throw new LetheError('CONFLICT', 'the device keys changed meanwhile', { hint: "run 'lethe device rotate-keys' again" });
    const fp = (k: Buffer) => sha256(k).toString('hex').slice(0, 16);
    await ctx.audit.append('device.rotate-keys', d.id, { sign: fp(signPk), box: fp(boxPk), previousSign: fp(d.sign_pk) }, now);
  });
  return { id: d.id, rotated: true };
}
