// A coverage-guided fuzzer for Lethe's TypeScript parsers, in the manner of
// libFuzzer: it mutates inputs from a corpus, runs the target on each, and keeps
// an input that reaches code (or a count bucket of it) no earlier input reached.
// Coverage is V8's own block coverage, read through the inspector after every run
// (Profiler.takePreciseCoverage, which also resets the counts), limited to the
// project's own files. It stands in for @jazzer.js, whose native fuzzer does not
// load on Debian 12 (it needs glibc 2.38; docs/fuzzing.md).
import { Session } from 'node:inspector';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

export interface FuzzTarget {
  name: string;
  /** What it feeds, in a line. */
  about: string;
  /** Runs one input; a throw that `expected` does not accept is a crash. */
  run(data: Buffer): void | Promise<void>;
  /** The refusals the parser is meant to give (a LetheError with a 4xx code, say). */
  expected(e: unknown): boolean;
  /** Tokens of the format, spliced into inputs (magic numbers, keywords). */
  dictionary?: Buffer[];
  /** Inputs longer than this are cut. */
  maxLen: number;
  /** Set up and tear down what the target needs (a server, a file). */
  open?(): Promise<void>;
  close?(): Promise<void>;
}

export interface FuzzOptions {
  /** Stop after this long, or after `maxExecs` runs, whichever comes first. */
  seconds: number;
  maxExecs?: number;
  /** Seed inputs (each file one input). */
  corpusDirs: string[];
  /** Where new inputs are written (not committed), if anywhere. */
  corpusOut?: string;
  /** Where a crashing input is written. */
  crashDir?: string;
  /** Seeds the mutation choices: a run can be repeated. */
  seed?: number;
  /** Stop at the first crash (default). */
  stopOnCrash?: boolean;
}

export interface FuzzCrash {
  input: Buffer;
  error: string;
  file?: string;
}

export interface FuzzStats {
  target: string;
  execs: number;
  seconds: number;
  /** Distinct (block, count bucket) pairs reached. */
  features: number;
  /** Blocks of the project's code V8 reported as run (those run as often as the block around them are not told apart). */
  blocks: number;
  corpus: number;
  seeds: number;
  crashes: FuzzCrash[];
}

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const PROJECT = pathToFileURL(ROOT).href + '/';

/** libFuzzer's buckets for how often a block ran: 0, 1, 2, 3, 4-7, 8-15, 16-31, 32-127, 128+. */
function bucket(n: number): number {
  return n <= 3 ? n : n < 8 ? 4 : n < 16 ? 5 : n < 32 ? 6 : n < 128 ? 7 : 8;
}

interface Coverage {
  result: { url: string; functions: { ranges: { startOffset: number; endOffset: number; count: number }[] }[] }[];
}

class V8Coverage {
  private readonly session = new Session();
  constructor() {
    this.session.connect();
    this.post('Profiler.enable');
    this.post('Profiler.startPreciseCoverage', { callCount: true, detailed: true });
  }

  /** The inspector answers a session on this thread at once: the callback runs before post() returns. */
  private post<T>(method: string, params: object = {}): T {
    let out: T | undefined;
    let err: Error | null = null;
    this.session.post(method, params, (e, r) => {
      err = e;
      out = r as T;
    });
    if (err) throw err;
    return out as T;
  }

  /** The features of everything run since the last call, in the project's own files (not node_modules, not the fuzzer). */
  take(into: (feature: string, block: string | undefined) => void): void {
    const cov = this.post<Coverage>('Profiler.takePreciseCoverage');
    for (const s of cov.result) {
      if (!s.url.startsWith(PROJECT) || s.url.includes('/node_modules/') || s.url.includes('/fuzz/ts/')) continue;
      const file = s.url.slice(PROJECT.length);
      for (const f of s.functions) {
        // V8 reports a block only where its count differs from the block around it, and
        // a block not run as count 0. So a function that ran gives its blocks' counts and
        // the blocks it skipped: reaching a block that was skipped makes the blocks inside
        // it (skipped now) appear, a new feature.
        if (f.ranges[0].count === 0) continue;
        for (const r of f.ranges) {
          const block = `${file}:${r.startOffset}:${r.endOffset}`;
          into(`${block}#${bucket(r.count)}`, r.count > 0 ? block : undefined);
        }
      }
    }
  }

