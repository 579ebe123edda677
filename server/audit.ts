// The hash-chained audit log (docs/audit-log.md). append() runs inside the
// caller's transaction: if it throws, the transaction rolls back and the caller
// releases nothing (invariant 6, fail closed). commit() appends in a transaction
// of its own, shared with the entries other requests commit meanwhile (group
// commit); the caller releases nothing until it resolves. Every replica appends
// to one chain.
import { AUDIT_CHECKPOINT_EVERY, AUDIT_GENESIS_HASH } from '../common/constants.js';
import { checkpointMessage, checkpointSigned, entryHash, type AuditEntry } from '../common/audit-hash.js';
import { b64u, sign } from '../common/crypto.js';
import { iso, parseSince } from '../common/duration.js';
import { crashPoint } from '../common/crash-point.js';
import { LetheError, isLetheError } from '../common/errors.js';
import { isRetryable, type Sql } from './sql.js';

export type AuditType =
  | 'server.init'
  | 'enroll.token'
  | 'enroll'
  | 'device.revoke'
  | 'device.rotate-keys'
  | 'device.wipe'
  | 'wipe.delivered'
  | 'wipe.ack'
  | 'revoke.delivered'
  | 'revoke.ack'
  | 'lease-end.delivered'
  | 'lease-end.ack'
  | 'policy.ack'
  | 'rotate.ack'
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
  | 'alarm.device-refused'
  | 'chunks.serve'
  | 'checkin'
  | 'trace.upload'
  | 'master.rotate'
  | 'tls.rotate'
  | 'user.add'
  | 'user.rm'
  | 'user.passwd'
  | 'user.login'
  | 'user.login-failed'
  | 'user.logout'
  | 'token.create'
  | 'token.revoke';

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

interface Item {
  type: AuditType;
  device: string | null;
  data: Record<string, unknown>;
  /** When it happened; the call's `now` if unset. */
  at?: number;
}

/** Entries waiting for the next group commit, and whether one is under way. */
interface Group {
  waiting: { item: Item; done: (e?: unknown) => void }[];
  running: boolean;
}

/** What every view of one audit log shares: the head this process signed last, and its group commit. */
interface AuditState {
  signed?: Head;
  /** The database outside any transaction: where group commits run. */
  root?: Sql;
  group?: Group;
}

/** Entries per multi-row insert of appendMany (6 parameters each). */
const MANY_ROWS = 200;
/** Entries per group commit at most: a burst beyond it waits for the next. */
const GROUP_MAX = 1000;
/** Serialises appends from every process on one database (a transaction-scoped lock in PostgreSQL). */
const AUDIT_LOCK = 'lethe.audit';

export class AuditLog {
  private readonly publicKey: Buffer;

  constructor(
    private readonly db: Sql,
    private readonly signingKey: Uint8Array,
    private readonly state: AuditState = {},
    private readonly actor?: string,
  ) {
    // An Ed25519 libsodium secret key carries its public key in the last 32 bytes.
    this.publicKey = Buffer.from(signingKey.subarray(32));
    state.root ??= db;
  }

  /** The same log, written through `db` (a transaction). */
  on(db: Sql): AuditLog {
    return new AuditLog(db, this.signingKey, this.state, this.actor);
  }

  /** A view whose entries name who caused them (`data.actor`): for admin requests. */
  by(actor: string): AuditLog {
    return new AuditLog(this.db, this.signingKey, this.state, actor);
  }

  /**
   * Appends one entry and signs it as the new head; call inside the transaction that
   * commits what it records, so no commit leaves an unsigned head. Appends from every
   * replica take the one chain's lock until their transaction ends: no fork, no gap.
   * Refuses (throws AUDIT_UNAVAILABLE) when it cannot write, or when the current head
   * is not signed.
   */
  async append(type: AuditType, device: string | null, data: Record<string, unknown>, now = Date.now()): Promise<AuditEntry & { hash: string }> {
    const body = this.actor === undefined ? data : { ...data, actor: this.actor };
    try {
      return await this.db.tx(async (t) => {
        const prev = await head(t);
        if (prev) await this.assertSigned(t, prev);
        const entry: AuditEntry = { seq: (prev?.seq ?? 0) + 1, ts: iso(now), type, device, data: body };
        const hash = entryHash(prev?.hash ?? AUDIT_GENESIS_HASH, entry);
        await this.writeEntries(t, [[entry, hash]], prev);
        crashPoint('audit.written');
        return { ...entry, hash };
      }, { lock: AUDIT_LOCK });
    } catch (cause) {
      if (isLetheError(cause, 'AUDIT_UNAVAILABLE') || isRetryable(cause)) throw cause;
      throw new LetheError('AUDIT_UNAVAILABLE', 'audit log could not be written; nothing was released', {
        cause,
        hint: 'check the server data directory or database (disk full? permissions? reachable?)',
      });
    }
  }

