// The shared test vectors (test/vectors/chunk-v1.json, written by
// scripts/gen-vectors.ts) against the TypeScript implementation. The documents
// they pin are docs/chunk-format.md, docs/escrow-protocol.md and docs/audit-log.md.
import fs from 'node:fs';
import { expect } from 'chai';
import sodium from 'sodium-native';
import { AUDIT_GENESIS_HASH, canonical, checkpointMessage, entryHash } from '../../common/audit-hash.js';
import { chunkAd, chunkKey, classKey, decryptChunkInto, encryptChunk, plaintextSize, type ChunkCoord } from '../../common/chunk.js';
import {
  AD_CHUNK,
  AD_VERSION_KEY,
  CHUNK_FORMAT_VERSION,
  CHUNK_KINDS,
  CHUNK_OVERHEAD,
  SENSITIVITY_CLASSES,
  type ChunkKind,
  type Sensitivity,
} from '../../common/constants.js';
import { b64u, keyedHash, openSealed, secureCopy, sha256, sign, verify, wipe } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';
import { signingMessage, verifyRequest } from '../../common/signing.js';
import { Escrow } from '../../server/escrow.js';

interface ChunkVector {
  name: string;
  imageId: string;
  gen: number;
  kind: ChunkKind;
  index: number;
  cls: Sensitivity;
  versionKey: string;
  classKey: string;
  chunkKey: string;
  ad: string;
  plaintext: string;
  nonce: string;
  blob: string;
  blobSha256: string;
}

interface Vectors {
  formatVersion: number;
  masterKey: string;
  imageId: string;
  keyWraps: { purpose: 'version' | 'dedup'; gen: number; key: string; ad: string; nonce: string; wrapped: string }[];
  chunks: ChunkVector[];
  dedup: { key: string; plaintext: string; hash: string };
  keyRelease: { boxPublicKey: string; boxSecretKey: string; chunks: string[]; keys: string; sealed: string };
  signing: {
    seed: string;
    publicKey: string;
    secretKey: string;
    cases: {
      method: string;
      path: string;
      deviceId: string;
      body: string;
      bodySha256: string;
      message: string;
      signature: string;
      headers: Record<string, string>;
    }[];
  };
  audit: {
    signSeed: string;
    signPublicKey: string;
    signSecretKey: string;
    genesis: string;
    entries: {
      seq: number;
      ts: string;
      type: string;
      device: string | null;
      data: unknown;
      prevHash: string;
      canonical: string;
      hash: string;
    }[];
    checkpoint: { seq: number; hash: string; message: string; signature: string };
  };
  manifest: { body: Record<string, unknown>; canonical: string; message: string; signature: string };
}

const V = JSON.parse(fs.readFileSync(new URL('../vectors/chunk-v1.json', import.meta.url), 'utf8')) as Vectors;
const hex = (s: string): Buffer => Buffer.from(s, 'hex');
const toHex = (b: Uint8Array): string => Buffer.from(b).toString('hex');

// sodium-native has these; common/sodium-native.d.ts declares only what Lethe calls.
const seeded = sodium as unknown as { crypto_sign_seed_keypair(pk: Buffer, sk: Buffer, seed: Buffer): void };

function coordOf(v: ChunkVector): ChunkCoord {
  return { imageId: hex(v.imageId), gen: v.gen, kind: v.kind, index: v.index, cls: v.cls };
}

/** The key a device would hold for `c`: derived from the class key (normal) or the version key (sensitive). */
function deviceKey(versionKey: Buffer, c: ChunkCoord): Buffer {
  if (c.cls === 'sensitive') return chunkKey(versionKey, c);
  const ck = classKey(versionKey);
  try {
    return chunkKey(ck, c);
  } finally {
    wipe(ck);
  }
}

/** Runs `fn` and returns the message of the TAMPERED error it must throw. */
function tamperedMessage(fn: () => void): string {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err, 'expected a TAMPERED error').to.be.instanceOf(LetheError);
  expect((err as LetheError).code).to.equal('TAMPERED');
  return (err as LetheError).message;
}

/** Coordinates that differ from `c` in exactly one field. */
function neighbours(c: ChunkCoord): { what: string; coord: ChunkCoord }[] {
  const flipped = Buffer.from(c.imageId);
  flipped[7] ^= 0x01;
  return [
    { what: 'index + 1', coord: { ...c, index: c.index + 1 } },
    ...(c.index > 0 ? [{ what: 'index - 1', coord: { ...c, index: c.index - 1 } }] : []),
    { what: 'gen + 1', coord: { ...c, gen: c.gen + 1 } },
    { what: 'gen - 1', coord: { ...c, gen: c.gen - 1 } },
    ...CHUNK_KINDS.filter((k) => k !== c.kind).map((k) => ({ what: `kind ${k}`, coord: { ...c, kind: k } })),
    ...SENSITIVITY_CLASSES.filter((s) => s !== c.cls).map((s) => ({ what: `class ${s}`, coord: { ...c, cls: s } })),
    { what: 'imageId with one bit flipped', coord: { ...c, imageId: flipped } },
  ];
}

