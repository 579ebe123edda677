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
import { AckFrame, PUSH_PATH, type ServerFrame, type TAckFrame } from '../common/push.js';
import { toLetheError } from './app.js';
import { signatureHeaders, verifiedDevice } from './auth.js';
import { inTx, newId, type Ctx } from './context.js';
import { DEFAULT_LIMITS, limiterFor, type RateLimiter, type ServerLimits } from './limits.js';
import { ackCommand, getDevice, markDelivered, PUSH_CHANNEL, signedCommand, type CommandRow } from './devices.js';

/** How often a replica pings each socket and refreshes its own row. */
export const PUSH_PING_MS = 15_000;
/** How often a replica says it is alive; a replica silent for 3 of these holds no one. */
export const REPLICA_BEAT_MS = 5_000;
export const REPLICA_DEAD_MS = 3 * REPLICA_BEAT_MS;
/** Commands whose delivery and acknowledgement are recorded set-based: they change no device row and their delivery is not audited. */
const SET_BASED = new Set<CommandRow['type']>(['policy', 'rotate']);
/** Devices per query when looking up what to send (well under either database's parameter limit). */
const LOOKUP_BATCH = 500;
/** The largest frame a device may send (an acknowledgement is a few hundred bytes). */
const MAX_FRAME = 4096;

/**
 * Items handled in batches, one batch at a time: while one is being written, what
 * arrives waits and goes in the next (a group commit; no added wait when idle).
 */
class GroupCommit<T> {
  private waiting: { item: T; done: (e?: unknown) => void }[] = [];
  private running = false;

  constructor(private readonly write: (items: T[]) => Promise<void>) {}

  add(item: T): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.waiting.push({ item, done: (e) => (e === undefined ? resolve() : reject(e)) });
      if (!this.running) void this.run();
    });
  }

  private async run(): Promise<void> {
    this.running = true;
    while (this.waiting.length > 0) {
      const batch = this.waiting.splice(0);
      try {
        await this.write(batch.map((b) => b.item));
        for (const b of batch) b.done();
      } catch (e) {
        for (const b of batch) b.done(e);
      }
    }
    this.running = false;
  }
}

interface Ack {
  deviceId: string;
  frame: TAckFrame;
  session: Session;
}

interface Session {
  id: string;
  deviceId: string;
  ws: WebSocket;
  /** The highest command number sent on this socket. */
  sentSeq: number;
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
  /** Deliveries recorded together: one transaction for what several sockets sent meanwhile. */
  private readonly delivered = new GroupCommit<{ deviceId: string; rows: CommandRow[] }>(async (items) => {
    // Commands whose delivery is not audited (policy, rotate): one statement for all of them.
    const plain = items.flatMap((it) => it.rows.filter((c) => SET_BASED.has(c.type) && c.delivered_at === null).map((c) => c.id));
    for (let i = 0; i < plain.length; i += LOOKUP_BATCH) {
      const part = plain.slice(i, i + LOOKUP_BATCH);
      await this.ctx.db.run(
        `UPDATE commands SET delivered_at = ?, delivered_via = 'push' WHERE delivered_at IS NULL AND id IN (${part.map(() => '?').join(', ')})`,
        this.ctx.now(),
        ...part,
      );
    }
    const rest = items.map((it) => ({ ...it, rows: it.rows.filter((c) => !SET_BASED.has(c.type)) })).filter((it) => it.rows.length > 0);
    await this.together(rest, (ctx, it) => markDelivered(ctx, it.deviceId, it.rows, 'push'));
  });
  /** Acknowledgements from sockets, recorded together; one that fails (an unknown command) fails alone. */
  private readonly acks = new GroupCommit<Ack>(async (all) => {
    const failed = new Map<Ack, unknown>();
    const items = await this.ackSetBased(all);
    await this.together(items, async (ctx, a) => {
      try {
        await ctx.db.savepoint(async () => {
          const d = await getDevice(ctx, a.deviceId);
          if (!d) throw new LetheError('UNKNOWN_DEVICE', 'device is gone');
          await ackCommand(ctx, d, a.frame.id, a.frame.ok, a.frame.detail, a.frame.zeroedAfterMs);
        });
      } catch (e) {
        failed.set(a, e);
      }
    });
    for (const [a, e] of failed) {
      if (a.session.ws.readyState === a.session.ws.OPEN) a.session.ws.send(JSON.stringify({ t: 'error', id: a.frame.id, ...toLetheError(e).toJSON() }));
    }
  });

