// The server's data directory:
//   config.json       listen address (and public URL, if set; the PostgreSQL URL, if the data is there)
//   lethe.db          SQLite: devices, images, leases, audit (not with PostgreSQL)
//   chunks.db         SQLite: the encrypted chunk store (not with PostgreSQL)
//   master.key        32 random bytes, 0600: wraps every image-version key
//   signing.key       Ed25519 secret, 0600: signs audit checkpoints and manifests
//                     (or a file elsewhere: --signing-key, $LETHE_SIGNING_KEY_FILE)
//   tls/key.pem, tls/cert.pem   self-signed certificate the devices pin
import fs from 'node:fs';
import path from 'node:path';
import { X509Certificate } from 'node:crypto';
import { generate } from 'selfsigned';
import { ADMIN_TOKEN_PREFIX, DEFAULT_LISTEN, KEY_BYTES } from '../common/constants.js';
import { b64u, keyedHash, randomBytes, secureCopy, sha256, signKeyPair, wipe, type SecretKey } from '../common/crypto.js';
import { LetheError } from '../common/errors.js';
import { ensureDir, writeFileAtomic } from '../common/fsutil.js';
import { openServerDb, sqliteFiles } from './db.js';
import { isPostgresUrl, redactUrl, type Sql } from './sql.js';

export interface ServerConfig {
  listen: string;
  publicUrl?: string;
  /** The signing key's public half, base64url: checks a key file kept elsewhere belongs here. */
  auditKey?: string;
  /** A PostgreSQL URL (postgres://…) that every replica shares; without one, SQLite files in the data dir. */
  db?: string;
}

export interface InitResult {
  url: string;
  fingerprint: string;
  adminToken: string;
  /** The key that verifies audit checkpoints, base64url: pin it outside the data dir. */
  auditKey: string;
}

export const files = (dir: string) => ({
  config: path.join(dir, 'config.json'),
  ...sqliteFiles(dir),
  masterKey: path.join(dir, 'master.key'),
  signingKey: path.join(dir, 'signing.key'),
  tlsKey: path.join(dir, 'tls', 'key.pem'),
  tlsCert: path.join(dir, 'tls', 'cert.pem'),
});

export function isInitialized(dir: string): boolean {
  return fs.existsSync(files(dir).config);
}

export function parseListen(listen: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(listen);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) {
    throw new LetheError('CONFIG', `bad listen address: '${listen}'`, { hint: 'use HOST:PORT, e.g. 127.0.0.1:7443' });
  }
  return { host: m[1] ?? m[2], port };
}

export function urlFor(host: string, port: number): string {
  const h = host.includes(':') ? `[${host}]` : host === '0.0.0.0' ? '127.0.0.1' : host;
  return `https://${h}:${port}`;
}

/** SHA-256 of the certificate's DER, 64 lowercase hex digits. */
export function certFingerprint(certPem: string): string {
  return new X509Certificate(certPem).fingerprint256.replace(/:/g, '').toLowerCase();
}

/**
 * A self-signed certificate for `host` (and localhost, 127.0.0.1, ::1), valid ten
 * years: the one devices pin. A rotation's certificate has a subject of its own, so
 * a device trusting both (while it moves) never takes one for the other's issuer.
 */
export async function makeCertificate(host: string, commonName = 'lethe-server'): Promise<{ private: string; cert: string }> {
  const altNames = [
    { type: 2 as const, value: 'localhost' },
    { type: 7 as const, ip: '127.0.0.1' },
    { type: 7 as const, ip: '::1' },
  ];
  if (host !== '127.0.0.1' && host !== 'localhost' && host !== '::1' && host !== '0.0.0.0') {
    altNames.push(/^[\d.]+$|:/.test(host) ? { type: 7, ip: host } : { type: 2, value: host });
  }
  return generate([{ name: 'commonName', value: commonName }], {
    keyType: 'ec',
    curve: 'P-256',
    algorithm: 'sha256',
    notAfterDate: new Date(Date.now() + 10 * 365 * 86400_000),
    extensions: [
      { name: 'basicConstraints', cA: false },
      { name: 'subjectAltName', altNames },
    ],
  });
}

