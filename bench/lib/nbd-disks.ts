// The disks the NBD benches (nbd-read.ts, nbd-write.ts) measure the agent beside:
// a raw file of random bytes, a LUKS copy of it, and qemu-nbd serving either.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { control, type AgentStatus } from '../../agent/index.js';
import { assign, enrolledDevice } from '../../test/helpers/fixtures.js';
import { startAgentProc, waitFor, type AgentProc, type ServerProc } from '../../test/helpers/proc.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;

/** qemu-nbd's arguments for the LUKS copy's key (a bench's own passphrase). */
export const LUKS_SECRET = ['--object', 'secret,id=sec0,data=bench-luks-passphrase'];

/** A raw disk of `size` random bytes at `file`. */
export function randomDisk(file: string, size: number): void {
  const fd = fs.openSync(file, 'w');
  try {
    for (let at = 0; at < size; at += 16 * MiB) fs.writeSync(fd, randomBytes(Math.min(16 * MiB, size - at)));
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Drops the files of `dir` (and below) from the page cache (`dd iflag=nocache`). After a
 * push the server's copy of the image is read no more; on one machine it would
 * otherwise hold as much page cache as the disk under test, and push the agent's cache
 * file out of it, where on a laptop the server's copy is on another machine.
 */
export async function dropFromPageCache(dir: string): Promise<void> {
  for (const e of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) await run('dd', [`if=${path.join(e.parentPath, e.name)}`, 'iflag=nocache', 'count=0', 'status=none']);
  }
}

/** A LUKS (AES-XTS) copy of `raw` at `luks`, under LUKS_SECRET. */
export async function luksCopy(raw: string, luks: string): Promise<void> {
  // qemu-img times the key slot's PBKDF by the thread's CPU time, which on some machines
  // reads as none now and then ("Unable to get accurate CPU usage"): try again.
  for (let tries = 1; ; tries++) {
    try {
      await run('qemu-img', ['convert', ...LUKS_SECRET, '-f', 'raw', '-O', 'luks', '-o', 'key-secret=sec0,iter-time=10', raw, luks]);
      return;
    } catch (e) {
      if (tries === 10 || !String((e as { stderr?: string }).stderr).includes('accurate CPU usage')) throw e;
    }
  }
}

/** qemu-nbd's arguments for serving the LUKS copy at `luks`. */
export const luksArgs = (luks: string) => [...LUKS_SECRET, '--image-opts', `driver=luks,key-secret=sec0,file.filename=${luks}`];

/** qemu-nbd serving `args` on a socket in `dir`, writable (pushed onto `procs`); its URI. */
export async function qemuNbd(dir: string, name: string, args: string[], procs: ChildProcess[]): Promise<string> {
  const sock = path.join(dir, `${name}.sock`);
  // glibc's mmap threshold moves with what a process frees: qemu-nbd's 256 KiB bounce
  // buffers then come from mmap now and then, and every request faults its pages in.
  // On this kind of machine, where a page fault is dear, that made the LUKS peer write
  // a GiB in 9.5 s one run and in 2.4 s the next. Fixed thresholds keep it at its best.
  const env = { ...process.env, MALLOC_MMAP_THRESHOLD_: String(32 * MiB), MALLOC_TRIM_THRESHOLD_: String(256 * MiB) };
  procs.push(spawn('qemu-nbd', ['-k', sock, '-x', 'guest', '-t', '-e', '8', ...args], { stdio: 'ignore', env }));
  await waitFor(async () => fs.existsSync(sock) || undefined, 20_000, `qemu-nbd (${name})`);
  return `nbd+unix:///guest?socket=${sock}`;
}

/** The agent of a new device assigned `image`, as `use` finds it. */
export interface AgentExport {
  uri: string;
  home: string;
  agent: AgentProc;
  status(): Promise<AgentStatus>;
  /** Stops the agent and starts it again on the same home (its cache kept, nothing in memory), once its export is up and its prefetch done. */
  restart(): Promise<void>;
}

/**
 * Runs `use` with the agent of a new device assigned `image` (a cache of twice the disk,
 * `args` more), once its export is up and, unless `--no-prefetch` is among `args`, its
 * prefetch done, what it wrote on disk (`sync`), and the server's files dropped from the
 * page cache (dropFromPageCache: the prefetch read them; a cold agent without prefetch
 * reads from the server, whose copy stays in memory as a server's would). nbdcopy and qemu-io are not the agent's QEMU: they connect by
 * opt-in (--nbd-peers user). The device's home goes after: its cache holds a copy of the disk.
 */
export async function withAgentExport<T>(s: ServerProc, image: string, size: number, args: string[], use: (x: AgentExport) => Promise<T>): Promise<T> {
  const d = await enrolledDevice(s);
  await assign(s, d.deviceId, image);
  const start = () => startAgentProc(d.home, image, ['--nbd-peers', 'user', '--cache-size', `${Math.ceil((2 * size) / MiB) + 64}M`, ...args]);
  const status = () => control<AgentStatus>(d.home, { cmd: 'status' });
  const ready = async () => {
    await waitFor(async () => (await status()).nbd?.address ?? undefined, 20_000, 'the export');
    if (!args.includes('--no-prefetch')) await waitFor(async () => { const x = await status(); return x.prefetch.total > 0 && x.prefetch.done === x.prefetch.total; }, 600_000, 'prefetch');
    // A prefetch of a 4 GiB disk over loopback leaves gigabytes of the cache file dirty.
    // While they are written back, this VM's reads wait: the first random pass over it
    // ran at 1,600–1,900 a second, the same pass after a wait at 10,800–11,900. The
    // yardsticks' files were written long before their turn.
    await run('sync');
    if (!args.includes('--no-prefetch')) await dropFromPageCache(s.dir);
  };
  let agent = await start();
  try {
    await ready();
    const x: AgentExport = {
      uri: `nbd+unix:///${image}?socket=${path.join(d.home, 'nbd.sock')}`,
      home: d.home,
      agent,
      status,
      restart: async () => {
        await agent.stop();
        x.agent = agent = await start();
        await ready();
      },
    };
    return await use(x);
  } finally {
    await agent.stop();
    d.close();
    fs.rmSync(d.home, { recursive: true, force: true });
  }
}
