// Named administrators (docs/console.md): accounts with a role, passwords
// hashed with Argon2id, a TOTP second factor for admins, per-user API tokens for
// the CLI and browser sessions for the console. Secrets (tokens, session ids) are
// kept as SHA-256 digests only. The init token is a bootstrap: it acts as an
// admin while no named admin exists, and is refused from the first one on.
import sodium from 'sodium-native';
import { b64u, constantTimeEqual, randomBytes, sha256 } from '../common/crypto.js';
import { iso } from '../common/duration.js';
import { LetheError } from '../common/errors.js';
import { base32Decode, base32Encode, otpauthUri, totpStep } from '../common/totp.js';
import { inTx, newId, type Ctx } from './context.js';

export const ROLES = ['admin', 'auditor', 'helpdesk'] as const;
export type Role = (typeof ROLES)[number];

/** What a request may do; each admin route and console action names the one it needs. */
export type Permission =
  | 'devices.read' // devices, their commands and status
  | 'devices.enroll' // enrollment tokens
  | 'devices.act' // revoke, wipe, assign, unassign
  | 'images.read' // images, versions, manifests, policies
  | 'images.write' // push, policy, remove, promote, trust, export (plaintext)
  | 'audit.read' // the log, its verification, exposure reports
  | 'server.admin' // key and certificate rotation
  | 'users.manage'; // accounts and other users' tokens

const GRANTS: Record<Role, readonly Permission[]> = {
  admin: ['devices.read', 'devices.enroll', 'devices.act', 'images.read', 'images.write', 'audit.read', 'server.admin', 'users.manage'],
  auditor: ['devices.read', 'images.read', 'audit.read'],
  helpdesk: ['devices.read', 'devices.enroll'],
};

export const can = (role: Role, p: Permission): boolean => GRANTS[role].includes(p);

/** A session is ended after this long without a request… */
export const SESSION_IDLE_MS = 30 * 60_000;
/** …and after this long in any case. */
export const SESSION_MAX_MS = 12 * 3600_000;
/** seen_at is written at most this often (not on every request). */
const SEEN_EVERY_MS = 30_000;
export const TOKEN_TTL_DEFAULT_MS = 30 * 86_400_000;
export const TOKEN_TTL_MAX_MS = 365 * 86_400_000;
export const PASSWORD_MIN = 12;
const PASSWORD_MAX = 1024;
const USER_NAME = /^[a-z][a-z0-9._-]{0,63}$/;
const TOKEN_PREFIX = 'lethe-admin-';

/** Who is making a request, and through what. */
export interface Principal {
  /** As audit entries name it: `user:NAME`, or `token:` + 8 hex digits for the bootstrap token. */
  actor: string;
  user: string | null;
  role: Role;
  via: 'bootstrap' | 'token' | 'session';
  /** For a session: its id digest and CSRF token. */
  session?: { id: string; csrf: string; expiresAt: number };
}

interface UserRow {
  name: string;
  role: Role;
  pw_hash: string;
  totp_secret: string | null;
  totp_step: number;
  created_at: number;
  created_by: string;
  last_login: number | null;
}

export function checkUserName(name: string): string {
  if (!USER_NAME.test(name)) {
    throw new LetheError('BAD_REQUEST', `bad user name '${name.slice(0, 80)}'`, { hint: 'use lowercase letters, digits, dot, dash or underscore, starting with a letter (at most 64)' });
  }
  return name;
}

export function checkRole(role: string): Role {
  if (!(ROLES as readonly string[]).includes(role)) throw new LetheError('BAD_REQUEST', `unknown role '${role.slice(0, 40)}'`, { hint: `use one of ${ROLES.join(', ')}` });
  return role as Role;
}

function checkPassword(pw: string): void {
  if (pw.length < PASSWORD_MIN) throw new LetheError('BAD_REQUEST', `the password is shorter than ${PASSWORD_MIN} characters`, { hint: 'use a longer passphrase' });
  if (pw.length > PASSWORD_MAX) throw new LetheError('BAD_REQUEST', `the password is longer than ${PASSWORD_MAX} characters`);
}

