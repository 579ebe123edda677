// `lethe agent run IMAGE`: the device daemon. Wires the lease keeper, the
// fetcher, the ciphertext cache and the key ring together, answers the control
// socket, and hands the lease's turns to its hooks (lease-hooks.ts): what to
// serve once a lease is held, what to evict when it runs out, what to erase when
// the device is revoked or wiped.
import fs from 'node:fs';
import path from 'node:path';
import { DEFAULT_EVICT_IDLE_S } from '../../common/constants.js';
import { iso } from '../../common/duration.js';
import { errorChain, LetheError } from '../../common/errors.js';
import type { TAgentPolicy } from '../../common/wire.js';
import { DEFAULT_FULL_POLICY } from '../../policies/schema.js';
import { cacheFiles, ChunkCache } from '../chunks/cache.js';
import { AgentCore } from '../chunks/core.js';
import type { NbdAddress } from '../disk/nbd/server.js';
import type { NbdPeers } from '../disk/nbd/peers.js';
import { closeIdentity, loadIdentity, type Identity } from '../keys/identity.js';
import { KeyRing } from '../keys/keyring.js';
import { LeaseKeeper } from '../keys/lease-keeper.js';
import type { Unlock } from '../keys/unlock.js';
import { acknowledgeRevoke, eraseRevokedHome, performWipe } from '../keys/wipe.js';
import { DeviceClient } from '../remote/device-client.js';
import { Fetcher } from '../remote/fetcher.js';
import { PushChannel } from '../remote/push-channel.js';
import type { AccelChoice } from '../vm/qemu.js';
import type { AgentVm } from '../vm/runner.js';
import { serveControl } from './control.js';
import { makeNonDumpable, wipeHeapOnFree } from './harden.js';
import { LeaseHooks, type GuestSide } from './lease-hooks.js';
import { Prefetcher } from './prefetch.js';
import { hintPolicy, Serving } from './serve.js';
import { selfTest } from './selftest.js';
import { agentStatus, type AgentStatus } from './status.js';
import { Suspender } from './suspend.js';

export type { AgentStatus } from './status.js';

export interface AgentOptions {
  home: string;
  image: string;
  cacheBytes: number;
  heartbeatMs: number;
  /** Keep the push channel open (default): commands arrive at once, not at the next heartbeat. */
  push?: boolean;
  prefetch: boolean;
  /** Where to serve the VM disk over NBD (default: nbd.sock in the device home); null: not at all. */
  nbd?: NbdAddress | null;
  /** Who may connect to a unix-socket export (agent/disk/nbd/peers.ts): the QEMU the agent started (default), or any process of this user. */
  nbdPeers?: NbdPeers;
  /** Write the guest's console lines to the log (off by default: they can carry guest plaintext into journald). */
  logGuestConsole?: boolean;
  /** Every guest console line, in process, whether or not it is logged. */
  onGuestConsole?: (line: string) => void;
  /** Bytes of checked disk ciphertext kept in memory for reads (default DISK_CHECKED_BYTES). */
  diskMemoryBytes?: number;
  /** Resume the image's VM post-copy under QEMU (the test guest's kernel), with this accelerator. */
  vm?: { accel: AccelChoice; trace?: string };
  /** Unseals the device keys (asked once, at start); not needed for a `--seal none` home. */
  unlock?: Unlock;
  log?: (line: string) => void;
}


export interface RunningAgent {
  core: AgentCore;
  lease: LeaseKeeper;
  /** The unsealed device identity; its keys are zeroed when the agent stops. */
  identity: Identity;
  status(): AgentStatus;
  /** Resolves with the exit code when the agent stops. */
  done: Promise<number>;
  stop(): void;
}

/**
 * Unseals the device keys (throws DEVICE_LOCKED or UNLOCK_FAILED before anything
 * reaches the server), then starts the agent on them. The keys stay in locked
 * memory until the agent stops, which zeroes them.
 */
export async function startAgent(o: AgentOptions): Promise<RunningAgent> {
  makeNonDumpable();
  wipeHeapOnFree();
  return runAgent(o, await loadIdentity(o.home, o.unlock));
}

