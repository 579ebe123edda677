// Signed device requests (docs/escrow-protocol.md, "Request signatures").
//
//   message = "LETHE-REQ-V1\n" METHOD "\n" PATH "\n" DEVICE "\n" TIMESTAMP "\n" NONCE "\n" hex(SHA-256(body))
//
// Ed25519 over that message; headers carry device id, timestamp (ms since the
// epoch), a random nonce and the signature, all in base64url or decimal.
import { HDR_DEVICE, HDR_NONCE, HDR_SIGNATURE, HDR_TIMESTAMP, SIG_CONTEXT } from './constants.js';
import { b64u, randomBytes, sha256, sign, verify } from './crypto.js';

export type SignedHeaders = Record<string, string> & {
  [HDR_DEVICE]: string;
  [HDR_TIMESTAMP]: string;
  [HDR_NONCE]: string;
  [HDR_SIGNATURE]: string;
};

export function signingMessage(method: string, path: string, deviceId: string, ts: string, nonce: string, body: Uint8Array): Buffer {
  const digest = sha256(body).toString('hex');
  return Buffer.from([SIG_CONTEXT, method.toUpperCase(), path, deviceId, ts, nonce, digest].join('\n'), 'utf8');
}

export function signRequest(
  secretKey: Uint8Array,
  deviceId: string,
  method: string,
  path: string,
  body: Uint8Array,
  now = Date.now(),
): SignedHeaders {
  const ts = String(now);
  const nonce = b64u.encode(randomBytes(16));
  const sig = sign(secretKey, signingMessage(method, path, deviceId, ts, nonce, body));
  return { [HDR_DEVICE]: deviceId, [HDR_TIMESTAMP]: ts, [HDR_NONCE]: nonce, [HDR_SIGNATURE]: b64u.encode(sig) };
}

export function verifyRequest(
  publicKey: Uint8Array,
  h: { deviceId: string; ts: string; nonce: string; signature: string },
  method: string,
  path: string,
  body: Uint8Array,
): boolean {
  const sig = b64u.decode(h.signature);
  return verify(publicKey, signingMessage(method, path, h.deviceId, h.ts, h.nonce, body), sig);
}

/**
 * What a device's new signing key signs when the device rotates its keys
 * (docs/device-keys.md, Rotation): proof that whoever asks holds the new key.
 */
export const ROTATE_CONTEXT = 'LETHE-ROTATE-V1';
export function rotationMessage(deviceId: string, signPublicKey: string, boxPublicKey: string): Buffer {
  return Buffer.from([ROTATE_CONTEXT, deviceId, signPublicKey, boxPublicKey].join('\n'), 'utf8');
}
