// Helpers the N-API translation units of lethe_native.node share (addon.cc,
// fault-server.cc, disk-reads.cc, nbd-proxy.cc, seal-write.cc): argument reading that
// throws a TypeError instead of crashing, errors shaped as node:fs shapes them
// (code = errno name, syscall), and counters as a plain object.
#pragma once
#include <node_api.h>

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <initializer_list>
#include <utility>

namespace lethe {

inline napi_value undefined(napi_env env) {
  napi_value v;
  napi_get_undefined(env, &v);
  return v;
}

inline napi_value make_errno_error(napi_env env, const char *syscall, int err) {
  const char *name = strerrorname_np(err);
  napi_value code, msg, error, num, sys;
  char text[256];
  snprintf(text, sizeof text, "%s: %s", syscall, strerror(err));
  napi_create_string_utf8(env, name ? name : "EUNKNOWN", NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg);
  napi_create_error(env, code, msg, &error);
  napi_create_int32(env, err, &num);
  napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &sys);
  napi_set_named_property(env, error, "errno", num);
  napi_set_named_property(env, error, "syscall", sys);
  return error;
}

inline napi_value throw_errno(napi_env env, const char *syscall, int err) {
  napi_throw(env, make_errno_error(env, syscall, err));
  return nullptr;
}

inline napi_value throw_type(napi_env env, const char *what) {
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", what);
  return nullptr;
}

inline bool get_args(napi_env env, napi_callback_info info, size_t n, napi_value *argv) {
  size_t argc = n;
  if (napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr) != napi_ok || argc < n) {
    throw_type(env, "lethe_native: too few arguments");
    return false;
  }
  return true;
}

inline bool get_i64(napi_env env, napi_value v, int64_t *out) {
  if (napi_get_value_int64(env, v, out) == napi_ok) return true;
  throw_type(env, "lethe_native: expected a number");
  return false;
}

inline bool get_i32(napi_env env, napi_value v, int32_t *out) {
  if (napi_get_value_int32(env, v, out) == napi_ok) return true;
  throw_type(env, "lethe_native: expected a number");
  return false;
}

/** The bytes of a Uint8Array (a Buffer is one). */
inline bool get_bytes(napi_env env, napi_value v, uint8_t **data, size_t *len) {
  bool is_typed = false;
  napi_typedarray_type type;
  void *p = nullptr;
  if (napi_is_typedarray(env, v, &is_typed) != napi_ok || !is_typed ||
      napi_get_typedarray_info(env, v, &type, len, &p, nullptr, nullptr) != napi_ok || type != napi_uint8_array) {
    throw_type(env, "lethe_native: expected a Uint8Array");
    return false;
  }
  /* SAFETY: p is the typed array's backing store, valid while the array is reachable (the call) */
  *data = static_cast<uint8_t *>(p);
  return true;
}

inline bool is_null(napi_env env, napi_value v) {
  napi_valuetype t;
  return napi_typeof(env, v, &t) == napi_ok && (t == napi_null || t == napi_undefined);
}

/** { name: number, ... } from (name, value) pairs: a stats call's answer. */
inline napi_value numbers(napi_env env, std::initializer_list<std::pair<const char *, double>> fields) {
  napi_value r, v;
  napi_create_object(env, &r);
  for (auto &f : fields) {
    napi_create_double(env, f.second, &v);
    napi_set_named_property(env, r, f.first, v);
  }
  return r;
}

}  // namespace lethe
