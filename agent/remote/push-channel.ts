// The push channel's device end (docs/push.md): a WebSocket the agent keeps open
// to the server, so that a wipe, a revoke, a lease's end or a new policy arrives
// the moment IT gives it. Commands go to the lease keeper, which checks the
// server's signature and the command's number. The channel is opened again after
// any loss, with backoff and jitter, moving to the next server URL when one
// cannot be reached; heartbeats carry the same commands should it stay down.
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import type WebSocket from 'ws';
import { LetheError } from '../../common/errors.js';
import { writeFileAtomic } from '../../common/fsutil.js';
import type { DeviceClient } from './device-client.js';
import { backoffMs } from './backoff.js';

/** Reconnection pauses: from 250 ms, doubling to 10 s, each a random time up to the pause (full jitter). */
const RECONNECT_MIN_MS = 250;
const RECONNECT_MAX_MS = 10_000;
/** The server pings every 15 s; a channel silent for this long is taken as dead and opened again. */
const SILENCE_MS = 40_000;

export interface PushEvents {
  log: [string];
  /** The channel is open to the server at this URL (replica id from its hello). */
  open: [{ url: string; replica?: string }];
  closed: [];
}

export class PushChannel extends EventEmitter<PushEvents> {
  /** To which replica the channel is open (its hello). */
  replica?: string;
  /** Times the channel was opened. */
  opens = 0;
  private ws?: WebSocket;
  private stopped = false;
  private failures = 0;
  private silence?: NodeJS.Timeout;
  private retry?: NodeJS.Timeout;

  constructor(
    private readonly client: DeviceClient,
    private readonly onCommand: (signed: unknown, arrivedAt: number) => void,
  ) {
    super();
  }

  /** Whether the channel is open now. */
  get connected(): boolean {
    return this.ws !== undefined;
  }

  start(): void {
    void this.connect();
  }

  private async connect(): Promise<void> {
    if (this.stopped) return;
    let ws: WebSocket;
    try {
      ws = await this.client.openPush();
    } catch (e) {
      // A refusal of the device itself reached the lease keeper (the client's 'refused' event): no more tries.
      if (e instanceof LetheError && ['DEVICE_REVOKED', 'DEVICE_WIPED'].includes(e.code)) return this.stop();
      if (e instanceof LetheError && e.code === 'SERVER_UNREACHABLE') this.client.nextServer();
      this.failures++;
      if (this.failures === 1 || this.failures % 10 === 0) this.emit('log', `push channel: ${e instanceof Error ? e.message : String(e)}; trying again`);
      return this.again();
    }
    if (this.stopped) {
      ws.terminate();
      return;
    }
    this.ws = ws;
    this.failures = 0;
    this.opens++;
    this.alive();
    ws.on('ping', () => this.alive());
    ws.on('message', (data, binary) => {
      this.alive();
      const arrivedAt = Date.now();
      if (binary) return;
      let frame: { t?: string; replica?: string; body?: unknown; sig?: unknown };
      try {
        frame = JSON.parse(data.toString()) as typeof frame;
      } catch {
        this.emit('log', 'push channel: a frame that is not JSON; ignored');
        return;
      }
      if (frame.t === 'hello') {
        this.replica = frame.replica;
        this.emit('open', { url: this.client.http.baseUrl, replica: frame.replica });
      } else if (frame.t === 'cmd') this.onCommand({ body: frame.body, sig: frame.sig }, arrivedAt);
    });
    ws.on('error', () => {});
    ws.once('close', () => {
      clearTimeout(this.silence);
      this.replica = undefined;
      this.ws = undefined;
      this.emit('closed');
      this.again();
    });
  }

  /** The server is there: the silence timer starts again. */
  private alive(): void {
    clearTimeout(this.silence);
    this.silence = setTimeout(() => this.ws?.terminate(), SILENCE_MS);
    this.silence.unref();
  }

  private again(): void {
    if (this.stopped) return;
    clearTimeout(this.retry);
    this.retry = setTimeout(() => void this.connect(), Math.random() * backoffMs(RECONNECT_MIN_MS, RECONNECT_MAX_MS, this.failures));
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.retry);
    clearTimeout(this.silence);
    this.ws?.close(1000, 'agent stopping');
    this.ws = undefined;
  }
}

/** push.json in the device home: the highest command number carried out. Not secret. */
const seqFile = (home: string) => path.join(home, 'push.json');

export function readLastSeq(home: string): number {
  try {
    const n = (JSON.parse(fs.readFileSync(seqFile(home), 'utf8')) as { lastSeq?: unknown }).lastSeq;
    return typeof n === 'number' && Number.isSafeInteger(n) && n >= 0 ? n : 0;
  } catch {
    return 0;
  }
}

export function writeLastSeq(home: string, seq: number): void {
  if (!fs.existsSync(home)) return;
  writeFileAtomic(seqFile(home), JSON.stringify({ lastSeq: seq }) + '\n', 0o600);
}
