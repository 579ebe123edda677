// The TPM 2.0 side of sealed device keys, through tpm2-tools (docs/device-keys.md).
// At enrollment the TPM makes an HMAC key under the owner hierarchy's ECC storage
// primary, with the PIN as its authorization; its public and wrapped private parts
// go into the sealed key files' header. The KEK is HMAC-SHA256(that key,
// TPM_KEK_CONTEXT): only this TPM, given the PIN, can compute it. The PIN goes to
// the tools on stdin (`-p file:-`), never on a command line; the HMAC key is
// dictionary-attack protected (no `noda`), so wrong PINs count toward the TPM's lockout.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { KEY_BYTES, TPM_KEK_CONTEXT } from '../../common/constants.js';
import { secureBuffer, wipe, type SecretKey } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';

/** Attributes of the HMAC key: bound to this TPM and parent, made inside it, used with the PIN. */
const HMAC_ATTRIBUTES = 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign';
/** TPM_RC_AUTH_FAIL and TPM_RC_BAD_AUTH (session 1): a wrong PIN. */
const WRONG_PIN = /0x98E|0x9A2|authorization HMAC check failed/i;
/** TPM_RC_LOCKOUT. */
const LOCKED_OUT = /0x921|lockout/i;

/** The TCTI the tools use: --tpm, then $LETHE_TPM_TCTI, then tpm2-tools' own default (the kernel's resource manager). */
export function tctiFrom(option?: string): string | undefined {
  return option || process.env.LETHE_TPM_TCTI || undefined;
}

interface Run {
  code: number;
  stdout: Buffer;
  stderr: string;
}

