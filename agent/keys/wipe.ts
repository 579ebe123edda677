// Acting on a wipe command: everything in the device home that could open or
// hold VM data goes first (the X25519 key that opens sealed keys, caches);
// the signing key stays only until the acknowledgement is sent, so the wipe
// can be confirmed even if the server is unreachable right now.
// Acting on a revocation: the same erasure at once, key files included (the
// acknowledgement is signed with the key still in memory).
import fs from 'node:fs';
import path from 'node:path';
import { iso } from '../../common/duration.js';
import { forgetIdentityKeys, homeFiles, overwriteFile, revokedMarker, writeRevokedMarker, type Identity } from './identity.js';
import type { DeviceClient } from '../remote/device-client.js';
import { withRetry } from '../remote/fetcher.js';

const KEEP_UNTIL_ACK = new Set(['device.json', 'server-cert.pem', 'sign.key', 'wipe-pending.json']);

export function wipeLocalData(home: string): string[] {
  const removed: string[] = [];
  for (const name of fs.readdirSync(home)) {
    if (KEEP_UNTIL_ACK.has(name)) continue;
    const p = path.join(home, name);
    if (homeFiles(home).secrets.includes(p)) overwriteFile(p);
    fs.rmSync(p, { recursive: true, force: true });
    removed.push(name);
  }
  return removed;
}

/** Wipes local data, acknowledges, then removes what remained. Returns whether the ack reached the server. */
export async function performWipe(id: Identity, client: DeviceClient, commandId: string, zeroedAfterMs?: number): Promise<{ acked: boolean; removed: string[] }> {
  const f = homeFiles(id.home);
  fs.writeFileSync(path.join(id.home, 'wipe-pending.json'), JSON.stringify({ command: commandId }) + '\n', { mode: 0o600 });
  const removed = wipeLocalData(id.home);
  try {
    await client.ack(commandId, true, `removed ${removed.length} item(s)`, zeroedAfterMs);
  } catch {
    return { acked: false, removed };
  }
  overwriteFile(f.signKey);
  fs.rmSync(id.home, { recursive: true, force: true });
  return { acked: true, removed };
}

export function pendingWipe(home: string): string | undefined {
  const p = path.join(home, 'wipe-pending.json');
  if (!fs.existsSync(p)) return undefined;
  return (JSON.parse(fs.readFileSync(p, 'utf8')) as { command: string }).command;
}

/** What a revoked device keeps: which device it was (not secret) and the marker saying it was revoked. */
const KEEP_AFTER_REVOKE = new Set(['device.json', 'server-cert.pem', 'revoked.json']);
/** How long a revoked agent keeps trying to acknowledge (the server answered it a moment ago). */
export const REVOKE_ACK_WINDOW_MS = 15_000;

/**
 * Revocation implies a wipe on the device (docs/lease-state.md): a device the
 * server refused as revoked or wiped erases at once what a wipe erases. The
 * marker goes first (no command uses the home again), then every key file
 * (forgetIdentityKeys), then everything else but device.json and the server
 * certificate. Returns the names removed.
 */
export function eraseRevokedHome(home: string, deviceId: string, status: 'revoked' | 'wiped'): string[] {
  if (!fs.existsSync(homeFiles(home).info)) return [];
  writeRevokedMarker(home, { deviceId, status, at: iso(Date.now()), acknowledged: false });
  const removed = forgetIdentityKeys(home);
  for (const name of fs.readdirSync(home)) {
    if (KEEP_AFTER_REVOKE.has(name)) continue;
    fs.rmSync(path.join(home, name), { recursive: true, force: true });
    removed.push(name);
  }
  return removed;
}

/**
 * After eraseRevokedHome: tells the server, signed with the key still in memory
 * (its file is gone), that this device erased its keys and cache; the server
 * audits it (`revoke.ack`). Transient failures are retried for
 * REVOKE_ACK_WINDOW_MS; after that the key in memory goes too and the
 * acknowledgement is lost. `by` says who erased (the agent, or 'lethe
 * heartbeat'). Returns whether the server has it.
 */
export async function acknowledgeRevoke(
  client: DeviceClient,
  home: string,
  removed: string[],
  by = 'keys zeroed, VM stopped',
  zeroedAfterMs?: number,
): Promise<boolean> {
  const detail = `${by}; removed ${removed.length} item(s): ${removed.join(', ')}`.slice(0, 1024);
  try {
    await withRetry(() => client.ackRevoke(detail, zeroedAfterMs), Date.now() + REVOKE_ACK_WINDOW_MS);
  } catch {
    return false;
  }
  const m = revokedMarker(home);
  if (m) writeRevokedMarker(home, { ...m, acknowledged: true });
  return true;
}
