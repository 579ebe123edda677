// Leases and key release: sealed keys open only with the device's key; the
// keys they carry decrypt exactly the chunks they are for; the class key does
// not reach sensitive chunks; if the audit log cannot be written, nothing is
// released.
import { expect } from 'chai';
import path from 'node:path';
import { CHUNK_SIZE, KEY_BYTES, type ChunkKind } from '../../common/constants.js';
import { chunkKey, decryptChunkInto, type ChunkCoord } from '../../common/chunk.js';
import { boxKeyPair, b64u, openSealed, sha256, wipe } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';
import { LeaseResponse, KeysResponse } from '../../common/wire.js';
import fs from 'node:fs';
import { readManifest } from '../../agent/chunks/chunk-map.js';
import { admin, assign, jsonManifest, rejects, enrolledDevice, pushImage, type TestDevice, type TestImage } from '../helpers/fixtures.js';
import { ROOT } from '../helpers/proc.js';
import { startServer, type ServerProc } from '../helpers/proc.js';
import { serverDb } from '../helpers/server-db.js';
import { expectSameBytes } from '../helpers/bytes.js';

describe('escrow: leases, sealed keys, chunks (real server process)', function () {
  let s: ServerProc;
  let dev: TestDevice;
  let other: TestDevice;
  let img: TestImage;
  before(async () => {
    s = await startServer();
    img = await pushImage(s, 'desk', { chunks: 3 });
    dev = await enrolledDevice(s, 'alice');
    other = await enrolledDevice(s, 'bob');
    await assign(s, dev.deviceId, 'desk');
  });
  after(async () => {
    dev?.close();
    other?.close();
    await s?.stop();
  });

  it("the lease carries the image's policy for the agent, and a new policy comes with the next renewal", async () => {
    const strict = fs.readFileSync(path.join(ROOT, 'policies', 'finance-strict.yaml'), 'utf8');
    await pushImage(s, 'strict', { chunks: 1, policy: strict });
    await assign(s, dev.deviceId, 'strict');
    const lease = LeaseResponse.parse(await dev.client.lease('strict'));
    expect(lease.ttlSeconds).to.equal(300);
    expect(lease.policy).to.deep.include({ memoryMode: 'all', evictIdleMs: 15_000, evictBudgetBytes: 128 * 1024 * 1024, onLeaseExpiry: 'evict-all', prefetchBandwidth: 20 * 1024 * 1024 });
    // IT loosens it: the lease in hand keeps its terms, the renewal brings the new ones.
    await admin(s).json('PUT', '/images/strict/policy', { policy: 'lease:\n  ttl: 20m\neviction:\n  idle: 2m\n' });
    const renewed = LeaseResponse.parse(await dev.client.renew(lease.leaseId));
    expect(renewed.ttlSeconds).to.equal(1200);
    expect(renewed.policy).to.deep.include({ evictIdleMs: 120_000, evictBudgetBytes: null, onLeaseExpiry: 'evict-sensitive' });
  });

  it('a lease needs an assignment', async () => {
    const e = await rejects(other.client.lease('desk'));
    expect(e.status).to.equal(403);
    expect(e.code).to.equal('NOT_ASSIGNED');
    expect(e.hint).to.equal(`IT assigns it with 'lethe admin assign ${other.deviceId} desk'`);
  });

  it('the lease carries an expiry and a class key that opens only with this device key', async () => {
    const lease = LeaseResponse.parse(await dev.client.lease('desk'));
    expect(lease.version).to.equal(img.version);
    expect(Date.parse(lease.expiresAt) - Date.now()).to.be.within(890_000, 900_000);
    expect(Date.parse(lease.renewAfter)).to.be.below(Date.parse(lease.expiresAt));
    expect(lease.classKeys.map((k) => k.gen)).to.deep.equal([img.version]);

    const sealed = b64u.decode(lease.classKeys[0].sealed);
    const ck = openSealed(dev.id.box, sealed);
    expect(ck.length).to.equal(KEY_BYTES);
    expect(() => openSealed(other.id.box, sealed)).to.throw(LetheError, 'ciphertext failed authentication');
    expect(() => openSealed(boxKeyPair(), sealed)).to.throw(LetheError);

    // The class key decrypts normal chunks (disk, state) fetched from the server.
    const m = await jsonManifest(dev.client, lease.leaseId);
    // What agents read (format 2, packed) lists the same chunks as the JSON of format 1.
    const serverKey = b64u.decode(dev.id.info.serverSignPublicKey);
    const packed = await dev.client.manifest(lease.leaseId);
    expect(Buffer.isBuffer(packed), 'format 2 asked for, format 2 sent').to.equal(true);
    const [a, b] = [readManifest(packed, serverKey), readManifest(m, serverKey)];
    expect(a.chunks).to.deep.equal(b.chunks);
    expect({ ...a.head, format: 1 }).to.deep.equal(b.head);
    const imageId = Buffer.from(m.imageId, 'hex');
    for (const kind of ['disk', 'state'] as ChunkKind[]) {
      const refs = m.chunks[kind].map(([index]) => ({ kind, index }));
      expect(refs.map((r) => r.index)).to.deep.equal([0, 2, 4]); // zero chunks are not stored
      const blobs = await dev.client.chunks(lease.leaseId, refs);
      blobs.forEach((blob, i) => {
        const [index, gen, cls, ctHash] = m.chunks[kind][i];
        expect(cls).to.equal('normal');
        expect(sha256(blob).toString('base64url')).to.equal(ctHash);
        const coord: ChunkCoord = { imageId, gen, kind, index, cls };
        const key = chunkKey(ck, coord);
        const out = Buffer.alloc(CHUNK_SIZE[kind]);
        decryptChunkInto(out, key, coord, blob);
        expectSameBytes(out, img.plain[kind].subarray(index * CHUNK_SIZE[kind], (index + 1) * CHUNK_SIZE[kind]));
        wipe(key);
      });
    }
    // ...but not sensitive memory pages: those need keys released one by one.
    const [memBlob] = await dev.client.chunks(lease.leaseId, [{ kind: 'mem', index: 0 }]);
    const memCoord: ChunkCoord = { imageId, gen: img.version, kind: 'mem', index: 0, cls: 'sensitive' };
    expect(() => decryptChunkInto(Buffer.alloc(4096), chunkKey(ck, memCoord), memCoord, memBlob)).to.throw(LetheError, 'tampered');
    wipe(ck);
  });

  it('sensitive keys come in one sealed batch, in request order, and each is audited', async () => {
    const lease = await dev.client.lease('desk');
    const refs = [4, 0, 2].map((index) => ({ kind: 'mem' as const, index }));
    const res = KeysResponse.parse(await dev.client.keys(lease.leaseId, refs));
    expect(res.chunks.map((c) => [c.index, c.cls])).to.deep.equal([
      [4, 'sensitive'],
      [0, 'sensitive'],
      [2, 'sensitive'],
    ]);
    const sealed = b64u.decode(res.sealed);
    expect(() => openSealed(other.id.box, sealed)).to.throw(LetheError);
    const keys = openSealed(dev.id.box, sealed);
    expect(keys.length).to.equal(3 * KEY_BYTES);
    const blobs = await dev.client.chunks(lease.leaseId, refs);
    const imageId = Buffer.from(lease.imageId, 'hex');
    refs.forEach((r, i) => {
      const coord: ChunkCoord = { imageId, gen: res.chunks[i].gen, kind: 'mem', index: r.index, cls: 'sensitive' };
      const out = Buffer.alloc(4096);
      decryptChunkInto(out, keys.subarray(i * KEY_BYTES, (i + 1) * KEY_BYTES), coord, blobs[i]);
      expectSameBytes(out, img.plain.mem.subarray(r.index * 4096, (r.index + 1) * 4096));
    });
    wipe(keys);

    const db = await serverDb(s);
    const last = (await db.sql.get<{ data: string }>("SELECT data FROM audit WHERE device = ? AND type = 'keys.release' ORDER BY seq DESC LIMIT 1", dev.deviceId))!;
    await db.close();
    expect(JSON.parse(last.data)).to.deep.include({ lease: lease.leaseId, image: 'desk', count: 3, sensitive: 3, chunks: { mem: [[0, 0], [2, 2], [4, 4]] } });
  });

  it('a zero chunk or one past the end has no key', async () => {
    const lease = await dev.client.lease('desk');
    const e = await rejects(dev.client.keys(lease.leaseId, [{ kind: 'mem', index: 1 }]));
    expect(e.code).to.equal('UNKNOWN_CHUNK');
    expect(e.status).to.equal(404);
    expect((await rejects(dev.client.keys(lease.leaseId, [{ kind: 'mem', index: 999 }]))).code).to.equal('UNKNOWN_CHUNK');
  });

  it("another device cannot use this device's lease", async () => {
    const lease = await dev.client.lease('desk');
    const e = await rejects(other.client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }]));
    expect(e.code).to.equal('UNKNOWN_LEASE');
  });

  it('if the audit log cannot be written, no key is released (fail closed)', async () => {
    const lease = await dev.client.lease('desk');
    const db = await serverDb(s);
    await db.refuseAudit();
    try {
      const e = await rejects(dev.client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }]));
      expect(e.status).to.equal(503);
      expect(e.code).to.equal('AUDIT_UNAVAILABLE');
      expect(e.message).to.equal('audit log could not be written; nothing was released');
      expect((await rejects(dev.client.chunks(lease.leaseId, [{ kind: 'disk', index: 0 }]))).code).to.equal('AUDIT_UNAVAILABLE');
      expect((await rejects(dev.client.lease('desk'))).code).to.equal('AUDIT_UNAVAILABLE');
    } finally {
      await db.allowAudit();
      await db.close();
    }
    const ok = await dev.client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }]);
    expect(ok.chunks).to.have.length(1);
  });

  it("a write-key request's new state size stands or falls with its audit entry", async () => {
    const lease = await dev.client.lease('desk');
    const db = await serverDb(s);
    const sizes = async () => (await db.sql.all<{ state_size: number }>('SELECT state_size FROM versions')).map((r) => r.state_size);
    try {
      await db.refuseAudit();
      const e = await rejects(dev.client.keys(lease.leaseId, [{ kind: 'state', index: 0 }], true, 777 * 4096));
      await db.allowAudit();
      expect(e.code).to.equal('AUDIT_UNAVAILABLE');
      expect(await sizes(), 'no draft took the size').to.not.include(777 * 4096);
      await dev.client.keys(lease.leaseId, [{ kind: 'state', index: 0 }], true, 777 * 4096);
      expect(await sizes()).to.include(777 * 4096);
      const entry = (await db.sql.get<{ data: string }>("SELECT data FROM audit WHERE type = 'keys.release' ORDER BY seq DESC LIMIT 1"))!;
      expect(JSON.parse(entry.data)).to.deep.include({ write: true, stateSize: 777 * 4096 });
    } finally {
      await db.allowAudit();
      await db.close();
    }
  });

  it('a lease of an unassigned image releases nothing: every call on it is NOT_ASSIGNED, audited', async () => {
    const d = await enrolledDevice(s, 'carol');
    await assign(s, d.deviceId, 'desk');
    const lease = await d.client.lease('desk');
    const renewed = await d.client.renew(lease.leaseId);
    expect(renewed.leaseId).to.equal(lease.leaseId);
    const { admin } = await import('../helpers/fixtures.js');
    const a = admin(s);
    await a.json('DELETE', `/devices/${d.deviceId}/assignments/desk`);
    a.close();
    const calls: [string, () => Promise<unknown>][] = [
      ['keys', () => d.client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }])],
      ['chunks', () => d.client.chunks(lease.leaseId, [{ kind: 'mem', index: 0 }])],
      ['renew', () => d.client.renew(lease.leaseId)],
      ['manifest', () => d.client.manifest(lease.leaseId)],
    ];
    for (const [what, call] of calls) {
      const e = await rejects(call());
      expect({ what, status: e.status, code: e.code }).to.deep.equal({ what, status: 403, code: 'NOT_ASSIGNED' });
    }
    const b = admin(s);
    const rep = await b.json<{ entries: { type: string; data: unknown }[] }>('GET', `/audit/devices/${d.deviceId}`);
    b.close();
    const types = rep.entries.map((e) => e.type);
    expect(types.slice(types.indexOf('unassign'))).to.deep.equal(['unassign', 'lease.refused', 'lease.refused', 'lease.refused', 'lease.refused']);
    expect(rep.entries.at(-1)!.data).to.deep.equal({ lease: lease.leaseId, image: 'desk', version: lease.version, code: 'NOT_ASSIGNED' });
    d.close();
  });
});