  /**
   * Appends several entries in order, as one stretch of the chain: one read of the
   * head, the entries in multi-row inserts, and checkpoints only where the log
   * keeps them (every AUDIT_CHECKPOINT_EVERY entries, and the new head). The same
   * chain as appending them one by one; call inside the transaction that commits
   * what they record.
   */
  async appendMany(items: Item[], now = Date.now()): Promise<void> {
    if (items.length === 0) return;
    try {
      await this.db.tx(async (t) => {
        const prev = await head(t);
        if (prev) await this.assertSigned(t, prev);
        let last: Head = prev ?? { seq: 0, hash: AUDIT_GENESIS_HASH };
        const rows: [AuditEntry, string][] = [];
        for (const it of items) {
          const entry: AuditEntry = { seq: last.seq + 1, ts: iso(it.at ?? now), type: it.type, device: it.device, data: this.actor === undefined ? it.data : { ...it.data, actor: this.actor } };
          const hash = entryHash(last.hash, entry);
          rows.push([entry, hash]);
          last = { seq: entry.seq, hash };
        }
        await this.writeEntries(t, rows, prev);
        crashPoint('audit.written');
      }, { lock: AUDIT_LOCK });
    } catch (cause) {
      if (isLetheError(cause, 'AUDIT_UNAVAILABLE') || isRetryable(cause)) throw cause;
      throw new LetheError('AUDIT_UNAVAILABLE', 'audit log could not be written; nothing was released', {
        cause,
        hint: 'check the server data directory or database (disk full? permissions? reachable?)',
      });
    }
  }

  /**
   * Appends one entry in a transaction of its own, together with the entries the
   * other requests of this process commit meanwhile: one turn at the chain's lock
   * and one commit for all of them (group commit), instead of one each. Resolves
   * once the entry is committed; call it after the transaction that commits what
   * the entry records (never inside one), and act on it (release a key) only once
   * it resolves. Rejects with AUDIT_UNAVAILABLE, as append does, when the log
   * cannot be written: then no entry of its group was written.
   */
  commit(type: AuditType, device: string | null, data: Record<string, unknown>, now = Date.now()): Promise<void> {
    const root = this.state.root!;
    if (this.db !== root) throw new Error('AuditLog.commit() runs its own transaction: call it outside one');
    const body = this.actor === undefined ? data : { ...data, actor: this.actor };
    const g = (this.state.group ??= { waiting: [], running: false });
    return new Promise<void>((resolve, reject) => {
      g.waiting.push({ item: { type, device, data: body, at: now }, done: (e) => (e === undefined ? resolve() : reject(e)) });
      if (!g.running) void this.drain(g, new AuditLog(root, this.signingKey, this.state));
    });
  }

  /** Commits what waits, a group at a time, until nothing does; the first entry goes at once. */
  private async drain(g: Group, log: AuditLog): Promise<void> {
    g.running = true;
    try {
      while (g.waiting.length > 0) {
        const group = g.waiting.splice(0, GROUP_MAX);
        let failure: unknown;
        try {
          await log.appendMany(group.map((w) => w.item));
        } catch (e) {
          failure = e ?? new Error('audit group commit failed');
        }
        for (const w of group) w.done(failure);
      }
    } finally {
      g.running = false;
    }
  }

