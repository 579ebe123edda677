// The policy loader: every value kind, defaults, and each kind of finding with
// the line and field it names.
import { expect } from 'chai';
import { LetheError } from '../../common/errors.js';
import { DEFAULT_FULL_POLICY, loadPolicy, loadPolicyOrThrow, parsePolicy, type Diagnostic } from '../../policies/index.js';
import { storedPolicy } from '../../policies/policy.js';

const MiB = 1024 * 1024;

/** The findings of a policy text, without the file name, in file order. */
function findings(text: string) {
  return loadPolicy(text, 'p.yaml').diagnostics.map(({ file, ...d }) => {
    expect(file).to.equal('p.yaml');
    return d;
  });
}

const only = (text: string): Omit<Diagnostic, 'file'> => {
  const ds = findings(text);
  expect(ds, JSON.stringify(ds)).to.have.length(1);
  return ds[0];
};

const FULL = `name: laptop-default
description: ordinary laptops
lease:
  ttl: 15m
  renew: 300
sensitive:
  memory: hinted
  processes: [gpg-agent, ssh-agent]
  cgroups: [/finance.slice]
  files: [/home/user/.ssh]
  free-pages: keep
  state: true
  disk: [[0, 1048576], [2MiB, 3MiB]]
eviction:
  idle: 90s
  budget: 256MiB
  drop-guest-cache: false
  on-lease-expiry: suspend
  on-wipe: poweroff
prefetch:
  startup: 16MiB
  order: address
  bandwidth: 50MiB/s
hints:
  interval: 500ms
device:
  seal: [tpm]
  key-ceiling: 75%
  key-window: 10m
image:
  users: single
`;

