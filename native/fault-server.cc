// The fault server of lethe_native.node (addon.cc has the rest of the addon):
//
//   startFaultThread(uffd, cb, loop)       a native thread (or, with loop, the main libuv
//                                          loop) reading uffd events; each MISSING fault
//                                          calls cb(0, address, flags)
//   resolveFault(h, address, u8 | null)    UFFDIO_COPY of the page (or UFFDIO_ZEROPAGE)
//   wakeRange(h, address, length)          UFFDIO_WAKE
//   stopFaultThread(h), faultStats(h)
//
#include "fault-server.h"

#include <node_api.h>
#include <uv.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <atomic>

#include "napi-helpers.h"

namespace lethe {
namespace {

constexpr int MSGS_PER_READ = 16;
constexpr uint32_t KIND_FAULT = 0;
constexpr uint32_t KIND_ERROR = 1;

// Two ways to hear of faults, same handle, same resolveFault:
//   thread: a native thread polls the uffd and posts each fault through a threadsafe
//           function, which wakes the main thread (two wakeups a fault);
//   loop:   the main thread's libuv loop polls the uffd (uv_poll) and calls JS directly
//           (one wakeup a fault). docs/uffd.md has the measurements.

struct FaultThread {
  int uffd;
  long page;
  bool loop_mode = false;
  bool handle_gone = false;
  bool tsfn_gone = false;  // always true in loop mode
  std::atomic<bool> stopped{false};
  std::atomic<uint64_t> faults{0};
  uint64_t copied = 0, zeroed = 0, present = 0;  // main thread only
  // thread mode
  int stop_fd = -1;
  pthread_t thread;
  bool joined = true;
  napi_threadsafe_function tsfn = nullptr;
  // loop mode
  napi_env env = nullptr;
  uv_poll_t *poll = nullptr;
  napi_ref cb = nullptr;
  napi_async_context async_context = nullptr;
};

struct Msg {
  uint32_t kind;
  uint64_t address;
  uint64_t flags;  // UFFD_PAGEFAULT_FLAG_*; for KIND_ERROR the errno
  const char *what;
  uint32_t ptid = 0;  // the faulting thread (UFFD_FEATURE_THREAD_ID), 0 when not told
};

void call_now(FaultThread *t, const Msg &m);

/** Hands a message to JS: at once in loop mode, through the threadsafe function otherwise. */
void post(FaultThread *t, Msg m) {
  if (t->loop_mode) return call_now(t, m);
  Msg *copy = new Msg(m);
  if (napi_call_threadsafe_function(t->tsfn, copy, napi_tsfn_nonblocking) != napi_ok) delete copy;
}

void post_error(FaultThread *t, const char *what, int err) {
  post(t, Msg{KIND_ERROR, 0, (uint64_t)err, what});
}

/** Reads what the uffd holds and posts each message; false if reading failed (reported). */
bool drain(FaultThread *t) {
  struct uffd_msg msgs[MSGS_PER_READ];
  /* SAFETY: uffd is the caller's userfaultfd; read fills whole uffd_msg records into msgs */
  ssize_t n = read(t->uffd, msgs, sizeof msgs);
  if (n < 0) {
    if (errno == EAGAIN || errno == EINTR) return true;
    post_error(t, "read", errno);
    return false;
  }
  for (size_t i = 0; i < (size_t)n / sizeof msgs[0] && !t->stopped; i++) {
    if (msgs[i].event != UFFD_EVENT_PAGEFAULT) {
      post(t, Msg{KIND_ERROR, msgs[i].event, 0, "unexpected userfaultfd event"});
      continue;
    }
    t->faults++;
    post(t, Msg{KIND_FAULT, msgs[i].arg.pagefault.address, msgs[i].arg.pagefault.flags, nullptr, msgs[i].arg.pagefault.feat.ptid});
  }
  return true;
}

/** false when the thread should end (stop asked for, or the uffd failed). */
bool serve_once(FaultThread *t) {
  struct pollfd p[2] = {{t->uffd, POLLIN, 0}, {t->stop_fd, POLLIN, 0}};
  if (poll(p, 2, -1) < 0) {
    if (errno == EINTR) return true;
    post_error(t, "poll", errno);
    return false;
  }
  if (p[1].revents) return false;
  if (p[0].revents & (POLLERR | POLLNVAL)) {
    post_error(t, "poll", (p[0].revents & POLLNVAL) ? EBADF : EIO);
    return false;
  }
  return drain(t);
}

void *fault_loop(void *arg) {
  /* SAFETY: t outlives the thread: stop_thread joins it before anything frees t */
  FaultThread *t = static_cast<FaultThread *>(arg);
  while (serve_once(t)) {
  }
  napi_release_threadsafe_function(t->tsfn, napi_tsfn_release);
  return nullptr;
}

/** argv for the JS callback: (KIND_FAULT, address, flags, thread) or (KIND_ERROR, errno or event, what, 0). */
void fill_args(napi_env env, const Msg *m, napi_value argv[4]) {
  napi_create_uint32(env, m->kind, &argv[0]);
  if (m->kind == KIND_FAULT) {
    napi_create_double(env, (double)m->address, &argv[1]);  // user addresses are < 2^47: exact
    napi_create_uint32(env, (uint32_t)m->flags, &argv[2]);
  } else {
    napi_create_double(env, (double)(m->flags ? m->flags : m->address), &argv[1]);
    napi_create_string_utf8(env, m->what, NAPI_AUTO_LENGTH, &argv[2]);
  }
  napi_create_uint32(env, m->ptid, &argv[3]);
}

/** The wrapper catches the user's errors; anything else is a bug: crash the agent (and so
 * QEMU) rather than leave a fault unanswered and unexplained. */
void crash_on_exception(napi_env env, napi_status status) {
  if (status != napi_pending_exception) return;
  napi_value e;
  napi_get_and_clear_last_exception(env, &e);
  napi_fatal_exception(env, e);
}

/** Thread mode: runs on the main thread for each message the thread posted. */
void CallJs(napi_env env, napi_value cb, void *context, void *data) {
  /* SAFETY: t is freed only after TsfnFinalize, which runs after the last CallJs */
  FaultThread *t = static_cast<FaultThread *>(context);
  Msg *m = static_cast<Msg *>(data);
  if (env && cb && !t->stopped) {
    napi_value argv[4];
    fill_args(env, m, argv);
    crash_on_exception(env, napi_call_function(env, undefined(env), cb, 4, argv, nullptr));
  }
  delete m;
}

/** Loop mode: called from the uv_poll callback, on the main thread, inside a handle scope. */
void call_now(FaultThread *t, const Msg &m) {
  napi_value cb, global, argv[4];
  if (t->stopped || napi_get_reference_value(t->env, t->cb, &cb) != napi_ok || !cb) return;
  napi_get_global(t->env, &global);
  fill_args(t->env, &m, argv);
  crash_on_exception(t->env, napi_make_callback(t->env, t->async_context, global, cb, 4, argv, nullptr));
}

void stop_loop(FaultThread *t);

void on_readable(uv_poll_t *handle, int status, int) {
  /* SAFETY: stop_loop stops this poll before t can be freed, so no callback sees a freed t */
  FaultThread *t = static_cast<FaultThread *>(handle->data);
  napi_handle_scope scope;
  napi_open_handle_scope(t->env, &scope);
  bool ok = status < 0 ? (post_error(t, "uv_poll", -status), false) : drain(t);
  napi_close_handle_scope(t->env, scope);
  if (!ok) stop_loop(t);
}

void stop_loop(FaultThread *t) {
  if (!t->poll) return;
  t->stopped = true;
  uv_poll_stop(t->poll);
  uv_close(reinterpret_cast<uv_handle_t *>(t->poll), [](uv_handle_t *h) { delete reinterpret_cast<uv_poll_t *>(h); });
  t->poll = nullptr;
  napi_delete_reference(t->env, t->cb);
  napi_async_destroy(t->env, t->async_context);
}

void free_thread(FaultThread *t) {
  if (t->stop_fd >= 0) close(t->stop_fd);
  delete t;
}

void TsfnFinalize(napi_env, void *, void *context) {
  /* SAFETY: t is freed by whichever of the two finalizers runs last */
  FaultThread *t = static_cast<FaultThread *>(context);
  t->tsfn_gone = true;
  if (t->handle_gone) free_thread(t);
}

void stop_thread(FaultThread *t) {
  if (t->loop_mode) return stop_loop(t);
  if (t->joined) return;
  t->stopped = true;
  uint64_t one = 1;
  (void)!write(t->stop_fd, &one, sizeof one);
  pthread_join(t->thread, nullptr);
  t->joined = true;
}

void HandleFinalize(napi_env, void *data, void *) {
  /* SAFETY: t is freed by whichever of the two finalizers runs last */
  FaultThread *t = static_cast<FaultThread *>(data);
  stop_thread(t);
  t->handle_gone = true;
  if (t->tsfn_gone) free_thread(t);
}

bool get_thread(napi_env env, napi_value v, FaultThread **out) {
  napi_valuetype type;
  void *p;
  if (napi_typeof(env, v, &type) != napi_ok || type != napi_external || napi_get_value_external(env, v, &p) != napi_ok) {
    throw_type(env, "lethe_native: expected a fault thread handle");
    return false;
  }
  /* SAFETY: only StartFaultThread makes these externals, and t lives until both finalizers ran */
  *out = static_cast<FaultThread *>(p);
  return true;
}

napi_value start_thread(napi_env env, FaultThread *t, napi_value cb) {
  napi_value name;
  t->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (t->stop_fd < 0) {
    int err = errno;
    free_thread(t);
    return throw_errno(env, "eventfd", err);
  }
  napi_create_string_utf8(env, "lethe.faultThread", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, cb, nullptr, name, 0, 1, nullptr, TsfnFinalize, t, CallJs, &t->tsfn) != napi_ok) {
    free_thread(t);
    return throw_type(env, "lethe_native: cannot create the fault callback");
  }
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);  // the thread inherits a mask with every signal blocked
  int err = pthread_create(&t->thread, nullptr, fault_loop, t);
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  if (err != 0) {
    t->handle_gone = true;  // no handle will exist: TsfnFinalize frees t
    napi_release_threadsafe_function(t->tsfn, napi_tsfn_abort);
    return throw_errno(env, "pthread_create", err);
  }
  t->joined = false;
  return undefined(env);
}

