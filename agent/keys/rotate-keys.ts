// `lethe device rotate-keys`: the device replaces its own signing and box keys
// (docs/device-keys.md, Rotation), in steps that survive a crash at any point:
//
//   1. new key pairs, sealed like the old ones, into sign.key.next and box.key.next;
//      then rotate.json with their public halves (its presence: both files are whole)
//   2. POST /v1/device/keys/rotate, signed with the current key, the new signing key's
//      signature over the new public keys inside: from the server's commit on, only
//      the new keys count
//   3. each .next file renamed over its key, device.json rewritten, rotate.json removed
//
// Run again after a crash, it goes on from where the files say: before step 2 landed
// it sends it (the server may have it already: then the new key is what it
// accepts); after, it finishes step 3. Until then the agent refuses to start.
import fs from 'node:fs';
import { b64u, boxKeyPair, sign as signWith, signKeyPair, wipe } from '../../common/crypto.js';
import { isLetheError, LetheError } from '../../common/errors.js';
import { writeFileAtomic } from '../../common/fsutil.js';
import { rotationMessage } from '../../common/signing.js';
import { DeviceClient } from '../remote/device-client.js';
import { homeFiles, openHome, pendingRotation, readKeyFile, writeKeyFile, type Identity, type PendingRotation } from './identity.js';
import type { Unlock } from './unlock.js';

export interface RotateResult {
  deviceId: string;
  signPublicKey: string;
  boxPublicKey: string;
  /** The server took the new keys now (false: it had them already, from a run that was cut short). */
  sent: boolean;
  /** This run finished a rotation an earlier one began. */
  resumed: boolean;
}

export interface RotateSteps {
  /** Stop after this step (a crash there, for tests). */
  stopAfter?: 'prepared' | 'sent';
}

export async function rotateKeys(home: string, unlock: Unlock | undefined, steps: RotateSteps = {}): Promise<RotateResult> {
  const f = homeFiles(home);
  const resumed = pendingRotation(home) !== undefined;
  const { id, kek, open } = await openHome(home, unlock);
  let next: { sign: { publicKey: Buffer; secretKey: Buffer }; box: { publicKey: Buffer; secretKey: Buffer } } | undefined;
  try {
    let pending = pendingRotation(home);
    const unmoved = fs.existsSync(f.signKeyNext) && fs.existsSync(f.boxKeyNext);
    if (!pending) {
      const s = signKeyPair();
      const b = boxKeyPair();
      next = { sign: { publicKey: Buffer.from(s.publicKey), secretKey: s.secretKey as Buffer }, box: { publicKey: Buffer.from(b.publicKey), secretKey: b.secretKey as Buffer } };
      writeKeyFile(f.signKeyNext, 'sign', next.sign.secretKey, kek);
      writeKeyFile(f.boxKeyNext, 'box', next.box.secretKey, kek);
      pending = { signPublicKey: b64u.encode(next.sign.publicKey), boxPublicKey: b64u.encode(next.box.publicKey) };
      writeFileAtomic(f.rotation, JSON.stringify(pending) + '\n', 0o600);
      if (steps.stopAfter === 'prepared') return result(id, pending, false, resumed);
    }
    let sent = false;
    if (unmoved || !resumed) {
      next ??= {
        sign: { publicKey: b64u.decode(pending.signPublicKey), secretKey: readKeyFile(f.signKeyNext, 64, open('sign')) as Buffer },
        box: { publicKey: b64u.decode(pending.boxPublicKey), secretKey: readKeyFile(f.boxKeyNext, 32, open('box')) as Buffer },
      };
      sent = await send(id, pending, next.sign.secretKey);
      if (steps.stopAfter === 'sent') return result(id, pending, sent, resumed);
    }
    // Step 3: the server holds the new keys; each file moves into place (a rename, resumable one by one).
    if (fs.existsSync(f.signKeyNext)) fs.renameSync(f.signKeyNext, f.signKey);
    if (fs.existsSync(f.boxKeyNext)) fs.renameSync(f.boxKeyNext, f.boxKey);
    writeFileAtomic(f.info, JSON.stringify({ ...id.info, signPublicKey: pending.signPublicKey, boxPublicKey: pending.boxPublicKey }, null, 2) + '\n', 0o600);
    fs.rmSync(f.rotation, { force: true });
    return result(id, pending, sent, resumed);
  } finally {
    wipe(id.sign.secretKey, id.box.secretKey, kek?.key, next?.sign.secretKey, next?.box.secretKey);
  }
}

const result = (id: Identity, p: PendingRotation, sent: boolean, resumed: boolean): RotateResult => ({ deviceId: id.info.deviceId, ...p, sent, resumed });

/**
 * Step 2, signed with the current key; if the server refuses that key, the same
 * request signed with the new one says whether it already holds the new keys
 * (a run cut short after the server's commit). Returns whether this call changed them.
 */
async function send(id: Identity, p: PendingRotation, newSignSecret: Buffer): Promise<boolean> {
  const body = { ...p, proof: b64u.encode(signWith(newSignSecret, rotationMessage(id.info.deviceId, p.signPublicKey, p.boxPublicKey))) };
  const asOld = new DeviceClient(id);
  try {
    return (await asOld.signedJson<{ rotated: boolean }>('POST', '/v1/device/keys/rotate', body)).rotated;
  } catch (e) {
    if (!isLetheError(e, 'AUTH_FAILED')) throw e;
  } finally {
    asOld.close();
  }
  const asNew = new DeviceClient({ ...id, sign: { publicKey: b64u.decode(p.signPublicKey), secretKey: newSignSecret } });
  try {
    await asNew.signedJson('POST', '/v1/device/keys/rotate', body);
    return false;
  } catch (e) {
    if (isLetheError(e, 'AUTH_FAILED')) {
      throw new LetheError('AUTH_FAILED', 'the server takes neither the current nor the new keys of this device', {
        hint: 'the device may have been enrolled again elsewhere, or removed: ask IT',
      });
    }
    throw e;
  } finally {
    asNew.close();
  }
}
