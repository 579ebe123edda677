// What every server part shares: the databases, the audit log, the escrow.
import { randomBytes } from 'node:crypto';
import type { Sql, TxOptions } from './sql.js';
import type { AuditLog } from './audit.js';
import type { Escrow } from './escrow.js';
import type { Metrics } from './metrics.js';
import type { LoadedDataDir } from './datadir.js';
import type { NonceStore } from './nonces.js';

export interface Ctx {
  /** Devices, images, leases, audit: the whole database, or (in inTx) one transaction on it. */
  db: Sql;
  /** The encrypted chunks (the same database as `db` on PostgreSQL). */
  store: Sql;
  audit: AuditLog;
  escrow: Escrow;
  metrics: Metrics;
  nonces: NonceStore;
  data: LoadedDataDir;
  /** The URL devices reach this server at (set once listening). */
  publicUrl: string;
  now(): number;
}

export function newId(prefix: string): string {
  return `${prefix}-${randomBytes(8).toString('hex')}`;
}

/** The same context, whose audit entries name `actor` (who made an admin request). */
export function actingAs(ctx: Ctx, actor: string): Ctx {
  return Object.assign(Object.create(ctx) as Ctx, { audit: ctx.audit.by(actor) });
}

/**
 * Runs `fn` in one transaction of ctx.db, with a context whose database and audit
 * log are that transaction's: what `fn` writes and the audit entries that record
 * it commit together or not at all. Inside a transaction, runs in that one.
 */
export function inTx<T>(ctx: Ctx, fn: (c: Ctx) => Promise<T>, opts?: TxOptions): Promise<T> {
  return ctx.db.tx((t) => (t === ctx.db ? fn(ctx) : fn(Object.assign(Object.create(ctx) as Ctx, { db: t, audit: ctx.audit.on(t) }))), opts);
}
