// test/vectors/contracts-v1.txt from both sides: TypeScript here (the policy line the
// agent sends, the hello it parses), C in native/test/contract-vectors.c (the guest
// driver's parser, the shim's struct), built and run by this test.
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { policyLine, type HintPolicy } from '../../common/hint-protocol.js';
import { parseHello } from '../../native/index.js';
import { ROOT, tmpDir } from '../helpers/proc.js';

const VECTORS = path.join(ROOT, 'test', 'vectors', 'contracts-v1.txt');

/** The vectors' key/value lines, in order. */
function vectorLines(): { key: string; value: string; line: number }[] {
  return fs
    .readFileSync(VECTORS, 'utf8')
    .split('\n')
    .map((text, i) => ({ text, line: i + 1 }))
    .filter(({ text }) => text && !text.startsWith('#'))
    .map(({ text, line }) => ({ key: text.slice(0, text.indexOf(' ')), value: text.slice(text.indexOf(' ') + 1), line }));
}

describe('contract vectors (test/vectors/contracts-v1.txt)', () => {
  const lines = vectorLines();

  it('policyLine() sends exactly the line of every policy vector', () => {
    let n = 0;
    for (let i = 0; i < lines.length; i++) {
      if (lines[i].key !== 'policy-json') continue;
      const next = lines[i + 1];
      expect(next?.key, `line ${lines[i].line}: a policy-json is followed by its policy-line`).to.equal('policy-line');
      expect(policyLine(JSON.parse(lines[i].value) as HintPolicy), `line ${next.line}`).to.equal(next.value);
      n++;
    }
    expect(n).to.be.greaterThan(2);
  });

  it('parseHello() reads the fields of every hello vector from its bytes', () => {
    let n = 0;
    for (let i = 0; i < lines.length; i++) {
      if (lines[i].key !== 'hello-fields') continue;
      const f = Object.fromEntries(lines[i].value.split(' ').map((kv) => kv.split('=') as [string, string]));
      const h = parseHello(Buffer.from(lines[i + 1].value, 'hex'));
      expect(h, `line ${lines[i].line}`).to.deep.equal({
        pid: Number(f.pid),
        pageSize: Number(f.page_size),
        base: Number(f.base),
        length: Number(f.length),
        offset: Number(f.offset),
        ioctls: BigInt(f.ioctls),
      });
      n++;
    }
    expect(n).to.be.greaterThan(0);
  });

  it('the guest driver parses every policy line as the vectors say, and the shim lays out every hello byte for byte (C)', function () {
    this.timeout(60_000);
    const bin = path.join(tmpDir(), 'contract-vectors');
    const cc = spawnSync('cc', ['--version']);
    if (cc.error) throw new Error('no C compiler: scripts/setup installs build-essential');
    execFileSync('cc', ['-std=c11', '-O1', '-Wall', '-Wextra', '-Werror', '-Iguest-driver', '-Inative', 'native/test/contract-vectors.c', 'guest-driver/guestd-policy.c', '-o', bin], { cwd: ROOT });
    const run = spawnSync(bin, [VECTORS], { encoding: 'utf8' });
    const checks = lines.filter((l) => ['policy-parsed', 'policy-refused', 'hello-bytes'].includes(l.key)).length;
    expect({ status: run.status, out: run.stdout }).to.deep.equal({ status: 0, out: `ok ${checks}\n` });
  });
});