  /**
   * Stores entries that follow `prev`, signs the new head, and keeps checkpoints
   * where the log keeps them: every AUDIT_CHECKPOINT_EVERY entries and at the
   * head (the previous head's goes unless it falls on an interval). On PostgreSQL
   * the last stretch of up to MANY_ROWS entries and the checkpoints are one
   * statement: the chain's lock is held for fewer round trips.
   */
  private async writeEntries(t: Sql, rows: [AuditEntry, string][], prev?: Head): Promise<void> {
    const [lastEntry, lastHash] = rows[rows.length - 1];
    const checkpoints = rows
      .filter(([e]) => e.seq % AUDIT_CHECKPOINT_EVERY === 0 || e === lastEntry)
      .map(([e, h]) => [e.seq, h, b64u.encode(sign(this.signingKey, checkpointMessage(e.seq, h)))]);
    const drop = prev && prev.seq % AUDIT_CHECKPOINT_EVERY !== 0 ? prev.seq : -1;
    const insertEntries = (part: [AuditEntry, string][]) => ({
      sql: `INSERT INTO audit(seq, ts, type, device, data, hash) VALUES ${part.map(() => '(?, ?, ?, ?, ?, ?)').join(', ')}`,
      params: part.flatMap(([e, h]) => [e.seq, e.ts, e.type, e.device, JSON.stringify(e.data), h]),
    });
    // An upsert: a row planted ahead of the chain gives way to the real signature.
    const upsertCheckpoints = `INSERT INTO checkpoints(seq, hash, signature) VALUES ${checkpoints.map(() => '(?, ?, ?)').join(', ')}
       ON CONFLICT (seq) DO UPDATE SET hash = excluded.hash, signature = excluded.signature`;
    const pg = t.dialect === 'postgres';
    const lastPart = pg ? rows.length - 1 - ((rows.length - 1) % MANY_ROWS) : rows.length;
    for (let i = 0; i < lastPart; i += MANY_ROWS) {
      const q = insertEntries(rows.slice(i, i + MANY_ROWS));
      await t.run(q.sql, ...q.params);
    }
    if (pg) {
      const q = insertEntries(rows.slice(lastPart));
      await t.run(`WITH entries AS (${q.sql}), dropped AS (DELETE FROM checkpoints WHERE seq = ?) ${upsertCheckpoints}`, ...q.params, drop, ...checkpoints.flat());
    } else {
      await t.run(upsertCheckpoints, ...checkpoints.flat());
      await t.run('DELETE FROM checkpoints WHERE seq = ?', drop);
    }
    this.state.signed = { seq: lastEntry.seq, hash: lastHash };
  }

  /** Signs `h` as the head (an upsert: a row planted ahead of the chain gives way to the real signature). */
  private async signHead(t: Sql, h: Head): Promise<void> {
    await t.run(
      'INSERT INTO checkpoints(seq, hash, signature) VALUES (?, ?, ?) ON CONFLICT (seq) DO UPDATE SET hash = excluded.hash, signature = excluded.signature',
      h.seq,
      h.hash,
      b64u.encode(sign(this.signingKey, checkpointMessage(h.seq, h.hash))),
    );
    this.state.signed = h;
  }

  /** Throws AUDIT_UNAVAILABLE unless `h` carries a checkpoint that verifies. */
  private async assertSigned(t: Sql, h: Head): Promise<void> {
    if (this.state.signed?.seq === h.seq && this.state.signed.hash === h.hash) return;
    const problem = await this.headProblem(t, h);
    if (problem) {
      throw new LetheError('AUDIT_UNAVAILABLE', `${problem}: the log was changed outside the server; nothing was released`, {
        hint: "check it with 'lethe audit verify --against' an exported or device-held checkpoint",
      });
    }
    this.state.signed = h;
  }

  private async headProblem(t: Sql, h: Head): Promise<string | undefined> {
    const cp = await t.get<Checkpoint>('SELECT seq, hash, signature FROM checkpoints WHERE seq = ?', h.seq);
    if (!cp || cp.hash !== h.hash || !checkpointSigned(this.publicKey, cp)) return `the head (entry ${h.seq}) is not signed`;
    return undefined;
  }

  /** What is wrong with the current head (e.g. `the head (entry 301) is not signed`), if anything: checked at startup. */
  async checkHead(): Promise<string | undefined> {
    // Under the chain's lock: another replica's append replaces the head and drops its
    // checkpoint between two reads otherwise (a live head would look unsigned).
    return this.db.tx(async (t) => {
      await t.lock(AUDIT_LOCK);
      const h = await head(t);
      return h && this.headProblem(t, h);
    });
  }

  /** Signs the current head as it stands: only on an operator's word (`lethe server run --sign-head`). */
  async signCurrentHead(): Promise<void> {
    await this.db.tx(async (t) => {
      await t.lock(AUDIT_LOCK);
      const h = await head(t);
      if (h) await this.signHead(t, h);
    });
  }

  /** Appends `server.init` to an empty log (once, whichever replica starts first). */
  async initOnce(data: Record<string, unknown>, now = Date.now()): Promise<void> {
    await this.db.tx(async (t) => {
      await t.lock(AUDIT_LOCK);
      if (!(await head(t))) await this.on(t).append('server.init', null, data, now);
    });
  }

  /** The newest signed checkpoint (the head's, while the server writes the log), or null on an empty log. */
  latestCheckpoint(): Promise<Checkpoint | null> {
    return latestCheckpoint(this.db);
  }
}

async function head(db: Sql): Promise<Head | undefined> {
  return db.get<Head>('SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1');
}

/** The newest signed checkpoint in `db`, or null. */
export async function latestCheckpoint(db: Sql): Promise<Checkpoint | null> {
  return (await db.get<Checkpoint>('SELECT seq, hash, signature FROM checkpoints ORDER BY seq DESC LIMIT 1')) ?? null;
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
