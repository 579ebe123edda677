// The policy's shape: every key a policy file may set, how its value is read,
// and the parsed form the server, the agent and the CLI use (times in ms, sizes
// in bytes). docs/policies.md describes the same keys for admins.
import type { TAgentPolicy } from '../common/wire.js';
import {
  DEFAULT_EVICT_IDLE_S,
  DEFAULT_KEY_CEILING_SHARE,
  DEFAULT_KEY_WINDOW_S,
  DEFAULT_LEASE_TTL_S,
  EXPIRY_ACTIONS,
  FREE_PAGE_ACTIONS,
  IMAGE_USERS,
  MEMORY_MODES,
  PREFETCH_ORDERS,
  SEAL_KINDS,
  WIPE_ACTIONS,
  type SealKind,
} from '../common/constants.js';
import { parseDuration } from '../common/duration.js';
import { parseRate, parseSize } from '../common/sizes.js';
import { closest } from './suggest.js';

/** The part of a policy the server acts on: lease timing and which chunks are sensitive. */
export interface ServerPolicy {
  leaseTtlMs: number;
  renewAfterMs: number;
  sensitiveMemory: boolean;
  sensitiveState: boolean;
  /** byte ranges of the disk, [start, end) */
  sensitiveDisk: [number, number][];
  /** Sensitive guest pages resident longer than this are evicted (the agent's evictor). */
  evictIdleMs: number;
  /** How a device must keep its identity keys at rest to get a lease (device.seal). */
  deviceSeal: SealKind[];
  /** Most distinct sensitive chunk keys one device is given per window: a share of the version's, or a count. */
  keyCeiling: KeyCeiling;
  keyWindowMs: number;
  /** `single`: a device's check-in becomes the image's shared version at once; `shared`: an admin promotes it. */
  imageUsers: (typeof IMAGE_USERS)[number];
}

export type KeyCeiling = { share: number } | { count: number };

/**
 * The full policy: the server's part and the agent's part, whose fields are those
 * the lease response carries (common/wire.ts AgentPolicy; docs/policies.md says
 * what each means). Built on the wire type so that a field added there and not
 * here fails to compile (buildPolicy) rather than fail every lease.
 */
export interface Policy extends ServerPolicy, TAgentPolicy {
  name: string;
  description: string;
}

const DEFAULT_TTL_MS = DEFAULT_LEASE_TTL_S * 1000;

export const DEFAULT_FULL_POLICY: Policy = Object.freeze({
  name: '',
  description: '',
  leaseTtlMs: DEFAULT_TTL_MS,
  renewAfterMs: DEFAULT_TTL_MS / 3,
  sensitiveMemory: true,
  sensitiveState: false,
  sensitiveDisk: [],
  evictIdleMs: DEFAULT_EVICT_IDLE_S * 1000,
  deviceSeal: ['tpm', 'passphrase'] as SealKind[],
  keyCeiling: { share: DEFAULT_KEY_CEILING_SHARE },
  keyWindowMs: DEFAULT_KEY_WINDOW_S * 1000,
  imageUsers: 'shared',
  memoryMode: 'all',
  processes: [],
  cgroups: [],
  files: [],
  freePages: 'evict',
  evictBudgetBytes: null,
  dropGuestCache: true,
  onLeaseExpiry: 'evict-sensitive',
  onWipe: 'evict-all',
  prefetchStartupBytes: 0,
  prefetchStartupAuto: false,
  prefetchOrder: 'trace',
  prefetchBandwidth: null,
  hintIntervalMs: 2000,
});

/** A value read, or why not; `at` points below the field (a list element) when that is where the fault is. */
export type Read<T> = { value: T } | { message: string; hint?: string; at?: (string | number)[] };

export interface Field<T = unknown> {
  read(v: unknown): Read<T>;
}

