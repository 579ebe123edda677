// The packed manifest (format 2, common/manifest.ts) and the chunk map's entries over it.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import { ChunkEntries } from '../../agent/chunks/chunk-entries.js';
import { readManifest } from '../../agent/chunks/chunk-map.js';
import { canonical } from '../../common/audit-hash.js';
import { CHUNK_SIZE, MANIFEST_CONTEXT, type ChunkKind } from '../../common/constants.js';
import { b64u, sha256, sign, signKeyPair } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';
import { decodeManifest, encodeManifest, encodeRecords, findChunk, isPackedManifest, packRecords, packRows, type ChunkRowOf } from '../../common/manifest.js';

const server = signKeyPair();
const head = { format: 2, image: 'desk', imageId: 'ab'.repeat(16), version: 7, sizes: { disk: 64 * CHUNK_SIZE.disk, mem: 1 << 20, state: 1000 }, chunkSizes: { ...CHUNK_SIZE } };
const row = (idx: number, gen = 3, cls: 'normal' | 'sensitive' = 'normal'): ChunkRowOf => ({ idx, gen, cls, sha: randomBytes(32) });
const rows = { disk: [row(0), row(5, 7, 'sensitive'), row(63)], mem: [row(2, 1, 'sensitive')], state: [] } as Record<ChunkKind, ChunkRowOf[]>;
const tampered = (f: () => unknown) => expect(f).to.throw(LetheError).with.property('code', 'TAMPERED');

describe('the packed manifest (format 2)', () => {
  it('reads back what it was made of, after its signature is checked', () => {
    const buf = encodeManifest(head, rows, server.secretKey);
    expect(isPackedManifest(buf)).to.equal(true);
    const m = decodeManifest(buf, server.publicKey);
    expect(m.head).to.deep.equal(head);
    for (const kind of ['disk', 'mem', 'state'] as ChunkKind[]) {
      const l = m.chunks[kind];
      expect(l.count).to.equal(rows[kind].length);
      rows[kind].forEach((r, i) => {
        expect([l.idx[i], l.gen[i], l.cls[i]]).to.deep.equal([r.idx, r.gen, r.cls === 'normal' ? 1 : 2]);
        expect(l.sha.subarray(32 * i, 32 * i + 32).equals(r.sha)).to.equal(true);
      });
    }
    expect([0, 5, 63, 1, 64].map((i) => findChunk(m.chunks.disk, i))).to.deep.equal([0, 1, 2, -1, -1]);
  });

  it('a changed byte anywhere, another key, or a format-1 signature is refused as TAMPERED', () => {
    const buf = encodeManifest(head, rows, server.secretKey);
    for (const at of [5, 20, buf.length - 100, buf.length - 70, buf.length - 1]) {
      const bad = Buffer.from(buf);
      bad[at] ^= 1;
      tampered(() => decodeManifest(bad, server.publicKey));
    }
    tampered(() => decodeManifest(buf, signKeyPair().publicKey));
    // The same body signed as format 1 signs its JSON: "LETHE-MANIFEST-V1\n" + the hex SHA-256, without the "2\n".
    const body = buf.subarray(0, buf.length - 64);
    const v1 = Buffer.concat([body, sign(server.secretKey, Buffer.from(`${MANIFEST_CONTEXT}\n${sha256(body).toString('hex')}`))]);
    tampered(() => decodeManifest(v1, server.publicKey));
  });

  it('a manifest the server signed that does not hold together is refused, not read; a chunk past the end is left out', () => {
    const signed = (body: Buffer) => Buffer.concat([body, sign(server.secretKey, Buffer.from(`${MANIFEST_CONTEXT}\n2\n${sha256(body).toString('hex')}`))]);
    const bodyOf = (b: Buffer) => Buffer.from(b.subarray(0, b.length - 64));
    const withHeader = (h: unknown) => {
      const json = Buffer.from(JSON.stringify(h));
      const len = Buffer.alloc(4);
      len.writeUInt32BE(json.length);
      return signed(Buffer.concat([Buffer.from('LMF2'), len, json]));
    };
    const counts = { disk: 0, mem: 0, state: 0 };
    expect(decodeManifest(withHeader({ ...head, counts }), server.publicKey).chunks.disk.count, 'a well-formed empty one reads').to.equal(0);
    // Records out of order: the server does not make them (encodeRecords refuses), so swap two of a signed body's.
    const ordered = bodyOf(encodeManifest(head, { ...rows, disk: [row(0), row(5)] }, server.secretKey));
    const first = ordered.length - 3 * 41;
    const swapped = Buffer.concat([ordered.subarray(0, first), ordered.subarray(first + 41, first + 82), ordered.subarray(first, first + 41), ordered.subarray(first + 82)]);
    tampered(() => decodeManifest(signed(swapped), server.publicKey));
    tampered(() => decodeManifest(withHeader({ ...head, counts: { ...counts, disk: 1 } }), server.publicKey)); // a record promised, none there
    tampered(() => decodeManifest(withHeader({ ...head }), server.publicKey)); // no counts
    tampered(() => decodeManifest(withHeader({ ...head, counts, sizes: { ...head.sizes, disk: 'all' } }), server.publicKey));
    tampered(() => decodeManifest(signed(Buffer.concat([Buffer.from('LMF2'), Buffer.from([0, 0, 0, 3]), Buffer.from('{"a')])), server.publicKey));
    tampered(() => decodeManifest(signed(Buffer.concat([bodyOf(withHeader({ ...head, counts })), Buffer.from([0])])), server.publicKey)); // bytes after the records
    const bad = { ...rows, disk: [{ ...row(1), cls: 'secret' as 'normal' }] };
    expect(() => encodeManifest(head, bad, server.secretKey)).to.throw();
    // Records a database packed are checked before they are signed.
    const none = { disk: [], mem: [], state: [] };
    const [ra, rb] = [row(0), row(5)];
    const [a, b] = [packRecords('disk', [ra]), packRecords('disk', [rb])];
    expect(() => encodeRecords(head, { ...none, disk: [Buffer.concat([b, a])] }, server.secretKey)).to.throw(/not ascending/);
    expect(() => encodeRecords(head, { ...none, disk: [Buffer.concat([a, b.subarray(1)])] }, server.secretKey)).to.throw(/whole number/);
    const noClass = Buffer.from(a);
    noClass[8] = 0;
    expect(() => encodeRecords(head, { ...none, disk: [noClass] }, server.secretKey)).to.throw(/class code 0/);
    expect(() => encodeRecords(head, { ...none, disk: [b, a] }, server.secretKey), 'runs that do not follow each other').to.throw(/not ascending/);
    const same = encodeRecords(head, { ...none, disk: [a, b] }, server.secretKey);
    expect(same.equals(encodeManifest(head, { disk: [ra, rb], mem: [], state: [] }, server.secretKey)), 'the same bytes as from rows').to.equal(true);
    const body = bodyOf(encodeManifest(head, rows, server.secretKey));
    body[body.length - 4 * 41 + 8] = 9; // the first disk record's class
    tampered(() => decodeManifest(signed(body), server.publicKey));
    tampered(() => decodeManifest(Buffer.from('{"format":1}'), server.publicKey));
    // Past the end of the disk (64 chunks): never read, so left out rather than refused.
    const past = decodeManifest(encodeManifest(head, { ...rows, disk: [row(3), row(64), row(70)] }, server.secretKey), server.publicKey).chunks.disk;
    expect([past.count, [...past.idx]]).to.deep.equal([1, [3]]);
  });

  it("a server's format-1 JSON manifest reads as the same entries", () => {
    const json = {
      ...head,
      format: 1,
      chunks: Object.fromEntries((['disk', 'mem', 'state'] as ChunkKind[]).map((k) => [k, rows[k].map((r) => [r.idx, r.gen, r.cls, b64u.encode(r.sha)])])) as never,
    };
    const signed = { ...json, signature: b64u.encode(sign(server.secretKey, Buffer.from(`${MANIFEST_CONTEXT}\n${sha256(canonical(json)).toString('hex')}`))) };
    const a = readManifest(signed, server.publicKey);
    const b = readManifest(encodeManifest(head, rows, server.secretKey), server.publicKey);
    expect(a.chunks).to.deep.equal(b.chunks);
    tampered(() => readManifest({ ...signed, version: 8 }, server.publicKey));
    expect(() => packRows([[0, 3, 'normal', 'short']])).to.throw(LetheError);
  });
});

