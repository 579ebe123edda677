// `lethe policy explain`: a policy in plain words for the IT admin who has to
// answer "what can a lost laptop still read, and for how long".
import { KEY_CEILING_FLOOR } from '../common/constants.js';
import { formatBytes, formatDuration } from './format.js';
import type { Policy } from './schema.js';

const MAX_LISTED_RANGES = 5;

const quoted = (xs: string[]) => xs.map((x) => `'${x}'`).join(', ');

function memoryLine(p: Policy): string {
  if (p.memoryMode === 'all') {
    return 'every guest memory page is sensitive: its key is released on request, audited, and dropped when the page is evicted';
  }
  if (p.memoryMode === 'none') {
    return 'no guest memory page is sensitive: all of RAM is readable under one key for the whole lease and is not evicted for idleness';
  }
  const what = [
    p.processes.length ? `the memory of processes ${quoted(p.processes)}` : '',
    p.cgroups.length ? `the memory of processes in cgroups ${quoted(p.cgroups)}` : '',
    p.files.length ? `the page cache of ${quoted(p.files)}` : '',
  ].filter(Boolean);
  const listed = what.length ? what.join('; ') : 'nothing (no processes, cgroups or files are listed)';
  // Every page still has its own key, released on request and audited (the server
  // keeps all of guest memory in the sensitive class); the reports decide only what is evicted.
  return `guest memory pages are sensitive when the guest driver reports them as: ${listed}; every page's key is still released on request and audited, but other pages are not evicted for idleness`;
}

function diskLine(p: Policy): string {
  const rs = p.sensitiveDisk;
  if (rs.length === 0) return 'no part of the disk is sensitive';
  const shown = rs.slice(0, MAX_LISTED_RANGES).map(([s, e]) => `${s}–${e} (${formatBytes(e - s)})`);
  const more = rs.length > MAX_LISTED_RANGES ? ` and ${rs.length - MAX_LISTED_RANGES} more` : '';
  return `disk bytes ${shown.join(', ')}${more} are sensitive (whole 128 KiB chunks around them)`;
}

function sensitiveLines(p: Policy): string[] {
  return [
    memoryLine(p),
    p.freePages === 'evict'
      ? 'pages the guest frees are evicted as soon as the guest driver reports them'
      : 'pages the guest frees stay resident until they are evicted like any other page',
    p.sensitiveState ? "the VM's device state (CPU registers, devices) is sensitive" : "the VM's device state (CPU registers, devices) is not sensitive",
    diskLine(p),
  ];
}

function plaintextLines(p: Policy): string[] {
  if (p.memoryMode === 'none') return ['no guest page is evicted for idleness: plaintext stays in RAM while the VM runs'];
  const lines = [
    `a sensitive page is evicted ${formatDuration(p.evictIdleMs)} after it arrived, even if the guest still uses it; its next use fetches its key from the server again (audited)`,
    p.evictBudgetBytes === null
      ? 'there is no cap on how much sensitive plaintext is resident at once: only the idle time limits it'
      : `at most ${formatBytes(p.evictBudgetBytes)} of sensitive plaintext is resident at once; beyond it the oldest pages are evicted first`,
  ];
  if (p.files.length) {
    lines.push(p.dropGuestCache
      ? 'at each eviction pass the guest drops its page cache of the sensitive files'
      : 'the guest keeps its page cache of the sensitive files (drop-guest-cache: false)');
  }
  return lines;
}

const EXPIRY: Record<Policy['onLeaseExpiry'], string> = {
  'evict-sensitive': 'every key is zeroed, every sensitive page is evicted, and the VM is held until the server grants a new lease',
  'evict-all': 'every key is zeroed, every guest page (sensitive or not) is evicted, and the VM is held until the server grants a new lease',
  suspend: 'every key is zeroed and every guest page evicted (changed ones kept as ciphertext), the VM is held, and if the server can still be reached the VM is suspended as a new version of the image that this device resumes (others too once it is promoted)',
};

// The agent acts the same on both today: the keys are zeroed, QEMU is killed at once
// (its RAM file goes with it), then the cache is deleted. The key stays so that
// policies naming either value still read.
const WIPE: Record<Policy['onWipe'], string> = {
  'evict-all': 'every page is evicted: the VM is stopped at once and its RAM freed with it, the keys are zeroed and the local ciphertext cache deleted; guest work not checked in is lost',
  poweroff: 'the VM is powered off at once and its RAM freed with it, the keys are zeroed and the local ciphertext cache deleted; guest work not checked in is lost',
};

