// A version's manifest as a device receives it (format 2): the signed list of its
// stored chunks, each with its generation, class and the SHA-256 of its blob, packed
// in fixed-size records instead of JSON. A disk of 128 GiB lists a million chunks:
// as JSON that was 70 MB to parse, and several seconds of canonical JSON to check the
// signature on the agent and to make it on the server (docs/chunk-format.md, "Packed manifest").
//
//   "LMF2" | u32 header length | header (JSON: image, imageId, version, sizes, chunkSizes, counts)
//   | records, disk then mem then state, each kind in index order:
//       u32 index | u32 generation | u8 class (CLASS_CODE) | 32 bytes SHA-256 of the blob
//   | 64-byte Ed25519 signature of "LETHE-MANIFEST-V1\n2\n" + hex SHA-256 of everything before it
//
// The format-1 JSON manifest (admin pulls, older agents) is signed over
// "LETHE-MANIFEST-V1\n" + hex SHA-256 of its canonical JSON: the "2\n" keeps the two apart.
import { CHUNK_KINDS, CHUNK_SIZE, CLASS_CODE, MANIFEST_CONTEXT, type ChunkKind, type Sensitivity } from './constants.js';
import { b64u, sha256, sign, verify } from './crypto.js';
import { LetheError } from './errors.js';

const MAGIC = Buffer.from('LMF2');
const RECORD = 4 + 4 + 1 + 32;
const SIGNATURE = 64;
const HEADER_MAX = 64 * 1024;

/** What a manifest says besides its chunks. */
export interface ManifestHead {
  format: number;
  image: string;
  imageId: string;
  version: number;
  sizes: Record<ChunkKind, number>;
  chunkSizes: Record<ChunkKind, number>;
}

/** One kind's stored chunks, packed: record i is index idx[i] (ascending), generation gen[i], class cls[i] (CLASS_CODE) and blob SHA-256 sha[32i, 32i + 32). */
export interface ChunkList {
  count: number;
  idx: Uint32Array;
  gen: Uint32Array;
  cls: Uint8Array;
  sha: Buffer;
}

export interface PackedManifest {
  head: ManifestHead;
  chunks: Record<ChunkKind, ChunkList>;
}

/** A chunk as the server's rows and the format-1 manifest list it: index, generation, class, blob SHA-256. */
export type ChunkRowOf = { idx: number; gen: number; cls: Sensitivity; sha: Buffer };

const CLASS_OF: Record<number, Sensitivity> = Object.fromEntries(Object.entries(CLASS_CODE).map(([c, n]) => [n, c as Sensitivity]));

export const classOfCode = (code: number): Sensitivity => CLASS_OF[code];

const message = (body: Buffer) => Buffer.from(`${MANIFEST_CONTEXT}\n2\n${sha256(body).toString('hex')}`);

/** The bytes of one record (u32 index, u32 generation, u8 class, 32-byte SHA-256): what packRecords makes and a server's database may make itself. */
export const MANIFEST_RECORD = RECORD;

/** One kind's chunks as format-2 records, in the order given. */
export function packRecords(kind: ChunkKind, rows: readonly ChunkRowOf[]): Buffer {
  const out = Buffer.alloc(rows.length * RECORD);
  let at = 0;
  for (const r of rows) {
    if (r.sha.length !== 32 || !CLASS_CODE[r.cls]) throw new Error(`${kind} chunk ${r.idx}: a SHA-256 of ${r.sha.length} bytes, class ${r.cls}`);
    out.writeUInt32BE(r.idx, at);
    out.writeUInt32BE(r.gen, at + 4);
    out[at + 8] = CLASS_CODE[r.cls];
    r.sha.copy(out, at + 9);
    at += RECORD;
  }
  return out;
}

/** The signed format-2 manifest of `head` and its chunks, each kind's in index order. */
export function encodeManifest(head: ManifestHead, rows: Record<ChunkKind, ChunkRowOf[]>, signingKey: Uint8Array): Buffer {
  return encodeRecords(head, Object.fromEntries(CHUNK_KINDS.map((k) => [k, [packRecords(k, rows[k])]])) as Record<ChunkKind, Buffer[]>, signingKey);
}

/**
 * Checks one run of a kind's records, packed, that follows index `after` (-1 for the
 * first) and returns its last index. Refuses what could not be read back: a length not
 * a whole number of records, an unknown class, indexes not ascending.
 */
export function checkRecords(kind: ChunkKind, r: Buffer, after: number): number {
  if (r.length % RECORD !== 0) throw new Error(`${kind} records: ${r.length} bytes is not a whole number of ${RECORD}-byte records`);
  let last = after;
  for (let at = 0; at < r.length; at += RECORD) {
    const idx = r[at] * 0x1000000 + ((r[at + 1] << 16) | (r[at + 2] << 8) | r[at + 3]);
    const cls = r[at + 8];
    if (cls !== CLASS_CODE.normal && cls !== CLASS_CODE.sensitive) throw new Error(`${kind} chunk ${idx}: class code ${cls}`);
    if (idx <= last) throw new Error(`${kind} chunk ${idx}: indexes not ascending`);
    last = idx;
  }
  return last;
}

/**
 * The signed format-2 manifest of `head` and each kind's records, already packed
 * (packRecords, or a database's own query), in runs that follow each other; each run
 * is checked (checkRecords) as it is copied in.
 */
