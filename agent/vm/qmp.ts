// A small client for the QEMU Machine Protocol over a unix socket: newline-delimited
// JSON, a greeting, capabilities negotiation, then commands answered by id and
// asynchronous events (docs/interop/qmp-spec.txt in QEMU).
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { LetheError } from '../../common/errors.js';

const CONNECT_RETRY_MS = 20;

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

/** QEMU answered a command with an error; `qmpClass` is QEMU's error class (e.g. GenericError). */
export class QmpError extends LetheError {
  readonly qmpClass: string;
  readonly command: string;

  constructor(command: string, qmpClass: string, desc: string) {
    super('VM_FAILED', `qemu refused '${command}': ${desc} (${qmpClass})`);
    this.name = 'QmpError';
    this.qmpClass = qmpClass;
    this.command = command;
  }
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (e: Error) => void;
}

export interface ConnectOptions {
  timeoutMs?: number;
  /** Stop retrying when this says QEMU is gone. */
  alive?: () => boolean;
}

/** Emits 'event' (QmpEvent) for every event, and 'close' when QEMU hangs up. */
export class QmpClient extends EventEmitter {
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private buffer = '';
  private closed = false;
  private greeting?: (msg: Record<string, unknown>) => void;

  private constructor(private readonly socket: net.Socket) {
    super();
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.received(chunk));
    socket.on('error', () => {}); // 'close' follows and fails what is pending
    socket.on('close', () => this.hungUp());
  }

  /**
   * Connects (retrying while QEMU creates the socket), reads the greeting and
   * negotiates capabilities.
   * @throws LetheError INTERNAL when QEMU does not answer in time or goes away.
   */
  static async connect(socketPath: string, opts: ConnectOptions = {}): Promise<QmpClient> {
    const deadline = Date.now() + (opts.timeoutMs ?? 10_000);
    const socket = await connectWithRetry(socketPath, deadline, opts.alive ?? (() => true));
    const client = new QmpClient(socket);
    try {
      await client.readGreeting(deadline - Date.now());
      await client.execute('qmp_capabilities');
      return client;
    } catch (e) {
      client.close();
      throw e;
    }
  }

  /**
   * Runs a command and returns its "return" value.
   * @throws QmpError when QEMU answers with an error, LetheError when the connection ends first.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closed) return Promise.reject(closedError(command));
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id }) + '\n');
    });
  }

  /** The next event named `name`; rejects after `timeoutMs` or when the connection ends. */
  waitForEvent(name: string, timeoutMs: number): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const onEvent = (e: QmpEvent) => e.event === name && done(() => resolve(e));
      const onClose = () => done(() => reject(closedError(`waiting for event ${name}`)));
      const timer = setTimeout(() => done(() => reject(new LetheError('VM_FAILED', `no QMP event ${name} from qemu within ${timeoutMs} ms`))), timeoutMs);
      const done = (settle: () => void) => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
        settle();
      };
      this.on('event', onEvent);
      this.once('close', onClose);
    });
  }

  get isClosed(): boolean {
    return this.closed;
  }

  close(): void {
    this.socket.destroy();
  }

  private readGreeting(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new LetheError('VM_FAILED', 'qemu sent no QMP greeting')), Math.max(timeoutMs, 1));
      this.greeting = (msg) => {
        clearTimeout(timer);
        if ('QMP' in msg) resolve();
        else reject(new LetheError('VM_FAILED', `qemu's QMP greeting is not one: ${JSON.stringify(msg).slice(0, 200)}`));
      };
      this.once('close', () => {
        clearTimeout(timer);
        reject(closedError('the greeting'));
      });
    });
  }

  private received(chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line) this.dispatch(line);
    }
  }

  private dispatch(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return; // QEMU only sends JSON; a torn line cannot be answered anyway
    }
    if (this.greeting) {
      const g = this.greeting;
      this.greeting = undefined;
      return g(msg);
    }
    if (typeof msg.event === 'string') return void this.emit('event', msg as unknown as QmpEvent);
    const pending = typeof msg.id === 'number' ? this.pending.get(msg.id) : undefined;
    if (!pending) return;
    this.pending.delete(msg.id as number);
    const err = msg.error as { class?: string; desc?: string } | undefined;
    if (err) pending.reject(new QmpError(pending.command, err.class ?? 'GenericError', err.desc ?? 'no description'));
    else pending.resolve(msg.return);
  }

  private hungUp(): void {
    if (this.closed) return;
    this.closed = true;
    for (const p of this.pending.values()) p.reject(closedError(p.command));
    this.pending.clear();
    this.emit('close');
  }
}

function closedError(what: string): LetheError {
  return new LetheError('VM_FAILED', `qemu closed its QMP connection before answering '${what}'`);
}

async function connectWithRetry(socketPath: string, deadline: number, alive: () => boolean): Promise<net.Socket> {
  for (;;) {
    try {
      return await connectOnce(socketPath);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      const retriable = code === 'ENOENT' || code === 'ECONNREFUSED';
      if (!retriable || !alive() || Date.now() >= deadline) {
        throw new LetheError('VM_FAILED', `cannot connect to qemu's QMP socket ${socketPath}`, { cause: e });
      }
      await sleep(CONNECT_RETRY_MS);
    }
  }
}

function connectOnce(socketPath: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.createConnection(socketPath);
    s.once('connect', () => {
      s.off('error', reject);
      resolve(s);
    });
    s.once('error', reject);
  });
}
