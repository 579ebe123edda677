// Meaning checks: a policy whose every value reads can still say something an
// admin did not mean (renewing after the lease ran out, a budget too small for a
// page, a relative guest path). Each check catches one such mistake; an error
// means the policy cannot work as written, a warning that it works but
// probably not as intended.
import { HINT_MAX_INTERVAL_MS, HINT_MAX_NAMES, HINT_MIN_INTERVAL_MS, policyLine } from '../common/hint-protocol.js';
import { MEM_CHUNK_SIZE } from '../common/constants.js';
import { LetheError } from '../common/errors.js';
import type { Finding } from './diagnostics.js';
import { formatBytes, formatDuration } from './format.js';
import type { Policy } from './schema.js';

export interface CheckContext {
  /** the line where the file sets a field ("lease.ttl", "sensitive.disk[1]"), or null */
  lineOf(field: string): number | null;
  isSet(field: string): boolean;
}

type Say = (severity: Finding['severity'], field: string, message: string, hint?: string) => Finding;
type Check = (p: Policy, say: Say, at: CheckContext) => Finding[];

/** Linux keeps this many characters of a process name (TASK_COMM_LEN - 1). */
const COMM_MAX = 15;
const LARGE_STARTUP = 1024 ** 3;

const renewBeforeExpiry: Check = (p, say) =>
  p.renewAfterMs < p.leaseTtlMs
    ? []
    : [
        say('error', 'lease.renew', `must be shorter than lease.ttl (${formatDuration(p.renewAfterMs)} ≥ ${formatDuration(p.leaseTtlMs)})`,
          'renew well before the lease runs out, e.g. at a third of the ttl'),
      ];

const idleWithinLease: Check = (p, say, at) =>
  p.memoryMode === 'none' || p.evictIdleMs < p.leaseTtlMs
    ? []
    : [
        say('warning', at.isSet('eviction.idle') ? 'eviction.idle' : 'lease.ttl',
          `eviction.idle (${formatDuration(p.evictIdleMs)}${at.isSet('eviction.idle') ? '' : ', the default'}) is not shorter than lease.ttl (${formatDuration(p.leaseTtlMs)}): sensitive pages outlive the keys' lease, and only the eviction at lease expiry removes them`,
          'make eviction.idle shorter than lease.ttl'),
      ];

const budgetFits: Check = (p, say) => {
  const b = p.evictBudgetBytes;
  if (b === null) return [];
  if (b < MEM_CHUNK_SIZE) {
    return [say('error', 'eviction.budget', `${formatBytes(b)} is less than one guest page (4 KiB): no sensitive page could stay resident`, 'use a few MiB or more, e.g. 64MiB')];
  }
  if (p.memoryMode === 'none') {
    return [say('warning', 'eviction.budget', 'has no effect: sensitive.memory is none, so no guest page counts against it', 'remove the budget, or make memory all or hinted')];
  }
  if (b < p.prefetchStartupBytes) {
    return [
      say('warning', 'eviction.budget', `${formatBytes(b)} is less than prefetch.startup (${formatBytes(p.prefetchStartupBytes)}): sensitive pages fetched at startup are evicted again before the guest uses them`,
        'make the startup buffer no larger than the budget'),
    ];
  }
  return [];
};

const hintedNamesSomething: Check = (p, say) =>
  p.memoryMode !== 'hinted' || p.processes.length + p.cgroups.length + p.files.length > 0
    ? []
    : [
        say('warning', 'sensitive.memory', 'is hinted but no processes, cgroups or files are listed: nothing is sensitive but free pages',
          'list the processes, cgroups or files whose pages are sensitive, or use memory: all'),
      ];

const listsNeedMemory: Check = (p, say) => {
  if (p.memoryMode !== 'none') return [];
  const listed = (['processes', 'cgroups', 'files'] as const).filter((k) => p[k].length > 0);
  return listed.map((k) =>
    say('warning', `sensitive.${k}`, 'has no effect: sensitive.memory is none, so no guest page is sensitive', 'use memory: hinted to make the pages of what is listed sensitive'),
  );
};

