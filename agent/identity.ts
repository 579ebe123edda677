// The device home: who this device is and the keys it proves it with.
//   device.json       id, name, server URL and pinned fingerprint, public keys
//   server-cert.pem   the pinned server certificate
//   sign.key          Ed25519 secret (64 bytes, 0600)
//   box.key           X25519 secret (32 bytes, 0600): opens keys sealed to this device
//   revoked.json      written when the server refused the device (revoked, wiped): its key files are gone
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { boxKeyPair, b64u, secureCopy, signKeyPair, wipe, type BoxKeyPair, type SecretKey } from '../common/crypto.js';
import { LetheError } from '../common/errors.js';
import { ensureDir, writeFileAtomic } from '../common/fsutil.js';
import { PinnedClient } from '../common/http-client.js';
import { decodeEnrollToken } from '../common/tokens.js';
import { EnrollResponse } from '../common/wire.js';

export interface DeviceInfo {
  deviceId: string;
  name: string;
  server: string;
  fingerprint: string;
  enrolledAt: string;
  signPublicKey: string;
  boxPublicKey: string;
  serverSignPublicKey: string;
}

export interface Identity {
  home: string;
  info: DeviceInfo;
  certPem: string;
  sign: BoxKeyPair;
  box: BoxKeyPair;
}

export const homeFiles = (home: string) => ({
  info: path.join(home, 'device.json'),
  cert: path.join(home, 'server-cert.pem'),
  signKey: path.join(home, 'sign.key'),
  boxKey: path.join(home, 'box.key'),
  /** Every file that holds key material: forgetIdentityKeys() deletes these. */
  secrets: [path.join(home, 'sign.key'), path.join(home, 'box.key')],
  revoked: path.join(home, 'revoked.json'),
});

/** What revoked.json records: which refusal ended the device, when, and whether the server heard it erased. */
export interface RevokedMarker {
  deviceId: string;
  status: 'revoked' | 'wiped';
  at: string;
  acknowledged: boolean;
}

export function defaultHome(): string {
  return process.env.LETHE_HOME || path.join(os.homedir(), '.local', 'share', 'lethe', 'device');
}

export async function enrollDevice(home: string, tokenText: string, name = os.hostname()) {
  const f = homeFiles(home);
  if (fs.existsSync(f.info) && !revokedMarker(home)) {
    throw new LetheError('CONFIG', `'${home}' already holds an enrolled device`, {
      hint: 'use another --home, or remove that directory if the device was wiped',
    });
  }
  const token = decodeEnrollToken(tokenText);
  forgetRevokedDevice(home);
  const client = new PinnedClient(token.u, token.f);
  const sign = signKeyPair();
  const box = boxKeyPair();
  try {
    const certPem = await client.certificate();
    const res = EnrollResponse.parse(
      await client.json('POST', '/v1/enroll', {
        token: tokenText.trim(),
        name,
        signPublicKey: b64u.encode(sign.publicKey),
        boxPublicKey: b64u.encode(box.publicKey),
      }),
    );
    ensureDir(home);
    writeFileAtomic(f.signKey, sign.secretKey, 0o600);
    writeFileAtomic(f.boxKey, box.secretKey, 0o600);
    writeFileAtomic(f.cert, certPem, 0o644);
    const info: DeviceInfo = {
      deviceId: res.deviceId,
      name,
      server: token.u,
      fingerprint: token.f,
      enrolledAt: new Date().toISOString(),
      signPublicKey: b64u.encode(sign.publicKey),
      boxPublicKey: b64u.encode(box.publicKey),
      serverSignPublicKey: res.serverSignPublicKey,
    };
    // device.json last: its presence means the home is complete.
    writeFileAtomic(f.info, JSON.stringify(info, null, 2) + '\n', 0o600);
    return info;
  } finally {
    wipe(sign.secretKey, box.secretKey);
    client.close();
  }
}

function readKey(file: string, size: number): SecretKey {
  const raw = fs.readFileSync(file);
  try {
    if (raw.length !== size) throw new LetheError('CONFIG', `'${file}' is damaged (${raw.length} bytes, expected ${size})`);
    return secureCopy(raw);
  } finally {
    wipe(raw);
  }
}

/** Loads the device identity; throws CONFIG with a hint when the home is not enrolled, DEVICE_REVOKED or DEVICE_WIPED when its keys were deleted. */
export function loadIdentity(home: string): Identity {
  const f = homeFiles(home);
  assertNotRevoked(home);
  if (!fs.existsSync(f.info)) {
    throw new LetheError('CONFIG', `no enrolled device in '${home}'`, {
      hint: "enroll with 'lethe enroll TOKEN' (IT mints tokens with 'lethe admin enroll-token')",
    });
  }
  const info = JSON.parse(fs.readFileSync(f.info, 'utf8')) as DeviceInfo;
  const sign = { publicKey: b64u.decode(info.signPublicKey), secretKey: readKey(f.signKey, 64) };
  const box = fs.existsSync(f.boxKey)
    ? { publicKey: b64u.decode(info.boxPublicKey), secretKey: readKey(f.boxKey, 32) }
    : { publicKey: b64u.decode(info.boxPublicKey), secretKey: secureCopy(Buffer.alloc(32)) };
  return { home, info, certPem: fs.readFileSync(f.cert, 'utf8'), sign, box };
}

export function closeIdentity(id: Identity): void {
  wipe(id.sign.secretKey, id.box.secretKey);
}

/**
 * Deletes every key file of the device home (homeFiles().secrets), overwriting
 * each first (best effort on copy-on-write filesystems). The device cannot sign
 * or open sealed keys from this home afterwards. Returns the names removed.
 */
export function forgetIdentityKeys(home: string): string[] {
  const removed: string[] = [];
  for (const file of homeFiles(home).secrets) {
    if (!fs.existsSync(file)) continue;
    overwriteFile(file);
    fs.rmSync(file, { force: true });
    removed.push(path.basename(file));
  }
  return removed;
}

/** Overwrites a small file with zeros and syncs it; a file already gone is no error. */
export function overwriteFile(file: string): void {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r+');
  } catch {
    return;
  }
  try {
    fs.writeSync(fd, Buffer.alloc(fs.fstatSync(fd).size));
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

export function revokedMarker(home: string): RevokedMarker | undefined {
  const f = homeFiles(home).revoked;
  if (!fs.existsSync(f)) return undefined;
  return JSON.parse(fs.readFileSync(f, 'utf8')) as RevokedMarker;
}

export function writeRevokedMarker(home: string, m: RevokedMarker): void {
  writeFileAtomic(homeFiles(home).revoked, JSON.stringify(m, null, 2) + '\n', 0o600);
}

/** The error every command gives for a home whose device was revoked or wiped: it must be enrolled again. */
export function revokedError(home: string, m: RevokedMarker): LetheError {
  return new LetheError(m.status === 'wiped' ? 'DEVICE_WIPED' : 'DEVICE_REVOKED', `device ${m.deviceId} was ${m.status} by IT (${m.at}); its keys and cache are deleted`, {
    hint: `this machine must be enrolled again: ask IT for a new token, then 'lethe enroll TOKEN --home ${home}'`,
  });
}

function assertNotRevoked(home: string): void {
  const m = revokedMarker(home);
  if (m) throw revokedError(home, m);
}

/** Before a new enrollment into a revoked device's home: the old device's record goes. */
function forgetRevokedDevice(home: string): void {
  if (!revokedMarker(home)) return;
  const f = homeFiles(home);
  forgetIdentityKeys(home);
  for (const file of [f.info, f.cert, f.revoked]) fs.rmSync(file, { force: true });
}
