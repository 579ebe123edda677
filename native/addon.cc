// lethe_native.node: the agent's side of the memory path, written against the plain
// N-API C interface (node_api.h; no node-addon-api, no C++ exceptions).
//
//   punchHole(fd, offset, length)          fallocate(PUNCH_HOLE | KEEP_SIZE)
//   mlock(u8) / munlock(u8) / memzero(u8)  on a Uint8Array's bytes
//   recvFd(sock, bytes, timeoutMs)         Promise<{fd, data, peerPid}>: SCM_RIGHTS + header
//   peerCredentials(sock)                  {pid, uid, gid} of a connected unix socket's peer (SO_PEERCRED)
//   startFaultThread, resolveFault, wakeRange, stopFaultThread, faultStats: fault-server.cc
//   diskReads*: disk-reads.cc; nbdProxy*: nbd-proxy.cc; sealWrite: seal-write.cc
//
// native/index.ts validates every argument before it gets here (STYLE.md habit 10);
// the checks below only keep a wrong call from crashing the process. Failed system
// calls throw an Error whose code is the errno name (EBADF, …) and whose syscall names
// the call, as node:fs does.
#include <node_api.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "disk-reads.h"
#include "fault-server.h"
#include "nbd-proxy.h"
#include "seal-write.h"
#include "napi-helpers.h"

namespace {

using namespace lethe;

constexpr size_t MAX_HEADER_BYTES = 256;

// ---- memory ----

napi_value PunchHole(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t fd;
  int64_t offset, length;
  if (!get_args(env, info, 3, argv) || !get_i32(env, argv[0], &fd) || !get_i64(env, argv[1], &offset) ||
      !get_i64(env, argv[2], &length))
    return nullptr;
  if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0)
    return throw_errno(env, "fallocate", errno);
  return undefined(env);
}

template <int (*op)(const void *, size_t), const char *name>
napi_value LockOp(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  uint8_t *data;
  size_t len;
  if (!get_args(env, info, 1, argv) || !get_bytes(env, argv[0], &data, &len)) return nullptr;
  /* SAFETY: [data, data+len) is the typed array's live backing store, which V8 never moves */
  if (op(data, len) != 0) return throw_errno(env, name, errno);
  return undefined(env);
}
constexpr char MLOCK[] = "mlock";
constexpr char MUNLOCK[] = "munlock";

napi_value Memzero(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  uint8_t *data;
  size_t len;
  if (!get_args(env, info, 1, argv) || !get_bytes(env, argv[0], &data, &len)) return nullptr;
  /* SAFETY: [data, data+len) is the typed array's live backing store */
  explicit_bzero(data, len);
  return undefined(env);
}

// ---- peerCredentials ----

napi_value PeerCredentials(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t sock;
  if (!get_args(env, info, 1, argv) || !get_i32(env, argv[0], &sock)) return nullptr;
  struct ucred cred;
  socklen_t len = sizeof cred;
  /* SAFETY: sock is the caller's socket fd; the kernel writes at most len bytes into the stack struct cred */
  if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return throw_errno(env, "getsockopt", errno);
  if (len != sizeof cred) return throw_errno(env, "getsockopt", EPROTO);
  napi_value result, pid, uid, gid;
  napi_create_object(env, &result);
  napi_create_int32(env, cred.pid, &pid);
  napi_create_uint32(env, cred.uid, &uid);
  napi_create_uint32(env, cred.gid, &gid);
  napi_set_named_property(env, result, "pid", pid);
  napi_set_named_property(env, result, "uid", uid);
  napi_set_named_property(env, result, "gid", gid);
  return result;
}

// ---- recvFd ----

struct RecvWork {
  int sock;
  size_t want;
  int timeout_ms;
  napi_deferred deferred;
  napi_async_work work;
  uint8_t data[MAX_HEADER_BYTES];
  size_t got = 0;
  int fd = -1;
  int err = 0;                  // errno, or 0 with `problem` set
  const char *syscall = nullptr;
  const char *problem = nullptr;  // a protocol failure: code then message
  const char *problem_text = nullptr;
  pid_t peer = 0;
};

int64_t now_ms() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

/** Keeps the first fd of an SCM_RIGHTS message and closes any other; false if there were others. */
bool take_fds(RecvWork *w, struct msghdr *msg) {
  bool only_one = true;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < n; i++) {
      int fd;
      /* SAFETY: received fd; CMSG_DATA holds n ints within cmsg_len, copied out unaligned */
      memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      if (w->fd < 0) {
        w->fd = fd;
      } else {
        close(fd);
        only_one = false;
      }
    }
  }
  return only_one;
}

