// The NBD server against real clients (qemu-io, qemu-img, nbdinfo, nbdcopy as
// child processes) and against a raw socket that breaks the protocol on
// purpose. Backends that need to misbehave wrap a FileBackend and implement the
// real BlockBackend interface.
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { LetheError } from '../../common/errors.js';
import { FileBackend } from '../../agent/disk/nbd/file-backend.js';
import * as P from '../../agent/disk/nbd/protocol.js';
import { NbdServer, type BlockBackend, type NbdServerOptions } from '../../agent/disk/nbd/server.js';
import { tmpDir, waitFor } from '../helpers/proc.js';
import { expectSameBytes } from '../helpers/bytes.js';
import { infoRequest, RawClient, u32, type Reply } from '../helpers/nbd-client.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a client tool; never throws on a non-zero exit. */
function run(cmd: string, args: string[]): Promise<Run> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    p.on('error', (e) => reject(new Error(`${cmd} did not start (scripts/setup installs qemu-utils and libnbd-bin)`, { cause: e })));
    p.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

function uri(sock: string, name: string): string {
  return `nbd+unix:///${name}?socket=${sock}`;
}

/** qemu-io on an export; expects success unless told otherwise. */
async function qemuIo(sock: string, name: string, cmds: string[], opts: { fail?: boolean; cache?: string } = {}): Promise<Run> {
  const cache = opts.cache ? ['-t', opts.cache] : [];
  const r = await run('qemu-io', ['-f', 'raw', ...cache, uri(sock, name), ...cmds.flatMap((c) => ['-c', c])]);
  const ok = r.code === 0 && !/failed|error/i.test(r.stdout + r.stderr);
  if (ok === !!opts.fail) throw new Error(`qemu-io ${cmds.join(' ; ')}: exit ${r.code}\n${r.stdout}${r.stderr}`);
  return r;
}

