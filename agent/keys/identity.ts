// The device home: who this device is and the keys it proves it with.
//   device.json       id, name, server URL and pinned fingerprint, public keys
//   server-cert.pem   the pinned server certificate
//   sign.key          Ed25519 secret (64 bytes, 0600)
//   box.key           X25519 secret (32 bytes, 0600): opens keys sealed to this device
//   revoked.json      written when the server refused the device (revoked, wiped): its key files are gone
// Both key files are sealed (agent/keys/seal.ts, docs/device-keys.md) unless the
// device enrolled with --seal none; device.json says which (`seal`).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { SealKind } from '../../common/constants.js';
import { boxKeyPair, b64u, secureCopy, signKeyPair, wipe, type BoxKeyPair, type SecretKey } from '../../common/crypto.js';
import { LetheError, isLetheError } from '../../common/errors.js';
import { ensureDir, writeFileAtomic } from '../../common/fsutil.js';
import { PinnedClient } from '../../common/http-client.js';
import { decodeEnrollToken } from '../../common/tokens.js';
import { EnrollResponse } from '../../common/wire.js';
import { openKey, parseSealed, passphraseHeader, passphraseKek, sealKey, type Argon2Cost, type Kek, type KeyName, type SealedFile } from './seal.js';
import { tpmCreate, tpmKek } from './tpm.js';
import type { Unlock } from './unlock.js';

export interface DeviceInfo {
  deviceId: string;
  name: string;
  server: string;
  /** More URLs of the same server (replicas, docs/fleet.md), tried in turn when one cannot be reached. */
  servers?: string[];
  fingerprint: string;
  enrolledAt: string;
  signPublicKey: string;
  boxPublicKey: string;
  serverSignPublicKey: string;
  /** How sign.key and box.key are kept; absent in homes made before sealing (then 'none'). */
  seal?: SealKind;
}

export interface Identity {
  home: string;
  info: DeviceInfo;
  certPem: string;
  sign: BoxKeyPair;
  box: BoxKeyPair;
}

export const homeFiles = (home: string) => {
  const signKey = path.join(home, 'sign.key');
  const boxKey = path.join(home, 'box.key');
  return {
    info: path.join(home, 'device.json'),
    cert: path.join(home, 'server-cert.pem'),
    signKey,
    boxKey,
    /** The new keys of a rotation in progress (docs/device-keys.md, Rotation), and its record. */
    signKeyNext: `${signKey}.next`,
    boxKeyNext: `${boxKey}.next`,
    rotation: path.join(home, 'rotate.json'),
    /** Every file of the home that holds key material (sealed or not): what a key wipe removes. */
    secrets: [signKey, boxKey, `${signKey}.next`, `${boxKey}.next`],
    revoked: path.join(home, 'revoked.json'),
  };
};

export interface SealOptions {
  seal: SealKind;
  /** where the new passphrase or PIN comes from, and the TPM; needed unless seal is 'none' */
  unlock?: Unlock;
  /** Argon2id cost of a passphrase seal (default moderate) */
  argon2?: Argon2Cost;
}

const secretName = (kind: SealKind) => (kind === 'tpm' ? 'TPM PIN' : 'passphrase');

function needUnlock(kind: SealKind, unlock: Unlock | undefined): Unlock {
  if (!unlock) {
    throw new LetheError('DEVICE_LOCKED', `the device keys are sealed (${kind}) and no ${secretName(kind)} was given`, {
      hint: 'run on a terminal, pass --passphrase-fd N, or give systemd credential lethe-passphrase',
    });
  }
  return unlock;
}

/** A new KEK for enrollment: asks for the new passphrase or PIN (twice on a terminal); the secret is wiped here. */
async function newKek(o: SealOptions): Promise<Kek> {
  const unlock = needUnlock(o.seal, o.unlock);
  const secret = await unlock.ask({ what: secretName(o.seal), confirm: true });
  try {
    if (o.seal === 'passphrase') return await passphraseKek(secret, passphraseHeader(o.argon2 ?? 'moderate'));
    const header = await tpmCreate(unlock.tcti, secret);
    return { kind: 'tpm', header, key: await tpmKek(unlock.tcti, header, secret) };
  } finally {
    wipe(secret);
  }
}

