// The host side of the guest hint channel (docs/guest-hints.md): a client of the unix
// socket behind QEMU's org.lethe.hint port that sends the guest driver its policy and
// turns what the driver says into events. HintParser is the pure part: bytes in,
// messages out, whatever the chunking.
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { LetheError } from '../../common/errors.js';
import {
  HINT_DRIVER_NAME,
  HINT_MAX_LINE,
  HINT_PROTOCOL_VERSION,
  policyLine,
  type FrameRun,
  type HintPolicy,
  type HintReport,
} from '../../common/hint-protocol.js';

export {
  HINT_DRIVER_NAME,
  HINT_MAX_INTERVAL_MS,
  HINT_MAX_LINE,
  HINT_MAX_NAMES,
  HINT_MIN_INTERVAL_MS,
  HINT_PROTOCOL_VERSION,
  percentEncode,
  policyLine,
  type FrameRun,
  type HintPolicy,
  type HintReport,
} from '../../common/hint-protocol.js';

// ---- implementation constants ----

const RECONNECT_FIRST_MS = 100;
const RECONNECT_MAX_MS = 2_000;
/** A driver that was scanning while the host reconnected may not have noticed: ask it for a hello. */
const HELLO_NUDGE_MS = 3_000;
export const DROP_CACHE_TIMEOUT_MS = 30_000;
/** Runs in one report: more than a fully fragmented 8 GiB guest has; a longer block is dropped. */
const MAX_REPORT_RUNS = 1 << 20;

export type HintMessage =
  | { kind: 'hello'; driver: string; version: number }
  | { kind: 'ok'; what: string }
  | { kind: 'error'; reason: string }
  | { kind: 'dropped'; files: number; pages: number }
  | { kind: 'report'; report: HintReport };

export interface HintCounters {
  /** Lines over HINT_MAX_LINE, ignored. */
  overlong: number;
  /** Lines that are not the protocol's, ignored. */
  garbage: number;
  /** Report blocks dropped: cut off, out of order, or with totals that do not add up. */
  brokenReports: number;
}

/** What the guest says when a host command was wrong. */
export class GuestHintError extends Error {
  constructor(readonly reason: string) {
    super(`the guest driver refused a hint command: ${reason}`);
    this.name = 'GuestHintError';
  }
}

// ---- the guest's lines ----

const DECIMAL = /^(?:0|[1-9][0-9]{0,15})$/;

function decimal(s: string | undefined): number | undefined {
  if (s === undefined || !DECIMAL.test(s)) return undefined;
  const n = Number(s);
  return Number.isSafeInteger(n) ? n : undefined;
}

interface OpenReport {
  seq: number;
  sensitive: FrameRun[];
  free: FrameRun[];
  totals: { s: number; f: number };
  broken: boolean;
}

/** Turns the guest driver's bytes into messages; feed it chunks as they come. */
export class HintParser {
  readonly counters: HintCounters = { overlong: 0, garbage: 0, brokenReports: 0 };
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private skipping = false;
  private open?: OpenReport;

  /** The messages completed by this chunk, in order. */
  push(chunk: Uint8Array): HintMessage[] {
    const out: HintMessage[] = [];
    let from = 0;
    for (let nl = chunk.indexOf(0x0a); nl >= 0; from = nl + 1, nl = chunk.indexOf(0x0a, from)) {
      const line = this.take(chunk.subarray(from, nl));
      if (line !== undefined) this.line(line, out);
    }
    this.keep(chunk.subarray(from));
    return out;
  }

  /** Forgets a partial line and an open report (the connection ended); the report counts as broken. */
  reset(): void {
    if (this.open) this.counters.brokenReports++;
    this.open = undefined;
    this.pending = [];
    this.pendingBytes = 0;
    this.skipping = false;
  }

  /** The whole line ending here, or undefined when it was over the limit. */
  private take(tail: Uint8Array): string | undefined {
    const over = this.skipping || this.pendingBytes + tail.length + 1 > HINT_MAX_LINE;
    const bytes = over ? undefined : Buffer.concat([...this.pending, tail]);
    this.pending = [];
    this.pendingBytes = 0;
    this.skipping = false;
    if (!bytes) {
      this.counters.overlong++;
      if (this.open) this.open.broken = true;
      return undefined;
    }
    return bytes.toString('latin1');
  }

