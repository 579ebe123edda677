// A one-line progress bar on stderr, drawn only for a terminal.
export interface Progress {
  update(done: number, total: number, label?: string): void;
  done(): void;
}

export function progressBar(title: string, enabled = process.stderr.isTTY === true): Progress {
  if (!enabled) return { update() {}, done() {} };
  const t0 = Date.now();
  let last = 0;
  let bytes = 0;
  return {
    update(done, total, label) {
      bytes = done;
      const now = Date.now();
      if (now - last < 100 && done < total) return;
      last = now;
      const frac = total > 0 ? Math.min(1, done / total) : 1;
      const width = 30;
      const filled = Math.round(frac * width);
      const mbs = done / 1e6 / Math.max(0.001, (now - t0) / 1000);
      process.stderr.write(
        `\r${title} [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${(frac * 100).toFixed(0).padStart(3)}% ${mbs.toFixed(1)} MB/s ${label ?? ''}\x1b[K`,
      );
    },
    done() {
      void bytes;
      process.stderr.write('\n');
    },
  };
}
