// An NBD server (fixed newstyle handshake, simple and structured replies, many
// requests in flight) over a unix socket or loopback TCP. docs/nbd.md says what
// is implemented from proto.md, the limits, the error mapping and what flush
// and FUA promise. Nothing a client sends can throw out of this server: a
// violation closes that client's connection and is counted. The parts: this
// listener, connection.ts (transmission), handshake.ts, reader.ts, messages.ts.
import fs from 'node:fs';
import net from 'node:net';
import { LetheError, errorChain } from '../../../common/errors.js';
import { peerCredentials, socketFd, type PeerCredentials } from '../../../native/index.js';
import { Connection } from './connection.js';
import { quote } from './messages.js';
import type { BlockBackend, NbdAddress, NbdBlockSize, NbdServerOptions, NbdStats, ServerSide } from './types.js';
import * as P from './protocol.js';

export type { BlockBackend, NbdAddress, NbdBlockSize, NbdServerOptions, NbdStats } from './types.js';
export { nbdError } from './messages.js';

const LOOPBACK = /^(127\.\d{1,3}\.\d{1,3}\.\d{1,3}|::1|localhost)$/;

/**
 * Serves named exports to NBD clients. Listen on a unix socket (made 0600;
 * keep it in a private directory) or on loopback TCP: an export carries
 * plaintext disk data and NBD has no authentication here.
 */
export class NbdServer {
  private readonly net = net.createServer();
  private readonly conns = new Set<Connection>();
  private readonly running = new Set<Promise<void>>();
  private readonly writes = new WeakMap<BlockBackend, Set<Promise<unknown>>>();
  private bound: NbdAddress | null = null;
  private closing: Promise<void> | null = null;
  private readonly side: ServerSide;
  private readonly counters: NbdStats = {
    connections: { total: 0, active: 0 },
    requests: {},
    bytesRead: 0,
    bytesWritten: 0,
    errorReplies: {},
    protocolErrors: 0,
    refusedPeers: 0,
    backendErrors: 0,
    proxied: { reads: 0, bytes: 0, lentWrites: 0 },
  };

  /** Throws LetheError CONFIG on an export or option proto.md does not allow. */
  constructor(exports: Map<string, BlockBackend>, opts: NbdServerOptions = {}) {
    checkExports(exports, opts.defaultExport);
    const blockSize = opts.blockSize ?? {
      minimum: P.NBD_DEFAULT_MIN_BLOCK,
      preferred: P.NBD_DEFAULT_PREFERRED_BLOCK,
      maximum: P.NBD_DEFAULT_MAX_PAYLOAD,
    };
    checkBlockSize(blockSize);
    const full = {
      ...opts,
      blockSize,
      multiConn: opts.multiConn ?? true,
      handshakeTimeoutMs: opts.handshakeTimeoutMs ?? P.HANDSHAKE_TIMEOUT_MS,
    };
    this.side = {
      exports,
      opts: full,
      counters: this.counters,
      log: (line) => opts.log?.(line),
      trackWrite: (b, op) => this.trackWrite(b, op),
      writesInFlight: (b) => [...(this.writes.get(b) ?? [])],
    };
    this.net.maxConnections = P.MAX_CONNECTIONS;
    this.net.on('connection', (s) => this.accept(s));
    this.net.on('error', (e) => this.side.log(`nbd: listener: ${errorChain(e)}`));
  }

  /** Starts listening; resolves to the bound address (the real port for port 0). Throws LetheError CONFIG. */
  async listen(address: NbdAddress): Promise<NbdAddress> {
    if ('path' in address) {
      await removeStaleSocket(address.path);
      await new Promise<void>((resolve, reject) => this.net.once('error', reject).listen(address.path, resolve));
      fs.chmodSync(address.path, 0o600);
      this.bound = { path: address.path };
    } else {
      if (!LOOPBACK.test(address.host)) {
        throw new LetheError('CONFIG', `nbd: refusing to listen on ${quote(address.host)}`, {
          hint: 'exports carry plaintext; use a unix socket or a loopback address such as 127.0.0.1',
        });
      }
      await new Promise<void>((resolve, reject) => this.net.once('error', reject).listen(address.port, address.host, resolve));
      const a = this.net.address() as net.AddressInfo;
      this.bound = { host: address.host, port: a.port };
    }
    return this.bound;
  }

  address(): NbdAddress | null {
    return this.bound;
  }

  /** A copy of the counters. */
  stats(): NbdStats {
    const out = structuredClone({ ...this.counters, connections: { ...this.counters.connections, active: this.conns.size } });
    // Reads the native proxy answered on open connections (closed ones are in the counters).
    for (const c of this.conns) {
      const { reads, bytes } = c.proxied();
      if (reads > 0) out.requests.read = (out.requests.read ?? 0) + reads;
      out.bytesRead += bytes;
      out.proxied.reads += reads;
      out.proxied.bytes += bytes;
    }
    return out;
  }

