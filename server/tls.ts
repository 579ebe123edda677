// TLS certificate rotation across replicas (docs/fleet.md, Key rotation). The
// certificate every replica serves starts as the data dir's; `lethe admin rotate
// tls` makes the next one and keeps it in the database (its key sealed by the
// master key), and every heartbeat then hands it to devices with the server's
// signature over its fingerprint, so they pin it beside the current one.
// `--finish` makes it the one every replica serves (each checks the database
// every few seconds); a device that heard of it connects on, and pins it alone.
import { X509Certificate } from 'node:crypto';
import { b64u, sign, wipe } from '../common/crypto.js';
import { LetheError } from '../common/errors.js';
import { inTx, type Ctx } from './context.js';
import { issueCommand } from './devices.js';
import { connectedDevices } from './push.js';
import { certFingerprint, makeCertificate, parseListen } from './datadir.js';
import { pinMessage } from '../common/tls-pin.js';


const KEYS = { cert: 'tls_cert', key: 'tls_key_sealed', nextCert: 'tls_next_cert', nextKey: 'tls_next_key_sealed' } as const;
const PURPOSE = 'tls key';

export interface TlsPair {
  cert: string;
  key: string;
  fingerprint: string;
}

async function setting(ctx: Ctx, key: string): Promise<string | undefined> {
  return (await ctx.db.get<{ value: string }>('SELECT value FROM settings WHERE key = ?', key))?.value;
}

async function put(ctx: Ctx, key: string, value: string): Promise<void> {
  await ctx.db.run('INSERT INTO settings(key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value', key, value);
}

function pair(ctx: Ctx, cert: string, sealedKey: string): TlsPair {
  const raw = ctx.escrow.openSecret(b64u.decode(sealedKey), PURPOSE);
  try {
    return { cert, key: raw.toString('utf8'), fingerprint: certFingerprint(cert) };
  } finally {
    wipe(raw);
  }
}

/** The certificate and key every replica serves when a rotation finished, else undefined (the data dir's). */
export async function servedTls(ctx: Ctx): Promise<TlsPair | undefined> {
  const cert = await setting(ctx, KEYS.cert);
  const key = await setting(ctx, KEYS.key);
  return cert && key ? pair(ctx, cert, key) : undefined;
}

/** The announced next certificate, signed for devices (heartbeat replies carry it). */
export async function announcedTls(ctx: Ctx): Promise<{ cert: string; fingerprint: string; signature: string } | undefined> {
  const cert = await setting(ctx, KEYS.nextCert);
  if (!cert) return undefined;
  const fingerprint = certFingerprint(cert);
  return { cert, fingerprint, signature: b64u.encode(sign(ctx.data.signingKey, pinMessage(fingerprint))) };
}

/**
 * Step 1: a new certificate, announced to devices at their heartbeats; the current
 * one is still served. Announcing again replaces an announcement not yet finished.
 */
export async function announceTls(ctx: Ctx) {
  const { host } = parseListen(ctx.data.config.listen);
  const pems = await makeCertificate(host, `lethe-server ${new Date(ctx.now()).toISOString()}`);
  const fingerprint = certFingerprint(pems.cert);
  // Devices connected now check in at once (a rotate command on the push channel) and pin it; the rest at their next heartbeat.
  const online = [...(await connectedDevices(ctx))].sort();
  await inTx(ctx, async (ctx) => {
    await put(ctx, KEYS.nextCert, pems.cert);
    await put(ctx, KEYS.nextKey, b64u.encode(ctx.escrow.sealSecret(Buffer.from(pems.private), PURPOSE)));
    for (const id of online) await issueCommand(ctx, id, 'rotate');
    await ctx.audit.append('tls.rotate', null, { phase: 'announced', fingerprint, previous: ctx.data.fingerprint, told: online.length }, ctx.now());
  });
  return { phase: 'announced' as const, fingerprint, previous: ctx.data.fingerprint, notAfter: new X509Certificate(pems.cert).validTo, told: online.length };
}

/** Step 2: every replica serves the announced certificate from its next check of the database. */
export async function finishTls(ctx: Ctx) {
  return inTx(ctx, async (ctx) => {
    const cert = await setting(ctx, KEYS.nextCert);
    const key = await setting(ctx, KEYS.nextKey);
    if (!cert || !key) {
      throw new LetheError('CONFLICT', 'no certificate has been announced', { hint: "run 'lethe admin rotate tls' first, and let devices check in" });
    }
    const fingerprint = certFingerprint(cert);
    await put(ctx, KEYS.cert, cert);
    await put(ctx, KEYS.key, key);
    await ctx.db.run('DELETE FROM settings WHERE key IN (?, ?)', KEYS.nextCert, KEYS.nextKey);
    await ctx.audit.append('tls.rotate', null, { phase: 'switched', fingerprint, previous: ctx.data.fingerprint }, ctx.now());
    return { phase: 'switched' as const, fingerprint, previous: ctx.data.fingerprint };
  });
}
