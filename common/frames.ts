// Chunk upload frames (docs/escrow-protocol.md, "Pushing images"):
//   frame = kind(u8) ‖ index(u64be) ‖ length(u32be) ‖ plaintext(length)
// A length of 0 means the chunk is all zeros.
import { CHUNK_KINDS, KIND_CODE, type ChunkKind } from './constants.js';
import { LetheError } from './errors.js';

export const FRAME_HEADER = 1 + 8 + 4;
const KIND_OF = new Map(CHUNK_KINDS.map((k) => [KIND_CODE[k], k]));

export function encodeChunkFrame(kind: ChunkKind, index: number, data: Uint8Array | null): Buffer[] {
  const h = Buffer.alloc(FRAME_HEADER);
  h.writeUInt8(KIND_CODE[kind], 0);
  h.writeBigUInt64BE(BigInt(index), 1);
  h.writeUInt32BE(data ? data.length : 0, 9);
  return data && data.length > 0 ? [h, Buffer.from(data.buffer, data.byteOffset, data.length)] : [h];
}

/** Parses a body of frames; throws BAD_REQUEST naming the byte offset of the first bad frame. */
export function parseChunkFrames(body: Buffer): { kind: ChunkKind; index: number; data: Buffer }[] {
  const out: { kind: ChunkKind; index: number; data: Buffer }[] = [];
  let off = 0;
  while (off < body.length) {
    if (off + FRAME_HEADER > body.length) throw new LetheError('BAD_REQUEST', `truncated chunk frame at byte ${off}`);
    const kind = KIND_OF.get(body.readUInt8(off));
    const index = body.readBigUInt64BE(off + 1);
    const len = body.readUInt32BE(off + 9);
    if (!kind) throw new LetheError('BAD_REQUEST', `unknown chunk kind ${body.readUInt8(off)} in frame at byte ${off}`);
    if (index > BigInt(2 ** 40)) throw new LetheError('BAD_REQUEST', `chunk index out of range in frame at byte ${off}`);
    if (off + FRAME_HEADER + len > body.length) throw new LetheError('BAD_REQUEST', `truncated chunk frame at byte ${off}`);
    out.push({ kind, index: Number(index), data: body.subarray(off + FRAME_HEADER, off + FRAME_HEADER + len) });
    off += FRAME_HEADER + len;
  }
  return out;
}
