// Writes test/vectors/chunk-v1.json: fixed inputs run through the project's own
// chunk, escrow, signing and audit code (docs/chunk-format.md,
// docs/escrow-protocol.md, docs/audit-log.md).
//
//   node --import tsx scripts/gen-vectors.ts [OUT]
//
// Every input is fixed, so a second run writes the same file, except the
// key-release sealed box: crypto_box_seal uses a fresh ephemeral key each
// time, so that one value changes (any sealed box that opens is valid).
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import sodium from 'sodium-native';
import { AUDIT_GENESIS_HASH, canonical, checkpointMessage, entryHash, type AuditEntry } from '../common/audit-hash.js';
import { chunkAd, chunkKey, classKey, encryptChunk, type ChunkCoord } from '../common/chunk.js';
import { CHUNK_FORMAT_VERSION, CHUNK_SIZE, MANIFEST_CONTEXT, type ChunkKind, type Sensitivity } from '../common/constants.js';
import { b64u, keyedHash, seal, sha256, sign, wipe } from '../common/crypto.js';
import { signingMessage } from '../common/signing.js';
import { Escrow } from '../server/escrow.js';

// sodium-native has these; common/sodium-native.d.ts declares only what Lethe calls.
const seeded = sodium as unknown as {
  crypto_sign_seed_keypair(pk: Buffer, sk: Buffer, seed: Buffer): void;
  crypto_box_seed_keypair(pk: Buffer, sk: Buffer, seed: Buffer): void;
};

const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');
/** A fixed, documented byte string: the first `n` bytes of SHA-256 of a label. */
const fixed = (label: string, n = 32): Buffer => sha256(label).subarray(0, n);

function signPair(seed: Buffer) {
  const publicKey = Buffer.alloc(32);
  const secretKey = Buffer.alloc(64);
  seeded.crypto_sign_seed_keypair(publicKey, secretKey, seed);
  return { publicKey, secretKey };
}

function boxPair(seed: Buffer) {
  const publicKey = Buffer.alloc(32);
  const secretKey = Buffer.alloc(32);
  seeded.crypto_box_seed_keypair(publicKey, secretKey, seed);
  return { publicKey, secretKey };
}

/** Escrow's wrapping AD (private there; the vector pins it). */
function wrapAd(escrow: Escrow, imageId: Buffer, gen: number, purpose: string): Buffer {
  return (escrow as unknown as { wrapAd(i: Buffer, g: number, p: string): Buffer }).wrapAd(imageId, gen, purpose);
}

const imageId = Buffer.from('LETHE-vectors-01', 'ascii');
const masterKey = fixed('lethe test vector master key');
const versionKeys = new Map([1, 2, 3].map((g) => [g, fixed(`lethe test vector version key ${g}`)]));
const escrow = new Escrow(Buffer.from(masterKey));

const wraps = [
  ...[1, 2, 3].map((gen) => ({ purpose: 'version' as const, gen, key: versionKeys.get(gen)! })),
  { purpose: 'dedup' as const, gen: 0, key: fixed('lethe test vector dedup key') },
].map(({ purpose, gen, key }) => {
  const ad = wrapAd(escrow, imageId, gen, purpose);
  const nonce = fixed(`lethe test vector wrap nonce ${purpose} ${gen}`, 24);
  return { purpose, gen, key: hex(key), ad: hex(ad), nonce: hex(nonce), wrapped: hex(seal(masterKey, key, ad, nonce)) };
});

const specs: { name: string; kind: ChunkKind; cls: Sensitivity; gen: number; index: number; text: string }[] = [
  { name: 'disk-normal', kind: 'disk', cls: 'normal', gen: 1, index: 0, text: 'lethe disk chunk, normal class' },
  { name: 'disk-sensitive', kind: 'disk', cls: 'sensitive', gen: 3, index: 258, text: 'lethe disk chunk, sensitive class' },
  { name: 'mem-normal', kind: 'mem', cls: 'normal', gen: 2, index: 70000, text: 'lethe mem chunk, normal class' },
  { name: 'mem-sensitive', kind: 'mem', cls: 'sensitive', gen: 3, index: 1, text: 'lethe mem chunk, sensitive class' },
  { name: 'state-normal', kind: 'state', cls: 'normal', gen: 3, index: 0, text: 'lethe state chunk, normal class' },
  { name: 'state-sensitive', kind: 'state', cls: 'sensitive', gen: 2, index: 5, text: 'lethe state chunk, sensitive class' },
  // Exercises the high half of the u64 index; not part of the manifest vector.
  { name: 'disk-normal-index-above-2^32', kind: 'disk', cls: 'normal', gen: 3, index: 2 ** 32 + 258, text: 'high index' },
];

