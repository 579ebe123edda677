// lethe demo: the whole loop on this machine, on embedded defaults. A server on
// loopback with a fresh data dir, this machine enrolled as a device, the test
// guest booted, snapshotted and pushed as an image (the plaintext snapshot is
// deleted once pushed), and the agent resuming it post-copy with eviction, with a
// live status line, until Ctrl-C. Everything lives in one temporary directory,
// removed at exit.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import type { Argv } from 'yargs';
import { startAgent, type AgentStatus, enrollDevice, fixedSecret, type Unlock, ACCEL_CHOICES, type AccelChoice } from '../agent/index.js';
import { randomKey, wipe } from '../common/crypto.js';
import { PinnedClient } from '../common/http-client.js';
import { LetheError } from '../common/errors.js';
import { AdminClient } from './admin-client.js';
import { DemoEnd } from './demo-end.js';
import { pushImage } from './image-push.js';

const MAIN = path.join(path.dirname(fileURLToPath(import.meta.url)), 'main.ts');
const IMAGE = 'demo';

interface DemoArgs {
  mem: string;
  workloadMib: number;
  idle: string;
  accel: AccelChoice;
  keep?: boolean;
}

export function demoCommand(y: Argv) {
  return y.command(
    'demo',
    'the whole loop on this machine: server, enrolled device, test guest pushed, agent resuming it with eviction',
    (y) =>
      y
        .option('mem', { type: 'string', default: '256M', describe: 'guest RAM' })
        .option('workload-mib', { type: 'number', default: 32, describe: 'MiB of checksummed pages the guest workload verifies' })
        .option('idle', { type: 'string', default: '5s', describe: "the image policy's eviction idle time" })
        .option('accel', { choices: ACCEL_CHOICES, default: 'auto' as AccelChoice, describe: 'KVM, TCG, or KVM when it works' })
        .option('keep', { type: 'boolean', describe: 'keep the demo directory (server data, device home) at exit' }),
    (a) => demo(a as unknown as DemoArgs),
  );
}

const say = (line: string) => process.stderr.write(`lethe demo: ${line}\n`);

/** How this process's demo ends; its children are tracked from the first. */
let end: DemoEnd | undefined;

/** Spawns `lethe ARGS` as a child of the demo (stopped with it); refused once the demo stops. */
function spawnLethe(args: string[], opts: Parameters<typeof spawn>[2]): ChildProcess {
  if (end?.stopped) throw new LetheError('INTERNAL', `the demo is stopping (${end.reason}): not starting lethe ${args.slice(0, 2).join(' ')}`);
  const p = spawn(process.execPath, ['--import', 'tsx', MAIN, ...args], opts);
  end?.track(p);
  return p;
}

