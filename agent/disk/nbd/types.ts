// The NBD server's types: what an export's storage offers (BlockBackend), how the
// server is configured and what it counts, and what passes between its parts.
import type { NativeDiskReads, PeerCredentials } from '../../../native/index.js';

/**
 * The storage behind one export. One instance serves every connection to its
 * export, which is what lets the server advertise NBD_FLAG_CAN_MULTI_CONN:
 * a read issued after a write has resolved sees that write whichever
 * connection made it, and `flush()` makes durable every write that has
 * resolved, from any caller. Methods may reject; see `nbdError` for how
 * rejections map to NBD errors. The server never calls a method with a range
 * outside `[0, size)` and never keeps a buffer after the call's reply is sent.
 */
export interface BlockBackend {
  size: number;
  readonly?: boolean;
  /** Resolves to exactly `length` bytes; anything else is answered NBD_EIO. */
  read(offset: number, length: number): Promise<Buffer>;
  /** With `fua`, resolves only once the data is on non-volatile storage. */
  write(offset: number, data: Buffer, fua: boolean): Promise<void>;
  flush(): Promise<void>;
  trim(offset: number, length: number): Promise<void>;
  writeZeroes(offset: number, length: number, fua: boolean): Promise<void>;
  /**
   * A buffer of `length` bytes for a write's payload, which the server reads off the
   * socket into it (zeroing the bytes it came in) and hands back through release()
   * once the write is done or failed. Without it the payload stays in Node's buffers.
   */
  payload?(length: number): Promise<Buffer>;
  /**
   * read() when the backend can answer at once, without waiting for anything: the
   * bytes, or undefined (then read() is called). What it returns goes back through
   * release() as read()'s does.
   */
  readNow?(offset: number, length: number): Buffer | undefined;
  /**
   * The backend's native disk-read table (native/disk-reads.ts), if it has one: each
   * connection then runs the native read proxy, which answers the reads the table can
   * serve without JavaScript (docs/nbd.md, "Reads in native code").
   */
  readTable?(): NativeDiskReads | undefined;
  /** Called with a buffer read() or payload() returned once its reply is on the wire (or failed): a backend zeroes plaintext here. */
  release?(buf: Buffer): void;
}

export type NbdAddress = { path: string } | { host: string; port: number };

export interface NbdBlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface NbdServerOptions {
  /** The export a client gets when it asks for the empty name "". */
  defaultExport?: string;
  /** Advertised with NBD_INFO_BLOCK_SIZE; defaults 1, 4096, 32 MiB. */
  blockSize?: NbdBlockSize;
  /** Advertise NBD_FLAG_CAN_MULTI_CONN (default true; see BlockBackend). */
  multiConn?: boolean;
  handshakeTimeoutMs?: number;
  /**
   * Decides from its peer's credentials (SO_PEERCRED) whether a connection on the unix
   * socket is served: null lets it in, a string says why not; a refused peer is logged
   * with its pid and uid and closed before a byte is read. Without it, any process that
   * can open the socket is served.
   */
  allowPeer?: (peer: PeerCredentials) => string | null;
  /** One line per notable event (protocol violations, backend failures, refused peers). */
  log?: (line: string) => void;
}

export interface NbdStats {
  connections: { total: number; active: number };
  /** Requests received, by command name ('read', 'write', …, 'unknown'). */
  requests: Record<string, number>;
  /** Bytes sent to clients by reads. */
  bytesRead: number;
  /** Bytes received from clients by writes. */
  bytesWritten: number;
  /** Error replies sent, by NBD error name ('EINVAL', 'EIO', …). */
  errorReplies: Record<string, number>;
  /** Connections closed because the client broke the protocol. */
  protocolErrors: number;
  /** Connections closed at once because allowPeer refused their peer. */
  refusedPeers: number;
  /** Backend calls that rejected. */
  backendErrors: number;
  /**
   * Reads the native read proxy answered without JavaScript, and their bytes (also in
   * `requests.read` and `bytesRead`); writes whose payload it read into a buffer it lent
   * (also in `requests.write`).
   */
  proxied: { reads: number; bytes: number; lentWrites: number };
}

export interface Export {
  name: string;
  backend: BlockBackend;
}

export interface Request {
  flags: number;
  type: number;
  cookie: Buffer;
  offset: number;
  length: number;
  /** true when offset + length lies within the export. */
  inRange: boolean;
}

export interface Problem {
  error: number;
  message: string;
}

/** What a connection needs from its server. */
export interface ServerSide {
  readonly exports: Map<string, BlockBackend>;
  readonly opts: Required<Omit<NbdServerOptions, 'defaultExport' | 'log' | 'allowPeer'>> & NbdServerOptions;
  readonly counters: NbdStats;
  log(line: string): void;
  /** Registers a backend write so a later flush waits for it. */
  trackWrite(backend: BlockBackend, op: Promise<unknown>): void;
  /** The writes in flight on a backend at this moment. */
  writesInFlight(backend: BlockBackend): Promise<unknown>[];
}

