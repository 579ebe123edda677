// The lease hooks against the table in docs/lease-state.md ("Hooks"): each row puts
// the hooks in a situation, calls the hook, and expects exactly the listed effects.
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { LeaseHooks, type GuestSide, type LeaseEffects } from '../../agent/daemon/lease-hooks.js';
import { PolicyManager } from '../../policies/manager.js';
import { DEFAULT_FULL_POLICY } from '../../policies/schema.js';
import type { TAgentPolicy } from '../../common/wire.js';
import { ROOT } from '../helpers/proc.js';

interface Row {
  hook: string;
  situation: string;
  effects: string[];
}

/** The rows of the Hooks table; an empty "call after" cell repeats the row above's hook. */
function hookTable(): Row[] {
  const doc = fs.readFileSync(path.join(ROOT, 'docs', 'lease-state.md'), 'utf8');
  const section = doc.split('## Hooks')[1]?.split('\n## ')[0];
  if (!section) throw new Error('docs/lease-state.md has no Hooks section');
  const rows: Row[] = [];
  for (const line of section.split('\n')) {
    const cells = line.split('|').slice(1, -1).map((c) => c.trim());
    const hook = /^`(\w+)\(\)`$/.exec(cells[0] ?? '')?.[1];
    if (!hook || cells.length !== 4) continue;
    const effects = cells[3] === '(nothing)' ? [] : [...cells[3].matchAll(/`([^`]+)`/g)].map((m) => m[1]);
    rows.push({ hook, situation: cells[2], effects });
  }
  return rows;
}

/** A LeaseEffects that records what the hooks do, with a guest in the row's situation. */
function recorder(situation: string) {
  const did: string[] = [];
  const onExpiry = /on-lease-expiry: ([\w-]+)/.exec(situation)?.[1] ?? 'evict-sensitive';
  const policy = { ...DEFAULT_FULL_POLICY, onLeaseExpiry: onExpiry } as TAgentPolicy;
  const manager = new PolicyManager(policy, 16);
  const guest: GuestSide = {
    hold: async () => (did.push('hold guest'), async () => void did.push('release guest')),
    endingAction: () => manager.leaseEnding(),
    evictResident: async (_why, scope) => void did.push(`evict ${scope}`),
    applyPolicy: () => void did.push('apply policy'),
  };
  const fx: LeaseEffects = {
    guest: () => (situation === 'no guest' ? undefined : guest),
    policy: () => policy,
    evictAllSensitive: () => void did.push("evict the agent's sensitive chunks"),
    uploadTrace: async () => void did.push('upload trace'),
    suspend: async () => void did.push('suspend'),
    prefetch: () => void did.push('prefetch'),
    serve: async () => void did.push('serve'),
    shutdown: (code, removeCache, after) => {
      did.push(`stop ${code}${removeCache ? ' and delete the cache' : ''}`);
      void after?.();
    },
    eraseRevoked: async (status) => void did.push(`erase the home as ${status}`),
    wipe: async () => void did.push('wipe'),
    zeroedAfterMs: () => 5,
    wantsVm: situation !== 'no guest',
    log: () => {},
  };
  return { did, hooks: new LeaseHooks(fx) };
}

const settle = () => new Promise((r) => setImmediate(r));

describe('lease hooks (docs/lease-state.md, Hooks)', () => {
  const rows = hookTable();

  it('the table covers every hook', () => {
    const hooks = Object.getOwnPropertyNames(LeaseHooks.prototype).filter((n) => n !== 'constructor' && !['guestRuns', 'holdGuest'].includes(n));
    expect([...new Set(rows.map((r) => r.hook))].sort()).to.deep.equal(hooks.sort());
  });

  for (const row of rows) {
    it(`${row.hook}(), ${row.situation}: ${row.effects.join(', ') || 'nothing'}`, async () => {
      const { did, hooks } = recorder(row.situation);
      if (row.situation === 'guest held for the lease') {
        hooks.expiredLease();
        await settle();
        did.length = 0;
      }
      const lease = { leaseId: 'lease-1', image: 'desk', version: 1, classKeys: [], ttlSeconds: 60 };
      const error = Object.assign(new Error('refused'), { code: row.situation.includes('DEVICE_WIPED') ? 'DEVICE_WIPED' : 'DEVICE_REVOKED' });
      const call: Record<string, () => unknown> = {
        leaseGranted: () => hooks.leaseGranted(lease),
        leaseRenewed: () => hooks.leaseRenewed(),
        leaseEnding: () => hooks.leaseEnding(),
        expiredLease: () => hooks.expiredLease(),
        revoked: () => hooks.revoked(error),
        wipeOrdered: () => hooks.wipeOrdered('cmd-1'),
      };
      await call[row.hook]();
      await settle();
      expect(did).to.deep.equal(row.effects);
    });
  }

  it('a guest already held is not held twice; a failed hold is tried again at the next turn', async () => {
    const { did, hooks } = recorder('guest running');
    hooks.expiredLease();
    hooks.expiredLease();
    await settle();
    expect(did.filter((d) => d === 'hold guest')).to.have.length(1);
    const log: string[] = [];
    let fail = true;
    const guest: GuestSide = {
      hold: async () => {
        did.push('hold guest');
        if (fail) throw new Error('QEMU is gone');
        return async () => {};
      },
      endingAction: () => ({ evict: 'sensitive', suspend: false }),
      evictResident: async () => {},
      applyPolicy: () => {},
    };
    const h = new LeaseHooks({ ...recorderFx(guest, log) });
    did.length = 0;
    h.expiredLease();
    await settle();
    expect(log.some((l) => /could not hold the guest for the lease: QEMU is gone/.test(l))).to.equal(true);
    fail = false;
    h.expiredLease();
    await settle();
    expect(did).to.deep.equal(['hold guest', 'hold guest']);
  });

  it('a VM that cannot start stops the agent; a disk-only agent stays up', async () => {
    for (const wantsVm of [true, false]) {
      const codes: number[] = [];
      const fx = { ...recorderFx(undefined, []), wantsVm, serve: async () => Promise.reject(new Error('no QEMU')), shutdown: (c: number) => void codes.push(c) };
      new LeaseHooks(fx).leaseGranted({ leaseId: 'l', image: 'i', version: 1, classKeys: [], ttlSeconds: 1 });
      await settle();
      expect(codes).to.deep.equal(wantsVm ? [1] : []);
    }
  });
});

function recorderFx(guest: GuestSide | undefined, log: string[]): LeaseEffects {
  return {
    guest: () => guest,
    policy: () => DEFAULT_FULL_POLICY as TAgentPolicy,
    evictAllSensitive: () => {},
    uploadTrace: async () => {},
    suspend: async () => {},
    prefetch: () => {},
    serve: async () => {},
    shutdown: () => {},
    eraseRevoked: async () => {},
    wipe: async () => {},
    zeroedAfterMs: () => undefined,
    wantsVm: true,
    log: (l) => void log.push(l),
  };
}
