// Reading the audit log (docs/audit-log.md): verification of the chain end to
// end, a device's report, and filtered pages of entries. server/audit.ts writes it.
import { AUDIT_CHECKPOINT_EVERY, AUDIT_GENESIS_HASH } from '../common/constants.js';
import { checkpointSigned, entryHash } from '../common/audit-hash.js';
import { iso, parseSince } from '../common/duration.js';
import { LetheError } from '../common/errors.js';
import type { Checkpoint } from './audit.js';
import type { Sql } from './sql.js';

export interface VerifyResult {
  ok: boolean;
  entries: number;
  firstBad: number | null;
  reason?: string;
  checkpoints: number;
  /** Whose key the signatures were checked with: one the auditor pinned, or the server's own. */
  key: 'pinned' | 'server';
  /** The seq of the anchor (an exported or device-held checkpoint) the chain was checked against. */
  anchor?: number;
}

interface Row {
  seq: number;
  ts: string;
  type: string;
  device: string | null;
  data: string;
  hash: string;
}

/** The checkpoints a log of `entries` entries must carry: every interval, then the head. */
function requiredCheckpoints(entries: number): number[] {
  const out: number[] = [];
  for (let s = AUDIT_CHECKPOINT_EVERY; s <= entries; s += AUDIT_CHECKPOINT_EVERY) out.push(s);
  if (entries > 0 && entries % AUDIT_CHECKPOINT_EVERY !== 0) out.push(entries);
  return out;
}

/**
 * Checks the log end to end (docs/audit-log.md, Verification): the hash chain, every
 * stored checkpoint, the mandatory ones (each interval and the head), then `anchor`.
 * With `pinnedKey`, a server key that differs fails at once.
 */
export async function verifyAudit(db: Sql, opts: { serverKey: Uint8Array; pinnedKey?: Uint8Array; anchor?: Checkpoint }): Promise<VerifyResult> {
  const key = opts.pinnedKey ? 'pinned' : 'server';
  if (opts.pinnedKey && !Buffer.from(opts.pinnedKey).equals(Buffer.from(opts.serverKey))) {
    return { ok: false, entries: 0, firstBad: null, reason: "the server's signing key is not the pinned audit key", checkpoints: 0, key };
  }
  // One snapshot: entries and checkpoints as of one moment, however many replicas append meanwhile.
  const chain = await db.snapshot((t) => verifyChain(t, opts.pinnedKey ?? opts.serverKey, opts.anchor));
  return { ...chain, key, ...(opts.anchor ? { anchor: opts.anchor.seq } : {}) };
}

/** Walks the chain from the genesis; names the first entry or checkpoint that does not hold. */
async function verifyChain(db: Sql, signPublicKey: Uint8Array, anchor?: Checkpoint): Promise<Omit<VerifyResult, 'key'>> {
  let prev = AUDIT_GENESIS_HASH;
  let expectSeq = 1;
  let entries = 0;
  let checkpoints = 0;
  const hashes = new Map<number, string>();
  const fail = (seq: number, reason: string) => ({ ok: false, entries, firstBad: seq, reason, checkpoints });
  for (const row of await db.all<Row>('SELECT seq, ts, type, device, data, hash FROM audit ORDER BY seq')) {
    if (row.seq !== expectSeq) return fail(expectSeq, `entry ${expectSeq} is missing`);
    let data: unknown;
    try {
      data = JSON.parse(row.data);
    } catch {
      return fail(row.seq, `entry ${row.seq} is not valid JSON`);
    }
    const h = entryHash(prev, { seq: row.seq, ts: row.ts, type: row.type, device: row.device, data });
    if (h !== row.hash) return fail(row.seq, `entry ${row.seq} does not match its hash`);
    hashes.set(row.seq, h);
    prev = h;
    expectSeq++;
    entries++;
  }
  const signed = new Set<number>();
  for (const cp of await db.all<Checkpoint>('SELECT seq, hash, signature FROM checkpoints ORDER BY seq')) {
    if (!checkpointSigned(signPublicKey, cp)) return fail(cp.seq, `checkpoint at entry ${cp.seq} has a bad signature`);
    const have = hashes.get(cp.seq);
    if (have === undefined) return fail(expectSeq, `entry ${expectSeq} is missing (the log was truncated before signed entry ${cp.seq})`);
    if (have !== cp.hash) return fail(cp.seq, `entry ${cp.seq} differs from its signed checkpoint`);
    signed.add(cp.seq);
    checkpoints++;
  }
  if (entries === 0) return fail(1, 'the log is empty: there is no signed head');
  for (const seq of requiredCheckpoints(entries)) {
    if (signed.has(seq)) continue;
    return fail(seq, seq === entries ? `the head (entry ${seq}) is not signed` : `no signed checkpoint at entry ${seq}`);
  }
  if (anchor) {
    if (!checkpointSigned(signPublicKey, anchor)) return fail(anchor.seq, `the anchor (entry ${anchor.seq}) has a bad signature`);
    const have = hashes.get(anchor.seq);
    if (have === undefined) return fail(expectSeq, `entry ${expectSeq} is missing (the log was cut before anchored entry ${anchor.seq})`);
    if (have !== anchor.hash) return fail(anchor.seq, `entry ${anchor.seq} differs from the anchored checkpoint (the log was rewritten up to it)`);
  }
  return { ok: true, entries, firstBad: null, checkpoints };
}

