// Time-based one-time passwords (RFC 6238 over RFC 4226's HOTP): HMAC-SHA1, a
// 30-second step, 6 digits — what every authenticator app reads from an
// otpauth:// URI. The secret is 20 random bytes, shown to a person in base32.
import { createHmac } from 'node:crypto';

export const TOTP_STEP_S = 30;
export const TOTP_DIGITS = 6;
/** Codes of the step before and after are accepted too: clocks and people are a little late. */
export const TOTP_DRIFT_STEPS = 1;

const B32 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';

export function base32Encode(buf: Uint8Array): string {
  let out = '';
  let bits = 0;
  let value = 0;
  for (const byte of buf) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += B32[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += B32[(value << (5 - bits)) & 31];
  return out;
}

/** @throws Error on a character outside the base32 alphabet (spaces and '=' are ignored) */
export function base32Decode(text: string): Buffer {
  const clean = text.replace(/[\s=]/g, '').toUpperCase();
  const out: number[] = [];
  let bits = 0;
  let value = 0;
  for (const ch of clean) {
    const v = B32.indexOf(ch);
    if (v < 0) throw new Error(`'${ch}' is not a base32 character`);
    value = (value << 5) | v;
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 255);
      bits -= 8;
    }
  }
  return Buffer.from(out);
}

/** RFC 4226 HOTP of `counter`, `digits` long. */
export function hotp(secret: Uint8Array, counter: number, digits = TOTP_DIGITS): string {
  const msg = Buffer.alloc(8);
  msg.writeBigUInt64BE(BigInt(counter));
  const mac = createHmac('sha1', secret).update(msg).digest();
  const off = mac[mac.length - 1] & 0x0f;
  const bin = (mac.readUInt32BE(off) & 0x7fffffff) % 10 ** digits;
  return String(bin).padStart(digits, '0');
}

/** The code for the step holding `nowMs`. */
export function totp(secret: Uint8Array, nowMs = Date.now(), digits = TOTP_DIGITS): string {
  return hotp(secret, Math.floor(nowMs / 1000 / TOTP_STEP_S), digits);
}

/**
 * The step `code` belongs to, within TOTP_DRIFT_STEPS of now, or null. The caller
 * refuses a step at or below the last one it accepted (a code is good once).
 */
export function totpStep(secret: Uint8Array, code: string, nowMs = Date.now()): number | null {
  if (!/^\d{6}$/.test(code)) return null;
  const now = Math.floor(nowMs / 1000 / TOTP_STEP_S);
  let found: number | null = null;
  // Every candidate is computed, so the time taken does not say which one matched.
  for (let s = now - TOTP_DRIFT_STEPS; s <= now + TOTP_DRIFT_STEPS; s++) {
    if (timingSafeEqualStr(hotp(secret, s), code) && found === null) found = s;
  }
  return found;
}

function timingSafeEqualStr(a: string, b: string): boolean {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a.charCodeAt(i) ^ b.charCodeAt(i);
  return d === 0;
}

/** The URI authenticator apps take (as text or a QR code). */
export function otpauthUri(secret: Uint8Array, account: string, issuer = 'Lethe'): string {
  const label = encodeURIComponent(`${issuer}:${account}`);
  return `otpauth://totp/${label}?secret=${base32Encode(secret)}&issuer=${encodeURIComponent(issuer)}&algorithm=SHA1&digits=${TOTP_DIGITS}&period=${TOTP_STEP_S}`;
}
