// The agent core's parts on their own (agent/chunks/): the manifest map with this
// device's writes laid over it, chunk keys, residency, checked blobs and the locked
// buffer pool; and the one backoff every retry loop pauses by (agent/remote/backoff.ts).
import { randomBytes } from 'node:crypto';
import { expect } from 'chai';
import { BufferPool } from '../../agent/chunks/buffer-pool.js';
import { ChunkCache } from '../../agent/chunks/cache.js';
import { CheckedBlobs } from '../../agent/chunks/checked-blobs.js';
import { ChunkKeys } from '../../agent/chunks/chunk-keys.js';
import { ChunkMap, keyId } from '../../agent/chunks/chunk-map.js';
import { Residency } from '../../agent/chunks/residency.js';
import type { Identity } from '../../agent/keys/identity.js';
import { KeyRing } from '../../agent/keys/keyring.js';
import type { LeaseKeeper } from '../../agent/keys/lease-keeper.js';
import type { Manifest } from '../../agent/remote/device-client.js';
import type { Fetcher } from '../../agent/remote/fetcher.js';
import { Backoff, backoffMs } from '../../agent/remote/backoff.js';
import { CHUNK_OVERHEAD, CHUNK_SIZE, type ChunkKind } from '../../common/constants.js';
import { packRows, type PackedManifest } from '../../common/manifest.js';
import { chunkKeyInto, sealId } from '../../common/chunk.js';
import { sha256 } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';
import { expectSameBytes } from '../helpers/bytes.js';
import { tmpDir } from '../helpers/proc.js';

const IMAGE_ID = 'ab'.repeat(16);
const hashOf = (b: Buffer) => sha256(b).toString('base64url');

/** A manifest as the chunk map takes it (packed); a row's hash that is not a SHA-256 is made one of it. */
function manifest(chunks: Partial<Manifest['chunks']>, sizes: Partial<Manifest['sizes']> = {}): PackedManifest {
  const rows = { disk: [], mem: [], state: [], ...chunks };
  const sha = (h: string) => (h.length === 43 ? h : hashOf(Buffer.from(h)));
  const pack = (kind: ChunkKind) => packRows(rows[kind].map(([i, gen, cls, h]) => [i, gen, cls, sha(h)]));
  return {
    head: { format: 2, image: 'desk', imageId: IMAGE_ID, version: 3, sizes: { disk: 1 << 20, mem: 1 << 20, state: 300 * 1024, ...sizes }, chunkSizes: { ...CHUNK_SIZE } },
    chunks: { disk: pack('disk'), mem: pack('mem'), state: pack('state') },
  };
}

/** Chunk keys over a real key ring; no server: these calls never fetch. */
function chunkKeys(map: ChunkMap, ring: KeyRing) {
  const stats = { keyRequests: 0, evicted: 0 };
  const keys = new ChunkKeys(map, {} as Identity, ring, {} as Fetcher, {} as LeaseKeeper, stats);
  return { keys, stats, residency: new Residency(keys, ring, stats) };
}

