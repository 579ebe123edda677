// lethe admin enroll-token | devices | revoke | wipe | assign | unassign
import type { Argv } from 'yargs';
import { parseDuration } from '../common/duration.js';
import { LetheError } from '../common/errors.js';
import { withAdmin, type AdminArgs, type AdminClient } from './admin-client.js';
import { emit, table, type OutOpts } from './output.js';
import { accountCommands } from './cmd-users.js';

type A = AdminArgs & OutOpts;

export function adminOpts<T>(y: Argv<T>) {
  return y
    .option('server', { type: 'string', describe: 'server URL ($LETHE_SERVER)' })
    .option('admin-token', { type: 'string', describe: 'admin token ($LETHE_ADMIN_TOKEN)' })
    .option('pin', { type: 'string', describe: 'server certificate SHA-256 ($LETHE_PIN)' });
}

interface DeviceView {
  id: string;
  name: string;
  status: string;
  enrolledAt: string;
  lastSeen: string | null;
  seal: string;
  images: string[];
  connected: boolean;
}

/** A command as GET /v1/admin/commands/ID shows it. */
interface CommandView {
  id: string;
  type: string;
  issuedAt: string;
  deliveredAt: string | null;
  deliveredVia: string | null;
  ackedAt: string | null;
  elapsedMs?: number;
  result?: { ok: boolean; detail?: string; zeroedAfterMs?: number };
}

const waitOpt = <T>(y: Argv<T>) =>
  y.option('wait', {
    type: 'string',
    describe: 'wait until the device acknowledges (up to the given time, 30s if none) and print how long it took',
  });

