// lethe agent run | status | stop
import path from 'node:path';
import type { Argv } from 'yargs';
import { MAX_TIMER_MS, parseDuration } from '../common/duration.js';
import { parseSize as parseSizeText } from '../common/sizes.js';
import { LetheError } from '../common/errors.js';
import { control, startAgent, type AgentStatus, defaultHome, type NbdAddress, NBD_PEERS, type NbdPeers } from '../agent/index.js';
import { emit, table, type OutOpts } from './output.js';
import { unlockFrom, unlockOpts, type UnlockArgs } from './unlock-opts.js';

interface HomeArgs extends OutOpts {
  home: string;
}

const homeOpt = <T>(y: Argv<T>) =>
  y.option('home', { type: 'string', describe: 'device home ($LETHE_HOME)', default: defaultHome() });

/** "512M", "2G", "1048576" → bytes. */
function parseSize(text: string, what: string): number {
  const n = parseSizeText(text);
  if (n === null) throw new LetheError('BAD_REQUEST', `bad ${what}: '${text}'`, { hint: 'use a size such as 512M or 2G' });
  return n;
}

const mb = (n: number) => `${(n / 1e6).toFixed(1)} MB`;

interface NbdArgs {
  nbd?: boolean;
  'nbd-socket'?: string;
  'nbd-tcp'?: string;
  'i-know-nbd-tcp-is-unauthenticated'?: boolean;
}

/** @throws LetheError BAD_REQUEST for a bad address, or --nbd-tcp without the flag (or $LETHE_ALLOW_NBD_TCP=1) that accepts it is unauthenticated */
function nbdAddress(a: NbdArgs): NbdAddress | null | undefined {
  if (a.nbd === false) return null;
  if (a['nbd-tcp']) {
    if (!a['i-know-nbd-tcp-is-unauthenticated'] && process.env.LETHE_ALLOW_NBD_TCP !== '1') {
      throw new LetheError('BAD_REQUEST', "--nbd-tcp serves the disk's plaintext to any local process, unauthenticated", {
        hint: 'use the unix socket (the default: only the QEMU the agent starts may connect); to test over TCP anyway, add --i-know-nbd-tcp-is-unauthenticated or set LETHE_ALLOW_NBD_TCP=1',
      });
    }
    const m = /^([^:]+):(\d{1,5})$/.exec(a['nbd-tcp']);
    if (!m) throw new LetheError('BAD_REQUEST', `bad --nbd-tcp '${a['nbd-tcp']}'`, { hint: 'use HOST:PORT on loopback, e.g. 127.0.0.1:10809' });
    return { host: m[1], port: Number(m[2]) };
  }
  return a['nbd-socket'] ? { path: a['nbd-socket'] } : undefined;
}

function statusText(s: AgentStatus): string {
  const l = s.lease;
  return [
    `device ${s.device}, image ${s.image}@${s.version ?? '-'}`,
    table(
      ['', ''],
      [
        ['lease', `${l.state}${l.expiresInSeconds !== null ? `, expires in ${l.expiresInSeconds} s (${l.expiresAt})` : ''}, ${l.renewals} renewal(s)`],
        ['push channel', s.push.connected ? `open${s.push.replica ? ` (${s.push.replica})` : ''}, opened ${s.push.opens} time(s)` : s.push.opens ? 'down: reconnecting (commands come at heartbeats meanwhile)' : 'not open (commands come at heartbeats)'],
        ['keys held', `${s.keys.classKeys} class, ${s.keys.sensitiveKeys} sensitive`],
        ['cache', `${mb(s.cache.bytes)} of ${mb(s.cache.limitBytes)}, ${s.cache.chunks} chunks (${s.cache.dirty} dirty)`],
        ['disk in memory', `${mb(s.diskMemory.bytes)} of ${mb(s.diskMemory.limitBytes)} checked ciphertext, ${s.diskMemory.chunks} chunks`],
        ['plaintext resident', `${mb(s.resident.sensitive)} sensitive, ${mb(s.resident.normal)} normal`],
        ['reads', `${s.reads.reads} (${s.reads.fromCache} cache, ${s.reads.fromServer} server, ${s.reads.zero} zero), ${s.reads.tampered} refused as tampered`],
        ['evicted', `${s.reads.evicted} chunk(s), ${s.cache.evicted} from the cache`],
        ['prefetch', `${s.prefetch.done} of ${s.prefetch.total} chunks`],
        ['disk (NBD)', s.nbd ? `${'path' in (s.nbd.address ?? {}) ? (s.nbd.address as { path: string }).path : JSON.stringify(s.nbd.address)}, ${s.nbd.connections.active} client(s)${s.nbd.refusedPeers ? `, ${s.nbd.refusedPeers} refused` : ''}` : 'not served'],
        ...(s.vm
          ? [
              [
                'VM',
                `QEMU pid ${s.vm.pid}, ${s.vm.heldFor.length ? `held (${s.vm.heldFor.join(', ')})` : 'running'}, ${s.vm.residentPages.pages} page(s) resident (${s.vm.residentPages.sensitive} sensitive), ${s.vm.faults} fault(s)`,
              ],
              [
                'eviction',
                `after ${s.vm.evictIdleSeconds} s resident: ${s.vm.eviction.evicted} page(s) evicted (${s.vm.eviction.dirty} changed), ${s.vm.eviction.kept} kept, longest pause ${s.vm.eviction.pauseMsMax.toFixed(1)} ms`,
              ],
            ]
          : []),
        ...(l.lastError ? [['last error', l.lastError]] : []),
      ],
    )
      .split('\n')
      .slice(1)
      .map((x) => `  ${x}`)
      .join('\n'),
  ].join('\n');
}