describe('test vectors (test/vectors/chunk-v1.json)', () => {
  it('are for chunk format 1', () => {
    expect(V.formatVersion).to.equal(CHUNK_FORMAT_VERSION);
    expect(V.chunks.map((c) => `${c.kind}/${c.cls}`)).to.include.members(
      CHUNK_KINDS.flatMap((k) => SENSITIVITY_CLASSES.map((s) => `${k}/${s}`)),
    );
  });

  describe('version-key wrapping', () => {
    for (const w of V.keyWraps) {
      it(`unwraps the ${w.purpose} key of generation ${w.gen}`, () => {
        const ad = Buffer.concat([
          Buffer.from(`${AD_VERSION_KEY}${w.purpose}\0`, 'utf8'),
          hex(V.imageId),
          Buffer.from([w.gen >>> 24, (w.gen >>> 16) & 0xff, (w.gen >>> 8) & 0xff, w.gen & 0xff]),
        ]);
        expect(toHex(ad)).to.equal(w.ad);
        expect(w.wrapped.slice(0, 48)).to.equal(w.nonce);
        const escrow = new Escrow(secureCopy(hex(V.masterKey)));
        try {
          const imageId = hex(V.imageId);
          const key = w.purpose === 'version' ? escrow.versionKey(hex(w.wrapped), imageId, w.gen) : escrow.dedupKey(hex(w.wrapped), imageId);
          expect(toHex(key)).to.equal(w.key);
        } finally {
          escrow.close();
        }
      });
    }

    it('refuses a wrapped key presented for another generation', () => {
      const w = V.keyWraps.find((x) => x.purpose === 'version')!;
      const escrow = new Escrow(secureCopy(hex(V.masterKey)));
      try {
        tamperedMessage(() => escrow.versionKey(hex(w.wrapped), hex(V.imageId), w.gen + 1));
      } finally {
        escrow.close();
      }
    });
  });

  for (const v of V.chunks) {
    describe(`chunk ${v.name}`, () => {
      const c = coordOf(v);
      const versionKey = hex(v.versionKey);

      it('derives the class key and the chunk key', () => {
        const ck = classKey(versionKey);
        const key = chunkKey(v.cls === 'sensitive' ? versionKey : ck, c);
        try {
          expect(toHex(ck)).to.equal(v.classKey);
          expect(toHex(key)).to.equal(v.chunkKey);
        } finally {
          wipe(ck, key);
        }
      });

      if (v.cls === 'sensitive') {
        it('cannot be derived from the class key', () => {
          const ck = classKey(versionKey);
          const wrong = chunkKey(ck, c);
          try {
            expect(toHex(wrong)).to.not.equal(v.chunkKey);
          } finally {
            wipe(ck, wrong);
          }
        });
      }

      it('builds the additional data byte by byte', () => {
        const expected = Buffer.concat([
          Buffer.from(AD_CHUNK, 'utf8'),
          hex(v.imageId),
          Buffer.from(v.gen.toString(16).padStart(8, '0'), 'hex'),
          Buffer.from([{ disk: 1, mem: 2, state: 3 }[v.kind]]),
          Buffer.from(v.index.toString(16).padStart(16, '0'), 'hex'),
          Buffer.from([{ normal: 1, sensitive: 2 }[v.cls]]),
        ]);
        expect(toHex(expected)).to.equal(v.ad);
        expect(toHex(chunkAd(c))).to.equal(v.ad);
      });

      it('encrypts to the blob with the fixed nonce', () => {
        const blob = encryptChunk(hex(v.chunkKey), c, hex(v.plaintext), hex(v.nonce));
        expect(toHex(blob)).to.equal(v.blob);
        expect(blob[0]).to.equal(CHUNK_FORMAT_VERSION);
        expect(toHex(blob.subarray(1, 25))).to.equal(v.nonce);
        expect(blob.length).to.equal(hex(v.plaintext).length + CHUNK_OVERHEAD);
        expect(toHex(sha256(blob))).to.equal(v.blobSha256);
      });

      it('decrypts the blob to the plaintext', () => {
        const blob = hex(v.blob);
        expect(plaintextSize(blob)).to.equal(hex(v.plaintext).length);
        const out = Buffer.alloc(plaintextSize(blob));
        decryptChunkInto(out, hex(v.chunkKey), c, blob);
        expect(toHex(out)).to.equal(v.plaintext);
      });

      it('gets the same key from the escrow as a device derives', () => {
        const escrow = new Escrow(secureCopy(hex(V.masterKey)));
        const key = escrow.chunkKeyFor(versionKey, c);
        try {
          expect(toHex(key)).to.equal(v.chunkKey);
        } finally {
          wipe(key);
          escrow.close();
        }
      });

      it('refuses every single-byte change of the blob with one TAMPERED message', () => {
        const blob = hex(v.blob);
        const out = Buffer.alloc(plaintextSize(blob));
        const messages = new Set<string>();
        for (let i = 0; i < blob.length; i++) {
          const bad = Buffer.from(blob);
          bad[i] ^= 0x01;
          messages.add(tamperedMessage(() => decryptChunkInto(out, hex(v.chunkKey), c, bad)));
          expect(out.every((b) => b === 0), `plaintext left in the output after flipping byte ${i}`).to.equal(true);
        }
        messages.add(tamperedMessage(() => decryptChunkInto(out, hex(v.chunkKey), c, blob.subarray(0, blob.length - 1))));
        messages.add(tamperedMessage(() => decryptChunkInto(out, hex(v.chunkKey), c, Buffer.concat([blob, Buffer.alloc(1)]))));
        expect([...messages]).to.have.length(1);
      });

      for (const n of neighbours(c)) {
        it(`refuses the blob under other coordinates (${n.what})`, () => {
          const blob = hex(v.blob);
          const out = Buffer.alloc(plaintextSize(blob));
          // Same key, other AD: the AD binds the coordinates.
          tamperedMessage(() => decryptChunkInto(out, hex(v.chunkKey), n.coord, blob));
          // The key derived for those coordinates: the key binds them too.
          const other = deviceKey(versionKey, n.coord);
          try {
            expect(toHex(other)).to.not.equal(v.chunkKey);
            tamperedMessage(() => decryptChunkInto(out, other, n.coord, blob));
          } finally {
            wipe(other);
          }
        });
      }
    });
  }

  describe('dedup hash', () => {
    it('is BLAKE2b-256 keyed by the dedup key', () => {
      expect(toHex(keyedHash(hex(V.dedup.key), hex(V.dedup.plaintext)))).to.equal(V.dedup.hash);
    });
  });

  describe('key release', () => {
    const pair = () => ({ publicKey: hex(V.keyRelease.boxPublicKey), secretKey: secureCopy(hex(V.keyRelease.boxSecretKey)) });
    const keysInOrder = () =>
      Buffer.concat(V.keyRelease.chunks.map((name) => hex(V.chunks.find((c) => c.name === name)!.chunkKey)));

    it('opens to the chunk keys concatenated in request order', () => {
      const p = pair();
      const keys = openSealed(p, hex(V.keyRelease.sealed));
      try {
        expect(toHex(keys)).to.equal(V.keyRelease.keys);
        expect(toHex(keys)).to.equal(toHex(keysInOrder()));
      } finally {
        wipe(keys, p.secretKey);
      }
    });

    it('is what the escrow seals for the same request', () => {
      const p = pair();
      const escrow = new Escrow(secureCopy(hex(V.masterKey)));
      const released = V.keyRelease.chunks.map((name) => V.chunks.find((c) => c.name === name)!);
      const versionKeyOf = (gen: number) => hex(released.find((c) => c.gen === gen)!.versionKey);
      const keys = openSealed(p, escrow.sealedChunkKeys(released.map(coordOf), versionKeyOf, p.publicKey));
      try {
        expect(toHex(keys)).to.equal(V.keyRelease.keys);
      } finally {
        wipe(keys, p.secretKey);
        escrow.close();
      }
    });
  });

  describe('request signatures', () => {
    const pk = hex(V.signing.publicKey);

    it('derives the device key pair from the seed', () => {
      const publicKey = Buffer.alloc(32);
      const secretKey = Buffer.alloc(64);
      seeded.crypto_sign_seed_keypair(publicKey, secretKey, hex(V.signing.seed));
      expect(toHex(publicKey)).to.equal(V.signing.publicKey);
      expect(toHex(secretKey)).to.equal(V.signing.secretKey);
    });

    for (const s of V.signing.cases) {
      describe(`${s.method} ${s.path}`, () => {
        const h = {
          deviceId: s.headers['x-lethe-device'],
          ts: s.headers['x-lethe-timestamp'],
          nonce: s.headers['x-lethe-nonce'],
          signature: s.headers['x-lethe-signature'],
        };
        const body = Buffer.from(s.body, 'utf8');

        it('builds the signing message', () => {
          const m = signingMessage(s.method, s.path, h.deviceId, h.ts, h.nonce, body);
          expect(m.toString('utf8')).to.equal(s.message);
          expect(s.message.split('\n')).to.deep.equal(['LETHE-REQ-V1', s.method, s.path, s.deviceId, h.ts, h.nonce, s.bodySha256]);
          expect(toHex(sha256(body))).to.equal(s.bodySha256);
        });

        it('signs it to the recorded signature', () => {
          expect(b64u.encode(sign(hex(V.signing.secretKey), Buffer.from(s.message, 'utf8')))).to.equal(s.signature);
          expect(h.signature).to.equal(s.signature);
          expect(verifyRequest(pk, h, s.method, s.path, body)).to.equal(true);
        });

        it('fails verification when any signed field changes', () => {
          expect(verifyRequest(pk, h, s.method === 'GET' ? 'POST' : 'GET', s.path, body)).to.equal(false);
          expect(verifyRequest(pk, h, s.method, s.path + '?x=1', body)).to.equal(false);
          expect(verifyRequest(pk, { ...h, deviceId: 'dev-ffffffffffffffff' }, s.method, s.path, body)).to.equal(false);
          expect(verifyRequest(pk, { ...h, ts: String(Number(h.ts) + 1) }, s.method, s.path, body)).to.equal(false);
          expect(verifyRequest(pk, { ...h, nonce: h.nonce.slice(1) }, s.method, s.path, body)).to.equal(false);
          expect(verifyRequest(pk, h, s.method, s.path, Buffer.concat([body, Buffer.from(' ')]))).to.equal(false);
        });
      });
    }
  });

  describe('audit chain', () => {
    it('starts from the genesis hash', () => {
      expect(V.audit.genesis).to.equal(AUDIT_GENESIS_HASH);
      expect(V.audit.entries[0].prevHash).to.equal(AUDIT_GENESIS_HASH);
    });

    for (const e of V.audit.entries) {
      it(`reproduces entry ${e.seq} (${e.type})`, () => {
        const entry = { seq: e.seq, ts: e.ts, type: e.type, device: e.device, data: e.data };
        expect(canonical(entry)).to.equal(e.canonical);
        expect(entryHash(e.prevHash, entry)).to.equal(e.hash);
        expect(sha256(hex(e.prevHash), Buffer.from(e.canonical, 'utf8')).toString('hex')).to.equal(e.hash);
      });
    }

    it('links each entry to the one before it', () => {
      for (let i = 1; i < V.audit.entries.length; i++) {
        expect(V.audit.entries[i].prevHash).to.equal(V.audit.entries[i - 1].hash);
      }
    });

    it('changes the hash when any field of an entry changes', () => {
      const e = V.audit.entries[2];
      const entry = { seq: e.seq, ts: e.ts, type: e.type, device: e.device, data: e.data };
      for (const changed of [
        { ...entry, seq: entry.seq + 1 },
        { ...entry, ts: '2026-01-01T00:01:00.001Z' },
        { ...entry, type: 'chunks.serve' },
        { ...entry, device: null },
        { ...entry, data: { ...(entry.data as object), count: 4 } },
      ]) {
        expect(entryHash(e.prevHash, changed)).to.not.equal(e.hash);
      }
    });

    it('signs the checkpoint message', () => {
      const cp = V.audit.checkpoint;
      const last = V.audit.entries[V.audit.entries.length - 1];
      expect(cp.hash).to.equal(last.hash);
      const m = checkpointMessage(cp.seq, cp.hash);
      expect(m.toString('utf8')).to.equal(cp.message);
      expect(cp.message).to.equal(`LETHE-AUDIT-CHECKPOINT-V1\n${cp.seq}\n${cp.hash}`);
      expect(b64u.encode(sign(hex(V.audit.signSecretKey), m))).to.equal(cp.signature);
      expect(verify(hex(V.audit.signPublicKey), m, b64u.decode(cp.signature))).to.equal(true);
    });
  });

  describe('manifest signature', () => {
    it('signs "LETHE-MANIFEST-V1\\n" and the hex SHA-256 of the canonical body', () => {
      const m = V.manifest;
      expect(canonical(m.body)).to.equal(m.canonical);
      expect(m.message).to.equal(`LETHE-MANIFEST-V1\n${sha256(m.canonical).toString('hex')}`);
      expect(b64u.encode(sign(hex(V.audit.signSecretKey), Buffer.from(m.message, 'utf8')))).to.equal(m.signature);
      expect(verify(hex(V.audit.signPublicKey), Buffer.from(m.message, 'utf8'), b64u.decode(m.signature))).to.equal(true);
    });

    it('lists each chunk as [index, gen, class, base64url SHA-256 of its blob]', () => {
      const listed = V.manifest.body.chunks as Record<ChunkKind, [number, number, Sensitivity, string][]>;
      for (const kind of CHUNK_KINDS) {
        for (const [index, gen, cls, digest] of listed[kind]) {
          const v = V.chunks.find((c) => c.kind === kind && c.index === index)!;
          expect([gen, cls, digest]).to.deep.equal([v.gen, v.cls, b64u.encode(hex(v.blobSha256))]);
        }
      }
    });
  });
});