const chunks = specs.map((s) => {
  const coord: ChunkCoord = { imageId, gen: s.gen, kind: s.kind, index: s.index, cls: s.cls };
  const versionKey = versionKeys.get(s.gen)!;
  const ck = classKey(versionKey);
  const key = chunkKey(s.cls === 'sensitive' ? versionKey : ck, coord);
  const plaintext = Buffer.from(s.text, 'utf8');
  const nonce = fixed(`lethe test vector chunk nonce ${s.name}`, 24);
  const blob = encryptChunk(key, coord, plaintext, nonce);
  const escrowKey = escrow.chunkKeyFor(versionKey, coord);
  if (!escrowKey.equals(key)) throw new Error(`escrow derives another key for ${s.name}`);
  const v = {
    name: s.name,
    imageId: hex(imageId),
    gen: s.gen,
    kind: s.kind,
    index: s.index,
    cls: s.cls,
    versionKey: hex(versionKey),
    classKey: hex(ck),
    chunkKey: hex(key),
    ad: hex(chunkAd(coord)),
    plaintext: hex(plaintext),
    nonce: hex(nonce),
    blob: hex(blob),
    blobSha256: hex(sha256(blob)),
  };
  wipe(ck, key, escrowKey);
  return v;
});

const dedupKey = fixed('lethe test vector dedup key');
const dedupPlain = Buffer.from('lethe disk chunk, normal class', 'utf8');
const dedup = { key: hex(dedupKey), plaintext: hex(dedupPlain), hash: hex(keyedHash(dedupKey, dedupPlain)) };

// Key release: the chunk keys of these vectors, in this order, in one sealed box.
const released = ['mem-sensitive', 'disk-normal', 'state-sensitive'];
const box = boxPair(fixed('lethe test vector device box seed'));
const releasedChunks = released.map((name) => chunks.find((x) => x.name === name)!);
const sealed = escrow.sealedChunkKeys(
  releasedChunks.map((c) => ({ imageId, gen: c.gen, kind: c.kind, index: c.index, cls: c.cls })),
  (gen) => Buffer.from(releasedChunks.find((c) => c.gen === gen)!.versionKey, 'hex'),
  box.publicKey,
);
const keyRelease = {
  boxSeed: hex(fixed('lethe test vector device box seed')),
  boxPublicKey: hex(box.publicKey),
  boxSecretKey: hex(box.secretKey),
  chunks: released,
  keys: hex(Buffer.concat(released.map((n) => Buffer.from(chunks.find((x) => x.name === n)!.chunkKey, 'hex')))),
  sealed: hex(sealed),
};

const device = signPair(fixed('lethe test vector device signing seed'));
const deviceId = 'dev-0123456789abcdef';
const signingCases = [
  {
    method: 'POST',
    path: '/v1/device/keys',
    ts: '1767225600000',
    nonce: b64u.encode(fixed('lethe test vector request nonce 1', 16)),
    body: JSON.stringify({ leaseId: 'lease-0011223344556677', chunks: [{ kind: 'mem', index: 1 }] }),
  },
  {
    method: 'GET',
    path: '/v1/device/leases/lease-0011223344556677/manifest',
    ts: '1767225601234',
    nonce: b64u.encode(fixed('lethe test vector request nonce 2', 16)),
    body: '',
  },
].map((c) => {
  const body = Buffer.from(c.body, 'utf8');
  const message = signingMessage(c.method, c.path, deviceId, c.ts, c.nonce, body);
  const signature = sign(device.secretKey, message);
  return {
    method: c.method,
    path: c.path,
    deviceId,
    body: c.body,
    bodySha256: hex(sha256(body)),
    message: message.toString('utf8'),
    signature: b64u.encode(signature),
    headers: { 'x-lethe-device': deviceId, 'x-lethe-timestamp': c.ts, 'x-lethe-nonce': c.nonce, 'x-lethe-signature': b64u.encode(signature) },
  };
});
const signing = {
  seed: hex(fixed('lethe test vector device signing seed')),
  publicKey: hex(device.publicKey),
  secretKey: hex(device.secretKey),
  cases: signingCases,
};

