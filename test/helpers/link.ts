// A link emulator for tests and benches: a TCP proxy that adds one-way delay and a
// bandwidth cap shared by every connection through it, and can take the link down for
// a while. This kernel has no netem qdisc (TBF and HTB only, and neither delays), so
// last-mile links are emulated in user space between the agent and the server.
import net from 'node:net';

export interface LinkOptions {
  /** One-way delay in each direction, ms (RTT is twice this). */
  delayMs?: number;
  /** Bandwidth cap per direction, shared by all connections, Mbit/s; 0 or absent means none. */
  mbit?: number;
}

/** How a dropped link behaves: bytes held until it is back (a stalled path), or every connection reset. */
export type DropMode = 'stall' | 'reset';

export interface LinkStats {
  /** Bytes from the clients to the target. */
  up: number;
  /** Bytes from the target to the clients. */
  down: number;
  connections: number;
}

/** Slices larger than this are split so that one big write does not hold the link in one step. */
const SLICE = 16 * 1024;
/** A source is paused while this many bytes beyond the bandwidth-delay product wait in its direction. */
const QUEUE_SLACK = 256 * 1024;

interface Parcel {
  /** null: the sender closed; end the receiver once everything before has arrived. */
  data: Buffer | null;
  to: net.Socket;
  from: net.Socket;
  /** When the last bit of it has crossed the link. */
  arrives: number;
}

/**
 * One direction of the link: parcels leave in order, each after the one before has been
 * serialised at the link's rate, and arrive `delayMs` later.
 */
class Direction {
  private readonly queue: Parcel[] = [];
  private freeAt = 0;
  private queued = 0;
  private timer: NodeJS.Timeout | undefined;
  private paused = new Set<net.Socket>();
  private downUntil = 0;
  bytes = 0;

  constructor(private readonly o: Required<LinkOptions>) {}

  private get limit(): number {
    const bdp = this.o.mbit > 0 ? (this.o.mbit * 1e6 * this.o.delayMs) / 8000 : 0;
    return bdp + QUEUE_SLACK;
  }

  send(from: net.Socket, to: net.Socket, data: Buffer): void {
    for (let off = 0; off < data.length; off += SLICE) {
      const piece = data.subarray(off, Math.min(off + SLICE, data.length));
      const now = Math.max(performance.now(), this.downUntil);
      const leaves = Math.max(now, this.freeAt) + (this.o.mbit > 0 ? (piece.length * 8) / (this.o.mbit * 1000) : 0);
      this.freeAt = leaves;
      this.queue.push({ data: piece, to, from, arrives: leaves + this.o.delayMs });
      this.queued += piece.length;
    }
    if (this.queued > this.limit && !this.paused.has(from)) {
      from.pause();
      this.paused.add(from);
    }
    this.pump();
  }

  /** Ends `to` once everything `from` sent before has crossed the link. */
  end(from: net.Socket, to: net.Socket): void {
    const now = Math.max(performance.now(), this.downUntil);
    this.queue.push({ data: null, to, from, arrives: Math.max(now, this.freeAt) + this.o.delayMs });
    this.pump();
  }

  /** Holds every parcel not yet delivered, and every new one, until `until`. */
  hold(until: number): void {
    this.downUntil = Math.max(this.downUntil, until);
    const shift = (p: Parcel) => (p.arrives = Math.max(p.arrives, until + this.o.delayMs));
    this.queue.forEach(shift);
    this.freeAt = Math.max(this.freeAt, until);
    this.reschedule();
  }

  /** Forgets what was in flight to a socket that closed. */
  forget(s: net.Socket): void {
    for (let i = this.queue.length - 1; i >= 0; i--) {
      const p = this.queue[i];
      if (p.to === s) {
        this.queued -= p.data?.length ?? 0;
        this.queue.splice(i, 1);
      }
    }
    this.paused.delete(s);
  }

  close(): void {
    clearTimeout(this.timer);
    this.queue.length = 0;
  }

  private pump = (): void => {
    this.timer = undefined;
    const now = performance.now();
    while (this.queue.length > 0 && this.queue[0].arrives <= now) {
      const p = this.queue.shift()!;
      if (p.data === null) {
        p.to.end();
        continue;
      }
      this.queued -= p.data.length;
      this.bytes += p.data.length;
      if (!p.to.destroyed) p.to.write(p.data);
    }
    if (this.queued <= this.limit) {
      for (const s of this.paused) if (!s.destroyed) s.resume();
      this.paused.clear();
    }
    this.reschedule();
  };

  private reschedule(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    if (this.queue.length === 0) return;
    const wait = Math.max(0, this.queue[0].arrives - performance.now());
    this.timer = setTimeout(this.pump, wait);
  }
}

/** A running link in front of `target`: connect to `port` on 127.0.0.1 instead. */
export class Link {
  readonly up: Direction;
  readonly down: Direction;
  private readonly sockets = new Set<net.Socket>();
  private resetUntil = 0;
  private connections = 0;

  private constructor(
    private readonly server: net.Server,
    readonly port: number,
    readonly options: Required<LinkOptions>,
  ) {
    this.up = new Direction(options);
    this.down = new Direction(options);
  }

  /** Starts a link to `target` (host:port or port on 127.0.0.1) on a free loopback port. */
  static async start(target: { host?: string; port: number }, o: LinkOptions = {}): Promise<Link> {
    const options = { delayMs: o.delayMs ?? 0, mbit: o.mbit ?? 0 };
    if (options.delayMs < 0 || options.mbit < 0) throw new RangeError(`a link needs a delay and rate of 0 or more, not ${options.delayMs} ms and ${options.mbit} Mbit/s`);
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    const link = new Link(server, (server.address() as net.AddressInfo).port, options);
    server.on('connection', (client) => link.accept(client, target));
    return link;
  }

  /** The URL of `url` with its host and port replaced by this link's. */
  via(url: string): string {
    const u = new URL(url);
    u.hostname = '127.0.0.1';
    u.port = String(this.port);
    return u.toString().replace(/\/$/, '');
  }

  stats(): LinkStats {
    return { up: this.up.bytes, down: this.down.bytes, connections: this.connections };
  }

  /**
   * Takes the link down for `ms`. 'stall' holds every byte (and every new connection's
   * bytes) until it is back, as a path that loses packets does to TCP; 'reset' closes
   * every connection now and each new one until it is back.
   */
  drop(ms: number, mode: DropMode = 'stall'): void {
    const until = performance.now() + ms;
    if (mode === 'reset') {
      this.resetUntil = Math.max(this.resetUntil, until);
      for (const s of this.sockets) s.destroy();
      return;
    }
    this.up.hold(until);
    this.down.hold(until);
  }

  async close(): Promise<void> {
    this.up.close();
    this.down.close();
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private accept(client: net.Socket, target: { host?: string; port: number }): void {
    if (performance.now() < this.resetUntil) {
      client.destroy();
      return;
    }
    this.connections++;
    const upstream = net.connect(target.port, target.host ?? '127.0.0.1');
    client.setNoDelay(true);
    upstream.setNoDelay(true);
    for (const s of [client, upstream]) {
      this.sockets.add(s);
      s.on('error', () => {});
      s.on('close', () => {
        this.sockets.delete(s);
        this.up.forget(s);
        this.down.forget(s);
        // The other end sees the close after whatever was still in flight to it.
        const other = s === client ? upstream : client;
        (s === client ? this.up : this.down).end(s, other);
      });
    }
    client.on('data', (d: Buffer) => this.up.send(client, upstream, d));
    upstream.on('data', (d: Buffer) => this.down.send(upstream, client, d));
  }
}
