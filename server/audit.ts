// The hash-chained audit log (docs/audit-log.md). append() runs inside the
// caller's transaction: if it throws, the transaction rolls back and the caller
// releases nothing (invariant 6, fail closed).
import { AUDIT_CHECKPOINT_EVERY, AUDIT_GENESIS_HASH } from '../common/constants.js';
import { checkpointMessage, entryHash, type AuditEntry } from '../common/audit-hash.js';
import { b64u, sign, verify } from '../common/crypto.js';
import { iso } from '../common/duration.js';
import { LetheError } from '../common/errors.js';
import type { DB } from './db.js';

export type AuditType =
  | 'server.init'
  | 'enroll.token'
  | 'enroll'
  | 'device.revoke'
  | 'device.wipe'
  | 'wipe.delivered'
  | 'wipe.ack'
  | 'image.create'
  | 'image.policy'
  | 'image.export'
  | 'image.rm'
  | 'version.commit'
  | 'version.promote'
  | 'image.trust'
  | 'image.untrust'
  | 'assign'
  | 'unassign'
  | 'lease.grant'
  | 'lease.renew'
  | 'keys.release'
  | 'chunks.serve'
  | 'checkin'
  | 'trace.upload';

export interface VerifyResult {
  ok: boolean;
  entries: number;
  firstBad: number | null;
  reason?: string;
  checkpoints: number;
}

interface Row {
  seq: number;
  ts: string;
  type: string;
  device: string | null;
  data: string;
  hash: string;
}

export class AuditLog {
  private readonly last;
  private readonly insert;
  private readonly insertCheckpoint;

  constructor(
    private readonly db: DB,
    private readonly signingKey: Uint8Array,
  ) {
    this.last = db.prepare('SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1');
    this.insert = db.prepare('INSERT INTO audit(seq, ts, type, device, data, hash) VALUES (?, ?, ?, ?, ?, ?)');
    this.insertCheckpoint = db.prepare('INSERT INTO checkpoints(seq, hash, signature) VALUES (?, ?, ?)');
  }

  /** Appends one entry; call inside the transaction that commits what it records. Throws if it cannot. */
  append(type: AuditType, device: string | null, data: Record<string, unknown>, now = Date.now()): AuditEntry & { hash: string } {
    try {
      const prev = this.last.get() as { seq: number; hash: string } | undefined;
      const entry: AuditEntry = { seq: (prev?.seq ?? 0) + 1, ts: iso(now), type, device, data };
      const hash = entryHash(prev?.hash ?? AUDIT_GENESIS_HASH, entry);
      this.insert.run(entry.seq, entry.ts, type, device, JSON.stringify(data), hash);
      if (entry.seq % AUDIT_CHECKPOINT_EVERY === 0) this.checkpoint(entry.seq, hash);
      return { ...entry, hash };
    } catch (cause) {
      throw new LetheError('AUDIT_UNAVAILABLE', 'audit log could not be written; nothing was released', {
        cause,
        hint: 'check the server data directory (disk full? permissions?)',
      });
    }
  }

  checkpoint(seq: number, hash: string): void {
    this.insertCheckpoint.run(seq, hash, b64u.encode(sign(this.signingKey, checkpointMessage(seq, hash))));
  }

  /** Signs a checkpoint at the current head, if there is none there yet (on shutdown). */
  checkpointHead(): void {
    const head = this.last.get() as { seq: number; hash: string } | undefined;
    if (!head) return;
    const has = this.db.prepare('SELECT 1 FROM checkpoints WHERE seq = ?').get(head.seq);
    if (!has) this.checkpoint(head.seq, head.hash);
  }
}

/** Walks the chain from the genesis; names the first entry whose hash does not follow. */
export function verifyChain(db: DB, signPublicKey: Uint8Array): VerifyResult {
  let prev = AUDIT_GENESIS_HASH;
  let expectSeq = 1;
  let entries = 0;
  const hashes = new Map<number, string>();
  const fail = (seq: number, reason: string, checkpoints = 0): VerifyResult => ({
    ok: false,
    entries,
    firstBad: seq,
    reason,
    checkpoints,
  });
  for (const row of db.prepare('SELECT seq, ts, type, device, data, hash FROM audit ORDER BY seq').iterate() as Iterable<Row>) {
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
  let checkpoints = 0;
  for (const cp of db.prepare('SELECT seq, hash, signature FROM checkpoints ORDER BY seq').iterate() as Iterable<{
    seq: number;
    hash: string;
    signature: string;
  }>) {
    if (!verify(signPublicKey, checkpointMessage(cp.seq, cp.hash), b64u.decode(cp.signature))) {
      return fail(cp.seq, `checkpoint at entry ${cp.seq} has a bad signature`, checkpoints);
    }
    const have = hashes.get(cp.seq);
    if (have === undefined) return fail(expectSeq, `entry ${expectSeq} is missing (the log was truncated before signed entry ${cp.seq})`, checkpoints);
    if (have !== cp.hash) return fail(cp.seq, `entry ${cp.seq} differs from its signed checkpoint`, checkpoints);
    checkpoints++;
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
export function deviceReport(db: DB, deviceId: string, since: number) {
  const rows = db
    .prepare('SELECT seq, ts, type, data FROM audit WHERE device = ? AND ts >= ? ORDER BY seq')
    .all(deviceId, iso(since)) as { seq: number; ts: string; type: string; data: string }[];
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
