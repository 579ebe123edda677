// Writes the TypeScript fuzz targets' seed corpora (fuzz/corpus/NAME/seed-N) from
// the formats' own encoders and the shipped policies. The files are committed; run
// this again when a format changes:  node --import tsx fuzz/ts/seeds.ts
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chunkKey, encryptChunk } from '../../common/chunk.js';
import { encodeChunkFrame } from '../../common/frames.js';
import { encodePages } from '../../common/wire.js';
import { signRequest } from '../../common/signing.js';
import { signKeyPair } from '../../common/crypto.js';
import { HDR_DEVICE, HDR_NONCE, HDR_SIGNATURE, HDR_TIMESTAMP } from '../../common/constants.js';
import { aeadSeal } from '../../native/index.js';
import { ADMIT_CLASS_KEY, ADMIT_COORD, ENVELOPE_COORD, ENVELOPE_KEY, NBD_EXPORT } from './targets.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

function u32(...vs: number[]): Buffer {
  const b = Buffer.alloc(4 * vs.length);
  vs.forEach((v, i) => b.writeUInt32BE(v >>> 0, 4 * i));
  return b;
}
const u16 = (v: number) => Buffer.from([v >> 8, v & 0xff]);
const u64 = (v: number) => Buffer.concat([u32(Math.floor(v / 2 ** 32)), u32(v % 2 ** 32)]);
const option = (opt: number, data: Buffer) => Buffer.concat([Buffer.from('IHAVEOPT', 'latin1'), u32(opt, data.length), data]);
const request = (type: number, offset: number, length: number, flags = 0) => Buffer.concat([u32(0x25609513), u16(flags), u16(type), u64(0x1234), u64(offset), u32(length)]);
const go = (name: string, infos: number[] = []) => Buffer.concat([u32(name.length), Buffer.from(name, 'latin1'), u16(infos.length), ...infos.map(u16)]);

const signer = signKeyPair();
const signed = (() => {
  const body = Buffer.from('{"leaseId":"lease-1","chunks":[]}');
  const h = signRequest(signer.secretKey, 'dev-0123', 'POST', '/v1/device/keys', body);
  return Buffer.from([h[HDR_DEVICE], h[HDR_TIMESTAMP], h[HDR_NONCE], h[HDR_SIGNATURE], 'POST', '/v1/device/keys', body.toString()].join('\n'), 'latin1');
})();

const SEEDS: Record<string, Buffer[]> = {
  'chunk-frames': [
    Buffer.concat([...encodeChunkFrame('mem', 0, Buffer.alloc(64, 1)), ...encodeChunkFrame('disk', 7, Buffer.alloc(32, 2))]),
    Buffer.concat(encodeChunkFrame('state', 2, null)),
    Buffer.alloc(0),
  ],
  trace: [Buffer.concat([Buffer.from([0]), encodePages(Uint32Array.from([0, 5, 4095, 17]))]), Buffer.from([0xff, 1, 0, 0, 0])],
  policy: fs.readdirSync(path.join(ROOT, 'policies')).filter((f) => f.endsWith('.yaml')).sort().map((f) => fs.readFileSync(path.join(ROOT, 'policies', f))),
  'hint-reader': [
    Buffer.from([7, ...Buffer.from('hello lethe-guestd 1\nok policy\nreport 1 begin\ns 100 4\nf 200 8\nreport 1 end sensitive=4 free=8 procs=2\ndropped files=3 pages=40\nerror no such cgroup\n', 'latin1')]),
    Buffer.from([30, ...Buffer.from('report 2 begin\ns 1 1\ns 3 2\nreport 2 end sensitive=3 free=0 procs=1\nreport 3 begin\nf 9 1\nreport 3 end sensitive=0 free=1 procs=0\n', 'latin1')]),
  ],
  'signed-request': [signed],
  'chunk-envelope': [encryptChunk(ENVELOPE_KEY, ENVELOPE_COORD, Buffer.alloc(256, 9)), encryptChunk(ENVELOPE_KEY, ENVELOPE_COORD, Buffer.alloc(0))],
  // op, key, nonce, |ad|, ad, message: a seal, a valid box to open, a keystream from block 2^32 − 2, a valid box's tag to check.
  aead: (() => {
    const key = Buffer.alloc(32, 5);
    const nonce = Buffer.alloc(24, 6);
    const ad = Buffer.from('lethe/v1/chunk');
    const m = Buffer.alloc(300, 7);
    const head = (op: number, a: Buffer) => Buffer.concat([Buffer.from([op]), key, nonce, Buffer.from([a.length]), a]);
    return [Buffer.concat([head(0, ad), m]), Buffer.concat([head(1, ad), aeadSeal(key, nonce, ad, m)]), Buffer.concat([head(2, Buffer.from([0xfe, 0xff, 0xff, 0xff])), m]), Buffer.concat([head(3, ad), aeadSeal(key, nonce, ad, m)])];
  })(),
  // A whole blob of a short chunk, one of a longer chunk, and one of an empty chunk, each as the table's class key makes it.
  'disk-admit': [300, 4096 + 17, 0].map((n) => encryptChunk(chunkKey(ADMIT_CLASS_KEY, ADMIT_COORD), ADMIT_COORD, Buffer.alloc(n, 3))),
  nbd: [
    // Fixed newstyle, no zeroes; structured replies; GO with block size info; a read, a write, a flush, a disconnect.
    Buffer.concat([u32(3), option(8, Buffer.alloc(0)), option(7, go(NBD_EXPORT, [3])), request(0, 0, 4096), request(1, 4096, 8), Buffer.alloc(8, 0xab), request(3, 0, 0), request(2, 0, 0)]),
    Buffer.concat([u32(3), option(3, Buffer.alloc(0)), option(6, go('')), option(2, Buffer.alloc(0))]),
    Buffer.concat([u32(1), option(1, Buffer.from(NBD_EXPORT, 'latin1')), request(0, 0, 512), request(6, 0, 4096, 1), request(4, 0, 4096)]),
  ],
};

for (const [name, seeds] of Object.entries(SEEDS)) {
  const dir = path.join(ROOT, 'fuzz', 'corpus', name);
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir, { recursive: true });
  seeds.forEach((s, i) => fs.writeFileSync(path.join(dir, `seed-${i + 1}`), s));
  console.log(`${name}: ${seeds.length} seeds in ${path.relative(ROOT, dir)}`);
}