  /**
   * Stops listening and ends every connection: handshakes are dropped,
   * in-flight requests get CLOSE_GRACE_MS to finish and be answered. Never throws.
   */
  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  private async shutdown(): Promise<void> {
    const stopped = new Promise<void>((r) => (this.net.listening ? this.net.close(() => r()) : r()));
    for (const c of this.conns) c.shutdown();
    const grace = new Promise<void>((r) => setTimeout(r, P.CLOSE_GRACE_MS).unref());
    await Promise.race([Promise.allSettled([...this.running]), grace]);
    for (const c of this.conns) c.destroy();
    await stopped;
  }

  private accept(socket: net.Socket): void {
    if (this.closing) return void socket.destroy();
    if (this.side.opts.allowPeer && !this.peerAllowed(socket, this.side.opts.allowPeer)) return;
    this.counters.connections.total++;
    const c = new Connection(socket, this.side);
    this.conns.add(c);
    const done = new Promise<void>((r) => socket.once('close', () => r()));
    const run = Promise.all([c.run(), done]).then(() => {
      this.conns.delete(c);
      this.running.delete(run);
    });
    this.running.add(run);
  }

  /** Asks allowPeer about the socket's peer; closes the socket and says so when it is refused. */
  private peerAllowed(socket: net.Socket, allowPeer: (peer: PeerCredentials) => string | null): boolean {
    const fd = socketFd(socket);
    let peer: PeerCredentials | null = null;
    let why: string | null;
    try {
      if (fd === null) throw new Error('the socket has no file descriptor');
      peer = peerCredentials(fd);
      why = allowPeer(peer);
    } catch (e) {
      why = `its credentials cannot be read: ${errorChain(e)}`;
    }
    if (why === null) return true;
    this.counters.refusedPeers++;
    this.side.log(`nbd: refused a connection from ${peer ? `pid ${peer.pid} (uid ${peer.uid})` : 'an unknown peer'}: ${why}`);
    socket.destroy();
    return false;
  }

  private trackWrite(b: BlockBackend, op: Promise<unknown>): void {
    let set = this.writes.get(b);
    if (!set) this.writes.set(b, (set = new Set()));
    const s = set;
    s.add(op);
    op.then(
      () => s.delete(op),
      () => s.delete(op),
    );
  }
}

function checkExports(exports: Map<string, BlockBackend>, defaultExport: string | undefined): void {
  for (const [name, b] of exports) {
    if (Buffer.byteLength(name) > P.NBD_MAX_STRING_BYTES || name.includes('\0')) {
      throw new LetheError('CONFIG', `nbd: export name ${quote(name)} is not a valid NBD string`);
    }
    if (!Number.isSafeInteger(b.size) || b.size < 0) {
      throw new LetheError('CONFIG', `nbd: export ${quote(name)} has an invalid size ${b.size}`);
    }
  }
  if (defaultExport !== undefined && !exports.has(defaultExport)) {
    throw new LetheError('CONFIG', `nbd: default export ${quote(defaultExport)} is not among the exports`);
  }
}

/** proto.md "Size constraints": powers of two, min ≤ 64 KiB, preferred ≥ max(min, 512), max ≥ preferred. */
function checkBlockSize({ minimum, preferred, maximum }: NbdBlockSize): void {
  const pow2 = (n: number) => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
  const ok =
    pow2(minimum) &&
    minimum <= P.NBD_MAX_MIN_BLOCK &&
    pow2(preferred) &&
    preferred >= Math.max(minimum, P.NBD_MIN_PREFERRED_BLOCK) &&
    Number.isInteger(maximum) &&
    maximum >= preferred &&
    maximum <= 0xffffffff;
  if (!ok) throw new LetheError('CONFIG', `nbd: block sizes ${minimum}/${preferred}/${maximum} break proto.md's size constraints`);
}

/** Removes a socket file nobody listens on; throws LetheError CONFIG if the path is in use or not a socket. */
async function removeStaleSocket(path: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new LetheError('CONFIG', `nbd: ${quote(path)} exists and is not a socket`);
  const live = await new Promise<boolean>((resolve) => {
    const s = net.connect(path);
    s.once('connect', () => (s.destroy(), resolve(true)));
    s.once('error', () => resolve(false));
  });
  if (live) throw new LetheError('CONFIG', `nbd: another server is listening on ${quote(path)}`, { hint: 'stop it or choose another socket path' });
  fs.unlinkSync(path);
}