function runAgent(o: AgentOptions, id: Identity): RunningAgent {
  const log = o.log ?? ((l: string) => process.stderr.write(`${iso(Date.now())} lethe agent: ${l}\n`));
  // Two connections: demand reads never queue behind prefetch. The push channel has
  // a client of its own: its failover between server URLs moves no other call.
  const urgent = new DeviceClient(id);
  const background = new DeviceClient(id);
  const pushClient = new DeviceClient(id);
  const cache = ChunkCache.inHome(o.home, o.cacheBytes);
  const keys = new KeyRing();
  const lease = new LeaseKeeper(urgent, id, keys, o.image, o.heartbeatMs);
  const push = new PushChannel(pushClient, (signed, arrivedAt) => lease.command(signed, 'push', arrivedAt));
  // Whichever part's call the server refuses (renewal, a key or chunk fetch, prefetch, the push channel), the lease keeper acts on it.
  for (const c of [urgent, background, pushClient]) c.on('refused', (r) => lease.serverRefused(r));
  const fetcher = new Fetcher(urgent, background, () => lease.leaseId(), () => lease.evictionPoint());
  const core = new AgentCore(id, cache, keys, fetcher, lease, o.diskMemoryBytes);
  let stopped = false;
  /** The lease's policy for the agent (the built-in one from a server that sends none). */
  const policy = (): TAgentPolicy =>
    lease.lease?.policy ?? { ...DEFAULT_FULL_POLICY, evictIdleMs: (lease.lease?.evictIdleSeconds ?? DEFAULT_EVICT_IDLE_S) * 1000 };
  const prefetcher: Prefetcher = new Prefetcher({
    core, client: urgent, enabled: o.prefetch, wantsVm: o.vm !== undefined, policy, log, link: () => fetcher.link.figures(),
    leaseId: () => lease.leaseId(),
    hasLease: () => lease.lease !== undefined,
    vm: (): AgentVm | undefined => serving.vm,
    stopped: () => stopped,
  });
  const serving: Serving = new Serving(o, core, prefetcher, policy, () => stopped, log);
  const suspender = new Suspender({
    image: o.image, core, lease, client: urgent, prefetcher, log,
    vm: () => serving.vm,
    disk: () => serving.disk,
    stop: () => shutdown(0),
  });
  let finish!: (code: number) => void;
  const done = new Promise<number>((r) => (finish = r));

  /** Stops everything; the agent's exit waits for `after` (a wipe's or revocation's acknowledgement, signed with the identity still in memory). */
  const shutdown = (code: number, removeCache = false, after?: () => Promise<unknown>) => {
    if (stopped) return;
    stopped = true;
    prefetcher.cancelTraceUpload();
    // A clean stop leaves this session's first-touch order at the server (2 s at most).
    const traced = code === 0 ? Promise.race([prefetcher.uploadTrace(), new Promise((r) => setTimeout(r, 2_000))]) : Promise.resolve();
    void traced
      .then(() => teardown(removeCache))
      .then(() => (after ? after() : undefined))
      .finally(() => {
        closeIdentity(id);
        finish(code);
      });
  };
  const teardown = async (removeCache: boolean) => {
    // Keys first (the lease stops and zeroes them), then QEMU and the evictor: nothing
    // may use the core or the cache after them.
    lease.stop();
    push.stop();
    await serving.vm?.stop();
    const closing = serving.nbd?.close();
    serving.disk?.close();
    core.destroy();
    keys.destroy();
    control.close();
    fs.rmSync(path.join(o.home, 'agent.sock'), { force: true });
    cache.close();
    if (removeCache) for (const f of cacheFiles(o.home)) fs.rmSync(f, { force: true });
    for (const c of [urgent, background, pushClient]) c.close();
    await closing;
  };

  const hooks = new LeaseHooks({
    guest: () => serving.vm && guestSide(serving.vm),
    policy,
    evictAllSensitive: () => core.evictAllSensitive(),
    uploadTrace: () => prefetcher.uploadTrace(),
    suspend: () => suspender.suspend(),
    prefetch: () => prefetcher.resume(),
    serve: () => serving.start(),
    shutdown,
    eraseRevoked: (status, zeroedAfterMs) => eraseRevoked(o.home, id, status, log, zeroedAfterMs),
    wipe: (cmd, zeroedAfterMs) => wipeDevice(id, cmd, log, zeroedAfterMs),
    zeroedAfterMs: () => (lease.endedBy ? Date.now() - lease.endedBy.at : undefined),
    wantsVm: o.vm !== undefined,
    log,
  });
  lease.prepare = async (l) => core.setManifest(await urgent.manifest(l.leaseId), l.writeGen, l);
  lease.report = () => ({
    resident: { sensitiveBytes: core.resident.sensitive, normalBytes: core.resident.normal, guestPages: serving.vm ? serving.vm.evictor.residentCounts() : null },
  });
  lease.beforeExpiry = () => hooks.leaseEnding();
  lease.on('granted', (l) => hooks.leaseGranted(l));
  lease.on('renewed', () => hooks.leaseRenewed());
  lease.on('expired', () => hooks.expiredLease());
  lease.on('revoked', (e) => hooks.revoked(e));
  lease.on('wipe', (cmd) => hooks.wipeOrdered(cmd));
  lease.on('log', (l) => log(l));

  const status = () =>
    agentStatus({ deviceId: id.info.deviceId, image: o.image, lease, keys, cache, core, fetcher, prefetch: prefetcher.progress, nbd: serving.nbd, vm: serving.vm, push });
  const control = serveControl(o.home, async (req) => {
    if (req.cmd === 'status') return status();
    if (req.cmd === 'selftest') return selfTest(core, Number(req.count ?? 1_000_000));
    if (req.cmd === 'checkin') {
      await serving.disk?.flush();
      // Guest writes wait from the check-in's last part until the lease is on the new version (writes.ts).
      return core.checkin(urgent, async (r) => {
        log(`checked in ${r.chunks} chunk(s) as ${o.image}@${r.version}; moving the lease to it`);
        await lease.reacquire();
      });
    }
    if (req.cmd === 'suspend') return suspender.suspend();
    if (req.cmd === 'stop') {
      setImmediate(() => shutdown(0));
      return { stopping: true };
    }
    throw new LetheError('BAD_REQUEST', `unknown control command '${req.cmd}'`);
  });

  lease.start();
  if (o.push !== false) {
    push.on('log', (l) => log(l));
    push.on('open', (p) => log(`push channel open to ${p.url}${p.replica ? ` (${p.replica})` : ''}`));
    push.start();
  }
  log(`device ${id.info.deviceId} serving ${o.image}; control socket ${path.join(o.home, 'agent.sock')}`);
  return { core, lease, identity: id, status, done, stop: () => shutdown(0) };
}

