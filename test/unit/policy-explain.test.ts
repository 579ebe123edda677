// The shipped policies load clean, and `explain` states the facts an admin
// asks about: what is sensitive, for how long, offline, expiry, wipe, prefetch.
import { expect } from 'chai';
import path from 'node:path';
import { explainPolicy, loadPolicy, loadPolicyFile } from '../../policies/index.js';
import { ROOT } from '../helpers/proc.js';

const MiB = 1024 * 1024;
const shipped = (name: string) => loadPolicyFile(path.join(ROOT, 'policies', name));
const explain = (text: string) => explainPolicy(loadPolicy(text, 'p.yaml').policy, 'p.yaml');

describe('shipped policies and explain', () => {
  it('laptop-default loads with nothing to say, and is the built-in defaults with a startup buffer', () => {
    const r = shipped('laptop-default.yaml');
    expect(r.diagnostics).to.deep.equal([]);
    expect(r.policy).to.deep.include({
      name: 'laptop-default',
      leaseTtlMs: 15 * 60_000,
      renewAfterMs: 5 * 60_000,
      memoryMode: 'all',
      evictIdleMs: 60_000,
      onLeaseExpiry: 'evict-sensitive',
      onWipe: 'evict-all',
      prefetchStartupBytes: 0,
      prefetchStartupAuto: true,
      prefetchOrder: 'trace',
    });
  });

  it('every shipped policy refuses devices whose keys are not sealed (issue #14), and explain says what a device needs', () => {
    for (const f of ['laptop-default.yaml', 'finance-strict.yaml', 'developer-hinted.yaml']) {
      expect(shipped(f).policy.deviceSeal, f).to.deep.equal(['tpm', 'passphrase']);
    }
    const text = explain('device:\n  key-ceiling: 500\n  key-window: 1h\n');
    expect(text).to.contain('\ndevices\n  - a lease goes only to a device whose identity keys are sealed to the TPM with a PIN, or sealed under a passphrase (Argon2id)\n');
    expect(text).to.contain('  - one device is given at most 500 sensitive chunk keys, counted once each, within 1 h;');
    expect(explain('')).to.contain("at most 95% of the image's sensitive chunk keys (at least 1024)");
  });

  it('finance-strict loads with nothing to say and is strict', () => {
    const r = shipped('finance-strict.yaml');
    expect(r.diagnostics).to.deep.equal([]);
    expect(r.policy).to.deep.include({
      leaseTtlMs: 5 * 60_000,
      memoryMode: 'all',
      sensitiveState: true,
      evictIdleMs: 15_000,
      evictBudgetBytes: 128 * MiB,
      dropGuestCache: true,
      onLeaseExpiry: 'evict-all',
      onWipe: 'poweroff',
    });
  });

  it('developer-hinted loads with nothing to say and names what is sensitive', () => {
    const r = shipped('developer-hinted.yaml');
    expect(r.diagnostics).to.deep.equal([]);
    expect(r.policy.memoryMode).to.equal('hinted');
    expect(r.policy.processes).to.include('gpg-agent');
  });

  it('explains finance-strict in its numbers', () => {
    const text = explainPolicy(shipped('finance-strict.yaml').policy, 'finance-strict.yaml');
    expect(text.split('\n')[0]).to.match(/^policy finance-strict: finance desks; /);
    const facts = [
      'every guest memory page is sensitive',
      "the VM's device state (CPU registers, devices) is sensitive",
      'evicted 15 s after it arrived',
      'at most 128 MiB of sensitive plaintext is resident at once',
      'guest drops its page cache of the sensitive files',
      'lease of 5 min; the agent renews it every 1 min',
      'keeps running for 4 min to 5 min',
      'every guest page (sensitive or not) is evicted',
      'the VM is powered off at once',
      'as much is fetched as keeps the rest of the learned order ahead of it',
      'capped at 20 MiB/s',
      'every 1 s, the guest driver reports',
    ];
    expect(facts.filter((f) => !text.includes(f)), 'facts missing from the explanation').to.deep.equal([]);
  });

  it('explains hinted memory by what the guest reports, and the defaults by what they leave open', () => {
    const hinted = explain('sensitive: {memory: hinted, processes: [gpg-agent], cgroups: [/finance.slice], files: [/srv/ledger], free-pages: keep}');
    expect(hinted).to.contain("the memory of processes 'gpg-agent'; the memory of processes in cgroups '/finance.slice'; the page cache of '/srv/ledger'");
    expect(hinted).to.contain('which of its frames are free and which hold sensitive data');
    expect(hinted).to.contain('pages the guest frees stay resident');
    // Every page of guest memory is in the server's sensitive class: its own key, released and audited.
    expect(hinted).to.contain("every page's key is still released on request and audited, but other pages are not evicted for idleness");
    expect(hinted).not.to.contain('one key');

    const defaults = explain('');
    expect(defaults.split('\n')[0]).to.equal('policy p.yaml');
    const facts = ['no cap on how much sensitive plaintext', 'no part of the disk is sensitive', 'nothing is fetched before the guest runs', 'not capped', 'the VM is held until the server grants a new lease'];
    expect(facts.filter((f) => !defaults.includes(f)), 'facts missing from the explanation').to.deep.equal([]);
  });

  it('explains memory none, suspend, disk ranges and prefetch without background order', () => {
    const text = explain('sensitive:\n  memory: none\n  disk: [[0, 1MiB]]\neviction: {on-lease-expiry: suspend}\nprefetch: {order: none, bandwidth: 5MiB/s}\n');
    expect(text).to.contain('no guest memory page is sensitive');
    expect(text).to.contain('no guest page is evicted for idleness');
    expect(text).to.contain('disk bytes 0–1048576 (1 MiB) are sensitive');
    expect(text).to.contain('the VM is suspended');
    expect(text).to.contain('other pages arrive only when the guest touches them');
    expect(text).not.to.contain('5 MiB/s');
  });
});
