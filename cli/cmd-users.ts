// lethe admin login | whoami | user add|ls|rm|passwd | token ls|rm: named
// administrators (docs/console.md). `login` trades a password (and an admin's
// one-time code) for an API token the other admin commands take.
import { createInterface } from 'node:readline/promises';
import type { Argv } from 'yargs';
import { LetheError } from '../common/errors.js';
import { PinnedClient } from '../common/http-client.js';
import { parseDuration } from '../common/duration.js';
import { promptTty, readFd } from '../agent/index.js';
import { withAdmin, type AdminArgs } from './admin-client.js';
import { emit, table, type OutOpts } from './output.js';

type A = AdminArgs & OutOpts & { 'password-fd'?: number; 'current-password-fd'?: number };

const passwordOpt = <T>(y: Argv<T>) =>
  y.option('password-fd', { type: 'number', describe: 'read the password from this file descriptor, to its end (else a prompt)' });

/** The password from --password-fd (or `fdOption`) or the terminal; `confirm` asks twice. */
async function password(a: A, confirm: boolean, fdOption: 'password-fd' | 'current-password-fd' = 'password-fd', what = 'password'): Promise<string> {
  const fd = (a as Record<string, unknown>)[fdOption] as number | undefined;
  if (fd !== undefined && !(Number.isInteger(fd) && fd >= 0)) {
    throw new LetheError('BAD_REQUEST', `bad --${fdOption} '${fd}'`, { hint: `give an open file descriptor number, e.g. --${fdOption} 3 3<file` });
  }
  if (fd === undefined && !tty()) throw new LetheError('CONFIG', `no ${what} given`, { hint: `run on a terminal, or pass --${fdOption} N` });
  const buf = fd !== undefined ? await readFd(fd, what) : await promptTty({ what, confirm });
  try {
    return buf.toString('utf8');
  } finally {
    buf.fill(0);
  }
}

const tty = () => process.stdin.isTTY === true && typeof process.stdin.setRawMode === 'function';

/** --totp, else (on a terminal) a prompt; undefined for a user without a second factor. */
async function oneTimeCode(given: unknown): Promise<string | undefined> {
  if (given !== undefined) return String(given);
  if (!tty()) return undefined;
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  try {
    const code = (await rl.question('one-time code from your authenticator app (Enter if you have none): ')).trim();
    return code === '' ? undefined : code;
  } finally {
    rl.close();
  }
}

interface UserView {
  name: string;
  role: string;
  totp: boolean;
  createdAt: string;
  createdBy: string;
  lastLogin: string | null;
  tokens: number;
  sessions: number;
}

interface TokenView {
  id: string;
  user: string;
  role: string;
  label: string;
  createdAt: string;
  expiresAt: string;
  lastUsed: string | null;
}

function userCommands<T>(y: Argv<T>) {
  return y
    .command(
      'add <name>',
      'add a named administrator (an admin gets a two-factor secret for an authenticator app)',
      (y) =>
        passwordOpt(y.positional('name', { type: 'string', demandOption: true })).option('role', {
          choices: ['admin', 'auditor', 'helpdesk'] as const,
          demandOption: true,
          describe: 'admin: everything; auditor: read only (devices, images, audit); helpdesk: enrollment tokens and device status',
        }),
      (a) =>
        withAdmin(a as A, async (c) => {
          const pw = await password(a as A, true);
          const r = await c.json<{ name: string; role: string; bootstrapRetired: boolean; totp?: { secret: string; uri: string } }>('POST', '/users', {
            name: String(a.name),
            role: a.role,
            password: pw,
          });
          emit(a as A, r, () =>
            [
              `added ${r.name} (${r.role})`,
              ...(r.totp
                ? [
                    `two-factor secret, shown once: add it to ${r.name}'s authenticator app (its code is asked at every login)`,
                    `  secret: ${r.totp.secret}`,
                    `  ${r.totp.uri}`,
                  ]
                : []),
              ...(r.bootstrapRetired ? ["the bootstrap token is retired from now on: log in with 'lethe admin login " + r.name + "'"] : []),
            ].join('\n'),
          );
        }),
    )
    .command('ls', 'list administrators', {}, (a) =>
      withAdmin(a as A, async (c) => {
        const r = await c.json<{ users: UserView[] }>('GET', '/users');
        emit(a as A, r, () =>
          r.users.length === 0
            ? 'no named administrators (the bootstrap token is in use)'
            : table(
                ['NAME', 'ROLE', '2FA', 'LAST LOGIN', 'TOKENS', 'SESSIONS', 'ADDED BY'],
                r.users.map((u) => [u.name, u.role, u.totp ? 'totp' : '-', u.lastLogin, u.tokens, u.sessions, u.createdBy]),
              ),
        );
      }),
    )
    .command(
      'rm <name>',
      'remove an administrator with their tokens and sessions',
      (y) => y.positional('name', { type: 'string', demandOption: true }),
      (a) =>
        withAdmin(a as A, async (c) => {
          const r = await c.json<{ removed: string }>('DELETE', `/users/${encodeURIComponent(String(a.name))}`);
          emit(a as A, r, () => `removed ${r.removed}; their tokens and sessions no longer work`);
        }),
    )
    .command(
      'passwd <name>',
      "set a password: your own (with your current one and one-time code), or as an admin anyone else's; the user's browser sessions end",
      (y) =>
        passwordOpt(y.positional('name', { type: 'string', demandOption: true }))
          .option('current-password-fd', { type: 'number', describe: 'your own password: read the current one from this file descriptor (else a prompt)' })
          .option('totp', { type: 'string', describe: 'your own password, as an admin: the one-time code (else asked for)' }),
      (a) =>
        withAdmin(a as A, async (c) => {
          const me = await c.json<{ user: string | null }>('GET', '/whoami');
          const own = me.user === String(a.name);
          const current = own ? await password(a as A, false, 'current-password-fd', 'current password') : undefined;
          const totpCode = own ? await oneTimeCode(a.totp) : undefined;
          const pw = await password(a as A, true);
          const r = await c.json<{ user: string; sessionsEnded: number }>('PUT', `/users/${encodeURIComponent(String(a.name))}/password`, {
            password: pw,
            ...(current !== undefined ? { currentPassword: current } : {}),
            ...(totpCode !== undefined ? { totp: totpCode } : {}),
          });
          emit(a as A, r, () => `password of ${r.user} set; ${r.sessionsEnded} browser session(s) ended`);
        }),
    )
    .demandCommand(1, 'name a user command');
}