export function encodeRecords(head: ManifestHead, records: Record<ChunkKind, readonly Buffer[]>, signingKey: Uint8Array): Buffer {
  const bytes = (k: ChunkKind) => records[k].reduce((n, r) => n + r.length, 0);
  const header = Buffer.from(JSON.stringify({ ...head, format: 2, counts: Object.fromEntries(CHUNK_KINDS.map((k) => [k, Math.floor(bytes(k) / RECORD)])) }));
  const n = CHUNK_KINDS.reduce((s, k) => s + bytes(k), 0);
  const out = Buffer.allocUnsafe(MAGIC.length + 4 + header.length + n + SIGNATURE);
  MAGIC.copy(out, 0);
  out.writeUInt32BE(header.length, 4);
  let at = 8 + header.copy(out, 8);
  for (const k of CHUNK_KINDS) {
    let last = -1;
    for (const r of records[k]) {
      last = checkRecords(k, r, last);
      at += r.copy(out, at);
    }
  }
  sign(signingKey, message(out.subarray(0, at))).copy(out, at);
  return out;
}

/**
 * Checks a format-2 manifest's signature under the server's key, then reads it.
 * Throws TAMPERED for a bad signature, and for one that is signed but does not
 * hold together (a header without its fields, records out of order, a class unknown,
 * bytes after the records). A record past the end of its stream is left out.
 */
export function decodeManifest(buf: Buffer, serverSignPublicKey: Uint8Array): PackedManifest {
  const bad = (why: string) => new LetheError('TAMPERED', `the server's manifest is malformed: ${why}`);
  if (buf.length < 8 + SIGNATURE || !buf.subarray(0, 4).equals(MAGIC)) throw bad('not a format-2 manifest');
  const body = buf.subarray(0, buf.length - SIGNATURE);
  if (!verify(serverSignPublicKey, message(body), buf.subarray(body.length))) {
    throw new LetheError('TAMPERED', 'the manifest has a bad signature');
  }
  const hlen = buf.readUInt32BE(4);
  if (hlen > HEADER_MAX || 8 + hlen > body.length) throw bad('header length');
  let h: ManifestHead & { counts: Record<ChunkKind, number> };
  try {
    h = JSON.parse(body.toString('utf8', 8, 8 + hlen));
  } catch {
    throw bad('header');
  }
  const whole = (n: unknown): n is number => Number.isSafeInteger(n) && (n as number) >= 0;
  if (typeof h?.imageId !== 'string' || !whole(h.version) || !CHUNK_KINDS.every((k) => whole(h.sizes?.[k]) && whole(h.counts?.[k]))) throw bad('header fields');
  let at = 8 + hlen;
  const chunks = {} as Record<ChunkKind, ChunkList>;
  for (const k of CHUNK_KINDS) {
    const count = h.counts[k];
    if (at + count * RECORD > body.length) throw bad(`${k} count`);
    const list: ChunkList = { count, idx: new Uint32Array(count), gen: new Uint32Array(count), cls: new Uint8Array(count), sha: Buffer.alloc(32 * count) };
    const limit = Math.ceil(h.sizes[k] / CHUNK_SIZE[k]);
    let n = 0;
    for (let i = 0; i < count; i++, at += RECORD) {
      const idx = body.readUInt32BE(at);
      if (i > 0 && idx <= body.readUInt32BE(at - RECORD)) throw bad(`${k} chunk ${idx} out of order`);
      if (!CLASS_OF[body[at + 8]]) throw bad(`${k} chunk ${idx} has an unknown class ${body[at + 8]}`);
      // A chunk past the end of its stream is never read (a state row a larger state left staged, which older servers committed): left out.
      if (idx >= limit) continue;
      list.idx[n] = idx;
      list.gen[n] = body.readUInt32BE(at + 4);
      list.cls[n] = body[at + 8];
      body.copy(list.sha, 32 * n, at + 9, at + RECORD);
      n++;
    }
    chunks[k] = n === count ? list : { count: n, idx: list.idx.subarray(0, n), gen: list.gen.subarray(0, n), cls: list.cls.subarray(0, n), sha: list.sha.subarray(0, 32 * n) };
  }
  if (at !== body.length) throw bad('bytes after the last record');
  const { counts: _, ...head } = h;
  return { head: { ...head, format: 2 }, chunks };
}

/** A format-1 manifest's chunk rows (index, generation, class, blob SHA-256 in base64url), packed as format 2 holds them; its signature checked by the caller. */
export function packRows(rows: [number, number, Sensitivity, string][]): ChunkList {
  const list: ChunkList = { count: rows.length, idx: new Uint32Array(rows.length), gen: new Uint32Array(rows.length), cls: new Uint8Array(rows.length), sha: Buffer.alloc(32 * rows.length) };
  [...rows]
    .sort((a, b) => a[0] - b[0])
    .forEach(([idx, gen, cls, hash], i) => {
      const sha = b64u.decode(hash);
      if (sha.length !== 32 || !CLASS_CODE[cls]) throw new LetheError('TAMPERED', `the server's manifest is malformed: chunk ${idx}`);
      list.idx[i] = idx;
      list.gen[i] = gen;
      list.cls[i] = CLASS_CODE[cls];
      list.sha.set(sha, 32 * i);
    });
  return list;
}

/** Whether these bytes are a format-2 manifest (not yet checked). */
export const isPackedManifest = (b: Buffer): boolean => b.length >= 4 && b.subarray(0, 4).equals(MAGIC);

/** Where chunk `index` is in the list, or -1 (binary search). */
export function findChunk(list: ChunkList, index: number): number {
  let lo = 0;
  let hi = list.count - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    const v = list.idx[mid];
    if (v === index) return mid;
    if (v < index) lo = mid + 1;
    else hi = mid - 1;
  }
  return -1;
}