napi_value start_loop(napi_env env, FaultThread *t, napi_value cb) {
  uv_loop_t *loop;
  napi_value name;
  t->loop_mode = true;
  t->tsfn_gone = true;
  t->env = env;
  t->poll = new uv_poll_t;
  t->poll->data = t;
  int err = napi_get_uv_event_loop(env, &loop) == napi_ok ? uv_poll_init(loop, t->poll, t->uffd) : UV_EINVAL;
  if (err != 0) {
    delete t->poll;
    free_thread(t);
    return throw_errno(env, "uv_poll_init", -err);
  }
  napi_create_reference(env, cb, 1, &t->cb);
  napi_create_string_utf8(env, "lethe.faultLoop", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, nullptr, name, &t->async_context);
  err = uv_poll_start(t->poll, UV_READABLE, on_readable);
  if (err != 0) {
    stop_loop(t);
    free_thread(t);  // the uv_close callback frees only the uv_poll_t
    return throw_errno(env, "uv_poll_start", -err);
  }
  return undefined(env);
}

/** startFaultThread(uffd, cb, loop): loop false runs a native thread, true polls on the main loop. */
napi_value StartFaultThread(napi_env env, napi_callback_info info) {
  napi_value argv[3], handle;
  int32_t uffd;
  bool loop;
  napi_valuetype type;
  if (!get_args(env, info, 3, argv) || !get_i32(env, argv[0], &uffd)) return nullptr;
  if (napi_typeof(env, argv[1], &type) != napi_ok || type != napi_function) return throw_type(env, "lethe_native: expected a callback");
  if (napi_get_value_bool(env, argv[2], &loop) != napi_ok) return throw_type(env, "lethe_native: expected a boolean");
  FaultThread *t = new FaultThread();
  t->uffd = uffd;
  t->page = sysconf(_SC_PAGESIZE);
  if (!(loop ? start_loop(env, t, argv[1]) : start_thread(env, t, argv[1]))) return nullptr;
  napi_create_external(env, t, HandleFinalize, nullptr, &handle);
  return handle;
}

