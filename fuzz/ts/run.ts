// Runs the TypeScript fuzz targets (fuzz/ts/targets.ts) for a while each.
//   node --import tsx fuzz/ts/run.ts --seconds 60 [--target NAME] [--json]
// New inputs go to build/fuzz/corpus/NAME and crashes to build/fuzz/crashes/NAME
// (neither committed); a crash fails the run (exit 1) and prints the input's file.
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { fuzz, type FuzzStats } from './engine.js';
import { TARGETS } from './targets.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

function usage(message: string): never {
  process.stderr.write(`fuzz: error: ${message}\nfuzz: hint: --seconds N, --target ${TARGETS.map((t) => t.name).join('|')}, --json\n`);
  process.exit(2);
}

const args = process.argv.slice(2);
let seconds = 60;
let only: string | undefined;
let json = false;
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  if (a === '--seconds' && /^\d+$/.test(args[i + 1] ?? '')) seconds = Number(args[++i]);
  else if (a === '--target' && args[i + 1]) only = args[++i];
  else if (a === '--json') json = true;
  else usage(`unknown argument '${a}'`);
}
const targets = only ? TARGETS.filter((t) => t.name === only) : TARGETS;
if (targets.length === 0) usage(`no target '${only}'`);

const results: FuzzStats[] = [];
for (const t of targets) {
  process.stderr.write(`fuzz: ${t.name} for ${seconds}s: ${t.about}\n`);
  const r = await fuzz(t, {
    seconds,
    corpusDirs: [path.join(ROOT, 'fuzz', 'corpus', t.name), path.join(ROOT, 'build', 'fuzz', 'corpus', t.name)],
    corpusOut: path.join(ROOT, 'build', 'fuzz', 'corpus', t.name),
    crashDir: path.join(ROOT, 'build', 'fuzz', 'crashes', t.name),
  });
  results.push(r);
  process.stderr.write(
    `fuzz: ${t.name}: ${r.execs} runs in ${r.seconds.toFixed(0)} s (${Math.round(r.execs / r.seconds)}/s), ${r.blocks} blocks, ${r.features} features, corpus ${r.corpus} (${r.seeds} seeds), ${r.crashes.length} crash${r.crashes.length === 1 ? '' : 'es'}\n`,
  );
  for (const c of r.crashes) process.stderr.write(`fuzz: ${t.name}: crash, input in ${c.file}:\n${c.error}\n`);
}
if (json) process.stdout.write(`${JSON.stringify(results.map((r) => ({ ...r, crashes: r.crashes.map((c) => ({ file: c.file, error: c.error })) })))}\n`);
process.exit(results.some((r) => r.crashes.length > 0) ? 1 : 0);
