// Issue #22: the TypeScript parsers under the project's coverage-guided fuzzer
// (fuzz/ts, V8 block coverage) for a few seconds each on every run, from their
// committed seed corpora; longer on demand (npm run fuzz -- --minutes N).
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import { fuzz, type FuzzTarget } from '../../fuzz/ts/engine.js';
import { TARGETS } from '../../fuzz/ts/targets.js';
import { toyParse } from '../helpers/fuzz-toy.js';
import { ROOT } from '../helpers/proc.js';

describe('fuzzing the TypeScript parsers (fuzz/ts)', function () {
  this.timeout(300_000);

  it('coverage guidance reaches a bug behind three nested byte checks that blind mutation would not', async () => {
    const toy: FuzzTarget = { name: 'toy', about: 'test', maxLen: 4, run: (d) => void toyParse(d), expected: () => false };
    const r = await fuzz(toy, { seconds: 600, maxExecs: 300_000, corpusDirs: [], seed: 1 });
    expect(r.crashes, `${r.execs} runs, ${r.blocks} blocks`).to.have.length(1);
    expect(r.crashes[0].error).to.contain('TypeError: the bug at the bottom');
    expect(r.crashes[0].input.subarray(0, 3).toString('latin1')).to.equal('LET');
  });

  it('every target runs from its seeds for 3 s with no crash, and reaches code', () => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'fuzz/ts/run.ts', '--seconds', '3', '--json'], { cwd: ROOT, encoding: 'utf8' });
    expect(r.status, r.stderr).to.equal(0);
    const stats = JSON.parse(r.stdout) as { target: string; execs: number; blocks: number; seeds: number; crashes: unknown[] }[];
    expect(stats.map((s) => s.target)).to.deep.equal(TARGETS.map((t) => t.name));
    for (const s of stats) {
      expect(s.seeds, `${s.target}: committed seeds`).to.be.greaterThan(0);
      expect(s.execs, s.target).to.be.greaterThan(s.seeds);
      expect(s.blocks, s.target).to.be.greaterThan(5);
      expect(s.crashes, s.target).to.deep.equal([]);
    }
  });

  it('refuses an unknown target with the list of them', () => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'fuzz/ts/run.ts', '--target', 'nope'], { cwd: ROOT, encoding: 'utf8' });
    expect(r.status).to.equal(2);
    expect(r.stderr).to.equal(`fuzz: error: no target 'nope'\nfuzz: hint: --seconds N, --target ${TARGETS.map((t) => t.name).join('|')}, --json\n`);
  });
});
