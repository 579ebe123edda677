// Helpers for the benches of the server at real disk sizes (server-manifest.ts,
// server-checkin.ts): rows put straight into a real server's database, and the
// longest another process's request waited while something ran.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { CHUNK_SIZE } from '../../common/constants.js';
import type { ServerProc } from '../../test/helpers/proc.js';
import { serverDb } from '../../test/helpers/server-db.js';

export function timed<T>(f: () => Promise<T>): Promise<[T, number]> {
  const t0 = performance.now();
  return f().then((r) => [r, performance.now() - t0]);
}

/** Runs `f` while another process (probe.ts) asks the server for /healthz every 20 ms; the longest any answer took. */
export async function beside<T>(s: ServerProc, f: () => Promise<T>): Promise<[T, number, number]> {
  const p = spawn(process.execPath, ['--import', 'tsx', new URL('probe.ts', import.meta.url).pathname, s.url, s.fingerprint], { stdio: ['pipe', 'pipe', 'inherit'] });
  let out = '';
  const ready = new Promise<void>((r) => p.stdout!.on('data', (d) => ((out += d), out.includes('ready') && r())));
  const exited = new Promise((r) => p.once('exit', r));
  await ready;
  const [r, ms] = await timed(f);
  p.stdin!.end();
  await exited;
  return [r, ms, Number(out.split('\n')[1])];
}

/** Puts `n` disk rows (every chunk stored) into the image's current version, which it returns with the image's id. */
export async function fill(s: ServerProc, image: string, n: number): Promise<{ id: string; version: number }> {
  const db = await serverDb(s);
  try {
    const img = (await db.sql.get<{ id: string; current_version: number }>('SELECT id, current_version FROM images WHERE name = ?', image))!;
    await db.sql.run("DELETE FROM chunks WHERE image_id = ? AND kind = 'disk'", img.id);
    const ROWS = 500;
    for (let at = 0; at < n; at += 50 * ROWS) {
      await db.sql.tx(async (t) => {
        for (let p = at; p < Math.min(n, at + 50 * ROWS); p += ROWS) {
          const k = Math.min(ROWS, n - p);
          const params: unknown[] = [];
          for (let i = 0; i < k; i++) params.push(img.id, img.current_version, 'disk', p + i, img.current_version, (p + i) % 7 === 0 ? 'sensitive' : 'normal', randomBytes(32), randomBytes(32));
          await t.run(`INSERT INTO chunks(image_id, version, kind, idx, gen, cls, ct_sha256, dedup_hash) VALUES ${Array(k).fill('(?, ?, ?, ?, ?, ?, ?, ?)').join(', ')}`, ...params);
        }
      });
    }
    await db.sql.run('UPDATE versions SET disk_size = ? WHERE image_id = ? AND version = ?', n * CHUNK_SIZE.disk, img.id, img.current_version);
    return { id: img.id, version: img.current_version };
  } finally {
    await db.close();
  }
}
