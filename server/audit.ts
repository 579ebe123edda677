// The hash-chained audit log (docs/audit-log.md). append() runs inside the
// caller's transaction: if it throws, the transaction rolls back and the caller
// releases nothing (invariant 6, fail closed). commit() appends in a transaction
// of its own, shared with the entries other requests commit meanwhile (group
// commit); the caller releases nothing until it resolves. Every replica appends
// to one chain.
import { AUDIT_CHECKPOINT_EVERY, AUDIT_GENESIS_HASH } from '../common/constants.js';
import { checkpointMessage, checkpointSigned, entryHash, type AuditEntry } from '../common/audit-hash.js';
import { b64u, sign } from '../common/crypto.js';
import { iso } from '../common/duration.js';
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