napi_value ResolveFault(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  FaultThread *t;
  int64_t address;
  if (!get_args(env, info, 3, argv) || !get_thread(env, argv[0], &t) || !get_i64(env, argv[1], &address)) return nullptr;
  bool zero = is_null(env, argv[2]);
  uint8_t *data = nullptr;
  size_t len = (size_t)t->page;
  if (!zero && !get_bytes(env, argv[2], &data, &len)) return nullptr;
  int r;
  if (zero) {
    struct uffdio_zeropage z = {};
    z.range.start = (uint64_t)address;
    z.range.len = len;
    /* SAFETY: the kernel checks that the range lies in a registered range of the uffd's process */
    r = ioctl(t->uffd, UFFDIO_ZEROPAGE, &z);
  } else {
    struct uffdio_copy c = {};
    c.dst = (uint64_t)address;
    c.src = (uint64_t)(uintptr_t)data;
    c.len = len;
    /* SAFETY: src is the typed array's live store of len bytes; the kernel checks dst as above */
    r = ioctl(t->uffd, UFFDIO_COPY, &c);
  }
  if (r != 0 && errno != EEXIST) return throw_errno(env, zero ? "UFFDIO_ZEROPAGE" : "UFFDIO_COPY", errno);
  napi_value result;
  if (r != 0) {
    // Already present (served earlier, or another fault raced us): the copy did not
    // wake anyone, so wake the waiters on this range ourselves.
    struct uffdio_range range = {(uint64_t)address, len};
    /* SAFETY: range is a stack struct naming addresses in the uffd's registered range */
    if (ioctl(t->uffd, UFFDIO_WAKE, &range) != 0) return throw_errno(env, "UFFDIO_WAKE", errno);
    t->present++;
  } else if (zero) {
    t->zeroed++;
  } else {
    t->copied++;
  }
  napi_create_uint32(env, r != 0 ? 1 : 0, &result);
  return result;
}

