// The test workload's checksummed 4 KiB page, shared with guest-driver/workload.c
// (keep the two in step). Memory pages and disk blocks use the same layout with
// different magics, so the host can check what the guest wrote (ram.bin, disk.raw).
//
//   offset  size  field
//   0       4     magic     "LTHP" memory page, "LTHD" disk block (little-endian u32)
//   4       4     index     page number in the workload, block number in its file
//   8       4     seq       generation: 1 when first written, +1 at each rewrite
//   12      4     flags     bit 0: the page carries the secret marker
//   16      8     checksum  FNV-1a over the 509 little-endian u64 words from offset 24
//   24      4072  content   splitmix64 stream seeded by (index << 32 | seq) + magic * 2^64/φ;
//                           a marked page has "LETHE-SECRET[<secret>]" at offset 64

export const PAGE_SIZE = 4096;
export const HEADER_SIZE = 24;
export const MAGIC_MEM = 0x5048544c; // "LTHP"
export const MAGIC_DISK = 0x4448544c; // "LTHD"
export const FLAG_SECRET = 1;
/** Every SECRET_EVERY-th memory page (index % SECRET_EVERY == 0) carries the marker. */
export const SECRET_EVERY = 8;
export const SECRET_OFFSET = 64;

const M64 = (1n << 64n) - 1n;
const GOLDEN = 0x9e3779b97f4a7c15n;
const FNV_OFFSET = 0xcbf29ce484222325n;
const FNV_PRIME = 0x100000001b3n;

export const secretMarker = (secret: string): string => `LETHE-SECRET[${secret}]`;

export interface PageSpec {
  magic: number;
  index: number;
  seq: number;
  /** The marker string to plant, for a marked page. */
  marker?: string;
}

export function encodePage(spec: PageSpec): Buffer {
  const page = Buffer.alloc(PAGE_SIZE);
  page.writeUInt32LE(spec.magic, 0);
  page.writeUInt32LE(spec.index, 4);
  page.writeUInt32LE(spec.seq, 8);
  page.writeUInt32LE(spec.marker ? FLAG_SECRET : 0, 12);
  let state = ((BigInt(spec.index) << 32n) | BigInt(spec.seq)) + ((BigInt(spec.magic) * GOLDEN) & M64);
  for (let at = HEADER_SIZE; at < PAGE_SIZE; at += 8) {
    state = (state + GOLDEN) & M64;
    page.writeBigUInt64LE(splitmix(state), at);
  }
  if (spec.marker) page.write(spec.marker, SECRET_OFFSET, 'latin1');
  page.writeBigUInt64LE(pageChecksum(page), 16);
  return page;
}

export type PageCheck = { ok: true; index: number; seq: number; flags: number } | { ok: false; reason: 'magic' | 'checksum' };

/** Checks one page's magic and checksum (not which index or seq the caller expects). */
export function checkPage(page: Uint8Array, magic: number): PageCheck {
  const buf = Buffer.from(page.buffer, page.byteOffset, PAGE_SIZE);
  if (buf.readUInt32LE(0) !== magic) return { ok: false, reason: 'magic' };
  if (buf.readBigUInt64LE(16) !== pageChecksum(buf)) return { ok: false, reason: 'checksum' };
  return { ok: true, index: buf.readUInt32LE(4), seq: buf.readUInt32LE(8), flags: buf.readUInt32LE(12) };
}

export function pageChecksum(page: Buffer): bigint {
  let h = FNV_OFFSET;
  for (let at = HEADER_SIZE; at < PAGE_SIZE; at += 8) h = ((h ^ page.readBigUInt64LE(at)) * FNV_PRIME) & M64;
  return h;
}

function splitmix(state: bigint): bigint {
  let z = state;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & M64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & M64;
  return z ^ (z >> 31n);
}