async function startServer(dir: string, exports: Map<string, BlockBackend>, opts: NbdServerOptions = {}) {
  const sock = path.join(dir, `nbd-${Math.random().toString(36).slice(2, 8)}.sock`);
  const server = new NbdServer(exports, opts);
  await server.listen({ path: sock });
  return { server, sock };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A backend that delays, records and fails calls on request, over a real one. */
class ProbeBackend implements BlockBackend {
  events: string[] = [];
  active = 0;
  maxActive = 0;
  fuaWrites: boolean[] = [];
  delay: (op: string, offset: number) => number = () => 0;
  fail: (op: string, offset: number) => unknown = () => undefined;
  shortRead = false;
  constructor(
    private readonly inner: FileBackend,
    readonly readonly = false,
  ) {}
  get size(): number {
    return this.inner.size;
  }
  private async around<T>(op: string, offset: number, f: () => Promise<T>): Promise<T> {
    this.events.push(`${op}-start@${offset}`);
    this.maxActive = Math.max(this.maxActive, ++this.active);
    try {
      await sleep(this.delay(op, offset));
      const err = this.fail(op, offset);
      if (err) throw err;
      return await f();
    } finally {
      this.active--;
      this.events.push(`${op}-done@${offset}`);
    }
  }
  read(offset: number, length: number) {
    return this.around('read', offset, async () => {
      const b = await this.inner.read(offset, length);
      return this.shortRead ? b.subarray(1) : b;
    });
  }
  write(offset: number, data: Buffer, fua: boolean) {
    this.fuaWrites.push(fua);
    return this.around('write', offset, () => this.inner.write(offset, data, fua));
  }
  flush() {
    return this.around('flush', 0, () => this.inner.flush());
  }
  trim(offset: number, length: number) {
    return this.around('trim', offset, () => this.inner.trim(offset, length));
  }
  writeZeroes(offset: number, length: number, fua: boolean) {
    this.fuaWrites.push(fua);
    return this.around('zero', offset, () => this.inner.writeZeroes(offset, length, fua));
  }
}

/** A ProbeBackend that hands the server its own buffers for write payloads and records what comes back. */
class PayloadProbe extends ProbeBackend {
  readonly given = new Set<Buffer>();
  readonly released: Buffer[] = [];
  payload(length: number): Promise<Buffer> {
    const b = Buffer.alloc(length);
    this.given.add(b);
    return Promise.resolve(b);
  }
  release(b: Buffer): void {
    this.released.push(b);
  }
}

function structuredMessage(r: Reply): string {
  const len = r.payload.readUInt16BE(4);
  return r.payload.subarray(6, 6 + len).toString();
}

describe('nbd server (real clients: qemu-io, qemu-img, nbdinfo, nbdcopy)', function () {
  let dir: string;
  let disk: FileBackend;
  let ro: FileBackend;
  let server: NbdServer;
  let sock: string;
  /** What the 'disk' export should hold. */
  let ref: Buffer;
  let roContent: Buffer;
  const refFile = () => {
    const f = path.join(dir, 'reference.raw');
    fs.writeFileSync(f, ref);
    return f;
  };

  before(async () => {
    dir = tmpDir('lethe-nbd-');
    ref = randomBytes(SIZE);
    fs.writeFileSync(path.join(dir, 'disk.raw'), ref);
    roContent = Buffer.from(ref.subarray(0, 4 * MiB));
    fs.writeFileSync(path.join(dir, 'ro.raw'), roContent);
    disk = await FileBackend.open(path.join(dir, 'disk.raw'));
    ro = await FileBackend.open(path.join(dir, 'ro.raw'), { readonly: true });
    ({ server, sock } = await startServer(dir, new Map<string, BlockBackend>([['disk', disk], ['ro', ro]]), { defaultExport: 'disk' }));
  });

  after(async () => {
    await server?.close();
    await disk?.close();
    await ro?.close();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('nbdinfo --json reports the size, the flags and the block sizes', async () => {
    const r = await run('nbdinfo', ['--json', uri(sock, 'disk')]);
    expect(r.code, r.stderr).to.equal(0);
    const info = JSON.parse(r.stdout) as { protocol: string; structured: boolean; exports: Record<string, unknown>[] };
    expect(info.protocol).to.equal('newstyle-fixed');
    expect(info.structured).to.equal(true);
    expect(info.exports[0]).to.include({
      'export-name': 'disk',
      'export-size': SIZE,
      is_read_only: false,
      can_flush: true,
      can_fua: true,
      can_trim: true,
      can_zero: true,
      can_multi_conn: true,
      can_df: true,
      can_cache: false,
      can_fast_zero: false,
      block_size_minimum: 1,
      block_size_preferred: 4096,
      block_size_maximum: 32 * MiB,
    });
  });

  it('nbdinfo --list lists every export, the read-only one as read-only', async () => {
    const r = await run('nbdinfo', ['--list', '--json', uri(sock, '')]);
    expect(r.code, r.stderr).to.equal(0);
    const exps = (JSON.parse(r.stdout) as { exports: { 'export-name': string; is_read_only: boolean; 'export-size': number }[] }).exports;
    expect(exps.map((e) => e['export-name']).sort()).to.deep.equal(['disk', 'ro']);
    expect(exps.find((e) => e['export-name'] === 'ro')).to.include({ is_read_only: true, 'export-size': 4 * MiB });
  });

  it('the empty export name is the default export', async () => {
    const r = await run('nbdinfo', ['--size', uri(sock, '')]);
    expect(r.stdout.trim()).to.equal(String(SIZE));
  });

  it('qemu-io writes, reads back and verifies patterns, and flushes', async () => {
    await qemuIo(sock, 'disk', ['write -P 0xab 0 64k', 'read -P 0xab 0 64k', 'write -P 0x5c 100000 3333', 'flush', 'read -P 0x5c 100000 3333']);
    ref.fill(0xab, 0, 64 * 1024);
    ref.fill(0x5c, 100000, 100000 + 3333);
    await qemuIo(sock, 'disk', ['read -P 0xab 0 64k', 'read -P 0x5c 100000 3333']);
    // A pattern that is not there is reported: the verification is real.
    await qemuIo(sock, 'disk', ['read -P 0xac 0 64k'], { fail: true });
  });

  it('qemu-io aio: many requests in flight, then aio_flush', async () => {
    const cmds: string[] = [];
    for (let i = 0; i < 16; i++) cmds.push(`aio_write -P 0x${(0x30 + i).toString(16)} ${1 * MiB + i * 65536} 64k`);
    cmds.push('aio_flush');
    for (let i = 0; i < 16; i++) cmds.push(`aio_read -P 0x${(0x30 + i).toString(16)} ${1 * MiB + i * 65536} 64k`);
    cmds.push('aio_flush');
    for (let i = 0; i < 16; i++) cmds.push(`read -P 0x${(0x30 + i).toString(16)} ${1 * MiB + i * 65536} 64k`);
    await qemuIo(sock, 'disk', cmds);
    for (let i = 0; i < 16; i++) ref.fill(0x30 + i, MiB + i * 65536, MiB + (i + 1) * 65536);
  });

  it('trim and write-zeroes read back as zeroes', async () => {
    await qemuIo(sock, 'disk', [
      'write -P 0x77 2M 256k',
      'discard 2M 64k',
      'read -P 0 2M 64k',
      'write -z 2112k 64k',
      'read -P 0 2112k 64k',
      'write -z -u 2176k 64k',
      'read -P 0 2176k 64k',
      'read -P 0x77 2240k 64k',
    ]);
    ref.fill(0x77, 2 * MiB, 2 * MiB + 256 * 1024);
    ref.fill(0, 2 * MiB, 2 * MiB + 192 * 1024);
  });

  it('qemu-img compare finds the export identical to the reference file', async () => {
    const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri(sock, 'disk'), refFile()]);
    expect(r.code, r.stdout + r.stderr).to.equal(0);
    expect(r.stdout).to.include('Images are identical');
    // and notices a difference
    const other = Buffer.from(ref);
    other[SIZE - 1] ^= 1;
    fs.writeFileSync(path.join(dir, 'other.raw'), other);
    const d = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri(sock, 'disk'), path.join(dir, 'other.raw')]);
    expect(d.code).to.equal(1);
  });

  it('nbdcopy copies the whole export out bit-exact, and a file in (over several connections)', async () => {
    const out = path.join(dir, 'copy.raw');
    const before = server.stats().connections.total;
    const r = await run('nbdcopy', [uri(sock, 'disk'), out]);
    expect(r.code, r.stderr).to.equal(0);
    expectSameBytes(fs.readFileSync(out), ref);
    // CAN_MULTI_CONN: nbdcopy opens more than one connection.
    expect(server.stats().connections.total - before).to.be.greaterThan(1);

    const incoming = randomBytes(SIZE);
    fs.writeFileSync(path.join(dir, 'in.raw'), incoming);
    const w = await run('nbdcopy', ['--flush', path.join(dir, 'in.raw'), uri(sock, 'disk')]);
    expect(w.code, w.stderr).to.equal(0);
    ref = incoming;
    expectSameBytes((await disk.read(0, SIZE)), ref);
    fs.rmSync(out);
  });

  it('two clients at once on disjoint ranges, while a third connection stays open', async () => {
    const idle = await RawClient.connect(sock);
    await idle.greet();
    await idle.go('disk');
    const a = qemuIo(sock, 'disk', ['aio_write -P 0x5a 4M 512k', 'aio_write -P 0x5b 4608k 512k', 'aio_flush', 'read -P 0x5a 4M 512k']);
    const b = qemuIo(sock, 'disk', ['aio_write -P 0xa5 6M 512k', 'aio_write -P 0xa6 6656k 512k', 'aio_flush', 'read -P 0xa6 6656k 512k']);
    const c = run('nbdcopy', [uri(sock, 'disk'), 'null:']);
    await Promise.all([a, b]);
    expect((await c).code).to.equal(0);
    ref.fill(0x5a, 4 * MiB, 4.5 * MiB);
    ref.fill(0x5b, 4.5 * MiB, 5 * MiB);
    ref.fill(0xa5, 6 * MiB, 6.5 * MiB);
    ref.fill(0xa6, 6.5 * MiB, 7 * MiB);
    idle.request(P.NBD_CMD_READ, { offset: 6 * MiB, length: 4096, cookie: 9n });
    const r = await idle.reply(4096);
    expect(r.error).to.equal(0);
    expectSameBytes(r.payload, ref.subarray(6 * MiB, 6 * MiB + 4096));
    idle.request(P.NBD_CMD_DISC);
    expect(await idle.closesWithin(2000)).to.equal(true);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri(sock, 'disk'), refFile()]);
    expect(cmp.code, cmp.stdout).to.equal(0);
  });

  it('the read-only export refuses writes with EPERM and serves reads', async () => {
    const open = await qemuIo(sock, 'ro', ['write 0 4k'], { fail: true });
    expect(open.stderr).to.include('Permission denied');
    const c = await RawClient.connect(sock);
    await c.greet();
    const { flags } = await c.go('ro');
    expect(flags & P.NBD_FLAG_READ_ONLY).to.equal(P.NBD_FLAG_READ_ONLY);
    c.request(P.NBD_CMD_WRITE, { data: Buffer.alloc(512), cookie: 1n });
    expect((await c.reply()).error).to.equal(P.NBD_EPERM);
    c.request(P.NBD_CMD_WRITE_ZEROES, { length: 512, cookie: 2n });
    expect((await c.reply()).error).to.equal(P.NBD_EPERM);
    c.request(P.NBD_CMD_READ, { length: 512, cookie: 3n });
    expectSameBytes((await c.reply(512)).payload, roContent.subarray(0, 512));
    c.destroy();
  });
});