const server = signPair(fixed('lethe test vector server signing seed'));
const auditEntries: AuditEntry[] = [
  { seq: 1, ts: '2026-01-01T00:00:00.000Z', type: 'server.init', device: null, data: { fingerprint: 'ab'.repeat(32) } },
  { seq: 2, ts: '2026-01-01T00:00:05.250Z', type: 'enroll', device: deviceId, data: { name: 'Zoë’s laptop' } },
  {
    seq: 3,
    ts: '2026-01-01T00:01:00.000Z',
    type: 'keys.release',
    device: deviceId,
    // Keys deliberately out of order: canonical() sorts them.
    data: {
      lease: 'lease-0011223344556677',
      image: 'vectors',
      version: 3,
      count: 3,
      sensitive: 2,
      chunks: { mem: [[1, 1]], disk: [[0, 0]], state: [[5, 5]] },
    },
  },
];
let prev = AUDIT_GENESIS_HASH;
const auditOut = auditEntries.map((e) => {
  const hash = entryHash(prev, e);
  const out = { ...e, prevHash: prev, canonical: canonical({ seq: e.seq, ts: e.ts, type: e.type, device: e.device, data: e.data }), hash };
  prev = hash;
  return out;
});
const cpMessage = checkpointMessage(3, prev);
const audit = {
  signSeed: hex(fixed('lethe test vector server signing seed')),
  signPublicKey: hex(server.publicKey),
  signSecretKey: hex(server.secretKey),
  genesis: AUDIT_GENESIS_HASH,
  entries: auditOut,
  checkpoint: { seq: 3, hash: prev, message: cpMessage.toString('utf8'), signature: b64u.encode(sign(server.secretKey, cpMessage)) },
};

// The manifest of version 3 of image "vectors", as server/images.ts builds and signs it.
const inManifest = chunks.filter((c) => c.index < 2 ** 32);
const manifestChunks: Record<ChunkKind, [number, number, Sensitivity, string][]> = { disk: [], mem: [], state: [] };
for (const c of [...inManifest].sort((a, b) => a.index - b.index)) {
  manifestChunks[c.kind].push([c.index, c.gen, c.cls, b64u.encode(Buffer.from(c.blobSha256, 'hex'))]);
}
const manifestBody = {
  format: 1,
  image: 'vectors',
  imageId: hex(imageId),
  version: 3,
  sizes: { disk: 259 * CHUNK_SIZE.disk, mem: 70001 * CHUNK_SIZE.mem, state: 6 * CHUNK_SIZE.state },
  chunkSizes: CHUNK_SIZE,
  chunks: manifestChunks,
};
const manifestCanonical = canonical(manifestBody);
const manifestMessage = Buffer.from(`${MANIFEST_CONTEXT}\n${sha256(manifestCanonical).toString('hex')}`, 'utf8');
const manifest = {
  body: manifestBody,
  canonical: manifestCanonical,
  message: manifestMessage.toString('utf8'),
  signature: b64u.encode(sign(server.secretKey, manifestMessage)),
};

const vectors = {
  description:
    'Lethe test vectors (docs/chunk-format.md, docs/escrow-protocol.md, docs/audit-log.md). ' +
    'Byte strings are lowercase hex unless a field says base64url. Plaintexts are short: the envelope does not depend on size. ' +
    'Generated by scripts/gen-vectors.ts.',
  formatVersion: CHUNK_FORMAT_VERSION,
  masterKey: hex(masterKey),
  imageId: hex(imageId),
  keyWraps: wraps,
  chunks,
  dedup,
  keyRelease,
  signing,
  audit,
  manifest,
};

escrow.close();
const here = path.dirname(fileURLToPath(import.meta.url));
const out = process.argv[2] ?? path.join(here, '..', 'test', 'vectors', 'chunk-v1.json');
fs.mkdirSync(path.dirname(out), { recursive: true });
fs.writeFileSync(out, JSON.stringify(vectors, null, 2) + '\n');
console.log(`wrote ${path.relative(process.cwd(), out)}`);