/** Checks a --db value: a PostgreSQL URL. */
export function checkDbUrl(db: string): string {
  if (!isPostgresUrl(db)) {
    throw new LetheError('CONFIG', `bad database URL: '${redactUrl(db).slice(0, 200)}'`, {
      hint: 'give a PostgreSQL URL, e.g. postgres://lethe@db.example:5432/lethe (without --db, the data stays in SQLite files in the data dir)',
    });
  }
  return db;
}

/** What a database remembers of the data dir that made it: a replica with other keys is refused at start. */
const MASTER_CHECK = 'lethe master key check';
const masterCheck = (master: Uint8Array) => keyedHash(master, Buffer.from(MASTER_CHECK)).toString('hex');

/**
 * `signingKeyFile` puts the signing key there instead of in the data dir
 * (docs/audit-log.md); `db` keeps the data in PostgreSQL (docs/fleet.md), which
 * must not hold another server's data.
 */
export async function initDataDir(dir: string, listen = DEFAULT_LISTEN, signingKeyFile?: string, db?: string): Promise<InitResult> {
  const f = files(dir);
  if (isInitialized(dir)) {
    throw new LetheError('CONFIG', `data dir '${dir}' is already initialized`, {
      hint: `run 'lethe server run --data ${dir}', or choose an empty directory`,
    });
  }
  if (db !== undefined) checkDbUrl(db);
  const { host, port } = parseListen(listen);
  // The database first: one that is unreachable or holds another server's data stops init before any key is made.
  ensureDir(dir);
  const store = await openServerDb({ url: db, dir });
  try {
    if (await store.db.get("SELECT 1 AS x FROM settings WHERE key = 'admin_token_sha256'")) {
      throw new LetheError('CONFIG', `the database at ${redactUrl(db ?? f.db)} already holds a Lethe server's data`, {
        hint: "a replica does not run 'init': copy the first server's data dir to it (docs/fleet.md), or give an empty database",
      });
    }
  } catch (e) {
    await store.close();
    throw e;
  }
  ensureDir(path.dirname(f.tlsKey));

  const master = randomBytes(KEY_BYTES);
  writeFileAtomic(f.masterKey, master, 0o600);
  const check = masterCheck(master);
  wipe(master);
  const signing = signKeyPair();
  writeFileAtomic(signingKeyFile ?? f.signingKey, signing.secretKey, 0o600);
  wipe(signing.secretKey);
  const auditKey = b64u.encode(signing.publicKey);

  const pems = await makeCertificate(host);
  writeFileAtomic(f.tlsKey, pems.private, 0o600);
  writeFileAtomic(f.tlsCert, pems.cert, 0o644);

  const adminToken = ADMIN_TOKEN_PREFIX + b64u.encode(randomBytes(32));
  try {
    await store.db.tx(async (t) => {
      const put = 'INSERT INTO settings(key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value';
      await t.run(put, 'admin_token_sha256', sha256(adminToken).toString('hex'));
      await t.run(put, 'audit_key', auditKey);
      await t.run(put, 'master_check', check);
    });
  } finally {
    await store.close();
  }
  // config.json is written last: its presence means the directory is complete.
  writeFileAtomic(f.config, JSON.stringify({ listen, auditKey, ...(db ? { db } : {}) } satisfies ServerConfig, null, 2) + '\n', 0o600);
  return { url: urlFor(host, port), fingerprint: certFingerprint(pems.cert), adminToken, auditKey };
}

export interface LoadedDataDir {
  dir: string;
  config: ServerConfig;
  masterKey: SecretKey;
  signingKey: SecretKey;
  signPublicKey: Buffer;
  tlsKey: string;
  tlsCert: string;
  fingerprint: string;
}

function readSecret(file: string, size: number): SecretKey {
  const st = fs.statSync(file);
  if ((st.mode & 0o077) !== 0) {
    throw new LetheError('CONFIG', `'${file}' is readable by other users (mode ${(st.mode & 0o777).toString(8)})`, {
      hint: `run 'chmod 600 ${file}'`,
    });
  }
  const raw = fs.readFileSync(file);
  try {
    if (raw.length !== size) throw new LetheError('CONFIG', `'${file}' is ${raw.length} bytes, expected ${size}`);
    return secureCopy(raw);
  } finally {
    wipe(raw);
  }
}

