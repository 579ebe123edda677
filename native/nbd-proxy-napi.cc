// The NBD read proxy's N-API functions (nbd-proxy.cc has the proxy itself and the
// calls it answers): start one on a connection, read its counters, take back a write
// buffer, close it.
#include <fcntl.h>
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>

#include "nbd-proxy.h"
#include "nbd-proxy-core.h"

namespace lethe {
namespace {

using namespace nbd_proxy;

constexpr int SEND_BUFFER = 1 << 20;

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