/** The KEK a sealed file names: one passphrase or PIN asked for; the secret is wiped here. */
async function kekFor(f: SealedFile, unlock: Unlock): Promise<Kek> {
  const secret = await unlock.ask({ what: secretName(f.kind), confirm: false });
  try {
    if (f.kind === 'passphrase') return await passphraseKek(secret, f.header);
    return { kind: 'tpm', header: f.header, key: await tpmKek(unlock.tcti, f.header, secret) };
  } finally {
    wipe(secret);
  }
}

function writeKey(file: string, name: KeyName, key: Uint8Array, kek: Kek | undefined): void {
  if (!kek) return writeFileAtomic(file, key, 0o600);
  writeFileAtomic(file, sealKey(kek, name, key), 0o600);
}

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

/**
 * Enrolls with a one-time token: new keys, sealed as `o.seal` says (the KEK comes
 * first, so a wrong or missing passphrase spends no token), the server pinned.
 */
export async function enrollDevice(home: string, tokenText: string, name: string, o: SealOptions & { servers?: string[] }) {
  const f = homeFiles(home);
  if (fs.existsSync(f.info) && !revokedMarker(home)) {
    throw new LetheError('CONFIG', `'${home}' already holds an enrolled device`, {
      hint: 'use another --home, or remove that directory if the device was wiped',
    });
  }
  const token = decodeEnrollToken(tokenText);
  const kek = o.seal === 'none' ? undefined : await newKek(o);
  forgetRevokedDevice(home);
  let client: PinnedClient | undefined;
  const sign = signKeyPair();
  const box = boxKeyPair();
  try {
    const body = {
      token: tokenText.trim(),
      name,
      signPublicKey: b64u.encode(sign.publicKey),
      boxPublicKey: b64u.encode(box.publicKey),
      seal: o.seal,
    };
    // The token's URL first, then the replicas given: the token is spent once, wherever.
    const urls = [...new Set([token.u, ...(o.servers ?? [])])];
    let certPem = '';
    let res: ReturnType<typeof EnrollResponse.parse> | undefined;
    for (const [i, url] of urls.entries()) {
      client?.close();
      client = new PinnedClient(url, token.f);
      try {
        certPem = await client.certificate();
        res = EnrollResponse.parse(await client.json('POST', '/v1/enroll', body));
        break;
      } catch (e) {
        if (!isLetheError(e, 'SERVER_UNREACHABLE') || i === urls.length - 1) throw e;
      }
    }
    if (!res) throw new Error('unreachable: no server URL to enroll with');
    ensureDir(home);
    writeKey(f.signKey, 'sign', sign.secretKey, kek);
    writeKey(f.boxKey, 'box', box.secretKey, kek);
    writeFileAtomic(f.cert, certPem, 0o644);
    const info: DeviceInfo = {
      deviceId: res.deviceId,
      name,
      server: token.u,
      ...(o.servers?.length ? { servers: [...new Set(o.servers.filter((u) => u !== token.u))] } : {}),
      fingerprint: token.f,
      enrolledAt: new Date().toISOString(),
      signPublicKey: b64u.encode(sign.publicKey),
      boxPublicKey: b64u.encode(box.publicKey),
      serverSignPublicKey: res.serverSignPublicKey,
      seal: o.seal,
    };
    // device.json last: its presence means the home is complete.
    writeFileAtomic(f.info, JSON.stringify(info, null, 2) + '\n', 0o600);
    return info;
  } finally {
    wipe(sign.secretKey, box.secretKey, kek?.key);
    client?.close();
  }
}

function checkSize(file: string, key: SecretKey, size: number): SecretKey {
  if (key.length === size) return key;
  wipe(key);
  throw new LetheError('CONFIG', `'${file}' is damaged (${key.length} bytes, expected ${size})`);
}

/** A key file as stored (`--seal none`: the raw key) into locked memory; `open` unseals a sealed one. */
function readKey(file: string, size: number, open?: (f: SealedFile) => SecretKey): SecretKey {
  const raw = fs.readFileSync(file);
  try {
    return checkSize(file, open ? open(parseSealed(file, raw)) : secureCopy(raw), size);
  } finally {
    wipe(raw);
  }
}

