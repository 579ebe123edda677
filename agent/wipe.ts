// Acting on a wipe command: everything in the device home that could open or
// hold VM data goes first (the X25519 key that opens sealed keys, caches);
// the signing key stays only until the acknowledgement is sent, so the wipe
// can be confirmed even if the server is unreachable right now.
import fs from 'node:fs';
import path from 'node:path';
import { homeFiles, type Identity } from './identity.js';
import type { DeviceClient } from './device-client.js';

const KEEP_UNTIL_ACK = new Set(['device.json', 'server-cert.pem', 'sign.key', 'wipe-pending.json']);

export function wipeLocalData(home: string): string[] {
  const removed: string[] = [];
  for (const name of fs.readdirSync(home)) {
    if (KEEP_UNTIL_ACK.has(name)) continue;
    const p = path.join(home, name);
    if (name === 'box.key') overwrite(p);
    fs.rmSync(p, { recursive: true, force: true });
    removed.push(name);
  }
  return removed;
}

/** Overwrites a small key file before unlinking it (best effort on copy-on-write filesystems). */
function overwrite(file: string): void {
  try {
    const size = fs.statSync(file).size;
    const fd = fs.openSync(file, 'r+');
    try {
      fs.writeSync(fd, Buffer.alloc(size));
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    // already gone
  }
}

/** Wipes local data, acknowledges, then removes what remained. Returns whether the ack reached the server. */
export async function performWipe(id: Identity, client: DeviceClient, commandId: string): Promise<{ acked: boolean; removed: string[] }> {
  const f = homeFiles(id.home);
  fs.writeFileSync(path.join(id.home, 'wipe-pending.json'), JSON.stringify({ command: commandId }) + '\n', { mode: 0o600 });
  const removed = wipeLocalData(id.home);
  try {
    await client.ack(commandId, true, `removed ${removed.length} item(s)`);
  } catch {
    return { acked: false, removed };
  }
  overwrite(f.signKey);
  fs.rmSync(id.home, { recursive: true, force: true });
  return { acked: true, removed };
}

export function pendingWipe(home: string): string | undefined {
  const p = path.join(home, 'wipe-pending.json');
  if (!fs.existsSync(p)) return undefined;
  return (JSON.parse(fs.readFileSync(p, 'utf8')) as { command: string }).command;
}
