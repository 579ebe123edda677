// The server's side of a lease at real disk sizes: a version whose every disk chunk is
// stored (rows put straight into a real server's database), a device's lease on it, and
// the lease's packed manifest over HTTPS, first made from the database and then again
// (the server's own time from its Server-Timing header, and end to end).
// The yardstick, in the same run on the same database: the rows read as objects and
// packed in JavaScript, as the server did before (server/manifests.ts).
//
//   node --import tsx bench/server-manifest.ts [--gib 4,50,200]      (LETHE_TEST_DB=postgres: on PostgreSQL)
//
// The server's event loop is what every device shares: "longest wait" is the longest a
// request sent beside the manifest's waited for its answer (`/healthz`, every 20 ms).
import { randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';
import { CHUNK_KINDS, CHUNK_SIZE, type ChunkKind, type Sensitivity } from '../common/constants.js';
import type { HttpResponse } from '../common/http-client.js';
import { encodeManifest, type ChunkRowOf } from '../common/manifest.js';
import { LeaseResponse } from '../common/wire.js';
import { assign, enrolledDevice, pushImage } from '../test/helpers/fixtures.js';
import { testBackend } from '../test/helpers/pg.js';
import { startServer, type ServerProc } from '../test/helpers/proc.js';
import { serverDb } from '../test/helpers/server-db.js';
import { beside, fill, timed } from './lib/server-rows.js';

const { values } = parseArgs({ options: { gib: { type: 'string', default: '4,50,200' } } });

/** The yardstick: the version's rows read as objects and packed in JavaScript, as the server did before. */
async function asRows(s: ServerProc, image: string): Promise<number> {
  const db = await serverDb(s);
  try {
    const img = (await db.sql.get<{ id: string; current_version: number }>('SELECT id, current_version FROM images WHERE name = ?', image))!;
    const [, ms] = await timed(async () => {
      const rows = await db.sql.all<{ kind: ChunkKind; idx: number; gen: number; cls: Sensitivity; ct_sha256: Buffer }>(
        'SELECT kind, idx, gen, cls, ct_sha256 FROM chunks WHERE image_id = ? AND version = ? ORDER BY kind, idx',
        img.id,
        img.current_version,
      );
      const chunks = Object.fromEntries(CHUNK_KINDS.map((k) => [k, [] as ChunkRowOf[]])) as Record<ChunkKind, ChunkRowOf[]>;
      for (const r of rows) chunks[r.kind].push({ idx: r.idx, gen: r.gen, cls: r.cls, sha: r.ct_sha256 });
      const head = { format: 2, image, imageId: img.id, version: img.current_version, sizes: { disk: 0, mem: 0, state: 0 }, chunkSizes: CHUNK_SIZE };
      return encodeManifest(head, chunks, randomBytes(64));
    });
    return ms;
  } finally {
    await db.close();
  }
}

const s = await startServer();
try {
  console.log('| database | disk | chunks | rows as objects (before) ms | made by the server ms | ×before | made and received ms | longest wait ms | again (kept) ms | first lease ms | next lease ms |');
  console.log('|---|---|---|---|---|---|---|---|---|---|---|');
  for (const [i, gib] of values.gib!.split(',').map(Number).entries()) {
    const n = (gib * 2 ** 30) / CHUNK_SIZE.disk;
    const image = `disk${i}`;
    await pushImage(s, image, { chunks: 1 });
    await fill(s, image, n);
    const yard = await asRows(s, image);
    const [a, b] = [await enrolledDevice(s, `a${i}`), await enrolledDevice(s, `b${i}`)];
    try {
      await assign(s, a.deviceId, image);
      await assign(s, b.deviceId, image);
      const [la, leaseMs] = await timed(async () => LeaseResponse.parse(await a.client.lease(image)));
      // The server's own time to make it: its Server-Timing header.
      const manifest = (d: typeof a, leaseId: string) => d.client.signed('GET', `/v1/device/leases/${leaseId}/manifest?format=2`, undefined, leaseId);
      const serverMs = (r: HttpResponse) => Number(/dur=(\d+)/.exec(String(r.headers['server-timing']))?.[1]);
      const [first, firstMs, wait] = await beside(s, () => manifest(a, la.leaseId));
      const [lb, nextLeaseMs] = await timed(async () => LeaseResponse.parse(await b.client.lease(image)));
      const [again, againMs] = await timed(() => manifest(b, lb.leaseId));
      if (!first.body.equals(again.body) || first.body.length < n * 41) throw new Error('the kept manifest differs');
      const f = (x: number) => x.toFixed(0);
      console.log(
        `| ${testBackend()} | ${gib} GiB | ${n.toLocaleString('en')} | ${f(yard)} | ${f(serverMs(first))} | ${(serverMs(first) / yard).toFixed(2)} | ${f(firstMs)} | ${f(wait)} | ${f(againMs)} | ${f(leaseMs)} | ${f(nextLeaseMs)} |`,
      );
    } finally {
      a.close();
      b.close();
    }
  }
} finally {
  await s.stop();
}
