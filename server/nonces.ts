// Replay protection for signed device requests: each (device, nonce) is accepted
// once within the signature window. One SQLite process keeps them in memory and
// refuses requests signed before it started (a restart cannot reopen the
// window), which saves a write per request; replicas on PostgreSQL share one
// table, so a request replayed to another replica is refused too.
import { SIG_WINDOW_MS } from '../common/constants.js';
import type { Sql } from './sql.js';

export interface NonceStore {
  /** Requests signed before this time are refused as stale. */
  readonly floor: number;
  /** True the first time `nonce` is seen for `deviceId`; false for a replay. */
  remember(deviceId: string, nonce: string, ts: number): Promise<boolean>;
  /** Forgets nonces old enough that their timestamps would be refused anyway. */
  prune(now: number): Promise<void>;
}

export function memoryNonces(now: number): NonceStore {
  const seen = new Map<string, number>();
  return {
    floor: now,
    async remember(deviceId, nonce, ts) {
      const key = `${deviceId} ${nonce}`;
      if (seen.has(key)) return false;
      seen.set(key, ts);
      return true;
    },
    async prune(at) {
      for (const [k, ts] of seen) if (ts < at - 2 * SIG_WINDOW_MS) seen.delete(k);
    },
  };
}

export function tableNonces(db: Sql): NonceStore {
  return {
    floor: 0,
    async remember(deviceId, nonce, ts) {
      const r = await db.run('INSERT INTO nonces(device_id, nonce, ts) VALUES (?, ?, ?) ON CONFLICT DO NOTHING', deviceId, nonce, ts);
      return r.changes === 1;
    },
    async prune(at) {
      await db.run('DELETE FROM nonces WHERE ts < ?', at - 2 * SIG_WINDOW_MS);
    },
  };
}
