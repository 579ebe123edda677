// `lethe agent status`: what a running agent holds and has done, from its parts.
import { iso } from '../../common/duration.js';
import type { ChunkCache } from '../chunks/cache.js';
import type { AgentCore } from '../chunks/core.js';
import type { NbdServer } from '../disk/nbd/server.js';
import type { KeyRing } from '../keys/keyring.js';
import type { LeaseKeeper } from '../keys/lease-keeper.js';
import type { Fetcher } from '../remote/fetcher.js';
import type { PushChannel } from '../remote/push-channel.js';
import type { AgentVm } from '../vm/runner.js';

export interface StatusParts {
  deviceId: string;
  image: string;
  lease: LeaseKeeper;
  keys: KeyRing;
  cache: ChunkCache;
  core: AgentCore;
  fetcher: Fetcher;
  prefetch: { done: number; total: number };
  nbd: NbdServer | undefined;
  vm: AgentVm | undefined;
  push: PushChannel;
}

export type AgentStatus = ReturnType<typeof agentStatus>;

export function agentStatus({ deviceId, image, lease, keys, cache, core, fetcher, prefetch, nbd, vm, push }: StatusParts) {
  const now = Date.now();
  return {
    device: deviceId,
    push: { connected: push.connected, replica: push.replica ?? null, opens: push.opens },
    image,
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
    /** Disk reads served from the cache file a 4 KiB piece at a time (piece-digests.ts; normal-class chunks in native code, `native`), and pieces that did not match. */
    diskPieces: { chunks: core.pieces.size + core.diskReads.chunks, reads: core.stats.pieceReads, mismatches: core.pieces.mismatches + core.diskReads.mismatches, native: core.diskReads },
    resident: { ...core.resident },
    reads: { ...core.stats },
    fetch: { ...fetcher.stats, link: fetcher.link.figures() },
    prefetch: { ...prefetch },
    nbd: nbd ? { address: nbd.address(), export: image, ...nbd.stats() } : null,
    vm: vm
      ? {
          pid: vm.vm.pid,
          faults: vm.faults,
          zeroFaults: vm.zeroFaults,
          faultRetries: vm.faultRetries,
          faultWait: { ...vm.faultWait },
          sensitiveRefaults: vm.sensitiveRefaults(),
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
