// How the CLI talks to people and programs: results on stdout (text or JSON),
// errors as "lethe: error: …" and "lethe: hint: …" on stderr.
import { LetheError, errorChain } from '../common/errors.js';

export interface OutOpts {
  json?: boolean;
}

export function emit(opts: OutOpts, value: unknown, text: () => string): void {
  process.stdout.write(opts.json ? JSON.stringify(value) + '\n' : text().replace(/\n?$/, '\n'));
}

/** Exit status by error code: 2 bad usage or config, 3 refused (revoked, wiped), 1 anything else. */
export function exitCodeFor(e: unknown): number {
  if (!(e instanceof LetheError)) return 1;
  if (['DEVICE_REVOKED', 'DEVICE_WIPED', 'DEVICE_WIPE_PENDING'].includes(e.code)) return 3;
  if (['CONFIG', 'BAD_REQUEST'].includes(e.code) && e.status < 500) return 2;
  return 1;
}

export function reportError(e: unknown, json: boolean): number {
  const le = e instanceof LetheError ? e : undefined;
  const message = causeChain(e);
  process.stderr.write(`lethe: error: ${message}\n`);
  if (le?.hint) process.stderr.write(`lethe: hint: ${le.hint}\n`);
  if (json) {
    process.stdout.write(
      JSON.stringify({ error: { code: le?.code ?? 'INTERNAL', message, ...(le?.hint ? { hint: le.hint } : {}) } }) + '\n',
    );
  }
  return exitCodeFor(e);
}

/**
 * The error's message and then each cause's, as in `cannot run qemu-system-x86_64:
 * ENOENT`: what failed, then why. A system error is said by its code (ENOENT,
 * EADDRINUSE), which the message may already have put in words; a cause whose text
 * the message already quotes is not said twice.
 */
export function causeChain(e: unknown): string {
  let out = e instanceof Error ? e.message : errorChain(e);
  let cur = e instanceof Error ? (e as Error & { cause?: unknown }).cause : undefined;
  for (let n = 0; cur !== undefined && cur !== null && n < 8; n++) {
    const code = (cur as { code?: unknown }).code;
    const text = typeof code === 'string' && /^E[A-Z0-9]+$/.test(code) ? code : cur instanceof Error ? cur.message : String(cur);
    if (text && !out.includes(text)) out += `: ${text}`;
    cur = cur instanceof Error ? (cur as Error & { cause?: unknown }).cause : undefined;
  }
  return out;
}

/** A plain table: columns padded to the widest cell. */
export function table(header: string[], rows: (string | number | null)[][]): string {
  const cells = [header, ...rows.map((r) => r.map((c) => (c === null ? '-' : String(c))))];
  const widths = header.map((_, i) => Math.max(...cells.map((r) => r[i].length)));
  return cells.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]))).join('  ')).join('\n');
}