describe('policy loader', () => {
  it('an empty or comment-only file is every default, with nothing to say', () => {
    for (const text of ['', '# nothing set yet\n', '---\n', 'lease:\nsensitive:\n']) {
      const r = loadPolicy(text, 'p.yaml');
      expect(r.diagnostics, text).to.deep.equal([]);
      expect(r.policy, text).to.deep.equal(DEFAULT_FULL_POLICY);
    }
    expect(DEFAULT_FULL_POLICY).to.deep.equal({
      name: '',
      description: '',
      leaseTtlMs: 900_000,
      renewAfterMs: 300_000,
      sensitiveMemory: true,
      sensitiveState: false,
      sensitiveDisk: [],
      evictIdleMs: 60_000,
      deviceSeal: ['tpm', 'passphrase'],
      keyCeiling: { share: 0.95 },
      keyWindowMs: 300_000,
      memoryMode: 'all',
      processes: [],
      cgroups: [],
      files: [],
      freePages: 'evict',
      evictBudgetBytes: null,
      dropGuestCache: true,
      onLeaseExpiry: 'evict-sensitive',
      onWipe: 'evict-all',
      prefetchStartupBytes: 0,
      prefetchStartupAuto: false,
      prefetchOrder: 'trace',
      prefetchBandwidth: null,
      hintIntervalMs: 2000,
      imageUsers: 'shared',
    });
  });

  it('reads every key of the full shape into times in ms and sizes in bytes', () => {
    const r = loadPolicy(FULL, 'p.yaml');
    expect(r.diagnostics).to.deep.equal([]);
    expect(r.policy).to.deep.equal({
      name: 'laptop-default',
      description: 'ordinary laptops',
      leaseTtlMs: 900_000,
      renewAfterMs: 300_000,
      sensitiveMemory: true,
      sensitiveState: true,
      sensitiveDisk: [
        [0, MiB],
        [2 * MiB, 3 * MiB],
      ],
      evictIdleMs: 90_000,
      deviceSeal: ['tpm'],
      keyCeiling: { share: 0.75 },
      keyWindowMs: 600_000,
      memoryMode: 'hinted',
      processes: ['gpg-agent', 'ssh-agent'],
      cgroups: ['/finance.slice'],
      files: ['/home/user/.ssh'],
      freePages: 'keep',
      evictBudgetBytes: 256 * MiB,
      dropGuestCache: false,
      onLeaseExpiry: 'suspend',
      onWipe: 'poweroff',
      prefetchStartupBytes: 16 * MiB,
      prefetchStartupAuto: false,
      prefetchOrder: 'address',
      prefetchBandwidth: 50 * MiB,
      hintIntervalMs: 500,
      imageUsers: 'single',
    });
  });

  it('device.seal and device.key-ceiling read seal kinds, a share or a count; a bad one names its line and element', () => {
    expect(loadPolicy('device:\n  key-ceiling: 20000\n', 'p').policy.keyCeiling).to.deep.equal({ count: 20000 });
    expect(only('device:\n  seal: [tpm, pasphrase]\n')).to.deep.equal({
      severity: 'error',
      line: 2,
      field: 'device.seal[1]',
      message: "expected tpm, passphrase or none, got 'pasphrase'",
      hint: "did you mean 'passphrase'?",
    });
    expect(only('name: x\ndevice:\n  key-ceiling: 150%\n')).to.deep.include({ line: 3, field: 'device.key-ceiling', message: "must be above 0% and at most 100%, got '150%'" });
    expect(only('device:\n  seal: [tpm, none]\n')).to.deep.include({ severity: 'warning', line: 2, field: 'device.seal' });
    expect(only('device:\n  seal: []\n')).to.deep.include({ severity: 'error', line: 2, field: 'device.seal', message: 'is empty: no device could get a lease' });
  });

  it('renew defaults to a third of the ttl; memory true and false mean all and none', () => {
    expect(loadPolicy('lease: {ttl: 90}', 'p').policy).to.deep.include({ leaseTtlMs: 90_000, renewAfterMs: 30_000 });
    expect(loadPolicy('sensitive: {memory: true}', 'p').policy).to.deep.include({ memoryMode: 'all', sensitiveMemory: true });
    expect(loadPolicy('sensitive: {memory: false}', 'p').policy).to.deep.include({ memoryMode: 'none', sensitiveMemory: false });
    expect(loadPolicy('sensitive: {memory: hinted, files: [/a]}', 'p').policy.sensitiveMemory).to.equal(true);
    expect(loadPolicy('eviction: {budget: 4096}\nprefetch: {bandwidth: 1048576, startup: 512K}', 'p').policy).to.deep.include({
      evictBudgetBytes: 4096,
      prefetchBandwidth: MiB,
      prefetchStartupBytes: 512 * 1024,
      prefetchStartupAuto: false,
    });
    expect(loadPolicy('prefetch: {startup: auto}', 'p').policy).to.deep.include({ prefetchStartupBytes: 0, prefetchStartupAuto: true });
  });

  it('a YAML syntax error names its line and stops there', () => {
    expect(only('lease:\n  ttl: 5m\nsensitive: [\n  memory: all\n')).to.deep.include({ severity: 'error', field: '(syntax)', line: 5 });
    const dup = only('lease:\n  ttl: 5m\n  ttl: 10m\n');
    expect(dup).to.deep.equal({ severity: 'error', line: 3, field: '(syntax)', message: 'map keys must be unique' });
    expect(loadPolicy('lease: [\n', 'p').policy).to.deep.equal(DEFAULT_FULL_POLICY);
  });

  it('a wrong value names the line of its node, the field, and what was expected', () => {
    expect(only('lease:\n  ttl: 10m\nsensitive:\n  memory: maybe\n')).to.deep.equal({
      severity: 'error',
      line: 4,
      field: 'sensitive.memory',
      message: "expected all, hinted or none, got 'maybe'",
    });
    expect(only('eviction:\n  on-lease-expiry: evict-al\n')).to.deep.equal({
      severity: 'error',
      line: 2,
      field: 'eviction.on-lease-expiry',
      message: "expected evict-sensitive, evict-all or suspend, got 'evict-al'",
      hint: "did you mean 'evict-all'?",
    });
    expect(only('\n\neviction:\n  idle: soon\n')).to.deep.include({ line: 4, field: 'eviction.idle', message: "expected a duration, got 'soon'" });
    expect(only('eviction:\n  idle: -5\n')).to.deep.include({ line: 2, field: 'eviction.idle', message: 'must not be negative, got -5' });
    expect(only('lease:\n  ttl: 0s\n')).to.deep.include({ line: 2, field: 'lease.ttl', message: "must be longer than 0, got '0s'" });
    expect(only('prefetch:\n  startup: 16 megs\n')).to.deep.include({
      line: 2,
      field: 'prefetch.startup',
      message: "expected 'auto' or a size, got '16 megs'",
      hint: "write auto (sized by the link and the image's learned first touches) or a size, e.g. 16MiB",
    });
    expect(only('prefetch:\n  bandwidth: fast\n')).to.deep.include({ field: 'prefetch.bandwidth', message: "expected a rate, got 'fast'" });
    expect(only('eviction:\n  budget: 1.5\n')).to.deep.include({ field: 'eviction.budget', message: "expected a whole number of bytes, got '1.5'" });
    expect(only('sensitive:\n  state: "yes"\n')).to.deep.include({ line: 2, field: 'sensitive.state', message: "expected true or false, got 'yes'" });
    expect(only('name: [a, b]\n')).to.deep.include({ line: 1, field: 'name', message: 'expected text, got a list' });
    // Values no lease or byte count can hold: refused here, not a 500 at the next lease.
    expect(only('lease:\n  ttl: .inf\n')).to.deep.include({ field: 'lease.ttl', message: "must be at most a year, got 'Infinity'" });
    expect(only('lease:\n  ttl: 1e300\n').field).to.equal('lease.ttl');
    const huge = only(`eviction:\n  budget: "${'9'.repeat(400)}"\n`);
    expect(huge.field).to.equal('eviction.budget');
    expect(huge.message).to.match(/^expected a size, got '9+\.\.\.'$/);
    expect(only('eviction:\n  budget: 1e300\n').message).to.equal("expected a whole number of bytes, got '1e+300'");
  });

  it('an error inside a list points at the element', () => {
    expect(only('sensitive:\n  disk:\n    - [0, 4096]\n    - [8192, lots]\n')).to.deep.include({
      line: 4,
      field: 'sensitive.disk[1][1]',
      message: "expected a size, got 'lots'",
    });
    expect(only('sensitive:\n  disk: [[0, 4096], [1, 2, 3]]\n')).to.deep.include({ line: 2, field: 'sensitive.disk[1]', message: 'expected a [start, end] pair, got a list' });
    expect(only('sensitive:\n  memory: hinted\n  processes:\n    - gpg-agent\n    - {name: x}\n')).to.deep.include({
      line: 5,
      field: 'sensitive.processes[1]',
      message: 'expected a name, got a mapping',
    });
    expect(only('sensitive:\n  files: /home/user/.ssh\n')).to.deep.include({
      field: 'sensitive.files',
      message: "expected a list of paths, got '/home/user/.ssh'",
      hint: 'write a list, e.g. [/home/user/.ssh]',
    });
  });

  it('a section or the whole file of the wrong shape is named', () => {
    expect(only('name: x\nlease: 15m\n')).to.deep.equal({
      severity: 'error',
      line: 2,
      field: 'lease',
      message: "expected a mapping of ttl, renew, got '15m'",
      hint: "put its keys below it, e.g. 'lease: {ttl: …}'",
    });
    expect(only('- lease\n- sensitive\n')).to.deep.include({ line: 1, field: '(top)', severity: 'error' });
    expect(only('just words\n')).to.deep.include({ field: '(top)', message: "expected a mapping of keys such as lease, sensitive and eviction, got 'just words'" });
  });

  it('unknown keys are warnings with their line and a did-you-mean, and the rest still loads', () => {
    const text = 'lease:\n  ttl: 10m\neviction:\n  idel: 30s\n  drop_guest_cache: false\nttl: 5m\nowner: finance\n';
    const r = loadPolicy(text, 'p.yaml');
    expect(r.diagnostics.map(({ line, field, severity, hint }) => ({ line, field, severity, hint }))).to.deep.equal([
      { line: 4, field: 'eviction.idel', severity: 'warning', hint: "did you mean 'idle'?" },
      { line: 5, field: 'eviction.drop_guest_cache', severity: 'warning', hint: "did you mean 'drop-guest-cache'?" },
      { line: 6, field: 'ttl', severity: 'warning', hint: "did you mean 'lease.ttl'? it belongs under 'lease'" },
      { line: 7, field: 'owner', severity: 'warning', hint: 'known keys here: name, description, lease, sensitive, eviction, prefetch, hints, device, image' },
    ]);
    expect(r.diagnostics[0].message).to.equal("unknown key 'idel' is ignored");
    expect(r.policy.leaseTtlMs).to.equal(600_000);
    expect(r.policy.evictIdleMs).to.equal(DEFAULT_FULL_POLICY.evictIdleMs);
    expect(() => parsePolicy(text, 'p.yaml')).not.to.throw();
  });

  it('a key with no value is a warning and keeps the default', () => {
    expect(only('lease:\n  ttl:\n')).to.deep.equal({
      severity: 'warning',
      line: 2,
      field: 'lease.ttl',
      message: 'has no value, so the default applies',
      hint: 'give it a value or remove the key',
    });
  });

  it('anchors and aliases read as their targets', () => {
    const r = loadPolicy('x-short: &short 15s\nx-section: &ev {idle: *short, budget: 64MiB}\neviction: *ev\nhints: {interval: *short}\n', 'p');
    expect(r.policy).to.deep.include({ evictIdleMs: 15_000, evictBudgetBytes: 64 * MiB, hintIntervalMs: 15_000 });
    expect(r.diagnostics.map((d) => d.field)).to.deep.equal(['x-short', 'x-section']);
  });

  it('never throws on junk: it says what is wrong', () => {
    const bomb = ['a: &a [x, x, x, x, x, x, x, x, x]', ...'bcdefghij'.split('').map((c, i) => `${c}: &${c} [${Array(9).fill('*' + 'abcdefghij'[i]).join(', ')}]`), 'name: *j'].join('\n');
    const junk = ['\u0000\u0001\u0002', '{', ']]]', '!!binary AAAA', 'lease: !!set {a, b}', '? [a, b]\n: c\n', 'lease: {ttl: {a: 1}}', 'sensitive: {disk: [[]]}', bomb, 'a'.repeat(100_000)];
    for (const text of junk) {
      const r = loadPolicy(text, 'junk.yaml');
      expect(r.policy, text.slice(0, 40)).to.be.an('object');
      expect(r.diagnostics.length, text.slice(0, 40)).to.be.greaterThan(0);
    }
  });

  it('meaning checks wait until every value reads', () => {
    const ds = findings('lease:\n  ttl: soon\n  renew: 20m\n');
    expect(ds.map((d) => d.field)).to.deep.equal(['lease.ttl']);
  });

  it('the throwing form names file, line and field of the first error, with its hint', () => {
    expect(() => loadPolicyOrThrow('lease:\n  renew: 1h\n', 'strict.yaml'))
      .to.throw(LetheError, 'strict.yaml:2: lease.renew: must be shorter than lease.ttl (1 h ≥ 15 min)')
      .with.property('hint', 'renew well before the lease runs out, e.g. at a third of the ttl');
    try {
      parsePolicy('eviction:\n  on-wipe: shred\n', 'w.yaml');
      expect.fail('no error');
    } catch (e) {
      expect(e).to.be.instanceOf(LetheError).and.deep.include({ code: 'BAD_REQUEST', message: "w.yaml:2: eviction.on-wipe: expected evict-all or poweroff, got 'shred'" });
    }
    expect(loadPolicyOrThrow('eviction: {idel: 5s}', 'p').evictIdleMs).to.equal(60_000);
  });

  it('a stored policy skips only the meaning checks: one whose value no longer reads fails closed, not with the default', () => {
    // A meaning check it fails (renew after the ttl) does not stop it: it passed when it was stored.
    expect(storedPolicy('lease:\n  ttl: 1m\n  renew: 5m\n')).to.deep.include({ leaseTtlMs: 60_000, renewAfterMs: 300_000 });
    // A disk range this Lethe cannot read: the default would be no sensitive disk at all.
    const unreadable = 'sensitive:\n  disk: [[0, 1MiB], [2MiB, 3 megs]]\n';
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        storedPolicy(unreadable);
        expect.fail('no error');
      } catch (e) {
        expect(e, `attempt ${attempt}: a failure is not remembered as a policy`).to.be.instanceOf(LetheError).and.deep.include({
          code: 'INTERNAL',
          message: "the image's stored policy cannot be read: stored policy:2: sensitive.disk[1][1]: expected a size, got '3 megs'",
          hint: "replace it with 'lethe image policy IMAGE FILE'",
        });
      }
    }
    expect(() => storedPolicy('lease: [\n'), 'a syntax error too').to.throw(LetheError, /^the image's stored policy cannot be read: stored policy:\d+: \(syntax\): /);
  });
});
