// The CLI's behaviour as transcripts (test/cli/*.txt, format in test/cli/README.md):
// each command is run as a person would run it, in a fresh working directory, and
// its exit code and output are held to what the transcript says.
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { lethe, ROOT, tmpDir } from '../helpers/proc.js';

interface Step {
  line: number;
  args: string[];
  exit?: number;
  expect: { stream: 'stdout' | 'stderr'; op: '=' | '~' | '!~' | 'empty'; text: string }[];
  env: Record<string, string>;
}

interface Transcript {
  files: { name: string; text: string }[];
  steps: Step[];
}

/** Splits a command line on spaces, keeping 'single-quoted' words whole. */
function words(s: string): string[] {
  return [...s.matchAll(/'([^']*)'|(\S+)/g)].map((m) => m[1] ?? m[2]);
}

export function parseTranscript(text: string, file: string): Transcript {
  const t: Transcript = { files: [], steps: [] };
  const lines = text.split('\n');
  let env: Record<string, string> = {};
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const at = `${file}:${i + 1}`;
    if (line.trim() === '' || line.startsWith('#')) continue;
    let m: RegExpExecArray | null;
    if ((m = /^file (\S+)$/.exec(line))) {
      const body: string[] = [];
      while (i + 1 < lines.length && lines[i + 1].startsWith('|')) body.push(lines[++i].replace(/^\| ?/, ''));
      t.files.push({ name: m[1], text: body.join('\n') + '\n' });
    } else if ((m = /^env (\w+)=(.*)$/.exec(line))) env = { ...env, [m[1]]: m[2] };
    else if ((m = /^\$ lethe(?: (.*))?$/.exec(line))) t.steps.push({ line: i + 1, args: words(m[1] ?? ''), expect: [], env });
    else {
      const step = t.steps[t.steps.length - 1];
      if (!step) throw new Error(`${at}: an expectation before any command`);
      if ((m = /^exit (\d+)$/.exec(line))) step.exit = Number(m[1]);
      else if ((m = /^(stdout|stderr) (=|~|!~) (.*)$/.exec(line))) step.expect.push({ stream: m[1] as 'stdout', op: m[2] as '=', text: m[3] });
      else if ((m = /^(stdout|stderr) empty$/.exec(line))) step.expect.push({ stream: m[1] as 'stdout', op: 'empty', text: '' });
      else throw new Error(`${at}: cannot read '${line}'`);
    }
  }
  return t;
}

const DIR = path.join(ROOT, 'test', 'cli');

describe('CLI transcripts (test/cli/*.txt)', () => {
  for (const name of fs.readdirSync(DIR).filter((f) => f.endsWith('.txt')).sort()) {
    describe(name, () => {
      const t = parseTranscript(fs.readFileSync(path.join(DIR, name), 'utf8'), name);
      let work = '';
      const fill = (s: string) => s.replaceAll('$WORK', work).replaceAll('$ROOT', ROOT);
      before(() => {
        work = tmpDir('lethe-cli-');
        for (const f of t.files) fs.writeFileSync(path.join(work, f.name), fill(f.text));
      });
      after(() => fs.rmSync(work, { recursive: true, force: true }));
      for (const step of t.steps) {
        it(`line ${step.line}: lethe ${step.args.join(' ')}`, async () => {
          // No setting of the person running the tests leaks in: each transcript says its own.
          const clean = Object.fromEntries(Object.keys(process.env).filter((k) => k.startsWith('LETHE_')).map((k) => [k, undefined]));
          const env = { ...clean, HOME: work, ...Object.fromEntries(Object.entries(step.env).map(([k, v]) => [k, fill(v)])) };
          const r = await lethe(step.args.map(fill), env);
          const where = `${name}:${step.line}`;
          if (step.exit !== undefined) expect(r.code, `${where}: exit code (stderr: ${r.stderr})`).to.equal(step.exit);
          for (const stream of ['stdout', 'stderr'] as const) {
            const exact = step.expect.filter((e) => e.stream === stream && e.op === '=').map((e) => fill(e.text));
            if (exact.length > 0) expect(r[stream], `${where}: ${stream}`).to.equal(exact.join('\n') + '\n');
          }
          for (const e of step.expect) {
            const out = r[e.stream];
            if (e.op === 'empty') expect(out, `${where}: ${e.stream}`).to.equal('');
            if (e.op === '~') expect(out, `${where}: ${e.stream}`).to.match(new RegExp(fill(e.text), 'm'));
            if (e.op === '!~') expect(out, `${where}: ${e.stream}`).not.to.match(new RegExp(fill(e.text), 'm'));
          }
        });
      }
    });
  }
});
