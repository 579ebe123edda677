// Stable error codes for programs (HTTP API bodies, --json output). docs/errors.md
// lists them with what a caller should do; keep the two in step.

export const ERROR_CODES = {
  BAD_REQUEST: 400,
  BAD_JSON: 400,
  BODY_TOO_LARGE: 413,
  UNSUPPORTED_ENCODING: 415,
  RATE_LIMITED: 429,
  NOT_FOUND: 404,
  AUTH_FAILED: 401,
  ADMIN_AUTH_FAILED: 401,
  SIGNATURE_STALE: 401,
  SIGNATURE_REPLAYED: 401,
  ENROLL_TOKEN_INVALID: 401,
  METRICS_AUTH_FAILED: 401,
  LOGIN_FAILED: 401,
  FORBIDDEN: 403,
  CSRF_FAILED: 403,
  DEVICE_REVOKED: 403,
  DEVICE_WIPE_PENDING: 403,
  DEVICE_WIPED: 403,
  NOT_ASSIGNED: 403,
  LEASE_EXPIRED: 403,
  DEVICE_UNSEALED: 403,
  UNKNOWN_DEVICE: 404,
  UNKNOWN_IMAGE: 404,
  UNKNOWN_VERSION: 404,
  UNKNOWN_LEASE: 404,
  UNKNOWN_CHUNK: 404,
  UNKNOWN_COMMAND: 404,
  UNKNOWN_USER: 404,
  CONFLICT: 409,
  KEY_RELEASE_LIMIT: 429,
  NOT_A_BRANCH: 409,
  VERSION_DRAFT: 409,
  AUDIT_UNAVAILABLE: 503,
  DATABASE_UNAVAILABLE: 503,
  INTERNAL: 500,
  // client-side only
  SERVER_UNREACHABLE: 0,
  PIN_MISMATCH: 0,
  CONFIG: 0,
  TAMPERED: 0,
  DEVICE_LOCKED: 0,
  UNLOCK_FAILED: 0,
  TPM_UNAVAILABLE: 0,
  NOT_ACKNOWLEDGED: 0,
  VM_FAILED: 0,
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

/** An error with a stable code; `hint` tells a person what to do next. */
export class LetheError extends Error {
  readonly code: ErrorCode;
  readonly hint?: string;
  readonly status: number;

  constructor(code: ErrorCode, message: string, opts: { hint?: string; cause?: unknown; status?: number } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'LetheError';
    this.code = code;
    this.hint = opts.hint;
    this.status = opts.status ?? ERROR_CODES[code];
  }

  toJSON(): { code: ErrorCode; message: string; hint?: string } {
    return { code: this.code, message: this.message, ...(this.hint ? { hint: this.hint } : {}) };
  }
}

export function isLetheError(e: unknown, code?: ErrorCode): e is LetheError {
  return e instanceof LetheError && (code === undefined || e.code === code);
}

/** The message of an error and all its causes, joined the way a person reads them. */
export function errorChain(e: unknown): string {
  const parts: string[] = [];
  let cur: unknown = e;
  while (cur !== undefined && cur !== null && parts.length < 8) {
    parts.push(cur instanceof Error ? cur.message : String(cur));
    cur = cur instanceof Error ? (cur as Error & { cause?: unknown }).cause : undefined;
  }
  return parts.join(': ');
}
