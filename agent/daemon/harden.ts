// Process hardening for the agent: no core dumps, no ptrace by other
// processes of the same user (PR_SET_DUMPABLE 0 does both on Linux), and
// RLIMIT_CORE 0 for good measure; and glibc overwriting every heap block it
// frees. koffi calls libc directly (~0.2 µs a call).
import koffi from 'koffi';
import { LetheError } from '../../common/errors.js';

const PR_GET_DUMPABLE = 3;
const PR_SET_DUMPABLE = 4;

/** mallopt's parameter (malloc.h): freed bytes are set to the value's low byte, new ones to its complement. */
const M_PERTURB = -6;
const PERTURB_BYTE = 0x5a;

let prctl: ((option: number, a: number, b: number, c: number, d: number) => number) | undefined;
let mallopt: ((param: number, value: number) => number) | undefined;

function libc() {
  if (!prctl) {
    const lib = koffi.load('libc.so.6');
    prctl = lib.func('int prctl(int, unsigned long, unsigned long, unsigned long, unsigned long)') as unknown as typeof prctl;
    mallopt = lib.func('int mallopt(int, int)') as unknown as typeof mallopt;
  }
  return prctl!;
}

/** Makes this process non-dumpable; throws if the kernel refuses. */
export function makeNonDumpable(): void {
  if (libc()(PR_SET_DUMPABLE, 0, 0, 0, 0) !== 0) throw new LetheError('CONFIG', 'cannot make the agent non-dumpable: prctl(PR_SET_DUMPABLE, 0) failed', { hint: 'the agent keeps keys in memory and will not run dumpable; check the kernel (Linux) and seccomp rules' });
}

export function isDumpable(): boolean {
  return libc()(PR_GET_DUMPABLE, 0, 0, 0, 0) !== 0;
}

/**
 * Makes glibc overwrite every heap block when it is freed. Node resizes each socket
 * read to its length, which can leave the bytes behind in a freed block: without
 * this, a guest write's payload was found in freed heap memory after the agent had
 * zeroed the copy it was handed (test/integration/disk-sensitive.test.ts).
 * @throws Error if glibc refuses
 */
export function wipeHeapOnFree(): void {
  libc();
  if (mallopt!(M_PERTURB, PERTURB_BYTE) !== 1) throw new LetheError('CONFIG', 'cannot make glibc overwrite freed memory: mallopt(M_PERTURB) failed', { hint: 'the agent needs glibc (not musl)' });
}