async function hashPassword(pw: string): Promise<string> {
  const out = Buffer.alloc(sodium.crypto_pwhash_STRBYTES);
  const input = Buffer.from(pw, 'utf8');
  try {
    await sodium.crypto_pwhash_str_async(out, input, sodium.crypto_pwhash_OPSLIMIT_INTERACTIVE, sodium.crypto_pwhash_MEMLIMIT_INTERACTIVE);
  } finally {
    sodium.sodium_memzero(input);
  }
  return out.toString('utf8').replace(/\0+$/, '');
}

/** A hash no password matches: an unknown user costs the same time as a wrong password. */
let decoy: Promise<string> | undefined;

async function passwordMatches(hash: string | undefined, pw: string): Promise<boolean> {
  const str = Buffer.alloc(sodium.crypto_pwhash_STRBYTES);
  str.write(hash ?? (await (decoy ??= hashPassword(b64u.encode(randomBytes(24))))), 'utf8');
  const input = Buffer.from(pw.slice(0, PASSWORD_MAX), 'utf8');
  try {
    return (await sodium.crypto_pwhash_str_verify_async(str, input)) && hash !== undefined;
  } catch {
    return false;
  } finally {
    sodium.sodium_memzero(input);
  }
}

const getUser = (ctx: Ctx, name: string) => ctx.db.get<UserRow>('SELECT * FROM users WHERE name = ?', name);

async function mustGetUser(ctx: Ctx, name: string): Promise<UserRow> {
  const u = await getUser(ctx, name);
  if (!u) throw new LetheError('UNKNOWN_USER', `no user '${name.slice(0, 80)}'`, { hint: "'lethe admin user ls' lists them" });
  return u;
}

export async function adminCount(ctx: Ctx): Promise<number> {
  return Number((await ctx.db.get<{ n: number }>("SELECT COUNT(*) AS n FROM users WHERE role = 'admin'"))!.n);
}

/**
 * Adds a user. An admin gets a TOTP secret, returned once (for the person's
 * authenticator app) and needed at every login. The first admin retires the
 * bootstrap token.
 */
export async function addUser(ctx: Ctx, by: Principal, name: string, role: Role, password: string) {
  checkUserName(name);
  checkPassword(password);
  const hash = await hashPassword(password);
  const secret = role === 'admin' ? randomBytes(20) : null;
  return inTx(ctx, async (c) => {
    await c.db.lock('lethe.users');
    if (await getUser(c, name)) throw new LetheError('CONFLICT', `user '${name}' exists already`, { hint: "remove it first, or use 'lethe admin user passwd'" });
    const first = role === 'admin' && (await adminCount(c)) === 0;
    await c.db.run(
      'INSERT INTO users(name, role, pw_hash, totp_secret, created_at, created_by) VALUES (?, ?, ?, ?, ?, ?)',
      name,
      role,
      hash,
      secret ? base32Encode(secret) : null,
      c.now(),
      by.actor,
    );
    await c.audit.append('user.add', null, { user: name, role, ...(first ? { bootstrapRetired: true } : {}) }, c.now());
    return {
      name,
      role,
      bootstrapRetired: first,
      ...(secret ? { totp: { secret: base32Encode(secret), uri: otpauthUri(secret, name) } } : {}),
    };
  });
}

export async function listUsers(ctx: Ctx) {
  const users = await ctx.db.all<UserRow>('SELECT * FROM users ORDER BY name');
  const now = ctx.now();
  const tokens = await ctx.db.all<{ user_name: string; n: number }>('SELECT user_name, COUNT(*) AS n FROM api_tokens WHERE expires_at > ? GROUP BY user_name', now);
  const sessions = await ctx.db.all<{ user_name: string; n: number }>('SELECT user_name, COUNT(*) AS n FROM sessions WHERE expires_at > ? AND seen_at > ? GROUP BY user_name', now, now - SESSION_IDLE_MS);
  const count = (rows: { user_name: string; n: number }[], name: string) => Number(rows.find((r) => r.user_name === name)?.n ?? 0);
  return users.map((u) => ({
    name: u.name,
    role: u.role,
    totp: u.totp_secret !== null,
    createdAt: iso(u.created_at),
    createdBy: u.created_by,
    lastLogin: u.last_login === null ? null : iso(u.last_login),
    tokens: count(tokens, u.name),
    sessions: count(sessions, u.name),
  }));
}

