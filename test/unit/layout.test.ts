// The agent's layout as docs/architecture.md draws it, checked: the CLI and the
// benchmarks reach the agent only through agent/index.ts, no import cycle runs
// through the agent, the agent builds nothing at run time, and no agent file
// outgrows a room of its own.
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { expect } from 'chai';
import { ROOT } from '../helpers/proc.js';

/** Source files (tests aside) and the project files each imports at run time (`import type` is erased). */
function importGraph(): Map<string, string[]> {
  const files = execFileSync('git', ['ls-files', '*.ts'], { cwd: ROOT, encoding: 'utf8' })
    .split('\n')
    .filter((f) => f && !f.startsWith('test/') && !f.endsWith('.d.ts') && fs.existsSync(path.join(ROOT, f)));
  const graph = new Map<string, string[]>();
  for (const f of files) {
    const src = fs.readFileSync(path.join(ROOT, f), 'utf8');
    const deps: string[] = [];
    for (const m of src.matchAll(/^(?:import|export)\s+(type\s+)?[^'";]*?from\s+'(\.[^']+)'|import\('(\.[^']+)'\)/gm)) {
      if (m[1]) continue;
      deps.push(path.posix.normalize(path.posix.join(path.posix.dirname(f), m[2] ?? m[3])).replace(/\.js$/, '.ts'));
    }
    graph.set(f, deps);
  }
  return graph;
}

/** Every import cycle, as the files around it. */
function cycles(graph: Map<string, string[]>): string[][] {
  const state = new Map<string, 'open' | 'done'>();
  const found: string[][] = [];
  const stack: string[] = [];
  const visit = (n: string) => {
    state.set(n, 'open');
    stack.push(n);
    for (const d of graph.get(n) ?? []) {
      if (!graph.has(d)) continue;
      if (state.get(d) === 'open') found.push(stack.slice(stack.indexOf(d)));
      else if (!state.has(d)) visit(d);
    }
    stack.pop();
    state.set(n, 'done');
  };
  for (const n of graph.keys()) if (!state.has(n)) visit(n);
  return found;
}

describe('the agent layout (docs/architecture.md)', () => {
  const graph = importGraph();

  it('cli/ and bench/ import the agent only through agent/index.ts', () => {
    const strays: string[] = [];
    for (const [f, deps] of graph) {
      if (!f.startsWith('cli/') && !f.startsWith('bench/')) continue;
      for (const d of deps) if (d.startsWith('agent/') && d !== 'agent/index.ts') strays.push(`${f} imports ${d}`);
    }
    expect(strays).to.deep.equal([]);
    expect(graph.get('cli/cmd-agent.ts'), 'the import reader sees the door').to.include('agent/index.ts');
  });

  it('no import cycle runs through the agent', () => {
    const through = cycles(graph).filter((c) => c.some((f) => f.startsWith('agent/')));
    expect(through.map((c) => c.join(' -> '))).to.deep.equal([]);
  });

  it('the agent imports neither the CLI nor the guest build', () => {
    const bad: string[] = [];
    for (const [f, deps] of graph) {
      if (!f.startsWith('agent/')) continue;
      for (const d of deps) if (d.startsWith('cli/') || d === 'guest-driver/build.ts') bad.push(`${f} imports ${d}`);
    }
    expect(bad).to.deep.equal([]);
  });

  it('every agent file is in a room, and none is over 500 lines', () => {
    const rooms = ['daemon', 'chunks', 'remote', 'keys', 'disk', 'memory', 'vm'];
    const doc = fs.readFileSync(path.join(ROOT, 'docs', 'architecture.md'), 'utf8');
    const problems: string[] = [];
    for (const f of graph.keys()) {
      if (!f.startsWith('agent/')) continue;
      const room = f.split('/')[1];
      if (f !== 'agent/index.ts' && !rooms.includes(room)) problems.push(`${f} is in no room`);
      if (!doc.includes(`agent/${room}/`) && f !== 'agent/index.ts') problems.push(`docs/architecture.md does not map agent/${room}/`);
      const lines = fs.readFileSync(path.join(ROOT, f), 'utf8').split('\n').length;
      if (lines > 500) problems.push(`${f} has ${lines} lines`);
    }
    expect([...new Set(problems)]).to.deep.equal([]);
  });

  it('package.json names only files that exist', () => {
    const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { bin: Record<string, string>; scripts: Record<string, string> };
    const named = [...Object.values(pkg.bin), ...Object.values(pkg.scripts).flatMap((s) => s.match(/[\w./-]+\.(?:ts|js|sh)\b|scripts\/[\w-]+/g) ?? [])];
    expect(named.length).to.be.greaterThan(2);
    expect(named.filter((f) => !fs.existsSync(path.join(ROOT, f)))).to.deep.equal([]);
  });
});