/**
 * Loads the device identity, unsealing its keys with `unlock` (asked once for
 * the passphrase or PIN). Throws CONFIG when the home is not enrolled,
 * DEVICE_LOCKED when the keys are sealed and there is no way to ask,
 * UNLOCK_FAILED for a wrong passphrase or PIN, DEVICE_REVOKED or DEVICE_WIPED
 * when its keys were deleted; nothing is sent to the server.
 */
export async function loadIdentity(home: string, unlock?: Unlock): Promise<Identity> {
  if (fs.existsSync(homeFiles(home).rotation)) {
    throw new LetheError('CONFIG', `a key rotation of the device in '${home}' was interrupted`, {
      hint: "run 'lethe device rotate-keys' to finish it (it asks the server which keys it holds)",
    });
  }
  const { id, kek } = await openHome(home, unlock);
  wipe(kek?.key);
  return id;
}

/** A key rotation in progress: the new public keys (rotate.json, written once both new key files are). */
export interface PendingRotation {
  signPublicKey: string;
  boxPublicKey: string;
}

export function pendingRotation(home: string): PendingRotation | undefined {
  const f = homeFiles(home).rotation;
  return fs.existsSync(f) ? (JSON.parse(fs.readFileSync(f, 'utf8')) as PendingRotation) : undefined;
}

/**
 * The identity and the KEK its keys are sealed with (undefined for seal none; the
 * caller wipes it). During a rotation whose new files were partly moved into
 * place, each key's public half follows its file.
 */
export async function openHome(home: string, unlock?: Unlock): Promise<{ id: Identity; kek?: Kek; open: (name: KeyName) => ((s: SealedFile) => SecretKey) | undefined }> {
  const f = homeFiles(home);
  assertNotRevoked(home);
  if (!fs.existsSync(f.info)) {
    throw new LetheError('CONFIG', `no enrolled device in '${home}'`, {
      hint: "enroll with 'lethe enroll TOKEN' (IT mints tokens with 'lethe admin enroll-token')",
    });
  }
  const info = JSON.parse(fs.readFileSync(f.info, 'utf8')) as DeviceInfo;
  const pending = pendingRotation(home);
  const kind = info.seal ?? 'none';
  let kek: Kek | undefined;
  try {
    if (kind !== 'none') {
      const first = parseSealed(f.signKey, fs.readFileSync(f.signKey));
      if (first.kind !== kind) throw new LetheError('CONFIG', `'${f.signKey}' is sealed by ${first.kind}, but device.json says ${kind}`, { hint: 'the device home is damaged: enroll again' });
      kek = await kekFor(first, needUnlock(kind, unlock));
    }
    const open = kek ? (name: KeyName) => (s: SealedFile) => openKey(kek!, name, s, secretName(kind)) : () => undefined;
    const signPk = pending && !fs.existsSync(f.signKeyNext) ? pending.signPublicKey : info.signPublicKey;
    const boxPk = pending && !fs.existsSync(f.boxKeyNext) ? pending.boxPublicKey : info.boxPublicKey;
    const sign = { publicKey: b64u.decode(signPk), secretKey: readKey(f.signKey, 64, open('sign')) };
    try {
      // After a wipe whose acknowledgement is pending, only the signing key is left.
      const boxKey = fs.existsSync(f.boxKey) ? readKey(f.boxKey, 32, open('box')) : secureCopy(Buffer.alloc(32));
      const box = { publicKey: b64u.decode(boxPk), secretKey: boxKey };
      return { id: { home, info, certPem: fs.readFileSync(f.cert, 'utf8'), sign, box }, kek, open };
    } catch (e) {
      wipe(sign.secretKey);
      throw e;
    }
  } catch (e) {
    wipe(kek?.key);
    throw e;
  }
}

/** Writes a key file as the home keeps them: sealed by `kek`, or raw (seal none). */
export function writeKeyFile(file: string, name: KeyName, key: Uint8Array, kek: Kek | undefined): void {
  writeKey(file, name, key, kek);
}

/** Reads a key file of the home into locked memory (`open` unseals it). */
export function readKeyFile(file: string, size: number, open?: (f: SealedFile) => SecretKey): SecretKey {
  return readKey(file, size, open);
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