/** The running VM as the lease hooks see it. */
function guestSide(vm: AgentVm): GuestSide {
  return {
    hold: (reason) => vm.hold(reason),
    endingAction: () => vm.evictor.manager.leaseEnding(),
    evictResident: (why, scope) => vm.evictor.evictResident(why, scope),
    applyPolicy: (p) => vm.setPolicy(p, hintPolicy(p), p.dropGuestCache),
  };
}

/** Revocation implies a wipe here (docs/lease-state.md): the home keeps device.json, no key and no cache; a revoked device says so to the server. */
async function eraseRevoked(home: string, id: Identity, status: 'revoked' | 'wiped', log: (l: string) => void, zeroedAfterMs?: number): Promise<void> {
  try {
    const removed = eraseRevokedHome(home, id.info.deviceId, status);
    log(`device keys and cache deleted (${removed.join(', ') || 'nothing left'}); this device must be enrolled again`);
    if (status === 'wiped') return;
    const client = new DeviceClient(id);
    try {
      const acked = await acknowledgeRevoke(client, home, removed, undefined, zeroedAfterMs);
      log(acked ? 'revocation acknowledged to the server' : 'the server did not take the acknowledgement of the revocation; the signing key is gone anyway');
    } finally {
      client.close();
    }
  } catch (err) {
    log(`erasing after the refusal failed: ${errorChain(err)}`);
  }
}

/** IT's wipe order, carried out once the agent is down, and acknowledged. */
async function wipeDevice(id: Identity, cmd: string, log: (l: string) => void, zeroedAfterMs?: number): Promise<void> {
  const client = new DeviceClient(id);
  try {
    const r = await performWipe(id, client, cmd, zeroedAfterMs);
    log(r.acked ? 'wipe done and acknowledged' : "wipe done; acknowledgement pending (run 'lethe heartbeat' when online)");
  } catch (e) {
    log(`wipe failed: ${errorChain(e)}`);
  } finally {
    client.close();
  }
}