/** Runs `lethe ARGS` as a child and returns its stdout; its stderr (progress) passes through. */
function lethe(args: string[], env: NodeJS.ProcessEnv = process.env): Promise<string> {
  return new Promise((resolve, reject) => {
    const p = spawnLethe(args, { env, stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    p.stdout!.on('data', (d) => (out += d));
    p.once('error', reject);
    p.once('exit', (code) => (code === 0 ? resolve(out) : reject(new LetheError('INTERNAL', `lethe ${args.slice(0, 2).join(' ')} exited with ${code}`))));
  });
}

/** Starts `lethe server` on a fresh data dir and a free port; resolves with its URL, pin and admin token once it listens. */
async function startServerProc(dir: string): Promise<{ proc: ChildProcess; url: string; pin: string; token: string }> {
  const init = JSON.parse(await lethe(['server', 'init', '--data', dir, '--json'])) as { fingerprint: string; adminToken: string };
  const proc = spawnLethe(['server', 'run', '--data', dir, '--listen', '127.0.0.1:0', '--json'], { stdio: ['ignore', 'pipe', 'inherit'] });
  const listening = await new Promise<string>((resolve, reject) => {
    readline.createInterface({ input: proc.stdout! }).once('line', resolve);
    proc.once('exit', (code) => reject(new LetheError('INTERNAL', `the server exited with ${code} before listening`)));
  });
  return { proc, url: (JSON.parse(listening) as { url: string }).url, pin: init.fingerprint, token: init.adminToken };
}

async function demo(a: DemoArgs): Promise<void> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'lethe-demo-'));
  // The plaintext snapshot stays in memory (tmpfs, where guest RAM lives anyway), never on disk.
  const snapRoot = fs.mkdtempSync(path.join('/dev/shm', 'lethe-demo-snapshot-'));
  const dirs = { server: path.join(root, 'server'), home: path.join(root, 'device'), snap: path.join(snapRoot, 'snapshot') };
  // The device keys are sealed as a laptop's are, under a random passphrase that
  // lives only in this process's locked memory (Argon2id at its interactive cost).
  const passphrase = randomKey();
  const unlock: Unlock = { ask: fixedSecret(passphrase) };
  wipe(passphrase);
  // From the start: a stop during the set-up (children stopped with it) still cleans up.
  end = new DemoEnd(a.keep ? [snapRoot] : [snapRoot, root], say);
  end.start();
  try {
    say(`working in ${root} (the plaintext snapshot in ${snapRoot})`);
    const s = await startServerProc(dirs.server);
    say(`server listening at ${s.url}`);
    const admin = new AdminClient(new PinnedClient(s.url, s.pin), s.token);
    try {
      const { token } = await admin.json<{ token: string }>('POST', '/enroll-tokens', {});
      const enrolled = await enrollDevice(dirs.home, token, `${os.hostname()} (demo)`, { seal: 'passphrase', unlock, argon2: 'interactive' });
      say(`this machine enrolled as device ${enrolled.deviceId}, its keys sealed under a random passphrase`);
      say('booting the test guest to snapshot it (the guest is built from Debian packages on first use)');
      await lethe(['vm', 'snapshot', '--out', dirs.snap, '--mem', a.mem, '--workload-mib', String(a.workloadMib), '--accel', a.accel, '--json']);
      const policy = path.join(root, 'policy.yaml');
      fs.writeFileSync(policy, `# the demo image's policy\neviction:\n  idle: ${a.idle}\n`);
      const pushed = await pushImage(admin, {
        name: IMAGE,
        disk: path.join(dirs.snap, 'disk.raw'),
        memory: path.join(dirs.snap, 'ram.bin'),
        state: path.join(dirs.snap, 'state.bin'),
        policy,
      });
      fs.rmSync(snapRoot, { recursive: true, force: true });
      say(`pushed as image '${IMAGE}' version ${pushed.version}; the plaintext snapshot is deleted`);
      await admin.json('POST', `/devices/${enrolled.deviceId}/assignments`, { image: IMAGE });
    } finally {
      admin.close();
    }
    if (end.stopped) {
      process.exitCode = end.exitCode();
      return;
    }

    let lastGuest = '';
    const statusLine = new StatusLine();
    const running = await startAgent({
      home: dirs.home,
      image: IMAGE,
      cacheBytes: 1024 * 1024 * 1024,
      heartbeatMs: 5_000,
      prefetch: false,
      vm: { accel: a.accel },
      unlock,
      log: (line) => statusLine.print(line),
      // The workload's checks reach the status line in process; the console is not logged.
      onGuestConsole: (line) => {
        if (/^LETHE-VERIFY-BAD|^LETHE-WORKLOAD|^LETHE-VERIFY/.test(line)) lastGuest = line;
      },
    });
    end.onStop(() => running.stop());
    const timer = setInterval(() => statusLine.show(summary(running.status(), lastGuest)), 1000);
    say('the agent resumes the guest post-copy; Ctrl-C stops it all');
    const code = await running.done;
    clearInterval(timer);
    statusLine.done();
    process.exitCode = code;
  } catch (e) {
    // A set-up step that failed because the demo stopped (its child killed) is no error of its own.
    if (!end.stopped) throw e;
    process.exitCode = end.exitCode();
  } finally {
    await end.cleanup();
  }
}

const MiB = 1024 * 1024;

function summary(st: AgentStatus, guest: string): string {
  const vm = st.vm;
  const parts = [`lease ${st.lease.state}${st.lease.expiresInSeconds !== null ? ` ${st.lease.expiresInSeconds}s` : ''}`];
  if (vm) {
    parts.push(
      `faults ${vm.faults}`,
      `resident ${((vm.residentPages.pages * 4096) / MiB).toFixed(1)} MiB (${((vm.residentPages.sensitive * 4096) / MiB).toFixed(1)} sensitive)`,
      `evicted ${vm.eviction.evicted} (${vm.eviction.dirty} changed)`,
      `keys ${st.keys.sensitiveKeys}`,
    );
  } else parts.push('resuming');
  parts.push(`cache ${(st.cache.bytes / MiB).toFixed(0)} MiB`);
  if (guest) parts.push(`guest ${guest.replace('LETHE-VERIFY ', '')}`);
  return parts.join(' | ');
}

/** One line rewritten in place on a terminal; a line every 10 s otherwise. Log lines print above it. */
class StatusLine {
  private last = '';
  private lastPrinted = 0;
  private readonly tty = process.stdout.isTTY === true;

  show(line: string): void {
    this.last = line;
    if (this.tty) process.stdout.write(`\r\x1b[K${line.slice(0, (process.stdout.columns ?? 200) - 1)}`);
    else if (Date.now() - this.lastPrinted >= 10_000) {
      process.stdout.write(`${line}\n`);
      this.lastPrinted = Date.now();
    }
  }

  print(log: string): void {
    if (this.tty) process.stdout.write('\r\x1b[K');
    process.stderr.write(`lethe agent: ${log}\n`);
    if (this.tty && this.last) this.show(this.last);
  }

  done(): void {
    if (this.tty) process.stdout.write('\n');
  }
}
