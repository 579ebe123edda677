// The chunk cipher in native code (native/aead.cc) on whole disk chunks: seal and open.
//   node --import tsx bench/aead.ts [--seconds 1] [--rounds 3]
// Yardstick, in the same run: libsodium's XChaCha20-Poly1305 through sodium-native on
// the same chunk, into a buffer allocated once (the native call allocates its output,
// so the ratio is if anything low). Run it with LETHE_AEAD=libsodium to see the native
// path on libsodium's code.
import { parseArgs } from 'node:util';
import sodium from 'sodium-native';
import { DISK_CHUNK_SIZE } from '../common/constants.js';
import { randomBytes } from '../common/crypto.js';
import { aeadBackend, aeadOpen, aeadSeal } from '../native/index.js';

const { values } = parseArgs({ options: { seconds: { type: 'string', default: '1' }, rounds: { type: 'string', default: '3' } } });
const SECONDS = Number(values.seconds);
const ROUNDS = Number(values.rounds);

/** MB/s of `op` on one chunk, called for about SECONDS. */
function rate(op: () => void): number {
  let n = 0;
  const start = process.hrtime.bigint();
  let ns = 0;
  while (ns < SECONDS * 1e9) {
    for (let i = 0; i < 16; i++) op();
    n += 16;
    ns = Number(process.hrtime.bigint() - start);
  }
  return (n * DISK_CHUNK_SIZE) / 1e6 / (ns / 1e9);
}

const key = randomBytes(32);
const nonce = randomBytes(24);
const ad = randomBytes(46); // a chunk's: label ‖ coordinate ‖ class
const plain = randomBytes(DISK_CHUNK_SIZE);
const boxed = Buffer.alloc(DISK_CHUNK_SIZE + 16);
sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(boxed, plain, ad, null, nonce, key);
const out = Buffer.alloc(DISK_CHUNK_SIZE);

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1];
const rows: [string, number[], number[]][] = [
  ['seal', [], []],
  ['open', [], []],
];
for (let r = 0; r < ROUNDS; r++) {
  rows[0][1].push(rate(() => aeadSeal(key, nonce, ad, plain)));
  rows[0][2].push(rate(() => sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(boxed, plain, ad, null, nonce, key)));
  rows[1][1].push(rate(() => aeadOpen(key, nonce, ad, boxed)));
  rows[1][2].push(rate(() => sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(out, null, boxed, ad, nonce, key)));
}
console.log(`XChaCha20-Poly1305 on ${DISK_CHUNK_SIZE / 1024} KiB chunks, one core, medians of ${ROUNDS} alternating rounds of ${SECONDS} s`);
console.log(`native (native/aead.cc) runs: ${aeadBackend()}; yardstick: libsodium through sodium-native`);
for (const [name, native, lib] of rows) {
  console.log(`${name}  native ${median(native).toFixed(0)} MB/s  libsodium ${median(lib).toFixed(0)} MB/s  ×${(median(native) / median(lib)).toFixed(2)}`);
}
