// The native chunk cipher (native/aead.cc) against libsodium through sodium-native,
// the format's reference: every length around the block and Poly1305 edges, a tag
// that any changed byte breaks, the keystream from any block (also past the 32-bit
// counter, where OpenSSL's code must not be used), and the libsodium fallback.
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import sodium from 'sodium-native';
import { randomBytes } from '../../common/crypto.js';
import { aeadBackend, aeadOpen, aeadPieceTags, aeadSeal, aeadStream, aeadVerify } from '../../native/index.js';
import { expectSameBytes } from '../helpers/bytes.js';

/** Piece tags as the format defines them, from libsodium's XChaCha20 and Poly1305. */
function pieceTags(key: Buffer, nonce: Buffer, first: number, m: Buffer): Buffer {
  const tags: Buffer[] = [];
  for (let i = 0; i * 4096 < m.length; i++) {
    const block = Buffer.alloc(64);
    sodium.crypto_stream_xchacha20_xor_ic(block, Buffer.alloc(64), nonce, first + i, key);
    const tag = Buffer.alloc(16);
    sodium.crypto_onetimeauth(tag, m.subarray(i * 4096, (i + 1) * 4096), block.subarray(0, 32));
    tags.push(tag);
  }
  return Buffer.concat(tags);
}

function reference(key: Buffer, nonce: Buffer, ad: Buffer, m: Buffer): Buffer {
  const out = Buffer.alloc(m.length + 16);
  sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(out, m, ad, null, nonce, key);
  return out;
}