describe('nbd server semantics (raw client and probe backends)', function () {
  let dir: string;
  let file: FileBackend;
  let probe: ProbeBackend;
  let payloads: PayloadProbe;
  let server: NbdServer;
  let sock: string;
  const logs: string[] = [];

  beforeEach(async () => {
    dir = tmpDir('lethe-nbd-');
    file = await FileBackend.open(path.join(dir, 'disk.raw'), { create: 4 * MiB });
    probe = new ProbeBackend(file);
    const ro = new ProbeBackend(file, true);
    payloads = new PayloadProbe(file);
    ({ server, sock } = await startServer(dir, new Map<string, BlockBackend>([['disk', probe], ['ro', ro], ['pay', payloads]]), { log: (l) => logs.push(l) }));
  });

  afterEach(async () => {
    await server.close();
    await file.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function connected(opts: { structured?: boolean; name?: string } = {}): Promise<RawClient> {
    const c = await RawClient.connect(sock);
    await c.greet();
    await c.go(opts.name ?? 'disk', opts);
    return c;
  }

  it('answers requests out of order: a slow read does not hold back a fast one', async () => {
    probe.delay = (op, off) => (op === 'read' && off === 0 ? 300 : 0);
    const c = await connected();
    c.request(P.NBD_CMD_READ, { cookie: 1n, offset: 0, length: 4096 });
    c.request(P.NBD_CMD_READ, { cookie: 2n, offset: 8192, length: 4096 });
    expect((await c.reply(4096)).cookie).to.equal(2n);
    expect((await c.reply(4096)).cookie).to.equal(1n);
    expect(probe.maxActive).to.equal(2);
    c.destroy();
  });

  it('qemu-io aio requests reach the backend concurrently', async () => {
    probe.delay = (op) => (op === 'read' ? 50 : 0);
    const cmds = Array.from({ length: 8 }, (_, i) => `aio_read ${i * 65536} 64k`);
    await qemuIo(sock, 'disk', [...cmds, 'aio_flush']);
    expect(probe.maxActive).to.be.greaterThan(1);
  });

  it('a flush is answered only after the writes received before it are done and flushed', async () => {
    probe.delay = (op) => (op === 'write' ? 200 : 0);
    const c = await connected();
    c.request(P.NBD_CMD_WRITE, { cookie: 1n, offset: 0, data: Buffer.alloc(4096, 1) });
    c.request(P.NBD_CMD_FLUSH, { cookie: 2n });
    const first = await c.reply();
    const second = await c.reply();
    expect([first.cookie, second.cookie]).to.deep.equal([1n, 2n]);
    expect(probe.events).to.deep.equal(['write-start@0', 'write-done@0', 'flush-start@0', 'flush-done@0']);
    c.destroy();
  });

  it('a flush also waits for writes in flight on other connections to the export', async () => {
    probe.delay = (op) => (op === 'write' ? 200 : 0);
    const a = await connected();
    const b = await connected();
    a.request(P.NBD_CMD_WRITE, { cookie: 1n, offset: 4096, data: Buffer.alloc(4096, 2) });
    await sleep(50);
    b.request(P.NBD_CMD_FLUSH, { cookie: 2n });
    expect((await b.reply()).error).to.equal(0);
    expect(probe.events.indexOf('write-done@4096')).to.be.lessThan(probe.events.indexOf('flush-start@0'));
    expect((await a.reply()).error).to.equal(0);
    a.destroy();
    b.destroy();
  });

  it('FUA reaches the backend: qemu-io write -f, and a FUA trim is followed by a flush', async () => {
    // qemu-io's default cache mode is writethrough, which sets FUA on every
    // write; writeback leaves it to -f.
    await qemuIo(sock, 'disk', ['write -P 0x10 0 64k'], { cache: 'writethrough' });
    await qemuIo(sock, 'disk', ['write -f -P 0x11 0 64k', 'write -P 0x12 64k 64k', 'write -z -f 128k 64k', 'read -P 0x11 0 64k'], { cache: 'writeback' });
    expect(probe.fuaWrites).to.deep.equal([true, true, false, true]);
    const c = await connected();
    probe.events = [];
    c.request(P.NBD_CMD_TRIM, { flags: P.NBD_CMD_FLAG_FUA, offset: 0, length: 4096 });
    expect((await c.reply()).error).to.equal(0);
    expect(probe.events).to.deep.equal(['trim-start@0', 'trim-done@0', 'flush-start@0', 'flush-done@0']);
    c.destroy();
  });

  it('structured replies: reads come as one OFFSET_DATA chunk, errors as ERROR chunks with a message', async () => {
    await file.write(8192, Buffer.alloc(4096, 0xee), false);
    const c = await connected({ structured: true });
    c.request(P.NBD_CMD_READ, { cookie: 5n, offset: 8192, length: 4096 });
    const r = await c.reply();
    expect(r).to.include({ kind: 'structured', type: P.NBD_REPLY_TYPE_OFFSET_DATA, flags: P.NBD_REPLY_FLAG_DONE, cookie: 5n });
    expect(r.payload.readBigUInt64BE(0)).to.equal(8192n);
    expectSameBytes(r.payload.subarray(8), Buffer.alloc(4096, 0xee));
    c.request(P.NBD_CMD_READ, { cookie: 6n, offset: 4 * MiB, length: 1 });
    const e = await c.reply();
    expect(e).to.include({ type: P.NBD_REPLY_TYPE_ERROR, error: P.NBD_EINVAL, cookie: 6n });
    expect(structuredMessage(e)).to.equal('read of 1 bytes at 4194304 is beyond the export size 4194304');
    c.request(P.NBD_CMD_READ, { cookie: 7n, offset: 0, length: 32 * MiB + 1 });
    expect((await c.reply()).error).to.equal(P.NBD_EOVERFLOW);
    c.request(P.NBD_CMD_FLUSH, { cookie: 8n });
    expect(await c.reply()).to.include({ type: P.NBD_REPLY_TYPE_NONE, flags: P.NBD_REPLY_FLAG_DONE, error: 0 });
    c.destroy();
  });

  it("a write's payload goes into the backend's buffer, which comes back once the write is done, failed or cut off", async () => {
    payloads.fail = (op, off) => (op === 'write' && off === 4096 ? Object.assign(new Error('no space'), { code: 'ENOSPC' }) : undefined);
    const c = await connected({ name: 'pay' });
    const data = randomBytes(4096);
    c.request(P.NBD_CMD_WRITE, { cookie: 1n, offset: 0, data });
    expect((await c.reply()).error).to.equal(0);
    expectSameBytes((await file.read(0, 4096)), data, 'the payload reached the file');
    c.request(P.NBD_CMD_WRITE, { cookie: 2n, offset: 4096, data: randomBytes(512) });
    expect((await c.reply()).error).to.equal(P.NBD_ENOSPC);
    expect(payloads.released, 'both payloads back, each once').to.have.members([...payloads.given]);
    // A client that goes away inside a payload: the buffer comes back all the same.
    c.request(P.NBD_CMD_WRITE, { cookie: 3n, offset: 8192, length: 8192, data: randomBytes(100) });
    await waitFor(async () => payloads.given.size === 3 || undefined, 5_000, 'the third payload buffer');
    c.destroy();
    await waitFor(async () => payloads.released.length === 3 || undefined, 5_000, 'the cut-off payload back');
    expect(payloads.released).to.have.members([...payloads.given]);
  });

  it('backend failures map to EIO, ENOSPC and EINVAL; a short read is EIO, never short data', async () => {
    probe.fail = (op, off) =>
      off === 0 && op === 'read'
        ? new Error('chunk fetch failed', { cause: new LetheError('TAMPERED', 'chunk 0 failed authentication') })
        : off === 4096
          ? Object.assign(new Error('no space'), { code: 'ENOSPC' })
          : off === 8192
            ? new LetheError('BAD_REQUEST', 'unaligned')
            : undefined;
    const c = await connected();
    c.request(P.NBD_CMD_READ, { cookie: 1n, offset: 0, length: 512 });
    expect((await c.reply()).error).to.equal(P.NBD_EIO);
    c.request(P.NBD_CMD_WRITE, { cookie: 2n, offset: 4096, data: Buffer.alloc(512) });
    expect((await c.reply()).error).to.equal(P.NBD_ENOSPC);
    c.request(P.NBD_CMD_WRITE_ZEROES, { cookie: 3n, offset: 8192, length: 512 });
    expect((await c.reply()).error).to.equal(P.NBD_EINVAL);
    probe.shortRead = true;
    c.request(P.NBD_CMD_READ, { cookie: 4n, offset: 65536, length: 512 });
    expect((await c.reply()).error).to.equal(P.NBD_EIO);
    expect(logs.join('\n')).to.include('read of 512 bytes at 0 failed: chunk fetch failed: chunk 0 failed authentication');
    const r = await qemuIo(sock, 'disk', ['read 0 4k'], { fail: true });
    expect(r.stdout + r.stderr).to.include('Input/output error');
    expect(server.stats()).to.include({ backendErrors: 5 });
    c.destroy();
  });

  it('hostile clients close only their own connection; errors are answered and the server carries on', async () => {
    const closes = async (send: (c: RawClient) => Promise<void> | void, greet = true) => {
      const c = await RawClient.connect(sock);
      if (greet) await c.greet();
      await send(c);
      return c.closesWithin(3000);
    };
    // garbage instead of client flags (an HTTP request), and a client that is not fixed newstyle
    expect(await closes((c) => c.send(Buffer.from('GET / HTTP/1.1\r\n\r\n')), false)).to.equal(true);
    expect(await closes((c) => c.send(randomBytes(4096)), false)).to.equal(true);
    expect(await closes(async (c) => (await c.read(18), c.send(u32(0))), false)).to.equal(true);
    // bad option magic; an option length of 4 GiB; an option header cut short
    expect(await closes((c) => c.send(Buffer.alloc(16, 0x41)))).to.equal(true);
    expect(await closes((c) => c.option(P.NBD_OPT_GO, Buffer.alloc(0), 0xffffffff))).to.equal(true);
    expect(await closes((c) => (c.send(Buffer.alloc(8)), c.end()))).to.equal(true);
    // NBD_OPT_EXPORT_NAME cannot fail politely: an unknown name ends the session
    expect(await closes((c) => c.option(P.NBD_OPT_EXPORT_NAME, Buffer.from('nope')))).to.equal(true);

    // Errors that leave the handshake going
    const h = await RawClient.connect(sock);
    expect(await h.greet()).to.equal(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
    h.option(99, Buffer.from('whatever'));
    expect((await h.optReply()).type).to.equal(P.NBD_REP_ERR_UNSUP);
    h.option(P.NBD_OPT_STARTTLS);
    expect((await h.optReply()).type).to.equal(P.NBD_REP_ERR_UNSUP);
    h.option(P.NBD_OPT_LIST, Buffer.from('x'));
    expect((await h.optReply()).type).to.equal(P.NBD_REP_ERR_INVALID);
    h.option(P.NBD_OPT_GO, Buffer.from([0, 0, 0, 9, 1]));
    expect((await h.optReply()).type).to.equal(P.NBD_REP_ERR_INVALID);
    h.option(P.NBD_OPT_INFO, infoRequest('nope', []));
    const unknown = await h.optReply();
    expect(unknown.type).to.equal(P.NBD_REP_ERR_UNKNOWN);
    expect(unknown.data.toString()).to.equal('unknown export "nope"');
    h.option(P.NBD_OPT_GO, Buffer.alloc(200 * 1024)); // read and dropped in pieces, not held
    expect((await h.optReply()).type).to.equal(P.NBD_REP_ERR_TOO_BIG);
    h.option(0x1234, Buffer.alloc(200 * 1024));
    expect((await h.optReply()).type).to.equal(P.NBD_REP_ERR_UNSUP);
    h.option(P.NBD_OPT_INFO, infoRequest('disk', [P.NBD_INFO_BLOCK_SIZE, P.NBD_INFO_NAME]));
    const infos: Buffer[] = [];
    for (let r = await h.optReply(); r.type !== P.NBD_REP_ACK; r = await h.optReply()) infos.push(r.data);
    const bs = infos.find((d) => d.readUInt16BE(0) === P.NBD_INFO_BLOCK_SIZE)!;
    expect([bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)]).to.deep.equal([1, 4096, 32 * MiB]);
    expect(infos.find((d) => d.readUInt16BE(0) === P.NBD_INFO_NAME)!.subarray(2).toString()).to.equal('disk');
    const { size } = await h.go('disk');
    expect(size).to.equal(BigInt(4 * MiB));

    // Transmission errors that keep the connection
    h.request(77, { cookie: 1n });
    expect(await h.reply()).to.include({ error: P.NBD_EINVAL, cookie: 1n });
    h.request(P.NBD_CMD_BLOCK_STATUS, { cookie: 2n, length: 4096 });
    expect((await h.reply()).error).to.equal(P.NBD_EINVAL);
    h.request(P.NBD_CMD_READ, { cookie: 3n, offset: 4 * MiB - 100, length: 200 });
    expect((await h.reply()).error).to.equal(P.NBD_EINVAL);
    h.request(P.NBD_CMD_READ, { cookie: 4n, offset: 0xffffffffffffff00n, length: 512 });
    expect((await h.reply()).error).to.equal(P.NBD_EINVAL);
    h.request(P.NBD_CMD_WRITE, { cookie: 5n, offset: 4 * MiB - 100, data: Buffer.alloc(200, 0x99) });
    expect((await h.reply()).error).to.equal(P.NBD_ENOSPC);
    h.request(P.NBD_CMD_WRITE_ZEROES, { cookie: 6n, offset: 4 * MiB, length: 1 });
    expect((await h.reply()).error).to.equal(P.NBD_ENOSPC);
    h.request(P.NBD_CMD_TRIM, { cookie: 7n, offset: 4 * MiB, length: 1 });
    expect((await h.reply()).error).to.equal(P.NBD_EINVAL);
    h.request(P.NBD_CMD_WRITE_ZEROES, { cookie: 8n, flags: P.NBD_CMD_FLAG_FAST_ZERO, length: 512 });
    expect((await h.reply()).error).to.equal(P.NBD_EINVAL);
    h.request(P.NBD_CMD_WRITE, { cookie: 9n, flags: 0x100, data: Buffer.alloc(512, 0x98) });
    expect((await h.reply()).error).to.equal(P.NBD_EINVAL);
    h.request(P.NBD_CMD_READ, { cookie: 10n, length: 32 * MiB + 1 });
    expect((await h.reply()).error).to.equal(P.NBD_EINVAL);
    // the payloads of refused writes were consumed: the stream is still in step
    h.request(P.NBD_CMD_READ, { cookie: 11n, offset: 0, length: 512 });
    const ok = await h.reply(512);
    expect(ok).to.include({ error: 0, cookie: 11n });
    expectSameBytes(ok.payload, Buffer.alloc(512));
    // An oversized write: answered, then the connection is closed (its payload is not read)
    h.request(P.NBD_CMD_WRITE, { cookie: 12n, length: 64 * MiB });
    expect(await h.reply()).to.include({ error: P.NBD_EINVAL, cookie: 12n });
    expect(await h.closesWithin(3000)).to.equal(true);

    // bad request magic, and a request cut short
    const t = await connected();
    t.send(Buffer.alloc(28, 0xff));
    expect(await t.closesWithin(3000)).to.equal(true);
    const u = await connected();
    u.send(Buffer.from([0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0, 0, 0]));
    u.end();
    expect(await u.closesWithin(3000)).to.equal(true);
    // a write whose payload never comes
    const v = await connected();
    v.request(P.NBD_CMD_WRITE, { length: 4096 });
    v.send(Buffer.alloc(100));
    v.end();
    expect(await v.closesWithin(3000)).to.equal(true);

    // A normal client still works, and the server counted all of it.
    await qemuIo(sock, 'disk', ['write -P 0x42 0 64k', 'read -P 0x42 0 64k']);
    // qemu-io has exited; the server sees its connection close when it next runs.
    await waitFor(async () => server.stats().connections.active === 0 || undefined, 30_000, 'the last connection to close');
    const s = server.stats();
    expect(s.protocolErrors).to.equal(11);
    expect(s.errorReplies).to.deep.equal({ EINVAL: 9, ENOSPC: 2 });
    expect(s.requests.unknown).to.equal(1);
    expect(s.connections.active).to.equal(0);
    expect(logs.filter((l) => / closed: /.test(l)).map((l) => l.replace(/^nbd: connection \d+: /, ''))).to.include.members([
      'closed: unknown client flags 0x47455420',
      'closed: client does not speak fixed newstyle',
      'closed: bad option magic 0x4141414141414141',
      'closed: option 7 carries 4294967295 bytes, more than 16384',
      'closed: NBD_OPT_EXPORT_NAME for unknown export "nope"',
      'closed: write of 67108864 bytes exceeds the maximum payload of 33554432',
      'closed: bad request magic 0xffffffff',
      'closed: connection ended inside a message',
    ]);
  });

  it('a client that never reads its replies cannot make the server hold more than its limits', async () => {
    const c = await connected();
    const n = 300;
    for (let i = 0; i < n; i++) c.request(P.NBD_CMD_READ, { cookie: BigInt(i), offset: 0, length: MiB });
    await sleep(500);
    // 64 MiB of unsent read data per connection: the rest waits in the socket.
    const taken = server.stats().requests.read;
    expect(taken).to.be.within(60, 100);
    let got = 0;
    while (got < n) {
      const r = await c.reply(MiB);
      expect(r.error).to.equal(0);
      got++;
    }
    expect(server.stats().requests.read).to.equal(n);
    c.destroy();
  });

  it('a client that stalls in the handshake is dropped', async () => {
    const slow = await startServer(dir, new Map([['disk', probe as BlockBackend]]), { handshakeTimeoutMs: 200, log: (l) => logs.push(l) });
    const c = await RawClient.connect(slow.sock);
    await c.greet();
    expect(await c.closesWithin(2000)).to.equal(true);
    expect(slow.server.stats().protocolErrors).to.equal(1);
    expect(logs.at(-1)).to.match(/^nbd: connection \d+: handshake not finished within 200 ms$/);
    await slow.server.close();
  });

  it('NBD_OPT_EXPORT_NAME (legacy) with and without the 124 zero bytes; NBD_OPT_ABORT is acknowledged', async () => {
    for (const noZeroes of [true, false]) {
      const c = await RawClient.connect(sock);
      await c.greet(P.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0));
      c.option(P.NBD_OPT_EXPORT_NAME, Buffer.from('disk'));
      const r = await c.read(10);
      expect(r.readBigUInt64BE(0)).to.equal(BigInt(4 * MiB));
      if (!noZeroes) expectSameBytes((await c.read(124)), Buffer.alloc(124));
      c.request(P.NBD_CMD_READ, { cookie: 3n, length: 16 });
      expect(await c.reply(16)).to.include({ kind: 'simple', error: 0, cookie: 3n });
      c.request(P.NBD_CMD_DISC);
      expect(await c.closesWithin(2000)).to.equal(true);
    }
    const a = await RawClient.connect(sock);
    await a.greet();
    a.option(P.NBD_OPT_ABORT);
    expect((await a.optReply()).type).to.equal(P.NBD_REP_ACK);
    expect(await a.closesWithin(2000)).to.equal(true);
  });

  it('close() answers in-flight requests, ends connections and stops listening', async () => {
    probe.delay = (op) => (op === 'write' ? 300 : 0);
    const c = await connected();
    const h = await RawClient.connect(sock); // still in the handshake
    c.request(P.NBD_CMD_WRITE, { cookie: 1n, offset: 0, data: Buffer.alloc(4096, 3) });
    await sleep(50);
    const t0 = Date.now();
    await server.close();
    expect(Date.now() - t0).to.be.lessThan(P.CLOSE_GRACE_MS);
    expect(await c.reply()).to.include({ error: 0, cookie: 1n });
    expect(await c.closesWithin(2000)).to.equal(true);
    expect(await h.closesWithin(2000)).to.equal(true);
    expect(fs.existsSync(sock)).to.equal(false);
    expectSameBytes((await file.read(0, 4096)), Buffer.alloc(4096, 3));
  });

  it('listens on loopback TCP only, replaces a stale socket file and refuses a live one', async () => {
    const tcp = new NbdServer(new Map([['disk', probe as BlockBackend]]));
    const addr = await tcp.listen({ host: '127.0.0.1', port: 0 });
    const r = await run('nbdinfo', ['--size', `nbd://127.0.0.1:${(addr as { port: number }).port}/disk`]);
    expect(r.stdout.trim()).to.equal(String(4 * MiB));
    await tcp.close();
    const err = await new NbdServer(new Map()).listen({ host: '0.0.0.0', port: 0 }).catch((e: unknown) => e);
    expect(err).to.be.instanceOf(LetheError).and.include({ code: 'CONFIG', message: 'nbd: refusing to listen on "0.0.0.0"' });

    // a socket file nobody listens on (left by a crash) is replaced
    const live = path.join(dir, 'live.sock');
    const stale = path.join(dir, 'stale.sock');
    const tmp = net.createServer().listen(live);
    await new Promise((r) => tmp.once('listening', r));
    fs.linkSync(live, stale);
    await new Promise((r) => tmp.close(r));
    const s2 = new NbdServer(new Map([['disk', probe as BlockBackend]]));
    await s2.listen({ path: stale });
    expect(fs.statSync(stale).mode & 0o777).to.equal(0o600);
    const busy = await new NbdServer(new Map()).listen({ path: stale }).catch((e: unknown) => e);
    expect(busy).to.be.instanceOf(LetheError).and.include({ code: 'CONFIG' });
    expect((busy as Error).message).to.equal(`nbd: another server is listening on ${JSON.stringify(stale)}`);
    await s2.close();
  });

  it('refuses exports and block sizes proto.md does not allow', () => {
    const bad = (f: () => unknown) => expect(f).to.throw(LetheError);
    bad(() => new NbdServer(new Map([['a\0b', probe as BlockBackend]])));
    bad(() => new NbdServer(new Map([['disk', probe as BlockBackend]]), { defaultExport: 'other' }));
    bad(() => new NbdServer(new Map(), { blockSize: { minimum: 3, preferred: 4096, maximum: 32 * MiB } }));
    bad(() => new NbdServer(new Map(), { blockSize: { minimum: 1, preferred: 256, maximum: 32 * MiB } }));
    bad(() => new NbdServer(new Map(), { blockSize: { minimum: 1, preferred: 4096, maximum: 1024 } }));
  });
});
