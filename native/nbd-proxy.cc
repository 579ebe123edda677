// The NBD read proxy: once a connection's handshake is done (in JavaScript), two native
// threads stand between the client and the JavaScript connection (docs/nbd.md, "Reads
// in native code"):
//
//   requests  (`readers` of them, taking turns at the socket) read the client's requests.
//             A read the disk-read table can serve (disk-table.cc: a normal-class chunk
//             whose tag was checked, its class key held) is answered here, from the cache
//             file, without JavaScript, while another requests thread reads the next
//             request: one connection's reads are decrypted on as many cores. Anything
//             else (a write and its payload, a flush, a read the table refuses, a request
//             that breaks the protocol) goes on, byte for byte, to JavaScript over a
//             socket pair, where the connection runs as before. A write's payload
//             is read into one of the table's locked write buffers when one is free,
//             and only the request goes to JavaScript, with the buffer lent to it
//             (a LENT message: the request with PROXY_WRITE_MAGIC, then the buffer's
//             index); JavaScript writes from the buffer and gives it back, zeroed.
//   replies   copies JavaScript's replies to the client, one whole reply at a time.
//
// All write to the client under one lock, so replies never interleave; replies to reads
// served here may go out in another order than their requests came, as NBD allows. A
// read is answered from one of the table's few locked reply buffers, shared by every
// connection; payloads pass through two small locked buffers, the requests threads' one
// and the replies thread's one. The proxy
// never decides anything JavaScript would: it serves only reads that are in range,
// carry no flag but FUA and DF, and that the table serves whole, and it forwards the
// rest unchanged. JavaScript still sees every byte of a request it has to answer.
//
//   nbdProxyStart(table, fd, leftover, structured, size, readers) → [handle, innerFd]
//   nbdProxyStats(h) → { reads, bytes }        reads answered here
//   nbdProxyGiveWrite(h, i) → bool             write buffer i back from JavaScript, zeroed; false if
//                                              this connection did not lend it
//   nbdProxyClose(h, held)                     JavaScript's side ends; the client's once every reply is
//                                              out. Buffers lent here and not in `held` (lent messages
//                                              JavaScript never read) are zeroed and freed now
#include <node_api.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sodium.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "disk-reads.h"
#include "napi-helpers.h"

