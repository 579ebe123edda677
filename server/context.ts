// What every server part shares: the databases, the audit log, the escrow.
import { randomBytes } from 'node:crypto';
import type { DB } from './db.js';
import type { AuditLog } from './audit.js';
import type { Escrow } from './escrow.js';
import type { Metrics } from './metrics.js';
import type { LoadedDataDir } from './datadir.js';

export interface Ctx {
  db: DB;
  store: DB;
  audit: AuditLog;
  escrow: Escrow;
  metrics: Metrics;
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
