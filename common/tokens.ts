// Enrollment tokens carry what a new device needs to reach and pin the server:
//   "lethe-enroll-" base64url(JSON {"v":1,"u":url,"f":fingerprint,"s":secret})
// The server keeps only SHA-256(secret).
import { z } from 'zod';
import { ENROLL_TOKEN_PREFIX } from './constants.js';
import { LetheError } from './errors.js';

const TokenBody = z.object({
  v: z.literal(1),
  u: z.string().url(),
  f: z.string().regex(/^[0-9a-f]{64}$/),
  s: z.string().min(16).max(128),
});
export type EnrollToken = z.infer<typeof TokenBody>;

export function encodeEnrollToken(t: Omit<EnrollToken, 'v'>): string {
  return ENROLL_TOKEN_PREFIX + Buffer.from(JSON.stringify({ v: 1, ...t })).toString('base64url');
}

/** Throws BAD_REQUEST with a hint when the text is not a token at all. */
export function decodeEnrollToken(text: string): EnrollToken {
  const trimmed = text.trim();
  const bad = () =>
    new LetheError('BAD_REQUEST', `not an enrollment token: '${trimmed.slice(0, 24)}${trimmed.length > 24 ? '…' : ''}'`, {
      hint: "ask IT for a new token (they mint one with 'lethe admin enroll-token')",
    });
  if (!trimmed.startsWith(ENROLL_TOKEN_PREFIX)) throw bad();
  try {
    return TokenBody.parse(JSON.parse(Buffer.from(trimmed.slice(ENROLL_TOKEN_PREFIX.length), 'base64url').toString('utf8')));
  } catch {
    throw bad();
  }
}

/** Fingerprints are compared as 64 lowercase hex digits; accepts the colon form too. */
export function normalizeFingerprint(fp: string): string {
  const hex = fp.replace(/:/g, '').toLowerCase();
  if (!/^[0-9a-f]{64}$/.test(hex)) {
    throw new LetheError('CONFIG', `not a SHA-256 certificate fingerprint: '${fp}'`, {
      hint: "use the fingerprint printed by 'lethe server init' (64 hex digits)",
    });
  }
  return hex;
}