/** Removes a user with their tokens and sessions; the last admin stays. */
export async function removeUser(ctx: Ctx, name: string) {
  return inTx(ctx, async (c) => {
    await c.db.lock('lethe.users');
    const u = await mustGetUser(c, name);
    if (u.role === 'admin' && (await adminCount(c)) === 1) {
      throw new LetheError('CONFLICT', `'${name}' is the last admin`, { hint: 'add another admin first: without one, nobody could manage users' });
    }
    await c.db.run('DELETE FROM api_tokens WHERE user_name = ?', name);
    await c.db.run('DELETE FROM sessions WHERE user_name = ?', name);
    await c.db.run('DELETE FROM users WHERE name = ?', name);
    await c.audit.append('user.rm', null, { user: name, role: u.role }, c.now());
    return { removed: name };
  });
}

/** An admin sets another user's password; that user's browser sessions end (their API tokens stay). */
export async function setPassword(ctx: Ctx, name: string, password: string) {
  checkPassword(password);
  const hash = await hashPassword(password);
  return inTx(ctx, async (c) => {
    await mustGetUser(c, name);
    await c.db.run('UPDATE users SET pw_hash = ? WHERE name = ?', hash, name);
    const ended = await c.db.run('DELETE FROM sessions WHERE user_name = ?', name);
    await c.audit.append('user.passwd', null, { user: name, sessionsEnded: ended.changes }, c.now());
    return { user: name, sessionsEnded: ended.changes };
  });
}

const loginFailed = () =>
  new LetheError('LOGIN_FAILED', 'user name, password or one-time code wrong', { hint: 'an admin needs the 6-digit code of their authenticator app; each code is good once' });

/**
 * Checks a login (password, and for an admin a TOTP code not used before). One
 * uniform failure for an unknown user, a wrong password and a wrong code; each
 * failure and success is audited with the address it came from.
 * @throws LetheError LOGIN_FAILED
 */
export async function checkLogin(ctx: Ctx, name: string, password: string, code: string | undefined, from: { address: string; via: 'console' | 'cli' }) {
  return proveIdentity(ctx, name, password, code, from, async (c, u) => {
    await c.db.run('UPDATE users SET last_login = ? WHERE name = ?', c.now(), name);
    await c.audit.append('user.login', null, { user: name, address: from.address, via: from.via }, c.now());
    return { name: u.name, role: u.role };
  });
}

/**
 * Checks a user's password and (for a user with TOTP) a code not used before,
 * then runs `then` in the transaction that records the code as used. A failure
 * is audited (`user.login-failed`, the name only if such a user exists) and
 * thrown as LOGIN_FAILED, one error for every cause.
 */
async function proveIdentity<T>(
  ctx: Ctx,
  name: string,
  password: string,
  code: string | undefined,
  from: { address: string; via: string },
  then: (c: Ctx, u: UserRow) => Promise<T>,
): Promise<T> {
  const known = USER_NAME.test(name) ? await getUser(ctx, name) : undefined;
  const pwOk = await passwordMatches(known?.pw_hash, password);
  const fail = async (reason: string) => {
    // A name that is no user's is not kept: it may be a password typed into the wrong field.
    await ctx.audit.append('user.login-failed', null, { user: known ? name : '?', reason, address: from.address, via: from.via }, ctx.now());
    return loginFailed();
  };
  if (!known || !pwOk) throw await fail(known ? 'password' : 'unknown user');
  const r = await inTx(ctx, async (c): Promise<{ failed: string } | { done: T }> => {
    const u = (await c.db.get<UserRow>('SELECT * FROM users WHERE name = ?' + (c.db.dialect === 'postgres' ? ' FOR UPDATE' : ''), name))!;
    if (u.totp_secret !== null) {
      const step = code === undefined ? null : totpStep(base32Decode(u.totp_secret), code.trim(), c.now());
      if (step === null) return { failed: 'one-time code' };
      if (step <= u.totp_step) return { failed: 'one-time code used before' };
      await c.db.run('UPDATE users SET totp_step = ? WHERE name = ?', step, name);
    }
    return { done: await then(c, u) };
  });
  if ('failed' in r) throw await fail(r.failed);
  return r.done;
}

/**
 * A user changes their own password: only with the current one (and a one-time
 * code, for a user with TOTP), so a stolen session or a token made for a script
 * cannot turn itself into a lasting login. Their browser sessions end.
 */