function processName(say: Say, name: string, i: number): Finding[] {
  const field = `sensitive.processes[${i}]`;
  if (name.includes('/')) {
    const base = name.slice(name.lastIndexOf('/') + 1).slice(0, COMM_MAX);
    return [say('warning', field, `'${name}' looks like a path; processes are matched by name (comm), so it never matches`, `write '${base}'`)];
  }
  // The kernel keeps 15 bytes of comm, not 15 characters.
  if (Buffer.byteLength(name) > COMM_MAX) {
    return [
      say('warning', field, `'${name}' is longer than the ${COMM_MAX} characters the guest kernel keeps of a process name (comm), so it never matches`,
        `write '${name.slice(0, COMM_MAX)}', as 'ps -o comm' shows it`),
    ];
  }
  return [];
}

const processNames: Check = (p, say) => p.processes.flatMap((n, i) => processName(say, n, i));

function absolute(say: Say, key: 'files' | 'cgroups', path: string, i: number): Finding[] {
  if (path.startsWith('/')) return [];
  const hint = path.startsWith('~')
    ? `the guest driver does not expand '~': write the full path, e.g. '${path.replace(/^~([^/]*)/, (_, user: string) => `/home/${user || 'user'}`)}'`
    : `write '/${path.replace(/^\.\//, '')}'`;
  return [say('error', `sensitive.${key}[${i}]`, `'${path}' is not an absolute path`, hint)];
}

const absolutePaths: Check = (p, say) => [
  ...p.files.flatMap((f, i) => absolute(say, 'files', f, i)),
  ...p.cgroups.flatMap((c, i) => absolute(say, 'cgroups', c, i)),
];

const diskRanges: Check = (p, say) => {
  const out: Finding[] = [];
  p.sensitiveDisk.forEach(([s, e], i) => {
    if (e <= s) out.push(say('error', `sensitive.disk[${i}]`, `end ${e} is not after start ${s}`, 'a range is [start, end) in bytes: end must be greater than start'));
  });
  const sorted = p.sensitiveDisk.map((r, i) => ({ r, i })).filter(({ r }) => r[1] > r[0]).sort((a, b) => a.r[0] - b.r[0]);
  let reach = sorted[0];
  for (const cur of sorted.slice(1)) {
    if (cur.r[0] < reach.r[1]) {
      const [late, early] = cur.i > reach.i ? [cur, reach] : [reach, cur];
      out.push(say('error', `sensitive.disk[${late.i}]`, `[${late.r.join(', ')}] overlaps sensitive.disk[${early.i}] [${early.r.join(', ')}]`,
        `merge them into one range, e.g. [${reach.r[0]}, ${Math.max(reach.r[1], cur.r[1])}]`));
    }
    if (cur.r[1] > reach.r[1]) reach = cur;
  }
  return out;
};

const bandwidthNotZero: Check = (p, say) =>
  p.prefetchBandwidth !== 0
    ? []
    : [say('error', 'prefetch.bandwidth', 'is 0, which would stall background prefetch for good', "leave it out for no cap; to turn background prefetch off use 'order: none'")];

const startupSize: Check = (p, say) =>
  p.prefetchStartupBytes <= LARGE_STARTUP
    ? []
    : [
        say('warning', 'prefetch.startup', `the guest waits for ${formatBytes(p.prefetchStartupBytes)} to arrive before it runs`,
          'a few tens of MiB is usually enough: every other page still arrives on demand'),
      ];

const suspendNeedsSensitive: Check = (p, say) =>
  p.onLeaseExpiry !== 'suspend' || p.memoryMode !== 'none'
    ? []
    : [
        say('warning', 'eviction.on-lease-expiry', 'suspends the VM at lease expiry, yet sensitive.memory is none: while the VM runs no page is evicted',
          'if guest RAM is worth a suspend, make memory all or hinted; otherwise use evict-sensitive'),
      ];

const hintsKeepUp: Check = (p, say) =>
  p.memoryMode !== 'hinted' || p.hintIntervalMs < p.evictIdleMs
    ? []
    : [
        say('warning', 'hints.interval', `the guest reports every ${formatDuration(p.hintIntervalMs)}, not more often than pages go idle (${formatDuration(p.evictIdleMs)}): a sensitive page may stay up to ${formatDuration(p.hintIntervalMs + p.evictIdleMs)}`,
          'report more often than eviction.idle, e.g. interval: 2s'),
      ];

