// What every host check shares: the kernel's files read under a root (so tests can
// lay out a /proc and /sys tree), the result types, and a few readers.
import fs from 'node:fs';
import path from 'node:path';
import { errorChain } from '../../common/errors.js';

export type CheckStatus = 'ok' | 'warn' | 'fail';
export type CheckId = 'swap' | 'core-dumps' | 'hibernation' | 'ptrace-scope' | 'memlock' | 'kdump' | 'agent-unit';

export interface HostCheck {
  id: CheckId;
  status: CheckStatus;
  found: string;
  /** What to change; empty when nothing needs to. */
  fix: string;
}

export interface HostAudit {
  checks: HostCheck[];
  /** No check failed (warnings do not count). */
  ok: boolean;
}

export interface HostAuditOptions {
  /** Where the kernel's /proc and /sys are found (default '/'). */
  root?: string;
  /** Whose resource limits and mounts to check: a process id, as a number or as the digits given to --pid (default: this process). */
  pid?: number | string;
  /** The home whose systemd user units are looked at (default: this user's). */
  home?: string;
}

/** Reads the kernel's files under a root; paths in messages are the kernel's own. */
export class Host {
  constructor(
    private readonly root: string,
    readonly pid: number | 'self',
    readonly home: string,
  ) {}

  private at(p: string): string {
    return path.join(this.root, p);
  }

  get proc(): string {
    return `/proc/${this.pid}`;
  }

  /** Whose limits the findings name. */
  get who(): string {
    return this.pid === 'self' ? 'this shell' : `process ${this.pid}`;
  }

  /** Said after a limit found fine in this process: the agent runs under its own unit and limits. */
  get agentMayDiffer(): string {
    return this.pid === 'self' ? " (the agent's may differ: --pid)" : '';
  }

  /** The file's text, or undefined when it does not exist; throws, naming it, when it cannot be read. */
  read(p: string): string | undefined {
    try {
      return fs.readFileSync(this.at(p), 'utf8');
    } catch (e) {
      if (missing(e)) return undefined;
      throw new Error(`cannot read ${p} (${codeOf(e)})`);
    }
  }

  list(dir: string): string[] {
    try {
      return fs.readdirSync(this.at(dir)).sort();
    } catch (e) {
      if (missing(e)) return [];
      throw new Error(`cannot list ${dir} (${codeOf(e)})`);
    }
  }

  exists(p: string): boolean {
    return fs.existsSync(this.at(p));
  }

  /** The last part of a symlink's target (sysfs links name devices that way). */
  linkName(p: string): string | undefined {
    try {
      return path.basename(fs.readlinkSync(this.at(p)));
    } catch {
      return undefined;
    }
  }
}

export const codeOf = (e: unknown) => (e as NodeJS.ErrnoException).code ?? errorChain(e);
export const missing = (e: unknown) => ['ENOENT', 'ENOTDIR'].includes(String((e as NodeJS.ErrnoException).code));
export const quote = (s: string) => `'${s.length > 40 ? s.slice(0, 40) + '…' : s}'`;

/** A one-line kernel value, or a clear error quoting what was there instead. */
export function oneOf<T extends string>(h: Host, p: string, allowed: readonly T[]): T | undefined {
  const text = h.read(p);
  if (text === undefined) return undefined;
  const v = text.trim();
  if (!(allowed as readonly string[]).includes(v)) throw new Error(`${p} holds ${quote(v)}, not one of ${allowed.join(', ')}`);
  return v as T;
}


export interface Limit {
  soft: number;
  hard: number;
}

/** One line of /proc/PID/limits, Infinity for unlimited. */
export function limitOf(h: Host, name: string): Limit {
  const file = `${h.proc}/limits`;
  const text = h.read(file);
  if (text === undefined) throw new Error(`no ${file}`);
  const line = text.split('\n').find((l) => l.startsWith(name));
  if (!line) throw new Error(`${file} has no '${name}' line`);
  const [soft, hard] = line.slice(name.length).trim().split(/\s+/).slice(0, 2).map((v) => {
    if (v === 'unlimited') return Infinity;
    if (!/^\d+$/.test(v)) throw new Error(`${file}: '${name}' is ${quote(v)}, not a number`);
    return Number(v);
  });
  if (hard === undefined) throw new Error(`${file}: '${name}' has no hard limit`);
  return { soft, hard };
}

