// The PostgreSQL backend of server/sql.ts: a pool per database, every replica on
// one database (docs/fleet.md); statements as sql.ts writes them, `?` numbered.
import { createHash } from 'node:crypto';
import pg from 'pg';
import { crashPoint } from '../common/crash-point.js';
import { LetheError } from '../common/errors.js';
import { isRetryable, redactUrl, withSavepoint, type Sql, type TxOptions } from './sql.js';

// BIGINT (timestamps in ms, counts) and NUMERIC (sums) come back as numbers:
// every value the server stores fits a double exactly (< 2^53).
pg.types.setTypeParser(20, (v) => Number(v));
pg.types.setTypeParser(1700, (v) => Number(v));

/** `?` placeholders as `$1, $2, …` (no statement of the server has a `?` in a literal). */
function numbered(sql: string): string {
  let i = 0;
  return sql.replace(/\?/g, () => `$${++i}`);
}

const TX_ATTEMPTS = 5;

/** Connection failures as a coded error that says where, without the password. */
function unreachable(url: string, cause: unknown): LetheError {
  return new LetheError('DATABASE_UNAVAILABLE', `cannot reach the database at ${redactUrl(url)}`, {
    cause,
    hint: 'check that PostgreSQL is running and the URL (--db, $LETHE_DB) is right',
  });
}

function isConnectionError(e: unknown): boolean {
  const code = (e as { code?: string })?.code ?? '';
  return ['ECONNREFUSED', 'ENOTFOUND', 'ECONNRESET', 'ETIMEDOUT', 'EPIPE', '57P01', '57P02', '57P03', '08000', '08003', '08006', '08001', '08004'].includes(code)
    || /Connection terminated|connection timeout/i.test((e as Error)?.message ?? '');
}

type Queryable = pg.Pool | pg.PoolClient;

/**
 * Statements with parameters are prepared once per connection under a name (its
 * text's hash), so PostgreSQL parses and plans each once, not at every request.
 */
const prepared = new Map<string, { name: string; text: string }>();

function statement(sql: string): { name: string; text: string } {
  let st = prepared.get(sql);
  if (!st) prepared.set(sql, (st = { name: `l${createHash('sha256').update(sql).digest('hex').slice(0, 24)}`, text: numbered(sql) }));
  return st;
}

async function pgQuery<T>(on: Queryable, url: string, sql: string, params: unknown[]): Promise<pg.QueryResult<T & pg.QueryResultRow>> {
  try {
    // Without parameters a statement goes as a simple query, which may hold several (a migration).
    return params.length === 0 ? await on.query<T & pg.QueryResultRow>(sql) : await on.query<T & pg.QueryResultRow>({ ...statement(sql), values: params });
  } catch (e) {
    throw isConnectionError(e) ? unreachable(url, e) : e;
  }
}

class PgSql implements Sql {
  readonly dialect = 'postgres' as const;
  constructor(
    readonly pool: pg.Pool,
    private readonly url: string,
  ) {}

  async get<T>(sql: string, ...params: unknown[]) {
    return (await pgQuery<T>(this.pool, this.url, sql, params)).rows[0] as T | undefined;
  }
  async all<T>(sql: string, ...params: unknown[]) {
    return (await pgQuery<T>(this.pool, this.url, sql, params)).rows as T[];
  }
  async run(sql: string, ...params: unknown[]) {
    return { changes: (await pgQuery(this.pool, this.url, sql, params)).rowCount ?? 0 };
  }

