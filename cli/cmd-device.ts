// lethe enroll TOKEN | lethe heartbeat
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Argv } from 'yargs';
import { LetheError } from '../common/errors.js';
import { b64u } from '../common/crypto.js';
import { openCommand } from '../common/push.js';
import { DeviceClient, closeIdentity, defaultHome, enrollDevice, loadIdentity, revokedError, revokedMarker, type Identity, rotateKeys, control, acknowledgeRevoke, eraseRevokedHome, pendingWipe, performWipe, keepCheckpoint, type Argon2Cost } from '../agent/index.js';
import { SEAL_KINDS, type SealKind } from '../common/constants.js';
import { emit, type OutOpts } from './output.js';
import { unlockFrom, unlockOpts, type UnlockArgs } from './unlock-opts.js';

interface HomeArgs extends OutOpts, UnlockArgs {
  home: string;
}

const homeOpt = <T>(y: Argv<T>) =>
  y.option('home', { type: 'string', describe: 'device home ($LETHE_HOME)', default: defaultHome() });

async function heartbeat(a: HomeArgs): Promise<void> {
  const id = await loadIdentity(a.home, unlockFrom(a));
  const client = new DeviceClient(id);
  try {
    const pending = pendingWipe(a.home);
    if (pending) {
      const r = await performWipe(id, client, pending);
      return finishWipe(a, id.info.deviceId, pending, r.acked);
    }
    const hb = await client.heartbeat().catch((e: unknown) => eraseOnRefusal(a.home, id, client, e));
    const anchorProblem = hb.checkpoint && keepCheckpoint(a.home, id.info.serverSignPublicKey, hb.checkpoint);
    if (anchorProblem) process.stderr.write(`lethe: warning: ${anchorProblem}\n`);
    if (hb.pinProblem) process.stderr.write(`lethe: warning: ${hb.pinProblem}; the current certificate stays the only one trusted\n`);
    // Only a wipe the server signed for this device is carried out (docs/push.md).
    const wipe = hb.commands.find((c) => {
      if (c.type !== 'wipe') return false;
      try {
        return openCommand(b64u.decode(id.info.serverSignPublicKey), id.info.deviceId, c.signed).type === 'wipe';
      } catch (e) {
        process.stderr.write(`lethe: warning: refused a wipe command: ${(e as Error).message}\n`);
        return false;
      }
    });
    if (wipe) {
      const r = await performWipe(id, client, wipe.id);
      return finishWipe(a, id.info.deviceId, wipe.id, r.acked);
    }
    emit(a, { deviceId: id.info.deviceId, ...hb }, () =>
      [`device ${id.info.deviceId} is ${hb.status}`, hb.commands.length ? `commands: ${hb.commands.map((c) => c.type).join(', ')}` : 'no pending commands'].join('\n'),
    );
  } finally {
    client.close();
    closeIdentity(id);
  }
}

/**
 * The server refused this device as revoked or wiped: it erases its keys and
 * cache as the agent does (revocation implies a wipe on the device), a revoked
 * one acknowledges that, and the command fails saying it must be enrolled again.
 */
async function eraseOnRefusal(home: string, id: Identity, client: DeviceClient, e: unknown): Promise<never> {
  if (!(e instanceof LetheError) || (e.code !== 'DEVICE_REVOKED' && e.code !== 'DEVICE_WIPED')) throw e;
  const status = e.code === 'DEVICE_WIPED' ? 'wiped' : 'revoked';
  const removed = eraseRevokedHome(home, id.info.deviceId, status);
  if (status === 'revoked') await acknowledgeRevoke(client, home, removed, "erased by 'lethe heartbeat'");
  throw revokedError(home, revokedMarker(home)!);
}

function finishWipe(a: HomeArgs, deviceId: string, command: string, acked: boolean): void {
  emit(a, { deviceId, wiped: true, command, acknowledged: acked }, () =>
    acked
      ? `device ${deviceId} was wiped on IT's order; its local data and keys are gone`
      : `device ${deviceId} wiped its local data on IT's order; the acknowledgement is pending (run 'lethe heartbeat' when online)`,
  );
  if (!acked) process.exitCode = 1;
}

export function deviceCommands(y: Argv) {
  return y
    .command(
      'enroll <token>',
      'enroll this device with a one-time token from IT',
      (y) =>
        unlockOpts(homeOpt(y))
          .positional('token', { type: 'string', demandOption: true })
          .option('name', { type: 'string', default: os.hostname(), describe: 'device name shown to IT' })
          .option('seal', {
            choices: SEAL_KINDS,
            default: 'passphrase' as SealKind,
            describe: "how the device keys are kept at rest: the TPM with a PIN, a passphrase (Argon2id), or none (refused by the shipped policies)",
          })
          .option('argon2', { choices: ['moderate', 'interactive'] as const, default: 'moderate' as Argon2Cost, describe: 'Argon2id cost of a passphrase seal' })
          .option('server', {
            type: 'string',
            array: true,
            describe: "another URL of the same server (a replica, docs/fleet.md): tried in turn when one cannot be reached; repeat for each",
          }),
      async (a) => {
        const seal = a.seal as SealKind;
        const servers = ((a.server as string[] | undefined) ?? []).map(checkServerUrl);
        const info = await enrollDevice(String(a.home), String(a.token), String(a.name), {
          seal,
          unlock: seal === 'none' ? undefined : unlockFrom(a),
          argon2: a.argon2 as Argon2Cost,
          servers,
        });
        emit(a as unknown as OutOpts, { deviceId: info.deviceId, seal }, () => `enrolled as ${info.deviceId} with ${info.server}; keys sealed: ${seal}`);
      },
    )
    .command('heartbeat', 'check in with the server and act on its commands (wipe); a revoked device erases its keys', (y) => unlockOpts(homeOpt(y)), async (a) => {
      await heartbeat(a as unknown as HomeArgs);
    })
    .command('device', "this device's own keys", (y) =>
      y
        .command(
          'rotate-keys',
          "replace this device's signing and box keys with new ones, sealed as the old ones were (the server takes them at once; the agent must be stopped)",
          (y) => unlockOpts(homeOpt(y)),
          async (a) => {
            const home = String(a.home);
            if (await agentRunning(home)) {
              throw new LetheError('CONFLICT', `the agent is running on '${home}'`, { hint: "stop it first ('lethe agent stop'), then rotate the keys" });
            }
            const r = await rotateKeys(home, unlockFrom(a as unknown as UnlockArgs));
            emit(a as unknown as OutOpts, r, () =>
              `${r.resumed ? 'finished the interrupted rotation: ' : ''}device ${r.deviceId} now signs with ${r.signPublicKey.slice(0, 16)}…${r.sent ? '' : ' (the server had taken it already)'}; the old keys are gone`,
            );
          },
        )
        .demandCommand(1, 'name a device command'),
    );
}

/** Whether an agent answers on the home's control socket. */
async function agentRunning(home: string): Promise<boolean> {
  if (!fs.existsSync(path.join(home, 'agent.sock'))) return false;
  return control(home, { cmd: 'status' }).then(
    () => true,
    () => false,
  );
}


/** An https:// URL of a server replica, or a usage error naming it. */
function checkServerUrl(u: string): string {
  let url: URL | undefined;
  try {
    url = new URL(u);
  } catch {
    url = undefined;
  }
  if (!url || url.protocol !== 'https:' || url.pathname.replace(/\/+$/, '') !== '') {
    throw new LetheError('BAD_REQUEST', `bad server URL: '${u.slice(0, 200)}'`, { hint: 'give an https:// URL without a path, e.g. https://lethe2.example:7443' });
  }
  return url.origin;
}
