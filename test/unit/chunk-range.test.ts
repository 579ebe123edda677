// verifyChunk and decryptChunkRangeInto: the tag check without decryption, and
// decryption of any byte range of a checked blob, against libsodium's own
// XChaCha20-Poly1305 decryption of the same blobs.
import { expect } from 'chai';
import { chunkKey, decryptChunkInto, decryptChunkRangeInto, encryptChunk, verifyChunk, type ChunkCoord } from '../../common/chunk.js';
import { open, randomBytes, seal, verifyBoxed } from '../../common/crypto.js';
import { expectSameBytes } from '../helpers/bytes.js';

function coord(over: Partial<ChunkCoord> = {}): ChunkCoord {
  return { imageId: Buffer.alloc(16, 7), gen: 3, kind: 'disk', index: 41, cls: 'normal', ...over };
}

/** A deterministic generator, so a failure names a case that can be rerun. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

describe('chunk range decryption', () => {
  const key = chunkKey(randomBytes(32), coord());

  for (const size of [1, 63, 64, 65, 4096, 131072]) {
    it(`decrypts every probed range of a ${size}-byte chunk as the whole-chunk decryption does`, () => {
      const plain = randomBytes(size);
      const blob = encryptChunk(key, coord(), plain);
      expect(verifyChunk(key, coord(), blob)).to.equal(true);
      const whole = Buffer.alloc(size);
      decryptChunkInto(whole, key, coord(), blob);
      expectSameBytes(whole, plain);
      const next = rng(size);
      const cases: [number, number][] = [[0, size], [size - 1, 1], [0, 0]];
      for (let i = 0; i < 200; i++) {
        const from = Math.floor(next() * size);
        cases.push([from, Math.floor(next() * (size - from + 1))]);
      }
      for (const [from, len] of cases) {
        const out = Buffer.alloc(len, 0xaa);
        decryptChunkRangeInto(out, key, blob, from);
        expectSameBytes(out, plain.subarray(from, from + len), `bytes ${from}+${len}`);
      }
    });
  }

  it('refuses a range outside the chunk', () => {
    const blob = encryptChunk(key, coord(), randomBytes(4096));
    expect(() => decryptChunkRangeInto(Buffer.alloc(2), key, blob, 4095)).to.throw(RangeError);
    expect(() => decryptChunkRangeInto(Buffer.alloc(1), key, blob, -1)).to.throw(RangeError);
  });

  it('fails the check on every single-byte change of the blob', () => {
    const blob = encryptChunk(key, coord(), randomBytes(300));
    for (let i = 0; i < blob.length; i++) {
      const bad = Buffer.from(blob);
      bad[i] ^= 0x01;
      expect(verifyChunk(key, coord(), bad), `byte ${i}`).to.equal(false);
    }
  });

  it('fails the check under another key, other coordinates, or a cut blob', () => {
    const blob = encryptChunk(key, coord(), randomBytes(4096));
    expect(verifyChunk(chunkKey(randomBytes(32), coord()), coord(), blob)).to.equal(false);
    for (const other of [{ gen: 4 }, { index: 42 }, { kind: 'mem' as const }, { cls: 'sensitive' as const }, { imageId: Buffer.alloc(16, 8) }]) {
      expect(verifyChunk(key, coord(other), blob), JSON.stringify(Object.keys(other))).to.equal(false);
    }
    expect(verifyChunk(key, coord(), blob.subarray(0, blob.length - 1))).to.equal(false);
    expect(verifyChunk(key, coord(), blob.subarray(0, 10))).to.equal(false);
    expect(verifyChunk(key, coord(), Buffer.alloc(0))).to.equal(false);
  });

  it('agrees with libsodium for every length of additional data and message mod 16', () => {
    const k = randomBytes(32);
    for (let adLen = 0; adLen < 34; adLen++) {
      for (const msgLen of [0, 1, 15, 16, 17, 31, 33, 64, 65]) {
        const ad = randomBytes(adLen);
        const boxed = seal(k, randomBytes(msgLen), ad);
        expect(verifyBoxed(k, boxed, ad), `ad ${adLen}, message ${msgLen}`).to.equal(true);
        const bad = Buffer.from(boxed);
        bad[bad.length - 1] ^= 0x80;
        expect(verifyBoxed(k, bad, ad)).to.equal(false);
        expect(() => open(k, bad, ad)).to.throw();
      }
    }
  });
});