describe('native chunk cipher (native/aead.cc)', () => {
  it("uses the OpenSSL code of Node's own OpenSSL 3 when it agrees with libsodium", function () {
    // Node 20 and 22 carry OpenSSL 3.0 and export ChaCha20_ctr32 and Poly1305_*. If this
    // fails, the self-test or the lookup fell back: correct, but at half the speed. The
    // self-test also fails when a call leaves key material in its locked State.
    if (!process.versions.openssl.startsWith('3.')) this.skip();
    expect(aeadBackend()).to.equal('openssl');
  });

  it('seals and opens exactly as libsodium at every length from 0 to 300 and past the Poly1305 and block edges', () => {
    const lens = [...Array.from({ length: 301 }, (_, i) => i), 1023, 1024, 1025, 4095, 4096, 4097, 65536, 65536 + 17, 262144];
    for (const len of lens) {
      const key = randomBytes(32);
      const nonce = randomBytes(24);
      const ad = randomBytes(len % 70);
      const m = randomBytes(len);
      const want = reference(key, nonce, ad, m);
      const got = aeadSeal(key, nonce, ad, m);
      expectSameBytes(got, want, `sealed, ${len} bytes, ${ad.length} bytes of ad`);
      const back = aeadOpen(key, nonce, ad, want);
      expect(back, `opened, ${len} bytes`).to.not.equal(null);
      expectSameBytes(back!, m, `plaintext, ${len} bytes`);
      expect(aeadVerify(key, nonce, ad, want), `checked, ${len} bytes`).to.equal(true);
    }
  });

  it('refuses a box when any byte of the ciphertext, tag, associated data, nonce or key differs', () => {
    const key = randomBytes(32);
    const nonce = randomBytes(24);
    const ad = randomBytes(29);
    const m = randomBytes(200);
    const boxed = reference(key, nonce, ad, m);
    for (let i = 0; i < boxed.length; i++) {
      const bad = Buffer.from(boxed);
      bad[i] ^= 1 << (i % 8);
      expect(aeadOpen(key, nonce, ad, bad), `byte ${i} of the box changed`).to.equal(null);
      expect(aeadVerify(key, nonce, ad, bad), `byte ${i} of the box changed, checked alone`).to.equal(false);
    }
    for (let i = 0; i < ad.length; i++) {
      const bad = Buffer.from(ad);
      bad[i] ^= 0x80;
      expect(aeadOpen(key, nonce, bad, boxed), `byte ${i} of the ad changed`).to.equal(null);
      expect(aeadVerify(key, nonce, bad, boxed), `byte ${i} of the ad changed, checked alone`).to.equal(false);
    }
    for (let i = 0; i < 24; i++) {
      const bad = Buffer.from(nonce);
      bad[i] ^= 4;
      expect(aeadOpen(key, bad, ad, boxed), `byte ${i} of the nonce changed`).to.equal(null);
      expect(aeadVerify(key, bad, ad, boxed), `byte ${i} of the nonce changed, checked alone`).to.equal(false);
    }
    const otherKey = Buffer.from(key);
    otherKey[31] ^= 1;
    expect(aeadOpen(otherKey, nonce, ad, boxed)).to.equal(null);
    expect(aeadVerify(otherKey, nonce, ad, boxed)).to.equal(false);
    expect(aeadVerify(key, nonce, ad, boxed)).to.equal(true);
    expect(aeadOpen(key, nonce, ad, boxed.subarray(0, boxed.length - 1)), 'a box cut short').to.equal(null);
    expect(aeadOpen(key, nonce, Buffer.alloc(0), reference(key, nonce, Buffer.alloc(0), Buffer.alloc(0)))!.length).to.equal(0);
  });

  it('gives the XChaCha20 keystream from any block, also across the block where a 32-bit counter would wrap', () => {
    const key = randomBytes(32);
    const nonce = randomBytes(24);
    for (const [ic, len] of [[0, 64], [1, 4096], [7, 100], [1000, 65536], [2 ** 32 - 2, 64], [2 ** 32 - 2, 128], [2 ** 32 - 2, 192], [2 ** 32 - 1, 64], [2 ** 32 - 1, 65]]) {
      const m = randomBytes(len);
      const want = Buffer.alloc(len);
      sodium.crypto_stream_xchacha20_xor_ic(want, m, nonce, ic, key);
      expectSameBytes(aeadStream(key, nonce, ic, m), want, `from block ${ic}, ${len} bytes`);
    }
  });

  it("tags each 4 KiB piece under its own one-time Poly1305 key, as libsodium computes it, and any changed byte changes its piece's tag alone", () => {
    const key = randomBytes(32);
    const nonce = randomBytes(24);
    for (const [first, len] of [[0, 0], [0, 1], [0, 4095], [0, 4096], [0, 4097], [3, 131072], [31, 4096 + 17], [2 ** 32 - 2, 8192], [2 ** 32 - 1, 4096]]) {
      const m = randomBytes(len);
      const tags = aeadPieceTags(key, nonce, first, m);
      expect(tags.length, `${len} bytes`).to.equal(Math.ceil(len / 4096) * 16);
      expectSameBytes(tags, pieceTags(key, nonce, first, m), `from piece ${first}, ${len} bytes`);
    }
    const m = randomBytes(5 * 4096);
    const tags = aeadPieceTags(key, nonce, 0, m);
    for (const at of [0, 4095, 4096, 3 * 4096 + 7, m.length - 1]) {
      const bad = Buffer.from(m);
      bad[at] ^= 0x10;
      const got = aeadPieceTags(key, nonce, 0, bad);
      for (let p = 0; p < 5; p++) {
        const same = got.subarray(p * 16, p * 16 + 16).equals(tags.subarray(p * 16, p * 16 + 16));
        expect(same, `byte ${at} changed: piece ${p}'s tag`).to.equal(p !== Math.floor(at / 4096));
      }
    }
    // Another piece number, nonce or key gives other tags for the same bytes.
    const piece = m.subarray(0, 4096);
    const one = aeadPieceTags(key, nonce, 0, piece);
    expect(aeadPieceTags(key, nonce, 1, piece).equals(one)).to.equal(false);
    expect(aeadPieceTags(key, randomBytes(24), 0, piece).equals(one)).to.equal(false);
    expect(aeadPieceTags(randomBytes(32), nonce, 0, piece).equals(one)).to.equal(false);
  });

  it('falls back to libsodium under LETHE_AEAD=libsodium, and both open what the other sealed', () => {
    const key = randomBytes(32);
    const nonce = randomBytes(24);
    const ad = Buffer.from('lethe/test');
    const m = randomBytes(70_001);
    const script = `
      import { aeadBackend, aeadOpen, aeadPieceTags, aeadSeal, aeadVerify } from './native/index.ts';
      let input = '';
      for await (const part of process.stdin) input += part;
      const [key, nonce, ad, m, theirs] = JSON.parse(input).map((h) => Buffer.from(h, 'hex'));
      const opened = aeadOpen(key, nonce, ad, theirs);
      const bad = Buffer.from(theirs);
      bad[bad.length - 1] ^= 1;
      const checks = [aeadVerify(key, nonce, ad, theirs), aeadVerify(key, nonce, ad, bad)];
      const pieces = aeadPieceTags(key, nonce, 5, m).toString('hex');
      process.stdout.write(JSON.stringify({ backend: aeadBackend(), sealed: aeadSeal(key, nonce, ad, m).toString('hex'), opened: opened && opened.toString('hex'), checks, pieces }));`;
    const ours = aeadSeal(key, nonce, ad, m);
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
      input: JSON.stringify([key, nonce, ad, m, ours].map((b) => b.toString('hex'))),
      env: { ...process.env, LETHE_AEAD: 'libsodium' },
      encoding: 'utf8',
      maxBuffer: 1 << 24,
    });
    expect(r.status, r.stderr).to.equal(0);
    const out = JSON.parse(r.stdout) as { backend: string; sealed: string; opened: string | null; checks: boolean[]; pieces: string };
    expect(out.backend).to.equal('libsodium');
    expect(out.checks, 'libsodium checked the tag alone: the box, then the box with its tag changed').to.deep.equal([true, false]);
    expect(out.opened, 'libsodium opened what this process sealed').to.equal(m.toString('hex'));
    expectSameBytes(Buffer.from(out.sealed, 'hex'), ours, 'both sealed the same bytes');
    expectSameBytes(Buffer.from(out.pieces, 'hex'), aeadPieceTags(key, nonce, 5, m), 'both tagged the same pieces');
    expectSameBytes(aeadOpen(key, nonce, ad, Buffer.from(out.sealed, 'hex'))!, m, 'this process opened what libsodium sealed');
  });

  it('refuses a wrong key or nonce length at the call', () => {
    expect(() => aeadSeal(randomBytes(31), randomBytes(24), Buffer.alloc(0), Buffer.alloc(1))).to.throw(TypeError);
    expect(() => aeadOpen(randomBytes(32), randomBytes(23), Buffer.alloc(0), Buffer.alloc(16))).to.throw(TypeError);
    expect(() => aeadOpen(randomBytes(32), randomBytes(24), Buffer.alloc(0), Buffer.alloc(15))).to.throw(RangeError);
    expect(() => aeadStream(randomBytes(32), randomBytes(24), -1, Buffer.alloc(1))).to.throw(RangeError);
  });
});
