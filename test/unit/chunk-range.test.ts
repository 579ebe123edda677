// verifyChunk and decryptChunkRangeInto: the tag check without decryption, and
// decryption of any byte range of a checked blob, against libsodium's own
// XChaCha20-Poly1305 decryption of the same blobs.
import { expect } from 'chai';
import { CHUNK_CT_AT, chunkAd, chunkKey, decryptChunkInto, decryptChunkRangeInto, encryptChunk, sealId, verifyChunk, type ChunkCoord } from '../../common/chunk.js';
import { open, openPartInto, randomBytes, seal, verifyBoxed } from '../../common/crypto.js';
import { PIECE_BYTES, PieceDigests } from '../../agent/chunks/piece-digests.js';
import { expectSameBytes, rng } from '../helpers/bytes.js';

function coord(over: Partial<ChunkCoord> = {}): ChunkCoord {
  return { imageId: Buffer.alloc(16, 7), gen: 3, kind: 'disk', index: 41, cls: 'normal', ...over };
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

  it('decrypts a range from only the 4 KiB pieces that cover it, as from the whole blob', () => {
    const size = 131072 - 1000;
    const plain = randomBytes(size);
    const blob = encryptChunk(key, coord(), plain);
    const nonce = blob.subarray(1, CHUNK_CT_AT);
    const ct = blob.subarray(CHUNK_CT_AT, blob.length - 16);
    const next = rng(7);
    for (let i = 0; i < 300; i++) {
      const from = Math.floor(next() * size);
      const len = Math.floor(next() * Math.min(40_000, size - from + 1));
      const at = Math.floor(from / PIECE_BYTES) * PIECE_BYTES;
      const end = Math.min(Math.ceil((from + len) / PIECE_BYTES) * PIECE_BYTES, size);
      const out = Buffer.alloc(len, 0xaa);
      openPartInto(out, key, nonce, ct.subarray(at, Math.max(end, at)), at, from);
      expectSameBytes(out, plain.subarray(from, from + len), `bytes ${from}+${len}`);
    }
    // The part must cover the range and start on a 64-byte block.
    expect(() => openPartInto(Buffer.alloc(10), key, nonce, ct.subarray(4096, 8192), 4096, 4090)).to.throw(RangeError);
    expect(() => openPartInto(Buffer.alloc(10), key, nonce, ct.subarray(4096, 8192), 4096, 8190)).to.throw(RangeError);
    expect(() => openPartInto(Buffer.alloc(10), key, nonce, ct.subarray(4100, 8192), 4100, 4200)).to.throw(RangeError);
  });

  it("piece digests match a checked blob's pieces and no changed piece, and belong to one ciphertext hash", () => {
    const blob = encryptChunk(key, coord(), randomBytes(131072 - 100));
    const ct = blob.subarray(CHUNK_CT_AT, blob.length - 16);
    const d = new PieceDigests(2);
    d.put('c', 'hash-1', blob);
    const r = d.get('c', 'hash-1')!;
    expectSameBytes(d.nonce(r), blob.subarray(1, CHUNK_CT_AT));
    for (let p = 0; p * PIECE_BYTES < ct.length; p++) {
      const piece = ct.subarray(p * PIECE_BYTES, (p + 1) * PIECE_BYTES);
      expect(d.matches(r, p, piece), `piece ${p}`).to.equal(true);
      const bad = Buffer.from(piece);
      bad[p * 37 % bad.length] ^= 1;
      expect(d.matches(r, p, bad), `changed piece ${p}`).to.equal(false);
      expect(d.matches(r, (p + 1) % 32, piece), `piece ${p} in another place`).to.equal(false);
    }
    expect(d.matches(r, 32, ct.subarray(0, PIECE_BYTES)), 'a piece past the end').to.equal(false);
    expect(d.get('c', 'hash-2'), 'another ciphertext').to.equal(undefined);
    expect(d.get('c', 'hash-1'), 'a stale record is dropped').to.equal(undefined);
    // Bounded by chunks, least recently used out first.
    for (const id of ['a', 'b', 'c']) d.put(id, 'h', blob);
    d.get('b', 'h');
    d.put('e', 'h', blob);
    expect(d.size).to.equal(2);
    expect([d.get('a', 'h'), d.get('c', 'h')]).to.deep.equal([undefined, undefined]);
    expect(d.get('b', 'h')).to.not.equal(undefined);
  });

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

  it("names a blob by its seal id: the first 16 bytes of its nonce, then the tag libsodium's seal makes; a new seal of the same bytes, another name", () => {
    const plain = randomBytes(5000);
    const nonce = randomBytes(24);
    const blob = encryptChunk(key, coord(), plain, nonce);
    const boxed = seal(key, plain, chunkAd(coord()), nonce); // nonce ‖ ciphertext ‖ tag
    expectSameBytes(sealId(blob), Buffer.concat([nonce.subarray(0, 16), boxed.subarray(boxed.length - 16)]));
    expect(sealId(encryptChunk(key, coord(), plain)).equals(sealId(blob))).to.equal(false);
    expect(() => sealId(blob.subarray(0, 40))).to.throw(RangeError);
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
