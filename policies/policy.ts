// The part of a policy the server acts on today: lease timing and which chunks
// are sensitive. A policy is YAML; unknown keys are kept for later parts.
import { parseDocument } from 'yaml';
import { z } from 'zod';
import { DEFAULT_EVICT_IDLE_S, DEFAULT_LEASE_TTL_S, type ChunkKind, type Sensitivity } from '../common/constants.js';
import { parseDuration } from '../common/duration.js';
import { LetheError } from '../common/errors.js';

const Duration = z.union([z.number().positive(), z.string()]);

const PolicySchema = z.object({
  lease: z
    .object({
      ttl: Duration.optional(),
      renew: Duration.optional(),
    })
    .passthrough()
    .optional(),
  sensitive: z
    .object({
      memory: z.boolean().optional(),
      state: z.boolean().optional(),
      /** byte ranges of the disk, [start, end) */
      disk: z.array(z.tuple([z.number().int().min(0), z.number().int().min(0)])).optional(),
    })
    .passthrough()
    .optional(),
  eviction: z
    .object({
      /** How long a sensitive guest page may stay decrypted in RAM before it is evicted. */
      idle: Duration.optional(),
    })
    .passthrough()
    .optional(),
}).passthrough();

export interface ServerPolicy {
  leaseTtlMs: number;
  renewAfterMs: number;
  sensitiveMemory: boolean;
  sensitiveState: boolean;
  sensitiveDisk: [number, number][];
  /** Sensitive guest pages resident longer than this are evicted (the agent's evictor). */
  evictIdleMs: number;
}

export const DEFAULT_POLICY: ServerPolicy = {
  leaseTtlMs: DEFAULT_LEASE_TTL_S * 1000,
  renewAfterMs: (DEFAULT_LEASE_TTL_S * 1000) / 3,
  sensitiveMemory: true,
  sensitiveState: false,
  sensitiveDisk: [],
  evictIdleMs: DEFAULT_EVICT_IDLE_S * 1000,
};

const toMs = (v: number | string, field: string) => (typeof v === 'number' ? v * 1000 : parseDuration(v, field));

/** Parses a policy; throws BAD_REQUEST naming the line and field of the first error. */
export function parsePolicy(text: string | null | undefined, file = 'policy'): ServerPolicy {
  if (!text) return DEFAULT_POLICY;
  const doc = parseDocument(text);
  if (doc.errors.length > 0) {
    const e = doc.errors[0];
    throw new LetheError('BAD_REQUEST', `${file}:${e.linePos?.[0]?.line ?? '?'}: ${e.message.split('\n')[0]}`);
  }
  const parsed = PolicySchema.safeParse(doc.toJS() ?? {});
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const node = doc.getIn(issue.path as (string | number)[], true) as { range?: [number, number] } | undefined;
    const line = node?.range ? text.slice(0, node.range[0]).split('\n').length : '?';
    throw new LetheError('BAD_REQUEST', `${file}:${line}: ${issue.path.join('.') || '(top)'}: ${issue.message}`);
  }
  const p = parsed.data;
  const ttl = p.lease?.ttl !== undefined ? toMs(p.lease.ttl, 'lease.ttl') : DEFAULT_POLICY.leaseTtlMs;
  const renew = p.lease?.renew !== undefined ? toMs(p.lease.renew, 'lease.renew') : ttl / 3;
  if (renew >= ttl) throw new LetheError('BAD_REQUEST', `${file}: lease.renew must be shorter than lease.ttl`);
  const idle = p.eviction?.idle !== undefined ? toMs(p.eviction.idle, 'eviction.idle') : DEFAULT_POLICY.evictIdleMs;
  return {
    leaseTtlMs: ttl,
    renewAfterMs: renew,
    sensitiveMemory: p.sensitive?.memory ?? DEFAULT_POLICY.sensitiveMemory,
    sensitiveState: p.sensitive?.state ?? DEFAULT_POLICY.sensitiveState,
    sensitiveDisk: p.sensitive?.disk ?? [],
    evictIdleMs: idle,
  };
}

export function classOf(policy: ServerPolicy, kind: ChunkKind, offset: number, length: number): Sensitivity {
  if (kind === 'mem') return policy.sensitiveMemory ? 'sensitive' : 'normal';
  if (kind === 'state') return policy.sensitiveState ? 'sensitive' : 'normal';
  return policy.sensitiveDisk.some(([s, e]) => offset < e && s < offset + length) ? 'sensitive' : 'normal';
}
