// The native disk-read table (native/disk-reads.cc) against the TypeScript chunk
// format: blobs made by encryptChunk, laid in a file as the cache's slot file lays them,
// read back through the table for ranges at any offset and across chunks, and refused
// whenever JavaScript would have to decide: no key, a forgotten chunk, a new image, a
// damaged piece.
import { expect } from 'chai';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { CHUNK_CT_AT, chunkKey, encryptChunk, type ChunkCoord } from '../../common/chunk.js';
import { DISK_CHUNK_SIZE } from '../../common/constants.js';
import { randomBytes } from '../../common/crypto.js';
import { NativeDiskReads } from '../../native/index.js';
import { expectSameBytes, rng } from '../helpers/bytes.js';
import { tmpDir } from '../helpers/proc.js';

const CHUNK = DISK_CHUNK_SIZE;
const SLOT = CHUNK + 4096; // a slot holds a blob (chunk + 41 bytes) on a page boundary, as the cache's
const IMAGE = Buffer.alloc(16, 9);
const GEN = 4;

/**
 * Holds every libuv pool thread in open(2) of a FIFO until the returned release(): work
 * queued meanwhile (an admission) runs only after, so what a test does first lands
 * before it, on any machine.
 */
async function holdPool(): Promise<() => Promise<void>> {
  const dir = tmpDir('lethe-pool-');
  const fifos = Array.from({ length: Number(process.env.UV_THREADPOOL_SIZE) || 4 }, (_, i) => path.join(dir, `hold-${i}`));
  for (const f of fifos) execFileSync('mkfifo', [f]);
  const held = fifos.map((f) => fs.promises.open(f, 'r'));
  return async () => {
    // O_RDWR never blocks on a FIFO (Linux), and lets each reader's open return.
    const writers = fifos.map((f) => fs.openSync(f, fs.constants.O_RDWR));
    for (const h of await Promise.all(held)) await h.close();
    for (const w of writers) fs.closeSync(w);
    fs.rmSync(dir, { recursive: true, force: true });
  };
}

