// A device's check-in on a version at real disk sizes: every disk chunk of the base is a
// row (put straight into a real server's database), an agent in this process writes one
// chunk and checks it in. The commit carries the base's other rows over to the new
// version (server/checkin.ts, carryOver).
// The yardstick, in the same run on the same database: the copy as the commit made it
// before, one statement in its transaction (run on a connection of its own, rolled back).
// On SQLite that statement held the server's only connection, and every other request.
//
//   node --import tsx bench/server-checkin.ts [--gib 50,200]      (LETHE_TEST_DB=postgres: on PostgreSQL)
//
// "Longest wait" is the longest a request sent beside the check-in waited for its answer
// (`/healthz`, every 20 ms, from another process); "×before", that against the one
// statement, which on SQLite every other request waited for (on PostgreSQL none did).
import { randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';
import { startAgent } from '../agent/index.js';
import { CHUNK_SIZE } from '../common/constants.js';
import { assign, enrolledDevice, pushImage, testUnlock, withDeviceClient } from '../test/helpers/fixtures.js';
import { testBackend } from '../test/helpers/pg.js';
import { startServer, type ServerProc } from '../test/helpers/proc.js';
import { serverDb } from '../test/helpers/server-db.js';
import { beside, fill, timed } from './lib/server-rows.js';

const { values } = parseArgs({ options: { gib: { type: 'string', default: '50,200' } } });

/** The yardstick: the base's rows copied in one statement, in a transaction rolled back; its ms. */
async function oneStatement(s: ServerProc, img: { id: string; version: number }): Promise<number> {
  const db = await serverDb(s);
  const undo = new Error('rolled back');
  let ms = 0;
  try {
    await db.sql
      .tx(async (t) => {
        [, ms] = await timed(() =>
          t.run(
            'INSERT INTO chunks(image_id, version, kind, idx, gen, cls, ct_sha256, dedup_hash) SELECT image_id, CAST(? AS INTEGER), kind, idx, gen, cls, ct_sha256, dedup_hash FROM chunks WHERE image_id = ? AND version = ? ON CONFLICT DO NOTHING',
            2 ** 30,
            img.id,
            img.version,
          ),
        );
        throw undo;
      })
      .catch((e) => {
        if (e !== undo) throw e;
      });
    return ms;
  } finally {
    await db.close();
  }
}

/** One written chunk checked in by an agent on the image: [ms of the check-in, longest wait]. */
async function checkin(s: ServerProc, image: string, n: number): Promise<[number, number]> {
  const d = await enrolledDevice(s, `${image}-laptop`);
  await assign(s, d.deviceId, image);
  d.close();
  const agent = await startAgent({ home: d.home, image, cacheBytes: 1 << 26, heartbeatMs: 60_000, prefetch: false, nbd: null, log: () => {}, unlock: testUnlock(), push: false });
  try {
    await agent.lease.whenActive();
    await agent.core.write('disk', n - 3, randomBytes(CHUNK_SIZE.disk));
    const [, ms, wait] = await withDeviceClient(d.home, (c) => beside(s, () => agent.core.checkin(c)));
    return [ms, wait];
  } finally {
    agent.stop();
    await agent.done.catch(() => {});
  }
}

async function main(): Promise<void> {
  const s = await startServer();
  try {
    console.log('| database | disk | chunks | one statement (before) ms | check-in ms | longest wait ms | ×before |');
    console.log('|---|---|---|---|---|---|---|');
    for (const [i, gib] of values.gib!.split(',').map(Number).entries()) {
      const n = (gib * 2 ** 30) / CHUNK_SIZE.disk;
      const image = `disk${i}`;
      await pushImage(s, image, { chunks: 1 });
      const img = await fill(s, image, n);
      const before = await oneStatement(s, img);
      const [ms, wait] = await checkin(s, image, n);
      const f = (x: number) => x.toFixed(0);
      console.log(`| ${testBackend()} | ${gib} GiB | ${n.toLocaleString('en')} | ${f(before)} | ${f(ms)} | ${f(wait)} | ${(wait / before).toFixed(2)} |`);
    }
  } finally {
    await s.stop();
  }
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