describe("the agent core's parts", () => {
  describe('the manifest map', () => {
    it("lays this device's dirty chunks of the write generation over the manifest, and marks clean those the server already holds", () => {
      const cache = ChunkCache.inHome(tmpDir(), 1 << 30);
      try {
        const committed = randomBytes(100);
        const mine = randomBytes(120);
        const older = randomBytes(90);
        const sealed = randomBytes(130);
        // Written for generation 4 (this lease's draft); one of generation 3 the version already lists; one of generation 2 it does not.
        // The writes name a blob by its seal id; an older agent's rows, by its SHA-256.
        cache.put({ imageId: IMAGE_ID, gen: 4, kind: 'mem', index: 7 }, mine, true, 'sensitive');
        cache.put({ imageId: IMAGE_ID, gen: 4, kind: 'mem', index: 8 }, sealed, true, 'normal', sealId(sealed));
        cache.put({ imageId: IMAGE_ID, gen: 3, kind: 'mem', index: 2 }, committed, true, 'normal', sealId(committed));
        cache.put({ imageId: IMAGE_ID, gen: 2, kind: 'disk', index: 0 }, older, true, 'normal');
        const map = new ChunkMap();
        map.install(manifest({ mem: [[2, 3, 'normal', hashOf(committed)]] }), 4, cache);
        expect(map.entry('mem', 7)).to.deep.equal({ gen: 4, cls: 'sensitive', ctHash: hashOf(mine) });
        expect(map.entry('mem', 8), 'named as its row names it').to.deep.equal({ gen: 4, cls: 'normal', ctHash: sealId(sealed).toString('base64url') });
        expect(map.entry('mem', 2)).to.deep.equal({ gen: 3, cls: 'normal', ctHash: hashOf(committed) });
        expect(cache.place({ imageId: IMAGE_ID, gen: 3, kind: 'mem', index: 2 })!.sha.toString('base64url'), 'the committed one renamed by its SHA-256').to.equal(hashOf(committed));
        expect(map.entry('disk', 0), 'a dirty chunk of another generation is not read').to.equal(undefined);
        const dirty = cache.dirtyChunks(IMAGE_ID).map((d) => `${d.gen}/${d.kind}/${d.index}`).sort();
        expect(dirty, 'the committed one is clean now; the others stay dirty').to.deep.equal(['2/disk/0', '4/mem/7', '4/mem/8']);
      } finally {
        cache.close();
      }
    });

    it("takes the size of a new device state a suspend wrote, in place of the version's", () => {
      const cache = ChunkCache.inHome(tmpDir(), 1 << 30);
      try {
        const last = randomBytes(1000 + CHUNK_OVERHEAD);
        cache.put({ imageId: IMAGE_ID, gen: 4, kind: 'state', index: 0 }, randomBytes(CHUNK_SIZE.state + CHUNK_OVERHEAD), true, 'normal');
        cache.put({ imageId: IMAGE_ID, gen: 4, kind: 'state', index: 1 }, last, true, 'normal');
        const map = new ChunkMap();
        map.install(manifest({ state: [[0, 3, 'normal', 'x'], [1, 3, 'normal', 'y'], [2, 3, 'normal', 'z']] }), 4, cache);
        expect(map.sizeOf('state')).to.equal(CHUNK_SIZE.state + 1000);
        expect([...map.entries.state.keys()].sort()).to.deep.equal([0, 1]);
        expect(map.plainLength('state', 1)).to.equal(1000);
      } finally {
        cache.close();
      }
    });

    it('answers LEASE_EXPIRED for a lookup that needs a manifest before there is one', () => {
      expect(() => new ChunkMap().must()).to.throw(LetheError, /no manifest yet/).with.property('code', 'LEASE_EXPIRED');
      expect(new ChunkMap().sizeOf('mem')).to.equal(0);
    });
  });

  describe('chunk keys and residency', () => {
    it("derives a normal chunk's key from its class key, uses a released key as it is, and has none for a sensitive chunk not released", () => {
      const ring = new KeyRing(64);
      const map = new ChunkMap();
      map.manifest = manifest({}).head;
      const { keys } = chunkKeys(map, ring);
      const classKey = randomBytes(32);
      ring.setClassKey(3, classKey);
      const normal = { gen: 3, cls: 'normal' as const, ctHash: '' };
      expect(keys.keyInto('mem', 5, normal)).to.equal(true);
      const want = Buffer.alloc(32);
      chunkKeyInto(want, classKey, map.coord('mem', 5, normal));
      expectSameBytes(keys.scratch, want, 'derived chunk key');
      const sensitive = { gen: 3, cls: 'sensitive' as const, ctHash: '' };
      expect(keys.keyInto('mem', 6, sensitive), 'no released key').to.equal(false);
      const released = randomBytes(32);
      ring.setSensitiveKeys([keyId('mem', 6, 3)], released);
      expect(keys.keyInto('mem', 6, sensitive)).to.equal(true);
      expectSameBytes(keys.scratch, released, 'released key');
      keys.destroy();
      expectSameBytes(keys.scratch, Buffer.alloc(32), 'scratch after destroy');
      ring.destroy();
    });

    it("a write key names the chunk's class; its neighbours without one are batched, up to 64", () => {
      const ring = new KeyRing(1024);
      const map = new ChunkMap();
      map.manifest = manifest({}, { mem: 1000 * 4096 }).head;
      const { keys } = chunkKeys(map, ring);
      map.writeGen = 4;
      map.writeCls.set(keyId('mem', 10, 4), 'sensitive');
      ring.setSensitiveKeys([keyId('mem', 10, 4), keyId('mem', 12, 4)], randomBytes(64));
      expect(keys.hasWriteKey('mem', 10)).to.equal(true);
      expect(keys.classOf('mem', 10), 'the class the write key came with').to.equal('sensitive');
      expect(keys.classOf('mem', 11)).to.equal(undefined);
      const batch = keys.writeNeighbours('mem', 10);
      expect(batch[0]).to.equal(10);
      expect(batch).to.not.include(12);
      expect(batch).to.have.length(64);
      ring.destroy();
    });

    it('counts resident plaintext by class; evicting a sensitive chunk drops its read and write keys, a normal one keeps its class key', () => {
      const ring = new KeyRing(64);
      const map = new ChunkMap();
      map.install(manifest({ mem: [[1, 3, 'sensitive', 'h1'], [2, 3, 'normal', 'h2']] }), 4, { dirtyChunks: () => [], markClean: () => {}, forgetStale: () => {} } as unknown as ChunkCache);
      const { residency, stats } = chunkKeys(map, ring);
      ring.setClassKey(3, randomBytes(32));
      ring.setSensitiveKeys([keyId('mem', 1, 3), keyId('mem', 1, 4)], randomBytes(64));
      residency.mark('mem', 1, 'sensitive', 4096);
      residency.mark('mem', 1, 'sensitive', 4096);
      residency.mark('mem', 2, 'normal', 4096);
      expect(residency.bytes).to.deep.equal({ sensitive: 4096, normal: 4096 });
      residency.evictAllSensitive();
      expect(residency.bytes).to.deep.equal({ sensitive: 0, normal: 4096 });
      expect(ring.hasSensitiveKey(keyId('mem', 1, 3)) || ring.hasSensitiveKey(keyId('mem', 1, 4))).to.equal(false);
      expect(ring.hasClassKey(3)).to.equal(true);
      expect(stats.evicted).to.equal(1);
      ring.destroy();
    });

    it('drops keys held past their time whose plaintext is not resident, but not a resident one or one a fault is using', () => {
      const ring = new KeyRing(64);
      const map = new ChunkMap();
      map.manifest = manifest({}).head;
      const { residency } = chunkKeys(map, ring);
      ring.setSensitiveKeys([keyId('mem', 1, 3), keyId('mem', 2, 3), keyId('mem', 3, 3), keyId('disk', 1, 3)], randomBytes(128));
      residency.mark('mem', 2, 'sensitive', 4096);
      expect(residency.dropKeysWithoutPlaintext('mem', 0, (i) => i === 3)).to.equal(1);
      expect([1, 2, 3].map((i) => ring.hasSensitiveKey(keyId('mem', i, 3)))).to.deep.equal([false, true, true]);
      expect(ring.hasSensitiveKey(keyId('disk', 1, 3)), 'another kind is left alone').to.equal(true);
      expect(residency.dropKeysWithoutPlaintext('mem', 60_000, () => false), 'none is that old').to.equal(0);
      ring.destroy();
    });
  });

  describe('checked blobs', () => {
    it('keeps blobs by bytes; when full, the oldest on probation go first; a moved hash is not served', () => {
      const c = new CheckedBlobs(300);
      const blob = (n: number) => randomBytes(n);
      c.put('a', 'ha', blob(100));
      c.put('b', 'hb', blob(100));
      c.put('c', 'hc', blob(100));
      expect(c.get('a', 'ha'), 'a hit on probation').to.be.instanceOf(Buffer);
      c.put('d', 'hd', blob(100));
      expect(c.get('a', 'ha'), 'the oldest on probation went, hit or not').to.equal(undefined);
      expect(c.bytes).to.equal(300);
      expect(c.get('c', 'other-hash'), 'the manifest moved on').to.equal(undefined);
      expect(c.get('c', 'hc'), 'and the stale blob is gone').to.equal(undefined);
      expect([c.count, c.bytes]).to.deep.equal([2, 200]);
      c.put('huge', 'hh', blob(301));
      expect(c.get('huge', 'hh'), 'a blob over the limit is not kept').to.equal(undefined);
    });

    it('is scan-resistant: blobs read again after they left stay through sequential passes larger than memory', () => {
      const limit = 40 * 100;
      const c = new CheckedBlobs(limit);
      const hot = Array.from({ length: 10 }, (_, i) => `hot${i}`);
      const pass = (n: number, tag: string) => {
        for (let i = 0; i < n; i++) if (!c.get(`${tag}${i}`, 'h')) c.put(`${tag}${i}`, 'h', randomBytes(100));
      };
      // The working set is read, leaves on a first scan, and is read again: it is promoted.
      pass(10, 'hot');
      pass(100, 'scan-a');
      expect(hot.every((id) => !c.get(id, 'h')), 'gone after the first scan').to.equal(true);
      pass(10, 'hot');
      expect(c.promoted).to.equal(10);
      // Scans of 2.5 times the memory leave it where it is.
      for (const tag of ['scan-b', 'scan-c', 'scan-d']) pass(100, tag);
      expect(hot.filter((id) => c.get(id, 'h')).length, 'working set blobs kept').to.equal(10);
      expect(c.bytes).to.be.at.most(limit);
    });

    it("tells of each blob a read checked as it leaves for want of room or clear(), not of written or stale ones", () => {
      const left: string[] = [];
      const c = new CheckedBlobs(300, (id, hash, blob) => left.push(`${id}:${hash}:${blob.length}`));
      c.put('r1', 'h1', randomBytes(100), { read: true });
      c.put('w', 'hw', randomBytes(100));
      c.put('r2', 'h2', randomBytes(100), { read: true });
      c.get('r2', 'moved'); // stale: dropped, not told
      c.put('r3', 'h3', randomBytes(100), { read: true });
      c.put('r4', 'h4', randomBytes(100), { read: true }); // r1 leaves for room
      c.put('r5', 'h5', randomBytes(100), { read: true }); // w leaves for room: written here, not told
      expect(left).to.deep.equal(['r1:h1:100']);
      c.clear();
      expect(left.slice(1).sort()).to.deep.equal(['r3:h3:100', 'r4:h4:100', 'r5:h5:100']);
      // A read blob too large to keep leaves at once; a written one is only refused.
      c.put('big', 'hb', randomBytes(301), { read: true });
      c.put('big-w', 'hbw', randomBytes(301));
      expect(left.slice(4)).to.deep.equal(['big:hb:301']);
      expect(c.count).to.equal(0);
    });

    it('keeps a copy of a borrowed blob: the buffer it came in can be reused', () => {
      const c = new CheckedBlobs(1000);
      const buffer = randomBytes(200);
      const blob = Buffer.from(buffer);
      c.put('b', 'hb', buffer, { read: true, borrowed: true });
      buffer.fill(0);
      expectSameBytes(c.get('b', 'hb')!, blob);
    });

    it('keeps a copy of a blob that is a view into a larger response', () => {
      const c = new CheckedBlobs(1000);
      const response = randomBytes(500);
      c.put('v', 'hv', response.subarray(100, 200));
      const kept = c.get('v', 'hv')!;
      expect(kept.buffer).to.not.equal(response.buffer);
      expectSameBytes(kept, response.subarray(100, 200));
    });
  });

  describe('the locked buffer pool', () => {
    it('hands out whole buffers, waits when all are out, and gives back zeroed ones (a view zeroes itself and returns its whole buffer)', async () => {
      const pool = new BufferPool(2, 64);
      const a = await pool.take();
      const b = await pool.take();
      // A holder writes within the view it hands back: only that view needs zeroing.
      const view = a.subarray(10, 20);
      view.fill(7);
      let third: Buffer | undefined;
      const waiting = pool.take().then((x) => (third = x));
      await new Promise((r) => setImmediate(r));
      expect(third, 'all are out: it waits').to.equal(undefined);
      pool.give(view);
      await waiting;
      expect(third!.length).to.equal(64);
      expectSameBytes(third!, Buffer.alloc(64), 'the returned buffer');
      expect(await pool.takeWithin(20), 'none free within 20 ms').to.equal(undefined);
      pool.give(b);
      const seen = await pool.with(16, (buf) => (buf.fill(9), buf.length));
      expect(seen).to.equal(16);
      const again = await pool.take();
      expectSameBytes(again, Buffer.alloc(64), 'zeroed after with()');
      expect(pool.owns(again.subarray(3))).to.equal(true);
      expect(pool.owns(Buffer.alloc(64))).to.equal(false);
      pool.destroy();
    });

    it('a pool of ciphertext only takes back buffers as they are: nothing in them to wipe', async () => {
      const pool = new BufferPool(1, 64, { ciphertextOnly: true });
      const a = await pool.take();
      a.fill(5);
      pool.give(a);
      expectSameBytes(await pool.take(), Buffer.alloc(64, 5), 'the same bytes');
    });
  });

  describe('backoff', () => {
    it('doubles from its base to its cap; a cap given as a function is read at each pause', () => {
      const b = new Backoff(250, 5_000);
      expect(Array.from({ length: 7 }, () => b.next())).to.deep.equal([250, 500, 1000, 2000, 4000, 5000, 5000]);
      let cap = 600;
      const c = new Backoff(250, () => cap);
      expect([c.next(), c.next(), c.next()]).to.deep.equal([250, 500, 600]);
      cap = 10_000;
      expect(c.next()).to.equal(2000);
      expect(backoffMs(250, 10_000, 1000), 'a huge attempt number stays at the cap').to.equal(10_000);
    });
  });
});