  /**
   * Acknowledgements of policy and rotate commands (they change no device row and
   * their delivery is not audited) in one transaction: the rows in one statement,
   * then one audit entry each, the chain's lock taken once and no row lock after
   * it. Returns the acknowledgements left for the per-device path.
   */
  private async ackSetBased(items: Ack[]): Promise<Ack[]> {
    const candidates = items.filter((a) => a.frame.ok);
    if (candidates.length === 0) return items;
    const ids = [...new Set(candidates.map((a) => a.frame.id))];
    const rows = new Map<string, CommandRow>();
    for (let i = 0; i < ids.length; i += LOOKUP_BATCH) {
      const part = ids.slice(i, i + LOOKUP_BATCH);
      for (const r of await this.ctx.db.all<CommandRow>(`SELECT * FROM commands WHERE id IN (${part.map(() => '?').join(', ')})`, ...part)) rows.set(r.id, r);
    }
    const mine = new Map<string, Ack>();
    for (const a of candidates) {
      const c = rows.get(a.frame.id);
      if (c && c.device_id === a.deviceId && SET_BASED.has(c.type) && c.acked_at === null && !mine.has(c.id)) mine.set(c.id, a);
    }
    if (mine.size === 0) return items;
    const now = this.ctx.now();
    await inTx(this.ctx, async (ctx) => {
      const acked: string[] = [];
      const list = [...mine.entries()];
      for (let i = 0; i < list.length; i += LOOKUP_BATCH) {
        const part = list.slice(i, i + LOOKUP_BATCH);
        const result = (a: Ack) => JSON.stringify({ ok: true, ...(a.frame.detail ? { detail: a.frame.detail } : {}) });
        // One UPDATE per distinct result text (in practice one or two), each over many rows.
        const byResult = new Map<string, string[]>();
        for (const [id, a] of part) (byResult.get(result(a)) ?? byResult.set(result(a), []).get(result(a))!).push(id);
        for (const [res, idsOf] of byResult) {
          const changed = await ctx.db.all<{ id: string }>(
            `UPDATE commands SET acked_at = ?, result = ?, delivered_at = COALESCE(delivered_at, ?), delivered_via = COALESCE(delivered_via, 'push') WHERE acked_at IS NULL AND id IN (${idsOf.map(() => '?').join(', ')}) RETURNING id`,
            now,
            res,
            now,
            ...idsOf,
          );
          acked.push(...changed.map((r) => r.id));
        }
      }
      await ctx.audit.appendMany(
        acked.sort().map((id) => {
          const c = rows.get(id)!;
          const a = mine.get(id)!;
          return {
            type: `${c.type as 'policy' | 'rotate'}.ack` as const,
            device: c.device_id,
            data: { command: id, ok: true, ...(a.frame.detail ? { detail: a.frame.detail } : {}), elapsedMs: now - c.issued_at },
          };
        }),
        now,
      );
    });
    const done = new Set(mine.values());
    return items.filter((a) => !done.has(a));
  }

  /**
   * Runs `fn` for each item: in SQLite all in one transaction (one writer: one
   * commit instead of many); in PostgreSQL each in its own, side by side on the
   * pool (one transaction over many devices' rows, appending to the audit chain
   * between them, would take row locks while holding the chain's lock and
   * deadlock with single-device transactions).
   */
  private async together<T>(items: T[], fn: (ctx: Ctx, item: T) => Promise<void>): Promise<void> {
    if (this.ctx.db.dialect === 'sqlite') {
      await inTx(this.ctx, async (ctx) => {
        for (const it of items) await fn(ctx, it);
      });
      return;
    }
    await Promise.all(items.map((it) => inTx(this.ctx, (ctx) => fn(ctx, it))));
  }

  /** The same budgets as device HTTP calls (their own buckets): upgrades per address before any lookup, per device once verified. */
  private readonly perAddress: RateLimiter | null;
  private readonly perDevice: RateLimiter | null;