export async function changeOwnPassword(ctx: Ctx, name: string, current: string, code: string | undefined, password: string, from: { address: string; via: string }) {
  checkPassword(password);
  const hash = await hashPassword(password);
  return proveIdentity(ctx, name, current, code, from, async (c) => {
    await c.db.run('UPDATE users SET pw_hash = ? WHERE name = ?', hash, name);
    const ended = await c.db.run('DELETE FROM sessions WHERE user_name = ?', name);
    await c.audit.append('user.passwd', null, { user: name, sessionsEnded: ended.changes, own: true }, c.now());
    return { user: name, sessionsEnded: ended.changes };
  });
}

// ---- API tokens ----

export async function createToken(ctx: Ctx, user: { name: string; role: Role }, opts: { role?: Role; label?: string; ttlMs?: number } = {}) {
  const role = opts.role ?? user.role;
  if (!GRANTS[role].every((p) => can(user.role, p))) {
    throw new LetheError('FORBIDDEN', `a ${user.role} cannot make a token with role ${role}`, { hint: 'a token can have your role or one that may do less' });
  }
  const ttl = opts.ttlMs ?? TOKEN_TTL_DEFAULT_MS;
  if (!(ttl >= 60_000 && ttl <= TOKEN_TTL_MAX_MS)) throw new LetheError('BAD_REQUEST', `token lifetime ${ttl} ms is outside 1 minute … 365 days`);
  const label = (opts.label ?? '').slice(0, 80);
  const secret = TOKEN_PREFIX + b64u.encode(randomBytes(32));
  const id = newId('tok');
  const now = ctx.now();
  await inTx(ctx, async (c) => {
    await c.db.run(
      'INSERT INTO api_tokens(id, user_name, token_sha256, role, label, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)',
      id,
      user.name,
      sha256(secret).toString('hex'),
      role,
      label,
      now,
      now + ttl,
    );
    await c.audit.append('token.create', null, { user: user.name, token: id, role, expiresAt: iso(now + ttl) }, now);
  });
  return { id, token: secret, user: user.name, role, label, expiresAt: iso(now + ttl) };
}

export async function listTokens(ctx: Ctx, user?: string) {
  const rows = await ctx.db.all<{ id: string; user_name: string; role: Role; label: string; created_at: number; expires_at: number; last_used: number | null }>(
    `SELECT id, user_name, role, label, created_at, expires_at, last_used FROM api_tokens WHERE expires_at > ?${user ? ' AND user_name = ?' : ''} ORDER BY created_at`,
    ...(user ? [ctx.now(), user] : [ctx.now()]),
  );
  return rows.map((r) => ({
    id: r.id,
    user: r.user_name,
    role: r.role,
    label: r.label,
    createdAt: iso(r.created_at),
    expiresAt: iso(r.expires_at),
    lastUsed: r.last_used === null ? null : iso(r.last_used),
  }));
}

/** Revokes a token: its holder's next request is refused. Only its owner or an admin. */
export async function revokeToken(ctx: Ctx, p: Principal, id: string) {
  return inTx(ctx, async (c) => {
    const t = await c.db.get<{ user_name: string }>('SELECT user_name FROM api_tokens WHERE id = ?', id);
    if (!t || (t.user_name !== p.user && !can(p.role, 'users.manage'))) throw new LetheError('NOT_FOUND', `no token '${id.slice(0, 80)}' of yours`);
    await c.db.run('DELETE FROM api_tokens WHERE id = ?', id);
    await c.audit.append('token.revoke', null, { user: t.user_name, token: id }, c.now());
    return { revoked: id };
  });
}

const adminAuthFailed = (hint: string) => new LetheError('ADMIN_AUTH_FAILED', 'admin token missing or wrong', { hint });

/**
 * The principal behind a bearer token: a user's API token, or the bootstrap
 * token while no named admin exists.
 * @throws LetheError ADMIN_AUTH_FAILED
 */