/** How a person would name a YAML value in a message. */
export function describe(v: unknown): string {
  if (v === null || v === undefined) return 'nothing';
  if (Array.isArray(v)) return 'a list';
  if (v instanceof Uint8Array) return 'binary data';
  if (typeof v === 'object') return 'a mapping';
  const text = String(v).replace(/[\u0000-\u001f\u007f]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  return `'${text.length > 60 ? `${text.slice(0, 57)}...` : text}'`;
}

const bad = <T>(expected: string, v: unknown, hint?: string): Read<T> => ({
  message: `expected ${expected}, got ${describe(v)}`,
  ...(hint ? { hint } : {}),
});

function nonNegative(v: number): Read<number> | null {
  return v < 0 ? { message: `must not be negative, got ${v}` } : null;
}

const DURATION_HINT = 'use seconds or a number with a unit, e.g. 90s, 15m, 1h';
/** Longer is a mistake, and past what a lease's expiry time can be written as. */
const MAX_DURATION_MS = 365 * 24 * 3600 * 1000;

const duration: Field<number> = {
  read(v) {
    let ms: number;
    if (typeof v === 'number') {
      const neg = nonNegative(v);
      if (neg) return neg;
      ms = Math.round(v * 1000);
    } else if (typeof v === 'string') {
      try {
        ms = parseDuration(v);
      } catch {
        return bad('a duration', v, DURATION_HINT);
      }
    } else {
      return bad('a duration', v, DURATION_HINT);
    }
    if (!(ms <= MAX_DURATION_MS)) return { message: `must be at most a year, got ${describe(v)}`, hint: DURATION_HINT };
    return ms > 0 ? { value: ms } : { message: `must be longer than 0, got ${describe(v)}`, hint: DURATION_HINT };
  },
};

function bytes(v: unknown, parse: (s: string) => number | null, what: string, hint: string): Read<number> {
  if (typeof v === 'number') return nonNegative(v) ?? (Number.isSafeInteger(v) ? { value: v } : bad(`a whole number of bytes`, v, hint));
  const n = typeof v === 'string' ? parse(v) : null;
  return n === null ? bad(what, v, hint) : { value: n };
}

const size: Field<number> = {
  read: (v) => bytes(v, parseSize, 'a size', 'use bytes or a number with a unit, e.g. 512KiB, 64MiB, 1GiB'),
};

/** A size, or `auto`: sized at each resume by the link and the image's touch curve. */
const startup: Field<number | 'auto'> = {
  read: (v) =>
    typeof v === 'string' && v.trim().toLowerCase() === 'auto'
      ? { value: 'auto' }
      : bytes(v, parseSize, "'auto' or a size", "write auto (sized by the link and the image's learned first touches) or a size, e.g. 16MiB"),
};

const rate: Field<number> = {
  read: (v) => bytes(v, parseRate, 'a rate', 'use bytes per second or a size per second, e.g. 50MiB/s'),
};

const bool: Field<boolean> = {
  read: (v) => (typeof v === 'boolean' ? { value: v } : bad('true or false', v)),
};

const text: Field<string> = {
  read: (v) => (['string', 'number', 'boolean'].includes(typeof v) ? { value: String(v) } : bad('text', v)),
};

const listOf = <T extends string>(...xs: readonly T[]) => xs.slice(0, -1).join(', ') + ' or ' + xs[xs.length - 1];

function oneOf<T extends string>(values: readonly T[], bools?: [T, T]): Field<T> {
  return {
    read(v) {
      if (typeof v === 'string' && (values as readonly string[]).includes(v)) return { value: v as T };
      if (bools && typeof v === 'boolean') return { value: v ? bools[0] : bools[1] };
      const near = typeof v === 'string' ? closest(v, values) : undefined;
      return bad(listOf(...values), v, near ? `did you mean '${near}'?` : undefined);
    },
  };
}

function listField<T>(what: string, item: (v: unknown) => Read<T>, example: string): Field<T[]> {
  return {
    read(v) {
      if (!Array.isArray(v)) return bad(`a list of ${what}`, v, `write a list, e.g. ${example}`);
      const out: T[] = [];
      for (const [i, x] of v.entries()) {
        const r = item(x);
        if (!('value' in r)) return { ...r, at: [i, ...(r.at ?? [])] };
        out.push(r.value);
      }
      return { value: out };
    },
  };
}

function name(v: unknown): Read<string> {
  if ((typeof v !== 'string' && typeof v !== 'number') || String(v).trim() === '') return bad('a name', v);
  return { value: String(v) };
}

function path(v: unknown): Read<string> {
  return typeof v === 'string' && v.trim() !== '' ? { value: v } : bad('a path', v);
}

function range(v: unknown): Read<[number, number]> {
  const hint = 'write each range as [start, end) in bytes, e.g. [0, 1MiB]';
  if (!Array.isArray(v) || v.length !== 2) return bad('a [start, end] pair', v, hint);
  const ends = v.map((x) => size.read(x));
  for (const [i, r] of ends.entries()) if (!('value' in r)) return { ...r, at: [i] };
  return { value: ends.map((r) => (r as { value: number }).value) as [number, number] };
}

const CEILING_HINT = 'write a share of the image\'s sensitive chunks, e.g. 90%, or a number of keys, e.g. 20000';

/** "90%" → a share; 20000 → a count of keys. */
const ceiling: Field<KeyCeiling> = {
  read(v) {
    if (typeof v === 'number') return Number.isSafeInteger(v) && v > 0 ? { value: { count: v } } : bad('a whole number of keys above 0', v, CEILING_HINT);
    const m = typeof v === 'string' ? /^\s*(\d+(?:\.\d+)?)\s*%\s*$/.exec(v) : null;
    if (!m) return bad('a share such as 90% or a number of keys', v, CEILING_HINT);
    const pct = Number(m[1]);
    return pct > 0 && pct <= 100 ? { value: { share: pct / 100 } } : { message: `must be above 0% and at most 100%, got ${describe(v)}`, hint: CEILING_HINT };
  },
};

const sealKind = oneOf(SEAL_KINDS);

/** Every key a policy may set, by section. A section's value is a mapping of its keys. */
export const SCHEMA = {
  name: text,
  description: text,
  lease: { ttl: duration, renew: duration },
  sensitive: {
    memory: oneOf(MEMORY_MODES, ['all', 'none']),
    processes: listField('process names', name, '[gpg-agent, ssh-agent]'),
    cgroups: listField('cgroup paths', path, '[/finance.slice]'),
    files: listField('paths', path, '[/home/user/.ssh]'),
    'free-pages': oneOf(FREE_PAGE_ACTIONS),
    state: bool,
    disk: listField('byte ranges', range, '[[0, 1MiB]]'),
  },
  eviction: {
    idle: duration,
    budget: size,
    'drop-guest-cache': bool,
    'on-lease-expiry': oneOf(EXPIRY_ACTIONS),
    'on-wipe': oneOf(WIPE_ACTIONS),
  },
  prefetch: { startup, order: oneOf(PREFETCH_ORDERS), bandwidth: rate },
  hints: { interval: duration },
  device: {
    seal: listField('seal kinds', (v) => sealKind.read(v), '[tpm, passphrase]'),
    'key-ceiling': ceiling,
    'key-window': duration,
  },
  image: { users: oneOf(IMAGE_USERS) },
} as const;

export type Section = Record<string, Field>;
export const isField = (x: Field | Section): x is Field => typeof (x as Field).read === 'function';

/** The values a file set, by dotted path ("lease.ttl"), already read. */
export type Values = ReadonlyMap<string, unknown>;

/** The full policy from the values a file set; anything unset takes its default. */
export function buildPolicy(values: Values): Policy {
  const d = DEFAULT_FULL_POLICY;
  const get = <T>(key: string, dflt: T): T => (values.has(key) ? (values.get(key) as T) : dflt);
  const ttl = get('lease.ttl', d.leaseTtlMs);
  const memoryMode = get('sensitive.memory', d.memoryMode);
  const startupSet = get<number | 'auto'>('prefetch.startup', d.prefetchStartupAuto ? 'auto' : d.prefetchStartupBytes);
  const startupAuto = startupSet === 'auto';
  return {
    name: get('name', d.name),
    description: get('description', d.description),
    leaseTtlMs: ttl,
    renewAfterMs: get('lease.renew', ttl / 3),
    sensitiveMemory: memoryMode !== 'none',
    sensitiveState: get('sensitive.state', d.sensitiveState),
    sensitiveDisk: get('sensitive.disk', []),
    evictIdleMs: get('eviction.idle', d.evictIdleMs),
    deviceSeal: get('device.seal', d.deviceSeal),
    keyCeiling: get('device.key-ceiling', d.keyCeiling),
    keyWindowMs: get('device.key-window', d.keyWindowMs),
    imageUsers: get('image.users', d.imageUsers),
    memoryMode,
    processes: get('sensitive.processes', []),
    cgroups: get('sensitive.cgroups', []),
    files: get('sensitive.files', []),
    freePages: get('sensitive.free-pages', d.freePages),
    evictBudgetBytes: get('eviction.budget', d.evictBudgetBytes),
    dropGuestCache: get('eviction.drop-guest-cache', d.dropGuestCache),
    onLeaseExpiry: get('eviction.on-lease-expiry', d.onLeaseExpiry),
    onWipe: get('eviction.on-wipe', d.onWipe),
    prefetchStartupBytes: startupAuto ? 0 : (startupSet as number),
    prefetchStartupAuto: startupAuto,
    prefetchOrder: get('prefetch.order', d.prefetchOrder),
    prefetchBandwidth: get('prefetch.bandwidth', d.prefetchBandwidth),
    hintIntervalMs: get('hints.interval', d.hintIntervalMs),
  };
}
