// The part of a policy the agent acts on, as a lease carries it (common/wire.ts AgentPolicy).
import type { TAgentPolicy } from '../common/wire.js';
import type { Policy } from './schema.js';

export function agentPart(p: Policy): TAgentPolicy {
  return {
    memoryMode: p.memoryMode,
    processes: p.processes,
    cgroups: p.cgroups,
    files: p.files,
    freePages: p.freePages,
    evictBudgetBytes: p.evictBudgetBytes,
    dropGuestCache: p.dropGuestCache,
    onLeaseExpiry: p.onLeaseExpiry,
    onWipe: p.onWipe,
    prefetchStartupBytes: p.prefetchStartupBytes,
    prefetchOrder: p.prefetchOrder,
    prefetchBandwidth: p.prefetchBandwidth,
    hintIntervalMs: p.hintIntervalMs,
  };
}