napi_value WakeRange(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  FaultThread *t;
  int64_t address, length;
  if (!get_args(env, info, 3, argv) || !get_thread(env, argv[0], &t) || !get_i64(env, argv[1], &address) ||
      !get_i64(env, argv[2], &length))
    return nullptr;
  struct uffdio_range range = {(uint64_t)address, (uint64_t)length};
  /* SAFETY: range is a stack struct; the kernel checks it against the registered range */
  if (ioctl(t->uffd, UFFDIO_WAKE, &range) != 0) return throw_errno(env, "UFFDIO_WAKE", errno);
  return undefined(env);
}

napi_value StopFaultThread(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  FaultThread *t;
  if (!get_args(env, info, 1, argv) || !get_thread(env, argv[0], &t)) return nullptr;
  stop_thread(t);
  return undefined(env);
}

napi_value FaultStats(napi_env env, napi_callback_info info) {
  napi_value argv[1], result, v;
  FaultThread *t;
  if (!get_args(env, info, 1, argv) || !get_thread(env, argv[0], &t)) return nullptr;
  napi_create_object(env, &result);
  const struct {
    const char *name;
    uint64_t value;
  } fields[] = {{"faults", t->faults.load()}, {"copied", t->copied}, {"zeroed", t->zeroed}, {"present", t->present}};
  for (const auto &f : fields) {
    napi_create_double(env, (double)f.value, &v);
    napi_set_named_property(env, result, f.name, v);
  }
  return result;
}

}  // namespace

void DefineFaultServer(napi_env env, napi_value exports) {
  const napi_property_descriptor props[] = {
      {"startFaultThread", nullptr, StartFaultThread, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"resolveFault", nullptr, ResolveFault, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"wakeRange", nullptr, WakeRange, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"stopFaultThread", nullptr, StopFaultThread, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"faultStats", nullptr, FaultStats, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}

}  // namespace lethe
