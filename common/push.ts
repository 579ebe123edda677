// The push channel (docs/push.md): commands the server sends a device the moment
// an admin gives them, over a WebSocket the device opened with a signed request.
//
// Every command is signed by the server's signing key:
//
//   message = "LETHE-PUSH-V1\n" body        body = the command as JSON, sent as is
//
// and numbered per device (seq 1, 2, 3…), so a device acts on each once: a
// command signed by another key, for another device, or numbered at or below the
// last one it carried out, is refused. Heartbeat answers carry the same signed
// commands: the push is the fast path, the heartbeat the fallback.
import { z } from 'zod';
import { b64u, sign, verify } from './crypto.js';

export const PUSH_CONTEXT = 'LETHE-PUSH-V1';
export const PUSH_PATH = '/v1/device/push';
export const COMMAND_TYPES = ['wipe', 'revoke', 'lease-end', 'policy', 'rotate'] as const;
export type CommandType = (typeof COMMAND_TYPES)[number];

export const PushCommand = z.strictObject({
  v: z.literal(1),
  device: z.string().min(1).max(64),
  seq: z.number().int().positive(),
  id: z.string().min(1).max(64),
  type: z.enum(COMMAND_TYPES),
  issuedAt: z.string(),
  /** lease-end: the lease that ended. */
  lease: z.string().max(64).optional(),
  /** policy: the image whose policy changed. */
  image: z.string().max(256).optional(),
});
export type TPushCommand = z.infer<typeof PushCommand>;

/** A command as it travels: its JSON text and the server's signature over it. */
export const SignedCommand = z.strictObject({ body: z.string().max(4096), sig: z.string().max(128) });
export type TSignedCommand = z.infer<typeof SignedCommand>;

/** Frames from the server. */
export type ServerFrame = { t: 'hello'; replica: string; serverTime: string } | ({ t: 'cmd' } & TSignedCommand);

/** Frames from the device: the acknowledgement of a command it carried out (or could not). */
export const AckFrame = z.strictObject({
  t: z.literal('ack'),
  id: z.string().min(1).max(64),
  ok: z.boolean(),
  detail: z.string().max(1024).optional(),
  /** Milliseconds from the command's arrival on the device to its keys zeroed (wipe, revoke, lease-end). */
  zeroedAfterMs: z.number().int().nonnegative().max(86_400_000).optional(),
});
export type TAckFrame = z.infer<typeof AckFrame>;

const message = (body: string) => Buffer.from(`${PUSH_CONTEXT}\n${body}`, 'utf8');

export function signCommand(secretKey: Uint8Array, cmd: TPushCommand): TSignedCommand {
  const body = JSON.stringify(cmd);
  return { body, sig: b64u.encode(sign(secretKey, message(body))) };
}

export type PushRefusal = 'malformed' | 'signature' | 'device';

export class PushRefused extends Error {
  constructor(
    readonly reason: PushRefusal,
    message: string,
  ) {
    super(message);
  }
}

/** Checks a signed command for `deviceId` against the server's public key; throws PushRefused, naming why. */
export function openCommand(serverPublicKey: Uint8Array, deviceId: string, signed: unknown): TPushCommand {
  const s = SignedCommand.safeParse(signed);
  if (!s.success) throw new PushRefused('malformed', 'a pushed command is malformed');
  let sig: Buffer;
  try {
    sig = b64u.decode(s.data.sig);
  } catch {
    throw new PushRefused('malformed', 'a pushed command has a malformed signature');
  }
  if (sig.length !== 64 || !verify(serverPublicKey, message(s.data.body), sig)) {
    throw new PushRefused('signature', "a pushed command's signature is not the server's");
  }
  let cmd: TPushCommand;
  try {
    cmd = PushCommand.parse(JSON.parse(s.data.body));
  } catch {
    throw new PushRefused('malformed', 'a signed command is not one this device understands');
  }
  if (cmd.device !== deviceId) throw new PushRefused('device', `a pushed command (#${cmd.seq}) is for device ${cmd.device}, not this one`);
  return cmd;
}