function leaseLines(p: Policy): string[] {
  const ttl = formatDuration(p.leaseTtlMs);
  return [
    `keys are released under a lease of ${ttl}; the agent renews it every ${formatDuration(p.renewAfterMs)}`,
    `a laptop that loses the server keeps running for ${formatDuration(p.leaseTtlMs - p.renewAfterMs)} to ${ttl}, depending on when it last renewed`,
    `when the lease runs out: ${EXPIRY[p.onLeaseExpiry]}`,
    `on a wipe order (acted on at the next heartbeat): ${WIPE[p.onWipe]}`,
  ];
}

const ORDER: Record<Policy['prefetchOrder'], string> = {
  trace: 'the rest is fetched in the background in the order earlier sessions first touched it (learned by the server)',
  address: 'the rest is fetched in the background in guest address order',
  none: 'nothing is fetched in the background: other pages arrive only when the guest touches them',
};

function prefetchLines(p: Policy): string[] {
  const lines = [
    p.prefetchStartupAuto
      ? "before the guest runs, as much is fetched as keeps the rest of the learned order ahead of it, by the link's measured rate and the image's learned first touches (nothing without them)"
      : p.prefetchStartupBytes === 0
        ? 'nothing is fetched before the guest runs'
        : `${formatBytes(p.prefetchStartupBytes)} is fetched before the guest runs`,
    ORDER[p.prefetchOrder],
  ];
  if (p.prefetchOrder !== 'none') {
    lines.push(p.prefetchBandwidth === null
      ? 'background prefetch is not capped'
      : `background prefetch is capped at ${formatBytes(p.prefetchBandwidth)}/s; pages the guest waits for are never capped`);
  }
  return lines;
}

function hintLines(p: Policy): string[] {
  const what = p.memoryMode === 'hinted' ? 'which of its frames are free and which hold sensitive data' : 'which of its frames are free';
  return [`every ${formatDuration(p.hintIntervalMs)}, the guest driver reports ${what}`];
}

const SEAL: Record<Policy['deviceSeal'][number], string> = {
  tpm: 'sealed to the TPM with a PIN',
  passphrase: 'sealed under a passphrase (Argon2id)',
  none: 'unencrypted on the disk (--seal none)',
};

function deviceLines(p: Policy): string[] {
  const ceiling = 'share' in p.keyCeiling
    ? `${+(p.keyCeiling.share * 100).toFixed(2)}% of the image's sensitive chunk keys (at least ${KEY_CEILING_FLOOR})`
    : `${p.keyCeiling.count} sensitive chunk keys`;
  return [
    p.deviceSeal.length === 0
      ? 'no device gets a lease (no seal kind is allowed)'
      : `a lease goes only to a device whose identity keys are ${p.deviceSeal.map((k) => SEAL[k]).join(', or ')}`,
    `one device is given at most ${ceiling}, counted once each, within ${formatDuration(p.keyWindowMs)}; past that its key requests are refused and the audit log raises an alarm`,
  ];
}

function checkinLines(p: Policy): string[] {
  return p.imageUsers === 'single'
    ? [
        "the image has one user (users: single): a device's check-in or suspend becomes the version every assigned device resumes, without an admin",
      ]
    : [
        "a device's check-in or suspend is a version only that device resumes; other devices keep the image's shared version until an admin promotes it (lethe image promote)",
      ];
}

/** Plain words for an IT admin: what is sensitive, how long plaintext stays, offline, expiry, wipe, prefetch, hints, check-ins. */
export function explainPolicy(p: Policy, file: string): string {
  const title = `policy ${p.name || file}${p.description ? `: ${p.description.replace(/\s+/g, ' ').trim()}` : ''}`;
  const section = (head: string, lines: string[]) => [``, head, ...lines.map((l) => `  - ${l}`)];
  return [
    title,
    ...section('what is sensitive', sensitiveLines(p)),
    ...section('how long plaintext may stay', plaintextLines(p)),
    ...section('lease, offline, expiry and wipe', leaseLines(p)),
    ...section('prefetch', prefetchLines(p)),
    ...section('guest reports', hintLines(p)),
    ...section('devices', deviceLines(p)),
    ...section('check-ins', checkinLines(p)),
  ].join('\n');
}
