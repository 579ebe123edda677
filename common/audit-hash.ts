// Hash chain of the audit log (docs/audit-log.md).
//   hash(n) = SHA-256(bytes(hash(n-1)) ‖ canonical(entry n))
// canonical() is JSON with object keys sorted, no whitespace.
import { AUDIT_GENESIS_HASH, CHECKPOINT_CONTEXT } from './constants.js';
import { b64u, sha256, verify } from './crypto.js';

export interface AuditEntry {
  seq: number;
  ts: string;
  type: string;
  device: string | null;
  data: unknown;
}

export function canonical(value: unknown): string {
  if (value === null || typeof value !== 'object') {
    if (typeof value === 'number' && !Number.isFinite(value)) throw new TypeError('non-finite number in audit entry');
    return JSON.stringify(value) ?? 'null';
  }
  if (Array.isArray(value)) return plainArray(value) ? JSON.stringify(value) : `[${value.map(canonical).join(',')}]`;
  const keys = Object.keys(value as object)
    .filter((k) => (value as Record<string, unknown>)[k] !== undefined)
    .sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical((value as Record<string, unknown>)[k])}`).join(',')}}`;
}

/**
 * Whether JSON.stringify writes `a` as canonical() does: an array of strings, finite
 * numbers, booleans, nulls and such arrays. A manifest's chunk lists are (a million
 * rows for a 128 GiB disk), and JSON.stringify writes them several times faster.
 */
function plainArray(a: unknown[]): boolean {
  for (const x of a) {
    if (x === null || typeof x === 'string' || typeof x === 'boolean' || (typeof x === 'number' && Number.isFinite(x))) continue;
    if (!Array.isArray(x) || !plainArray(x)) return false;
  }
  return true;
}

export function entryHash(prevHash: string, e: AuditEntry): string {
  const body = canonical({ seq: e.seq, ts: e.ts, type: e.type, device: e.device, data: e.data });
  return sha256(Buffer.from(prevHash, 'hex'), body).toString('hex');
}

export function checkpointMessage(seq: number, hash: string): Buffer {
  return Buffer.from(`${CHECKPOINT_CONTEXT}\n${seq}\n${hash}`, 'utf8');
}

/** Whether `signature` (base64url) signs the checkpoint (seq, hash) under `publicKey`. */
export function checkpointSigned(publicKey: Uint8Array, cp: { seq: number; hash: string; signature: string }): boolean {
  return verify(publicKey, checkpointMessage(cp.seq, cp.hash), b64u.decode(cp.signature));
}

export { AUDIT_GENESIS_HASH };
