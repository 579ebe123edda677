// The server's storage, behind one small async interface with two backends:
// SQLite (better-sqlite3, one process, the embedded default) and PostgreSQL (`pg`,
// any number of replicas on one database; server/sql-postgres.ts, docs/fleet.md).
// Statements are written once, with `?` placeholders, in the SQL both accept
// (upserts as ON CONFLICT, integers cast where a parameter's type would be unknown).
import { EventEmitter } from 'node:events';
import Database from 'better-sqlite3';
import { crashPoint } from '../common/crash-point.js';

export type Dialect = 'sqlite' | 'postgres';

export interface RunResult {
  changes: number;
}

/** A database, or one transaction on it. */
export interface TxOptions {
  /**
   * false: commit without waiting for the commit to reach the disk
   * (PostgreSQL's synchronous_commit = off; a crash may lose it). Only for a
   * transaction that nothing leaves the server on until a later durable commit
   * of this process: that one's flush carries everything committed before it.
   */
  durable?: boolean;
  /** A lock (as lock() takes) to take as the transaction begins: with BEGIN, in one round trip on PostgreSQL. */
  lock?: string;
}

export interface Sql {
  readonly dialect: Dialect;
  get<T>(sql: string, ...params: unknown[]): Promise<T | undefined>;
  all<T>(sql: string, ...params: unknown[]): Promise<T[]>;
  run(sql: string, ...params: unknown[]): Promise<RunResult>;
  /** Runs `fn` in one transaction (inside a transaction: in that one). A PostgreSQL deadlock or serialization failure retries it. */
  tx<T>(fn: (t: Sql) => Promise<T>, opts?: TxOptions): Promise<T>;
  /**
   * Serialises transactions that name the same `name`, until this one ends: a
   * transaction-scoped advisory lock in PostgreSQL; in SQLite every write
   * transaction is already alone. Only inside tx().
   */
  lock(name: string): Promise<void>;
  /**
   * Runs `fn`'s reads on one consistent snapshot of the database (a read
   * transaction; REPEATABLE READ in PostgreSQL): what other connections commit
   * meanwhile is not seen. Inside a transaction: in that one.
   */
  snapshot<T>(fn: (t: Sql) => Promise<T>): Promise<T>;
  /** Inside tx(): runs `fn` so that, if it throws, only its own writes roll back (a savepoint). */
  savepoint<T>(fn: () => Promise<T>): Promise<T>;
  /**
   * Tells every process listening on `channel` (this one included): NOTIFY in
   * PostgreSQL, so every replica hears it; in SQLite, this process. Inside tx(),
   * it is sent when the transaction commits, and not at all if it rolls back.
   */
  notify(channel: string, payload: string): Promise<void>;
  /**
   * Calls `fn` with each payload notified on `channel`. `resync` runs after the
   * listening connection was lost and is back: what was notified meanwhile is
   * gone, so the listener looks again. Outside transactions only.
   */
  listen(channel: string, fn: (payload: string) => void, resync?: () => void): Promise<() => Promise<void>>;
  close(): Promise<void>;
}

let savepoints = 0;

/** `fn` between SAVEPOINT and RELEASE (both dialects), rolled back to the savepoint when it throws. */
export async function withSavepoint<T>(t: Sql, fn: () => Promise<T>): Promise<T> {
  const name = `sp${++savepoints}`;
  await t.run(`SAVEPOINT ${name}`);
  try {
    const out = await fn();
    await t.run(`RELEASE SAVEPOINT ${name}`);
    return out;
  } catch (e) {
    await t.run(`ROLLBACK TO SAVEPOINT ${name}`);
    await t.run(`RELEASE SAVEPOINT ${name}`);
    throw e;
  }
}

export const isPostgresUrl = (spec: string) => /^postgres(ql)?:\/\//.test(spec);

/** The URL with its password replaced, for messages and logs. */
export function redactUrl(spec: string): string {
  return spec.replace(/^(postgres(?:ql)?:\/\/[^:/@]+:)[^@]*@/, '$1***@');
}

// ---- SQLite ----

/**
 * One better-sqlite3 connection. Its calls are synchronous; a transaction spans
 * awaits, so every call waits while another caller's transaction is open (one
 * connection: a query from elsewhere would otherwise land inside it).
 */
class SqliteSql implements Sql {
  readonly dialect = 'sqlite' as const;
  private readonly statements = new Map<string, Database.Statement>();
  private busy = false;
  private readonly waiters: (() => void)[] = [];
  private readonly bus = new EventEmitter();

  constructor(readonly raw: Database.Database) {
    this.bus.setMaxListeners(0);
  }

  private st(sql: string): Database.Statement {
    let s = this.statements.get(sql);
    if (!s) this.statements.set(sql, (s = this.raw.prepare(sql)));
    return s;
  }

  private async acquire(): Promise<void> {
    if (!this.busy) {
      this.busy = true;
      return;
    }
    await new Promise<void>((r) => this.waiters.push(r));
  }

  private release(): void {
    const next = this.waiters.shift();
    if (next) next();
    else this.busy = false;
  }

  /** Runs a synchronous call now when no transaction is open, else after it. */
  private async call<T>(f: () => T): Promise<T> {
    if (!this.busy) return f();
    await this.acquire();
    try {
      return f();
    } finally {
      this.release();
    }
  }

