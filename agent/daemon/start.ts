// `lethe agent run IMAGE`: the device daemon. Wires the lease keeper, the
// fetcher, the ciphertext cache and the key ring together, prefetches the
// image's ciphertext, answers the control socket, and acts on revocation,
// wipe orders and lease expiry.
import fs from 'node:fs';
import path from 'node:path';
import type net from 'node:net';
import { CHUNK_SIZE, DEFAULT_EVICT_IDLE_S, DISK_CHUNK_SIZE, MEM_CHUNK_SIZE, type ChunkKind } from '../../common/constants.js';
import { secureBuffer, wipe } from '../../common/crypto.js';
import { iso } from '../../common/duration.js';
import { errorChain, LetheError } from '../../common/errors.js';
import { ChunkCache } from '../chunks/cache.js';
import { serveControl } from './control.js';
import { AgentCore } from '../chunks/core.js';
import { DeviceClient } from '../remote/device-client.js';
import { Fetcher } from '../remote/fetcher.js';
import { makeNonDumpable, wipeHeapOnFree } from './harden.js';
import { closeIdentity, loadIdentity, type Identity } from '../keys/identity.js';
import type { Unlock } from '../keys/unlock.js';
import { KeyRing } from '../keys/keyring.js';
import { LeaseKeeper } from '../keys/lease-keeper.js';
import { PushChannel } from '../remote/push-channel.js';
import { acknowledgeRevoke, eraseRevokedHome, performWipe } from '../keys/wipe.js';
import { AgentDiskBackend } from '../disk/backend.js';
import { NbdServer, type NbdAddress } from '../disk/nbd/server.js';
import { nbdPeerCheck, type NbdPeers } from '../disk/nbd/peers.js';
import { chooseAccel, makeRunDir, type AccelChoice } from '../vm/qemu.js';
import { AgentVm } from '../vm/runner.js';
import { builtGuestBoot } from '../../guest-driver/built.js';
import { MAX_TRACE_PAGES, type TAgentPolicy } from '../../common/wire.js';
import { prefetchPlan } from '../../policies/manager.js';
import { DEFAULT_FULL_POLICY } from '../../policies/schema.js';
import type { ChunkRef } from '../remote/fetcher.js';
import type { HintPolicy } from '../vm/hints.js';

/** The session's first-touch order goes to the server this long after the resume (and at stop or suspend). */
const TRACE_UPLOAD_AFTER_MS = 30_000;

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

export const EXIT_REVOKED = 3;

/**
 * The order a session uploads: the pages the guest faulted on, first touch first,
 * then the rest of the order it was given. Pages installed ahead never fault, so a
 * session that installed ahead keeps the learned order's knowledge of them instead
 * of dropping it; the pages it saw fault (sensitive ones, and those it touched
 * before they were installed) still lead.
 */
