// A version's manifest at size: the database packs its records a page at a time
// (server/manifests.ts), a version of more rows than a page lists every one, in order,
// and a committed version's manifest is made once and then answered from memory.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import { readManifest } from '../../agent/chunks/chunk-map.js';
import { CHUNK_SIZE } from '../../common/constants.js';
import { b64u } from '../../common/crypto.js';
import { PinnedClient } from '../../common/http-client.js';
import { LeaseResponse } from '../../common/wire.js';
import { MANIFEST_PAGE_ROWS } from '../../server/manifests.js';
import { assign, enrolledDevice, jsonManifest, pushImage, type TestDevice } from '../helpers/fixtures.js';
import { startServer, type ServerProc } from '../helpers/proc.js';
import { serverDb } from '../helpers/server-db.js';

describe('manifests at size (real server process)', function () {
  const token = randomBytes(24).toString('hex');
  let s: ServerProc;
  let a: TestDevice;
  let b: TestDevice;
  before(async () => {
    s = await startServer({ env: { LETHE_METRICS_TOKEN: token } });
    a = await enrolledDevice(s, 'alice');
    b = await enrolledDevice(s, 'bob');
  });
  after(async () => {
    a?.close();
    b?.close();
    await s?.stop();
  });

  async function made(): Promise<Record<string, number>> {
    const c = new PinnedClient(s.url, s.fingerprint);
    try {
      const text = (await c.request('GET', '/metrics', { headers: { authorization: `Bearer ${token}` } })).body.toString();
      const count = (from: string) => Number(new RegExp(`lethe_manifests_total\\{from="${from}"\\} (\\d+)`).exec(text)?.[1] ?? 0);
      return { database: count('database'), memory: count('memory') };
    } finally {
      c.close();
    }
  }

  it('a version of more rows than a page lists every chunk, in order, as both formats', async () => {
    await pushImage(s, 'big', { chunks: 2 });
    // Rows past the pushed ones, straight into the database: three pages and a part, one row left where a page ends.
    const extra = 3 * MANIFEST_PAGE_ROWS + 7;
    const first = 100;
    const db = await serverDb(s);
    const shas: Buffer[] = [];
    try {
      const img = (await db.sql.get<{ id: string; current_version: number }>("SELECT id, current_version FROM images WHERE name = 'big'"))!;
      await db.sql.tx(async (t) => {
        for (let at = 0; at < extra; at += 500) {
          const n = Math.min(500, extra - at);
          const params: unknown[] = [];
          for (let i = 0; i < n; i++) {
            const sha = randomBytes(32);
            shas.push(sha);
            params.push(img.id, img.current_version, 'disk', first + at + i, img.current_version, (at + i) % 3 === 0 ? 'sensitive' : 'normal', sha, randomBytes(32));
          }
          await t.run(`INSERT INTO chunks(image_id, version, kind, idx, gen, cls, ct_sha256, dedup_hash) VALUES ${Array(n).fill('(?, ?, ?, ?, ?, ?, ?, ?)').join(', ')}`, ...params);
        }
        await t.run('UPDATE versions SET disk_size = ? WHERE image_id = ? AND version = ?', (first + extra) * CHUNK_SIZE.disk, img.id, img.current_version);
      });
    } finally {
      await db.close();
    }
    await assign(s, a.deviceId, 'big');
    const lease = LeaseResponse.parse(await a.client.lease('big'));
    const serverKey = b64u.decode(a.id.info.serverSignPublicKey);
    const m = readManifest(await a.client.manifest(lease.leaseId), serverKey);
    const disk = m.chunks.disk;
    const pushed = disk.count - extra;
    expect(pushed, 'the pushed chunks, below index 100').to.be.within(1, 4);
    expect(disk.idx[pushed - 1]).to.be.below(first);
    for (let i = 0; i < extra; i++) {
      const r = pushed + i;
      if (disk.idx[r] !== first + i || disk.cls[r] !== (i % 3 === 0 ? 2 : 1) || !disk.sha.subarray(32 * r, 32 * r + 32).equals(shas[i])) {
        expect.fail(`record ${r}: index ${disk.idx[r]}, class ${disk.cls[r]}, not chunk ${first + i} as stored`);
      }
    }
    const json = readManifest(await jsonManifest(a.client, lease.leaseId), serverKey);
    expect(json.chunks).to.deep.equal(m.chunks);
  });

  it("a committed version's manifest is made once: the next lease on it gets the same bytes, from memory", async () => {
    await pushImage(s, 'desk', { chunks: 3 });
    await assign(s, a.deviceId, 'desk');
    await assign(s, b.deviceId, 'desk');
    const before = await made();
    const first = await a.client.manifest(LeaseResponse.parse(await a.client.lease('desk')).leaseId);
    const second = await b.client.manifest(LeaseResponse.parse(await b.client.lease('desk')).leaseId);
    expect(Buffer.isBuffer(first) && Buffer.isBuffer(second) && first.equals(second), 'the same signed bytes').to.equal(true);
    const after = await made();
    expect([after.database - before.database, after.memory - before.memory]).to.deep.equal([1, 1]);
    // A new version is its own manifest.
    await pushImage(s, 'desk', { chunks: 2 });
    const third = await b.client.manifest(LeaseResponse.parse(await b.client.lease('desk')).leaseId);
    const v = (x: typeof third) => readManifest(x, b64u.decode(b.id.info.serverSignPublicKey)).head.version;
    expect(v(third)).to.equal(v(first) + 1);
    expect((await made()).database - after.database).to.equal(1);
  });
});
