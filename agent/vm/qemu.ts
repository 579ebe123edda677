// Runs QEMU for a Lethe guest: the command line (RAM in a shared file, virtio disk,
// the org.lethe.hint port, QMP), the accelerator choice, the serial console as
// lines, and the rule that no QEMU outlives the process that started it.
import { spawn, type ChildProcess } from 'node:child_process';
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import { LetheError } from '../../common/errors.js';
import { HINT_PORT_NAME } from '../../common/hint-protocol.js';
import { QmpClient } from './qmp.js';

export const QEMU_BINARY = 'qemu-system-x86_64';
export const ACCEL_CHOICES = ['auto', 'kvm', 'tcg'] as const;
export type AccelChoice = (typeof ACCEL_CHOICES)[number];
export type Accel = Exclude<AccelChoice, 'auto'>;

/** A working KVM prints the probe line well within this; a broken one aborts or hangs. */
const KVM_PROBE_TIMEOUT_MS = 5_000;
/** What /init prints first with lethe.probe=1 (guest-driver/init.sh). */
const PROBE_LINE = 'LETHE-PROBE ok';
const CONSOLE_TAIL_LINES = 200;
const QUIT_TIMEOUT_MS = 10_000;
const OUTPUT_DRAIN_MS = 500;
const SETUP_HINT = 'run scripts/setup to install QEMU and the other Debian packages Lethe needs';

export interface VmSpec {
  kernel: string;
  initrd: string;
  /** The kernel command line. */
  append: string;
  memBytes: number;
  /** The file that is the guest's RAM (guest-physical address = file offset). */
  memPath: string;
  accel: Accel;
  qmpSocket: string;
  /** Raw disk image attached as virtio-blk (/dev/vda in the guest). */
  disk?: string;
  /** Or: the disk from an NBD export on a unix socket (the agent's), as /dev/vda. */
  nbdDisk?: { socket: string; export: string };
  /** Unix socket (QEMU listens) behind the org.lethe.hint virtio-serial port. */
  hintSocket?: string;
  cpus?: number;
  /** Start paused, waiting for QMP migrate-incoming (resume from a saved state). */
  incomingDefer?: boolean;
  /** Extra environment for QEMU (the userfaultfd shim's LD_PRELOAD and its settings). */
  env?: Record<string, string>;
  /** Keep the console's lines out of error messages: they can carry guest plaintext into logs (the agent's default). */
  hideConsole?: boolean;
  /** Drop to this user once QEMU has opened its files and sockets (`-runas`; for an agent running as root). */
  runAs?: QemuUser;
}

export interface QemuUser {
  name: string;
  uid: number;
  gid: number;
}

/**
 * The user an agent running as root starts QEMU as: $LETHE_QEMU_USER, else
 * `lethe-qemu` (scripts/setup and the package create it), else `nobody`.
 * Undefined for an agent that is not root: QEMU runs as the agent's own user.
 */
export function qemuUser(): QemuUser | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const passwd = fs.readFileSync('/etc/passwd', 'utf8').split('\n').map((l) => l.split(':'));
  const wanted = process.env.LETHE_QEMU_USER;
  for (const name of wanted ? [wanted] : ['lethe-qemu', 'nobody']) {
    const row = passwd.find((f) => f[0] === name);
    if (row) return { name, uid: Number(row[2]), gid: Number(row[3]) };
  }
  throw new LetheError('BAD_REQUEST', `no user ${wanted ?? 'lethe-qemu or nobody'} to run QEMU as`, {
    hint: 'create one (useradd --system --no-create-home --shell /usr/sbin/nologin lethe-qemu), or set LETHE_QEMU_USER',
  });
}