  getSync<T>(sql: string, ...params: unknown[]): T | undefined {
    return this.st(sql).get(...params) as T | undefined;
  }
  allSync<T>(sql: string, ...params: unknown[]): T[] {
    return this.st(sql).all(...params) as T[];
  }
  runSync(sql: string, ...params: unknown[]): RunResult {
    return { changes: this.st(sql).run(...params).changes };
  }

  get<T>(sql: string, ...params: unknown[]) {
    return this.call(() => this.getSync<T>(sql, ...params));
  }
  all<T>(sql: string, ...params: unknown[]) {
    return this.call(() => this.allSync<T>(sql, ...params));
  }
  run(sql: string, ...params: unknown[]) {
    return this.call(() => this.runSync(sql, ...params));
  }

  async tx<T>(fn: (t: Sql) => Promise<T>): Promise<T> {
    await this.acquire();
    try {
      this.raw.exec('BEGIN IMMEDIATE');
      const t = new SqliteTx(this);
      try {
        const out = await fn(t);
        crashPoint('sql.before-commit');
        this.raw.exec('COMMIT');
        crashPoint('sql.after-commit');
        for (const [channel, payload] of t.notices) this.publish(channel, payload);
        return out;
      } catch (e) {
        if (this.raw.inTransaction) this.raw.exec('ROLLBACK');
        throw e;
      } finally {
        t.done = true;
      }
    } finally {
      this.release();
    }
  }

  async lock(): Promise<void> {
    throw new Error('lock() is for transactions');
  }

  /** A deferred read transaction (works on a read-only connection too); other callers wait for it. */
  async snapshot<T>(fn: (t: Sql) => Promise<T>): Promise<T> {
    await this.acquire();
    try {
      this.raw.exec('BEGIN');
      const t = new SqliteTx(this);
      try {
        return await fn(t);
      } finally {
        t.done = true;
        if (this.raw.inTransaction) this.raw.exec('COMMIT');
      }
    } finally {
      this.release();
    }
  }

  async savepoint<T>(): Promise<T> {
    throw new Error('savepoint() is for transactions');
  }

  /** Delivers after the current call stack, as a notification from elsewhere would arrive. */
  publish(channel: string, payload: string): void {
    queueMicrotask(() => this.bus.emit(channel, payload));
  }

  async notify(channel: string, payload: string): Promise<void> {
    this.publish(channel, payload);
  }

  async listen(channel: string, fn: (payload: string) => void): Promise<() => Promise<void>> {
    this.bus.on(channel, fn);
    return async () => void this.bus.off(channel, fn);
  }

  async close(): Promise<void> {
    await this.acquire();
    this.raw.close();
  }
}

/** The open transaction of a SqliteSql: its calls go straight to the connection. */
class SqliteTx implements Sql {
  readonly dialect = 'sqlite' as const;
  done = false;
  /** Notifications to send once this transaction commits. */
  readonly notices: [string, string][] = [];
  constructor(private readonly db: SqliteSql) {}
  private check(): void {
    if (this.done) throw new Error('the transaction has ended');
  }
  async get<T>(sql: string, ...params: unknown[]) {
    this.check();
    return this.db.getSync<T>(sql, ...params);
  }
  async all<T>(sql: string, ...params: unknown[]) {
    this.check();
    return this.db.allSync<T>(sql, ...params);
  }
  async run(sql: string, ...params: unknown[]) {
    this.check();
    return this.db.runSync(sql, ...params);
  }
  tx<T>(fn: (t: Sql) => Promise<T>): Promise<T> {
    return fn(this);
  }
  snapshot<T>(fn: (t: Sql) => Promise<T>): Promise<T> {
    return fn(this);
  }
  async lock(): Promise<void> {}
  savepoint<T>(fn: () => Promise<T>): Promise<T> {
    return withSavepoint(this, fn);
  }
  async notify(channel: string, payload: string): Promise<void> {
    this.check();
    this.notices.push([channel, payload]);
  }
  async listen(): Promise<() => Promise<void>> {
    throw new Error('listen() is not for transactions');
  }
  async close(): Promise<void> {}
}

export interface SqliteOptions {
  readonly?: boolean;
}

export function openSqlite(file: string, opts: SqliteOptions = {}): SqliteSql {
  const db = new Database(file, { readonly: opts.readonly ?? false, fileMustExist: opts.readonly ?? false });
  if (!opts.readonly) {
    // WAL with synchronous=FULL: a commit is on disk before its response is sent
    // (measured here: ~130 µs a commit), so neither SIGKILL nor power loss takes
    // back something a client was told.
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = FULL');
    db.pragma('foreign_keys = ON');
  }
  db.pragma('busy_timeout = 5000');
  return new SqliteSql(db);
}

export type { SqliteSql };

const RETRY_CODES = new Set(['40P01', '40001']); // deadlock detected, serialization failure

/** A PostgreSQL deadlock or serialization failure: the whole transaction is tried again (tx() does it); pass it on unwrapped. */
export const isRetryable = (e: unknown): boolean => RETRY_CODES.has((e as { code?: string })?.code ?? '');