describe("the chunk map's entries over a packed list", () => {
  const list = packRows([
    [4, 3, 'normal', b64u.encode(randomBytes(32))],
    [1, 3, 'sensitive', b64u.encode(randomBytes(32))],
    [9, 2, 'normal', b64u.encode(randomBytes(32))],
  ]);

  it("reads the manifest's entries, with this device's set and deleted ones over them", () => {
    const e = new ChunkEntries(list);
    expect(e.get(1)).to.deep.include({ gen: 3, cls: 'sensitive' });
    expect(e.get(1)!.ctHash).to.equal(list.sha.toString('base64url', 0, 32));
    expect(e.get(2)).to.equal(undefined);
    expect([...e.keys()]).to.deep.equal([1, 4, 9]);
    const mine = { gen: 5, cls: 'normal' as const, ctHash: 'x' };
    e.set(4, mine).set(7, { ...mine });
    expect(e.get(4), 'the same object: a check-in renames it in place').to.equal(mine);
    expect(e.delete(9)).to.equal(true);
    expect(e.delete(8)).to.equal(false);
    expect(e.get(9)).to.equal(undefined);
    expect([...e.keys()]).to.deep.equal([1, 4, 7]);
    expect([...e].map(([i, x]) => [i, x.gen])).to.deep.equal([[1, 3], [4, 5], [7, 5]]);
    e.delete(7);
    expect([...e.keys()]).to.deep.equal([1, 4]);
    e.clear();
    expect([...e.keys()]).to.deep.equal([]);
    expect(e.get(1)).to.equal(undefined);
  });
});
