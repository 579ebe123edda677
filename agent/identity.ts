// The device home: who this device is and the keys it proves it with.
//   device.json       id, name, server URL and pinned fingerprint, public keys
//   server-cert.pem   the pinned server certificate
//   sign.key          Ed25519 secret (64 bytes, 0600)
//   box.key           X25519 secret (32 bytes, 0600): opens keys sealed to this device
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
});

export function defaultHome(): string {
  return process.env.LETHE_HOME || path.join(os.homedir(), '.local', 'share', 'lethe', 'device');
}

export async function enrollDevice(home: string, tokenText: string, name = os.hostname()) {
  const f = homeFiles(home);
  if (fs.existsSync(f.info)) {
    throw new LetheError('CONFIG', `'${home}' already holds an enrolled device`, {
      hint: 'use another --home, or remove that directory if the device was wiped',
    });
  }
  const token = decodeEnrollToken(tokenText);
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

/** Loads the device identity; throws CONFIG with a hint when the home is not enrolled. */
export function loadIdentity(home: string): Identity {
  const f = homeFiles(home);
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