  async tx<T>(fn: (t: Sql) => Promise<T>, opts: TxOptions = {}): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      let client: pg.PoolClient;
      try {
        client = await this.pool.connect();
      } catch (e) {
        throw unreachable(this.url, e);
      }
      const t = new PgTx(client, this.url);
      let broken = false;
      try {
        // One simple query (no parameters): the lock's name is the server's own constant, quoted.
        const begin = [
          'BEGIN',
          ...(opts.durable === false ? ['SET LOCAL synchronous_commit = off'] : []),
          ...(opts.lock === undefined ? [] : [`SELECT pg_advisory_xact_lock(hashtext('${opts.lock.replaceAll("'", "''")}'))`]),
        ];
        await pgQuery(client, this.url, begin.join('; '), []);
        if (opts.lock !== undefined) t.held(opts.lock);
        const out = await fn(t);
        crashPoint('sql.before-commit');
        await pgQuery(client, this.url, 'COMMIT', []);
        crashPoint('sql.after-commit');
        return out;
      } catch (e) {
        try {
          await client.query('ROLLBACK');
        } catch {
          broken = true;
        }
        if (!isRetryable(e) || attempt >= TX_ATTEMPTS) throw e;
      } finally {
        t.done = true;
        client.release(broken);
      }
    }
  }

  async lock(): Promise<void> {
    throw new Error('lock() is for transactions');
  }

  snapshot<T>(fn: (t: Sql) => Promise<T>): Promise<T> {
    return this.tx(async (t) => {
      await t.run('SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY');
      return fn(t);
    });
  }

  async savepoint<T>(): Promise<T> {
    throw new Error('savepoint() is for transactions');
  }

  async notify(channel: string, payload: string): Promise<void> {
    await this.run('SELECT pg_notify(?, ?)', channel, payload);
  }

  /**
   * LISTEN on a connection of its own (outside the pool: it stays open). When that
   * connection is lost it is opened again (pauses 100 ms doubling to 5 s), and
   * `resync` runs once it listens again.
   */
  async listen(channel: string, fn: (payload: string) => void, resync?: () => void): Promise<() => Promise<void>> {
    let stopped = false;
    let client: pg.Client | undefined;
    let pause = 100;
    const open = async (first: boolean): Promise<void> => {
      while (!stopped) {
        const c = new pg.Client({ connectionString: this.url, connectionTimeoutMillis: 10_000 });
        c.on('error', () => {});
        try {
          await c.connect();
          c.on('notification', (m) => {
            if (m.channel === channel) fn(m.payload ?? '');
          });
          await c.query(`LISTEN ${c.escapeIdentifier(channel)}`);
          c.once('end', () => {
            if (!stopped) void open(false);
          });
          client = c;
          pause = 100;
          if (!first) resync?.();
          return;
        } catch (e) {
          void c.end().catch(() => {});
          if (first) throw unreachable(this.url, e);
          await new Promise((r) => setTimeout(r, pause));
          pause = Math.min(pause * 2, 5_000);
        }
      }
    };
    await open(true);
    return async () => {
      stopped = true;
      await client?.end().catch(() => {});
    };
  }

  async close(): Promise<void> {
    await this.pool.end();
  }
}

class PgTx implements Sql {
  readonly dialect = 'postgres' as const;
  done = false;
  private readonly locks = new Set<string>();
  constructor(
    private readonly client: pg.PoolClient,
    private readonly url: string,
  ) {}
  /** Records a lock the transaction took as it began. */
  held(name: string): void {
    this.locks.add(name);
  }
  private check(): void {
    if (this.done) throw new Error('the transaction has ended');
  }
  async get<T>(sql: string, ...params: unknown[]) {
    this.check();
    return (await pgQuery<T>(this.client, this.url, sql, params)).rows[0] as T | undefined;
  }
  async all<T>(sql: string, ...params: unknown[]) {
    this.check();
    return (await pgQuery<T>(this.client, this.url, sql, params)).rows as T[];
  }
  async run(sql: string, ...params: unknown[]) {
    this.check();
    return { changes: (await pgQuery(this.client, this.url, sql, params)).rowCount ?? 0 };
  }
  async tx<T>(fn: (t: Sql) => Promise<T>, opts: TxOptions = {}): Promise<T> {
    if (opts.lock !== undefined) await this.lock(opts.lock);
    return fn(this);
  }
  snapshot<T>(fn: (t: Sql) => Promise<T>): Promise<T> {
    return fn(this);
  }
  async lock(name: string): Promise<void> {
    if (this.locks.has(name)) return;
    await this.run('SELECT pg_advisory_xact_lock(hashtext(?))', name);
    this.locks.add(name);
  }
  savepoint<T>(fn: () => Promise<T>): Promise<T> {
    return withSavepoint(this, fn);
  }
  async notify(channel: string, payload: string): Promise<void> {
    await this.run('SELECT pg_notify(?, ?)', channel, payload);
  }
  async listen(): Promise<() => Promise<void>> {
    throw new Error('listen() is not for transactions');
  }
  async close(): Promise<void> {}
}

export interface PgOptions {
  /** Connections in the pool (default 10). */
  max?: number;
}

export function openPostgres(url: string, opts: PgOptions = {}): PgSql {
  const pool = new pg.Pool({ connectionString: url, max: opts.max ?? 10, connectionTimeoutMillis: 10_000, idleTimeoutMillis: 30_000 });
  // An idle connection the server dropped is replaced at the next query; nothing to crash on.
  pool.on('error', () => {});
  return new PgSql(pool, url);
}

export type { PgSql };