namespace lethe {
namespace {

// proto.md's numbers (agent/disk/nbd/protocol.ts names them the same)
constexpr uint32_t NBD_REQUEST_MAGIC = 0x25609513;
constexpr uint32_t NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
constexpr uint32_t NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
constexpr uint16_t NBD_CMD_READ = 0, NBD_CMD_WRITE = 1, NBD_CMD_DISC = 2;
constexpr uint16_t NBD_CMD_FLAG_FUA = 1 << 0, NBD_CMD_FLAG_DF = 1 << 2;
constexpr uint16_t NBD_REPLY_FLAG_DONE = 1 << 0;
constexpr uint16_t NBD_REPLY_TYPE_OFFSET_DATA = 1;
constexpr size_t REQUEST = 28, SIMPLE = 16, STRUCTURED = 20;
/**
 * A LENT message's magic, in place of the request's (native/disk-reads.ts names the
 * same): the write's payload is in the write buffer whose index follows. Never one a
 * client can send through: a request with this magic goes on with its magic zeroed.
 */
constexpr uint32_t PROXY_WRITE_MAGIC = 0x4c455457;  // "LETW"
constexpr size_t LENT = REQUEST + 4;
/**
 * How long a read waits for one of the shared reply buffers before it goes to
 * JavaScript: the buffers come back as fast as replies go out, unless a client is
 * not taking its replies, and that client must not hold up every other.
 */
constexpr int REPLY_WAIT_MS = 10;
constexpr int SEND_BUFFER = 1 << 20;
static_assert(STRUCTURED + 8 <= REPLY_HEADER_ROOM, "a structured read reply's header fits before the data");

uint16_t be16(const uint8_t *p) { return uint16_t(p[0] << 8 | p[1]); }
uint32_t be32(const uint8_t *p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }
uint64_t be64(const uint8_t *p) { return uint64_t(be32(p)) << 32 | be32(p + 4); }
void put16(uint8_t *p, uint16_t v) { p[0] = uint8_t(v >> 8), p[1] = uint8_t(v); }
void put32(uint8_t *p, uint32_t v) { put16(p, uint16_t(v >> 16)), put16(p + 2, uint16_t(v)); }
void put64(uint8_t *p, uint64_t v) { put32(p, uint32_t(v >> 32)), put32(p + 4, uint32_t(v)); }

struct Proxy {
  Table *table = nullptr;
  int client = -1;  // our own dup of the connection
  int inner = -1;   // our end of the socket pair; JavaScript has the other
  bool structured = false;
  uint64_t size = 0;
  size_t max_read = 0;
  size_t copy = 0;  // bytes of each thread's locked payload buffer
  std::vector<uint8_t> leftover;  // bytes the handshake read past its end: requests, perhaps a payload
  size_t leftover_at = 0;
  /**
   * One requests thread at a time reads from the client: a request and a write's
   * payload, or a request it forwards whole. Under it: leftover, `in` (the payload
   * buffer, locked), `ended` and `serving`.
   */
  std::mutex rmu;
  std::condition_variable served;  // `serving` fell
  uint8_t *in = nullptr;
  bool ended = false;  // no more requests to read: the client ended, broke the protocol or sent DISC
  int serving = 0;     // reads being served outside rmu
  int readers = 0;     // requests threads still running: the last shuts JavaScript's side
  std::mutex imu;  // one whole request at a time to JavaScript
  std::mutex wmu;  // one whole reply at a time to the client
  std::mutex pmu;
  /** Simple replies carry no length: a forwarded read's, by cookie, in order. */
  std::unordered_map<uint64_t, std::deque<uint32_t>> pending;
  std::atomic<uint64_t> reads{0}, bytes{0};
  /** Write buffers lent to JavaScript through this connection, not given back yet: whoever takes one out of here frees it. */
  std::mutex lmu;
  std::vector<int> lent;
  std::atomic<bool> closed{false};
  /** The threads and the handle: the last to let go closes the sockets and frees. */
  std::atomic<int> refs{0};
};

void unref(Proxy *p) {
  if (--p->refs != 0) return;
  close(p->client);
  close(p->inner);
  sodium_memzero(p->leftover.data(), p->leftover.size());
  /* SAFETY: `in` came from sodium_malloc in Start; no thread is left to use it */
  if (p->in) sodium_free(p->in);
  TableUnref(p->table);
  delete p;
}

/**
 * Ends JavaScript's side of the pair: the requests threads stop; the replies thread
 * still passes on every reply JavaScript wrote before it, then shuts the client's
 * socket. Shutting the client's socket here instead cut off replies still in the pair.
 */
void finish(Proxy *p) {
  if (p->closed.exchange(true)) return;
  shutdown(p->inner, SHUT_RDWR);
  // Nothing the client sends now has anywhere to go: a requests thread waiting for the
  // rest of a payload (a write buffer in hand) stops now, not when the client goes.
  shutdown(p->client, SHUT_RD);
}

/** Shuts both sockets: every blocked read and write returns and every thread ends. */
void shut(Proxy *p) {
  if (p->closed.exchange(true)) return;
  shutdown(p->client, SHUT_RDWR);
  shutdown(p->inner, SHUT_RDWR);
}

/**
 * Waits until fd is ready for `events`. The client's fd is libuv's, non-blocking (a
 * flag its dup shares, so it stays so): the threads wait here instead. A shut socket
 * is always ready, and the next call fails.
 */
bool wait_for(int fd, short events) {
  struct pollfd pfd = {fd, events, 0};
  for (;;) {
    int k = poll(&pfd, 1, -1);
    if (k > 0) return true;
    if (k < 0 && errno != EINTR) return false;
  }
}

bool send_all(int fd, const uint8_t *b, size_t n) {
  while (n > 0) {
    /* SAFETY: [b, b + n) lies in the caller's buffer; MSG_NOSIGNAL: a closed peer is EPIPE, not a signal */
    ssize_t k = send(fd, b, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k < 0 && (errno == EINTR || ((errno == EAGAIN || errno == EWOULDBLOCK) && wait_for(fd, POLLOUT)))) continue;
    if (k <= 0) return false;
    b += k, n -= size_t(k);
  }
  return true;
}

bool recv_all(int fd, uint8_t *b, size_t n) {
  while (n > 0) {
    /* SAFETY: [b, b + n) lies in the caller's buffer */
    ssize_t k = recv(fd, b, n, MSG_DONTWAIT);
    if (k < 0 && (errno == EINTR || ((errno == EAGAIN || errno == EWOULDBLOCK) && wait_for(fd, POLLIN)))) continue;
    if (k <= 0) return false;
    b += k, n -= size_t(k);
  }
  return true;
}

/** n bytes from the client: first what the handshake left over, then the socket. */
bool from_client(Proxy *p, uint8_t *b, size_t n) {
  size_t have = std::min(n, p->leftover.size() - p->leftover_at);
  if (have > 0) {
    memcpy(b, p->leftover.data() + p->leftover_at, have);
    sodium_memzero(p->leftover.data() + p->leftover_at, have);
    p->leftover_at += have;
  }
  return recv_all(p->client, b + have, n - have);
}

/**
 * Copies n bytes from `from` (the client, through from_client, or `inner`) to fd `to`
 * through `buf` (p->copy bytes, locked), zeroing it once they are through: each piece
 * overwrites the last.
 */
bool pass(Proxy *p, bool from_client_side, int to, uint64_t n, uint8_t *buf) {
  bool ok = true;
  size_t used = 0;
  while (ok && n > 0) {
    size_t k = size_t(std::min<uint64_t>(n, p->copy));
    used = std::max(used, k);
    ok = (from_client_side ? from_client(p, buf, k) : recv_all(p->inner, buf, k)) && send_all(to, buf, k);
    n -= k;
  }
  sodium_memzero(buf, used);
  return ok;
}

/**
 * A read the table serves, answered from a shared reply buffer; false (nothing sent)
 * when there is none free or the table refuses, and the read goes to JavaScript.
 * `sent` says whether the client still takes bytes.
 */
bool serve(Proxy *p, Reader *r, uint64_t cookie, uint64_t offset, uint32_t len, bool *sent) {
  uint8_t *reply = TableTakeReply(p->table, REPLY_WAIT_MS);  // plaintext passes here: locked, zeroed after each use
  if (!reply) return false;
  uint8_t *data = reply + REPLY_HEADER_ROOM;
  bool ok = TableRead(p->table, r, offset, data, len);
  if (ok) {
    size_t hl = p->structured ? STRUCTURED + 8 : SIMPLE;
    uint8_t *hdr = data - hl;
    if (p->structured) {
      put32(hdr, NBD_STRUCTURED_REPLY_MAGIC);
      put16(hdr + 4, NBD_REPLY_FLAG_DONE);
      put16(hdr + 6, NBD_REPLY_TYPE_OFFSET_DATA);
      put64(hdr + 8, cookie);
      put32(hdr + 16, 8 + len);
      put64(hdr + 20, offset);
    } else {
      put32(hdr, NBD_SIMPLE_REPLY_MAGIC);
      put32(hdr + 4, 0);
      put64(hdr + 8, cookie);
    }
    std::lock_guard<std::mutex> g(p->wmu);
    *sent = send_all(p->client, hdr, hl + len);
  }
  sodium_memzero(data, len);
  TableGiveReply(p->table, reply);
  if (ok && *sent) {
    p->reads++;
    p->bytes += len;
  }
  return ok;
}

/** Takes write buffer i out of `p->lent` and frees it (zeroed); false if it was not there. */
bool take_back(Proxy *p, int i) {
  {
    std::lock_guard<std::mutex> g(p->lmu);
    auto it = std::find(p->lent.begin(), p->lent.end(), i);
    if (it == p->lent.end()) return false;
    p->lent.erase(it);
  }
  return TableGiveWrite(p->table, i, WRITE_LENT);
}

/**
 * Whether this connection may take another write buffer: at most half of them at once,
 * so a client that stops taking its replies (its lent writes then wait behind them)
 * or its payloads' ends cannot hold every connection's. None is waited for: without
 * one, the write goes through the socket pair.
 */
bool may_lend(Proxy *p) {
  std::lock_guard<std::mutex> g(p->lmu);
  return p->lent.size() < std::max<size_t>(1, TableWriteCount(p->table) / 2);
}

/** Frees every buffer lent through this connection but those in `held` (JavaScript still writes from them). */
void reclaim(Proxy *p, const std::vector<int> &held) {
  std::vector<int> lost;
  {
    std::lock_guard<std::mutex> g(p->lmu);
    for (int i : p->lent)
      if (std::find(held.begin(), held.end(), i) == held.end()) lost.push_back(i);
  }
  for (int i : lost) take_back(p, i);
}

/**
 * n bytes from the client into b, as from_client; `got` says how many came (all of
 * them, unless it returns false).
 */
bool from_client_counted(Proxy *p, uint8_t *b, size_t n, size_t *got) {
  size_t have = std::min(n, p->leftover.size() - p->leftover_at);
  if (have > 0 && !from_client(p, b, have)) return false;
  *got = have;
  while (*got < n) {
    /* SAFETY: [b + got, b + n) lies in the caller's buffer */
    ssize_t k = recv(p->client, b + *got, n - *got, MSG_DONTWAIT);
    if (k < 0 && (errno == EINTR || ((errno == EAGAIN || errno == EWOULDBLOCK) && wait_for(p->client, POLLIN)))) continue;
    if (k <= 0) return false;
    *got += size_t(k);
  }
  return true;
}

/** Hands a request header on to JavaScript; a read's length is kept for its simple reply. */
bool forward(Proxy *p, const uint8_t *h) {
  uint32_t magic = be32(h);
  uint16_t type = be16(h + 6);
  if (magic == NBD_REQUEST_MAGIC && type == NBD_CMD_READ && !p->structured) {
    std::lock_guard<std::mutex> g(p->pmu);
    p->pending[be64(h + 8)].push_back(be32(h + 24));
  }
  return send_all(p->inner, h, REQUEST);
}

/**
 * A write's payload (len bytes, after request h) read into write buffer i (WRITE_FILLING,
 * this thread's) and lent to JavaScript in a LENT message; rmu held. A payload cut short
 * goes on to JavaScript as it came, request and bytes, as it would without a buffer, and
 * the buffer is freed; so is it when the message cannot be sent whole. False when the
 * connection ends.
 */
bool lend(Proxy *p, const uint8_t *h, int i, uint32_t len) {
  uint8_t *buf = p->table->write_all[size_t(i)];
  size_t got = 0;
  bool filled = from_client_counted(p, buf, len, &got);
  std::lock_guard<std::mutex> gi(p->imu);
  if (!filled) {
    if (forward(p, h)) send_all(p->inner, buf, got);
    TableGiveWrite(p->table, i, WRITE_FILLING, got);
    return false;
  }
  TableLendWrite(p->table, i, len);
  {
    std::lock_guard<std::mutex> g(p->lmu);
    p->lent.push_back(i);
  }
  uint8_t m[LENT];
  memcpy(m, h, REQUEST);
  put32(m, PROXY_WRITE_MAGIC);
  put32(m + REQUEST, uint32_t(i));
  if (!send_all(p->inner, m, LENT)) {
    take_back(p, i);  // JavaScript never had the whole message
    return false;
  }
  return true;
}

/**
 * A requests thread: in turn with the others, reads the next request; serves it if it
 * is a read the table can serve (outside the turn, so the next request is read
 * meanwhile), forwards it to JavaScript otherwise.
 */
void *requests(void *arg) {
  Proxy *p = static_cast<Proxy *>(arg);
  Reader *r = ReaderNew(p->table->chunk_size);
  uint8_t h[REQUEST];
  for (;;) {
    uint64_t cookie = 0, offset = 0;
    uint32_t len = 0;
    {
      std::unique_lock<std::mutex> g(p->rmu);
      if (p->ended) break;
      if (!p->in || !from_client(p, h, REQUEST)) {
        p->ended = true;
        break;
      }
      uint32_t magic = be32(h);
      uint16_t flags = be16(h + 4), type = be16(h + 6);
      cookie = be64(h + 8), offset = be64(h + 16), len = be32(h + 24);
      if (magic == NBD_REQUEST_MAGIC && type == NBD_CMD_READ && (flags & ~(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF)) == 0 && len > 0 &&
          len <= p->max_read && offset <= p->size && len <= p->size - offset && r) {
        p->serving++;
      } else if (int i; magic == NBD_REQUEST_MAGIC && type == NBD_CMD_WRITE && len > 0 && len <= TableMaxWrite(p->table) &&
                        may_lend(p) && (i = TableTakeWrite(p->table)) >= 0) {
        // The payload into a buffer lent to JavaScript: it never passes the socket pair.
        if (!lend(p, h, i, len)) {
          p->ended = true;
          break;
        }
        continue;
      } else {
        // Not ours: JavaScript answers it, as it would without the proxy. A DISC waits for
        // the reads being served here: JavaScript may end the connection once it has it.
        if (magic == NBD_REQUEST_MAGIC && type == NBD_CMD_DISC) {
          p->ended = true;
          p->served.wait(g, [p] { return p->serving == 0; });
        }
        std::lock_guard<std::mutex> gi(p->imu);
        if (magic == PROXY_WRITE_MAGIC) put32(h, 0);  // not a LENT message: JavaScript must not take it for one
        bool ok = forward(p, h);
        if (ok && magic != NBD_REQUEST_MAGIC) {
          // The client broke the protocol: JavaScript says so and hangs up; it gets whatever follows.
          while (pass(p, true, p->inner, p->copy, p->in)) {
          }
          ok = false;
        } else if (ok && type == NBD_CMD_WRITE) {
          ok = pass(p, true, p->inner, len, p->in);
        }
        if (!ok) p->ended = true;
        if (p->ended) break;
        continue;
      }
    }
    bool sent = true;
    bool ok = serve(p, r, cookie, offset, len, &sent);
    if (!ok) {
      std::lock_guard<std::mutex> gi(p->imu);
      sent = forward(p, h);
    }
    std::lock_guard<std::mutex> g(p->rmu);
    if (--p->serving == 0) p->served.notify_all();
    if (!sent) {
      // A socket failed: the other requests threads stop reading too.
      p->ended = true;
      shutdown(p->client, SHUT_RD);
      break;
    }
  }
  bool last;
  {
    std::lock_guard<std::mutex> g(p->rmu);
    last = --p->readers == 0;
  }
  // Nothing more comes from the client: JavaScript sees the end of its requests.
  if (last) shutdown(p->inner, SHUT_WR);
  ReaderFree(r);
  unref(p);
  return nullptr;
}

/** The replies thread: JavaScript's replies to the client, whole. */
void *replies(void *arg) {
  Proxy *p = static_cast<Proxy *>(arg);
  uint8_t *buf = static_cast<uint8_t *>(sodium_malloc(p->copy));  // a read reply's plaintext passes here
  uint8_t h[STRUCTURED];
  while (buf && recv_all(p->inner, h, 4)) {
    uint32_t magic = be32(h);
    size_t hl;
    uint64_t payload = 0;
    if (magic == NBD_SIMPLE_REPLY_MAGIC) {
      hl = SIMPLE;
      if (!recv_all(p->inner, h + 4, SIMPLE - 4)) break;
      uint32_t error = be32(h + 4);
      uint64_t cookie = be64(h + 8);
      std::lock_guard<std::mutex> g(p->pmu);
      auto it = p->pending.find(cookie);
      if (it != p->pending.end()) {
        if (error == 0) payload = it->second.front();
        it->second.pop_front();
        if (it->second.empty()) p->pending.erase(it);
      }
    } else if (magic == NBD_STRUCTURED_REPLY_MAGIC) {
      hl = STRUCTURED;
      if (!recv_all(p->inner, h + 4, STRUCTURED - 4)) break;
      payload = be32(h + 16);
    } else {
      break;  // not a reply JavaScript writes: end the connection rather than pass on garbage
    }
    std::lock_guard<std::mutex> g(p->wmu);
    if (!send_all(p->client, h, hl) || !pass(p, false, p->client, payload, buf)) break;
  }
  // JavaScript ended the connection (or it broke): the client sees the end once every reply is out.
  shutdown(p->client, SHUT_RDWR);
  if (buf) sodium_free(buf);
  unref(p);
  return nullptr;
}

Proxy *get_proxy(napi_env env, napi_value v) {
  void *ptr = nullptr;
  napi_valuetype type;
  if (napi_typeof(env, v, &type) != napi_ok || type != napi_external || napi_get_value_external(env, v, &ptr) != napi_ok || !ptr) {
    throw_type(env, "lethe_native: expected an NBD proxy handle");
    return nullptr;
  }
  return static_cast<Proxy *>(ptr);
}

void Finalize(napi_env, void *data, void *) {
  Proxy *p = static_cast<Proxy *>(data);
  finish(p);
  reclaim(p, {});  // no JavaScript is left to give any back
  unref(p);
}

napi_value Start(napi_env env, napi_callback_info info) {
  napi_value argv[6];
  int32_t fd, readers;
  uint8_t *left;
  size_t left_len;
  bool structured;
  int64_t size;
  if (!get_args(env, info, 6, argv) || !get_i32(env, argv[1], &fd) || !get_bytes(env, argv[2], &left, &left_len) ||
      napi_get_value_bool(env, argv[3], &structured) != napi_ok || !get_i64(env, argv[4], &size) || !get_i32(env, argv[5], &readers))
    return nullptr;
  if (size < 0) return throw_type(env, "lethe_native: nbdProxyStart: a negative size");
  if (readers < 1 || readers > 16) return throw_type(env, "lethe_native: nbdProxyStart: readers must be 1 to 16");
  Table *table = TableRef(env, argv[0]);
  if (!table) return nullptr;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    int err = errno;
    TableUnref(table);
    return throw_errno(env, "socketpair", err);
  }
  int client = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (client < 0) {
    int err = errno;
    close(sv[0]), close(sv[1]);
    TableUnref(table);
    return throw_errno(env, "fcntl", err);
  }
  // Room in the socket for a few whole replies, so a requests thread hands its reply to
  // the kernel and goes on to the next read instead of waiting for the client to take
  // the last part (the kernel caps it at net.core.wmem_max).
  // The same between the proxy and JavaScript, both ways: a write's payload goes on
  // while JavaScript is busy with the last one.
  int sndbuf = SEND_BUFFER;
  setsockopt(client, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
  setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
  setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
  Proxy *p = new Proxy();
  p->table = table;
  p->client = client;
  p->inner = sv[0];
  p->structured = structured;
  p->size = uint64_t(size);
  p->max_read = TableMaxReply(table);
  p->copy = TableCopyBytes(table);
  p->leftover.assign(left, left + left_len);
  p->in = static_cast<uint8_t *>(sodium_malloc(p->copy));  // a write's payload passes here: locked, zeroed after each use; none, and the requests threads end at once
  p->readers = readers;
  p->refs = 1 + readers + 1;  // the handle, the requests threads, the replies thread
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_t t;
  int err = 0, started = 0;
  while (err == 0 && started < readers + 1) {
    err = pthread_create(&t, &attr, started == 0 ? replies : requests, p);
    if (err == 0) started++;
  }
  if (err != 0) {
    p->refs -= readers + 1 - started;  // threads that never ran; the handle's reference keeps p alive
    shut(p);                           // the ones that run end
  }
  pthread_attr_destroy(&attr);
  napi_value handle, inner, result;
  napi_create_external(env, p, Finalize, nullptr, &handle);
  if (err != 0) {
    close(sv[1]);
    return throw_errno(env, "pthread_create", err);
  }
  napi_create_int32(env, sv[1], &inner);
  napi_create_array_with_length(env, 2, &result);
  napi_set_element(env, result, 0, handle);
  napi_set_element(env, result, 1, inner);
  return result;
}

napi_value Stats(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!get_args(env, info, 1, argv)) return nullptr;
  Proxy *p = get_proxy(env, argv[0]);
  if (!p) return nullptr;
  return numbers(env, {{"reads", double(p->reads.load())}, {"bytes", double(p->bytes.load())}});
}

napi_value GiveWrite(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t i;
  if (!get_args(env, info, 2, argv)) return nullptr;
  Proxy *p = get_proxy(env, argv[0]);
  if (!p || !get_i32(env, argv[1], &i)) return nullptr;
  napi_value r;
  napi_get_boolean(env, take_back(p, i), &r);
  return r;
}

napi_value Close(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!get_args(env, info, 2, argv)) return nullptr;
  Proxy *p = get_proxy(env, argv[0]);
  bool is_array = false;
  uint32_t n = 0;
  if (!p) return nullptr;
  if (napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array) return throw_type(env, "lethe_native: nbdProxyClose: held must be an array of buffer indices");
  napi_get_array_length(env, argv[1], &n);
  std::vector<int> held;
  for (uint32_t k = 0; k < n; k++) {
    napi_value e;
    int32_t i;
    if (napi_get_element(env, argv[1], k, &e) != napi_ok || !get_i32(env, e, &i)) return nullptr;
    held.push_back(i);
  }
  finish(p);
  reclaim(p, held);
  return undefined(env);
}

}  // namespace

void DefineNbdProxy(napi_env env, napi_value exports) {
  const napi_property_descriptor props[] = {
      {"nbdProxyStart", nullptr, Start, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"nbdProxyStats", nullptr, Stats, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"nbdProxyGiveWrite", nullptr, GiveWrite, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"nbdProxyClose", nullptr, Close, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}

}  // namespace lethe