const hintInterval: Check = (p, say) =>
  p.hintIntervalMs >= HINT_MIN_INTERVAL_MS && p.hintIntervalMs <= HINT_MAX_INTERVAL_MS
    ? []
    : [
        say('error', 'hints.interval', `${formatDuration(p.hintIntervalMs)} is outside what the guest driver accepts (${formatDuration(HINT_MIN_INTERVAL_MS)} to ${formatDuration(HINT_MAX_INTERVAL_MS)})`,
          'use e.g. interval: 2s'),
      ];

const HINT_LISTS = ['processes', 'cgroups', 'files'] as const;

function hintList(say: Say, key: (typeof HINT_LISTS)[number], names: string[]): Finding[] {
  if (names.length > HINT_MAX_NAMES) {
    const hint = key === 'processes' ? 'run them in one cgroup and list that in sensitive.cgroups' : 'list a parent that covers several';
    return [say('error', `sensitive.${key}`, `${names.length} entries, more than the ${HINT_MAX_NAMES} the guest driver takes`, hint)];
  }
  return names.flatMap((n, i) => (n.includes('\0') ? [say('error', `sensitive.${key}[${i}]`, 'holds a NUL byte, which no guest name or path can', 'remove the \\0 escape')] : []));
}

/** Whatever else the guest driver's policy line refuses (its length, so far), as a finding on the longest list. */
const hintsFit: Check = (p, say) => {
  const own = [...hintList(say, 'processes', p.processes), ...hintList(say, 'cgroups', p.cgroups), ...hintList(say, 'files', p.files)];
  if (own.length > 0 || p.hintIntervalMs < HINT_MIN_INTERVAL_MS || p.hintIntervalMs > HINT_MAX_INTERVAL_MS) return own;
  try {
    // Relative paths are absolutePaths' finding; left in, the driver's check would report them again.
    const abs = (xs: string[]) => xs.filter((x) => x.startsWith('/'));
    policyLine({ intervalMs: p.hintIntervalMs, processes: p.processes, cgroups: abs(p.cgroups), files: abs(p.files) });
    return [];
  } catch (e) {
    const longest = [...HINT_LISTS].sort((a, b) => p[b].join().length - p[a].join().length)[0];
    const hint = e instanceof LetheError ? e.hint : undefined;
    return [say('error', `sensitive.${longest}`, e instanceof Error ? e.message : String(e), hint)];
  }
};

const sealKinds: Check = (p, say) => {
  if (p.deviceSeal.length === 0) {
    return [say('error', 'device.seal', 'is empty: no device could get a lease', 'list the seal kinds devices may have, e.g. [tpm, passphrase]')];
  }
  return p.deviceSeal.includes('none')
    ? [say('warning', 'device.seal', "allows 'none': a device whose keys sit unencrypted on its disk gets leases, so a copy of a powered-off laptop can act as it",
        'leave none out, e.g. [tpm, passphrase]')]
    : [];
};

const CHECKS: Check[] = [
  sealKinds,
  renewBeforeExpiry,
  idleWithinLease,
  budgetFits,
  hintedNamesSomething,
  listsNeedMemory,
  processNames,
  absolutePaths,
  diskRanges,
  bandwidthNotZero,
  startupSize,
  suspendNeedsSensitive,
  hintsKeepUp,
  hintInterval,
  hintsFit,
];

/** The line of a field, or of the nearest enclosing field the file sets. */
function lineFor(at: CheckContext, field: string): number | null {
  for (let f = field; f; f = f.replace(/(\[\d+\]|\.[^.[]+)$/, '')) {
    const line = at.lineOf(f);
    if (line !== null) return line;
    if (!/[.[]/.test(f)) break;
  }
  return null;
}

/** Every meaning check on a policy whose values all read; each finding carries the line of its field. */
export function checkPolicy(p: Policy, at: CheckContext): Finding[] {
  const say: Say = (severity, field, message, hint) => ({ severity, line: lineFor(at, field), field, message, ...(hint ? { hint } : {}) });
  return CHECKS.flatMap((c) => c(p, say, at));
}
