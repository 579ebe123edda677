// Issue #14: the agent's NBD socket serves the disk's plaintext, so it serves only
// the QEMU the agent started, unless the user opts in to their own tools; loopback
// TCP (no peer credentials at all) only when forced.
import { expect } from 'chai';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { control } from '../../agent/daemon/control.js';
import type { AgentStatus } from '../../agent/daemon/start.js';
import { NbdServer, type BlockBackend } from '../../agent/disk/nbd/server.js';
import { nbdPeerCheck } from '../../agent/disk/nbd/peers.js';
import { errorChain, LetheError } from '../../common/errors.js';
import { peerCredentials } from '../../native/index.js';
import fs from 'node:fs';
import net from 'node:net';
import { assign, enrolledDevice, pushImage, type TestDevice } from '../helpers/fixtures.js';
import { lethe, startAgentProc, startServer, tmpDir, waitFor, type AgentProc, type ServerProc } from '../helpers/proc.js';

const MiB = 1024 * 1024;

/** Runs a program; resolves with its pid, exit code and output whatever the code. */
function runTool(cmd: string, args: string[]): Promise<{ pid: number; code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const p = execFile(cmd, args, { timeout: 20_000 }, (err, stdout, stderr) =>
      resolve({ pid: p.pid!, code: err ? ((err as { code?: number }).code ?? -1) : 0, stdout, stderr }),
    );
  });
}