  close(): void {
    this.post('Profiler.stopPreciseCoverage');
    this.session.disconnect();
  }
}

/** mulberry32: small and seeded (a run can be repeated), good enough to pick mutations or test cases; gives 0 to n-1. */
export function seededRandom(seed: number): (n: number) => number {
  let a = seed >>> 0;
  return (n) => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return Math.floor((((t ^ (t >>> 14)) >>> 0) / 4294967296) * n);
  };
}

const INTERESTING_8 = [0, 1, 0x7f, 0x80, 0xff, 0x0a, 0x20, 0x30, 0x39];
const INTERESTING_32 = [0, 1, 0xff, 0x100, 0x1000, 0x10000, 0x7fffffff, 0x80000000, 0xffffffff, 0xfffffffe];

class Mutator {
  constructor(
    private readonly rand: (n: number) => number,
    private readonly dictionary: Buffer[],
    private readonly maxLen: number,
  ) {}

  mutate(input: Buffer, other: Buffer): Buffer {
    let b: Buffer = Buffer.from(input);
    const rounds = 1 + this.rand(4);
    for (let i = 0; i < rounds; i++) b = this.once(b, other);
    return b.length > this.maxLen ? b.subarray(0, this.maxLen) : b;
  }

  private once(b: Buffer, other: Buffer): Buffer {
    const r = this.rand;
    const at = (extra = 0) => r(b.length + extra);
    switch (r(b.length === 0 ? 2 : 12)) {
      case 0: // insert random bytes
        return insert(b, at(1), Buffer.from(Array.from({ length: 1 + r(8) }, () => r(256))));
      case 1: // insert a dictionary token
        return this.dictionary.length ? insert(b, at(1), this.dictionary[r(this.dictionary.length)]) : insert(b, at(1), Buffer.from([r(256)]));
      case 2: {
        const i = at();
        b[i] ^= 1 << r(8);
        return b;
      }
      case 3: {
        b[at()] = r(256);
        return b;
      }
      case 4: {
        b[at()] = INTERESTING_8[r(INTERESTING_8.length)];
        return b;
      }
      case 5: {
        // delete a range
        const i = at();
        return Buffer.concat([b.subarray(0, i), b.subarray(Math.min(b.length, i + 1 + r(16)))]);
      }
      case 6: {
        // duplicate a range
        const i = at();
        return insert(b, at(1), b.subarray(i, Math.min(b.length, i + 1 + r(32))));
      }
      case 7: {
        // a 32-bit value, either byte order
        const v = INTERESTING_32[r(INTERESTING_32.length)];
        const w = Buffer.alloc(4);
        if (r(2)) w.writeUInt32BE(v);
        else w.writeUInt32LE(v);
        const i = at();
        w.copy(b, i, 0, Math.min(4, b.length - i));
        return b;
      }
      case 8: {
        // overwrite with a dictionary token
        if (!this.dictionary.length) return b;
        const t = this.dictionary[r(this.dictionary.length)];
        const i = at();
        t.copy(b, i, 0, Math.min(t.length, b.length - i));
        return b;
      }
      case 9: {
        // splice with another input
        if (other.length === 0) return b;
        return Buffer.concat([b.subarray(0, at(1)), other.subarray(r(other.length))]);
      }
      case 10: {
        // a run of ASCII digits becomes another number
        const s = b.toString('latin1');
        const runs = [...s.matchAll(/[0-9]+/g)];
        if (!runs.length) return b;
        const m = runs[r(runs.length)];
        const n = [String(r(10)), String(r(1 << 16)), String(2 ** r(64)), '-1', '0', '4294967296'][r(6)];
        return Buffer.concat([b.subarray(0, m.index!), Buffer.from(n, 'latin1'), b.subarray(m.index! + m[0].length)]);
      }
      default: // truncate
        return b.subarray(0, at());
    }
  }
}