/** The QEMU arguments for a spec; the serial console is QEMU's stdout. */
export function qemuArgs(spec: VmSpec): string[] {
  const args = [
    // dump-guest-core=off: guest RAM is MADV_DONTDUMP, so a QEMU core dump leaves it out.
    '-machine', 'q35,memory-backend=ram0,dump-guest-core=off',
    '-accel', spec.accel,
    '-cpu', spec.accel === 'kvm' ? 'host' : 'max',
    '-smp', String(spec.cpus ?? 1),
    '-m', `${spec.memBytes / MiB}M`,
    '-object', `memory-backend-file,id=ram0,size=${spec.memBytes},mem-path=${spec.memPath},share=on`,
    '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
    '-chardev', 'stdio,id=console,signal=off', '-serial', 'chardev:console',
    '-qmp', `unix:${spec.qmpSocket},server=on,wait=off`,
    '-kernel', spec.kernel, '-initrd', spec.initrd, '-append', spec.append,
  ];
  if (spec.disk) args.push('-drive', `file=${spec.disk},format=raw,if=none,id=disk0`, '-device', 'virtio-blk-pci,drive=disk0');
  else if (spec.nbdDisk) {
    args.push(
      '-blockdev',
      `driver=nbd,server.type=unix,server.path=${spec.nbdDisk.socket},export=${spec.nbdDisk.export},node-name=disk0,cache.direct=off`,
      '-device',
      'virtio-blk-pci,drive=disk0',
    );
  }
  args.push('-device', 'virtio-serial-pci,id=vser0');
  if (spec.hintSocket) {
    args.push('-chardev', `socket,id=hint,path=${spec.hintSocket},server=on,wait=off`);
    args.push('-device', `virtserialport,bus=vser0.0,chardev=hint,name=${HINT_PORT_NAME}`);
  }
  args.push('-device', 'virtio-balloon-pci,id=balloon0');
  if (spec.incomingDefer) args.push('-incoming', 'defer');
  // Seccomp: no obsolete or scheduling system calls, and no set*id but for -runas's own drop
  // (QEMU drops after its seccomp filter is in). spawn stays: the state streams through exec:.
  args.push('-sandbox', `on,obsolete=deny,resourcecontrol=deny${spec.runAs ? '' : ',elevateprivileges=deny'}`);
  if (spec.runAs) args.push('-runas', spec.runAs.name);
  return args;
}

const MiB = 1024 * 1024;

export interface WorkloadParams {
  mib: number;
  secret?: string;
  disk?: 'write' | 'verify';
  intervalMs?: number;
}

/** The kernel command line for the test guest's /init (guest-driver/init.sh). */
export function guestCmdline(p: WorkloadParams, extra: string[] = []): string {
  const words = ['console=ttyS0', 'panic=-1', 'quiet', `lethe.mib=${p.mib}`];
  if (p.secret) words.push(`lethe.secret=${p.secret}`);
  if (p.disk) words.push(`lethe.disk=${p.disk}`);
  if (p.intervalMs !== undefined) words.push(`lethe.interval=${p.intervalMs}`);
  return [...words, ...extra].join(' ');
}

// ---- accelerator ----

let kvmProbe: Promise<boolean> | undefined;

/**
 * The accelerator to use: "auto" takes KVM only when it boots the test guest's
 * kernel to /init; this machine's /dev/kvm (a nested PVM module) makes QEMU 7.2
 * abort with -cpu host ("failed to set MSR 0x10a") and hang with other CPU models.
 * @throws LetheError CONFIG when KVM is asked for and /dev/kvm cannot be opened.
 */
export async function chooseAccel(choice: AccelChoice, guest: { kernel: string; initrd: string }): Promise<Accel> {
  if (choice === 'tcg') return 'tcg';
  if (choice === 'kvm') {
    if (!kvmDeviceUsable()) {
      throw new LetheError('CONFIG', 'KVM is not available: /dev/kvm cannot be opened for reading and writing', {
        hint: 'use --accel tcg, or add this user to the kvm group',
      });
    }
    return 'kvm';
  }
  kvmProbe ??= kvmDeviceUsable() ? kvmBootsGuest(guest) : Promise.resolve(false);
  return (await kvmProbe) ? 'kvm' : 'tcg';
}