function readConfig(dir: string): ServerConfig {
  if (!isInitialized(dir)) {
    throw new LetheError('CONFIG', `no Lethe server data in '${dir}'`, {
      hint: `run 'lethe server init --data ${dir}' first`,
    });
  }
  return JSON.parse(fs.readFileSync(files(dir).config, 'utf8')) as ServerConfig;
}

/** Reads the signing key from `file` (default: the data dir's) and checks it belongs to this data dir. */
function readSigningKey(dir: string, config: ServerConfig, file = files(dir).signingKey): SecretKey {
  if (!fs.existsSync(file)) {
    throw new LetheError('CONFIG', `no audit signing key at '${file}'`, {
      hint: 'pass the file it was moved to with --signing-key (or $LETHE_SIGNING_KEY_FILE)',
    });
  }
  const key = readSecret(file, 64);
  // An Ed25519 libsodium secret key carries its public key in the last 32 bytes.
  if (config.auditKey !== undefined && b64u.encode(key.subarray(32)) !== config.auditKey) {
    wipe(key);
    throw new LetheError('CONFIG', `the signing key in '${file}' is not this data dir's (its audit key is ${config.auditKey})`, {
      hint: "pass the signing key that this data dir's 'lethe server init' made",
    });
  }
  return key;
}

/**
 * The public key the data dir says verifies its checkpoints (config.json, or the half
 * of signing.key in a data dir from before config.json kept it). Whoever holds the data
 * dir can replace it: auditors pin the key from `lethe server init` instead.
 */
export function dataDirAuditKey(dir: string): Buffer {
  const config = readConfig(dir);
  if (config.auditKey !== undefined) return b64u.decode(config.auditKey);
  const key = readSecret(files(dir).signingKey, 64);
  try {
    return Buffer.from(key.subarray(32));
  } finally {
    wipe(key);
  }
}

/** The PostgreSQL URL a data dir's config names, if its data is there. */
export function dataDirDb(dir: string): string | undefined {
  return readConfig(dir).db;
}

export function loadDataDir(dir: string, opts: { signingKeyFile?: string } = {}): LoadedDataDir {
  const config = readConfig(dir);
  const f = files(dir);
  const masterKey = readSecret(f.masterKey, KEY_BYTES);
  const signingKey = readSigningKey(dir, config, opts.signingKeyFile);
  const tlsCert = fs.readFileSync(f.tlsCert, 'utf8');
  return {
    dir,
    config,
    masterKey,
    signingKey,
    signPublicKey: Buffer.from(signingKey.subarray(32)),
    tlsKey: fs.readFileSync(f.tlsKey, 'utf8'),
    tlsCert,
    fingerprint: certFingerprint(tlsCert),
  };
}

/**
 * Refuses to serve a database with keys that are not the ones it was made with
 * (a replica given another data dir's master or signing key would wrap keys and
 * sign heads no other replica can read or check).
 */
export async function checkKeysMatch(db: Sql, data: LoadedDataDir): Promise<void> {
  const rows = await db.all<{ key: string; value: string }>("SELECT key, value FROM settings WHERE key IN ('audit_key', 'master_check')");
  const got = new Map(rows.map((r) => [r.key, r.value]));
  const auditKey = b64u.encode(data.signPublicKey);
  if (got.has('audit_key') && got.get('audit_key') !== auditKey) {
    throw new LetheError('CONFIG', `the database's audit key is ${got.get('audit_key')}, not this data dir's (${auditKey})`, {
      hint: "give every replica a copy of the data dir that 'lethe server init' made for this database (docs/fleet.md)",
    });
  }
  if (got.has('master_check') && got.get('master_check') !== masterCheck(data.masterKey)) {
    throw new LetheError('CONFIG', "this data dir's master key is not the one the database's image keys are wrapped with", {
      hint: "give every replica a copy of the data dir that 'lethe server init' made for this database (docs/fleet.md)",
    });
  }
}
