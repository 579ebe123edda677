// The admin console (docs/console.md), served by `lethe server` under /console:
// server-rendered pages over the same functions as the admin API, a browser
// session per login (HttpOnly, Secure, SameSite=Strict cookie), a CSRF token and
// an Origin check on every form that changes something, and Server-Sent Events
// for live updates. No asset comes from anywhere but this server.
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import express, { type NextFunction, type Request, type Response } from 'express';
import { parseSince } from '../../common/duration.js';
import { LetheError } from '../../common/errors.js';
import { constantTimeEqual } from '../../common/crypto.js';
import { explainPolicy, loadPolicy } from '../../policies/index.js';
import { addUser, adminCount, can, changeOwnPassword, checkLogin, checkRole, createSession, endAllSessions, endSession, listTokens, listUsers, removeUser, revokeToken, sessionPrincipal, SESSION_MAX_MS, type Permission, type Principal } from '../accounts.js';
import { toLetheError } from '../app.js';
import { auditEntries, auditFilter } from '../audit-read.js';
import { mayDo } from '../auth.js';
import { actingAs, type Ctx } from '../context.js';
import { listDevices, mintEnrollToken, revokeDevice, wipeDevice } from '../devices.js';
import { getImage, listImages, policyOf, setPolicy } from '../images.js';
import { assign, unassign } from '../leases.js';
import { clientAddress, type LoginGuard } from '../limits.js';
import { chainStatus, deviceLeases, deviceView, exposure, keyReleasesPerMinute, leaseExpiries, recentAlarms, replicas } from './data.js';
import { ConsoleEvents } from './events.js';
import type { Html } from './html.js';
import { main, note, page, type View } from './layout.js';
import { devicePage, devicesPage, exposureCsv, exposurePage } from './pages-devices.js';
import { accountPage, auditPage, errorPage, imagePage, imagesPage, loginPage, overviewPage, usersPage } from './pages.js';

export const SESSION_COOKIE = '__Host-lethe-session';
const ASSETS = path.join(path.dirname(fileURLToPath(import.meta.url)), 'assets');
/** Form bodies: a policy is the largest thing a form carries. */
const MAX_FORM_BODY = 256 * 1024;

const SECURITY_HEADERS = {
  'content-security-policy':
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
  'x-content-type-options': 'nosniff',
  // Not no-referrer: under it a browser sends `Origin: null` with the console's own forms.
  'referrer-policy': 'same-origin',
  'x-frame-options': 'DENY',
  'cache-control': 'no-store',
};

interface ConsoleRequest extends Request {
  principal?: Principal;
}

function cookieOf(req: Request, name: string): string | undefined {
  for (const part of (req.get('cookie') ?? '').split(';')) {
    const i = part.indexOf('=');
    if (i > 0 && part.slice(0, i).trim() === name) return part.slice(i + 1).trim();
  }
  return undefined;
}

const field = (req: Request, name: string): string => {
  const v = (req.body as Record<string, unknown> | undefined)?.[name];
  if (typeof v !== 'string') return '';
  if (v.includes('\0')) throw new LetheError('BAD_REQUEST', `the form field '${name}' holds a NUL character`);
  return v;
};

/** A request a browser says came from another origin (Origin, Sec-Fetch-Site) is refused. */
function checkSameOrigin(req: Request): void {
  const origin = req.get('origin');
  const site = req.get('sec-fetch-site');
  if ((origin !== undefined && origin !== `https://${req.get('host')}`) || (site !== undefined && site !== 'same-origin' && site !== 'none')) {
    throw new LetheError('CSRF_FAILED', `a form from another origin (${(origin ?? site ?? '').slice(0, 80)}) cannot act in the console`, { hint: 'use the console itself' });
  }
}

/** A form from another origin, or without this session's token, is refused: no state changes on a forged request. */
function checkCsrf(req: ConsoleRequest): void {
  checkSameOrigin(req);
  const sent = Buffer.from(field(req, '_csrf'));
  const want = Buffer.from(req.principal?.session?.csrf ?? '');
  if (want.length === 0 || sent.length !== want.length || !constantTimeEqual(sent, want)) {
    throw new LetheError('CSRF_FAILED', 'the form came without this session\'s CSRF token', { hint: 'reload the page and submit again' });
  }
}

/** A `next` that stays in the console (no open redirect). */
const safeNext = (n: string): string => (/^\/console(\/[A-Za-z0-9._~%/?=&-]*)?$/.test(n) && !n.startsWith('//') ? n : '/console');

export interface ConsoleHandle {
  router: express.Router;
  close(): void;
}