function kvmDeviceUsable(): boolean {
  try {
    fs.accessSync('/dev/kvm', fs.constants.R_OK | fs.constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/** Boots the guest under KVM with lethe.probe=1 and waits for its probe line. */
function kvmBootsGuest(guest: { kernel: string; initrd: string }): Promise<boolean> {
  const args = [
    '-machine', 'q35', '-accel', 'kvm', '-cpu', 'host', '-m', '128M',
    '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot', '-serial', 'stdio',
    '-kernel', guest.kernel, '-initrd', guest.initrd, '-append', 'console=ttyS0 panic=-1 quiet lethe.probe=1',
  ];
  return new Promise((resolve) => {
    const p = spawn(QEMU_BINARY, args, { stdio: ['ignore', 'pipe', 'ignore'] });
    const finish = (ok: boolean) => {
      clearTimeout(timer);
      if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
      resolve(ok);
    };
    const timer = setTimeout(() => finish(false), KVM_PROBE_TIMEOUT_MS);
    let out = '';
    p.stdout.on('data', (d) => {
      out += d;
      if (out.includes(PROBE_LINE)) finish(true);
    });
    p.on('error', () => finish(false));
    p.on('exit', () => finish(out.includes(PROBE_LINE)));
  });
}

// ---- running QEMU ----

const live = new Set<ChildProcess>();

/**
 * The pids of the QEMUs this process started with Vm.start that have not exited. A
 * pid is in it from the moment spawn() returns, before QEMU can connect anywhere.
 */
export function runningQemuPids(): Set<number> {
  const pids = new Set<number>();
  for (const p of live) if (p.pid !== undefined && p.exitCode === null && p.signalCode === null) pids.add(p.pid);
  return pids;
}

/** Kills every QEMU this process started; runs on exit and on an unhandled SIGINT/SIGTERM/SIGHUP. */
function killAll(): void {
  for (const p of live) p.kill('SIGKILL');
}

/**
 * A signal nobody else handles would end the process without its 'exit' event:
 * kill QEMU, then die of the signal as before. When the process handles the
 * signal itself (the agent shuts down cleanly), it owns QEMU's end; 'exit' is
 * still the last resort.
 */
function onSignal(signal: NodeJS.Signals): void {
  if (process.listenerCount(signal) > 1) return;
  killAll();
  untrackSignals();
  process.kill(process.pid, signal);
}

const SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

function track(p: ChildProcess): void {
  if (live.size === 0) {
    process.on('exit', killAll);
    for (const s of SIGNALS) process.on(s, onSignal);
  }
  live.add(p);
  const gone = () => {
    live.delete(p);
    if (live.size === 0) untrackSignals();
  };
  p.once('exit', gone);
  p.once('error', gone); // not started at all (e.g. not installed)
}

function untrackSignals(): void {
  process.off('exit', killAll);
  for (const s of SIGNALS) process.off(s, onSignal);
}

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** A running QEMU: its console as lines, its QMP connection, and its end. */
export class Vm {
  readonly qmp: QmpClient;
  readonly exited: Promise<ExitStatus>;
  /** performance.now() when QEMU was spawned. */
  readonly startedAt: number;
  private readonly proc: ChildProcess;
  private readonly console: LineLog;
  private readonly stderr: LineLog;
  private readonly runDir: string;
  /** The console as error messages may quote it (null: not at all, VmSpec.hideConsole). */
  private readonly shownConsole: LineLog | null;
  private status?: ExitStatus;

  /** How QEMU ended, once it has. */
  get exitStatus(): ExitStatus | undefined {
    return this.status;
  }

  private constructor(parts: { proc: ChildProcess; qmp: QmpClient; exited: Promise<ExitStatus>; console: LineLog; stderr: LineLog; runDir: string; startedAt: number; hideConsole?: boolean }) {
    this.proc = parts.proc;
    this.shownConsole = parts.hideConsole ? null : parts.console;
    this.qmp = parts.qmp;
    this.exited = parts.exited.then((s) => (this.status = s));
    this.console = parts.console;
    this.stderr = parts.stderr;
    this.runDir = parts.runDir;
    this.startedAt = parts.startedAt;
  }

  /**
   * Starts QEMU and connects to its QMP socket; `runDir` holds the sockets and is
   * removed when the VM ends.
   * @throws LetheError CONFIG when QEMU is not installed, INTERNAL (with QEMU's
   * messages and the console's last lines) when it exits before QMP answers.
   */
  static async start(spec: VmSpec, runDir: string): Promise<Vm> {
    const startedAt = performance.now();
    const proc = spawn(QEMU_BINARY, qemuArgs(spec), { stdio: ['pipe', 'pipe', 'pipe'], env: spec.env ? { ...process.env, ...spec.env } : process.env });
    track(proc);
    const console = new LineLog(proc.stdout!);
    const stderr = new LineLog(proc.stderr!);
    const spawnError = new Promise<Error>((resolve) => proc.once('error', resolve));
    const exited = waitForExit(proc, [console, stderr]);
    let gone = false;
    void exited.then(() => (gone = true));
    try {
      const qmp = await Promise.race([
        QmpClient.connect(spec.qmpSocket, { alive: () => !gone }),
        spawnError.then((e) => Promise.reject(spawnFailure(e))),
      ]);
      return new Vm({ proc, qmp, exited, console, stderr, runDir, startedAt, hideConsole: spec.hideConsole });
    } catch (e) {
      proc.kill('SIGKILL');
      const status = await Promise.race([exited, spawnError.then(() => undefined)]);
      fs.rmSync(runDir, { recursive: true, force: true });
      if (e instanceof LetheError && e.code === 'CONFIG') throw e;
      throw new LetheError('VM_FAILED', describeEnd('qemu did not start', status, stderr, spec.hideConsole ? null : console), { cause: e });
    }
  }

  /** What QEMU said on stderr and printed last on the console, for an error message. */
  describe(headline: string, status?: ExitStatus): string {
    return describeEnd(headline, status, this.stderr, this.shownConsole);
  }

  /** Calls `fn` with every console line from now on. */
  onConsoleLine(fn: (line: string) => void): void {
    this.console.on('line', fn);
  }

  /** QEMU's process id. */
  get pid(): number {
    return this.proc.pid ?? -1;
  }

  /** The last `n` console lines. */
  consoleTail(n = 20): string[] {
    return this.console.tail(n);
  }

  /**
   * Waits for a console line matching `re` (lines already seen count).
   * @throws LetheError INTERNAL when QEMU exits first, or after `timeoutMs` (QEMU is
   * then killed); the message names `what` and carries QEMU's messages and the last
   * console lines.
   */
  waitForConsole(re: RegExp, timeoutMs: number, what: string): Promise<RegExpExecArray> {
    const seen = this.console.find(re);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const onLine = (line: string) => {
        const m = re.exec(line);
        if (m) done(() => resolve(m));
      };
      const onTimeout = () => {
        done(() => reject(new LetheError('VM_FAILED', describeEnd(`timed out after ${Math.round(timeoutMs / 1000)} s waiting for ${what} (qemu killed)`, undefined, this.stderr, this.shownConsole))));
        void this.kill();
      };
      const onExit = (s: ExitStatus) => done(() => reject(new LetheError('VM_FAILED', describeEnd(`qemu exited while waiting for ${what}`, s, this.stderr, this.shownConsole))));
      let settled = false;
      const done = (settle: () => void) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.console.off('line', onLine);
        settle();
      };
      const timer = setTimeout(onTimeout, timeoutMs);
      this.console.on('line', onLine);
      void this.exited.then(onExit);
    });
  }

  /**
   * Saves the device state, without the shared RAM (x-ignore-shared), to a migration
   * URI (`exec:…`, `unix:…`) and waits for it to complete. Call with the vCPUs stopped.
   * @throws LetheError INTERNAL when QEMU refuses, the migration fails or takes over `timeoutMs`
   */
  async saveState(uri: string, timeoutMs = 60_000): Promise<void> {
    await this.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
    await this.qmp.execute('migrate', { uri });
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const info = await this.qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
      if (info.status === 'completed') return;
      if (info.status === 'failed' || info.status === 'cancelled') {
        throw new LetheError('VM_FAILED', `saving the device state failed: ${info['error-desc'] ?? info.status}`);
      }
      if (Date.now() > deadline) throw new LetheError('VM_FAILED', `saving the device state took over ${timeoutMs / 1000} s`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** Asks QEMU to quit over QMP, and kills it if it has not exited within 10 s. */
  async quit(): Promise<ExitStatus> {
    if (!this.status) {
      const timer = setTimeout(() => this.proc.kill('SIGKILL'), QUIT_TIMEOUT_MS);
      await this.qmp.execute('quit').catch(() => {}); // QEMU may hang up before it answers
      await this.exited;
      clearTimeout(timer);
    }
    return this.cleanUp();
  }

  /** Kills QEMU (SIGKILL) and waits for it. */
  async kill(): Promise<ExitStatus> {
    if (!this.status) this.proc.kill('SIGKILL');
    await this.exited;
    return this.cleanUp();
  }

  private cleanUp(): ExitStatus {
    this.qmp.close();
    fs.rmSync(this.runDir, { recursive: true, force: true });
    return this.status!;
  }
}

/** A private directory for a VM's sockets; short, as unix socket paths must be under 108 bytes. */
export function makeRunDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'lethe-vm-'));
}

