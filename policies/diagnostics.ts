// What the loader and the meaning checks say about a policy file: each finding
// names the file, the line of the offending node and the field, the way a
// compiler does, so an admin can jump to it.
import { LetheError } from '../common/errors.js';

export interface Diagnostic {
  severity: 'error' | 'warning';
  file: string;
  /** 1-based; null when the finding is about a value the file does not set. */
  line: number | null;
  /** dotted YAML path, e.g. "eviction.idle" or "sensitive.disk[1]"; "(syntax)" or "(top)" otherwise */
  field: string;
  message: string;
  hint?: string;
}

export type Finding = Omit<Diagnostic, 'file'>;

export const hasErrors = (ds: Diagnostic[]): boolean => ds.some((d) => d.severity === 'error');

const where = (d: Diagnostic) => (d.line === null ? d.file : `${d.file}:${d.line}`);

/** "FILE:LINE: error: FIELD: message", and "  hint: …" on the next line when there is one. */
export function formatDiagnostic(d: Diagnostic): string {
  const head = `${where(d)}: ${d.severity}: ${d.field}: ${d.message}`;
  return d.hint ? `${head}\n  hint: ${d.hint}` : head;
}

/** The error a caller that cannot go on with a bad policy throws: `FILE:LINE: FIELD: message`. */
export function diagnosticError(d: Diagnostic): LetheError {
  return new LetheError('BAD_REQUEST', `${where(d)}: ${d.field}: ${d.message}`, d.hint ? { hint: d.hint } : {});
}

/** "1 error, 2 warnings" */
export function countText(ds: Diagnostic[]): string {
  const n = (k: Diagnostic['severity']) => ds.filter((d) => d.severity === k).length;
  const plural = (c: number, w: string) => `${c === 0 ? 'no' : c} ${w}${c === 1 ? '' : 's'}`;
  return `${plural(n('error'), 'error')}, ${plural(n('warning'), 'warning')}`;
}