  constructor(
    private readonly ctx: Ctx,
    limits: ServerLimits = DEFAULT_LIMITS,
  ) {
    this.perAddress = limiterFor(limits.deviceAddress);
    this.perDevice = limiterFor(limits.device);
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
      const r = await this.ctx.db.run('UPDATE replicas SET seen_at = ? WHERE id = ?', now, this.replica);
      if (r.changes === 0) {
        // Taken for dead (its database was away a long while) and its rows removed: it says again who it holds.
        await this.ctx.db.run('INSERT INTO replicas(id, started_at, seen_at) VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at', this.replica, now, now);
        for (const set of this.sessions.values()) {
          for (const x of set) {
            await this.ctx.db.run('INSERT INTO push_sessions(id, device_id, replica, connected_at) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO NOTHING', x.id, x.deviceId, this.replica, now);
          }
        }
      }
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
    let retryAfter: number | undefined;
    try {
      const path = new URL(req.url ?? '/', 'https://x').pathname;
      if (path !== PUSH_PATH || req.method !== 'GET') throw new LetheError('NOT_FOUND', `no route ${req.method} ${path}`);
      if (this.closed) throw new LetheError('DATABASE_UNAVAILABLE', 'this replica is shutting down');
      const limited = (waitMs: number, what: string) => {
        retryAfter = Math.max(1, Math.ceil(waitMs / 1000));
        return new LetheError('RATE_LIMITED', `too many ${what}`, { hint: `retry after ${retryAfter} s` });
      };
      const wait = this.perAddress?.take(req.socket.remoteAddress ?? 'unknown') ?? 0;
      if (wait > 0) throw limited(wait, 'device requests from this address');
      // Signed like every device call (its body is empty); a device whose wipe is pending connects to get it.
      const d = await verifiedDevice(this.ctx, signatureHeaders(req), 'GET', req.url ?? '', Buffer.alloc(0), { allowWipePending: true, rate: this.perDevice }, (w) =>
        limited(w, 'requests from this device'),
      );
      this.wss.handleUpgrade(req, socket, head, (ws) => this.open(ws, d.id));
    } catch (err) {
      const e = toLetheError(err);
      if (e.code === 'INTERNAL') console.error(`lethe server: push: ${errorChain(err)}`);
      const body = JSON.stringify(e.toJSON());
      socket.end(
        `HTTP/1.1 ${e.status} ${STATUS_CODES[e.status] ?? ''}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n${
          retryAfter ? `retry-after: ${retryAfter}\r\n` : ''
        }connection: close\r\n\r\n${body}`,
      );
    }
  }

  private open(ws: WebSocket, deviceId: string): void {
    const s: Session = { id: newId('push'), deviceId, ws, sentSeq: 0, alive: true };
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
    void this.sends.add(s).catch(() => {
      // The database is away: the heartbeat fallback, or the next notification, delivers.
    });
  }

  /** Sockets to send to, looked up together: one query for the commands of every device notified meanwhile. */
  private readonly sends = new GroupCommit<Session>(async (sessions) => {
    const unique = [...new Set(sessions)].filter((s) => s.ws.readyState === s.ws.OPEN);
    const ids = [...new Set(unique.map((s) => s.deviceId))];
    const byDevice = new Map<string, CommandRow[]>();
    for (let i = 0; i < ids.length; i += LOOKUP_BATCH) {
      const part = ids.slice(i, i + LOOKUP_BATCH);
      const rows = await this.ctx.db.all<CommandRow>(
        `SELECT * FROM commands WHERE acked_at IS NULL AND device_id IN (${part.map(() => '?').join(', ')}) ORDER BY device_id, seq`,
        ...part,
      );
      for (const r of rows) (byDevice.get(r.device_id) ?? byDevice.set(r.device_id, []).get(r.device_id)!).push(r);
    }
    const sent: { deviceId: string; rows: CommandRow[] }[] = [];
    for (const s of unique) {
      const rows = (byDevice.get(s.deviceId) ?? []).filter((c) => c.seq > s.sentSeq);
      if (rows.length === 0) continue;
      for (const c of rows) {
        const frame: ServerFrame = { t: 'cmd', ...signedCommand(this.ctx, c) };
        s.ws.send(JSON.stringify(frame));
        s.sentSeq = Math.max(s.sentSeq, c.seq);
        this.ctx.metrics.inc('lethe_push_sent_total', { type: c.type });
      }
      sent.push({ deviceId: s.deviceId, rows });
    }
    // Recorded after sending (the device need not wait for it), in one transaction.
    for (const x of sent) void this.delivered.add(x).catch(() => {});
  });


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
    // A failure of the whole batch (the database away): the command stays unacknowledged and is sent again.
    await this.acks.add({ deviceId: s.deviceId, frame: ack, session: s }).catch(() => {});
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
