// Core dumps and crash dumps: a dump of the agent or of QEMU would hold keys or guest
// RAM; where the kernel sends one, and whether it is kept.
import type { HostCheck } from './host.js';
import path from 'node:path';
import { Host, limitOf, oneOf, quote } from './host.js';

// ---- core dumps ----

/** Where cores go: nowhere, to disk (and where), or to a pipe program that may keep them. */
function coreDestination(h: Host): { stored: 'no' | 'yes' | 'maybe'; where: string } {
  const pattern = (h.read('/proc/sys/kernel/core_pattern') ?? 'core').trim() || 'core';
  if (!pattern.startsWith('|')) {
    const dir = pattern.startsWith('/') ? '' : " in the crashing program's working directory";
    return { stored: 'yes', where: `the kernel writes cores to files named ${quote(pattern)}${dir}` };
  }
  const program = pattern.slice(1).trim().split(/\s+/)[0] ?? '';
  const base = path.basename(program);
  if (base === 'false' || base === 'true') return { stored: 'no', where: `the kernel pipes cores to ${program}, which drops them` };
  if (base === 'systemd-coredump') {
    return coredumpStorage(h) === 'none'
      ? { stored: 'no', where: 'systemd-coredump drops cores (Storage=none)' }
      : { stored: 'yes', where: 'systemd-coredump keeps cores in /var/lib/systemd/coredump' };
  }
  if (base === 'apport') return { stored: 'yes', where: 'apport keeps cores in /var/crash' };
  return { stored: 'maybe', where: `the kernel pipes cores to ${program}, which may keep them` };
}

/** coredump.conf(5): the main file, then drop-ins in name order, /etc over /run over /usr/lib. */
function coredumpStorage(h: Host): string {
  const dropIns = new Map<string, string>();
  for (const dir of ['/usr/lib/systemd/coredump.conf.d', '/run/systemd/coredump.conf.d', '/etc/systemd/coredump.conf.d']) {
    for (const f of h.list(dir).filter((n) => n.endsWith('.conf'))) dropIns.set(f, `${dir}/${f}`);
  }
  const files = ['/etc/systemd/coredump.conf', ...[...dropIns.keys()].sort().map((k) => dropIns.get(k)!)];
  let storage = 'external';
  for (const f of files) {
    for (const m of (h.read(f) ?? '').matchAll(/^\s*Storage\s*=\s*(\S+)/gm)) storage = m[1];
  }
  return storage;
}

const HARDENED = 'the agent makes itself non-dumpable (agent/daemon/harden.ts); QEMU does not, though it leaves guest RAM out of its cores (dump-guest-core=off)';
const DROP_CORES = "make the kernel drop cores: echo 'kernel.core_pattern=|/bin/false' | sudo tee /etc/sysctl.d/50-lethe-core.conf && sudo sysctl --system";
const COREDUMP_NONE = "or keep systemd-coredump and put 'Storage=none' and 'ProcessSizeMax=0' under [Coredump] in /etc/systemd/coredump.conf.d/lethe.conf";
const SUID_OFF = "set fs.suid_dumpable=0: echo 'fs.suid_dumpable=0' | sudo tee /etc/sysctl.d/50-lethe-suid.conf && sudo sysctl --system";

export function checkCoreDumps(h: Host): Omit<HostCheck, 'id'> {
  const dest = coreDestination(h);
  const suidDumps = oneOf(h, '/proc/sys/fs/suid_dumpable', ['0', '1', '2'] as const) === '1';
  const core = limitOf(h, 'Max core file size');
  const size = core.soft === Infinity ? 'unlimited' : core.soft === 0 ? '0' : `${core.soft} bytes`;
  const raise = core.soft === 0 && dest.stored !== 'no' ? ', but a program may raise it and QEMU started elsewhere may have another' : '';
  const suidText = suidDumps ? '; fs.suid_dumpable is 1, so setuid programs dump too' : '';
  const found = (note: string) => `${dest.where}; the core size limit of ${h.who} is ${size}${note}${raise}${suidText}; ${HARDENED}`;
  if (dest.stored === 'no' && !suidDumps) return { status: 'ok', found: found(h.agentMayDiffer), fix: '' };
  if (dest.stored === 'no') return { status: 'warn', found: found(''), fix: SUID_OFF };
  const fixes = [DROP_CORES, ...(dest.where.startsWith('systemd-coredump') ? [COREDUMP_NONE] : []), ...(suidDumps ? [SUID_OFF] : [])];
  const status = dest.stored === 'yes' && core.soft > 0 ? 'fail' : 'warn';
  return { status, found: found(''), fix: fixes.join('; ') };
}


// ---- crash dumps ----

export function checkKdump(h: Host): Omit<HostCheck, 'id'> {
  const loaded = oneOf(h, '/sys/kernel/kexec_crash_loaded', ['0', '1'] as const);
  if (loaded !== '1') return { status: 'ok', found: loaded === '0' ? 'no crash kernel is loaded' : 'this kernel cannot load a crash kernel', fix: '' };
  return {
    status: 'warn',
    found: 'a crash kernel is loaded (kdump): after a kernel panic it saves all of RAM, keys and guest pages included, to disk (usually /var/crash)',
    fix: 'sudo systemctl disable --now kdump-tools (Debian, Ubuntu) or kdump (Fedora, RHEL)',
  };
}