  private keep(rest: Uint8Array): void {
    if (this.skipping || rest.length === 0) return;
    if (this.pendingBytes + rest.length + 1 > HINT_MAX_LINE) {
      this.skipping = true;
      this.pending = [];
      this.pendingBytes = 0;
      return;
    }
    this.pending.push(Buffer.from(rest)); // a copy: the socket may reuse its buffer
    this.pendingBytes += rest.length;
  }

  private line(text: string, out: HintMessage[]): void {
    const w = text.split(' ');
    if (!/^[\x20-\x7e]*$/.test(text)) return this.garbage();
    if ((w[0] === 's' || w[0] === 'f') && w.length === 3) return this.run(w[0], decimal(w[1]), decimal(w[2]));
    if (w[0] === 'report') return this.reportLine(w, out);
    const m = message(text, w);
    if (m) out.push(m);
    else this.garbage();
  }

  private garbage(): void {
    this.counters.garbage++;
    if (this.open) this.open.broken = true;
  }

  private run(kind: 's' | 'f', pfn: number | undefined, count: number | undefined): void {
    const r = this.open;
    if (!r) return this.garbage();
    const runs = kind === 's' ? r.sensitive : r.free;
    const last = runs[runs.length - 1];
    const ok = pfn !== undefined && count !== undefined && count > 0 && Number.isSafeInteger(pfn + count);
    // Runs come sorted and merged; anything else is not what the driver writes.
    if (!ok || (last && pfn < last[0] + last[1]) || r.sensitive.length + r.free.length >= MAX_REPORT_RUNS) {
      r.broken = true;
      return;
    }
    runs.push([pfn, count]);
    r.totals[kind] += count;
  }

  private reportLine(w: string[], out: HintMessage[]): void {
    const seq = decimal(w[1]);
    if (seq !== undefined && w[2] === 'begin' && w.length === 3) {
      if (this.open) this.counters.brokenReports++;
      this.open = { seq, sensitive: [], free: [], totals: { s: 0, f: 0 }, broken: false };
      return;
    }
    const end = seq !== undefined && w[2] === 'end' && w.length === 6 ? endFields(w.slice(3)) : undefined;
    if (!end) return this.garbage();
    const r = this.open;
    this.open = undefined;
    if (!r || r.broken || r.seq !== seq || r.totals.s !== end.sensitive || r.totals.f !== end.free) {
      this.counters.brokenReports++;
      return;
    }
    out.push({
      kind: 'report',
      report: { seq, sensitive: r.sensitive, free: r.free, sensitiveFrames: end.sensitive, freeFrames: end.free, procs: end.procs },
    });
  }
}

/** "sensitive=N free=N procs=N", in that order. */
function endFields(f: string[]): { sensitive: number; free: number; procs: number } | undefined {
  const value = (field: string | undefined, key: string) => (field?.startsWith(`${key}=`) ? decimal(field.slice(key.length + 1)) : undefined);
  const [sensitive, free, procs] = [value(f[0], 'sensitive'), value(f[1], 'free'), value(f[2], 'procs')];
  return sensitive === undefined || free === undefined || procs === undefined ? undefined : { sensitive, free, procs };
}

/** A line other than a report's, or undefined when it is not the protocol's. */
function message(text: string, w: string[]): HintMessage | undefined {
  if (w[0] === 'hello' && w.length === 3 && w[1] === HINT_DRIVER_NAME) {
    const version = decimal(w[2]);
    return version === undefined || version === 0 ? undefined : { kind: 'hello', driver: w[1], version };
  }
  if (w[0] === 'ok' && w.length === 2 && w[1] !== '') return { kind: 'ok', what: w[1] };
  if (w[0] === 'error' && text.length > 'error '.length) return { kind: 'error', reason: text.slice('error '.length) };
  if (w[0] === 'dropped' && w.length === 3 && w[1].startsWith('files=') && w[2].startsWith('pages=')) {
    const files = decimal(w[1].slice('files='.length));
    const pages = decimal(w[2].slice('pages='.length));
    return files === undefined || pages === undefined ? undefined : { kind: 'dropped', files, pages };
  }
  return undefined;
}

// ---- the channel ----

interface PendingDrop {
  resolve(r: { files: number; pages: number }): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout;
}

/**
 * The agent's end of the hint channel. Events:
 *   'connect'            the socket to QEMU is open
 *   'disconnect'         it closed (the channel reconnects by itself until close())
 *   'hello'  ({ driver, version })   the driver (re)started or saw this host arrive; the policy has been sent
 *   'ok'     (what)      the driver took a command ('policy')
 *   'report' (HintReport)            a complete report made under the current policy
 *   'error'  (GuestHintError)        the driver refused a line (only emitted when someone listens)
 */