function tokenCommands<T>(y: Argv<T>) {
  return y
    .command(
      'ls',
      'list your API tokens (--all: everyone\'s, admins only)',
      (y) => y.option('all', { type: 'boolean', default: false }),
      (a) =>
        withAdmin(a as A, async (c) => {
          const r = await c.json<{ tokens: TokenView[] }>('GET', `/tokens${a.all ? '?all=1' : ''}`);
          emit(a as A, r, () =>
            r.tokens.length === 0
              ? 'no API tokens'
              : table(['ID', 'USER', 'ROLE', 'LABEL', 'EXPIRES', 'LAST USED'], r.tokens.map((t) => [t.id, t.user, t.role, t.label || '-', t.expiresAt, t.lastUsed])),
          );
        }),
    )
    .command(
      'rm <id>',
      'revoke an API token (yours, or as an admin anyone\'s)',
      (y) => y.positional('id', { type: 'string', demandOption: true }),
      (a) =>
        withAdmin(a as A, async (c) => {
          const r = await c.json<{ revoked: string }>('DELETE', `/tokens/${encodeURIComponent(String(a.id))}`);
          emit(a as A, r, () => `token ${r.revoked} revoked`);
        }),
    )
    .demandCommand(1, 'name a token command');
}

/** The account commands, added to `lethe admin`. */
export function accountCommands<T>(y: Argv<T>) {
  return y
    .command(
      'login <name>',
      "log in as a named administrator: prints an API token for LETHE_ADMIN_TOKEN (eval \"$(lethe admin login NAME)\")",
      (y) =>
        passwordOpt(y.positional('name', { type: 'string', demandOption: true }))
          .option('totp', { type: 'string', describe: "the 6-digit code of your authenticator app (admins; else asked for)" })
          .option('ttl', { type: 'string', default: '30d', describe: 'how long the token works' })
          .option('role', { choices: ['admin', 'auditor', 'helpdesk'] as const, describe: 'a token that may do less than your role (e.g. auditor for a report script)' })
          .option('label', { type: 'string', default: 'cli', describe: 'what the token is for (shown by token ls)' }),
      async (a) => {
        const server = (a as A).server ?? process.env.LETHE_SERVER;
        const pin = (a as A).pin ?? process.env.LETHE_PIN;
        if (!server || !pin) throw new LetheError('CONFIG', 'login needs LETHE_SERVER and LETHE_PIN', { hint: "set them from the output of 'lethe server init' (or pass --server, --pin)" });
        const ttlMs = parseDuration(String(a.ttl), '--ttl', { max: 365 * 86_400_000 });
        const pw = await password(a as A, false);
        const code = await oneTimeCode(a.totp);
        const http = new PinnedClient(server, pin);
        try {
          const r = await http.json<{ id: string; token: string; role: string; expiresAt: string }>('POST', '/v1/admin/login', {
            user: String(a.name),
            password: pw,
            ...(code !== undefined ? { totp: code } : {}),
            ttlSeconds: Math.round(ttlMs / 1000),
            label: String(a.label),
            ...(a.role ? { role: a.role } : {}),
          });
          emit(a as A, r, () => {
            process.stderr.write(`lethe: logged in as ${String(a.name)} (${r.role}); token ${r.id} works until ${r.expiresAt}\n`);
            return `export LETHE_ADMIN_TOKEN=${r.token}`;
          });
        } finally {
          http.close();
        }
      },
    )
    .command('whoami', 'who the admin token belongs to, and its role', {}, (a) =>
      withAdmin(a as A, async (c) => {
        const r = await c.json<{ user: string | null; role: string; via: string }>('GET', '/whoami');
        emit(a as A, r, () => (r.user ? `${r.user} (${r.role})` : `the bootstrap token (${r.role} until the first named admin is added)`));
      }),
    )
    .command('user', 'named administrators: add, ls, rm, passwd', (y) => userCommands(y))
    .command('token', 'API tokens: ls, rm', (y) => tokenCommands(y));
}
