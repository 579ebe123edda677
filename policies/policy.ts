// The policy as the server uses it: parsed once when an image gets its policy,
// and asked which class a chunk is. The schema, loader and checks live beside
// this file (policies/index.ts); this keeps the server's imports short.
import type { ChunkKind, Sensitivity } from '../common/constants.js';
import { loadPolicy, loadPolicyOrThrow } from './load.js';
import { DEFAULT_FULL_POLICY, type Policy, type ServerPolicy } from './schema.js';

export type { Policy, ServerPolicy } from './schema.js';

export const DEFAULT_POLICY: Policy = DEFAULT_FULL_POLICY;

/** Parses a policy (no text: the defaults); throws BAD_REQUEST `FILE:LINE: FIELD: message` for its first error. */
export function parsePolicy(text: string | null | undefined, file = 'policy'): Policy {
  return text ? loadPolicyOrThrow(text, file) : DEFAULT_POLICY;
}

const stored = new Map<string, Policy>();
const STORED_MAX = 256;

/**
 * The policy of a stored image: its text was checked when it was stored, so it is
 * read, not judged again (a check added since must not lock devices out of an image
 * that passed), and read once per distinct text.
 */
export function storedPolicy(text: string | null | undefined): Policy {
  if (!text) return DEFAULT_POLICY;
  let p = stored.get(text);
  if (!p) {
    if (stored.size >= STORED_MAX) stored.clear();
    p = Object.freeze(loadPolicy(text, 'stored policy').policy);
    stored.set(text, p);
  }
  return p;
}

export function classOf(policy: ServerPolicy, kind: ChunkKind, offset: number, length: number): Sensitivity {
  if (kind === 'mem') return policy.sensitiveMemory ? 'sensitive' : 'normal';
  if (kind === 'state') return policy.sensitiveState ? 'sensitive' : 'normal';
  return policy.sensitiveDisk.some(([s, e]) => offset < e && s < offset + length) ? 'sensitive' : 'normal';
}