function insert(b: Buffer, i: number, what: Buffer): Buffer {
  return Buffer.concat([b.subarray(0, i), what, b.subarray(i)]);
}

function describe(e: unknown): string {
  return e instanceof Error ? (e.stack ?? `${e.name}: ${e.message}`) : String(e);
}

function readCorpus(dirs: string[]): Buffer[] {
  const out: Buffer[] = [];
  for (const d of dirs) {
    if (!fs.existsSync(d)) continue;
    for (const f of fs.readdirSync(d).sort()) {
      const p = path.join(d, f);
      if (fs.statSync(p).isFile()) out.push(fs.readFileSync(p));
    }
  }
  return out;
}

/** Fuzzes one target: the seeds first, then mutations, until time or runs are up (or a crash). */
export async function fuzz(t: FuzzTarget, o: FuzzOptions): Promise<FuzzStats> {
  const rand = seededRandom(o.seed ?? Date.now());
  const mutator = new Mutator(rand, t.dictionary ?? [], t.maxLen);
  const features = new Set<string>();
  const blocks = new Set<string>();
  const corpus: Buffer[] = [];
  const crashes: FuzzCrash[] = [];
  const seeds = readCorpus(o.corpusDirs);
  if (o.corpusOut) fs.mkdirSync(o.corpusOut, { recursive: true });
  // An async target's stray rejection or throw is a crash of the input that caused it.
  let stray: unknown;
  const onStray = (e: unknown) => (stray ??= e);
  process.on('uncaughtException', onStray);
  process.on('unhandledRejection', onStray);
  await t.open?.();
  const cov = new V8Coverage();
  const t0 = performance.now();
  let execs = 0;
  try {
    const runOne = async (input: Buffer, keep: boolean): Promise<boolean> => {
      let error: unknown;
      try {
        await t.run(input);
      } catch (e) {
        if (!t.expected(e)) error = e;
      }
      execs++;
      if (stray !== undefined) {
        error ??= stray;
        stray = undefined;
      }
      let fresh = false;
      cov.take((f, b) => {
        if (!features.has(f)) {
          features.add(f);
          fresh = true;
        }
        if (b) blocks.add(b);
      });
      if (error !== undefined) {
        const c: FuzzCrash = { input, error: describe(error) };
        if (o.crashDir) {
          fs.mkdirSync(o.crashDir, { recursive: true });
          c.file = path.join(o.crashDir, `crash-${createHash('sha1').update(input).digest('hex')}`);
          fs.writeFileSync(c.file, input);
        }
        crashes.push(c);
        return true;
      }
      if (fresh && keep) {
        corpus.push(input);
        if (o.corpusOut) fs.writeFileSync(path.join(o.corpusOut, createHash('sha1').update(input).digest('hex')), input);
      }
      return false;
    };
    for (const s of seeds.length ? seeds : [Buffer.alloc(0)]) {
      await runOne(s.length > t.maxLen ? s.subarray(0, t.maxLen) : s, false);
      corpus.push(s);
    }
    const stop = () => (o.stopOnCrash ?? true) && crashes.length > 0;
    while (!stop() && performance.now() - t0 < o.seconds * 1000 && (o.maxExecs === undefined || execs < o.maxExecs)) {
      // The newest input (the latest to find something) half the time, else any.
      const i = rand(2) ? corpus.length - 1 : rand(corpus.length);
      await runOne(mutator.mutate(corpus[i], corpus[rand(corpus.length)]), true);
    }
  } finally {
    cov.close();
    await t.close?.();
    process.off('uncaughtException', onStray);
    process.off('unhandledRejection', onStray);
  }
  return { target: t.name, execs, seconds: (performance.now() - t0) / 1000, features: features.size, blocks: blocks.size, corpus: corpus.length, seeds: seeds.length, crashes };
}