export class HintChannel extends EventEmitter {
  private policy: HintPolicy;
  private line: string;
  private readonly parser = new HintParser();
  private socket?: net.Socket;
  private up = false;
  private closed = false;
  private started = false;
  private retryMs = RECONNECT_FIRST_MS;
  private retryTimer?: NodeJS.Timeout;
  private nudgeTimer?: NodeJS.Timeout;
  private helloSeen = false;
  private failureLogged = false;
  private drops: PendingDrop[] = [];
  /** Policies sent on this connection and not yet answered. */
  private unanswered = 0;
  /**
   * Whether the driver took the last policy sent on this connection (answers come in
   * order, so: the answer that left none unanswered was `ok policy`). Until then its
   * reports follow another policy: one it kept from an earlier connection, or none.
   */
  private policyTaken = false;
  private reports = 0;
  private staleReports = 0;
  private connects = 0;
  /** Hellos: one per connection, and one each time the driver (re)starts inside a running guest. */
  private hellos = 0;

  /** @throws LetheError BAD_REQUEST when the policy breaks a limit of the protocol. */
  constructor(
    private readonly socketPath: string,
    policy: HintPolicy,
    private readonly log: (line: string) => void = () => {},
  ) {
    super();
    this.line = policyLine(policy);
    this.policy = clonePolicy(policy);
  }

  /** Connects, and keeps reconnecting whenever the socket is missing or drops, until close(). */
  start(): void {
    if (this.started || this.closed) return;
    this.started = true;
    this.connect();
  }

  /** True while the socket to QEMU is open. */
  get connected(): boolean {
    return this.up;
  }

  get currentPolicy(): HintPolicy {
    return clonePolicy(this.policy);
  }

  get counters(): HintCounters & { reports: number; staleReports: number; connects: number; hellos: number } {
    return { ...this.parser.counters, reports: this.reports, staleReports: this.staleReports, connects: this.connects, hellos: this.hellos };
  }

  /**
   * Replaces the policy, and sends it now when connected (else on the next hello).
   * @throws LetheError BAD_REQUEST when the policy breaks a limit of the protocol.
   */
  setPolicy(p: HintPolicy): void {
    this.line = policyLine(p);
    this.policy = clonePolicy(p);
    this.sendPolicy();
  }

  /** Asks for a report now; false when not connected. */
  requestReport(): boolean {
    return this.send('report');
  }

  /**
   * Asks the driver to drop the page cache of the policy's files.
   * @throws LetheError INTERNAL when not connected, when the connection drops first,
   * or when no answer comes within timeoutMs.
   */
  dropCache(timeoutMs = DROP_CACHE_TIMEOUT_MS): Promise<{ files: number; pages: number }> {
    if (!this.up) {
      return Promise.reject(
        new LetheError('VM_FAILED', 'cannot drop the guest page cache: the guest driver is not connected', {
          hint: "check that the guest runs lethe-guestd (its console says 'LETHE-GUESTD started')",
        }),
      );
    }
    return new Promise((resolve, reject) => {
      const entry: PendingDrop = {
        resolve,
        reject,
        timer: setTimeout(() => {
          this.drops = this.drops.filter((d) => d !== entry);
          reject(new LetheError('VM_FAILED', `the guest driver did not answer drop-cache within ${timeoutMs / 1000} s`));
        }, timeoutMs),
      };
      this.drops.push(entry);
      this.send('drop-cache');
    });
  }

  /** Disconnects for good; pending drop-cache calls fail. */
  close(): void {
    this.closed = true;
    clearTimeout(this.retryTimer);
    clearTimeout(this.nudgeTimer);
    this.socket?.destroy();
    this.socket = undefined;
    this.failDrops('the hint channel was closed before the guest driver answered drop-cache');
  }

  // ---- connection ----

  private connect(): void {
    if (this.closed) return;
    const s = net.createConnection(this.socketPath);
    this.socket = s;
    s.on('connect', () => this.socketOpened(s));
    s.on('data', (d: Buffer) => this.received(s, d));
    s.on('error', (e: NodeJS.ErrnoException) => {
      if (!this.up && !this.failureLogged) {
        this.failureLogged = true;
        this.log(`hints: cannot connect to ${this.socketPath} (${e.code ?? e.message}); retrying`);
      }
    });
    s.on('close', () => this.socketClosed(s));
  }

