// Device keys sealed at rest (docs/device-keys.md): each key file of the device
// home is encrypted under a key-encryption key (KEK) that comes from a passphrase
// through Argon2id or from the TPM with a PIN. A sealed key file is
//   magic "LETHEKEY" (8) ‖ version (1) ‖ kind (1) ‖ header length H (2, LE) ‖ header (H)
//   ‖ nonce (24) ‖ XChaCha20-Poly1305(KEK, key, AD = the bytes before the nonce ‖ AD_SEALED_KEY ‖ name)
// passphrase header: alg (1) ‖ opslimit (4, LE) ‖ memlimit (8, LE) ‖ salt (16)
// tpm header:        TPM2B_PUBLIC and TPM2B_PRIVATE of the TPM's HMAC key, as tpm2_create writes them
import sodium from 'sodium-native';
import { AD_SEALED_KEY, KEY_BYTES, NONCE_BYTES, SEAL_CODE, SEALED_KEY_MAGIC, SEALED_KEY_VERSION, TAG_BYTES, type SealKind } from '../../common/constants.js';
import { randomBytes, secureBuffer, seal, wipe, type SecretKey } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';

export type SealedKind = Exclude<SealKind, 'none'>;
export type KeyName = 'sign' | 'box';

/** A key-encryption key and the header that says how to get it again. */
export interface Kek {
  kind: SealedKind;
  header: Buffer;
  key: SecretKey;
}

/** Argon2id cost: libsodium's interactive (64 MiB, 2 passes) or moderate (256 MiB, 3 passes) limits. */
export const ARGON2_LIMITS = {
  interactive: { opslimit: sodium.crypto_pwhash_OPSLIMIT_INTERACTIVE, memlimit: sodium.crypto_pwhash_MEMLIMIT_INTERACTIVE },
  moderate: { opslimit: sodium.crypto_pwhash_OPSLIMIT_MODERATE, memlimit: sodium.crypto_pwhash_MEMLIMIT_MODERATE },
} as const;
export type Argon2Cost = keyof typeof ARGON2_LIMITS;

const PREFIX_BYTES = 12;
const SALT_BYTES = sodium.crypto_pwhash_SALTBYTES;
const PASSPHRASE_HEADER_BYTES = 1 + 4 + 8 + SALT_BYTES;
/** Refuses headers that would make unlocking take all memory (a file tampered to hang the agent). */
const MAX_MEMLIMIT = 4 * 1024 ** 3;
const MAX_OPSLIMIT = 64;

export function passphraseHeader(cost: Argon2Cost, salt = randomBytes(SALT_BYTES)): Buffer {
  const h = Buffer.alloc(PASSPHRASE_HEADER_BYTES);
  const { opslimit, memlimit } = ARGON2_LIMITS[cost];
  h.writeUInt8(sodium.crypto_pwhash_ALG_ARGON2ID13, 0);
  h.writeUInt32LE(opslimit, 1);
  h.writeBigUInt64LE(BigInt(memlimit), 5);
  salt.copy(h, 13);
  return h;
}

function readPassphraseHeader(h: Buffer, file: string): { alg: number; opslimit: number; memlimit: number; salt: Buffer } {
  if (h.length !== PASSPHRASE_HEADER_BYTES) throw damaged(file, 'its passphrase header has the wrong length');
  const p = { alg: h.readUInt8(0), opslimit: h.readUInt32LE(1), memlimit: Number(h.readBigUInt64LE(5)), salt: h.subarray(13) };
  if (p.alg !== sodium.crypto_pwhash_ALG_ARGON2ID13) throw damaged(file, `unknown key derivation ${p.alg}`);
  if (p.opslimit < sodium.crypto_pwhash_OPSLIMIT_MIN || p.opslimit > MAX_OPSLIMIT) throw damaged(file, `Argon2id opslimit ${p.opslimit} is out of range`);
  if (p.memlimit < sodium.crypto_pwhash_MEMLIMIT_MIN || p.memlimit > MAX_MEMLIMIT) throw damaged(file, `Argon2id memlimit ${p.memlimit} is out of range`);
  return p;
}

