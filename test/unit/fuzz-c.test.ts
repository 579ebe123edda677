// Issue #22: the C parsers under libFuzzer (scripts/fuzz) for a bounded time on
// every run, from their committed seed corpora; longer on demand
// (npm run fuzz -- --minutes N). A crash fails the run and leaves its input in
// build/fuzz/crashes/TARGET/, to become a regression seed.
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import { ROOT } from '../helpers/proc.js';

describe('fuzzing the C parsers (libFuzzer)', function () {
  this.timeout(180_000);

  it('the guest driver policy-line parser survives 20 s of fuzzing from its seeds, arena bounds checked', () => {
    const r = spawnSync('scripts/fuzz', ['--seconds', '20', '--only', 'c'], { cwd: ROOT, encoding: 'utf8' });
    expect(r.status, r.stderr).to.equal(0);
    const execs = Number(/stat::number_of_executed_units: (\d+)/.exec(r.stderr)?.[1] ?? 0);
    expect(execs, r.stderr).to.be.greaterThan(1000);
  });

  it('refuses an unknown argument with a hint', () => {
    const r = spawnSync('scripts/fuzz', ['--hours', '1'], { cwd: ROOT, encoding: 'utf8' });
    expect(r.status).to.equal(2);
    expect(r.stderr).to.equal("scripts/fuzz: error: unknown argument '--hours'\nscripts/fuzz: hint: --minutes N or --seconds N, --only c|ts\n");
  });
});