describe("issue #14: who may use the agent's NBD export (real server, agent and clients)", function () {
  this.timeout(120_000);
  let s: ServerProc;
  let dev: TestDevice;
  let agent: AgentProc | undefined;
  let disk: Buffer;
  const sock = () => path.join(dev.home, 'nbd.sock');
  const uri = () => `nbd+unix:///disk?socket=${sock()}`;
  const status = () => control<AgentStatus>(dev.home, { cmd: 'status' });

  before(async () => {
    s = await startServer();
    disk = randomBytes(2 * MiB);
    await pushImage(s, 'disk', { plain: { disk, mem: Buffer.alloc(0), state: Buffer.alloc(0) } });
    dev = await enrolledDevice(s);
    await assign(s, dev.deviceId, 'disk');
  });
  afterEach(async () => {
    await agent?.stop();
    agent = undefined;
  });
  after(async () => {
    dev?.close();
    await s?.stop();
  });

  async function startAgent(args: string[] = []): Promise<AgentProc> {
    agent = await startAgentProc(dev.home, 'disk', ['--no-prefetch', ...args]);
    await waitFor(async () => (await status()).nbd?.address ?? undefined, 20_000, 'the export');
    return agent;
  }

  it('by default a process that is not the QEMU the agent started gets nothing: refused, logged with its pid and uid, closed', async () => {
    const a = await startAgent();
    const info = await runTool('nbdinfo', ['--json', uri()]);
    expect(info.code, 'nbdinfo was refused').to.not.equal(0);
    expect(info.stdout).to.equal('');
    const io = await runTool('qemu-io', ['-f', 'raw', '-c', 'read -v 0 512', uri()]);
    expect(io.code, 'qemu-io was refused').to.not.equal(0);
    expect(io.stdout).to.not.match(/[0-9a-f]{8}:/); // no hex dump of the disk
    const uid = process.getuid!();
    await waitFor(async () => a.log().includes(`pid ${io.pid} `) || undefined, 5_000, "qemu-io's refusal in the log");
    for (const pid of [info.pid, io.pid]) {
      expect(a.log()).to.contain(`nbd: refused a connection from pid ${pid} (uid ${uid}): it is not the QEMU this agent started`);
    }
    const st = await status();
    expect(st.nbd!.refusedPeers).to.be.at.least(2);
    expect(st.nbd!.connections.total, 'no refused peer got as far as a connection').to.equal(0);
    expect(st.reads.reads).to.equal(0);
  });

  it('with --nbd-peers user, this user\'s tools connect and read the disk', async () => {
    const a = await startAgent(['--nbd-peers', 'user']);
    expect(a.log()).to.contain("this user's processes may connect");
    const info = await runTool('nbdinfo', ['--json', uri()]);
    expect(info.code, info.stderr).to.equal(0);
    expect((JSON.parse(info.stdout) as { exports: { 'export-size': number }[] }).exports[0]['export-size']).to.equal(disk.length);
    const io = await runTool('qemu-io', ['-f', 'raw', '-c', 'read -v 0 16', uri()]);
    expect(io.code, io.stderr).to.equal(0);
    expect(io.stdout.replace(/\s+/g, ' ')).to.contain(disk.subarray(0, 4).toString('hex').replace(/(..)/g, '$1 ').trim());
  });

  it('--nbd-tcp is refused unless forced, with a hint', async () => {
    const r = await lethe(['agent', 'run', 'disk', '--home', dev.home, '--nbd-tcp', '127.0.0.1:0']);
    expect([r.code, r.stderr]).to.deep.equal([
      2,
      "lethe: error: --nbd-tcp serves the disk's plaintext to any local process, unauthenticated\n" +
        'lethe: hint: use the unix socket (the default: only the QEMU the agent starts may connect); to test over TCP anyway, add --i-know-nbd-tcp-is-unauthenticated or set LETHE_ALLOW_NBD_TCP=1\n',
    ]);
    // Forced, the flag passes that check (this home is not enrolled: the next check speaks).
    const empty = tmpDir();
    for (const [args, env] of [
      [['--i-know-nbd-tcp-is-unauthenticated'], {}],
      [[], { LETHE_ALLOW_NBD_TCP: '1' }],
    ] as const) {
      const f = await lethe(['agent', 'run', 'disk', '--home', empty, '--nbd-tcp', '127.0.0.1:0', ...args], env);
      expect(f.code).to.equal(2);
      expect(f.stderr).to.not.contain('--nbd-tcp');
    }
  });

  it('peerCredentials reports the connecting process, and refuses what is not a connected unix socket', async () => {
    const at = path.join(tmpDir(), 'peer.sock');
    const srv = net.createServer();
    await new Promise<void>((r) => srv.listen(at, r));
    try {
      const accepted = new Promise<net.Socket>((r) => srv.once('connection', r));
      const client = net.connect(at);
      const peer = await accepted;
      const fd = (peer as unknown as { _handle: { fd: number } })._handle.fd;
      expect(peerCredentials(fd)).to.deep.equal({ pid: process.pid, uid: process.getuid!(), gid: process.getgid!() });
      client.destroy();
      peer.destroy();
    } finally {
      srv.close();
    }
    expect(() => peerCredentials(-1)).to.throw(TypeError, 'peerCredentials: fd must be a file descriptor, a non-negative integer (got -1)');
    const file = fs.openSync(at + '.txt', 'w');
    try {
      let e: unknown;
      try {
        peerCredentials(file);
      } catch (err) {
        e = err;
      }
      expect(e).to.be.instanceOf(LetheError);
      expect(errorChain(e)).to.equal(`cannot read the peer credentials of fd ${file}: getsockopt: Socket operation on non-socket`);
    } finally {
      fs.closeSync(file);
    }
  });

  it('an NbdServer with the agent\'s check serves exactly the allowed pid (a stand-in for QEMU\'s)', async () => {
    const data = randomBytes(64 * 1024);
    const backend: BlockBackend = {
      size: data.length,
      read: async (o, l) => Buffer.from(data.subarray(o, o + l)),
      write: async () => {},
      flush: async () => {},
      trim: async () => {},
      writeZeroes: async () => {},
    };
    const allowed = new Set<number>();
    const lines: string[] = [];
    const srv = new NbdServer(new Map([['x', backend]]), { allowPeer: nbdPeerCheck('qemu', () => allowed), log: (l) => lines.push(l) });
    const at = path.join(tmpDir(), 'nbd.sock');
    await srv.listen({ path: at });
    try {
      const refused = await runTool('nbdinfo', ['--size', `nbd+unix:///x?socket=${at}`]);
      expect(refused.code).to.not.equal(0);
      expect(lines.join('\n')).to.contain(`refused a connection from pid ${refused.pid} `);
      // The allowed pid is known once spawn() returns, before the client can connect.
      const ok = await new Promise<{ code: number; stdout: string }>((resolve) => {
        const p = execFile('nbdinfo', ['--size', `nbd+unix:///x?socket=${at}`], (err, stdout) => resolve({ code: err ? 1 : 0, stdout }));
        allowed.add(p.pid!);
      });
      expect(ok).to.deep.equal({ code: 0, stdout: `${data.length}\n` });
      expect(srv.stats().refusedPeers).to.equal(1);
    } finally {
      await srv.close();
    }
  });
});
