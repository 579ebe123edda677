// The hash-chained audit log (docs/audit-log.md). append() runs inside the
// caller's transaction: if it throws, the transaction rolls back and the caller
// releases nothing (invariant 6, fail closed).
import { AUDIT_CHECKPOINT_EVERY, AUDIT_GENESIS_HASH } from '../common/constants.js';
import { checkpointMessage, checkpointSigned, entryHash, type AuditEntry } from '../common/audit-hash.js';
import { b64u, sign } from '../common/crypto.js';
import { iso } from '../common/duration.js';
import { LetheError, isLetheError } from '../common/errors.js';
import { q, type DB } from './db.js';

export type AuditType =
  | 'server.init'
  | 'enroll.token'
  | 'enroll'
  | 'device.revoke'
  | 'device.wipe'
  | 'wipe.delivered'
  | 'wipe.ack'
  | 'revoke.ack'
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
  | 'lease.refused'
  | 'keys.release'
  | 'alarm.key-ceiling'
  | 'chunks.serve'
  | 'checkin'
  | 'trace.upload';

export interface Checkpoint {
  seq: number;
  hash: string;
  signature: string;
}

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

interface Head {
  seq: number;
  hash: string;
}

export class AuditLog {
  private readonly last;
  private readonly insert;
  private readonly insertCheckpoint;
  private readonly checkpointAt;
  private readonly dropCheckpoint;
  private readonly publicKey: Buffer;
  /** The head this process signed last: an append on top of it needs no signature check. */
  private signed?: Head;

  constructor(
    private readonly db: DB,
    private readonly signingKey: Uint8Array,
  ) {
    this.last = db.prepare('SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1');
    this.insert = db.prepare('INSERT INTO audit(seq, ts, type, device, data, hash) VALUES (?, ?, ?, ?, ?, ?)');
    // OR REPLACE: a row planted ahead of the chain gives way to the real signature.
    this.insertCheckpoint = db.prepare('INSERT OR REPLACE INTO checkpoints(seq, hash, signature) VALUES (?, ?, ?)');
    this.checkpointAt = db.prepare('SELECT seq, hash, signature FROM checkpoints WHERE seq = ?');
    this.dropCheckpoint = db.prepare('DELETE FROM checkpoints WHERE seq = ?');
    // An Ed25519 libsodium secret key carries its public key in the last 32 bytes.
    this.publicKey = Buffer.from(signingKey.subarray(32));
  }

  /**
   * Appends one entry and signs it as the new head; call inside the transaction that
   * commits what it records, so no commit leaves an unsigned head. Refuses (throws
   * AUDIT_UNAVAILABLE) when it cannot write, or when the current head is not signed.
   */
  append(type: AuditType, device: string | null, data: Record<string, unknown>, now = Date.now()): AuditEntry & { hash: string } {
    try {
      const prev = this.last.get() as Head | undefined;
      if (prev) this.assertSigned(prev);
      const entry: AuditEntry = { seq: (prev?.seq ?? 0) + 1, ts: iso(now), type, device, data };
      const hash = entryHash(prev?.hash ?? AUDIT_GENESIS_HASH, entry);
      this.insert.run(entry.seq, entry.ts, type, device, JSON.stringify(data), hash);
      this.signHead({ seq: entry.seq, hash }, prev);
      return { ...entry, hash };
    } catch (cause) {
      if (isLetheError(cause, 'AUDIT_UNAVAILABLE')) throw cause;
      throw new LetheError('AUDIT_UNAVAILABLE', 'audit log could not be written; nothing was released', {
        cause,
        hint: 'check the server data directory (disk full? permissions?)',
      });
    }
  }

  /** A view whose entries name who caused them (`data.actor`): for admin requests. */
  by(actor: string): AuditLog {
    const view = Object.create(this) as AuditLog;
    view.append = (type, device, data, now) => this.append(type, device, { ...data, actor }, now);
    return view;
  }

  /**
   * Signs `head` and drops the previous head's checkpoint unless it falls on an
   * interval: the table keeps one every AUDIT_CHECKPOINT_EVERY entries and one at the head.
   */
  private signHead(head: Head, prev?: Head): void {
    this.insertCheckpoint.run(head.seq, head.hash, b64u.encode(sign(this.signingKey, checkpointMessage(head.seq, head.hash))));
    if (prev && prev.seq % AUDIT_CHECKPOINT_EVERY !== 0) this.dropCheckpoint.run(prev.seq);
    this.signed = head;
  }

  /** Throws AUDIT_UNAVAILABLE unless `head` carries a checkpoint that verifies. */
  private assertSigned(head: Head): void {
    if (this.signed?.seq === head.seq && this.signed.hash === head.hash) return;
    const problem = this.headProblem(head);
    if (problem) {
      throw new LetheError('AUDIT_UNAVAILABLE', `${problem}: the log was changed outside the server; nothing was released`, {
        hint: "check it with 'lethe audit verify --against' an exported or device-held checkpoint",
      });
    }
    this.signed = head;
  }

  private headProblem(head: Head): string | undefined {
    const cp = this.checkpointAt.get(head.seq) as Checkpoint | undefined;
    if (!cp || cp.hash !== head.hash || !checkpointSigned(this.publicKey, cp)) return `the head (entry ${head.seq}) is not signed`;
    return undefined;
  }

  /** What is wrong with the current head (e.g. `the head (entry 301) is not signed`), if anything: checked at startup. */
  checkHead(): string | undefined {
    const head = this.last.get() as Head | undefined;
    return head && this.headProblem(head);
  }

  /** Signs the current head as it stands: only on an operator's word (`lethe server run --sign-head`). */
  signCurrentHead(): void {
    const head = this.last.get() as Head | undefined;
    if (head) this.signHead(head);
  }

  /** The newest signed checkpoint (the head's, while the server writes the log), or null on an empty log. */
  latestCheckpoint(): Checkpoint | null {
    return latestCheckpoint(this.db);
  }
}

/** The newest signed checkpoint in `db`, or null. */
export function latestCheckpoint(db: DB): Checkpoint | null {
  return (q(db, 'SELECT seq, hash, signature FROM checkpoints ORDER BY seq DESC LIMIT 1').get() as Checkpoint | undefined) ?? null;
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
export function verifyAudit(db: DB, opts: { serverKey: Uint8Array; pinnedKey?: Uint8Array; anchor?: Checkpoint }): VerifyResult {
  const key = opts.pinnedKey ? 'pinned' : 'server';
  if (opts.pinnedKey && !Buffer.from(opts.pinnedKey).equals(Buffer.from(opts.serverKey))) {
    return { ok: false, entries: 0, firstBad: null, reason: "the server's signing key is not the pinned audit key", checkpoints: 0, key };
  }
  return { ...verifyChain(db, opts.pinnedKey ?? opts.serverKey, opts.anchor), key, ...(opts.anchor ? { anchor: opts.anchor.seq } : {}) };
}

/** Walks the chain from the genesis; names the first entry or checkpoint that does not hold. */
function verifyChain(db: DB, signPublicKey: Uint8Array, anchor?: Checkpoint): Omit<VerifyResult, 'key'> {
  let prev = AUDIT_GENESIS_HASH;
  let expectSeq = 1;
  let entries = 0;
  let checkpoints = 0;
  const hashes = new Map<number, string>();
  const fail = (seq: number, reason: string) => ({ ok: false, entries, firstBad: seq, reason, checkpoints });
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
  const signed = new Set<number>();
  for (const cp of db.prepare('SELECT seq, hash, signature FROM checkpoints ORDER BY seq').iterate() as Iterable<Checkpoint>) {
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
