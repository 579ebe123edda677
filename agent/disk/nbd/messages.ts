// NBD's messages as bytes: error names and mappings, which flags each command
// takes, replies, and parsing of requests and information requests (proto.md).
import { isLetheError } from '../../../common/errors.js';
import { ProtocolError } from './reader.js';
import type { Request } from './types.js';
import * as P from './protocol.js';

export const ERROR_NAMES: Record<number, string> = {
  [P.NBD_EPERM]: 'EPERM',
  [P.NBD_EIO]: 'EIO',
  [P.NBD_ENOMEM]: 'ENOMEM',
  [P.NBD_EINVAL]: 'EINVAL',
  [P.NBD_ENOSPC]: 'ENOSPC',
  [P.NBD_EOVERFLOW]: 'EOVERFLOW',
  [P.NBD_ENOTSUP]: 'ENOTSUP',
  [P.NBD_ESHUTDOWN]: 'ESHUTDOWN',
};

/** Command flags each command accepts; any other bit is answered NBD_EINVAL. */
export const ALLOWED_FLAGS: Record<number, number> = {
  [P.NBD_CMD_READ]: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_DF,
  [P.NBD_CMD_WRITE]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_FLUSH]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_TRIM]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_WRITE_ZEROES]: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_NO_HOLE,
};

export const KNOWN_OPTIONS = new Set([
  P.NBD_OPT_EXPORT_NAME,
  P.NBD_OPT_ABORT,
  P.NBD_OPT_LIST,
  P.NBD_OPT_INFO,
  P.NBD_OPT_GO,
  P.NBD_OPT_STRUCTURED_REPLY,
]);

const SYSTEM_ERRNO_TO_NBD: Record<string, number> = {
  ENOSPC: P.NBD_ENOSPC,
  EDQUOT: P.NBD_ENOSPC,
  EFBIG: P.NBD_ENOSPC,
  EINVAL: P.NBD_EINVAL,
  EPERM: P.NBD_EPERM,
  EACCES: P.NBD_EPERM,
  EROFS: P.NBD_EPERM,
};

/**
 * The NBD error for a backend rejection: file-system errnos proto.md names
 * (ENOSPC, EDQUOT, EFBIG → ENOSPC; EINVAL; EPERM, EACCES, EROFS → EPERM), a
 * LetheError BAD_REQUEST → EINVAL, anything else → EIO. A read that fails is
 * always an error, never zeros (DESIGN.md invariant 7).
 */
export function nbdError(e: unknown): number {
  if (isLetheError(e, 'BAD_REQUEST')) return P.NBD_EINVAL;
  const code = (e as { code?: unknown } | null)?.code;
  return (typeof code === 'string' && SYSTEM_ERRNO_TO_NBD[code]) || P.NBD_EIO;
}

export function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v, 0);
  return b;
}

export function quote(s: string): string {
  return JSON.stringify(s.length > 64 ? `${s.slice(0, 64)}…` : s);
}

export function messageBytes(message: string): Buffer {
  const b = Buffer.from(message, 'utf8');
  return b.length > P.MAX_ERROR_MESSAGE ? b.subarray(0, P.MAX_ERROR_MESSAGE) : b;
}

export function simpleReply(cookie: Buffer, error: number): Buffer {
  const b = Buffer.alloc(P.SIMPLE_REPLY_HEADER_BYTES);
  b.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  cookie.copy(b, 8);
  return b;
}

/** A structured chunk header with `extra` bytes of room after it for fixed fields. */
export function structuredHeader(cookie: Buffer, flags: number, type: number, length: number, extra = 0): Buffer {
  const b = Buffer.alloc(P.STRUCTURED_REPLY_HEADER_BYTES + extra);
  b.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  cookie.copy(b, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

/** Throws ProtocolError on a bad magic: nothing after it can be trusted. */
export function parseRequest(h: Buffer, size: number): Request {
  const magic = h.readUInt32BE(0);
  if (magic !== P.NBD_REQUEST_MAGIC) throw new ProtocolError(`bad request magic 0x${magic.toString(16)}`);
  const big = h.readBigUInt64BE(16);
  const length = h.readUInt32BE(24);
  // Offsets past 2^53 are out of range anyway; clamp them for messages.
  const offset = big > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(big);
  return {
    flags: h.readUInt16BE(4),
    type: h.readUInt16BE(6),
    cookie: Buffer.from(h.subarray(8, 16)),
    offset,
    length,
    inRange: big <= BigInt(size) && offset + length <= size,
  };
}

/** NBD_OPT_INFO/GO data: u32 name length, name, u16 count, u16 × count; null if malformed. */
export function parseInfoRequest(d: Buffer): { name: string; infos: number[] } | null {
  if (d.length < 6) return null;
  const nameLen = d.readUInt32BE(0);
  if (nameLen > d.length - 6) return null;
  const count = d.readUInt16BE(4 + nameLen);
  if (d.length !== 4 + nameLen + 2 + 2 * count) return null;
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(d.readUInt16BE(6 + nameLen + 2 * i));
  return { name: d.toString('utf8', 4, 4 + nameLen), infos };
}