export async function tokenPrincipal(ctx: Ctx, bootstrapDigest: Buffer, bearer: string | undefined): Promise<Principal> {
  const login = "log in with 'lethe admin login NAME' and set LETHE_ADMIN_TOKEN to the token it prints";
  /** The hint depends on whether named admins exist yet (looked up only on a failure). */
  const refuse = async () =>
    adminAuthFailed((await adminCount(ctx)) > 0 ? login : 'set LETHE_ADMIN_TOKEN (or --admin-token) to the token printed by lethe server init');
  if (!bearer) throw await refuse();
  const digest = sha256(bearer);
  if (bootstrapDigest.length === 32 && constantTimeEqual(digest, bootstrapDigest)) {
    if ((await adminCount(ctx)) > 0) {
      throw adminAuthFailed(`the bootstrap token was retired when the first named admin was added: ${login}`);
    }
    return { actor: `token:${digest.toString('hex').slice(0, 8)}`, user: null, role: 'admin', via: 'bootstrap' };
  }
  if (!bearer.startsWith(TOKEN_PREFIX)) throw await refuse();
  const now = ctx.now();
  const t = await ctx.db.get<{ id: string; user_name: string; role: Role; expires_at: number; last_used: number | null }>(
    'SELECT id, user_name, role, expires_at, last_used FROM api_tokens WHERE token_sha256 = ?',
    digest.toString('hex'),
  );
  if (!t || t.expires_at <= now) throw await refuse();
  if (t.last_used === null || now - t.last_used > SEEN_EVERY_MS) await ctx.db.run('UPDATE api_tokens SET last_used = ? WHERE id = ?', now, t.id);
  return { actor: `user:${t.user_name}`, user: t.user_name, role: t.role, via: 'token' };
}

// ---- browser sessions ----

/** A new session for a user who just logged in; the cookie value is returned once. */
export async function createSession(ctx: Ctx, user: string) {
  const cookie = b64u.encode(randomBytes(32));
  const csrf = b64u.encode(randomBytes(24));
  const now = ctx.now();
  await ctx.db.run(
    'INSERT INTO sessions(id_sha256, user_name, csrf, created_at, seen_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)',
    sha256(cookie).toString('hex'),
    user,
    csrf,
    now,
    now,
    now + SESSION_MAX_MS,
  );
  // Old sessions go as new ones come: the table holds live ones and a few stale.
  await ctx.db.run('DELETE FROM sessions WHERE expires_at <= ? OR seen_at <= ?', now, now - SESSION_IDLE_MS);
  return { cookie, csrf, expiresAt: now + SESSION_MAX_MS };
}

/**
 * The principal of a session cookie, or null (none, unknown, idle too long,
 * expired). `touch` false: the request does not count as activity (a page's own
 * live updates must not keep an unattended console signed in).
 */
export async function sessionPrincipal(ctx: Ctx, cookie: string | undefined, touch = true): Promise<Principal | null> {
  if (!cookie || !/^[A-Za-z0-9_-]{43}$/.test(cookie)) return null;
  const id = sha256(cookie).toString('hex');
  const now = ctx.now();
  const s = await ctx.db.get<{ user_name: string; csrf: string; seen_at: number; expires_at: number; role: Role }>(
    'SELECT s.user_name, s.csrf, s.seen_at, s.expires_at, u.role FROM sessions s JOIN users u ON u.name = s.user_name WHERE s.id_sha256 = ?',
    id,
  );
  if (!s || s.expires_at <= now || s.seen_at <= now - SESSION_IDLE_MS) return null;
  if (touch && now - s.seen_at > SEEN_EVERY_MS) await ctx.db.run('UPDATE sessions SET seen_at = ? WHERE id_sha256 = ?', now, id);
  return { actor: `user:${s.user_name}`, user: s.user_name, role: s.role, via: 'session', session: { id, csrf: s.csrf, expiresAt: s.expires_at } };
}

export async function endSession(ctx: Ctx, p: Principal) {
  if (!p.session) return;
  await inTx(ctx, async (c) => {
    await c.db.run('DELETE FROM sessions WHERE id_sha256 = ?', p.session!.id);
    await c.audit.append('user.logout', null, { user: p.user, everywhere: false }, c.now());
  });
}

/** Ends every browser session of the user (API tokens are revoked one by one). */
export async function endAllSessions(ctx: Ctx, user: string) {
  return inTx(ctx, async (c) => {
    const r = await c.db.run('DELETE FROM sessions WHERE user_name = ?', user);
    await c.audit.append('user.logout', null, { user, everywhere: true, sessionsEnded: r.changes }, c.now());
    return { sessionsEnded: r.changes };
  });
}
