// "did you mean …" for misspelt keys and values: the closest known word by edit
// distance (a swap of two neighbouring letters counts as one edit, as typists
// make them), or one that differs only in case, '-' or '_'.

const squash = (s: string) => s.toLowerCase().replace(/[-_\s]/g, '');

/** Optimal string alignment distance. */
export function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0][j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.length][b.length];
}

/** The known word `word` was probably meant to be (at most `limit` edits away), or undefined when none is close. */
export function closest(word: string, known: readonly string[], limit = word.length <= 4 ? 1 : 2): string | undefined {
  const exact = known.find((k) => squash(k) === squash(word));
  if (exact) return exact;
  let best: string | undefined;
  let bestDistance = limit + 1;
  for (const k of known) {
    const dist = editDistance(squash(word), squash(k));
    if (dist < bestDistance) [best, bestDistance] = [k, dist];
  }
  return best;
}
