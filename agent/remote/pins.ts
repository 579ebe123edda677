// The server certificate a device will pin next (docs/fleet.md, Key rotation). A
// heartbeat may carry the server's announced next certificate with the server's
// signature over its fingerprint; the device checks that signature against the
// key it pinned at enrollment and keeps the certificate in next-cert.pem, trusted
// beside the current one. Once a server presents it, it becomes the only pin.
import { X509Certificate } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { b64u, verify } from '../../common/crypto.js';
import { writeFileAtomic } from '../../common/fsutil.js';
import type { NextPin } from '../../common/http-client.js';
import { pinMessage } from '../../common/tls-pin.js';
import type { THeartbeatResponse } from '../../common/wire.js';

const files = (home: string) => ({
  cert: path.join(home, 'next-cert.pem'),
  info: path.join(home, 'device.json'),
  current: path.join(home, 'server-cert.pem'),
});

const fingerprintOf = (pem: string) => new X509Certificate(pem).fingerprint256.replace(/:/g, '').toLowerCase();

/** The next certificate this device trusts, if a heartbeat brought one. */
export function readNextPin(home: string): NextPin | undefined {
  try {
    const certPem = fs.readFileSync(files(home).cert, 'utf8');
    return { pin: fingerprintOf(certPem), certPem };
  } catch {
    return undefined;
  }
}

/**
 * Keeps a heartbeat's announced certificate if the server's pinned key signed its
 * fingerprint and the certificate has that fingerprint. Returns the pin kept (or
 * already kept), or what is wrong with the offer.
 */
export function keepNextPin(home: string, serverSignPublicKey: string, offered: THeartbeatResponse['nextTls']): { pin?: NextPin; problem?: string } {
  if (!offered) return {};
  let fp: string;
  try {
    fp = fingerprintOf(offered.cert);
  } catch {
    return { problem: "the server's next certificate is not a certificate" };
  }
  if (fp !== offered.fingerprint) return { problem: "the server's next certificate does not have the fingerprint it was announced with" };
  if (!verify(b64u.decode(serverSignPublicKey), pinMessage(fp), b64u.decode(offered.signature))) {
    return { problem: "the server's next certificate is not signed by the key pinned at enrollment" };
  }
  const kept = readNextPin(home);
  if (kept?.pin !== fp) writeFileAtomic(files(home).cert, offered.cert, 0o644);
  return { pin: { pin: fp, certPem: offered.cert } };
}

/** Once a server presented the next certificate, it is the pin: device.json and server-cert.pem take it. Returns whether it did. */
export function promoteNextPin(home: string, presented: string | undefined): boolean {
  const next = readNextPin(home);
  if (!next || presented !== next.pin) return false;
  const f = files(home);
  const info = JSON.parse(fs.readFileSync(f.info, 'utf8')) as { fingerprint: string };
  writeFileAtomic(f.current, next.certPem, 0o644);
  writeFileAtomic(f.info, JSON.stringify({ ...info, fingerprint: next.pin }, null, 2) + '\n', 0o600);
  fs.rmSync(f.cert, { force: true });
  return true;
}