/** The KEK of a passphrase header: Argon2id(passphrase, salt) into locked memory, off the event loop. */
export async function passphraseKek(passphrase: Uint8Array, header: Buffer, file = 'the new key'): Promise<Kek> {
  const p = readPassphraseHeader(header, file);
  const key = secureBuffer(KEY_BYTES);
  try {
    await new Promise<void>((resolve, reject) =>
      sodium.crypto_pwhash_async(key, passphrase, p.salt, p.opslimit, p.memlimit, p.alg, (e) => (e ? reject(e) : resolve())),
    );
  } catch (cause) {
    wipe(key);
    throw new LetheError('UNLOCK_FAILED', 'Argon2id could not derive the key-encryption key', { cause, hint: 'is the machine out of memory?' });
  }
  return { kind: 'passphrase', header, key };
}

function prefix(kind: SealedKind, header: Buffer): Buffer {
  const b = Buffer.alloc(PREFIX_BYTES);
  b.write(SEALED_KEY_MAGIC, 0, 'latin1');
  b.writeUInt8(SEALED_KEY_VERSION, 8);
  b.writeUInt8(SEAL_CODE[kind], 9);
  b.writeUInt16LE(header.length, 10);
  return Buffer.concat([b, header]);
}

const adFor = (head: Buffer, name: KeyName) => Buffer.concat([head, Buffer.from(AD_SEALED_KEY + name, 'latin1')]);

/** A sealed key file's bytes: `key` under the KEK, bound to its header and name. */
export function sealKey(kek: Kek, name: KeyName, key: Uint8Array): Buffer {
  const head = prefix(kek.kind, kek.header);
  return Buffer.concat([head, seal(kek.key, key, adFor(head, name))]);
}

export interface SealedFile {
  kind: SealedKind;
  header: Buffer;
  /** the bytes before the nonce */
  head: Buffer;
  boxed: Buffer;
}

function damaged(file: string, why: string): LetheError {
  return new LetheError('CONFIG', `'${file}' is not a sealed key Lethe can read: ${why}`, {
    hint: 'the device home is damaged: enroll again with a new token',
  });
}

/** Whether the bytes start like a sealed key file (a `--seal none` home holds raw keys). */
export const isSealed = (buf: Buffer): boolean => buf.length >= PREFIX_BYTES && buf.subarray(0, 8).toString('latin1') === SEALED_KEY_MAGIC;

/** Splits a sealed key file; throws CONFIG naming `file` when it is not one. */
export function parseSealed(file: string, buf: Buffer): SealedFile {
  if (!isSealed(buf)) throw damaged(file, 'no LETHEKEY header');
  if (buf.readUInt8(8) !== SEALED_KEY_VERSION) throw damaged(file, `format version ${buf.readUInt8(8)}`);
  const code = buf.readUInt8(9);
  const kind = (Object.keys(SEAL_CODE) as SealedKind[]).find((k) => SEAL_CODE[k] === code);
  if (!kind) throw damaged(file, `unknown seal kind ${code}`);
  const end = PREFIX_BYTES + buf.readUInt16LE(10);
  if (buf.length < end + NONCE_BYTES + TAG_BYTES) throw damaged(file, 'it is truncated');
  const header = buf.subarray(PREFIX_BYTES, end);
  if (kind === 'passphrase') readPassphraseHeader(header, file);
  return { kind, header, head: buf.subarray(0, end), boxed: buf.subarray(end) };
}

/** Opens a sealed key into locked memory; a wrong KEK (wrong passphrase or PIN) throws UNLOCK_FAILED. */
export function openKey(kek: Kek, name: KeyName, f: SealedFile, what: string): SecretKey {
  const out = secureBuffer(f.boxed.length - NONCE_BYTES - TAG_BYTES);
  const ok =
    kek.kind === f.kind &&
    kek.header.equals(f.header) &&
    (() => {
      try {
        sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(out, null, f.boxed.subarray(NONCE_BYTES), adFor(f.head, name), f.boxed.subarray(0, NONCE_BYTES), kek.key);
        return true;
      } catch {
        return false;
      }
    })();
  if (!ok) {
    wipe(out);
    throw new LetheError('UNLOCK_FAILED', `wrong ${what}: the device keys did not open`, {
      hint: kek.kind === 'tpm' ? 'try again with the right PIN; each wrong PIN counts toward the TPM\'s lockout' : 'try again with the right passphrase',
    });
  }
  return out;
}
