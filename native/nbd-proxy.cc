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
// The threads are here; the N-API functions in nbd-proxy-napi.cc, the state they
// share in nbd-proxy-core.h.
//
//   nbdProxyStart(table, fd, leftover, structured, size, readers) → [handle, innerFd]
//   nbdProxyStats(h) → { reads, bytes }        reads answered here
//   nbdProxyGiveWrite(h, i) → bool             write buffer i back from JavaScript, zeroed; false if
//                                              this connection did not lend it
//   nbdProxyClose(h, held)                     JavaScript's side ends; the client's once every reply is
//                                              out. Buffers lent here and not in `held` (lent messages
//                                              JavaScript never read) are zeroed and freed now
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

#include "nbd-proxy-core.h"

namespace lethe {
namespace nbd_proxy {

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
static_assert(STRUCTURED + 8 <= REPLY_HEADER_ROOM, "a structured read reply's header fits before the data");

uint16_t be16(const uint8_t *p) { return uint16_t(p[0] << 8 | p[1]); }
uint32_t be32(const uint8_t *p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }
uint64_t be64(const uint8_t *p) { return uint64_t(be32(p)) << 32 | be32(p + 4); }
void put16(uint8_t *p, uint16_t v) { p[0] = uint8_t(v >> 8), p[1] = uint8_t(v); }
void put32(uint8_t *p, uint32_t v) { put16(p, uint16_t(v >> 16)), put16(p + 2, uint16_t(v)); }
void put64(uint8_t *p, uint64_t v) { put32(p, uint32_t(v >> 32)), put32(p + 4, uint32_t(v)); }

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

/** n bytes from fd into b; `got`, if given, says how many came (all of them, unless it returns false). */
bool recv_all(int fd, uint8_t *b, size_t n, size_t *got = nullptr) {
  size_t done = 0;
  while (done < n) {
    /* SAFETY: [b + done, b + n) lies in the caller's buffer */
    ssize_t k = recv(fd, b + done, n - done, MSG_DONTWAIT);
    if (k < 0 && (errno == EINTR || ((errno == EAGAIN || errno == EWOULDBLOCK) && wait_for(fd, POLLIN)))) continue;
    if (k <= 0) break;
    done += size_t(k);
  }
  if (got) *got = done;
  return done == n;
}

/** n bytes from the client: first what the handshake left over, then the socket; `got` as recv_all's. */
bool from_client(Proxy *p, uint8_t *b, size_t n, size_t *got = nullptr) {
  size_t have = std::min(n, p->leftover.size() - p->leftover_at);
  if (have > 0) {
    memcpy(b, p->leftover.data() + p->leftover_at, have);
    sodium_memzero(p->leftover.data() + p->leftover_at, have);
    p->leftover_at += have;
  }
  size_t rest = 0;
  bool ok = recv_all(p->client, b + have, n - have, &rest);
  if (got) *got = have + rest;
  return ok;
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
  bool ok = TableRead(p->table, r, offset, data, len, true);
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
    // Counted before the reply goes: a client that has its reply may look at the counts at once.
    p->reads++;
    p->bytes += len;
    std::lock_guard<std::mutex> g(p->wmu);
    *sent = send_all(p->client, hdr, hl + len);
    if (!*sent) {
      p->reads--;
      p->bytes -= len;
    }
  }
  sodium_memzero(data, len);
  TableGiveReply(p->table, reply);
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
  bool filled = from_client(p, buf, len, &got);
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

}  // namespace

}  // namespace lethe
