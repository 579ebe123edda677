// The key ring, the ciphertext cache and the fetcher's retries on their own.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { ChunkCache, SLOT_BYTES } from '../../agent/chunks/cache.js';
import { SETTLE_HELD_BYTES, settleHeld, Slots } from '../../agent/chunks/slots.js';
import type { DeviceClient } from '../../agent/remote/device-client.js';
import { Fetcher } from '../../agent/remote/fetcher.js';
import { LinkMeter, PACE_MS, pace } from '../../agent/remote/link-meter.js';
import { LetheError } from '../../common/errors.js';
import { CHUNK_KINDS, type ChunkKind } from '../../common/constants.js';
import { KeyRing } from '../../agent/keys/keyring.js';
import { PageFeed, firstTouchesAndLearned } from '../../agent/daemon/prefetch.js';
import { sha256 } from '../../common/crypto.js';
import { sealId } from '../../common/chunk.js';
import { execFileSync, spawnSync } from 'node:child_process';
import { ROOT, tmpDir, waitFor } from '../helpers/proc.js';
import { expectSameBytes } from '../helpers/bytes.js';
import { damageCachedBlob } from '../helpers/cache.js';
import { cachedRows } from '../helpers/cache.js';
import Database from 'better-sqlite3';

describe('key ring', () => {
  it('holds class and sensitive keys, drops one, and zeroes all', () => {
    const ring = new KeyRing(16);
    const k1 = randomBytes(32);
    const k2 = randomBytes(32);
    ring.setClassKey(1, k1);
    ring.setSensitiveKeys(['1/mem/5'], k2);
    expect(ring.counts()).to.deep.equal({ classKeys: 1, sensitiveKeys: 1 });
    expect(ring.withClassKey(1, (k) => Buffer.from(k!).equals(k1))).to.equal(true);
    expect(ring.withSensitiveKey('1/mem/5', (k) => Buffer.from(k!).equals(k2))).to.equal(true);
    expect(ring.isAllZero()).to.equal(false);
    expect(ring.dropSensitiveKey('1/mem/5')).to.equal(true);
    expect(ring.withSensitiveKey('1/mem/5', (k) => k)).to.equal(undefined);
    ring.setSensitiveKeys(['2/disk/7'], k1, true);
    expect(ring.withSensitiveKey('2/disk/7', (k) => Buffer.from(k!).equals(k1))).to.equal(true);
    ring.zeroAll();
    expect(ring.counts()).to.deep.equal({ classKeys: 0, sensitiveKeys: 0 });
    expect(ring.isAllZero(), 'write slabs too').to.equal(true);
    ring.destroy();
  });

  it('grows by slabs, and refuses keys past its last slab', () => {
    const ring = new KeyRing(2, 128);
    const keys = Array.from({ length: 128 }, () => randomBytes(32));
    keys.forEach((k, i) => ring.setSensitiveKeys([`k${i}`], k));
    expect(() => ring.setSensitiveKeys(['one-too-many'], randomBytes(32))).to.throw('key ring is full');
    // A batch that does not fit keeps none of its keys and loses no slot.
    ring.dropSensitiveKey('k127');
    expect(() => ring.setSensitiveKeys(['a', 'b'], randomBytes(64))).to.throw('key ring is full');
    expect(ring.counts().sensitiveKeys).to.equal(127);
    ring.setSensitiveKeys(['k127'], keys[127]);
    expect(keys.every((k, i) => ring.withSensitiveKey(`k${i}`, (x) => Buffer.from(x!).equals(k)))).to.equal(true);
    ring.zeroAll();
    expect(ring.isAllZero()).to.equal(true);
    ring.destroy();
  });

  it('stores a batch of keys at once, replacing ones it holds', () => {
    const ring = new KeyRing(4);
    const batch = randomBytes(32 * 6);
    ring.setSensitiveKeys(['k1'], randomBytes(32));
    ring.setSensitiveKeys(['k0', 'k1', 'k2', 'k3', 'k4', 'k5'], batch);
    expect(ring.counts().sensitiveKeys).to.equal(6);
    for (let i = 0; i < 6; i++) expect(ring.withSensitiveKey(`k${i}`, (k) => Buffer.from(k!).equals(batch.subarray(i * 32, (i + 1) * 32)))).to.equal(true);
    ring.destroy();
  });

  // In a child: touching a closed slab kills the process (SIGSEGV), which is the point.
  const touch = (body: string, readKeys = 4) =>
    spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', `
      import { KeyRing } from ${JSON.stringify(path.join(ROOT, 'agent/keys/keyring.ts'))};
      const ring = new KeyRing(2);
      for (let i = 0; i < ${readKeys}; i++) ring.setSensitiveKeys(['k' + i], Buffer.alloc(32, i + 1));
      ring.setSensitiveKeys(['w0', 'w1', 'w2'], Buffer.alloc(96, 9), true);
      await new Promise((r) => setImmediate(r));
      const slotOf = (id) => ring.slot(ring.sensitiveSlots.get(id));
      ${body}
      console.log('read');`], { cwd: ROOT, encoding: 'utf8' });

  it('keeps every slab unreadable but the one holding the key in use', () => {
    const inSlab = touch(`ring.withSensitiveKey('k2', () => slotOf('k3')[0]);`); // k2 and k3 share a slab
    expect(inSlab.stdout, inSlab.stderr).to.include('read');
    const otherSlab = touch(`ring.withSensitiveKey('k2', () => slotOf('k0')[0]);`);
    expect(otherSlab.signal).to.equal('SIGSEGV');
    const closed = touch(`slotOf('k2')[0];`);
    expect(closed.signal).to.equal('SIGSEGV');
  });

  it("keeps a write key's slab open to the end of the turn it was used in, and never puts a write key beside a read key", () => {
    // w0 and w1 share a slab; k2 has a slab with a free slot, which no write key takes.
    const turn = touch(`ring.withSensitiveKey('w0', () => 0); slotOf('w1')[0];`, 3);
    expect(turn.stdout, turn.stderr).to.include('read');
    const beside = touch(`ring.withSensitiveKey('w0', () => 0); ring.withSensitiveKey('w2', () => 0); slotOf('k2')[0];`, 3);
    expect(beside.signal).to.equal('SIGSEGV');
    const after = touch(`ring.withSensitiveKey('w0', () => 0); await new Promise((r) => setImmediate(r)); slotOf('w1')[0];`, 3);
    expect(after.signal).to.equal('SIGSEGV');
    const readKey = touch(`ring.withSensitiveKey('k0', () => 0); slotOf('k1')[0];`, 3);
    expect(readKey.signal, "a read key's slab closes at once").to.equal('SIGSEGV');
    // A write key's freed slot goes back to the write slabs: a read key stored next is not beside w1.
    const freed = touch(`ring.dropSensitiveKey('w0'); ring.setSensitiveKeys(['k9'], Buffer.alloc(32, 7)); ring.withSensitiveKey('w1', () => 0); slotOf('k9')[0];`, 3);
    expect(freed.signal).to.equal('SIGSEGV');
  });

  it('holds up to its limit of keys of both kinds together: an empty slab of one kind serves the other', () => {
    const ring = new KeyRing(2, 8);
    const ids = (p: string) => Array.from({ length: 8 }, (_, i) => `${p}${i}`);
    const keys = randomBytes(8 * 32);
    ring.setSensitiveKeys(ids('r'), keys);
    expect(() => ring.setSensitiveKeys(['w'], randomBytes(32), true)).to.throw('key ring is full');
    ring.zeroAll();
    ring.setSensitiveKeys(ids('w'), keys, true); // every slab was a read slab
    expect(ids('w').every((id, i) => ring.withSensitiveKey(id, (k) => Buffer.from(k!).equals(keys.subarray(i * 32, (i + 1) * 32))))).to.equal(true);
    ring.zeroAll();
    ring.setSensitiveKeys(ids('r'), keys); // and back, in the same turn the write slabs were used in
    expect(ring.counts().sensitiveKeys).to.equal(8);
    ring.zeroAll();
    expect(ring.isAllZero()).to.equal(true);
    ring.destroy();
  });
});

describe('chunk cache', () => {
  const key = (index: number) => ({ imageId: 'ab', gen: 1, kind: 'mem' as const, index });

  it('evicts clean chunks least recently used first, never dirty ones', () => {
    const c = new ChunkCache(path.join(tmpDir(), 'c.db'), 4 * 4200);
    for (let i = 0; i < 4; i++) c.put(key(i), randomBytes(4137));
    c.get(key(0)); // 0 is now the most recently used
    c.put(key(9), randomBytes(4137), true, 'sensitive'); // dirty, over the limit
    expect(c.get(key(1)), 'oldest clean one went').to.equal(undefined);
    expect(c.get(key(0))).to.not.equal(undefined);
    for (let i = 10; i < 20; i++) c.put(key(i), randomBytes(4137), true, 'normal');
    expect(c.stats().dirty).to.equal(11);
    expect(c.dirtyChunks('ab').map((d) => d.index)).to.include.members([9, 10, 19]);
    c.close();
  });

  it('drops a damaged row instead of serving it, and survives a reopen', () => {
    const file = path.join(tmpDir(), 'c.db');
    const c = new ChunkCache(file, 1 << 20);
    const blob = randomBytes(4137);
    c.put(key(1), blob);
    c.put(key(2), randomBytes(4137));
    c.close();
    const again = new ChunkCache(file, 1 << 20);
    expectSameBytes(again.get(key(1))!, blob);
    // Damage chunk 2's bytes behind the cache's back (its row keeps the old hash).
    damageCachedBlob(file, 'mem', 2, 100, false);
    expect(again.get(key(2))).to.equal(undefined);
    expect(again.stats()).to.include({ damaged: 1, chunks: 1 });
    again.close();
  });

  it('names a dirty blob by its seal id until the server commits it, then by its SHA-256; the seal id still catches a changed tag', () => {
    const file = path.join(tmpDir(), 'c.db');
    const c = new ChunkCache(file, 1 << 20);
    const [mine, other, old] = [0, 1, 2].map(() => randomBytes(4137));
    c.put(key(1), mine, true, 'normal', sealId(mine));
    c.put(key(2), other, true, 'normal', sealId(other));
    c.put(key(3), old, true, 'normal'); // an older agent's row: named by its SHA-256
    c.close();
    let again = new ChunkCache(file, 1 << 20);
    expectSameBytes(again.get(key(1))!, mine);
    expectSameBytes(again.get(key(3))!, old);
    expect(again.dirtyChunks('ab').map((d) => d.sha.toString('hex'))).to.deep.equal([sealId(mine), sealId(other), sha256(old)].map((h) => h.toString('hex')));
    damageCachedBlob(file, 'mem', 2, 4137 - 3, false); // a byte of its tag
    expect(again.get(key(2)), 'a changed tag').to.equal(undefined);
    expect(again.markClean(key(1), sealId(other), sha256(mine)), 'another blob than the one checked in').to.equal(false);
    expect(again.markClean(key(1), sealId(mine), sha256(mine))).to.equal(true);
    expect(again.place(key(1))!.sha.equals(sha256(mine))).to.equal(true);
    again.close();
    again = new ChunkCache(file, 1 << 20);
    expectSameBytes(again.get(key(1))!, mine);
    expect(again.dirtyChunks('ab').map((d) => d.index), 'clean after a reopen').to.deep.equal([3]);
    expect(again.stats()).to.include({ damaged: 0, dirty: 1 });
    again.close();
  });

  it('stores a batch in one transaction with the hashes it is given, and trims after it', () => {
    const c = new ChunkCache(path.join(tmpDir(), 'c.db'), 3 * 4200);
    const blobs = [0, 1, 2, 3].map(() => randomBytes(4137));
    c.putMany(blobs.map((blob, i) => ({ k: key(i), blob, hash: sha256(blob) })));
    // Four stored, then the oldest trimmed to fit three.
    expect(c.stats()).to.include({ chunks: 3, evicted: 1 });
    expect(c.get(key(0))).to.equal(undefined);
    expect(Buffer.compare(c.get(key(3))!, blobs[3])).to.equal(0);
    // A given hash is what a read checks against: a wrong one makes the row damaged, never served.
    c.putMany([{ k: key(7), blob: blobs[0], hash: sha256(blobs[1]) }]);
    expect(c.get(key(7))).to.equal(undefined);
    c.close();
  });

  it('a flush fsyncs the slot files only when a dirty blob went in since their last fsync: server blobs alone are fetched again if a power cut loses them', () => {
    const c = new ChunkCache(path.join(tmpDir(), 'c.db'), 1 << 20);
    c.putMany([0, 1, 2].map((i) => ({ k: key(i), blob: randomBytes(4137) })));
    c.put(key(3), randomBytes(4137));
    c.flush();
    expect(c.stats().slotSyncs, 'clean blobs only').to.equal(0);
    c.put(key(4), randomBytes(4137), true, 'normal');
    c.flush();
    c.flush();
    expect(c.stats().slotSyncs, 'a dirty put, then two flushes').to.equal(1);
    // A dirty blob written into a reserved slot (as a sealed guest write is) counts too.
    const blob = randomBytes(4137);
    const { slot, at } = c.reserve('mem');
    fs.writeSync(c.slotFd('mem'), blob, 0, blob.length, at);
    c.commitMany([{ k: key(5), slot, len: blob.length, sha: sha256(blob), dirty: true, cls: 'normal' }]);
    c.put(key(6), randomBytes(4137));
    c.flush();
    expect(c.stats().slotSyncs).to.equal(2);
    expectSameBytes(c.get(key(5))!, blob);
    c.close();
  });

  it('a cache opened with dirty rows fsyncs its slot files at the first flush: an agent crash may have left a guest write in the page cache only', () => {
    const file = path.join(tmpDir(), 'c.db');
    const c = new ChunkCache(file, 1 << 20);
    c.put(key(0), randomBytes(4137));
    c.close();
    const clean = new ChunkCache(file, 1 << 20);
    clean.flush();
    expect(clean.stats().slotSyncs, 'clean rows only').to.equal(0);
    clean.put(key(1), randomBytes(4137), true, 'normal');
    clean.close(); // no flush: as a crash leaves it
    const dirty = new ChunkCache(file, 1 << 20);
    dirty.flush();
    dirty.flush();
    expect(dirty.stats().slotSyncs).to.equal(1);
    dirty.close();
  });
});

describe('chunk cache: slots and index', () => {
  const key = (index: number, kind: 'mem' | 'disk' = 'mem') => ({ imageId: 'ab', gen: 1, kind, index });
  const slotOf = (file: string, index: number) => cachedRows(file, 'mem').find((r) => r.idx === index)?.slot;

  it("moves an earlier cache's blobs, dirty ones too, out of SQLite rows into slots", () => {
    const file = path.join(tmpDir(), 'cache.db');
    const blobs = [randomBytes(4137), randomBytes(4000), randomBytes(131113)];
    const old = new Database(file);
    old.exec(`CREATE TABLE chunks (image_id TEXT NOT NULL, gen INTEGER NOT NULL, kind TEXT NOT NULL, idx INTEGER NOT NULL, data BLOB NOT NULL,
      sha256 BLOB NOT NULL, dirty INTEGER NOT NULL DEFAULT 0, cls TEXT, used INTEGER NOT NULL, PRIMARY KEY (image_id, gen, kind, idx))`);
    const put = old.prepare('INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)');
    put.run('ab', 1, 'mem', 0, blobs[0], sha256(blobs[0]), 0, null, 1);
    put.run('ab', 1, 'mem', 1, blobs[1], sha256(blobs[1]), 1, 'sensitive', 2);
    put.run('ab', 1, 'disk', 5, blobs[2], sha256(blobs[2]), 1, 'normal', 3);
    old.close();
    const c = new ChunkCache(file, 1 << 30);
    expectSameBytes(c.get(key(0))!, blobs[0]);
    expect(c.dirtyChunks('ab').map((d) => [d.kind, d.index, d.cls])).to.deep.equal([['disk', 5, 'normal'], ['mem', 1, 'sensitive']]);
    expectSameBytes(c.dirtyBlob(c.dirtyChunks('ab')[1])!, blobs[1]);
    expect(c.stats()).to.include({ chunks: 3, dirty: 2, bytes: 4137 + 4000 + 131113 });
    c.close();
    const db = new Database(file, { readonly: true });
    expect(db.prepare("SELECT COUNT(*) AS n FROM sqlite_master WHERE name = 'chunks'").get(), 'the old table is gone').to.deep.equal({ n: 0 });
    db.close();
  });

  it("a changed dirty chunk goes to a new slot; the slot it left is reused only after a flush", () => {
    const file = path.join(tmpDir(), 'cache.db');
    const c = new ChunkCache(file, 1 << 30);
    c.put(key(0), randomBytes(4137), true, 'normal');
    const first = slotOf(file, 0);
    c.put(key(0), randomBytes(4137), true, 'normal');
    const second = slotOf(file, 0);
    expect(second).to.not.equal(first);
    c.put(key(1), randomBytes(4137));
    expect(slotOf(file, 1), 'before a flush the old slot stays as it was').to.not.equal(first);
    c.flush();
    c.put(key(2), randomBytes(4137));
    expect(slotOf(file, 2), 'after it, it is reused').to.equal(first);
    c.close();
  });

  it('a long run of rewrites without a flush settles the slots it left in the background and reuses them: the slot file stops growing', async () => {
    const file = path.join(tmpDir(), 'cache.db');
    const c = new ChunkCache(file, 1 << 30);
    const slotFile = path.join(path.dirname(file), 'cache-disk.blobs');
    const chunks = 8;
    const last = new Map<number, Buffer>();
    const rewrite = () => {
      for (let i = 0; i < chunks; i++) {
        const b = randomBytes(SLOT_BYTES.disk);
        last.set(i, b);
        c.put(key(i, 'disk'), b, true, 'normal');
      }
    };
    // Rewrites leaving more than SETTLE_HELD_BYTES held: one settle starts, and once it is
    // done its slots come back (nothing else frees them: no flush here).
    const rounds = Math.ceil(SETTLE_HELD_BYTES / (chunks * SLOT_BYTES.disk)) + 1;
    for (let settles = 0; settles < 3; settles++) {
      for (let r = 0; r < rounds; r++) rewrite();
      // Without a settle every rewrite takes new slots, and this never comes.
      await waitFor(
        async () => {
          const before = fs.statSync(slotFile).size;
          rewrite();
          return fs.statSync(slotFile).size === before || undefined;
        },
        30_000,
        `a rewrite into settled slots (settle ${settles + 1})`,
      );
    }
    for (const [i, b] of last) expectSameBytes(c.get(key(i, 'disk'))!, b, `chunk ${i}: the last write`);
    c.close();
    // Reopened: the index names the last write of every chunk, and nothing else.
    const again = new ChunkCache(file, 1 << 30);
    expect(again.dirtyChunks('ab').map((d) => d.index)).to.deep.equal([...last.keys()]);
    for (const d of again.dirtyChunks('ab')) expectSameBytes(again.dirtyBlob(d)!, last.get(d.index)!, `chunk ${d.index} after reopening`);
    again.close();
  });

  it("a version's blob a write made stale stays until that write is durable, then goes, and a later write takes its slot with its bytes not punched out", async () => {
    const file = path.join(tmpDir(), 'cache.db');
    const c = new ChunkCache(file, 1 << 30);
    const base = (index: number) => ({ imageId: 'ab', gen: 1, kind: 'disk' as const, index });
    const draft = (index: number) => ({ ...base(index), gen: 2 });
    const rows = () => cachedRows(file, 'disk');
    const old = randomBytes(SLOT_BYTES.disk);
    c.put(base(0), old);
    const oldSlot = rows().find((r) => r.gen === 1 && r.idx === 0)!.slot;
    c.put(draft(0), randomBytes(SLOT_BYTES.disk), true, 'normal');
    c.supersede(draft(0)); // dirty: never dropped
    c.supersede(base(0));
    // Until the write is durable a power cut may bring back the version's row alone: its bytes stay.
    expectSameBytes(c.get(base(0))!, old, 'before the flush');
    c.put(draft(1), randomBytes(SLOT_BYTES.disk), true, 'normal');
    expect(rows().find((r) => r.gen === 2 && r.idx === 1)!.slot, 'before the flush its slot is not reused').to.not.equal(oldSlot);
    c.flush();
    expect(c.has(base(0)), 'after the flush it is gone').to.equal(false);
    expect(c.has(draft(0)), 'the dirty chunk stays').to.equal(true);
    const raw = Buffer.alloc(SLOT_BYTES.disk);
    fs.readSync(c.slotFd('disk'), raw, 0, raw.length, oldSlot * SLOT_BYTES.disk);
    expectSameBytes(raw, old, 'its slot keeps its bytes (not punched out) until reused');
    c.put(draft(2), randomBytes(SLOT_BYTES.disk), true, 'normal');
    expect(rows().find((r) => r.gen === 2 && r.idx === 2)!.slot, 'the next write takes it').to.equal(oldSlot);
    // Without a flush: stale blobs count towards a settle, which drops them once the syncs are done.
    const n = Math.ceil(SETTLE_HELD_BYTES / SLOT_BYTES.disk); // the last one reaches the mark
    for (let i = 10; i < 10 + n; i++) c.put(base(i), randomBytes(SLOT_BYTES.disk));
    for (let i = 10; i < 10 + n; i++) c.supersede(base(i));
    await waitFor(async () => Array.from({ length: n }, (_, i) => base(10 + i)).every((k) => !c.has(k)) || undefined, 30_000, 'the stale blobs dropped by a settle');
    // A new chunk map may name a blob an earlier one made stale: forgetStale() cancels every mark, a settle's too.
    c.put(base(1), old);
    c.supersede(base(1));
    c.forgetStale();
    c.flush();
    expectSameBytes(c.get(base(1))!, old, 'a cancelled mark drops nothing');
    for (let i = 200; i < 200 + n; i++) c.put(base(i), randomBytes(SLOT_BYTES.disk));
    for (let i = 200; i < 200 + n; i++) c.supersede(base(i));
    const settling = c.settled();
    c.forgetStale();
    await settling;
    expect(c.has(base(200)), 'nor does a settle under way').to.equal(true);
    // Closed while a settle runs: it ends quietly (a throw here would be an unhandled rejection).
    for (let i = 200; i < 200 + n; i++) c.supersede(base(i));
    const last = c.settled();
    c.close();
    await last;
  });

  it('settled slots come back only once the slot files and the WAL are synced, and never when a sync fails', async () => {
    const dir = tmpDir();
    const fds = {} as Record<ChunkKind, number>;
    for (const k of CHUNK_KINDS) fds[k] = fs.openSync(path.join(dir, `${k}.blobs`), 'w+');
    const wal = path.join(dir, 'index-wal');
    fs.writeFileSync(wal, 'frames');
    const perSlot = SLOT_BYTES.disk;
    const held = Math.ceil(SETTLE_HELD_BYTES / perSlot);
    /** Slots of every kind with `n` disk slots left by dirty chunks (slots 0 … n − 1; the file's next slot is `held`). */
    const slotsWithHeld = (n = held) => {
      const s = {} as Record<ChunkKind, Slots>;
      for (const k of CHUNK_KINDS) s[k] = new Slots();
      s.disk.next = held;
      for (let i = 0; i < n; i++) s.disk.give(i, true);
      return s;
    };
    const short = slotsWithHeld(held - 1);
    expect(settleHeld(short, fds, SLOT_BYTES, wal), 'one slot short of the mark: nothing to do').to.equal(undefined);
    expect(short.disk.heldCount).to.equal(held - 1);
    expect(await settleHeld(short, fds, SLOT_BYTES, wal, perSlot), 'other bytes waiting on the same syncs count').to.equal(true);
    // Synced: before the syncs are done no held slot is handed out; after, they are.
    const ok = slotsWithHeld();
    const settling = settleHeld(ok, fds, SLOT_BYTES, wal);
    expect(settling).to.not.equal(undefined);
    expect(ok.disk.take(), 'while the syncs run, a new slot').to.equal(held);
    expect(await settling, 'durable').to.equal(true);
    expect(ok.disk.take(), 'once they are done, a settled one').to.be.below(held);
    // The WAL cannot be synced: the held slots stay out of use.
    const failed = slotsWithHeld();
    expect(await settleHeld(failed, fds, SLOT_BYTES, path.join(dir, 'no-such-wal')), 'not durable').to.equal(false);
    expect(failed.disk.take(), 'a failed sync leaves them out').to.equal(held);
    expect(failed.disk.heldCount, 'and does not hand them back to be held again').to.equal(0);
    for (const k of CHUNK_KINDS) fs.closeSync(fds[k]);
  });

  it('rows of blobs written into reserved slots commit together; one bad row fails them all and every slot is free again', () => {
    const file = path.join(tmpDir(), 'cache.db');
    const c = new ChunkCache(file, 1 << 30);
    const blobs = [randomBytes(4137), randomBytes(4137), randomBytes(4137)];
    const write = (i: number) => {
      const r = c.reserve('mem');
      fs.writeSync(c.slotFd('mem'), blobs[i], 0, blobs[i].length, r.at);
      return { k: key(i), slot: r.slot, len: blobs[i].length, sha: sha256(blobs[i]), dirty: true, cls: 'normal' as const };
    };
    const rows = [write(0), write(1), write(2)];
    c.commitMany(rows);
    for (let i = 0; i < 3; i++) expectSameBytes(c.get(key(i))!, blobs[i], `chunk ${i}`);
    expect(c.stats()).to.include({ chunks: 3, dirty: 3 });
    // A second group whose middle row does not fit its slot: none of it stands, no slot is lost.
    const more = [3, 4, 5].map((i) => ({ ...write(i % 3), k: key(i) }));
    const slots = more.map((r) => r.slot);
    more[1].len = 1 << 20;
    expect(() => c.commitMany(more)).to.throw(RangeError);
    expect([3, 4, 5].map((i) => c.has(key(i)))).to.deep.equal([false, false, false]);
    expect(c.stats()).to.include({ chunks: 3, dirty: 3 });
    const again = [c.reserve('mem').slot, c.reserve('mem').slot, c.reserve('mem').slot];
    expect(again.sort(), 'the three slots are free again').to.deep.equal([...slots].sort());
    c.close();
  });

  it('a batch that throws leaves the cache as it was, in memory and on disk', () => {
    const file = path.join(tmpDir(), 'cache.db');
    const c = new ChunkCache(file, 1 << 30);
    const kept = randomBytes(4137);
    c.put(key(0), kept, true, 'normal');
    expect(() =>
      c.batch(() => {
        c.put(key(0), randomBytes(4137), true, 'normal');
        c.put(key(1), randomBytes(4137), true, 'normal');
        throw new Error('suspend failed half way');
      }),
    ).to.throw('suspend failed half way');
    expectSameBytes(c.get(key(0))!, kept);
    expect(c.has(key(1))).to.equal(false);
    expect(c.stats()).to.include({ chunks: 1, dirty: 1, bytes: 4137 });
    c.close();
    const again = new ChunkCache(file, 1 << 30);
    expectSameBytes(again.get(key(0))!, kept);
    expect(again.stats()).to.include({ chunks: 1, dirty: 1 });
    again.close();
  });

  it('two rows naming one slot (a power cut between a reuse and its index): the row whose bytes are there stays', () => {
    const file = path.join(tmpDir(), 'cache.db');
    const c = new ChunkCache(file, 1 << 30);
    const mine = randomBytes(4137);
    c.put(key(0), randomBytes(4137));
    c.put(key(1), mine, true, 'sensitive');
    c.close();
    // The clean row 0 comes back pointing at the slot the dirty row 1 now uses.
    const db = new Database(file);
    db.prepare("UPDATE blobs SET slot = ? WHERE kind = 'mem' AND idx = 0").run(slotOf(file, 1));
    db.close();
    const again = new ChunkCache(file, 1 << 30);
    expect(again.has(key(0))).to.equal(false);
    expect(again.dirtyChunks('ab').map((d) => d.index)).to.deep.equal([1]);
    expectSameBytes(again.dirtyBlob(again.dirtyChunks('ab')[0])!, mine);
    again.put(key(7), randomBytes(4137));
    expectSameBytes(again.dirtyBlob(again.dirtyChunks('ab')[0])!, mine, 'the dirty chunk after another put');
    again.close();
    // The row that lost its slot is gone from the index on disk too, not only from memory.
    const left = new Database(file, { readonly: true });
    expect(left.prepare("SELECT idx FROM blobs WHERE kind = 'mem' ORDER BY idx").raw().all()).to.deep.equal([[1], [7]]);
    left.close();
  });
});

describe('install-ahead and the uploaded order', () => {
  it('the pages the guest faulted on lead, then the learned order without repeats', () => {
    const out = firstTouchesAndLearned(Uint32Array.from([5, 9, 2]), Uint32Array.from([9, 1, 5, 7, 1]));
    expect([...out]).to.deep.equal([5, 9, 2, 1, 7]);
  });

  it('without a learned order, the faults are the order', () => {
    const touched = Uint32Array.from([3, 4]);
    expect([...firstTouchesAndLearned(touched, new Uint32Array(0))]).to.deep.equal([3, 4]);
  });
});

describe('process hardening', () => {
  it('makes a process non-dumpable (in a child, so the test runner keeps its own setting)', () => {
    const script = `import { isDumpable, makeNonDumpable } from ${JSON.stringify(path.join(ROOT, 'agent/daemon/harden.ts'))};
      const before = isDumpable(); makeNonDumpable(); console.log(JSON.stringify([before, isDumpable()]));`;
    const out = execFileSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: ROOT }).toString();
    expect(JSON.parse(out)).to.deep.equal([true, false]);
  });
});

describe('the startup page feed', () => {
  it('hands on batches in order, those pushed before reading and those pushed while the reader waits, and ends', async () => {
    const feed = new PageFeed();
    feed.push([1, 2]);
    const got: number[][] = [];
    const reading = (async () => {
      for await (const b of feed) got.push([...b]);
    })();
    await new Promise((r) => setImmediate(r));
    expect(got, 'the first batch before any other came').to.deep.equal([[1, 2]]);
    feed.push([3]);
    feed.push([]);
    feed.push([4, 5]);
    feed.end();
    await reading;
    expect(got).to.deep.equal([[1, 2], [3], [4, 5]]);
  });

  it('makes its reader throw when it fails, after the batches before', async () => {
    const feed = new PageFeed();
    const got: number[][] = [];
    const reading = (async () => {
      for await (const b of feed) got.push([...b]);
    })();
    feed.push([7]);
    feed.fail(new LetheError('SERVER_UNREACHABLE', 'the link is down'));
    const e = await reading.then(() => undefined, (x: unknown) => x);
    expect((e as LetheError).code).to.equal('SERVER_UNREACHABLE');
    expect(got).to.deep.equal([[7]]);
  });
});

describe('fetcher retries', () => {
  /** A device client whose server is down: every request fails as unreachable. */
  const down = { chunks: () => Promise.reject(new LetheError('SERVER_UNREACHABLE', 'connect ECONNREFUSED')) } as unknown as DeviceClient;
  const settledWithin = async (p: Promise<unknown>, ms: number) => {
    let done = false;
    p.then(
      () => (done = true),
      () => (done = true),
    );
    await new Promise((r) => setTimeout(r, ms));
    return done;
  };

  it("a demand fetch retries while the server is down, but gives up at the lease's eviction point", async () => {
    // A retry window of its own, short enough that the test waits for its end: a
    // retry loop left running kept the test process alive for 30 s after the suite.
    const unbounded = new Fetcher(down, down, () => 'lease-1', undefined, 3_000);
    const waiting = unbounded.demand({ kind: 'disk', index: 0 }).then(
      () => expect.fail('the fetch should have failed'),
      (e: unknown) => e,
    );
    expect(await settledWithin(waiting, 600), 'without a lease deadline it keeps retrying').to.equal(false);

    const bounded = new Fetcher(down, down, () => 'lease-1', () => Date.now() + 300);
    const failed = bounded.demand({ kind: 'disk', index: 0 }).then(
      () => expect.fail('the fetch should have failed'),
      (e: unknown) => e,
    );
    expect(await settledWithin(failed, 1_500), 'it gives up by the eviction point').to.equal(true);
    expect(((await failed) as LetheError).code).to.equal('SERVER_UNREACHABLE');
    expect(bounded.stats.retries).to.be.greaterThan(0);
    expect(((await waiting) as LetheError).code, 'and gives up at the end of its retry window').to.equal('SERVER_UNREACHABLE');
  });
});

describe('fetcher: readahead behind the page, and pacing', () => {
  /** A device client whose chunk requests are answered when the test says. */
  function heldClient() {
    const calls: { indices: number[]; answer: () => void }[] = [];
    const client = {
      chunks: (_lease: string, refs: { index: number }[]) =>
        new Promise<Buffer[]>((resolve) => calls.push({ indices: refs.map((r) => r.index), answer: () => resolve(refs.map((r) => Buffer.from([r.index]))) })),
    } as unknown as DeviceClient;
    return { client, calls };
  }

  it('a demanded chunk goes in its own request, before the chunks read ahead of it, and does not wait for them', async () => {
    const { client, calls } = heldClient();
    const f = new Fetcher(client, client, () => 'lease-1');
    const page = f.demand({ kind: 'mem', index: 5 });
    const ahead = [6, 7, 8].map((index) => f.demand({ kind: 'mem', index }, true));
    await new Promise((r) => setImmediate(r));
    expect(calls.map((c) => c.indices)).to.deep.equal([[5], [6, 7, 8]]);
    calls[0].answer();
    expect([...(await page)]).to.deep.equal([5]);
    let aheadDone = false;
    void Promise.all(ahead).then(() => (aheadDone = true));
    await new Promise((r) => setImmediate(r));
    expect(aheadDone, 'the readahead is still on its way').to.equal(false);
    calls[1].answer();
    expect((await Promise.all(ahead)).map((b) => b[0])).to.deep.equal([6, 7, 8]);
    expect(f.stats).to.include({ demandBatches: 1, demandChunks: 1, readaheadBatches: 1, readaheadChunks: 3 });
  });

  it('while a demand request is out, prefetch keeps only `beside` requests out, and the rest go, in order, once it is answered', async () => {
    const urgent = heldClient();
    const background = heldClient();
    const f = new Fetcher(urgent.client, background.client, () => 'lease-1');
    const page = f.demand({ kind: 'mem', index: 1 });
    const batches = [10, 20, 30, 40].map((index) => f.prefetch([{ kind: 'mem', index }], 2));
    await new Promise((r) => setImmediate(r));
    expect(urgent.calls.map((c) => c.indices)).to.deep.equal([[1]]);
    expect(background.calls.map((c) => c.indices), 'two beside the demand request').to.deep.equal([[10], [20]]);
    background.calls[0].answer();
    expect((await batches[0]).map((b) => b[0])).to.deep.equal([10]);
    await new Promise((r) => setImmediate(r));
    expect(background.calls.map((c) => c.indices), 'one answered, the next takes its place').to.deep.equal([[10], [20], [30]]);
    urgent.calls[0].answer();
    await page;
    await new Promise((r) => setImmediate(r));
    expect(background.calls.map((c) => c.indices), 'no demand out: the rest go').to.deep.equal([[10], [20], [30], [40]]);
    background.calls.slice(1).forEach((c) => c.answer());
    expect((await Promise.all(batches)).map((blobs) => blobs[0][0])).to.deep.equal([10, 20, 30, 40]);
  });

  it('measures a link whose answers come together over parallel connections by their bytes over the time they took', () => {
    // 8 requests of 25,000 bytes at a time over a 40 ms link of 2,500 bytes a millisecond,
    // their answers interleaved: all come about 120 ms after they went, within 1.4 ms.
    const m = new LinkMeter();
    m.answered(0, 41, 4136); // a demand read: the round trip
    for (let round = 0; round < 4; round++) {
      const t0 = 50 + round * 125;
      for (let k = 0; k < 8; k++) m.answered(t0, t0 + 118 + k * 0.2, 25_000);
    }
    expect(m.rttMs(), 'round trip').to.be.within(40, 42);
    // 800,000 bytes in about 4 × 78 ms of link time after the round trips: near the link's rate,
    // where each answer's own rate (25,000 bytes in 0.2 ms) would read fifty times too high.
    expect(m.rate()).to.be.within(1_500, 3_500);
    expect(m.figures()).to.include({ rttMs: m.rttMs() });
  });

  it("counts demand answers in the link's rate: a background stream sharing the link with faults does not read it as slower", () => {
    // A 40 ms link of 2,500 bytes a millisecond, busy throughout: every 10 ms a prefetch
    // answer of 20,000 bytes (queued since long before) and a fault's 5,000 bytes right behind.
    const m = new LinkMeter();
    m.answered(0, 41, 4136);
    for (let t = 100; t < 500; t += 10) {
      m.answered(t - 60, t, 20_000);
      m.answered(t - 40, t + 2, 5_000);
    }
    // The background alone would read 20,000 bytes every 10 ms: 2,000 a millisecond.
    expect(m.rate()).to.be.within(2_400, 2_600);
  });

  it('paces requests to a few milliseconds of the link, with enough in flight to cover a round trip and one more', () => {
    const chunk = 4096 + 40;
    const unpaced = pace(undefined, 40, chunk);
    expect(unpaced.depth, 'no rate measured yet: two at a time').to.equal(2);
    expect(unpaced.beside, 'one beside a demand request').to.equal(1);
    expect(unpaced.batch * chunk, 'of about 256 KiB').to.be.within(256 * 1024 - chunk, 256 * 1024 + chunk);
    for (const [mbit, rtt] of [[100, 20], [20, 40], [5, 80], [1000, 0.3], [2, 200]]) {
      const rate = (mbit * 1e6) / 8 / 1000; // bytes a millisecond
      const { batch, depth, beside } = pace(rate, rtt, chunk);
      const batchMs = (batch * chunk) / rate;
      expect(batch * chunk, `${mbit}/${rtt}: bytes a request`).to.be.within(8 * 1024 - chunk, 4 * 1024 * 1024);
      const wantMs = Math.max(PACE_MS, rtt / 6); // longer on a long round trip: at most 8 in flight
      if (batch * chunk > 8 * 1024 + chunk && batch * chunk < 4 * 1024 * 1024) expect(Math.abs(batchMs - wantMs), `${mbit}/${rtt}: a request's time on the link`).to.be.at.most(chunk / rate);
      expect(depth, `${mbit}/${rtt}`).to.be.within(2, 8);
      expect(depth * batchMs + chunk / rate, `${mbit}/${rtt}: requests in flight cover a round trip and one more`).to.be.at.least(rtt + batchMs);
      if (depth > 2 && depth < 8) expect((depth - 2) * batchMs, `${mbit}/${rtt}: no more than that`).to.be.below(rtt);
      expect(beside, `${mbit}/${rtt}: fewer beside a demand request`).to.be.within(1, depth - 1);
      if (beside > 1) expect((beside - 1) * batchMs, `${mbit}/${rtt}: beside a demand request, no more than cover the round trip`).to.be.below(rtt);
    }
    expect(pace(1e6, 0.1, chunk).batch * chunk, 'a fast link: requests of at most 4 MiB, not one every 5 ms').to.be.at.most(4 * 1024 * 1024);
    expect(pace(1e6, 0.1, chunk, 64).batch, 'a cap').to.equal(64);
    expect(pace(100, 40, 128 * 1024 + 40).batch, 'at least one chunk').to.equal(1);
  });
});