export interface DeviceReportEntry {
  seq: number;
  ts: string;
  type: string;
  data: unknown;
}

/** What the device was given, and what happened to it, at or after `since`. */
export async function deviceReport(db: Sql, deviceId: string, since: number) {
  const rows = await db.all<{ seq: number; ts: string; type: string; data: string }>(
    'SELECT seq, ts, type, data FROM audit WHERE device = ? AND ts >= ? ORDER BY seq',
    deviceId,
    iso(since),
  );
  const entries: DeviceReportEntry[] = rows.map((r) => ({ seq: r.seq, ts: r.ts, type: r.type, data: JSON.parse(r.data) }));
  const summary = { leases: 0, renewals: 0, sensitiveKeys: 0, keysReleased: 0, chunksServed: 0, images: [] as string[] };
  const images = new Set<string>();
  for (const e of entries) {
    const d = e.data as { image?: string; count?: number; sensitive?: number };
    if (d.image) images.add(d.image);
    if (e.type === 'lease.grant') summary.leases++;
    if (e.type === 'lease.renew') summary.renewals++;
    if (e.type === 'keys.release') {
      summary.keysReleased += d.count ?? 0;
      summary.sensitiveKeys += d.sensitive ?? 0;
    }
    if (e.type === 'chunks.serve') summary.chunksServed += d.count ?? 0;
  }
  summary.images = [...images].sort();
  return { device: deviceId, since: iso(since), summary, entries };
}

export interface AuditFilter {
  device?: string;
  /** One type (`keys.release`), or a family (`user.*`). */
  type?: string;
  /** Epoch ms: entries at or after, before. */
  since?: number;
  until?: number;
  /** Entries below this seq (the next page of a newest-first listing). */
  beforeSeq?: number;
  limit?: number;
}

export const AUDIT_PAGE_MAX = 1000;

/** Entries matching `f`, newest first, with the actor and device of each. */
export async function auditEntries(db: Sql, f: AuditFilter = {}) {
  const where: string[] = [];
  const params: unknown[] = [];
  if (f.device !== undefined) (where.push('device = ?'), params.push(f.device));
  if (f.type !== undefined) {
    if (f.type.endsWith('.*')) (where.push('type LIKE ?'), params.push(`${f.type.slice(0, -2)}.%`));
    else (where.push('type = ?'), params.push(f.type));
  }
  if (f.since !== undefined) (where.push('ts >= ?'), params.push(iso(f.since)));
  if (f.until !== undefined) (where.push('ts < ?'), params.push(iso(f.until)));
  if (f.beforeSeq !== undefined) (where.push('seq < ?'), params.push(f.beforeSeq));
  const limit = Math.min(Math.max(1, f.limit ?? 200), AUDIT_PAGE_MAX);
  const rows = await db.all<Row>(`SELECT seq, ts, type, device, data, hash FROM audit${where.length ? ` WHERE ${where.join(' AND ')}` : ''} ORDER BY seq DESC LIMIT ${limit}`, ...params);
  return rows.map((r) => ({ seq: Number(r.seq), ts: r.ts, type: r.type, device: r.device, data: JSON.parse(r.data) as Record<string, unknown> }));
}

/** `?device=&type=&since=&until=&before=&limit=` of an audit listing (the console's filters too). */
export function auditFilter(q: Record<string, unknown>): AuditFilter {
  const str = (name: string): string | undefined => {
    const v = q[name];
    if (v === undefined || v === '') return undefined;
    if (typeof v !== 'string') throw new LetheError('BAD_REQUEST', `give ${name} once`);
    return v;
  };
  const int = (name: string) => {
    const v = str(name);
    if (v !== undefined && !/^\d{1,15}$/.test(v)) throw new LetheError('BAD_REQUEST', `${name} must be a non-negative integer, got '${v.slice(0, 40)}'`);
    return v === undefined ? undefined : Number(v);
  };
  const device = str('device');
  if (device !== undefined && !/^[a-z0-9-]{1,64}$/.test(device)) throw new LetheError('BAD_REQUEST', `bad device id '${device.slice(0, 80)}'`);
  const type = str('type');
  if (type !== undefined && !/^[a-z-]+(\.[a-z-]+|\.\*)?$/.test(type)) throw new LetheError('BAD_REQUEST', `bad entry type '${type.slice(0, 80)}'`, { hint: 'e.g. keys.release, or user.* for a family' });
  const since = str('since');
  const until = str('until');
  return {
    device,
    type,
    since: since === undefined ? undefined : parseSince(since),
    until: until === undefined ? undefined : parseSince(until),
    beforeSeq: int('before'),
    limit: int('limit'),
  };
}
