// NBD protocol constants, named as in the NetworkBlockDevice/nbd project's
// doc/proto.md (the "Values" section and the message layouts). docs/nbd.md
// says which of them Lethe's server implements. The second half holds Lethe's
// own limits, which may be tuned without touching the wire format.

// ---- specification: magics ----
/** ASCII 'NBDMAGIC', first 8 bytes the server sends (also called INIT_PASSWD). */
export const NBDMAGIC = 0x4e42444d41474943n;
/** ASCII 'IHAVEOPT': newstyle server greeting and the prefix of every option. */
export const IHAVEOPT = 0x49484156454f5054n;
/** Prefix of every option reply in fixed newstyle negotiation. */
export const NBD_OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// ---- specification: handshake flags (16 bits, server) ----
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;

// ---- specification: client flags (32 bits) ----
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// ---- specification: transmission flags (16 bits) ----
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// ---- specification: option types ----
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

// ---- specification: option reply types ----
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
/** Error replies have bit 31 set. */
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1;
export const NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2;
export const NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3;
export const NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4;
export const NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5;
export const NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6;
export const NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8;
export const NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9;

// ---- specification: information types (NBD_REP_INFO) ----
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// ---- specification: request types ----
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;
export const NBD_CMD_RESIZE = 8;

// ---- specification: command flags (16 bits) ----
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

// ---- specification: structured reply flags and types ----
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
/** Error chunk types have bit 15 set. */
export const NBD_REPLY_TYPE_ERROR = (1 << 15) + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;

// ---- specification: error values ----
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// ---- specification: message sizes (bytes) ----
/** NBDMAGIC + IHAVEOPT + 16-bit handshake flags. */
export const SERVER_GREETING_BYTES = 18;
export const CLIENT_FLAGS_BYTES = 4;
/** IHAVEOPT + option + length. */
export const OPTION_HEADER_BYTES = 16;
/** Reply magic + option + reply type + length. */
export const OPTION_REPLY_HEADER_BYTES = 20;
/** Zero padding after the NBD_OPT_EXPORT_NAME reply unless NO_ZEROES. */
export const EXPORT_NAME_PADDING_BYTES = 124;
/** magic + flags + type + cookie + offset + length. */
export const REQUEST_HEADER_BYTES = 28;
export const SIMPLE_REPLY_HEADER_BYTES = 16;
export const STRUCTURED_REPLY_HEADER_BYTES = 20;
/** Strings (export names, messages) MUST be no longer than this. */
export const NBD_MAX_STRING_BYTES = 4096;
/** The default size constraints proto.md asks a server to support. */
export const NBD_DEFAULT_MIN_BLOCK = 1;
export const NBD_DEFAULT_PREFERRED_BLOCK = 4096;
export const NBD_DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;
/** Limits on advertised constraints (proto.md "Size constraints"). */
export const NBD_MAX_MIN_BLOCK = 65536;
export const NBD_MIN_PREFERRED_BLOCK = 512;

export const COMMAND_NAMES: Record<number, string> = {
  [NBD_CMD_READ]: 'read',
  [NBD_CMD_WRITE]: 'write',
  [NBD_CMD_DISC]: 'disc',
  [NBD_CMD_FLUSH]: 'flush',
  [NBD_CMD_TRIM]: 'trim',
  [NBD_CMD_CACHE]: 'cache',
  [NBD_CMD_WRITE_ZEROES]: 'write_zeroes',
  [NBD_CMD_BLOCK_STATUS]: 'block_status',
  [NBD_CMD_RESIZE]: 'resize',
};

// ---- implementation: Lethe's limits (docs/nbd.md "Limits") ----
/**
 * The largest option payload we read into memory: NBD_OPT_GO/INFO with a
 * 4096-byte name and every information type listed fits many times over.
 */
export const MAX_OPTION_PAYLOAD = 16 * 1024;
/**
 * An option payload up to this size is read and discarded in small pieces
 * and answered NBD_REP_ERR_TOO_BIG (or NBD_REP_ERR_UNSUP for an unknown
 * option); beyond it the client is treated as hostile and disconnected.
 */
export const MAX_OPTION_DISCARD = 1024 * 1024;
/** Options one connection may send before we hang up (it is looping). */
export const MAX_OPTIONS_PER_CONNECTION = 256;
/** A client that has not entered transmission within this time is dropped. */
export const HANDSHAKE_TIMEOUT_MS = 30_000;
/** Requests one connection may have in flight before we stop reading. */
export const MAX_IN_FLIGHT_REQUESTS = 128;
/** Payload bytes (write data received, read data unsent) one connection may hold. */
export const MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024;
/** Received bytes buffered before the socket is paused (unless a read needs more). */
export const READ_HIGH_WATER = 1024 * 1024;
/** Connections served at once; more are refused by the listener. */
export const MAX_CONNECTIONS = 64;
/** After we end a connection, how long we wait for the client to close its side. */
export const LINGER_MS = 1000;
/** How long close() lets in-flight requests finish before dropping connections. */
export const CLOSE_GRACE_MS = 5_000;
/** Longest error message sent to a client (bytes of UTF-8). */
export const MAX_ERROR_MESSAGE = 256;