/** A stream read as lines, keeping the last ones; emits 'line' for each and 'end'. */
class LineLog extends EventEmitter {
  private readonly lines: string[] = [];
  ended = false;

  constructor(stream: NodeJS.ReadableStream) {
    super();
    const rl = createInterface({ input: stream, crlfDelay: Infinity });
    rl.on('line', (raw) => {
      const line = raw.replace(/\r$/, '');
      this.lines.push(line);
      if (this.lines.length > CONSOLE_TAIL_LINES) this.lines.shift();
      this.emit('line', line);
    });
    rl.on('close', () => {
      this.ended = true;
      this.emit('end');
    });
  }

  tail(n: number): string[] {
    return this.lines.slice(-n);
  }

  find(re: RegExp): RegExpExecArray | undefined {
    for (const l of this.lines) {
      const m = re.exec(l);
      if (m) return m;
    }
    return undefined;
  }
}

/**
 * QEMU's exit status, once its output has been read too (so error messages hold
 * the last lines), or shortly after exit when a child of QEMU (the "exec:"
 * migration's shell) still holds a pipe.
 */
async function waitForExit(proc: ChildProcess, logs: LineLog[]): Promise<ExitStatus> {
  const status = await new Promise<ExitStatus>((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
  const drained = Promise.all(logs.map((l) => (l.ended ? undefined : new Promise((r) => l.once('end', r)))));
  await Promise.race([drained, sleep(OUTPUT_DRAIN_MS)]);
  return status;
}

function spawnFailure(e: Error): LetheError {
  if ((e as NodeJS.ErrnoException).code === 'ENOENT') {
    return new LetheError('CONFIG', `${QEMU_BINARY} is not installed`, { hint: SETUP_HINT });
  }
  return new LetheError('VM_FAILED', `cannot run ${QEMU_BINARY}`, { cause: e });
}

/** "HEADLINE: qemu exited with status 1", then QEMU's own messages and the console's last lines (unless `console` is null). */
function describeEnd(headline: string, status: ExitStatus | undefined, stderr: LineLog, console: LineLog | null): string {
  const how = status ? (status.signal ? `qemu was killed by ${status.signal}` : `qemu exited with status ${status.code}`) : '';
  const lines = [how ? `${headline}: ${how}` : headline];
  for (const l of stderr.tail(5)) lines.push(`  qemu: ${l}`);
  if (!console) {
    lines.push('  (the guest console is not shown: it can carry guest data; the agent shows it with --log-guest-console)');
    return lines.join('\n');
  }
  const tail = console.tail(12);
  // A panic's stack dump pushes its reason out of the tail; the reason is the useful line.
  const panic = console.find(/Kernel panic - not syncing.*/)?.[0];
  if (panic && !tail.some((l) => l.includes(panic))) lines.push(`  kernel: ${panic}`);
  lines.push(tail.length ? '  last console lines:' : '  the console printed nothing');
  for (const l of tail) lines.push(`    ${l}`);
  return lines.join('\n');
}