export function consoleRoutes(ctx: Ctx, guard: LoginGuard): ConsoleHandle {
  const r = express.Router();
  const events = new ConsoleEvents(ctx);
  const form = express.urlencoded({ extended: false, limit: MAX_FORM_BODY, parameterLimit: 50 });
  const view = (req: ConsoleRequest): View => ({ p: req.principal!, csrf: req.principal!.session!.csrf, path: req.path === '/' ? '/console' : `/console${req.path}`, now: ctx.now() });
  const acting = (req: ConsoleRequest) => actingAs(ctx, req.principal!.actor);
  /** A full page, or only its main part for a live update. */
  /** `liveUrl`: for a page shown as a form's answer, the page whose live parts it shows. */
  const send = (req: ConsoleRequest, res: Response, title: string, body: Html, status = 200, liveUrl?: string) => {
    if (req.get('x-lethe-fragment') === 'main') res.status(status).set('x-lethe-fragment', 'main').type('html').send(main(title, body).text);
    else res.status(status).type('html').send(page(view(req), title, body, { liveUrl }).text);
  };
  const need = (req: ConsoleRequest, perm: Permission) => mayDo(req.principal, perm);
  const id = (req: Request) => String(req.params.id);

  r.use((_req, res, next) => {
    res.set(SECURITY_HEADERS);
    next();
  });
  r.use('/assets', express.static(ASSETS, { index: false, fallthrough: false, maxAge: 0 }));

  // ---- login ----
  r.get('/login', async (req, res) => {
    res.type('html').send(loginPage(safeNext(String(req.query.next ?? '/console')), undefined, (await adminCount(ctx)) === 0).text);
  });
  r.post('/login', form, async (req, res) => {
    checkSameOrigin(req);
    const user = field(req, 'user').trim();
    const next = safeNext(field(req, 'next') || '/console');
    const address = clientAddress(req);
    try {
      const done = guard.admit(res, address, user);
      let who;
      try {
        who = await checkLogin(ctx, user, field(req, 'password'), field(req, 'totp') || undefined, { address, via: 'console' });
      } finally {
        done(who !== undefined);
      }
      const s = await createSession(ctx, who.name);
      res.cookie(SESSION_COOKIE, s.cookie, { httpOnly: true, secure: true, sameSite: 'strict', path: '/', maxAge: SESSION_MAX_MS });
      res.redirect(303, next);
    } catch (e) {
      if (!(e instanceof LetheError) || !['LOGIN_FAILED', 'RATE_LIMITED', 'BAD_REQUEST'].includes(e.code)) throw e;
      res.status(e.status).type('html').send(loginPage(next, { message: e.message, hint: e.hint }).text);
    }
  });

  // ---- everything else needs a session ----
  r.use(async (req: ConsoleRequest, res: Response, next: NextFunction) => {
    // Live updates (a fragment, the event stream) are the page's doing, not the person's: they keep no session alive.
    const automatic = req.get('x-lethe-fragment') !== undefined || req.path === '/events';
    const p = await sessionPrincipal(ctx, cookieOf(req, SESSION_COOKIE), !automatic);
    if (!p) {
      if (req.method === 'GET' && req.get('x-lethe-fragment') === undefined && req.path !== '/events') {
        res.redirect(303, `/console/login?next=${encodeURIComponent(req.originalUrl)}`);
        return;
      }
      throw new LetheError('ADMIN_AUTH_FAILED', 'not signed in, or the session ended', { hint: 'sign in again at /console/login' });
    }
    req.principal = p;
    if (req.method === 'POST') {
      form(req, res, (err?: unknown) => {
        if (err) return next(err);
        try {
          checkCsrf(req);
          next();
        } catch (e) {
          next(e);
        }
      });
      return;
    }
    next();
  });

  r.get('/events', async (req: ConsoleRequest, res) => {
    const cookie = cookieOf(req, SESSION_COOKIE);
    // The stream ends with its session (logout, expiry, a password change, the user removed).
    await events.add(res, async () => (await sessionPrincipal(ctx, cookie, false)) !== null);
  });
  r.post('/logout', async (req: ConsoleRequest, res) => {
    await endSession(ctx, req.principal!);
    res.clearCookie(SESSION_COOKIE, { httpOnly: true, secure: true, sameSite: 'strict', path: '/' });
    res.redirect(303, '/console/login');
  });
  r.post('/logout-all', async (req: ConsoleRequest, res) => {
    await endAllSessions(ctx, req.principal!.user!);
    res.clearCookie(SESSION_COOKIE, { httpOnly: true, secure: true, sameSite: 'strict', path: '/' });
    res.redirect(303, '/console/login');
  });

  // ---- overview ----
  r.get('/', async (req: ConsoleRequest, res) => {
    const now = ctx.now();
    const role = req.principal!.role;
    send(req, res, 'Overview', overviewPage(view(req), {
      devices: await listDevices(ctx),
      releases: can(role, 'audit.read') ? await keyReleasesPerMinute(ctx, now) : null,
      replicas: await replicas(ctx, now),
      alarms: can(role, 'audit.read') ? await recentAlarms(ctx, now) : null,
      chain: can(role, 'audit.read') ? await chainStatus(ctx, now) : null,
    }));
  });

  // ---- devices ----
  const devicesList = async (req: ConsoleRequest, res: Response, minted?: { token: string; expiresAt: string }) => {
    need(req, 'devices.read');
    send(req, res, 'Devices', devicesPage(view(req), await listDevices(ctx), await leaseExpiries(ctx, ctx.now()), minted), 200, minted ? '/console/devices' : undefined);
  };
  r.get('/devices', (req: ConsoleRequest, res) => devicesList(req, res));
  r.post('/enroll-tokens', async (req: ConsoleRequest, res) => {
    need(req, 'devices.enroll');
    const ttl = Number(field(req, 'ttl'));
    if (![3600, 86_400, 604_800].includes(ttl)) throw new LetheError('BAD_REQUEST', `bad token lifetime '${field(req, 'ttl').slice(0, 20)}'`);
    await devicesList(req, res, await mintEnrollToken(acting(req), ttl));
  });
  const devicePageOf = async (req: ConsoleRequest, res: Response, msg?: Html, status = 200) => {
    need(req, 'devices.read');
    const d = await deviceView(ctx, id(req));
    const images = can(req.principal!.role, 'devices.act') ? (await listImages(ctx)).map((i) => i.name) : [];
    send(req, res, `Device ${d.name}`, devicePage(view(req), d, await deviceLeases(ctx, d.id, ctx.now()), images, msg), status, msg ? `/console/devices/${encodeURIComponent(d.id)}` : undefined);
  };
  r.get('/devices/:id', (req: ConsoleRequest, res) => devicePageOf(req, res));
  for (const what of ['revoke', 'wipe'] as const) {
    r.post(`/devices/:id/${what}`, async (req: ConsoleRequest, res) => {
      need(req, 'devices.act');
      const d = await deviceView(ctx, id(req));
      if (field(req, 'confirm').trim() !== d.name) {
        return devicePageOf(req, res, note('error', `Not ${what === 'wipe' ? 'wiped' : 'revoked'}: the name typed does not match '${d.name}'.`, 'type the device name exactly to confirm'), 400);
      }
      await (what === 'wipe' ? wipeDevice(acting(req), d.id) : revokeDevice(acting(req), d.id));
      res.redirect(303, `/console/devices/${encodeURIComponent(d.id)}`);
    });
  }
  r.post('/devices/:id/assign', async (req: ConsoleRequest, res) => {
    need(req, 'devices.act');
    await assign(acting(req), id(req), field(req, 'image'));
    res.redirect(303, `/console/devices/${encodeURIComponent(id(req))}`);
  });
  r.post('/devices/:id/unassign', async (req: ConsoleRequest, res) => {
    need(req, 'devices.act');
    await unassign(acting(req), id(req), field(req, 'image'));
    res.redirect(303, `/console/devices/${encodeURIComponent(id(req))}`);
  });
  const sinceOf = (req: Request) => {
    const text = typeof req.query.since === 'string' && req.query.since !== '' ? req.query.since : '7d';
    return { text, ms: parseSince(text) };
  };
  r.get('/devices/:id/exposure', async (req: ConsoleRequest, res) => {
    need(req, 'audit.read');
    const since = sinceOf(req);
    const x = await exposure(ctx, id(req), since.ms, ctx.now());
    send(req, res, `Lost laptop: ${x.device.name}`, exposurePage(view(req), x, since.text));
  });
  r.get('/devices/:id/exposure.csv', async (req: ConsoleRequest, res) => {
    need(req, 'audit.read');
    const x = await exposure(ctx, id(req), sinceOf(req).ms, ctx.now());
    res.type('text/csv').attachment(`lethe-exposure-${x.device.id}.csv`).send(exposureCsv(x));
  });

  // ---- images and policies ----
  r.get('/images', async (req: ConsoleRequest, res) => {
    need(req, 'images.read');
    const imgs = await listImages(ctx);
    const policies = new Map<string, string>();
    for (const i of imgs) {
      const row = await getImage(ctx, i.name);
      policies.set(i.name, row.policy ? policyOf(row).name || 'custom' : 'built-in');
    }
    send(req, res, 'Images and policies', imagesPage(view(req), imgs, policies));
  });
  const imagePageOf = async (req: ConsoleRequest, res: Response, text?: string, check?: Parameters<typeof imagePage>[4]) => {
    need(req, 'images.read');
    const name = String(req.params.name);
    const row = await getImage(ctx, name);
    const img = (await listImages(ctx)).find((i) => i.name === row.name)!;
    send(
      req,
      res,
      `Image ${img.name}`,
      imagePage(view(req), img, explainPolicy(policyOf(row), name), text ?? row.policy ?? '', check),
      check && check.diagnostics.some((d) => d.severity === 'error') ? 422 : 200,
      check ? `/console/images/${encodeURIComponent(img.name)}` : undefined,
    );
  };
  r.get('/images/:name', (req: ConsoleRequest, res) => imagePageOf(req, res));
  r.post('/images/:name/policy', async (req: ConsoleRequest, res) => {
    need(req, 'images.read');
    const text = field(req, 'policy');
    const { diagnostics } = loadPolicy(text, 'policy');
    const save = field(req, 'action') === 'save';
    const ok = !diagnostics.some((d) => d.severity === 'error');
    let changed: boolean | undefined;
    if (save && ok) {
      need(req, 'images.write');
      changed = (await setPolicy(acting(req), String(req.params.name), text.trim() === '' ? null : text)).changed;
    }
    await imagePageOf(req, res, text, { diagnostics, saved: save && ok, changed });
  });

  // ---- audit ----
  r.get('/audit', async (req: ConsoleRequest, res) => {
    need(req, 'audit.read');
    const q = req.query as Record<string, unknown>;
    const f = auditFilter({ ...q, limit: '100' });
    const text = (k: string) => (typeof q[k] === 'string' ? (q[k] as string) : undefined);
    const now = ctx.now();
    send(
      req,
      res,
      'Audit',
      auditPage(view(req), await auditEntries(ctx.db, f), { device: text('device'), type: text('type'), since: text('since'), until: text('until') }, await chainStatus(ctx, now), await ctx.audit.latestCheckpoint()),
    );
  });

  // ---- administrators and one's account ----
  r.get('/users', async (req: ConsoleRequest, res) => {
    need(req, 'users.manage');
    send(req, res, 'Administrators', usersPage(view(req), await listUsers(ctx)));
  });
  r.post('/users', async (req: ConsoleRequest, res) => {
    const p = need(req, 'users.manage');
    const added = await addUser(acting(req), p, field(req, 'name').trim(), checkRole(field(req, 'role')), field(req, 'password'));
    send(req, res, 'Administrators', usersPage(view(req), await listUsers(ctx), added), 201, '/console/users');
  });
  r.post('/users/:name/remove', async (req: ConsoleRequest, res) => {
    need(req, 'users.manage');
    await removeUser(acting(req), String(req.params.name));
    res.redirect(303, '/console/users');
  });
  const accountOf = async (req: ConsoleRequest, res: Response, msg?: Html, status = 200) => {
    const p = req.principal!;
    send(req, res, 'My account', accountPage(view(req), p.user ? await listTokens(ctx, p.user) : [], msg), status, msg ? '/console/account' : undefined);
  };
  r.get('/account', (req: ConsoleRequest, res) => accountOf(req, res));
  r.post('/tokens/:id/revoke', async (req: ConsoleRequest, res) => {
    await revokeToken(acting(req), req.principal!, String(req.params.id));
    await accountOf(req, res, note('ok', `Token ${String(req.params.id)} revoked.`));
  });
  r.post('/account/password', async (req: ConsoleRequest, res) => {
    const user = req.principal!.user!;
    const address = clientAddress(req);
    const done = guard.admit(res, address, user);
    let changed;
    try {
      changed = await changeOwnPassword(acting(req), user, field(req, 'current'), field(req, 'totp') || undefined, field(req, 'password'), { address, via: 'console' });
    } catch (e) {
      if (!(e instanceof LetheError) || !['LOGIN_FAILED', 'BAD_REQUEST'].includes(e.code)) throw e;
      return accountOf(req, res, note('error', `Password not changed: ${e.message}.`, e.hint), e.status);
    } finally {
      done(changed !== undefined);
    }
    res.clearCookie(SESSION_COOKIE, { httpOnly: true, secure: true, sameSite: 'strict', path: '/' });
    res.redirect(303, '/console/login');
  });

  r.use((req: Request) => {
    throw new LetheError('NOT_FOUND', `no console page ${req.path}`);
  });
  // Errors as pages (a fragment request gets the status and a short body: the page reloads).
  r.use((err: unknown, req: ConsoleRequest, res: Response, _next: NextFunction) => {
    const e = toLetheError(err);
    if (e.code === 'INTERNAL') console.error(`lethe server: console error: ${String((err as Error)?.stack ?? err)}`);
    res.locals.code = e.code;
    res.status(e.status || 500).type('html').send(errorPage(e.status, e.code, e.message, e.hint).text);
  });
  return { router: r, close: () => events.close() };
}
