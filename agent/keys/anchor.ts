// The audit anchor a device keeps (docs/audit-log.md, Anchors): the newest signed
// audit head its heartbeats brought, in checkpoint.json in its home. Not secret.
// An auditor checks the server's log against it with `lethe audit verify --against`:
// the log must still hold that entry with that hash, so a cut or rewrite before it shows.
import fs from 'node:fs';
import path from 'node:path';
import { checkpointSigned } from '../../common/audit-hash.js';
import { b64u } from '../../common/crypto.js';
import { writeFileAtomic } from '../../common/fsutil.js';
import { SignedCheckpoint, type TSignedCheckpoint } from '../../common/wire.js';

export const checkpointFile = (home: string) => path.join(home, 'checkpoint.json');

export interface KeptCheckpoint extends TSignedCheckpoint {
  /** When this device received it (its own clock). */
  receivedAt: string;
}

export function readCheckpoint(home: string): KeptCheckpoint | undefined {
  try {
    return JSON.parse(fs.readFileSync(checkpointFile(home), 'utf8')) as KeptCheckpoint;
  } catch {
    return undefined;
  }
}

/**
 * Keeps `offered` (a heartbeat's checkpoint) if it is signed by the pinned server key
 * and newer than the one kept. Returns what is wrong with it, if anything: a checkpoint
 * behind or beside the kept one means the server's log was cut or rewritten.
 */
export function keepCheckpoint(home: string, serverSignPublicKey: string, offered: unknown): string | undefined {
  const parsed = SignedCheckpoint.safeParse(offered);
  if (!parsed.success) return "the server's audit checkpoint is malformed";
  const cp = parsed.data;
  if (!checkpointSigned(b64u.decode(serverSignPublicKey), cp)) {
    return `the server's audit checkpoint (entry ${cp.seq}) is not signed by the key pinned at enrollment`;
  }
  const kept = readCheckpoint(home);
  if (kept && cp.seq < kept.seq) {
    return `the server's audit head (entry ${cp.seq}) is behind the checkpoint this device keeps (entry ${kept.seq}): its log was cut`;
  }
  if (kept && cp.seq === kept.seq) {
    return cp.hash === kept.hash ? undefined : `the server's audit entry ${cp.seq} differs from the checkpoint this device keeps: its log was rewritten`;
  }
  const next: KeptCheckpoint = { seq: cp.seq, hash: cp.hash, signature: cp.signature, receivedAt: new Date().toISOString() };
  writeFileAtomic(checkpointFile(home), JSON.stringify(next, null, 2) + '\n', 0o644);
  return undefined;
}
