// Replay protection for signed device requests: each (device, nonce) is accepted
// once within the signature window. One SQLite process keeps them in memory and
// refuses requests signed before it started (a restart cannot reopen the
// window), which saves a write per request; replicas on PostgreSQL share one
// table, so a request replayed to another replica is refused too.
import { SIG_WINDOW_MS } from '../common/constants.js';
import type { DeviceRow } from './devices.js';
import type { Sql } from './sql.js';

/** Whether a nonce was new, and the device's row as it stood after. */
export interface Admission {
  fresh: boolean;
  device: DeviceRow | undefined;
}

export interface NonceStore {
  /** Requests signed before this time are refused as stale. */
  readonly floor: number;
  /**
   * Takes `nonce` for `deviceId` (fresh: false for a replay) and reads the
   * device's row as it stands now, for its status: one round trip where the
   * nonces live in the database.
   */
  admit(deviceId: string, nonce: string, ts: number): Promise<Admission>;
  /** Forgets nonces old enough that their timestamps would be refused anyway. */
  prune(now: number): Promise<void>;
}

export function memoryNonces(db: Sql, now: number): NonceStore {
  const seen = new Map<string, number>();
  return {
    floor: now,
    async admit(deviceId, nonce, ts) {
      const key = `${deviceId} ${nonce}`;
      const fresh = !seen.has(key);
      if (fresh) seen.set(key, ts);
      return { fresh, device: await db.get<DeviceRow>('SELECT * FROM devices WHERE id = ?', deviceId) };
    },
    async prune(at) {
      for (const [k, ts] of seen) if (ts < at - 2 * SIG_WINDOW_MS) seen.delete(k);
    },
  };
}

export function tableNonces(db: Sql): NonceStore {
  return {
    floor: 0,
    async admit(deviceId, nonce, ts) {
      // The insert runs once whether or not the device's row is found.
      const row = await db.get<DeviceRow & { fresh_nonce: number }>(
        `WITH taken AS (INSERT INTO nonces(device_id, nonce, ts) VALUES (?, ?, ?) ON CONFLICT DO NOTHING RETURNING 1)
         SELECT (SELECT COUNT(*) FROM taken) AS fresh_nonce, d.* FROM (SELECT 1) one LEFT JOIN devices d ON d.id = ?`,
        deviceId,
        nonce,
        ts,
        deviceId,
      );
      const { fresh_nonce, ...device } = row!;
      return { fresh: Number(fresh_nonce) === 1, device: device.id == null ? undefined : (device as DeviceRow) };
    },
    async prune(at) {
      await db.run('DELETE FROM nonces WHERE ts < ?', at - 2 * SIG_WINDOW_MS);
    },
  };
}
