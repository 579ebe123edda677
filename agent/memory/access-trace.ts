// The access trace `lethe agent run --trace` writes (docs/policy-simulate.md): every
// guest-RAM fault and guest report, in JSON lines, ms from the resume.
import fs from 'node:fs';
import { LetheError } from '../../common/errors.js';
import type { HintReport } from '../vm/hints.js';

/** An access trace being written: faults and guest reports, ms from the resume. */
export class AccessTrace {
  private readonly out: fs.WriteStream;
  private readonly t0 = performance.now();
  /** @throws LetheError BAD_REQUEST when the file cannot be written. */
  constructor(file: string, pages: number) {
    let fd: number;
    try {
      fd = fs.openSync(file, 'w', 0o600);
    } catch (e) {
      throw new LetheError('BAD_REQUEST', `cannot write the trace '${file}': ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, {
        hint: 'give --trace a path in a directory that exists and is writable',
      });
    }
    this.out = fs.createWriteStream('', { fd });
    this.out.on('error', () => {}); // a full disk loses trace lines, never the agent
    this.out.write(JSON.stringify({ trace: 'lethe-access', version: 1, pages }) + '\n');
  }
  private now(): number {
    return Math.round((performance.now() - this.t0) * 10) / 10;
  }
  fault(page: number): void {
    this.out.write(`{"t":${this.now()},"fault":${page}}\n`);
  }
  hint(r: HintReport): void {
    this.out.write(JSON.stringify({ t: this.now(), hint: { sensitive: r.sensitive, free: r.free } }) + '\n');
  }
  close(): Promise<void> {
    return new Promise((r) => this.out.end(r));
  }
}