  /** Call after the socket to QEMU is open. */
  private socketOpened(s: net.Socket): void {
    if (s !== this.socket) return;
    this.up = true;
    this.connects++;
    this.failureLogged = false;
    this.retryMs = RECONNECT_FIRST_MS;
    this.helloSeen = false;
    this.unanswered = 0;
    this.policyTaken = false;
    this.nudgeTimer = setTimeout(() => {
      if (!this.helloSeen) this.send('hello');
    }, HELLO_NUDGE_MS);
    this.emit('connect');
  }

  /** Call after the socket closed, whether it ever opened or not. */
  private socketClosed(s: net.Socket): void {
    if (s !== this.socket) return;
    const wasUp = this.up;
    this.up = false;
    this.socket = undefined;
    clearTimeout(this.nudgeTimer);
    this.parser.reset();
    this.failDrops('the guest driver went away before answering drop-cache');
    if (wasUp) {
      this.log('hints: the hint socket closed; reconnecting');
      this.emit('disconnect');
    }
    if (this.closed) return;
    this.retryTimer = setTimeout(() => this.connect(), this.retryMs);
    this.retryMs = Math.min(this.retryMs * 2, RECONNECT_MAX_MS);
  }

  private sendPolicy(): void {
    if (!this.send(this.line)) return;
    this.unanswered++;
    this.policyTaken = false;
  }

  private send(line: string): boolean {
    if (!this.up || !this.socket) return false;
    this.socket.write(`${line}\n`);
    return true;
  }

  // ---- messages ----

  private received(s: net.Socket, d: Buffer): void {
    if (s !== this.socket) return;
    for (const m of this.parser.push(d)) {
      try {
        this.dispatch(m);
      } catch (e) {
        // A listener's bug must not take the socket handler down with it.
        this.log(`hints: a listener failed on '${m.kind}': ${e instanceof Error ? e.message : String(e)}`);
      }
    }
  }

  private dispatch(m: HintMessage): void {
    switch (m.kind) {
      case 'hello':
        return this.hello(m.driver, m.version);
      case 'ok':
        if (m.what === 'policy') this.policyAnswered(true);
        this.emit('ok', m.what);
        return;
      case 'report':
        return this.report(m.report);
      case 'dropped':
        return this.dropped(m.files, m.pages);
      case 'error':
        // Only policy lines can be refused (the others are fixed words), and ours are checked first.
        this.policyAnswered(false);
        if (this.listenerCount('error') > 0) this.emit('error', new GuestHintError(m.reason));
        else this.log(`hints: the guest driver refused a command: ${m.reason}`);
    }
  }

  /** Call after the driver said hello: it has a policy only if we send it one. */
  private hello(driver: string, version: number): void {
    this.helloSeen = true;
    this.hellos++;
    if (version !== HINT_PROTOCOL_VERSION) {
      this.log(`hints: the guest driver speaks protocol version ${version}, this agent ${HINT_PROTOCOL_VERSION}; not sending it a policy`);
    } else {
      this.sendPolicy();
    }
    this.emit('hello', { driver, version });
  }

  /** Call after the driver answered a policy line: it took it (`ok policy`) or refused it (`error`). */
  private policyAnswered(taken: boolean): void {
    if (this.unanswered === 0) return; // not an answer to a line of this connection
    this.unanswered--;
    if (this.unanswered === 0 && taken) this.policyTaken = true;
  }

  /** Reports made under another policy (before the driver took ours on this connection) are dropped. */
  private report(r: HintReport): void {
    if (!this.policyTaken) {
      this.staleReports++;
      return;
    }
    this.reports++;
    this.emit('report', r);
  }

  private dropped(files: number, pages: number): void {
    const d = this.drops.shift();
    if (!d) return;
    clearTimeout(d.timer);
    d.resolve({ files, pages });
  }

  private failDrops(message: string): void {
    const drops = this.drops;
    this.drops = [];
    for (const d of drops) {
      clearTimeout(d.timer);
      d.reject(new LetheError('VM_FAILED', message));
    }
  }
}

function clonePolicy(p: HintPolicy): HintPolicy {
  return { intervalMs: p.intervalMs, processes: [...p.processes], cgroups: [...p.cgroups], files: [...p.files] };
}
