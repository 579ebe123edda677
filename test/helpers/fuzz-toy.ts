// A parser with a bug behind three nested byte checks, for the fuzzer's own test: blind
// mutation would need about 256^3 (16 million) tries to reach it; coverage guidance
// keeps each input that gets one check further.
export function toyParse(d: Buffer): number {
  let depth = 0;
  if (d.length >= 3) {
    if (d[0] === 0x4c) {
      depth = 1;
      if (d[1] === 0x45) {
        depth = 2;
        if (d[2] === 0x54) throw new TypeError('the bug at the bottom');
      }
    }
  }
  return depth;
}
