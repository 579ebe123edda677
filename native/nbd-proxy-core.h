// The NBD read proxy's state, shared by its threads (nbd-proxy.cc) and its N-API
// functions (nbd-proxy-napi.cc). docs/nbd.md, "Reads in native code".
#pragma once
#include <stdint.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "disk-reads.h"
#include "disk-table.h"
#include "napi-helpers.h"

namespace lethe {
namespace nbd_proxy {

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

/** Lets go of one reference; the last closes the sockets and frees. */
void unref(Proxy *p);
/** Ends JavaScript's side of the pair (and stops reading from the client); replies already written still go out. */
void finish(Proxy *p);
/** Shuts both sockets: every thread ends. */
void shut(Proxy *p);
/** Takes write buffer i out of `p->lent` and frees it (zeroed); false if it was not there. */
bool take_back(Proxy *p, int i);
/** Frees every buffer lent through this connection but those in `held`. */
void reclaim(Proxy *p, const std::vector<int> &held);
/** The threads' bodies, for pthread_create, each holding a reference. */
void *requests(void *arg);
void *replies(void *arg);

}  // namespace nbd_proxy
}  // namespace lethe
