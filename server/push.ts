// The push channel's server end (docs/push.md). A device opens a WebSocket at
// /v1/device/push with a signed GET, like any device call; this replica keeps it
// and sends the device each command the moment one is issued, on any replica:
// issuing a command notifies the channel `lethe_push` (NOTIFY in PostgreSQL, in
// process with SQLite), and the replica holding the device's socket sends what
// the device has not acknowledged. Acknowledgements come back on the socket (or
// as the signed HTTP call). Replicas record which devices they hold, and
// refresh their own row every few seconds, so any replica can say who is
// connected now.
import { STATUS_CODES, type IncomingMessage } from 'node:http';
import type https from 'node:https';
import type { Duplex } from 'node:stream';
import { WebSocketServer, type RawData, type WebSocket } from 'ws';
import { iso } from '../common/duration.js';
import { errorChain, LetheError } from '../common/errors.js';
import { AckFrame, PUSH_PATH, type ServerFrame } from '../common/push.js';
import { toLetheError } from './app.js';
import { signatureHeaders, verifiedDevice } from './auth.js';
import { newId, type Ctx } from './context.js';
import { ackCommand, getDevice, markDelivered, pendingCommands, PUSH_CHANNEL, signedCommand } from './devices.js';

/** How often a replica pings each socket and refreshes its own row. */
export const PUSH_PING_MS = 15_000;
/** How often a replica says it is alive; a replica silent for 3 of these holds no one. */
export const REPLICA_BEAT_MS = 5_000;
export const REPLICA_DEAD_MS = 3 * REPLICA_BEAT_MS;
/** The largest frame a device may send (an acknowledgement is a few hundred bytes). */
const MAX_FRAME = 4096;

interface Session {
  id: string;
  deviceId: string;
  ws: WebSocket;
  /** The highest command number sent on this socket. */
  sentSeq: number;
  /** Sends to this socket run one after another. */
  queue: Promise<void>;
  alive: boolean;
}

export class PushHub {
  readonly replica = newId('rep');
  private readonly wss = new WebSocketServer({ noServer: true, maxPayload: MAX_FRAME, perMessageDeflate: false });
  private readonly sessions = new Map<string, Set<Session>>();
  private stopListening?: () => Promise<void>;
  private beat?: NodeJS.Timeout;
  private pinger?: NodeJS.Timeout;
  private closed = false;

  constructor(private readonly ctx: Ctx) {
    ctx.metrics.describe('lethe_push_connected', 'devices with a push channel open on this replica');
    ctx.metrics.describe('lethe_push_sent_total', 'commands sent on push channels');
    ctx.metrics.gauge(() => [`lethe_push_connected ${this.connected()}`]);
  }

  /** Devices with a socket open here. */
  connected(): number {
    return this.sessions.size;
  }

