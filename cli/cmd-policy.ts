// lethe policy check | explain | simulate: is a policy sound, what does it mean
// in plain words, and what would it have done to a recorded session. All read
// local files only; no server is needed.
import fs from 'node:fs';
import type { Argv } from 'yargs';
import { LetheError } from '../common/errors.js';
import { parseAccessTrace, simulateWithBaselines, type SimResult } from '../policies/simulate.js';
import {
  countText,
  explainPolicy,
  formatDiagnostic,
  hasErrors,
  loadPolicyFile,
  type Diagnostic,
} from '../policies/index.js';
import { emit, table, type OutOpts } from './output.js';
import { loadPolicyOrRefuse } from './policy-file.js';

const count = (ds: Diagnostic[], severity: Diagnostic['severity']) => ds.filter((d) => d.severity === severity).length;

function check(a: OutOpts & { files: string[] }): void {
  const diagnostics = a.files.flatMap((f) => loadPolicyFile(f).diagnostics);
  const ok = !hasErrors(diagnostics);
  const n = a.files.length;
  emit(
    a,
    { ok, files: n, errors: count(diagnostics, 'error'), warnings: count(diagnostics, 'warning'), diagnostics },
    () => [...diagnostics.map(formatDiagnostic), `${n} policy file${n === 1 ? '' : 's'} checked: ${countText(diagnostics)}`].join('\n'),
  );
  if (!ok) process.exitCode = 1;
}

function explain(a: OutOpts & { file: string }): void {
  const { policy, diagnostics } = loadPolicyOrRefuse(a.file, 'only a policy without errors can be explained');
  const explanation = explainPolicy(policy, a.file);
  if (!a.json) process.stderr.write(diagnostics.map((d) => formatDiagnostic(d) + '\n').join(''));
  emit(a, { file: a.file, policy, diagnostics, explanation }, () => explanation);
}

function readTrace(file: string) {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new LetheError('BAD_REQUEST', `cannot read trace '${file}': ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, {
      hint: 'record one with `lethe agent run IMAGE --vm --trace FILE`',
    });
  }
  return parseAccessTrace(text, file);
}

const MiB = 1024 * 1024;

function simulateText(file: string, trace: string, pages: number, events: number, rows: SimResult[]): string {
  const head = `${file} replayed over ${trace} (${pages} guest pages, ${events} events):`;
  const cells = rows.map((r) => [
    r.name,
    r.faults,
    r.serverFetches,
    (r.bytesFetched / MiB).toFixed(1),
    r.keyReleases,
    r.evictions,
    r.sensitivePlaintextSeconds.toFixed(1),
    (r.peakSensitiveBytes / MiB).toFixed(1),
  ]);
  return [head, table(['', 'faults', 'from server', 'MiB fetched', 'key releases', 'evictions', 'sensitive plaintext s', 'peak sensitive MiB'], cells)].join('\n');
}

function simulateCmd(a: OutOpts & { file: string; trace: string }): void {
  const { policy } = loadPolicyOrRefuse(a.file, 'only a policy without errors can be simulated');
  const trace = readTrace(a.trace);
  const rows = simulateWithBaselines(policy, trace);
  emit(a, { file: a.file, trace: a.trace, pages: trace.pages, events: trace.events.length, results: rows }, () =>
    simulateText(a.file, a.trace, trace.pages, trace.events.length, rows),
  );
}

export function policyCommand(y: Argv) {
  return y.command('policy', 'policy files: check them, explain them in plain words, simulate them over a recorded trace', (y) =>
    y
      .command(
        'check <files..>',
        'validate policy files: errors and warnings with file, line and field; exit 1 if any has an error',
        (y) => y.positional('files', { type: 'string', array: true, demandOption: true, describe: 'policy YAML files' }),
        (a) => check(a as OutOpts & { files: string[] }),
      )
      .command(
        'explain <file>',
        'say in plain words what a policy does: what is sensitive, for how long, offline, expiry, wipe, prefetch',
        (y) => y.positional('file', { type: 'string', demandOption: true, describe: 'policy YAML file' }),
        (a) => explain(a as OutOpts & { file: string }),
      )
      .command(
        'simulate <file>',
        'replay a recorded access trace under a policy: faults, bytes fetched, key releases, sensitive plaintext-seconds, beside no eviction and evicting everything',
        (y) =>
          y
            .positional('file', { type: 'string', demandOption: true, describe: 'policy YAML file' })
            .option('trace', { type: 'string', demandOption: true, describe: 'access trace (JSON lines) recorded by `lethe agent run --vm --trace`' }),
        (a) => simulateCmd(a as OutOpts & { file: string; trace: string }),
      )
      .demandCommand(1, 'name a policy command'),
  );
}
