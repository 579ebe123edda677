// Admin API routes of accounts (docs/console.md): login for an API token, users,
// tokens, whoami. Mounted on the admin router; login comes before its token check.
import type { Request, Response, Router } from 'express';
import * as wire from '../common/wire.js';
import { LetheError } from '../common/errors.js';
import { addUser, changeOwnPassword, checkLogin, checkRole, createToken, listTokens, listUsers, removeUser, revokeToken, setPassword } from './accounts.js';
import { mayDo, type AuthedRequest } from './auth.js';
import { actingAs, type Ctx } from './context.js';
import { clientAddress, type LoginGuard } from './limits.js';

type Json = <T extends import('zod').z.ZodTypeAny>(schema: T, req: Request) => import('zod').z.infer<T>;

/** POST /login: no token needed; failures count against the address and the user name. */
export function loginRoute(ctx: Ctx, r: Router, guard: LoginGuard, json: Json, body: (req: Request, res: Response, next: () => void) => void) {
  r.post('/login', body, async (req, res) => {
    const b = json(wire.LoginRequest, req);
    const address = clientAddress(req);
    const done = guard.admit(res, address, b.user);
    let user;
    try {
      user = await checkLogin(ctx, b.user, b.password, b.totp, { address, via: 'cli' });
    } finally {
      done(user !== undefined);
    }
    const acting = actingAs(ctx, `user:${user.name}`);
    const role = b.role === undefined ? undefined : checkRole(b.role);
    res.status(201).json(await createToken(acting, user, { role, label: b.label ?? 'cli', ttlMs: b.ttlSeconds === undefined ? undefined : b.ttlSeconds * 1000 }));
  });
}

/** Users, tokens and whoami, behind the admin router's token check. */
export function accountRoutes(ctx: Ctx, a: Router, guard: LoginGuard, json: Json, body: (req: Request, res: Response, next: () => void) => void) {
  const acting = (req: AuthedRequest) => actingAs(ctx, req.actor!);
  const param = (req: Request, name: string) => String(req.params[name]);
  a.get('/whoami', (req: AuthedRequest, res) => {
    const p = req.principal!;
    res.json({ user: p.user, role: p.role, via: p.via, actor: p.actor });
  });
  a.get('/users', async (req: AuthedRequest, res) => {
    mayDo(req.principal, 'users.manage');
    res.json({ users: await listUsers(ctx) });
  });
  a.post('/users', body, async (req: AuthedRequest, res) => {
    const p = mayDo(req.principal, 'users.manage');
    const b = json(wire.UserAddRequest, req);
    res.status(201).json(await addUser(acting(req), p, b.name, checkRole(b.role), b.password));
  });
  a.delete('/users/:name', async (req: AuthedRequest, res) => {
    mayDo(req.principal, 'users.manage');
    res.json(await removeUser(acting(req), param(req, 'name')));
  });
  // Anyone may set their own password, with the current one (guarded as a login); an admin anyone else's.
  a.put('/users/:name/password', body, async (req: AuthedRequest, res) => {
    const p = req.principal!;
    const name = param(req, 'name');
    const b = json(wire.PasswordRequest, req);
    if (p.user !== name) {
      mayDo(p, 'users.manage');
      res.json(await setPassword(acting(req), name, b.password));
      return;
    }
    if (b.currentPassword === undefined) throw new LetheError('BAD_REQUEST', 'changing your own password needs your current password', { hint: 'give currentPassword (and totp, for an admin)' });
    const address = clientAddress(req);
    const done = guard.admit(res, address, name);
    let r;
    try {
      r = await changeOwnPassword(acting(req), name, b.currentPassword, b.totp, b.password, { address, via: 'cli' });
    } finally {
      done(r !== undefined);
    }
    res.json(r);
  });
  a.get('/tokens', async (req: AuthedRequest, res) => {
    const p = req.principal!;
    const all = req.query.all === '1';
    if (all) mayDo(p, 'users.manage');
    else if (!p.user) throw new LetheError('BAD_REQUEST', 'the bootstrap token has no tokens of its own', { hint: 'give ?all=1 to list every user\'s' });
    res.json({ tokens: await listTokens(ctx, all ? undefined : p.user!) });
  });
  a.delete('/tokens/:id', async (req: AuthedRequest, res) => {
    res.json(await revokeToken(acting(req), req.principal!, param(req, 'id')));
  });
}