describe('native disk reads', () => {
  const classKey = randomBytes(32);
  const coord = (index: number): ChunkCoord => ({ imageId: IMAGE, gen: GEN, kind: 'disk', index, cls: 'normal' });
  // Three chunks, the last one short, in slots 2, 0 and 5 of the file.
  const sizes = [CHUNK, CHUNK, CHUNK - 12_345];
  const slots = [2, 0, 5];
  const plain = Buffer.concat(sizes.map((n) => randomBytes(n)));
  let dir: string;
  let file: string;
  let fd: number;
  let t: NativeDiskReads;
  const blobs: Buffer[] = [];

  beforeEach(() => {
    dir = tmpDir('lethe-disk-reads-');
    file = path.join(dir, 'cache-disk.blobs');
    fd = fs.openSync(file, 'w+');
    blobs.length = 0;
    sizes.forEach((n, i) => {
      const blob = encryptChunk(chunkKey(classKey, coord(i)), coord(i), plain.subarray(i * CHUNK, i * CHUNK + n));
      fs.writeSync(fd, blob, 0, blob.length, slots[i] * SLOT);
      blobs.push(blob);
    });
    t = NativeDiskReads.forDiskChunks(fd, { maxChunks: 16 });
    t.image(IMAGE);
    expect(t.key(GEN, classKey)).to.equal(true);
    blobs.forEach((b, i) => t.put(i, GEN, slots[i] * SLOT + CHUNK_CT_AT, b));
  });

  afterEach(() => {
    t.close();
    fs.closeSync(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const read = (from: number, len: number): Buffer | undefined => {
    const out = Buffer.alloc(len, 0xaa);
    return t.read(from, out) ? out : undefined;
  };

  it('reads any range, across chunks and up to the short last one, as the chunk format decrypts it', () => {
    const next = rng(11);
    const cases: [number, number][] = [[0, 4096], [1, 1], [63, 2], [CHUNK - 10, 20], [0, plain.length], [plain.length - 1, 1], [CHUNK, CHUNK]];
    for (let i = 0; i < 300; i++) {
      const from = Math.floor(next() * plain.length);
      cases.push([from, 1 + Math.floor(next() * Math.min(300_000, plain.length - from))]);
    }
    for (const [from, len] of cases) {
      const out = read(from, len);
      expect(out, `bytes ${from}+${len} served`).to.not.equal(undefined);
      expectSameBytes(out!, plain.subarray(from, from + len), `bytes ${from}+${len}`);
    }
    expect(t.stats()).to.include({ chunks: 3, keys: 1, reads: cases.length, fallbacks: 0, mismatches: 0 });
  });

  it('refuses what it cannot serve: past the last chunk, an empty read, a chunk forgotten, no key, a new image', () => {
    expect(read(plain.length - 10, 11), 'past the end').to.equal(undefined);
    expect(read(0, 0), 'empty').to.equal(undefined);
    t.forget(1);
    expect(read(CHUNK - 100, 200), 'a range that reaches a forgotten chunk').to.equal(undefined);
    expect(read(0, 4096)).to.not.equal(undefined);
    t.zeroKeys();
    expect(t.stats().keys).to.equal(0);
    expect(read(0, 4096), 'no class key').to.equal(undefined);
    t.key(GEN, classKey);
    expect(read(0, 4096)).to.not.equal(undefined);
    t.image(Buffer.alloc(16, 1));
    expect(read(0, 4096), 'a new manifest forgets every chunk').to.equal(undefined);
    expect(t.stats()).to.include({ chunks: 0, fallbacks: 5 });
  });

  it('a class key for another generation does not read this one', () => {
    t.zeroKeys();
    t.key(GEN + 1, classKey);
    expect(read(0, 4096)).to.equal(undefined);
  });

  it('a damaged piece is never served: its chunk is forgotten and counted, other chunks still read', () => {
    // One byte of piece 3 of chunk 0's ciphertext changes in the file.
    const at = slots[0] * SLOT + CHUNK_CT_AT + 3 * 4096 + 100;
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, at);
    b[0] ^= 1;
    fs.writeSync(fd, b, 0, 1, at);
    expect(read(0, 4096), 'an untouched piece of the same chunk').to.not.equal(undefined);
    expect(read(3 * 4096 + 50, 100), 'the damaged piece').to.equal(undefined);
    expect(t.stats()).to.include({ mismatches: 1, chunks: 2 });
    expect(read(0, 4096), 'the chunk is forgotten').to.equal(undefined);
    expectSameBytes(read(CHUNK, 4096)!, plain.subarray(CHUNK, CHUNK + 4096));
  });

  it("a piece's tag is bound to its place and its blob: the short last piece changed, or one piece copied over another, is refused", () => {
    // Chunk 2 is 118,727 bytes: its last piece, 28, holds 4,039.
    const last = Math.floor((sizes[2] - 1) / 4096);
    const b = Buffer.alloc(1);
    const at2 = slots[2] * SLOT + CHUNK_CT_AT + sizes[2] - 1;
    fs.readSync(fd, b, 0, 1, at2);
    b[0] ^= 4;
    fs.writeSync(fd, b, 0, 1, at2);
    expect(read(2 * CHUNK + last * 4096 - 100, 50), 'the piece before it').to.not.equal(undefined);
    expect(read(2 * CHUNK + sizes[2] - 10, 10), 'the short last piece').to.equal(undefined);
    // Chunk 0: piece 1's ciphertext copied over piece 2's. Each is a piece the table
    // took a tag of, but not in that place.
    const piece = Buffer.alloc(4096);
    fs.readSync(fd, piece, 0, 4096, slots[0] * SLOT + CHUNK_CT_AT + 4096);
    fs.writeSync(fd, piece, 0, 4096, slots[0] * SLOT + CHUNK_CT_AT + 2 * 4096);
    expectSameBytes(read(4096, 4096)!, plain.subarray(4096, 8192), 'piece 1 where it was');
    expect(read(2 * 4096, 4096), 'piece 1 in piece 2\'s place').to.equal(undefined);
    expect(t.stats()).to.include({ mismatches: 2, chunks: 1 });
  });

  it("a whole-chunk read is checked by the chunk's tag: a changed tag is refused, and the chunk forgotten", () => {
    // The last byte of chunk 1's tag, which no piece tag covers.
    const at = slots[1] * SLOT + blobs[1].length - 1;
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, at);
    b[0] ^= 0x80;
    fs.writeSync(fd, b, 0, 1, at);
    expectSameBytes(read(CHUNK + 4096, 4096)!, plain.subarray(CHUNK + 4096, CHUNK + 8192), 'a piece read does not need the tag');
    expect(read(CHUNK, CHUNK), 'the whole chunk').to.equal(undefined);
    expect(t.stats()).to.include({ mismatches: 1, chunks: 2 });
    expectSameBytes(read(2 * CHUNK, sizes[2])!, plain.subarray(2 * CHUNK), 'the short last chunk, whole');
  });

  describe('a first read admitted on a pool thread', () => {
    const at = (i: number) => slots[i] * SLOT;
    const damage = (pos: number, bit: number) => {
      const b = Buffer.alloc(1);
      fs.readSync(fd, b, 0, 1, pos);
      b[0] ^= bit;
      fs.writeSync(fd, b, 0, 1, pos);
    };
    beforeEach(() => t.forgetAll());

    it('checks the blob in the file, decrypts the range asked for, and takes the chunk in for later reads', async () => {
      const cases: [number, number, number][] = [[0, 0, CHUNK], [1, 100, 4096], [2, sizes[2] - 1, 1], [0, 63, 0]];
      for (const [i, from, len] of cases) {
        t.forget(i);
        const out = Buffer.alloc(len, 0xaa);
        expect(await t.admit(i, GEN, at(i), blobs[i].length, from, out), `chunk ${i} admitted`).to.equal(true);
        expectSameBytes(out, plain.subarray(i * CHUNK + from, i * CHUNK + from + len), `chunk ${i} bytes ${from}+${len}`);
        expect(t.has(i, GEN)).to.equal(true);
        expectSameBytes(read(i * CHUNK, sizes[i])!, plain.subarray(i * CHUNK, i * CHUNK + sizes[i]), `chunk ${i} read from the table`);
      }
      expect(t.stats()).to.include({ admits: cases.length, refused: 0, mismatches: 0 });
    });

    it('refuses a blob that fails its check, without a class key, or for another generation: nothing taken in', async () => {
      damage(at(0) + CHUNK_CT_AT + 5000, 1);
      expect(await t.admit(0, GEN, at(0), blobs[0].length, 0, Buffer.alloc(10))).to.equal(false);
      damage(at(1), 0xff); // the format byte
      expect(await t.admit(1, GEN, at(1), blobs[1].length, 0, Buffer.alloc(0))).to.equal(false);
      expect(await t.admit(2, GEN, at(1), blobs[1].length, 0, Buffer.alloc(0)), "another chunk's blob").to.equal(false);
      expect(await t.admit(2, GEN, at(2), blobs[2].length - 1, 0, Buffer.alloc(0)), 'a length cut short').to.equal(false);
      expect(t.stats()).to.include({ refused: 4, admits: 0, chunks: 0 });
      expect(await t.admit(2, GEN + 1, at(2), blobs[2].length, 0, Buffer.alloc(0)), 'no key for that generation').to.equal(false);
      t.zeroKeys();
      expect(await t.admit(2, GEN, at(2), blobs[2].length, 0, Buffer.alloc(0)), 'no class key').to.equal(false);
      expect(t.stats()).to.include({ refused: 4, admits: 0, chunks: 0 });
      t.key(GEN, classKey);
      expect(await t.admit(2, GEN, at(2), blobs[2].length, 0, Buffer.alloc(0))).to.equal(true);
      expect(() => t.admit(0, GEN, at(0), blobs[0].length, CHUNK - 10, Buffer.alloc(11))).to.throw(TypeError);
    });

    /** admit() with what `meanwhile` does landing after the call and before the pool thread runs it. */
    async function admitAround(i: number, meanwhile: () => void, out = Buffer.alloc(0)): Promise<boolean> {
      const release = await holdPool();
      let admitted: Promise<boolean>;
      try {
        admitted = t.admit(i, GEN, at(i), blobs[i].length, 0, out);
        meanwhile();
      } finally {
        await release(); // whatever happened: a held pool would stall every test after this one
      }
      return admitted;
    }

    it('a chunk forgotten or a new image after its admission was asked for is not taken in', async () => {
      // The blob the pool thread reads may be one a write replaced since JavaScript looked up its slot.
      for (const [i, what, meanwhile] of [[0, 'a forget', () => t.forget(0)], [1, 'a new image', () => t.image(IMAGE)]] as const) {
        expect(await admitAround(i, meanwhile), `chunk ${i} admitted after ${what}`).to.equal(false);
        expect(t.has(i, GEN)).to.equal(false);
      }
      // The forget of another chunk spoils nothing.
      expect(await admitAround(0, () => t.forget(1))).to.equal(true);
      expect(t.stats()).to.include({ admits: 1, refused: 0 });
      // However the two interleave, a chunk forgotten after its admission was asked for is not in the table after.
      for (let round = 0; round < 30; round++) {
        const admitted = t.admit(2, GEN, at(2), blobs[2].length, 0, Buffer.alloc(0));
        t.forget(2);
        await admitted;
        expect(t.has(2, GEN), `round ${round}`).to.equal(false);
      }
    });

    it('the keys zeroed (the lease ended) or the table closed while an admission runs: nothing taken in, nothing served', async () => {
      expect(await admitAround(1, () => t.zeroKeys(), Buffer.alloc(4096)), 'keys zeroed').to.equal(false);
      expect(t.has(1, GEN)).to.equal(false);
      t.key(GEN, classKey);
      expect(await admitAround(2, () => t.close(), Buffer.alloc(100)), 'table closed').to.equal(false);
    });
  });

  describe('a chunk whose place the table was told, admitted by a read on its own thread (the read proxy\'s way)', () => {
    const at = (i: number) => slots[i] * SLOT;
    const damage = (pos: number) => {
      const b = Buffer.alloc(1);
      fs.readSync(fd, b, 0, 1, pos);
      b[0] ^= 0x40;
      fs.writeSync(fd, b, 0, 1, pos);
    };
    const readAdmit = (from: number, len: number): Buffer | undefined => {
      const out = Buffer.alloc(len, 0xaa);
      return t.read(from, out, { admit: true }) ? out : undefined;
    };
    beforeEach(() => {
      t.forgetAll();
      blobs.forEach((b, i) => expect(t.lies(i, GEN, at(i), b.length)).to.equal(true));
      expect(t.stats()).to.include({ chunks: 0, placed: 3 });
    });

    it('is read only with admit, then from the table: a whole chunk first, a short read after it', () => {
      expect(read(0, 4096), 'without admit').to.equal(undefined);
      expectSameBytes(readAdmit(0, CHUNK)!, plain.subarray(0, CHUNK), 'chunk 0 whole');
      expect(t.stats()).to.include({ admits: 1, placed: 2, chunks: 1 });
      expectSameBytes(read(5000, 3000)!, plain.subarray(5000, 8000), 'a short read of it, without admit');
      // A short read first (of chunk 2, the short last one), then one across chunks 1 and 2.
      expectSameBytes(readAdmit(2 * CHUNK + 10, 5000)!, plain.subarray(2 * CHUNK + 10, 2 * CHUNK + 5010), 'chunk 2, short');
      expectSameBytes(readAdmit(2 * CHUNK - 100, 300)!, plain.subarray(2 * CHUNK - 100, 2 * CHUNK + 200), 'across chunks 1 and 2');
      expect(t.stats()).to.include({ admits: 3, placed: 0, chunks: 3 });
    });

    for (const first of ['whole', 'short'] as const) {
      it(`an admission (${first} first read) takes its pieces' tags at once: a later piece read checks its piece alone, the whole chunk the blob's tag`, () => {
        expect(first === 'whole' ? readAdmit(CHUNK, CHUNK) : readAdmit(CHUNK + 100, 50)).to.not.equal(undefined);
        damage(at(1) + blobs[1].length - 1); // the tag, which no piece tag covers
        expectSameBytes(read(CHUNK + 9000, 100)!, plain.subarray(CHUNK + 9000, CHUNK + 9100), 'a piece read after the tag changed');
        expect(t.stats()).to.include({ mismatches: 0, chunks: 1 });
        expect(read(CHUNK, CHUNK), 'the whole chunk checks the tag').to.equal(undefined);
        expect(t.stats()).to.include({ mismatches: 1, chunks: 0 });
      });
    }

    it('a chunk whose blob changed after its admission is forgotten at the next read of the changed piece, and never served', () => {
      expect(readAdmit(CHUNK, 4096)).to.not.equal(undefined);
      damage(at(1) + CHUNK_CT_AT + 9000);
      expectSameBytes(read(CHUNK, 4096)!, plain.subarray(CHUNK, CHUNK + 4096), 'an untouched piece');
      expect(read(CHUNK + 8192, 100), 'the changed piece').to.equal(undefined);
      expect(t.has(1, GEN), 'forgotten').to.equal(false);
      expect(t.stats().mismatches).to.equal(1);
      expect(readAdmit(CHUNK + 8192, 100), 'its place went with it').to.equal(undefined);
      expect(t.lies(1, GEN, at(1), blobs[1].length)).to.equal(true);
      expect(readAdmit(CHUNK + 8192, 100), 'placed again: the tag check refuses the changed blob').to.equal(undefined);
      expect(t.stats()).to.include({ refused: 1, chunks: 0 });
    });

    it('a place is dropped by a forget, a new image, and a refused admission, which is not tried again', () => {
      t.forget(0);
      expect(readAdmit(0, 4096), 'forgotten').to.equal(undefined);
      damage(at(1) + CHUNK_CT_AT + 100);
      expect(readAdmit(CHUNK, 4096), 'damaged').to.equal(undefined);
      expect(t.stats()).to.include({ refused: 1, placed: 1 });
      expect(readAdmit(CHUNK, 4096)).to.equal(undefined);
      expect(t.stats()).to.include({ refused: 1, admits: 0 });
      t.image(IMAGE);
      expect(t.stats().placed).to.equal(0);
      expect(readAdmit(2 * CHUNK, 4096), 'a new image').to.equal(undefined);
      t.zeroKeys();
      expect(t.lies(2, GEN, at(2), blobs[2].length)).to.equal(true);
      expect(readAdmit(2 * CHUNK, 4096), 'no class key').to.equal(undefined);
      expect(t.stats()).to.include({ placed: 1, admits: 0 });
    });

    it('knows the places of at most 4 × maxChunks chunks', () => {
      const small = NativeDiskReads.forDiskChunks(fd, { maxChunks: 2 });
      try {
        small.image(IMAGE);
        for (let i = 0; i < 8; i++) expect(small.lies(i, GEN, 0, blobs[0].length)).to.equal(true);
        expect(small.lies(8, GEN, 0, blobs[0].length)).to.equal(false);
        expect(small.lies(3, GEN, 0, blobs[0].length), 'a place it knows, told again').to.equal(true);
      } finally {
        small.close();
      }
    });
  });

  it('checks its arguments in TypeScript and refuses a closed table', () => {
    expect(() => t.read(-1, Buffer.alloc(1))).to.throw(RangeError);
    expect(() => t.key(GEN, Buffer.alloc(31))).to.throw(RangeError);
    expect(() => t.put(-1, GEN, 0, blobs[0])).to.throw(TypeError);
    expect(() => t.image(Buffer.alloc(3))).to.throw(RangeError);
    expect(() => new NativeDiskReads(-1, { pieceKey: randomBytes(32), keyLabel: Buffer.alloc(1), adLabel: Buffer.alloc(1), kind: 1, cls: 1, chunkSize: CHUNK, maxChunks: 1 })).to.throw(TypeError);
    expect(() => new NativeDiskReads(fd, { pieceKey: randomBytes(32), keyLabel: Buffer.alloc(1), adLabel: Buffer.alloc(1), kind: 1, cls: 1, chunkSize: 1000, maxChunks: 1 })).to.throw(RangeError);
    t.close();
    expect(() => t.read(0, Buffer.alloc(1))).to.throw(/closed/);
    expect(t.stats().chunks).to.equal(0);
  });

  it('keeps at most maxChunks chunks', () => {
    const small = NativeDiskReads.forDiskChunks(fd, { maxChunks: 2 });
    try {
      small.image(IMAGE);
      small.key(GEN, classKey);
      blobs.forEach((b, i) => small.put(i, GEN, slots[i] * SLOT + CHUNK_CT_AT, b));
      expect(small.stats().chunks).to.equal(2);
    } finally {
      small.close();
    }
  });
});
