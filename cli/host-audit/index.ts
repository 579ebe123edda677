// `lethe audit host`: the ways this laptop could write VM plaintext or keys to disk, or
// let another program read them, each with what to change (docs/host-audit.md).
// Every check reads the kernel's own files under `root`, so tests can lay out a /proc
// and /sys tree for cases this machine is not in. The checks: swap.ts (swap,
// hibernation), dumps.ts (core and crash dumps), limits.ts (ptrace, locked memory),
// unit.ts (the agent's systemd unit).
import os from 'node:os';
import { LetheError, errorChain } from '../../common/errors.js';
import { checkCoreDumps, checkKdump } from './dumps.js';
import { Host, quote, type CheckId, type HostAudit, type HostAuditOptions, type HostCheck } from './host.js';
import { checkMemlock, checkPtrace } from './limits.js';
import { checkHibernation, checkSwap } from './swap.js';
import { checkAgentUnit } from './unit.js';

export type { CheckId, CheckStatus, HostAudit, HostAuditOptions, HostCheck } from './host.js';
export { agentLockedBytes } from './limits.js';

interface CheckDef {
  id: CheckId;
  /** How a person looks for themself when the check cannot tell. */
  manual: string;
  run(h: Host): Omit<HostCheck, 'id'>;
}

const CHECKS: CheckDef[] = [
  { id: 'swap', manual: 'swapon --show; lsblk -o NAME,TYPE,FSTYPE', run: checkSwap },
  { id: 'core-dumps', manual: 'sysctl kernel.core_pattern fs.suid_dumpable; ulimit -c', run: checkCoreDumps },
  { id: 'hibernation', manual: 'cat /sys/power/state /sys/power/disk; swapon --show', run: checkHibernation },
  { id: 'ptrace-scope', manual: 'sysctl kernel.yama.ptrace_scope', run: checkPtrace },
  { id: 'memlock', manual: 'ulimit -l', run: checkMemlock },
  { id: 'kdump', manual: 'cat /sys/kernel/kexec_crash_loaded', run: checkKdump },
  { id: 'agent-unit', manual: 'systemctl --user cat lethe-agent@.service', run: checkAgentUnit },
];

/** A check that cannot read or make sense of a file says so as a warning, never throws. */
function runCheck(c: CheckDef, h: Host): HostCheck {
  try {
    const r = c.run(h);
    return { id: c.id, status: r.status, found: r.found, fix: r.fix };
  } catch (e) {
    return { id: c.id, status: 'warn', found: `could not tell: ${errorChain(e)}`, fix: `check by hand: ${c.manual}` };
  }
}

const PID_HINT = "give the process id of a running agent, e.g. from pgrep -f 'lethe agent'";

/** A process id as --pid gives it, or as a number; throws BAD_REQUEST, quoting it, for anything but digits. */
function processId(given: number | string): number {
  const text = String(given);
  if (!/^\d+$/.test(text)) throw new LetheError('BAD_REQUEST', `bad --pid: ${quote(text)}`, { hint: PID_HINT });
  return Number(text);
}

/** Runs every check; throws only for a pid that is not digits or names no process. */
export function auditHost(opts: HostAuditOptions = {}): HostAudit {
  const pid = opts.pid === undefined ? 'self' : processId(opts.pid);
  const h = new Host(opts.root ?? '/', pid, opts.home ?? os.homedir());
  if (pid !== 'self' && !h.exists(`${h.proc}/limits`)) {
    throw new LetheError('BAD_REQUEST', `no process ${pid}`, { hint: PID_HINT });
  }
  const checks = CHECKS.map((c) => runCheck(c, h));
  return { checks, ok: checks.every((c) => c.status !== 'fail') };
}

