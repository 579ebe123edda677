// `lethe policy check | explain | simulate` as an admin runs them: command, exit code,
// stdout and stderr.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { lethe, ROOT, tmpDir } from '../helpers/proc.js';

const DEFAULT = path.join(ROOT, 'policies', 'laptop-default.yaml');
const STRICT = path.join(ROOT, 'policies', 'finance-strict.yaml');

describe('lethe policy (CLI)', function () {
  let dir: string;
  let bad: string;
  let warned: string;

  before(() => {
    dir = tmpDir();
    bad = path.join(dir, 'bad.yaml');
    fs.writeFileSync(bad, 'lease:\n  ttl: 10m\n  renew: 15m\neviction:\n  idel: 30s\n  on-wipe: shred\n');
    warned = path.join(dir, 'warned.yaml');
    fs.writeFileSync(warned, 'name: warned\nsensitive:\n  memory: hinted\n  processes: [thunderbird-wrapper]\n');
  });

  it('check: the shipped policies pass with nothing to say (exit 0)', async () => {
    const r = await lethe(['policy', 'check', DEFAULT, STRICT, path.join(ROOT, 'policies', 'developer-hinted.yaml')]);
    expect(r).to.deep.equal({ code: 0, stdout: '3 policy files checked: no errors, no warnings\n', stderr: '' });
  });

  it('check: errors and warnings with file, line, field and hint; exit 1 when any file has an error', async () => {
    const r = await lethe(['policy', 'check', bad, DEFAULT]);
    expect(r.code).to.equal(1);
    expect(r.stderr).to.equal('');
    expect(r.stdout).to.equal(
      [
        `${bad}:5: warning: eviction.idel: unknown key 'idel' is ignored`,
        "  hint: did you mean 'idle'?",
        `${bad}:6: error: eviction.on-wipe: expected evict-all or poweroff, got 'shred'`,
        '2 policy files checked: 1 error, 1 warning',
        '',
      ].join('\n'),
    );
    // With the enum fixed, the meaning checks run and find the renewal after expiry.
    fs.writeFileSync(bad, 'lease:\n  ttl: 10m\n  renew: 15m\n');
    const again = await lethe(['policy', 'check', bad]);
    expect(again.code).to.equal(1);
    expect(again.stdout).to.equal(
      `${bad}:3: error: lease.renew: must be shorter than lease.ttl (15 min ≥ 10 min)\n` +
        '  hint: renew well before the lease runs out, e.g. at a third of the ttl\n' +
        '1 policy file checked: 1 error, no warnings\n',
    );
  });

  it('check: warnings alone exit 0', async () => {
    const r = await lethe(['policy', 'check', warned]);
    expect(r.code).to.equal(0);
    expect(r.stdout).to.equal(
      `${warned}:4: warning: sensitive.processes[0]: 'thunderbird-wrapper' is longer than the 15 characters the guest kernel keeps of a process name (comm), so it never matches\n` +
        "  hint: write 'thunderbird-wra', as 'ps -o comm' shows it\n" +
        '1 policy file checked: no errors, 1 warning\n',
    );
  });

  it('check --json: every diagnostic as data', async () => {
    const r = await lethe(['policy', 'check', '--json', warned, DEFAULT]);
    expect(r.code).to.equal(0);
    expect(JSON.parse(r.stdout)).to.deep.equal({
      ok: true,
      files: 2,
      errors: 0,
      warnings: 1,
      diagnostics: [
        {
          file: warned,
          severity: 'warning',
          line: 4,
          field: 'sensitive.processes[0]',
          message: "'thunderbird-wrapper' is longer than the 15 characters the guest kernel keeps of a process name (comm), so it never matches",
          hint: "write 'thunderbird-wra', as 'ps -o comm' shows it",
        },
      ],
    });
  });

  it('check: a YAML syntax error names its line', async () => {
    const broken = path.join(dir, 'broken.yaml');
    fs.writeFileSync(broken, 'lease:\n  ttl: 10m\nsensitive: [all\n');
    const r = await lethe(['policy', 'check', broken]);
    expect(r.code).to.equal(1);
    expect(r.stdout).to.match(new RegExp(`^${broken.replace(/[.]/g, '\\.')}:4: error: \\(syntax\\): flow sequence .*\n1 policy file checked: 1 error, no warnings\n$`));
  });

  it('explain: plain words for finance-strict (exit 0)', async () => {
    const r = await lethe(['policy', 'explain', STRICT]);
    expect(r.code).to.equal(0);
    expect(r.stderr).to.equal('');
    const lines = r.stdout.split('\n');
    expect(lines[0]).to.equal('policy finance-strict: finance desks; 5-minute lease, pages evicted after 15 s, 128 MiB plaintext budget');
    for (const head of ['what is sensitive', 'how long plaintext may stay', 'lease, offline, expiry and wipe', 'prefetch', 'guest reports']) {
      expect(lines).to.include(head);
    }
    expect(r.stdout).to.contain('  - a sensitive page is evicted 15 s after it arrived');
    expect(r.stdout).to.contain('  - when the lease runs out: every key is zeroed, every guest page (sensitive or not) is evicted');
    expect(r.stdout).to.contain('  - on a wipe order (acted on at the next heartbeat): the VM is powered off at once');
  });

  it("issue #14: image.users is checked with its line, and explain says whom a check-in reaches", async () => {
    const typo = path.join(dir, 'typo-users.yaml');
    fs.writeFileSync(typo, 'name: solo\nimage:\n  users: singel\n');
    const r = await lethe(['policy', 'check', typo]);
    expect(r).to.deep.equal({
      code: 1,
      stdout: `${typo}:3: error: image.users: expected shared or single, got 'singel'\n  hint: did you mean 'single'?\n1 policy file checked: 1 error, no warnings\n`,
      stderr: '',
    });
    const solo = path.join(dir, 'solo.yaml');
    fs.writeFileSync(solo, 'name: solo\nimage:\n  users: single\n');
    const single = await lethe(['policy', 'explain', solo]);
    expect(single.code).to.equal(0);
    expect(single.stdout).to.contain(
      "\ncheck-ins\n  - the image has one user (users: single): a device's check-in or suspend becomes the version every assigned device resumes, without an admin",
    );
    const shared = await lethe(['policy', 'explain', '--json', DEFAULT]);
    const out = JSON.parse(shared.stdout) as { policy: Record<string, unknown>; explanation: string };
    expect(out.policy).to.deep.include({ imageUsers: 'shared' });
    expect(out.explanation).to.contain(
      "\ncheck-ins\n  - a device's check-in or suspend is a version only that device resumes; other devices keep the image's shared version until an admin promotes it (lethe image promote)",
    );
  });

  it('explain: warnings go to stderr beside the explanation; --json gives the parsed policy', async () => {
    const r = await lethe(['policy', 'explain', warned]);
    expect(r.code).to.equal(0);
    expect(r.stdout).to.match(/^policy warned\n/);
    expect(r.stderr).to.match(new RegExp(`^${warned.replace(/[.]/g, '\\.')}:4: warning: sensitive\\.processes\\[0\\]: `));
    const j = await lethe(['policy', 'explain', '--json', DEFAULT]);
    expect(j.code).to.equal(0);
    const out = JSON.parse(j.stdout) as { file: string; policy: Record<string, unknown>; diagnostics: unknown[]; explanation: string };
    expect(out.file).to.equal(DEFAULT);
    expect(out.policy).to.deep.include({ name: 'laptop-default', leaseTtlMs: 900_000, prefetchStartupBytes: 0, prefetchStartupAuto: true });
    expect(out.diagnostics).to.deep.equal([]);
    expect(out.explanation).to.match(/^policy laptop-default: /);
  });

  it('explain refuses a policy with errors: its diagnostics on stderr, exit 2 (BAD_REQUEST)', async () => {
    const late = path.join(dir, 'late.yaml');
    fs.writeFileSync(late, 'lease:\n  ttl: 10m\n  renew: 15m\n');
    const r = await lethe(['policy', 'explain', late]);
    expect(r.code).to.equal(2);
    expect(r.stdout).to.equal('');
    expect(r.stderr).to.equal(
      `${late}:3: error: lease.renew: must be shorter than lease.ttl (15 min ≥ 10 min)\n` +
        '  hint: renew well before the lease runs out, e.g. at a third of the ttl\n' +
        `lethe: error: policy '${late}' has 1 error, no warnings; only a policy without errors can be explained\n` +
        `lethe: hint: fix the errors above; 'lethe policy check ${late}' lists them again\n`,
    );
  });

  describe('simulate', () => {
    let trace: string;
    before(() => {
      // 48 pages touched in turn every 500 ms for 2 minutes: each comes back every 24 s.
      const lines = [JSON.stringify({ trace: 'lethe-access', version: 1, pages: 64 })];
      for (let t = 0; t < 120_000; t += 500) lines.push(JSON.stringify({ t, fault: (t / 500) % 48 }));
      trace = path.join(dir, 'trace.jsonl');
      fs.writeFileSync(trace, lines.join('\n') + '\n');
    });

    it('replays a trace beside no eviction and evicting everything (--json)', async () => {
      const r = await lethe(['policy', 'simulate', STRICT, '--trace', trace, '--json']);
      expect(r.code, r.stderr).to.equal(0);
      const out = JSON.parse(r.stdout) as { pages: number; events: number; results: { name: string; faults: number; serverFetches: number; sensitivePlaintextSeconds: number }[] };
      expect(out).to.include({ pages: 64, events: 240 });
      const [policy, keep, all] = out.results;
      expect(out.results.map((x) => x.name)).to.deep.equal(['policy', 'no eviction', 'evict everything']);
      expect(keep.faults, 'kept pages fault once').to.equal(48);
      expect(all.faults, 'evicted pages fault on every touch').to.equal(240);
      expect(policy.serverFetches, 'a re-fault comes from the cache').to.equal(48);
      expect(policy.sensitivePlaintextSeconds).to.be.below(keep.sensitivePlaintextSeconds).and.above(all.sensitivePlaintextSeconds);
    });

    it('prints a table for people', async () => {
      const r = await lethe(['policy', 'simulate', DEFAULT, '--trace', trace]);
      expect(r.code).to.equal(0);
      expect(r.stdout).to.match(new RegExp(`^${DEFAULT.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} replayed over .* \\(64 guest pages, 240 events\\):\n`));
      expect(r.stdout).to.match(/\nno eviction +48 +48 /);
    });

    it('a missing or malformed trace is a clear error naming it (exit 2)', async () => {
      const missing = await lethe(['policy', 'simulate', DEFAULT, '--trace', path.join(dir, 'nope.jsonl')]);
      expect(missing.code).to.equal(2);
      expect(missing.stderr).to.include(`lethe: error: cannot read trace '${path.join(dir, 'nope.jsonl')}': ENOENT`);
      const broken = path.join(dir, 'broken.jsonl');
      fs.writeFileSync(broken, JSON.stringify({ trace: 'lethe-access', version: 1, pages: 4 }) + '\n{"t": 1, "fault": 7}\n');
      const r = await lethe(['policy', 'simulate', DEFAULT, '--trace', broken]);
      expect(r.code).to.equal(2);
      expect(r.stderr).to.include(`lethe: error: ${broken}:2: page 7 is outside the guest's 4 pages`);
    });

    it('recording a trace needs --vm: without it the agent does not start (exit 2)', async () => {
      const r = await lethe(['agent', 'run', 'desk', '--home', dir, '--trace', path.join(dir, 't.jsonl')]);
      expect(r.code).to.equal(2);
      expect(r.stderr).to.equal(`lethe: error: --trace records a VM's faults: it needs --vm\nlethe: hint: lethe agent run desk --vm --trace ${path.join(dir, 't.jsonl')}\n`);
    });

    it('refuses a policy with errors the way explain and image push do (exit 2)', async () => {
      const refused = path.join(dir, 'refused.yaml');
      fs.writeFileSync(refused, 'lease:\n  ttl: 10m\n  renew: 15m\neviction:\n  idel: 30s\n  on-wipe: shred\n');
      const r = await lethe(['policy', 'simulate', refused, '--trace', trace]);
      expect(r.code).to.equal(2);
      expect(r.stdout).to.equal('');
      expect(r.stderr, 'every finding, the warning too, then the refusal').to.equal(
        `${refused}:5: warning: eviction.idel: unknown key 'idel' is ignored\n` +
          "  hint: did you mean 'idle'?\n" +
          `${refused}:6: error: eviction.on-wipe: expected evict-all or poweroff, got 'shred'\n` +
          `lethe: error: policy '${refused}' has 1 error, 1 warning; only a policy without errors can be simulated\n` +
          `lethe: hint: fix the errors above; 'lethe policy check ${refused}' lists them again\n`,
      );
      const j = await lethe(['policy', 'simulate', refused, '--trace', trace, '--json']);
      expect(j.code).to.equal(2);
      expect(JSON.parse(j.stdout)).to.deep.equal({
        error: {
          code: 'BAD_REQUEST',
          message: `policy '${refused}' has 1 error, 1 warning; only a policy without errors can be simulated`,
          hint: `fix the errors above; 'lethe policy check ${refused}' lists them again`,
        },
      });
    });
  });
});
