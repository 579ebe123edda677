// Another program reading the agent's memory (ptrace), and the locked memory the
// agent needs for its keys and plaintext buffers (RLIMIT_MEMLOCK).
import {
  DISK_CHUNK_SIZE, DISK_LARGE_BUFFER_BYTES, DISK_REPLY_BUFFER_BYTES, DISK_REPLY_BUFFERS, DISK_TRANSIT_BUFFERS, FAULT_PAGE_BUFFERS, KEY_BYTES, KEY_RING_MAX_KEYS, KEY_SLAB_SLOTS,
  MEM_CHUNK_SIZE, NBD_PROXY_COPY_BYTES, NBD_PROXY_READERS, NBD_PROXY_REPLY_BUFFERS, NBD_PROXY_WRITE_BUFFERS,
} from '../../common/constants.js';
import { NBD_MAX_CONNECTIONS } from '../../agent/index.js';
import { formatBytes } from '../../policies/format.js';
import type { HostCheck } from './host.js';
import { Host, limitOf, oneOf } from './host.js';

const MiB = 1024 * 1024;

const PAGE = 4096;
/** sodium_malloc locks the size asked for plus a 16-byte canary, in whole pages. */
const locked = (bytes: number) => Math.ceil((bytes + 16) / PAGE) * PAGE;

// What the agent locks with sodium_malloc at its defaults (common/constants.ts).
const AGENT_LOCKS = {
  diskReplies: locked(DISK_REPLY_BUFFERS * DISK_REPLY_BUFFER_BYTES),
  diskTransit: locked(DISK_TRANSIT_BUFFERS * DISK_CHUNK_SIZE),
  pagePool: locked(FAULT_PAGE_BUFFERS * MEM_CHUNK_SIZE),
  keySlab: locked(KEY_SLAB_SLOTS * KEY_BYTES),
  // Single keys, device-state chunks and scratch: each allocation locks whole pages.
  scratch: 1 * MiB,
  // Made the first time an NBD request is longer than a reply buffer or finds none free
  // within 100 ms: one buffer of the largest payload, which such requests take in turn
  // (agent/disk/backend.ts).
  diskLarge: locked(DISK_LARGE_BUFFER_BYTES),
  // The native disk-read table (native/disk-reads.cc): its class keys, JavaScript's
  // scratch, the reply buffers the NBD read proxies share (32 bytes of header room each)
  // and the write buffers they lend for writes' payloads.
  diskReadTable: 2 * PAGE + NBD_PROXY_REPLY_BUFFERS * locked(32 + DISK_REPLY_BUFFER_BYTES) + NBD_PROXY_WRITE_BUFFERS * locked(DISK_REPLY_BUFFER_BYTES),
  // Each NBD connection's read proxy: two payload buffers, and each requests thread's scratch.
  proxyConnection: 2 * locked(NBD_PROXY_COPY_BYTES) + NBD_PROXY_READERS * PAGE,
};

/**
 * Bytes the agent locks once it serves a VM, and at most: with the large disk buffer
 * made, its key ring grown to hold `keys` keys (by default all it may hold) and as many
 * NBD connections as its server takes, each with its read proxy.
 */
export function agentLockedBytes(keys = KEY_RING_MAX_KEYS): { atStart: number; atMost: number } {
  const l = AGENT_LOCKS;
  const atStart = l.diskReplies + l.diskTransit + l.pagePool + l.keySlab + l.scratch + l.diskReadTable;
  const slabs = Math.max(1, Math.ceil(keys / KEY_SLAB_SLOTS));
  return { atStart, atMost: atStart + (slabs - 1) * l.keySlab + l.diskLarge + NBD_MAX_CONNECTIONS * l.proxyConnection };
}


// ---- ptrace ----

export function checkPtrace(h: Host): Omit<HostCheck, 'id'> {
  const scope = oneOf(h, '/proc/sys/kernel/yama/ptrace_scope', ['0', '1', '2', '3'] as const);
  const fix = "echo 'kernel.yama.ptrace_scope=1' | sudo tee /etc/sysctl.d/50-lethe-ptrace.conf && sudo sysctl --system";
  if (scope === undefined) {
    return {
      status: 'warn',
      found: "the kernel has no Yama (no /proc/sys/kernel/yama/ptrace_scope): any program of this user may read QEMU's memory, guest RAM included",
      fix: 'use a kernel with Yama (CONFIG_SECURITY_YAMA, in most distributions) and set kernel.yama.ptrace_scope=1',
    };
  }
  if (scope === '0') {
    return {
      status: 'fail',
      found: "ptrace_scope is 0: any program of this user may attach to QEMU and read its memory, guest RAM included (the agent itself is non-dumpable, which refuses that)",
      fix,
    };
  }
  const what = { '1': 'only a parent may attach (the agent to its QEMU)', '2': 'only root may attach', '3': 'no process may attach' }[scope];
  return { status: 'ok', found: `ptrace_scope is ${scope}: ${what}`, fix: '' };
}


// ---- locked memory ----

const CAP_IPC_LOCK = 14;

/** CAP_IPC_LOCK lifts RLIMIT_MEMLOCK for mlock (root usually has it). */
function canLockAnything(h: Host): boolean {
  const m = /^CapEff:\s*([0-9a-f]+)$/im.exec(h.read(`${h.proc}/status`) ?? '');
  return !!m && (BigInt(`0x${m[1]}`) & (1n << BigInt(CAP_IPC_LOCK))) !== 0n;
}

export function checkMemlock(h: Host): Omit<HostCheck, 'id'> {
  const { soft } = limitOf(h, 'Max locked memory');
  const limit = soft === Infinity ? 'unlimited' : formatBytes(soft);
  const need = agentLockedBytes();
  const wants = `the agent locks about ${formatBytes(need.atStart)} at its defaults, up to ${formatBytes(need.atMost)} with a full key ring and a busy disk`;
  if (canLockAnything(h)) return { status: 'ok', found: `${h.who} has CAP_IPC_LOCK${h.agentMayDiffer}, so its locked-memory limit (${limit}) does not apply`, fix: '' };
  if (soft >= need.atMost) return { status: 'ok', found: `the locked-memory limit of ${h.who} is ${limit}${h.agentMayDiffer}; ${wants}`, fix: '' };
  const kib = 2 ** Math.ceil(Math.log2(need.atMost / 1024));
  const fix = `raise it where the agent starts: LimitMEMLOCK=infinity in its systemd unit (agent/lethe-agent.service has it; check a running agent with --pid), or 'USER - memlock ${kib}' in /etc/security/limits.conf and log in again`;
  const silent = 'libsodium ignores a refused mlock, so buffers past the limit hold plaintext and keys in memory that can be swapped out';
  const status = soft >= need.atStart ? 'warn' : 'fail';
  return { status, found: `the locked-memory limit of ${h.who} is ${limit}; ${wants}; ${silent}`, fix };
}

