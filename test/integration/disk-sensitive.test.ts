// Sensitive disk ranges over NBD: concurrent readers each get their own
// transit buffer (a shared one returned another request's plaintext), no read's
// plaintext stays in the agent once it is answered, nor any write's once it is
// encrypted, and a guest write reaches the device's disk only as ciphertext.
import { expect } from 'chai';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { control } from '../../agent/daemon/control.js';
import type { AgentStatus } from '../../agent/daemon/start.js';
import { assign, enrolledDevice, pushImage, type TestDevice } from '../helpers/fixtures.js';
import { scanProcess } from '../helpers/scan.js';
import { startAgentProc, startServer, tmpDir, waitFor, type AgentProc, type ServerProc } from '../helpers/proc.js';
import { expectSameBytes } from '../helpers/bytes.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;

function filesUnder(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    return e.isDirectory() ? filesUnder(p) : e.isFile() ? [p] : [];
  });
}

describe('sensitive disk ranges over NBD (real server, agent and clients)', function () {
  this.timeout(120_000);
  let s: ServerProc;
  let dev: TestDevice;
  let agent: AgentProc;
  let disk: Buffer;
  const uri = () => `nbd+unix:///secret?socket=${path.join(dev.home, 'nbd.sock')}`;

  before(async () => {
    s = await startServer();
    disk = randomBytes(8 * MiB);
    await pushImage(s, 'secret', {
      plain: { disk, mem: Buffer.alloc(0), state: Buffer.alloc(0) },
      policy: `sensitive:\n  disk: [[0, ${4 * MiB}]]\n`,
    });
    dev = await enrolledDevice(s);
    await assign(s, dev.deviceId, 'secret');
    // nbdcopy and qemu-io are not the agent's QEMU: they connect by explicit opt-in.
    agent = await startAgentProc(dev.home, 'secret', ['--no-prefetch', '--nbd-peers', 'user']);
    await waitFor(async () => (await control<AgentStatus>(dev.home, { cmd: 'status' })).nbd?.address ?? undefined, 20_000, 'the export');
  });
  after(async () => {
    await agent?.stop();
    dev?.close();
    await s?.stop();
  });

  it('concurrent reads of sensitive chunks each return their own plaintext', async () => {
    const dir = tmpDir();
    // nbdcopy reads over 4 connections with many requests in flight.
    await Promise.all([run('nbdcopy', [uri(), path.join(dir, 'a.raw')]), run('nbdcopy', [uri(), path.join(dir, 'b.raw')])]);
    expectSameBytes(fs.readFileSync(path.join(dir, 'a.raw')), disk);
    expectSameBytes(fs.readFileSync(path.join(dir, 'b.raw')), disk);
    fs.rmSync(dir, { recursive: true, force: true });
    const st = await control<AgentStatus>(dev.home, { cmd: 'status' });
    expect(st.resident.sensitive, 'sensitive chunks are not kept decrypted').to.equal(0);
    expect(st.keys.sensitiveKeys).to.be.greaterThan(0);
  });

  it('once the reads are answered, no disk plaintext of either class is left in the agent', async () => {
    // The reads above went through the agent's reply buffers: each is zeroed once sent.
    await run('nbdcopy', [uri(), 'null:']);
    for (const at of [1 * MiB + 4100, 3 * MiB + 77, 6 * MiB + 4100, 8 * MiB - 64]) {
      const needle = disk.subarray(at, at + 32);
      expect(scanProcess(agent.proc.pid!, needle), `plaintext of byte ${at} (${at < 4 * MiB ? 'sensitive' : 'normal'})`).to.deep.equal([]);
    }
  });

  it('once a guest write is encrypted, its plaintext is not left in the agent, of either class', async () => {
    // The payload comes off the socket into a locked buffer, zeroed once the write is
    // done; the bytes Node read it into are zeroed as they are copied out.
    const dir = tmpDir();
    const payload = randomBytes(256 * 1024);
    const file = path.join(dir, 'payload.bin');
    fs.writeFileSync(file, payload);
    for (const at of ['2M', '5M']) await run('qemu-io', ['-f', 'raw', '-c', `write -s ${file} ${at} 256k`, '-c', 'flush', uri()]);
    fs.rmSync(dir, { recursive: true, force: true });
    for (const at of [0, 4100, 100_000, 256 * 1024 - 32]) {
      const needle = payload.subarray(at, at + 32);
      expect(scanProcess(agent.proc.pid!, needle), `plaintext of payload byte ${at}`).to.deep.equal([]);
    }
  });

  it('a flushed guest write is on the device only as ciphertext', async () => {
    const marker = `LETHE-DISK-MARKER-${randomBytes(8).toString('hex')}`;
    const file = path.join(tmpDir(), 'marker.bin');
    const block = Buffer.alloc(64 * 1024, marker);
    fs.writeFileSync(file, block);
    // Into a sensitive and a normal range; qemu-io writes through (FUA) and flushes.
    for (const at of ['1M', '6M']) {
      const r = await run('qemu-io', ['-f', 'raw', '-c', `write -s ${file} ${at} 64k`, '-c', 'flush', uri()]);
      expect(r.stdout).to.contain('wrote 65536/65536 bytes');
    }
    const copy = path.join(path.dirname(file), 'copy.raw');
    await run('nbdcopy', [uri(), copy]);
    const now = fs.readFileSync(copy);
    fs.rmSync(path.dirname(file), { recursive: true, force: true });
    expectSameBytes(now.subarray(1 * MiB, 1 * MiB + block.length), block);
    expectSameBytes(now.subarray(6 * MiB, 6 * MiB + block.length), block);
    const st = await control<AgentStatus>(dev.home, { cmd: 'status' });
    expect(st.cache.dirty).to.be.at.least(2);
    for (const f of filesUnder(dev.home)) {
      expect(fs.readFileSync(f).includes(Buffer.from(marker)), `marker found in ${f}`).to.equal(false);
    }
  });
});