/** Runs one tpm2-tools command; `stdin` (the PIN) is written and the pipe closed. stdout is the caller's to wipe. */
function tool(name: string, args: string[], tcti: string | undefined, stdin?: Uint8Array): Promise<Run> {
  return new Promise((resolve, reject) => {
    const env = { ...process.env, ...(tcti ? { TPM2TOOLS_TCTI: tcti } : {}) };
    const p = spawn(name, args, { env, stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let err = '';
    p.stdout.on('data', (d: Buffer) => out.push(d));
    p.stderr.on('data', (d) => (err += d));
    p.on('error', (e: NodeJS.ErrnoException) =>
      reject(
        e.code === 'ENOENT'
          ? new LetheError('TPM_UNAVAILABLE', `'${name}' is not installed`, { hint: 'install tpm2-tools (apt-get install tpm2-tools)', cause: e })
          : e,
      ),
    );
    p.on('close', (code) => {
      const stdout = Buffer.concat(out);
      for (const b of out) wipe(b);
      resolve({ code: code ?? -1, stdout, stderr: err });
    });
    p.stdin.on('error', () => {}); // a tool that exits early closes its stdin
    // The caller's locked buffer itself (no copy to wipe); it waits for the tool to exit before wiping it.
    p.stdin.end(stdin);
  });
}

/** Throws the error a failed tool run means: wrong PIN, lockout, or no TPM. */
function failed(step: string, r: Run, tcti: string | undefined): never {
  const last = r.stderr.trim().split('\n').filter(Boolean).slice(-1)[0] ?? `exit ${r.code}`;
  if (LOCKED_OUT.test(r.stderr) && !WRONG_PIN.test(r.stderr)) {
    throw new LetheError('UNLOCK_FAILED', 'the TPM is in dictionary-attack lockout after too many wrong PINs', {
      hint: 'wait for its lockout to recover (tpm2_getcap properties-variable shows the interval), or ask IT to reset it',
    });
  }
  if (WRONG_PIN.test(r.stderr)) {
    throw new LetheError('UNLOCK_FAILED', 'wrong TPM PIN: the device keys did not open', {
      hint: "try again with the right PIN; each wrong PIN counts toward the TPM's lockout",
    });
  }
  throw new LetheError('TPM_UNAVAILABLE', `the TPM did not answer ${step} (${tcti ?? 'the default TCTI'}): ${last}`, {
    hint: 'check the TPM (ls /dev/tpmrm0, membership of the tss group) or --tpm / $LETHE_TPM_TCTI',
  });
}

/**
 * Runs `steps` in a private scratch directory (context files: TPM-encrypted, not
 * secret) and flushes the transient objects they loaded after each one: without a
 * resource manager (a swtpm TCTI) they would stay loaded and fill the TPM's slots.
 */
async function inScratch<T>(tcti: string | undefined, steps: (dir: string, flush: () => Promise<void>) => Promise<T>): Promise<T> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lethe-tpm-'));
  const flush = async () => void (await tool('tpm2_flushcontext', ['-t'], tcti));
  try {
    return await steps(dir, flush);
  } finally {
    await flush().catch(() => {});
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function primary(dir: string, tcti: string | undefined, flush: () => Promise<void>): Promise<string> {
  const ctx = path.join(dir, 'primary.ctx');
  const r = await tool('tpm2_createprimary', ['-Q', '-C', 'o', '-G', 'ecc', '-c', ctx], tcti);
  if (r.code !== 0) failed('tpm2_createprimary', r, tcti);
  await flush();
  return ctx;
}

/** TPM2B_PUBLIC ‖ TPM2B_PRIVATE as one header: public length (2, LE) ‖ public ‖ private length (2, LE) ‖ private. */
function packHeader(pub: Buffer, priv: Buffer): Buffer {
  const n = (b: Buffer) => {
    const l = Buffer.alloc(2);
    l.writeUInt16LE(b.length);
    return l;
  };
  return Buffer.concat([n(pub), pub, n(priv), priv]);
}

function unpackHeader(h: Buffer): { pub: Buffer; priv: Buffer } {
  const bad = () => new LetheError('CONFIG', 'the sealed keys\' TPM header is damaged', { hint: 'enroll again with a new token' });
  if (h.length < 4) throw bad();
  const pl = h.readUInt16LE(0);
  if (h.length < 4 + pl) throw bad();
  const rl = h.readUInt16LE(2 + pl);
  if (h.length !== 4 + pl + rl) throw bad();
  return { pub: h.subarray(2, 2 + pl), priv: h.subarray(4 + pl) };
}

/** Makes the TPM's HMAC key with `pin` as its authorization; returns the header that names it. */
export async function tpmCreate(tcti: string | undefined, pin: Uint8Array): Promise<Buffer> {
  return inScratch(tcti, async (dir, flush) => {
    const parent = await primary(dir, tcti, flush);
    const [pub, priv] = [path.join(dir, 'k.pub'), path.join(dir, 'k.priv')];
    const r = await tool('tpm2_create', ['-Q', '-C', parent, '-G', 'hmac', '-a', HMAC_ATTRIBUTES, '-p', 'file:-', '-u', pub, '-r', priv], tcti, pin);
    if (r.code !== 0) failed('tpm2_create', r, tcti);
    return packHeader(fs.readFileSync(pub), fs.readFileSync(priv));
  });
}

/** The KEK: HMAC-SHA256(the header's TPM key, TPM_KEK_CONTEXT), into locked memory. A wrong PIN throws UNLOCK_FAILED. */
export async function tpmKek(tcti: string | undefined, header: Buffer, pin: Uint8Array): Promise<SecretKey> {
  const { pub, priv } = unpackHeader(header);
  return inScratch(tcti, async (dir, flush) => {
    const parent = await primary(dir, tcti, flush);
    const f = { pub: path.join(dir, 'k.pub'), priv: path.join(dir, 'k.priv'), ctx: path.join(dir, 'k.ctx'), msg: path.join(dir, 'msg') };
    fs.writeFileSync(f.pub, pub);
    fs.writeFileSync(f.priv, priv);
    fs.writeFileSync(f.msg, TPM_KEK_CONTEXT);
    const load = await tool('tpm2_load', ['-Q', '-C', parent, '-u', f.pub, '-r', f.priv, '-c', f.ctx], tcti);
    if (load.code !== 0) failed('tpm2_load (is this the TPM the keys were sealed to?)', load, tcti);
    await flush();
    const r = await tool('tpm2_hmac', ['-c', f.ctx, '-p', 'file:-', f.msg], tcti, pin);
    try {
      if (r.code !== 0) failed('tpm2_hmac', r, tcti);
      if (r.stdout.length !== KEY_BYTES) throw new LetheError('TPM_UNAVAILABLE', `tpm2_hmac gave ${r.stdout.length} bytes, not ${KEY_BYTES}`);
      const key = secureBuffer(KEY_BYTES);
      key.set(r.stdout);
      return key;
    } finally {
      wipe(r.stdout);
    }
  });
}