export function agentCommand(y: Argv) {
  return y.command('agent', 'the device agent: keeps the lease, caches ciphertext, serves the VM', (y) =>
    homeOpt(y)
      .command(
        'run <image>',
        'run the agent in the foreground for an assigned image',
        (y) =>
          unlockOpts(y)
            .positional('image', { type: 'string', demandOption: true })
            .option('cache-size', { type: 'string', default: '2G', describe: 'ciphertext cache limit' })
            .option('heartbeat', { type: 'string', default: '30s', describe: 'how often to check in with the server' })
            .option('push', {
              type: 'boolean',
              default: true,
              describe: 'keep a push channel open so that wipe, revoke and policy changes arrive at once (--no-push: at the next heartbeat)',
            })
            .option('prefetch', {
              type: 'boolean',
              default: true,
              describe: "fetch the whole image (ciphertext): the policy's startup buffer first, then in the learned order, in the background",
            })
            .option('nbd-socket', { type: 'string', describe: 'unix socket for the NBD disk export (default: nbd.sock in the home)' })
            .option('nbd-tcp', { type: 'string', describe: 'serve NBD on loopback TCP HOST:PORT instead (unauthenticated: testing only, with --i-know-nbd-tcp-is-unauthenticated)' })
            .option('i-know-nbd-tcp-is-unauthenticated', { type: 'boolean', default: false, describe: 'let --nbd-tcp serve the disk to any local process ($LETHE_ALLOW_NBD_TCP=1)' })
            .option('nbd-peers', {
              choices: NBD_PEERS,
              default: 'qemu' as NbdPeers,
              describe: "who may connect to the NBD socket: only the QEMU the agent starts, or any process of this user (qemu-io, nbdcopy, your own QEMU)",
            })
            .option('log-guest-console', { type: 'boolean', default: false, describe: "with --vm: write the guest's console lines to the log (they can carry guest data)" })
            .option('nbd', { type: 'boolean', default: true, describe: 'serve the disk over NBD' })
            .option('disk-memory-cache', { type: 'string', default: '256M', describe: 'checked disk ciphertext kept in memory, so a read decrypts only what it asks for' })
            .option('vm', { type: 'boolean', default: false, describe: "resume the image's VM post-copy under QEMU" })
            .option('accel', { choices: ['auto', 'kvm', 'tcg'] as const, default: 'auto' as const, describe: 'QEMU accelerator for --vm' })
            .option('trace', { type: 'string', describe: 'with --vm: record every fault and guest report to FILE (for lethe policy simulate)' }),
        async (a) => {
          if (a.trace !== undefined && !a.vm) {
            throw new LetheError('BAD_REQUEST', '--trace records a VM\'s faults: it needs --vm', { hint: `lethe agent run ${a.image} --vm --trace ${a.trace}` });
          }
          const agent = await startAgent({
            home: String(a.home),
            image: String(a.image),
            cacheBytes: parseSize(String(a['cache-size']), '--cache-size'),
            heartbeatMs: parseDuration(String(a.heartbeat), '--heartbeat', { min: 100, max: MAX_TIMER_MS }),
            push: a.push,
            prefetch: a.prefetch !== false,
            nbd: nbdAddress(a as NbdArgs),
            nbdPeers: a['nbd-peers'] as NbdPeers,
            logGuestConsole: a['log-guest-console'] === true,
            diskMemoryBytes: parseSize(String(a['disk-memory-cache']), '--disk-memory-cache'),
            vm: a.vm ? { accel: a.accel, trace: a.trace === undefined ? undefined : path.resolve(String(a.trace)) } : undefined,
            unlock: unlockFrom(a as UnlockArgs),
          });
          const stop = () => agent.stop();
          process.on('SIGINT', stop);
          process.on('SIGTERM', stop);
          process.exitCode = await agent.done;
          process.off('SIGINT', stop);
          process.off('SIGTERM', stop);
        },
      )
      .command('status', 'show lease, keys held (never their values), cache, resident plaintext, faults, prefetch', {}, async (a) => {
        const s = await control<AgentStatus>(String(a.home), { cmd: 'status' });
        emit(a as unknown as HomeArgs, s, () => statusText(s));
      })
      .command('checkin', "upload this device's writes as its own new version of the image, which this device resumes (others once IT promotes it); the server checks each chunk", {}, async (a) => {
        const r = await control<{ version: number; shared: boolean; chunks: number; bytes: number }>(String(a.home), { cmd: 'checkin' }, 600_000);
        const whose = r.shared ? 'the shared version' : "this device's own until IT promotes it";
        emit(a as unknown as HomeArgs, r, () => `checked in ${r.chunks} chunk(s) (${mb(r.bytes)}) as version ${r.version} (${whose})`);
      })
      .command(
        'suspend',
        "save the running VM (changed pages, device state, dirty disk) as this device's own new version of the image, then stop; this device resumes it, other devices once IT promotes it (lethe image promote) or under a users: single policy",
        {},
        async (a) => {
          const r = await control<{ version: number; chunks: number; bytes: number; pages: number; stateBytes: number; ms: number }>(
            String(a.home),
            { cmd: 'suspend' },
            600_000,
          );
          emit(
            a as unknown as HomeArgs,
            r,
            () => `suspended as version ${r.version} in ${(r.ms / 1000).toFixed(1)} s: ${r.pages} changed page(s), ${r.chunks} chunk(s) (${mb(r.bytes)}) checked in; the agent stops`,
          );
        },
      )
      .command('stop', 'stop the running agent (a running VM is powered off: use suspend to keep it)', {}, async (a) => {
        await control(String(a.home), { cmd: 'stop' });
        emit(a as unknown as HomeArgs, { stopped: true }, () => 'agent stopping');
      })
      .demandCommand(1, 'name an agent command'),
  );
}
