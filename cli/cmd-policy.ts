// lethe policy check | explain: is a policy sound, and what does it mean in
// plain words. Both read local files only; no server is needed.
import type { Argv } from 'yargs';
import {
  countText,
  explainPolicy,
  formatDiagnostic,
  hasErrors,
  loadPolicyFile,
  type Diagnostic,
} from '../policies/index.js';
import { emit, type OutOpts } from './output.js';

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

/** A policy with errors is refused: its diagnostics on stderr, exit 1. */
function refuse(a: OutOpts & { file: string }, diagnostics: Diagnostic[]): void {
  const message = `policy '${a.file}' has ${countText(diagnostics)}; only a policy without errors can be explained`;
  const hint = `fix the errors above; 'lethe policy check ${a.file}' lists them again`;
  process.stderr.write(diagnostics.map((d) => formatDiagnostic(d) + '\n').join(''));
  process.stderr.write(`lethe: error: ${message}\nlethe: hint: ${hint}\n`);
  if (a.json) process.stdout.write(JSON.stringify({ error: { code: 'BAD_REQUEST', message, hint }, diagnostics }) + '\n');
  process.exitCode = 1;
}

function explain(a: OutOpts & { file: string }): void {
  const { policy, diagnostics } = loadPolicyFile(a.file);
  if (hasErrors(diagnostics)) return refuse(a, diagnostics);
  const explanation = explainPolicy(policy, a.file);
  if (!a.json) process.stderr.write(diagnostics.map((d) => formatDiagnostic(d) + '\n').join(''));
  emit(a, { file: a.file, policy, diagnostics, explanation }, () => explanation);
}

export function policyCommand(y: Argv) {
  return y.command('policy', 'policy files: check them, explain them in plain words', (y) =>
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
      .demandCommand(1, 'name a policy command'),
  );
}