/** With --wait: polls the command until the device acknowledged it; NOT_ACKNOWLEDGED when the time runs out. */
async function waitForAck(c: AdminClient, command: string | undefined, wait: string | undefined): Promise<CommandView | undefined> {
  if (wait === undefined || command === undefined) return undefined;
  const ms = wait === '' ? 30_000 : parseDuration(wait, '--wait', { max: 86_400_000 });
  const until = Date.now() + ms;
  for (;;) {
    const v = await c.json<CommandView>('GET', `/commands/${encodeURIComponent(command)}`);
    if (v.ackedAt) return v;
    if (Date.now() >= until) {
      throw new LetheError('NOT_ACKNOWLEDGED', `the device has not acknowledged ${v.type} ${command} (issued ${v.issuedAt}${v.deliveredAt ? `, delivered ${v.deliveredAt} by ${v.deliveredVia}` : ', not delivered yet'})`, {
        hint: "the command stays pending: the device carries it out when it next connects; 'lethe admin devices' shows whether it is connected now",
      });
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

const ackLine = (v: CommandView) =>
  `acknowledged by the device ${((v.elapsedMs ?? 0) / 1000).toFixed(2)} s after the command (delivered by ${v.deliveredVia ?? 'its acknowledgement'}${
    v.result?.zeroedAfterMs !== undefined ? `; keys zeroed and plaintext evicted ${v.result.zeroedAfterMs} ms after it arrived` : ''
  })`;

export function adminCommand(y: Argv) {
  return y.command('admin', 'IT administration: enroll, list, assign, revoke and wipe devices; administrators and their tokens', (y) =>
    accountCommands(adminOpts(y))
      .command(
        'enroll-token',
        'mint a one-time enrollment token',
        (y) => y.option('ttl', { type: 'string', default: '1h', describe: 'how long the token stays valid' }),
        (a) =>
          withAdmin(a as A, async (c) => {
            const ttlMs = parseDuration(String(a.ttl), '--ttl', { max: 30 * 86_400_000 });
            if (ttlMs < 1000) throw new LetheError('BAD_REQUEST', `--ttl '${a.ttl}' is shorter than a second`);
            const r = await c.json<{ token: string; expiresAt: string }>('POST', '/enroll-tokens', {
              ttlSeconds: Math.round(ttlMs / 1000),
            });
            emit(a as A, r, () => `${r.token}\n(valid until ${r.expiresAt}; enroll with: lethe enroll TOKEN)`);
          }),
      )
      .command('devices', 'list devices and their status', {}, (a) =>
        withAdmin(a as A, async (c) => {
          const r = await c.json<{ devices: DeviceView[] }>('GET', '/devices');
          emit(a as A, r, () =>
            r.devices.length === 0
              ? 'no devices enrolled'
              : table(
                  ['ID', 'NAME', 'STATUS', 'CONNECTED', 'SEAL', 'LAST SEEN', 'IMAGES'],
                  r.devices.map((d) => [d.id, d.name, d.status, d.connected ? 'now' : '-', d.seal, d.lastSeen, d.images.join(',') || '-']),
                ),
          );
        }),
      )
      .command(
        'rotate <what>',
        "rotate the server's keys: 'master' rewraps every image key under a new keyring term (no chunk is decrypted) and deletes the old term; 'tls' announces a new certificate to devices at their heartbeats, and with --finish makes every replica serve it",
        (y) =>
          y
            .positional('what', { choices: ['master', 'tls'] as const, demandOption: true })
            .option('finish', { type: 'boolean', default: false, describe: "tls: serve the announced certificate (once devices have checked in; one that has not must enroll again)" }),
        (a) =>
          withAdmin(a as A, async (c) => {
            if (a.what === 'tls') {
              const r = await c.json<{ phase: string; fingerprint: string; previous: string; told?: number }>('POST', '/rotate/tls', a.finish ? { finish: true } : {});
              emit(a as A, r, () =>
                r.phase === 'announced'
                  ? `announced certificate sha256 ${r.fingerprint}: devices pin it beside ${r.previous.slice(0, 16)}…, the ${r.told ?? 0} connected now at once, the others at their next heartbeat; then run 'lethe admin rotate tls --finish'`
                  : `every replica serves certificate sha256 ${r.fingerprint} within seconds; admins: export LETHE_PIN=${r.fingerprint}`,
              );
              return;
            }
            if (a.finish) throw new LetheError('BAD_REQUEST', '--finish is for tls', { hint: "run 'lethe admin rotate master' alone" });
            const r = await c.json<{ term: number; previous: number; images: number; versions: number; termsRetired: number }>('POST', '/rotate/master', {});
            emit(a as A, r, () => `master keyring at term ${r.term} (was ${r.previous}): ${r.images} image key(s) and ${r.versions} version key(s) rewrapped, ${r.termsRetired} old term(s) deleted`);
          }),
      )
      .command(
        'revoke <device>',
        'refuse every request of a device from now on; an online device erases its keys and cache at once',
        (y) => waitOpt(y.positional('device', { type: 'string', demandOption: true })),
        (a) =>
          withAdmin(a as A, async (c) => {
            const r = await c.json<{ id: string; status: string; command?: string }>('POST', `/devices/${encodeURIComponent(String(a.device))}/revoke`);
            const ack = await waitForAck(c, r.command, a.wait);
            emit(a as A, ack ? { ...r, ack } : r, () => [`device ${r.id} is ${r.status}`, ...(ack ? [ackLine(ack)] : [])].join('\n'));
          }),
      )
      .command(
        'wipe <device>',
        'order a device to wipe itself: at once if it is online (push), else at its next heartbeat',
        (y) => waitOpt(y.positional('device', { type: 'string', demandOption: true })),
        (a) =>
          withAdmin(a as A, async (c) => {
            const r = await c.json<{ id: string; status: string; erasedAt?: string; command?: string }>('POST', `/devices/${encodeURIComponent(String(a.device))}/wipe`);
            const ack = await waitForAck(c, r.command, a.wait);
            emit(a as A, ack ? { ...r, ack } : r, () =>
              [
                r.erasedAt
                  ? `device ${r.id} is ${r.status}: it erased its keys and cache when it was revoked (acknowledged ${r.erasedAt})`
                  : `device ${r.id} is ${r.status}: it wipes itself now if it is online, else at its next heartbeat`,
                ...(ack ? [ackLine(ack)] : []),
              ].join('\n'),
            );
          }),
      )
      .command(
        'assign <device> <image>',
        'let a device lease an image',
        (y) => y.positional('device', { type: 'string', demandOption: true }).positional('image', { type: 'string', demandOption: true }),
        (a) =>
          withAdmin(a as A, async (c) => {
            const r = await c.json<{ device: string; image: string }>(
              'POST',
              `/devices/${encodeURIComponent(String(a.device))}/assignments`,
              { image: String(a.image) },
            );
            emit(a as A, r, () => `image ${r.image} assigned to ${r.device}`);
          }),
      )
      .command(
        'unassign <device> <image>',
        'take an image away from a device (ends its leases)',
        (y) => y.positional('device', { type: 'string', demandOption: true }).positional('image', { type: 'string', demandOption: true }),
        (a) =>
          withAdmin(a as A, async (c) => {
            const r = await c.json<{ device: string; image: string }>(
              'DELETE',
              `/devices/${encodeURIComponent(String(a.device))}/assignments/${encodeURIComponent(String(a.image))}`,
            );
            emit(a as A, r, () => `image ${r.image} no longer assigned to ${r.device}`);
          }),
      )
      .demandCommand(1, 'name an admin command'),
  );
}
