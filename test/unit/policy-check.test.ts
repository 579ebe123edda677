// Meaning checks: each catches one mistake an admin could make, names the field
// and its line, and stays quiet for the sound policy next to it.
import { expect } from 'chai';
import { loadPolicy, type Diagnostic } from '../../policies/index.js';

const findings = (text: string) => loadPolicy(text, 'p.yaml').diagnostics.map(({ file: _file, ...d }) => d);

/** The one finding of a policy text. */
function only(text: string): Omit<Diagnostic, 'file'> {
  const ds = findings(text);
  expect(ds, JSON.stringify(ds, null, 1)).to.have.length(1);
  return ds[0];
}

const none = (text: string) => expect(findings(text), text).to.deep.equal([]);

describe('policy meaning checks', () => {
  it('renew at or after the ttl is an error on lease.renew', () => {
    expect(only('lease:\n  ttl: 10m\n  renew: 10m\n')).to.deep.equal({
      severity: 'error',
      line: 3,
      field: 'lease.renew',
      message: 'must be shorter than lease.ttl (10 min ≥ 10 min)',
      hint: 'renew well before the lease runs out, e.g. at a third of the ttl',
    });
    expect(only('lease:\n  renew: 20m\n')).to.deep.include({ severity: 'error', line: 2, field: 'lease.renew' });
    none('lease:\n  ttl: 10m\n  renew: 9m\n');
  });

  it('an idle time not shorter than the lease is a warning: expiry eviction is all that catches those pages', () => {
    expect(only('lease: {ttl: 5m}\neviction:\n  idle: 5m\n')).to.deep.include({
      severity: 'warning',
      line: 3,
      field: 'eviction.idle',
      message: "eviction.idle (5 min) is not shorter than lease.ttl (5 min): sensitive pages outlive the keys' lease, and only the eviction at lease expiry removes them",
    });
    expect(only('lease:\n  ttl: 30s\n')).to.deep.include({ severity: 'warning', line: 2, field: 'lease.ttl' });
    expect(only('lease:\n  ttl: 30s\n').message).to.contain('1 min, the default');
    none('lease: {ttl: 5m}\neviction: {idle: 299s}\n');
    none('lease: {ttl: 5m}\nsensitive: {memory: none}\neviction: {idle: 1h}\n');
  });

  it('a budget below one page is an error; below the startup buffer, or with nothing sensitive, a warning', () => {
    expect(only('eviction:\n  budget: 1KiB\n')).to.deep.include({
      severity: 'error',
      line: 2,
      field: 'eviction.budget',
      message: '1 KiB is less than one guest page (4 KiB): no sensitive page could stay resident',
    });
    expect(only('eviction:\n  budget: 0\n')).to.deep.include({ severity: 'error', field: 'eviction.budget' });
    expect(only('prefetch: {startup: 64MiB}\neviction:\n  budget: 32MiB\n')).to.deep.include({
      severity: 'warning',
      line: 3,
      field: 'eviction.budget',
      message: '32 MiB is less than prefetch.startup (64 MiB): sensitive pages fetched at startup are evicted again before the guest uses them',
    });
    expect(only('sensitive: {memory: none}\neviction: {budget: 64MiB}\n')).to.deep.include({ severity: 'warning', field: 'eviction.budget' });
    none('prefetch: {startup: 64MiB}\neviction: {budget: 64MiB}\n');
    none('eviction: {budget: 4096}\n');
  });

  it('hinted memory that names nothing is a warning', () => {
    expect(only('sensitive:\n  memory: hinted\n')).to.deep.equal({
      severity: 'warning',
      line: 2,
      field: 'sensitive.memory',
      message: 'is hinted but no processes, cgroups or files are listed: nothing is sensitive but free pages',
      hint: 'list the processes, cgroups or files whose pages are sensitive, or use memory: all',
    });
    none('sensitive:\n  memory: hinted\n  cgroups: [/finance.slice]\n');
  });

  it('lists of sensitive things with memory none are warnings: they have no effect', () => {
    const ds = findings('sensitive:\n  memory: none\n  processes: [gpg-agent]\n  files: [/srv]\n');
    expect(ds.map((d) => [d.severity, d.line, d.field])).to.deep.equal([
      ['warning', 3, 'sensitive.processes'],
      ['warning', 4, 'sensitive.files'],
    ]);
  });

  it('process names the guest kernel cannot report are warnings on the element', () => {
    expect(only('sensitive:\n  processes:\n    - gpg-agent\n    - thunderbird-wrapper\n')).to.deep.equal({
      severity: 'warning',
      line: 4,
      field: 'sensitive.processes[1]',
      message: "'thunderbird-wrapper' is longer than the 15 characters the guest kernel keeps of a process name (comm), so it never matches",
      hint: "write 'thunderbird-wra', as 'ps -o comm' shows it",
    });
    expect(only('sensitive:\n  processes: [/usr/bin/gpg-agent]\n')).to.deep.include({
      field: 'sensitive.processes[0]',
      hint: "write 'gpg-agent'",
    });
    none('sensitive:\n  processes: [exactly15-chars]\n');
    none('sensitive:\n  processes: [größenwahn-ö]\n'); // 12 characters, 15 bytes
    expect(only('sensitive:\n  processes: [größenwahn-öäü]\n').field, '14 characters, 18 bytes').to.equal('sensitive.processes[0]');
  });

  it('relative guest paths are errors naming the element', () => {
    const ds = findings('sensitive:\n  files:\n    - /etc/ssh\n    - home/user/.ssh\n    - ~/.gnupg\n  cgroups: [finance.slice]\n');
    expect(ds).to.deep.equal([
      { severity: 'error', line: 4, field: 'sensitive.files[1]', message: "'home/user/.ssh' is not an absolute path", hint: "write '/home/user/.ssh'" },
      {
        severity: 'error',
        line: 5,
        field: 'sensitive.files[2]',
        message: "'~/.gnupg' is not an absolute path",
        hint: "the guest driver does not expand '~': write the full path, e.g. '/home/user/.gnupg'",
      },
      { severity: 'error', line: 6, field: 'sensitive.cgroups[0]', message: "'finance.slice' is not an absolute path", hint: "write '/finance.slice'" },
    ]);
  });

  it('empty, reversed and overlapping disk ranges are errors on the later range', () => {
    const ds = findings('sensitive:\n  disk:\n    - [0, 1MiB]\n    - [4096, 4096]\n    - [512KiB, 2MiB]\n    - [8MiB, 9MiB]\n    - [8MiB, 7MiB]\n');
    expect(ds.map((d) => [d.line, d.field, d.message])).to.deep.equal([
      [4, 'sensitive.disk[1]', 'end 4096 is not after start 4096'],
      [5, 'sensitive.disk[2]', '[524288, 2097152] overlaps sensitive.disk[0] [0, 1048576]'],
      [7, 'sensitive.disk[4]', 'end 7340032 is not after start 8388608'],
    ]);
    expect(ds[1].hint).to.equal('merge them into one range, e.g. [0, 2097152]');
    // A range inside a long one is caught though a shorter one sits between them.
    expect(findings('sensitive:\n  disk: [[0, 100], [10, 20], [30, 40]]\n').map((d) => d.field)).to.deep.equal(['sensitive.disk[1]', 'sensitive.disk[2]']);
    none('sensitive:\n  disk: [[0, 4096], [4096, 8192]]\n');
  });

  it('a zero bandwidth is an error; a startup buffer over 1 GiB a warning', () => {
    expect(only('prefetch:\n  bandwidth: 0MiB/s\n')).to.deep.equal({
      severity: 'error',
      line: 2,
      field: 'prefetch.bandwidth',
      message: 'is 0, which would stall background prefetch for good',
      hint: "leave it out for no cap; to turn background prefetch off use 'order: none'",
    });
    expect(only('prefetch:\n  startup: 2GiB\n')).to.deep.include({ severity: 'warning', line: 2, field: 'prefetch.startup', message: 'the guest waits for 2 GiB to arrive before it runs' });
    none('prefetch: {startup: 1GiB, bandwidth: 1KiB/s}\n');
  });

  it('suspend at expiry with nothing sensitive in memory is a warning', () => {
    expect(only('sensitive: {memory: none}\neviction:\n  on-lease-expiry: suspend\n')).to.deep.include({ severity: 'warning', line: 3, field: 'eviction.on-lease-expiry' });
    none('eviction: {on-lease-expiry: suspend}\n');
  });

  it('what the guest driver would refuse is an error: interval out of range, too many names, NUL bytes, an overlong policy line', () => {
    expect(only('hints:\n  interval: 50ms\n')).to.deep.include({
      severity: 'error',
      line: 2,
      field: 'hints.interval',
      message: '50 ms is outside what the guest driver accepts (100 ms to 24 h)',
    });
    expect(only('hints: {interval: 2d}\n')).to.deep.include({ severity: 'error', field: 'hints.interval' });
    const many = Array.from({ length: 129 }, (_, i) => `p${i}`).join(', ');
    expect(only(`sensitive:\n  processes: [${many}]\n`)).to.deep.include({
      severity: 'error',
      line: 2,
      field: 'sensitive.processes',
      message: '129 entries, more than the 128 the guest driver takes',
    });
    expect(only('sensitive:\n  files: [/etc, "/tmp/a\\0b"]\n')).to.deep.include({ severity: 'error', field: 'sensitive.files[1]', message: 'holds a NUL byte, which no guest name or path can' });
    const long = Array.from({ length: 120 }, (_, i) => `/a/rather/long/directory/name/number/${i}`).join(', ');
    const over = only(`sensitive:\n  processes: [gpg-agent]\n  files: [${long}]\n`);
    expect(over).to.deep.include({ severity: 'error', line: 3, field: 'sensitive.files' });
    expect(over.message).to.match(/^the hint policy takes \d+ bytes, over the 4096-byte line limit$/);
    none('hints: {interval: 100ms}\nsensitive: {processes: [gpg-agent], files: [/etc/ssh]}\n');
  });

  it('hinted memory with reports rarer than the idle time is a warning on hints.interval', () => {
    expect(only('sensitive: {memory: hinted, processes: [gpg-agent]}\neviction: {idle: 10s}\nhints:\n  interval: 10s\n')).to.deep.include({
      severity: 'warning',
      line: 4,
      field: 'hints.interval',
      message: 'the guest reports every 10 s, not more often than pages go idle (10 s): a sensitive page may stay up to 20 s',
    });
    none('sensitive: {memory: all}\neviction: {idle: 10s}\nhints: {interval: 10s}\n');
  });
});
