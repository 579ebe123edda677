// Reads a policy file into a Policy and a list of findings. It never throws on a
// bad file: syntax errors, wrong types and unknown keys are collected with the
// line of the node at fault. Unknown keys are warnings, so a file written for a
// newer Lethe still loads (the server stores the text as given).
import fs from 'node:fs';
import { LineCounter, isAlias, isMap, isScalar, isSeq, parseDocument, type Document, type Node, type YAMLMap } from 'yaml';
import { LetheError } from '../common/errors.js';
import { checkPolicy } from './check.js';
import { diagnosticError, type Diagnostic, type Finding } from './diagnostics.js';
import { DEFAULT_FULL_POLICY, SCHEMA, buildPolicy, describe, isField, type Field, type Policy, type Section } from './schema.js';
import { closest } from './suggest.js';

export interface Loaded {
  policy: Policy;
  diagnostics: Diagnostic[];
}

/** "sensitive.disk[1]" from ['sensitive', 'disk', 1]. */
const fieldName = (path: readonly (string | number)[]): string =>
  path.reduce<string>((s, p) => (typeof p === 'number' ? `${s}[${p}]` : s ? `${s}.${p}` : p), '');

/** State of one walk over a parsed document. */
interface Walk {
  doc: Document;
  lines: LineCounter;
  findings: Finding[];
  values: Map<string, unknown>;
  /** line of each value the file sets, list elements included ("sensitive.disk[1]") */
  lineOf: Map<string, number>;
}

const lineAt = (w: Walk, node: unknown): number | null => {
  const range = (node as { range?: [number, number, number] } | null)?.range;
  return range ? w.lines.linePos(range[0]).line : null;
};

const resolve = (w: Walk, node: unknown): unknown => (isAlias(node) ? node.resolve(w.doc) : node);

function syntaxFindings(doc: Document): Finding[] {
  const one = (severity: Finding['severity']) => (e: { message: string; linePos?: [{ line: number }, ...unknown[]] }) => {
    const text = e.message.split('\n')[0].replace(/ at line \d+, column \d+:?$/, '');
    return { severity, line: e.linePos?.[0]?.line ?? null, field: '(syntax)', message: text.charAt(0).toLowerCase() + text.slice(1) };
  };
  return [...doc.errors.map(one('error')), ...doc.warnings.map(one('warning'))];
}

/** Where a misplaced key belongs: "ttl" at the top → "lease.ttl". */
function elsewhere(key: string, path: string[]): string | undefined {
  const all = Object.entries(SCHEMA).flatMap(([s, v]) => (isField(v) ? [s] : Object.keys(v).map((k) => `${s}.${k}`)));
  const here = path.join('.');
  const others = all.filter((f) => f.slice(0, f.lastIndexOf('.')) !== here);
  const leaf = closest(key, others.map((f) => f.slice(f.lastIndexOf('.') + 1)), 1);
  return leaf === undefined ? undefined : others.find((f) => f.endsWith(`.${leaf}`) || f === leaf);
}

function unknownKey(w: Walk, key: string, keyNode: unknown, path: string[], known: string[]): void {
  const near = closest(key, known);
  const moved = near ? undefined : elsewhere(key, path);
  const hint = near
    ? `did you mean '${near}'?`
    : moved
      ? `did you mean '${moved}'? it belongs under '${moved.split('.')[0]}'`
      : `known keys here: ${known.join(', ')}`;
  const field = fieldName([...path, key]);
  w.findings.push({ severity: 'warning', line: lineAt(w, keyNode), field, message: `unknown key '${key}' is ignored`, hint });
}

/** Lines of a value and of its list elements, two levels down (disk ranges); aliases are not followed. */
function recordLines(w: Walk, node: unknown, field: string, depth = 2): void {
  const line = lineAt(w, node);
  if (line !== null) w.lineOf.set(field, line);
  if (depth > 0 && isSeq(node)) node.items.forEach((item, i) => recordLines(w, item, `${field}[${i}]`, depth - 1));
}

function nodeAt(w: Walk, node: unknown, at: (string | number)[]): unknown {
  let n = node;
  for (const i of at) {
    const r = resolve(w, n);
    if (!isSeq(r) || typeof i !== 'number' || !r.items[i]) break;
    n = r.items[i];
  }
  return n;
}

function toJS(w: Walk, node: unknown): { value: unknown } | { message: string } {
  try {
    return { value: node === null || node === undefined ? null : (node as Node).toJS(w.doc, { maxAliasCount: 100 }) };
  } catch (e) {
    return { message: e instanceof Error ? e.message.toLowerCase() : String(e) };
  }
}

function describeNode(w: Walk, node: unknown): string {
  const js = toJS(w, node);
  return 'value' in js ? describe(js.value) : 'a value that cannot be read';
}