  async start(server: https.Server): Promise<void> {
    const now = this.ctx.now();
    await this.ctx.db.run('INSERT INTO replicas(id, started_at, seen_at) VALUES (?, ?, ?)', this.replica, now, now);
    this.stopListening = await this.ctx.db.listen(
      PUSH_CHANNEL,
      (deviceId) => this.deliver(deviceId),
      // The listening connection was lost: whatever was issued meanwhile goes out now.
      () => {
        for (const id of this.sessions.keys()) this.deliver(id);
      },
    );
    this.beat = setInterval(() => void this.heartbeat(), REPLICA_BEAT_MS);
    this.beat.unref();
    this.pinger = setInterval(() => this.ping(), PUSH_PING_MS);
    this.pinger.unref();
    server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => void this.upgrade(req, socket, head));
  }

  private async heartbeat(): Promise<void> {
    const now = this.ctx.now();
    try {
      await this.ctx.db.run('UPDATE replicas SET seen_at = ? WHERE id = ?', now, this.replica);
      // Replicas gone quiet (killed) hold no one: their rows go.
      await this.ctx.db.run('DELETE FROM push_sessions WHERE replica IN (SELECT id FROM replicas WHERE seen_at < ?)', now - 4 * REPLICA_DEAD_MS);
      await this.ctx.db.run('DELETE FROM replicas WHERE seen_at < ?', now - 4 * REPLICA_DEAD_MS);
    } catch {
      // The database is away: the next beat tries again (healthz says so meanwhile).
    }
  }

  /** Pings every socket; one that did not answer the last ping is gone. */
  private ping(): void {
    for (const set of this.sessions.values()) {
      for (const s of set) {
        if (!s.alive) {
          s.ws.terminate();
          continue;
        }
        s.alive = false;
        s.ws.ping();
      }
    }
  }

  private async upgrade(req: IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
    socket.on('error', () => {});
    try {
      const path = new URL(req.url ?? '/', 'https://x').pathname;
      if (path !== PUSH_PATH || req.method !== 'GET') throw new LetheError('NOT_FOUND', `no route ${req.method} ${path}`);
      if (this.closed) throw new LetheError('DATABASE_UNAVAILABLE', 'this replica is shutting down');
      // Signed like every device call (its body is empty); a device whose wipe is pending connects to get it.
      const d = await verifiedDevice(this.ctx, signatureHeaders(req), 'GET', req.url ?? '', Buffer.alloc(0), { allowWipePending: true });
      this.wss.handleUpgrade(req, socket, head, (ws) => this.open(ws, d.id));
    } catch (err) {
      const e = toLetheError(err);
      if (e.code === 'INTERNAL') console.error(`lethe server: push: ${errorChain(err)}`);
      const body = JSON.stringify(e.toJSON());
      socket.end(
        `HTTP/1.1 ${e.status} ${STATUS_CODES[e.status] ?? ''}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`,
      );
    }
  }

  private open(ws: WebSocket, deviceId: string): void {
    const s: Session = { id: newId('push'), deviceId, ws, sentSeq: 0, queue: Promise.resolve(), alive: true };
    let set = this.sessions.get(deviceId);
    if (!set) this.sessions.set(deviceId, (set = new Set()));
    set.add(s);
    ws.on('pong', () => (s.alive = true));
    ws.on('error', () => {});
    ws.on('message', (data: RawData, binary: boolean) => void this.received(s, data, binary));
    ws.on('close', () => {
      set.delete(s);
      if (set.size === 0 && this.sessions.get(deviceId) === set) this.sessions.delete(deviceId);
      void this.ctx.db.run('DELETE FROM push_sessions WHERE id = ?', s.id).catch(() => {});
    });
    const hello: ServerFrame = { t: 'hello', replica: this.replica, serverTime: iso(this.ctx.now()) };
    ws.send(JSON.stringify(hello));
    void this.ctx.db
      .run('INSERT INTO push_sessions(id, device_id, replica, connected_at) VALUES (?, ?, ?, ?)', s.id, deviceId, this.replica, this.ctx.now())
      .catch(() => {});
    // What the device has not acknowledged goes out at once.
    this.send(s);
  }

  /** Sends the device's unacknowledged commands on every socket it has here. */
  deliver(deviceId: string): void {
    for (const s of this.sessions.get(deviceId) ?? []) this.send(s);
  }

  private send(s: Session): void {
    s.queue = s.queue.then(async () => {
      try {
        const rows = await pendingCommands(this.ctx, s.deviceId, s.sentSeq);
        if (rows.length === 0 || s.ws.readyState !== s.ws.OPEN) return;
        for (const c of rows) {
          const frame: ServerFrame = { t: 'cmd', ...signedCommand(this.ctx, c) };
          s.ws.send(JSON.stringify(frame));
          s.sentSeq = Math.max(s.sentSeq, c.seq);
          this.ctx.metrics.inc('lethe_push_sent_total', { type: c.type });
        }
        await markDelivered(this.ctx, s.deviceId, rows, 'push');
      } catch {
        // The database is away: the heartbeat fallback, or the next notification, delivers.
      }
    });
  }

  /** A frame from the device: an acknowledgement, or junk (the socket is closed, 1008). */
  private async received(s: Session, data: RawData, binary: boolean): Promise<void> {
    let ack;
    try {
      if (binary) throw new Error('binary frame');
      ack = AckFrame.parse(JSON.parse(data.toString()));
    } catch {
      s.ws.close(1008, 'malformed frame');
      return;
    }
    try {
      const d = await getDevice(this.ctx, s.deviceId);
      if (!d) throw new LetheError('UNKNOWN_DEVICE', 'device is gone');
      await ackCommand(this.ctx, d, ack.id, ack.ok, ack.detail, ack.zeroedAfterMs);
    } catch (e) {
      if (s.ws.readyState === s.ws.OPEN) s.ws.send(JSON.stringify({ t: 'error', id: ack.id, ...toLetheError(e).toJSON() }));
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.beat);
    clearInterval(this.pinger);
    await this.stopListening?.();
    for (const set of this.sessions.values()) for (const s of set) s.ws.close(1001, 'server shutting down');
    this.wss.close();
    try {
      await this.ctx.db.run('DELETE FROM push_sessions WHERE replica = ?', this.replica);
      await this.ctx.db.run('DELETE FROM replicas WHERE id = ?', this.replica);
    } catch {
      // Rows of a replica that is gone are ignored (and removed by another replica).
    }
  }
}

/** Device ids with a push channel open on a live replica now. */
export async function connectedDevices(ctx: Ctx): Promise<Set<string>> {
  const rows = await ctx.db.all<{ device_id: string }>(
    'SELECT DISTINCT s.device_id FROM push_sessions s JOIN replicas r ON r.id = s.replica WHERE r.seen_at > ?',
    ctx.now() - REPLICA_DEAD_MS,
  );
  return new Set(rows.map((r) => r.device_id));
}