/** One recvmsg; false when the work is finished (done or failed). */
bool recv_some(RecvWork *w) {
  union {
    char buf[CMSG_SPACE(4 * sizeof(int))];
    struct cmsghdr align;
  } control;
  struct iovec iov = {w->data + w->got, w->want - w->got};
  struct msghdr msg = {};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.buf;
  msg.msg_controllen = sizeof control.buf;
  ssize_t n = recvmsg(w->sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  if (n < 0) {
    if (errno == EAGAIN || errno == EINTR) return true;
    w->err = errno;
    w->syscall = "recvmsg";
    return false;
  }
  bool only_one = take_fds(w, &msg);
  if (!only_one || (msg.msg_flags & MSG_CTRUNC)) {
    w->problem = "EXTRA_FD";
    w->problem_text = "recvmsg: more than one file descriptor was sent";
    return false;
  }
  if (n == 0) {
    w->problem = "EOF";
    w->problem_text = "recvmsg: the peer closed the socket before sending the whole header";
    return false;
  }
  w->got += n;
  return w->got < w->want;
}

void RecvExecute(napi_env, void *data) {
  /* SAFETY: w lives until RecvComplete, which runs after this returns */
  RecvWork *w = static_cast<RecvWork *>(data);
  int64_t deadline = now_ms() + w->timeout_ms;
  for (;;) {
    struct pollfd p = {w->sock, POLLIN, 0};
    int64_t left = deadline - now_ms();
    int r = left <= 0 ? 0 : poll(&p, 1, (int)left);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      w->err = r == 0 ? ETIMEDOUT : errno;
      w->syscall = "poll";
      break;
    }
    if (!recv_some(w)) break;
  }
  if (!w->err && !w->problem && w->fd < 0) {
    w->problem = "NO_FD";
    w->problem_text = "recvmsg: no file descriptor came with the header";
  }
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(w->sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) w->peer = cred.pid;
}

void RecvComplete(napi_env env, napi_status, void *data) {
  /* SAFETY: w was made by RecvFd and is deleted only here */
  RecvWork *w = static_cast<RecvWork *>(data);
  if (w->err || w->problem) {
    if (w->fd >= 0) close(w->fd);
    napi_value error;
    if (w->err) {
      error = make_errno_error(env, w->syscall, w->err);
    } else {
      napi_value code, msg;
      napi_create_string_utf8(env, w->problem, NAPI_AUTO_LENGTH, &code);
      napi_create_string_utf8(env, w->problem_text, NAPI_AUTO_LENGTH, &msg);
      napi_create_error(env, code, msg, &error);
    }
    napi_reject_deferred(env, w->deferred, error);
  } else {
    napi_value result, fd, buf, peer;
    napi_create_object(env, &result);
    napi_create_int32(env, w->fd, &fd);
    napi_create_buffer_copy(env, w->got, w->data, nullptr, &buf);
    napi_create_int32(env, w->peer, &peer);
    napi_set_named_property(env, result, "fd", fd);
    napi_set_named_property(env, result, "data", buf);
    napi_set_named_property(env, result, "peerPid", peer);
    napi_resolve_deferred(env, w->deferred, result);
  }
  napi_delete_async_work(env, w->work);
  delete w;
}

napi_value RecvFd(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t sock, want, timeout;
  if (!get_args(env, info, 3, argv) || !get_i32(env, argv[0], &sock) || !get_i32(env, argv[1], &want) ||
      !get_i32(env, argv[2], &timeout))
    return nullptr;
  if (want <= 0 || (size_t)want > MAX_HEADER_BYTES || timeout < 0) return throw_type(env, "lethe_native: bad recvFd size or timeout");
  RecvWork *w = new RecvWork();
  w->sock = sock;
  w->want = (size_t)want;
  w->timeout_ms = timeout;
  napi_value promise, name;
  napi_create_promise(env, &w->deferred, &promise);
  napi_create_string_utf8(env, "lethe.recvFd", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, nullptr, name, RecvExecute, RecvComplete, w, &w->work);
  napi_queue_async_work(env, w->work);
  return promise;
}

napi_value Init(napi_env env, napi_value exports) {
  const napi_property_descriptor props[] = {
      {"punchHole", nullptr, PunchHole, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"mlock", nullptr, LockOp<mlock, MLOCK>, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"munlock", nullptr, LockOp<munlock, MUNLOCK>, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"memzero", nullptr, Memzero, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"recvFd", nullptr, RecvFd, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"peerCredentials", nullptr, PeerCredentials, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  DefineFaultServer(env, exports);
  DefineDiskReads(env, exports);
  DefineNbdProxy(env, exports);
  DefineSealWrite(env, exports);
  return exports;
}

}  // namespace

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