function readField(w: Walk, node: unknown, keyNode: unknown, field: Field, path: string[]): void {
  const name = fieldName(path);
  recordLines(w, node ?? keyNode, name);
  const line = lineAt(w, node ?? keyNode);
  const js = toJS(w, node);
  if (!('value' in js)) return void w.findings.push({ severity: 'error', line, field: name, message: js.message });
  if (js.value === null) {
    w.findings.push({ severity: 'warning', line, field: name, message: 'has no value, so the default applies', hint: 'give it a value or remove the key' });
    return;
  }
  const r = field.read(js.value);
  if ('value' in r) return void w.values.set(name, r.value);
  const at = r.at ?? [];
  w.findings.push({
    severity: 'error',
    line: lineAt(w, nodeAt(w, node, at)) ?? line,
    field: fieldName([...path, ...at]),
    message: r.message,
    ...(r.hint ? { hint: r.hint } : {}),
  });
}

function readSection(w: Walk, node: unknown, section: Section, path: string[]): void {
  const n = resolve(w, node);
  if (n === null || n === undefined || (isScalar(n) && n.value === null)) return;
  if (!isMap(n)) {
    const keys = Object.keys(section);
    w.findings.push({
      severity: 'error',
      line: lineAt(w, n),
      field: fieldName(path),
      message: `expected a mapping of ${keys.join(', ')}, got ${describeNode(w, n)}`,
      hint: `put its keys below it, e.g. '${path.join('.')}: {${keys[0]}: …}'`,
    });
    return;
  }
  readMap(w, n, section, path);
}

function readMap(w: Walk, map: YAMLMap, schema: Record<string, Field | Section>, path: string[]): void {
  for (const pair of map.items) {
    const key = isScalar(pair.key) ? String(pair.key.value) : String(pair.key);
    const spec = Object.hasOwn(schema, key) ? schema[key] : undefined;
    if (!spec) unknownKey(w, key, pair.key, path, Object.keys(schema));
    else if (isField(spec)) readField(w, pair.value, pair.key, spec, [...path, key]);
    else readSection(w, pair.value, spec, [...path, key]);
  }
}

function readTop(w: Walk): void {
  const root = resolve(w, w.doc.contents);
  if (root === null || root === undefined || (isScalar(root) && root.value === null)) return;
  if (isMap(root)) return readMap(w, root, SCHEMA, []);
  w.findings.push({
    severity: 'error',
    line: lineAt(w, root),
    field: '(top)',
    message: `expected a mapping of keys such as lease, sensitive and eviction, got ${describeNode(w, root)}`,
    hint: 'see policies/laptop-default.yaml for the shape',
  });
}

/**
 * Reads a policy; never throws on bad input. Meaning checks (policies/check.ts)
 * run only on a file whose values all read, since a value replaced by its
 * default would make them report on something the admin did not write; with
 * `meaning: false` they do not run at all (a stored policy, read again).
 */
export function loadPolicy(text: string, file: string, opts: { meaning?: boolean } = {}): Loaded {
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: true });
  const w: Walk = { doc, lines, findings: syntaxFindings(doc), values: new Map(), lineOf: new Map() };
  if (doc.errors.length === 0) readTop(w);
  const policy = doc.errors.length === 0 ? buildPolicy(w.values) : DEFAULT_FULL_POLICY;
  if (opts.meaning !== false && !w.findings.some((f) => f.severity === 'error')) {
    w.findings.push(...checkPolicy(policy, { lineOf: (f) => w.lineOf.get(f) ?? null, isSet: (f) => w.values.has(f) }));
  }
  const byLine = (f: Finding) => f.line ?? Number.MAX_SAFE_INTEGER;
  return { policy, diagnostics: w.findings.sort((a, b) => byLine(a) - byLine(b)).map((f) => ({ file, ...f })) };
}

/** loadPolicy for callers that cannot go on with a bad policy: throws BAD_REQUEST `FILE:LINE: FIELD: message` for the first error. */
export function loadPolicyOrThrow(text: string, file: string): Policy {
  const { policy, diagnostics } = loadPolicy(text, file);
  const first = diagnostics.find((d) => d.severity === 'error');
  if (first) throw diagnosticError(first);
  return policy;
}

/** Reads and loads a policy file; throws BAD_REQUEST naming the file only when it cannot be read. */
export function loadPolicyFile(file: string): Loaded & { text: string } {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new LetheError('BAD_REQUEST', `no policy file '${file}'`, { hint: 'check the path' });
    if (code === 'EISDIR') throw new LetheError('BAD_REQUEST', `'${file}' is a directory, not a policy file`, { hint: 'name a .yaml file' });
    throw new LetheError('BAD_REQUEST', `cannot read policy file '${file}'`, { cause: e, hint: 'check its permissions' });
  }
  return { text, ...loadPolicy(text, file) };
}
