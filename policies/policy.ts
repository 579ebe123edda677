// The policy as the server uses it: parsed once when an image gets its policy,
// and asked which class a chunk is. The schema, loader and checks live beside
// this file (policies/index.ts); this keeps the server's imports short.
import type { ChunkKind, Sensitivity } from '../common/constants.js';
import { LetheError } from '../common/errors.js';
import { diagnosticError } from './diagnostics.js';
import { loadPolicy, loadPolicyOrThrow } from './load.js';
import { DEFAULT_FULL_POLICY, type Policy, type ServerPolicy } from './schema.js';

/** Parses a policy (no text: the defaults); throws BAD_REQUEST `FILE:LINE: FIELD: message` for its first error. */
export function parsePolicy(text: string | null | undefined, file = 'policy'): Policy {
  return text ? loadPolicyOrThrow(text, file) : DEFAULT_FULL_POLICY;
}

const stored = new Map<string, Policy>();
const STORED_MAX = 256;

/**
 * Reads a stored policy without its meaning checks. Throws INTERNAL when a value
 * no longer reads (a text stored by a newer Lethe, say): a default in its place
 * could protect less than the admin asked for (no sensitive disk ranges), so
 * leases on the image fail until an admin replaces its policy.
 */
function readStored(text: string): Policy {
  const { policy, diagnostics } = loadPolicy(text, 'stored policy', { meaning: false });
  const first = diagnostics.find((d) => d.severity === 'error');
  if (first) {
    throw new LetheError('INTERNAL', `the image's stored policy cannot be read: ${diagnosticError(first).message}`, {
      hint: "replace it with 'lethe image policy IMAGE FILE'",
    });
  }
  return Object.freeze(policy);
}

/**
 * The policy of a stored image: its text was checked when it was stored, so it is
 * read, not judged again (a check added since must not lock devices out of an image
 * that passed), and read once per distinct text. Throws INTERNAL when it no longer reads.
 */
export function storedPolicy(text: string | null | undefined): Policy {
  if (!text) return DEFAULT_FULL_POLICY;
  let p = stored.get(text);
  if (!p) {
    p = readStored(text);
    if (stored.size >= STORED_MAX) stored.clear();
    stored.set(text, p);
  }
  return p;
}

export function classOf(policy: ServerPolicy, kind: ChunkKind, offset: number, length: number): Sensitivity {
  if (kind === 'mem') return policy.sensitiveMemory ? 'sensitive' : 'normal';
  if (kind === 'state') return policy.sensitiveState ? 'sensitive' : 'normal';
  return policy.sensitiveDisk.some(([s, e]) => offset < e && s < offset + length) ? 'sensitive' : 'normal';
}
