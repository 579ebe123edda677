// Byte comparisons that say where two buffers part, instead of "expected false to equal true".
import { AssertionError } from 'chai';

/** Throws, naming the first differing offset and the bytes around it, unless `actual` equals `expected`. */
export function expectSameBytes(actual: Buffer | Uint8Array, expected: Buffer | Uint8Array, what = 'bytes'): void {
  const a = Buffer.from(actual.buffer, actual.byteOffset, actual.byteLength);
  const e = Buffer.from(expected.buffer, expected.byteOffset, expected.byteLength);
  if (a.equals(e)) return;
  let at = 0;
  while (at < a.length && at < e.length && a[at] === e[at]) at++;
  const from = Math.max(0, at - 8);
  const hex = (b: Buffer) => b.subarray(from, Math.min(b.length, at + 8)).toString('hex');
  throw new AssertionError(
    `${what}: ${a.length} bytes, expected ${e.length}; they first differ at offset ${at} (from ${from}: ${hex(a)} ≠ ${hex(e)})`,
  );
}

/** A deterministic generator, so a failure names a case that can be rerun. */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}
