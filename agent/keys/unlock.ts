// Where a passphrase or TPM PIN comes from (docs/device-keys.md), first that applies:
//   --passphrase-fd N                        read to EOF (a pipe from a secret store)
//   $CREDENTIALS_DIRECTORY/lethe-passphrase  a systemd credential (LoadCredential=)
//   a prompt on the terminal                 when stdin is a TTY, without echo
// The secret lands in locked memory; every intermediate buffer is zeroed, and
// the secret is never logged.
import fs from 'node:fs';
import path from 'node:path';
import { secureBuffer, secureCopy, wipe, type SecretKey } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';

/** Longest passphrase or PIN read, in bytes. */
const MAX_SECRET_BYTES = 1024;
export const CREDENTIAL_NAME = 'lethe-passphrase';

export interface Ask {
  /** 'passphrase' or 'TPM PIN', for prompts and errors */
  what: string;
  /** at enrollment: a prompt asks twice */
  confirm: boolean;
}

/** Gives the secret in locked memory (the caller wipes it); throws DEVICE_LOCKED when there is no way to ask. */
export type AskSecret = (ask: Ask) => Promise<SecretKey>;

/** How to unlock sealed keys: where the secret comes from and which TPM to use. */
export interface Unlock {
  ask: AskSecret;
  tcti?: string;
}

/** A secret known to the program (the demo's random passphrase, tests); a fresh copy each time. */
export function fixedSecret(secret: Uint8Array | string): AskSecret {
  const held = secureCopy(typeof secret === 'string' ? Buffer.from(secret, 'utf8') : secret);
  return async () => secureCopy(held);
}

/** Drops one trailing newline (a file or `echo` adds it); the secret keeps its length. */
function trimmed(buf: SecretKey, n: number): SecretKey {
  let end = n;
  if (end > 0 && buf[end - 1] === 0x0a) end--;
  if (end > 0 && buf[end - 1] === 0x0d) end--;
  return buf.subarray(0, end) as SecretKey;
}

function finish(buf: SecretKey, n: number, from: string, what: string): SecretKey {
  try {
    const s = trimmed(buf, n);
    if (s.length === 0) throw new LetheError('DEVICE_LOCKED', `the ${what} from ${from} is empty`, { hint: `give the ${what} the device keys were sealed with` });
    return secureCopy(s);
  } finally {
    wipe(buf);
  }
}

/** Reads `fd` to EOF into locked memory (a pipe may be non-blocking: EAGAIN waits and reads again). */
export async function readFd(fd: number, what: string): Promise<SecretKey> {
  const buf = secureBuffer(MAX_SECRET_BYTES + 1);
  let n = 0;
  try {
    for (;;) {
      const got = await new Promise<number>((resolve, reject) =>
        fs.read(fd, buf, n, buf.length - n, null, (e, bytes) => (e ? reject(e) : resolve(bytes))),
      ).catch(async (e: NodeJS.ErrnoException) => {
        if (e.code !== 'EAGAIN') throw e;
        await new Promise((r) => setTimeout(r, 20));
        return -1;
      });
      if (got === 0) break;
      if (got > 0) n += got;
      if (n > MAX_SECRET_BYTES) throw new LetheError('BAD_REQUEST', `the ${what} on fd ${fd} is longer than ${MAX_SECRET_BYTES} bytes`);
    }
  } catch (cause) {
    wipe(buf);
    if (cause instanceof LetheError) throw cause;
    throw new LetheError('CONFIG', `could not read the ${what} from fd ${fd}`, { cause, hint: 'pass an open file descriptor: --passphrase-fd 3 3<secret-pipe' });
  }
  return finish(buf, n, `fd ${fd}`, what);
}

function readCredential(file: string, what: string): SecretKey {
  const buf = secureBuffer(MAX_SECRET_BYTES + 1);
  let n = 0;
  try {
    const fd = fs.openSync(file, 'r');
    try {
      for (let got = 1; got > 0 && n <= MAX_SECRET_BYTES; n += got) got = fs.readSync(fd, buf, n, buf.length - n, null);
    } finally {
      fs.closeSync(fd);
    }
  } catch (cause) {
    wipe(buf);
    throw new LetheError('CONFIG', `could not read the systemd credential '${file}'`, { cause });
  }
  if (n > MAX_SECRET_BYTES) {
    wipe(buf);
    throw new LetheError('BAD_REQUEST', `the credential '${file}' is longer than ${MAX_SECRET_BYTES} bytes`);
  }
  return finish(buf, n, `credential '${CREDENTIAL_NAME}'`, what);
}

/** One line from the terminal without echo; Ctrl-C and Ctrl-D give up. */
function promptOnce(prompt: string): Promise<{ buf: SecretKey; n: number }> {
  const stdin = process.stdin;
  const buf = secureBuffer(MAX_SECRET_BYTES + 1);
  let n = 0;
  // Echo off before the prompt shows, so nothing typed after it is echoed.
  stdin.setRawMode(true);
  process.stderr.write(prompt);
  stdin.resume();
  return new Promise((resolve, reject) => {
    const end = (e?: Error) => {
      stdin.off('data', onData);
      stdin.setRawMode(false);
      stdin.pause();
      process.stderr.write('\n');
      if (e) {
        wipe(buf);
        reject(e);
      } else resolve({ buf, n });
    };
    const onData = (chunk: Buffer) => {
      try {
        for (const b of chunk) {
          if (b === 0x0d || b === 0x0a) return end();
          if (b === 0x03 || b === 0x04) return end(new LetheError('DEVICE_LOCKED', 'no passphrase given: the device keys stay sealed'));
          if (b === 0x7f || b === 0x08) {
            if (n > 0) buf[--n] = 0;
          } else if (n < MAX_SECRET_BYTES) buf[n++] = b;
        }
      } finally {
        wipe(chunk);
      }
    };
    stdin.on('data', onData);
  });
}

export async function promptTty(ask: Ask): Promise<SecretKey> {
  const first = await promptOnce(`lethe: ${ask.confirm ? `new ${ask.what}` : ask.what}: `);
  const secret = finish(first.buf, first.n, 'the terminal', ask.what);
  if (!ask.confirm) return secret;
  const again = await promptOnce(`lethe: the ${ask.what} again: `);
  const repeat = finish(again.buf, again.n, 'the terminal', ask.what);
  try {
    if (repeat.length !== secret.length || !repeat.equals(secret)) {
      wipe(secret);
      throw new LetheError('BAD_REQUEST', `the two ${ask.what}s differ`, { hint: 'enroll again and type the same one twice' });
    }
  } finally {
    wipe(repeat);
  }
  return secret;
}

/** The channels a CLI command offers: --passphrase-fd, a systemd credential, the terminal. */
export function secretFromChannels(o: { fd?: number; credentialsDir?: string; tty?: boolean } = {}): AskSecret {
  const credentials = o.credentialsDir ?? process.env.CREDENTIALS_DIRECTORY;
  const tty = o.tty ?? (process.stdin.isTTY === true && typeof process.stdin.setRawMode === 'function');
  return async (ask) => {
    if (o.fd !== undefined) return readFd(o.fd, ask.what);
    if (credentials && fs.existsSync(path.join(credentials, CREDENTIAL_NAME))) return readCredential(path.join(credentials, CREDENTIAL_NAME), ask.what);
    if (tty) return promptTty(ask);
    throw new LetheError('DEVICE_LOCKED', `the device keys are sealed and no ${ask.what} was given`, {
      hint: `run on a terminal, pass --passphrase-fd N, or give systemd credential '${CREDENTIAL_NAME}' (LoadCredential=)`,
    });
  };
}