export function firstTouchesAndLearned(touched: Uint32Array, learned: Uint32Array): Uint32Array {
  if (learned.length === 0) return touched;
  const seen = new Set(touched);
  const out = new Uint32Array(touched.length + learned.length);
  out.set(touched);
  let n = touched.length;
  for (const p of learned) if (!seen.has(p)) (seen.add(p), (out[n++] = p));
  return out.subarray(0, n);
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

export type AgentStatus = ReturnType<typeof buildStatus>;

function buildStatus(
  o: AgentOptions,
  deviceId: string,
  lease: LeaseKeeper,
  keys: KeyRing,
  cache: ChunkCache,
  core: AgentCore,
  fetcher: Fetcher,
  prefetch: { done: number; total: number },
  nbd: NbdServer | undefined,
  vm: AgentVm | undefined,
  push: PushChannel,
) {
  const now = Date.now();
  return {
    device: deviceId,
    push: { connected: push.connected, replica: push.replica ?? null, opens: push.opens },
    image: o.image,
    version: core.manifest?.version ?? null,
    lease: {
      state: lease.state,
      leaseId: lease.lease?.leaseId ?? null,
      expiresAt: lease.expiresAt ? iso(lease.expiresAt) : null,
      expiresInSeconds: lease.expiresAt ? Math.max(0, Math.round((lease.expiresAt - now) / 1000)) : null,
      renewals: lease.renewals,
      lastError: lease.lastError ?? null,
    },
    keys: keys.counts(),
    cache: cache.stats(),
    /** Checked disk ciphertext kept in memory (--disk-memory-cache). */
    diskMemory: { chunks: core.checked.count, bytes: core.checked.bytes, limitBytes: core.checked.limitBytes },
    resident: { ...core.resident },
    reads: { ...core.stats },
    fetch: { ...fetcher.stats },
    prefetch: { ...prefetch },
    nbd: nbd ? { address: nbd.address(), export: o.image, ...nbd.stats() } : null,
    vm: vm
      ? {
          pid: vm.vm.pid,
          faults: vm.faults,
          zeroFaults: vm.zeroFaults,
          faultRetries: vm.faultRetries,
          faultWait: { ...vm.faultWait },
          installedAhead: vm.installedAhead,
          heldFor: vm.heldFor(),
          residentPages: vm.evictor.residentCounts(),
          evictIdleSeconds: vm.evictor.idleMs / 1000,
          eviction: { ...vm.evictor.stats },
          memoryMode: vm.evictor.manager.policy.memoryMode,
          firstTouches: vm.firstTouchCount,
          hints: { connected: vm.hints.connected, ...vm.hints.counters, lastReport: vm.lastHintReport() },
        }
      : null,
  };
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
  const urgent = new DeviceClient(id);
  const background = new DeviceClient(id);
  const cache = ChunkCache.inHome(o.home, o.cacheBytes);
  const keys = new KeyRing();
  const lease = new LeaseKeeper(urgent, id, keys, o.image, o.heartbeatMs);
  // The push channel has a client of its own: its failover between server URLs moves no other call.
  const pushClient = new DeviceClient(id);
  const push = new PushChannel(pushClient, (signed, arrivedAt) => lease.command(signed, 'push', arrivedAt));
  // Whichever part's call the server refuses (renewal, a key or chunk fetch, prefetch, the push channel), the lease keeper acts on it.
  for (const c of [urgent, background, pushClient]) c.on('refused', (r) => lease.serverRefused(r));
  const fetcher = new Fetcher(urgent, background, () => lease.leaseId(), () => lease.evictionPoint());
  const core = new AgentCore(id, cache, keys, fetcher, lease, o.diskMemoryBytes);
  const prefetch = { done: 0, total: 0, running: false };
  let finish!: (code: number) => void;
  const done = new Promise<number>((r) => (finish = r));
  let control: net.Server | undefined;
  let nbd: NbdServer | undefined;
  let disk: AgentDiskBackend | undefined;
  let vm: AgentVm | undefined;
  let vmStarting = false;
  let stopped = false;
  lease.report = () => ({
    resident: { sensitiveBytes: core.resident.sensitive, normalBytes: core.resident.normal, guestPages: vm ? vm.evictor.residentCounts() : null },
  });

  /** Stops everything; the agent's exit waits for `after` (a wipe's or revocation's acknowledgement, signed with the identity still in memory). */
  const shutdown = (code: number, removeCache = false, after?: () => Promise<unknown>) => {
    if (stopped) return;
    stopped = true;
    clearTimeout(traceTimer);
    // A clean stop leaves this session's first-touch order at the server (2 s at most).
    const traced = code === 0 ? Promise.race([uploadTrace(), new Promise((r) => setTimeout(r, 2_000))]) : Promise.resolve();
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
    await vm?.stop();
    const closing = nbd?.close();
    disk?.close();
    core.destroy();
    keys.destroy();
    control?.close();
    fs.rmSync(path.join(o.home, 'agent.sock'), { force: true });
    cache.close();
    if (removeCache) for (const f of ['cache.db', 'cache.db-wal', 'cache.db-shm']) fs.rmSync(path.join(o.home, f), { force: true });
    urgent.close();
    background.close();
    pushClient.close();
    await closing;
  };

  /** Background prefetch: `first` (guest RAM in the learned order), then every chunk not cached, under the policy's cap. */
  const startPrefetch = (first: ChunkRef[] = [], bandwidth: number | null = null) => {
    // `prefetch.order: none` turns background prefetch off (the startup buffer still comes).
    if (!o.prefetch || prefetch.running || policyNow().prefetchOrder === 'none') return;
    prefetch.running = true;
    // Each stored chunk once (zero chunks are not stored), `first` first.
    const all: ChunkRef[] = [];
    const count = (kind: ChunkKind) => Math.ceil(core.sizeOf(kind) / CHUNK_SIZE[kind]);
    const seen = { state: new Uint8Array(count('state')), mem: new Uint8Array(count('mem')), disk: new Uint8Array(count('disk')) };
    const add = (r: ChunkRef) => {
      if (seen[r.kind][r.index] || !core.entry(r.kind, r.index)) return;
      seen[r.kind][r.index] = 1;
      all.push(r);
    };
    first.forEach(add);
    for (const kind of ['state', 'mem', 'disk'] as ChunkKind[]) for (let index = 0; index < seen[kind].length; index++) add({ kind, index });
    core
      .prefetchChunks(all, {
        bandwidth,
        onProgress: (d, t) => {
          prefetch.done = d;
          prefetch.total = t;
        },
        // Pages of guest RAM whose plaintext may stay go in as they arrive (install-ahead).
        onBatch: async (refs) => void (await vm?.installAhead(refs.filter((r) => r.kind === 'mem').map((r) => r.index))),
      })
      .then(
        () => log(`prefetch done: ${prefetch.done} of ${prefetch.total} chunks in the cache${vm ? `, ${vm.installedAhead} page(s) of guest RAM installed ahead` : ''}`),
        (e) => !stopped && log(`prefetch stopped: ${errorChain(e)}`),
      )
      .finally(() => (prefetch.running = false));
  };

  /** The order the server gave this session (trace-learned prefetch), for the next upload. */
  let learnedOrder: Uint32Array = new Uint32Array(0);
  /** Guest RAM to prefetch: the startup buffer (before the guest runs) and the rest, by the policy and the server's learned order. */
  const planPrefetch = async () => {
    const p = policyNow();
    let learned: Uint32Array = new Uint32Array(0);
    if (o.prefetch && p.prefetchOrder === 'trace') {
      learned = await urgent.prefetchOrder(lease.leaseId()).catch((e) => {
        log(`no learned prefetch order: ${errorChain(e)}`);
        return new Uint32Array(0);
      });
    }
    const pages = core.sizeOf('mem') / MEM_CHUNK_SIZE;
    learnedOrder = learned;
    const plan = o.prefetch ? prefetchPlan(p, pages, learned, (pg) => core.entry('mem', pg) !== undefined) : { startup: [], rest: [] };
    const refs = (pages: number[]): ChunkRef[] => pages.map((index) => ({ kind: 'mem', index }));
    return { startup: refs(plan.startup), rest: refs(plan.rest), learned: learned.length, bandwidth: p.prefetchBandwidth };
  };

  /** The session's first-touch order goes to the server (trace-learned prefetch); a later upload replaces it. */
  let traceTimer: NodeJS.Timeout | undefined;
  let suspended = false;
  const uploadTrace = (): Promise<void> => {
    // The server takes the first MAX_TRACE_PAGES touches (a guest over 8 GiB touches more).
    const order = vm && firstTouchesAndLearned(vm.firstTouchOrder(), vm.installedAhead > 0 ? learnedOrder : new Uint32Array(0)).subarray(0, MAX_TRACE_PAGES);
    // After a suspend the order is at the server and the lease has ended.
    if (!order || order.length === 0 || !lease.lease || suspended) return Promise.resolve();
    return urgent.uploadTrace(lease.leaseId(), order).then(
      () => log(`first-touch order of ${order.length} page(s) uploaded for trace-learned prefetch`),
      (e) => log(`first-touch order not uploaded: ${errorChain(e)}`),
    );
  };

  lease.prepare = async (l) => {
    const m = await urgent.manifest(l.leaseId);
    core.setManifest(m, l.writeGen);
  };
  const startNbd = async () => {
    if (nbd || o.nbd === null || stopped) return;
    disk = new AgentDiskBackend(core);
    const address = o.nbd ?? { path: path.join(o.home, 'nbd.sock') };
    // Loopback TCP has no peer credentials: the CLI serves it only when forced.
    const allowPeer = 'path' in address ? nbdPeerCheck(o.nbdPeers ?? 'qemu') : undefined;
    nbd = new NbdServer(new Map([[o.image, disk]]), { defaultExport: o.image, allowPeer, log });
    const at = await nbd.listen(address);
    const who = !allowPeer ? 'any local process, unauthenticated' : o.nbdPeers === 'user' ? "this user's processes" : 'only the QEMU this agent starts';
    log(`disk served over NBD at ${'path' in at ? at.path : `${at.host}:${at.port}`} (export '${o.image}', ${core.sizeOf('disk')} bytes; ${who} may connect)`);
  };
  const startVm = async () => {
    if (!o.vm || vm || vmStarting || stopped) return;
    vmStarting = true;
    // The guest as built; only a machine that has none builds it (seconds to minutes) first.
    const guest = builtGuestBoot() ?? (await (await import('../../guest-driver/build.js')).buildGuest());
    const accel = await chooseAccel(o.vm.accel, { kernel: guest.vmlinux, initrd: guest.initramfs });
    const t0 = Date.now();
    const pf = await planPrefetch();
    if (pf.startup.length > 0) {
      const fetched = await core.prefetchChunks(pf.startup);
      log(`startup buffer: ${fetched} page(s) fetched (${pf.startup.length} planned${pf.learned ? `, learned order of ${pf.learned}` : ''}) in ${Date.now() - t0} ms`);
    }
    vm = await AgentVm.resume(core, {
      runDir: makeRunDir(),
      kernel: guest.vmlinux,
      initrd: guest.initramfs,
      append: 'console=ttyS0',
      accel,
      nbd: o.nbd === null ? undefined : { socket: path.join(o.home, 'nbd.sock'), export: o.image },
      log,
      policy: policyNow(),
      hints: hintPolicy(policyNow()),
      dropGuestCache: policyNow().dropGuestCache,
      traceFile: o.vm.trace,
      showConsole: o.logGuestConsole,
      installFirst: pf.startup.map((r) => r.index),
    });
    if (o.logGuestConsole) vm.vm.onConsoleLine((line) => log(`guest: ${line}`));
    if (o.onGuestConsole) vm.vm.onConsoleLine(o.onGuestConsole);
    startPrefetch(pf.rest, pf.bandwidth);
    traceTimer = setTimeout(() => void uploadTrace(), TRACE_UPLOAD_AFTER_MS);
    log(`VM resumed post-copy under ${accel} in ${Date.now() - t0} ms (QEMU pid ${vm.vm.pid}); its pages come from the agent on first touch`);
  };
  /** The lease's policy for the agent (the built-in one from a server that sends none). */
  const policyNow = (): TAgentPolicy =>
    lease.lease?.policy ?? { ...DEFAULT_FULL_POLICY, evictIdleMs: (lease.lease?.evictIdleSeconds ?? DEFAULT_EVICT_IDLE_S) * 1000 };
  const hintPolicy = (p: TAgentPolicy): HintPolicy => ({ intervalMs: p.hintIntervalMs, processes: p.processes, cgroups: p.cgroups, files: p.files });
  // While the lease is not active the guest is held: its faults could not be served.
  let leaseHold: Promise<() => Promise<void>> | undefined;
  const holdForLease = () => {
    if (!vm || leaseHold) return;
    const held = vm.hold('lease');
    leaseHold = held;
    // A failed stop (QEMU gone) holds nothing: say so, and let the next call try again.
    held.catch((e) => {
      log(`could not hold the guest for the lease: ${errorChain(e)}`);
      if (leaseHold === held) leaseHold = undefined;
    });
  };
  lease.beforeExpiry = async () => {
    if (!vm) return;
    uploadTrace();
    const action = vm.evictor.manager.leaseEnding();
    holdForLease();
    await leaseHold;
    await vm.evictor.evictResident('the lease is running out unrenewed', action.evict);
    // The policy asks for a suspend: it needs the server, which may be why the lease is running out.
    if (action.suspend) suspend().catch((e) => log(`suspend at lease expiry failed: ${errorChain(e)}; the guest stays held, its pages evicted`));
  };
  /** A lease is active again (granted, or renewed after beforeExpiry held the guest): the guest runs. */
  const leaseBack = () => {
    const p = policyNow();
    if (vm) vm.setPolicy(p, hintPolicy(p), p.dropGuestCache);
    const held = leaseHold;
    leaseHold = undefined;
    void held?.then((release) => release()).catch(() => {});
  };
  lease.on('renewed', leaseBack);
  lease.on('granted', (l) => {
    log(`lease ${l.leaseId} on ${l.image}@${l.version}, ${l.classKeys.length} class key(s), expires in ${l.ttlSeconds} s`);
    leaseBack();
    if (!o.vm) startPrefetch();
    // A new grant after the VM runs (expiry, check-in) picks the background prefetch up again.
    else if (vm) planPrefetch().then((p) => startPrefetch(p.rest, p.bandwidth), (e) => log(`prefetch not restarted: ${errorChain(e)}`));
    startNbd()
      .then(() => startVm())
      .catch((e) => {
        log(`could not start: ${errorChain(e)}`);
        if (o.vm) shutdown(1);
      });
  });
  lease.on('expired', () => {
    holdForLease();
    // Keys are gone: pages unchanged since they arrived are punched out; any changed
    // page left (beforeExpiry should have taken it) stays until a new lease.
    // With a VM the evictor tells the core which pages left; a changed page it must keep stays counted.
    if (vm) vm.evictor.evictResident('the lease expired', vm.evictor.manager.leaseEnding().evict).catch((e) => log(`eviction at expiry: ${errorChain(e)}`));
    else core.evictAllSensitive();
    log('lease expired without renewal: keys zeroed, sensitive plaintext evicted; waiting for the server');
  });
  lease.on('log', (l) => log(l));
  lease.on('revoked', (e) => {
    log(`refused by the server: ${e.message}; keys zeroed, stopping the VM, deleting the cache and device keys`);
    core.evictAllSensitive();
    const zeroedAfterMs = lease.endedBy ? Date.now() - lease.endedBy.at : undefined;
    shutdown(EXIT_REVOKED, true, () => eraseRevoked(e.code === 'DEVICE_WIPED' ? 'wiped' : 'revoked', zeroedAfterMs));
  });
  /** Revocation implies a wipe here (docs/lease-state.md): the home keeps device.json, no key and no cache; a revoked device says so to the server. */
  const eraseRevoked = async (status: 'revoked' | 'wiped', zeroedAfterMs?: number) => {
    try {
      const removed = eraseRevokedHome(o.home, id.info.deviceId, status);
      log(`device keys and cache deleted (${removed.join(', ') || 'nothing left'}); this device must be enrolled again`);
      if (status === 'wiped') return;
      const client = new DeviceClient(id);
      try {
        const acked = await acknowledgeRevoke(client, o.home, removed, undefined, zeroedAfterMs);
        log(acked ? 'revocation acknowledged to the server' : 'the server did not take the acknowledgement of the revocation; the signing key is gone anyway');
      } finally {
        client.close();
      }
    } catch (err) {
      log(`erasing after the refusal failed: ${errorChain(err)}`);
    }
  };
  lease.on('wipe', (cmd) => {
    log(`wipe ordered by IT (${cmd}): zeroing keys, deleting the cache and device keys`);
    core.evictAllSensitive();
    const zeroedAfterMs = lease.endedBy ? Date.now() - lease.endedBy.at : undefined;
    shutdown(EXIT_REVOKED, true, async () => {
      const client = new DeviceClient(id);
      try {
        const r = await performWipe(id, client, cmd, zeroedAfterMs);
        log(r.acked ? 'wipe done and acknowledged' : "wipe done; acknowledgement pending (run 'lethe heartbeat' when online)");
      } catch (e) {
        log(`wipe failed: ${errorChain(e)}`);
      } finally {
        client.close();
      }
    });
  });

  /**
   * `lethe agent suspend`: holds the guest, encrypts every changed page and the new
   * device state into the cache, and checks them in with the dirty disk chunks as a
   * new version, which any device assigned the image resumes post-copy.
   */
  let suspending = false;
  const suspend = async () => {
    if (!vm) throw new LetheError('BAD_REQUEST', 'no VM to suspend', { hint: 'the agent resumes a VM with: lethe agent run IMAGE --vm' });
    if (suspending) throw new LetheError('CONFLICT', 'a suspend is already under way');
    suspending = true;
    const t0 = Date.now();
    vm.evictor.stop();
    const release = await vm.hold('suspend');
    let pages: number;
    let r: Awaited<ReturnType<typeof core.checkin>>;
    try {
      await lease.whenActive();
      await uploadTrace();
      await vm.whenStopped();
      pages = await vm.evictor.captureDirty();
      const state = await vm.saveState();
      try {
        await core.replaceState(state);
      } finally {
        wipe(state);
      }
      await disk?.flush();
      r = await core.checkin(urgent);
    } catch (e) {
      // Nothing was committed: the guest goes on (QEMU can run after a migration) and so does eviction.
      suspending = false;
      vm.evictor.start();
      await release();
      throw e;
    }
    suspended = true;
    // The check-in ended the lease on the server: its keys go now, and a late answer about it (a prefetch still out) ends nothing more.
    lease.stop();
    log(`suspended: ${pages} changed page(s), the device state and dirty disk chunks checked in as ${o.image}@${r.version} in ${Date.now() - t0} ms`);
    // This session is over: QEMU may not run again (its pages belong to the new version).
    setImmediate(() => shutdown(0));
    return { ...r, pages, stateBytes: core.sizeOf('state'), ms: Date.now() - t0 };
  };

  control = serveControl(o.home, async (req) => {
    if (req.cmd === 'status') return buildStatus(o, id.info.deviceId, lease, keys, cache, core, fetcher, prefetch, nbd, vm, push);
    if (req.cmd === 'selftest') return selfTest(core, Number(req.count ?? 1_000_000));
    if (req.cmd === 'checkin') {
      await disk?.flush();
      const r = await core.checkin(urgent);
      log(`checked in ${r.chunks} chunk(s) as ${o.image}@${r.version}; moving the lease to it`);
      await lease.reacquire();
      return r;
    }
    if (req.cmd === 'suspend') return suspend();
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
  return {
    core,
    lease,
    identity: id,
    status: () => buildStatus(o, id.info.deviceId, lease, keys, cache, core, fetcher, prefetch, nbd, vm, push),
    done,
    stop: () => shutdown(0),
  };
}

/** Decrypts up to `count` chunks into a locked scratch buffer, zeroing it after each: checks the whole read path. */
async function selfTest(core: AgentCore, count: number) {
  const m = core.manifest;
  if (!m) throw new LetheError('LEASE_EXPIRED', 'no lease yet');
  const sources: Record<string, number> = { cache: 0, server: 0, zero: 0 };
  const buf = secureBuffer(CHUNK_SIZE.disk);
  let n = 0;
  try {
    for (const kind of ['state', 'mem', 'disk'] as ChunkKind[]) {
      for (const [index] of m.chunks[kind]) {
        if (n++ >= count) break;
        const size = Math.min(CHUNK_SIZE[kind], m.sizes[kind] - index * CHUNK_SIZE[kind]);
        const out = buf.subarray(0, size);
        sources[await core.readInto(kind, index, out)]++;
        wipe(out);
        core.evict(kind, index);
      }
    }
  } finally {
    wipe(buf);
  }
  return { chunks: Math.min(n, count), sources };
}
