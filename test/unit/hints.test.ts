// The host side of the hint channel (docs/guest-hints.md): the parser fed byte chunks
// split anywhere, the policy line, and HintChannel against a unix socket server that
// plays QEMU's chardev and the guest driver.
import { expect } from 'chai';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { once } from 'node:events';
import { LetheError } from '../../common/errors.js';
import { GuestHintError, HintChannel, HintParser, percentEncode, policyLine, type HintMessage, type HintPolicy, type HintReport } from '../../agent/vm/hints.js';
import { framesToPages } from '../../common/hint-protocol.js';

const TRANSCRIPT = [
  'hello lethe-guestd 1',
  'ok policy',
  'report 7 begin',
  's 100 3',
  's 200 1',
  'f 50 10',
  'f 1000 4096',
  'report 7 end sensitive=4 free=4106 procs=2',
  'error unknown command \'bogus\'',
  'dropped files=3 pages=257',
].join('\n') + '\n';

const REPORT_7: HintReport = {
  seq: 7,
  sensitive: [[100, 3], [200, 1]],
  free: [[50, 10], [1000, 4096]],
  sensitiveFrames: 4,
  freeFrames: 4106,
  procs: 2,
};

const EXPECTED: HintMessage[] = [
  { kind: 'hello', driver: 'lethe-guestd', version: 1 },
  { kind: 'ok', what: 'policy' },
  { kind: 'report', report: REPORT_7 },
  { kind: 'error', reason: "unknown command 'bogus'" },
  { kind: 'dropped', files: 3, pages: 257 },
];

function parseChunks(chunks: Buffer[]): { messages: HintMessage[]; parser: HintParser } {
  const parser = new HintParser();
  const messages = chunks.flatMap((c) => parser.push(c));
  return { messages, parser };
}

function splitAt(b: Buffer, cuts: number[]): Buffer[] {
  const at = [0, ...cuts.filter((c) => c > 0 && c < b.length).sort((x, y) => x - y), b.length];
  return at.slice(1).map((end, i) => b.subarray(at[i], end));
}

/** Waits (up to 10 s) until ok() holds. */
async function until(ok: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`not so after ${timeoutMs} ms: ${ok}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const lines = (...l: string[]) => Buffer.from(l.join('\n') + '\n', 'latin1');
const reports = (m: HintMessage[]) => m.filter((x) => x.kind === 'report').map((x) => (x as { report: HintReport }).report.seq);

describe('guest hints: the parser', () => {
  const bytes = Buffer.from(TRANSCRIPT, 'latin1');

  it('reads a whole transcript in one chunk', () => {
    const { messages, parser } = parseChunks([bytes]);
    expect(messages).to.deep.equal(EXPECTED);
    expect(parser.counters).to.deep.equal({ overlong: 0, garbage: 0, brokenReports: 0 });
  });

  it('gives the same messages for every split into two chunks, and byte by byte', () => {
    for (let cut = 1; cut < bytes.length; cut++) {
      expect(parseChunks(splitAt(bytes, [cut])).messages, `cut at ${cut}`).to.deep.equal(EXPECTED);
    }
    expect(parseChunks([...bytes].map((b) => Buffer.from([b]))).messages).to.deep.equal(EXPECTED);
  });

  it('gives the same messages for odd three-way splits', () => {
    for (let a = 1; a < bytes.length; a += 7) {
      for (let b = a + 1; b < bytes.length; b += 13) {
        expect(parseChunks(splitAt(bytes, [a, b])).messages, `cuts at ${a}, ${b}`).to.deep.equal(EXPECTED);
      }
    }
  });

  it('does not keep a reference to a chunk the socket may reuse', () => {
    const parser = new HintParser();
    const chunk = Buffer.from('hello lethe-gu', 'latin1');
    expect(parser.push(chunk)).to.deep.equal([]);
    chunk.fill(0x78);
    expect(parser.push(Buffer.from('estd 1\n'))).to.deep.equal([EXPECTED[0]]);
  });

  it('ignores and counts lines over 4096 bytes, split or not, and goes on', () => {
    const long = Buffer.from('x'.repeat(5000) + '\nhello lethe-guestd 1\n', 'latin1');
    for (const cuts of [[], [100], [4095], [4096], [4097], [5000], [5001], [2000, 4500]]) {
      const { messages, parser } = parseChunks(splitAt(long, cuts));
      expect(messages, `cuts ${cuts}`).to.deep.equal([EXPECTED[0]]);
      expect(parser.counters.overlong, `cuts ${cuts}`).to.equal(1);
    }
  });

  it('takes a line of exactly 4096 bytes with its newline, and not one byte more', () => {
    const reason = 'r'.repeat(4096 - 'error '.length - 1);
    expect(parseChunks([lines(`error ${reason}`)]).messages).to.deep.equal([{ kind: 'error', reason }]);
    const { messages, parser } = parseChunks([lines(`error ${reason}r`)]);
    expect([messages, parser.counters.overlong]).to.deep.equal([[], 1]);
  });

  it('counts garbage and ignores it', () => {
    const { messages, parser } = parseChunks([
      lines('', 'hello', 'hello other-driver 1', 'hello lethe-guestd 0', 'hello lethe-guestd x', 'ok', 'ok a b', 'dropped files=1', 'dropped files=-1 pages=2', 'error', 'nonsense', 'ok pol\x01icy', 's 1 1', 'report 1 end sensitive=0 free=0', 'hello lethe-guestd 2'),
    ]);
    expect(messages).to.deep.equal([{ kind: 'hello', driver: 'lethe-guestd', version: 2 }]);
    expect(parser.counters.garbage).to.equal(14);
  });

  it('drops a report block that is cut off, out of order or does not add up, and keeps the next', () => {
    const cases: [string, string[]][] = [
      ['a begin without an end', ['report 1 begin', 's 1 1']],
      ['an end without a begin', ['report 1 end sensitive=0 free=0 procs=0']],
      ['another seq at the end', ['report 1 begin', 'report 2 end sensitive=0 free=0 procs=0']],
      ['a sensitive total that does not add up', ['report 1 begin', 's 1 2', 'report 1 end sensitive=1 free=0 procs=0']],
      ['a free total that does not add up', ['report 1 begin', 'f 1 2', 'report 1 end sensitive=0 free=3 procs=0']],
      ['runs out of order', ['report 1 begin', 's 10 1', 's 5 1', 'report 1 end sensitive=2 free=0 procs=0']],
      ['overlapping runs', ['report 1 begin', 'f 10 5', 'f 14 1', 'report 1 end sensitive=0 free=6 procs=0']],
      ['an empty run', ['report 1 begin', 's 10 0', 'report 1 end sensitive=0 free=0 procs=0']],
      ['a number with a leading zero', ['report 1 begin', 's 010 1', 'report 1 end sensitive=1 free=0 procs=0']],
      ['a number past 2^53', ['report 1 begin', 's 9007199254740993 1', 'report 1 end sensitive=1 free=0 procs=0']],
      ['garbage inside', ['report 1 begin', 's 1 1', 'zzz', 'report 1 end sensitive=1 free=0 procs=0']],
      ['an overlong line inside', ['report 1 begin', 's 1 1', `f ${'9'.repeat(5000)} 1`, 'report 1 end sensitive=1 free=0 procs=0']],
    ];
    for (const [what, block] of cases) {
      const { messages, parser } = parseChunks([lines(...block, 'report 2 begin', 's 7 1', 'report 2 end sensitive=1 free=0 procs=1')]);
      expect(reports(messages), what).to.deep.equal([2]);
      expect(parser.counters.brokenReports, what).to.equal(1);
    }
  });

  it('lets other lines pass inside a block without breaking it', () => {
    const { messages } = parseChunks([lines('report 3 begin', 's 1 1', 'error line too long', 'report 3 end sensitive=1 free=0 procs=1')]);
    expect(messages.map((m) => m.kind)).to.deep.equal(['error', 'report']);
  });

  it('an empty report is a report', () => {
    const { messages } = parseChunks([lines('report 1 begin', 'report 1 end sensitive=0 free=0 procs=0')]);
    expect(messages).to.deep.equal([{ kind: 'report', report: { seq: 1, sensitive: [], free: [], sensitiveFrames: 0, freeFrames: 0, procs: 0 } }]);
  });

  it('reset() drops a partial line and an open block, counting the block', () => {
    const parser = new HintParser();
    expect(parser.push(Buffer.from('report 1 begin\ns 1 1\nhello lethe'))).to.deep.equal([]);
    parser.reset();
    expect(parser.counters.brokenReports).to.equal(1);
    expect(parser.push(Buffer.from('-guestd 1\nhello lethe-guestd 1\n'))).to.deep.equal([EXPECTED[0]]);
    expect(parser.counters.garbage).to.equal(1);
  });
});

describe('guest hints: the policy line', () => {
  it('percent-encodes separators, spaces, % and bytes outside printable ASCII', () => {
    expect(percentEncode('gpg-agent')).to.equal('gpg-agent');
    expect(percentEncode('a,b c%d=e')).to.equal('a%2Cb%20c%25d%3De');
    expect(percentEncode('/home/jürgen/.ssh')).to.equal('/home/j%C3%BCrgen/.ssh');
    expect(percentEncode('tab\there')).to.equal('tab%09here');
  });

  it('writes every field, lists comma-separated, empty lists empty', () => {
    expect(policyLine({ intervalMs: 2000, processes: ['gpg-agent', 'ssh agent'], cgroups: [], files: ['/home/u/.ssh', '/etc/a,b'] })).to.equal(
      'policy interval=2000 procs=gpg-agent,ssh%20agent cgroups= files=/home/u/.ssh,/etc/a%2Cb',
    );
    expect(policyLine({ intervalMs: 0, processes: [], cgroups: ['/finance.slice'], files: [] })).to.equal('policy interval=0 procs= cgroups=/finance.slice files=');
  });

  it('refuses what the driver would refuse, saying what and how to fix it', () => {
    const base: HintPolicy = { intervalMs: 1000, processes: [], cgroups: [], files: [] };
    const refusal = (p: Partial<HintPolicy>) => {
      try {
        policyLine({ ...base, ...p });
      } catch (e) {
        expect(e).to.be.instanceOf(LetheError);
        return `${(e as LetheError).code}: ${(e as LetheError).message} / ${(e as LetheError).hint}`;
      }
      throw new Error('expected a refusal');
    };
    expect(refusal({ intervalMs: 50 })).to.equal('BAD_REQUEST: bad hint policy: interval 50 ms / use 0 (only on request) or 100 to 86400000 ms');
    expect(refusal({ intervalMs: 1.5 })).to.match(/interval 1.5 ms/);
    expect(refusal({ processes: [''] })).to.equal('BAD_REQUEST: bad hint policy: processes entry "" / names are non-empty and hold no NUL byte');
    expect(refusal({ files: ['a\0b'] })).to.match(/files entry "a\\u0000b"/);
    expect(refusal({ files: ['home/u'] })).to.equal("BAD_REQUEST: bad hint policy: files entry 'home/u' is not an absolute path / write it as '/home/u'");
    expect(refusal({ processes: Array.from({ length: 129 }, (_, i) => `p${i}`) })).to.equal('BAD_REQUEST: bad hint policy: 129 processes / name at most 128');
    expect(refusal({ files: Array.from({ length: 120 }, (_, i) => `/a/rather/long/directory/name/number/${i}`) })).to.match(
      /^BAD_REQUEST: the hint policy takes \d+ bytes, over the 4096-byte line limit \/ name fewer or shorter/,
    );
  });
});

describe('guest hints: frames to RAM file pages', () => {
  const GiB = 1 << 30;

  it('under 2.75 GiB of RAM, a frame is the page of the same number, and frames past the RAM go', () => {
    expect(framesToPages([[0, 5], [32760, 10], [40000, 1]], 128 * 1024 * 1024)).to.deep.equal([[0, 5], [32760, 8]]);
    const under = 0xb0000000 - 4096;
    expect(framesToPages([[0x90000, 0x1ffff]], under)).to.deep.equal([[0x90000, 0x1ffff]]);
  });

  it('from 2.75 GiB on, frames from 4 GiB follow the first 2 GiB, and the hole between goes', () => {
    // 4 GiB: frames [0, 0x80000) are pages [0, 0x80000); frames [0x100000, 0x180000) are pages [0x80000, 0x100000).
    expect(framesToPages([[0x10, 4], [0x100000, 2], [0x17fffe, 5]], 4 * GiB)).to.deep.equal([[0x10, 4], [0x80000, 2], [0xffffe, 2]]);
    expect(framesToPages([[0x80000, 0x80000]], 4 * GiB), 'the PCI hole').to.deep.equal([]);
    // Exactly 2.75 GiB is split too (QEMU: ram_size >= 0xb0000000): a run across the hole is cut in two.
    expect(framesToPages([[0x7fff0, 0x90000]], 0xb0000000)).to.deep.equal([[0x7fff0, 0x10], [0x80000, 0xfff0]]);
  });
});

/** A unix socket server standing in for QEMU's chardev, one client at a time, as QEMU's. */
class FakeChardev {
  readonly path: string;
  server?: net.Server;
  client?: net.Socket;
  received = '';
  private waiters: (() => void)[] = [];

  constructor(dir: string) {
    this.path = path.join(dir, 'hint.sock');
  }

  async listen(): Promise<void> {
    this.server = net.createServer((c) => {
      this.client = c;
      c.on('data', (d) => {
        this.received += d.toString('latin1');
        for (const w of this.waiters.splice(0)) w();
      });
      for (const w of this.waiters.splice(0)) w();
    });
    this.server.listen(this.path);
    await once(this.server, 'listening');
  }

  async stop(): Promise<void> {
    this.client?.destroy();
    this.client = undefined;
    if (this.server) await new Promise((r) => this.server!.close(r));
  }

  /** Waits until the host sent a line matching re (lines already sent count) and returns it. */
  async line(re: RegExp, timeoutMs = 10_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const hit = this.received.split('\n').find((l) => re.test(l));
      if (hit !== undefined) return hit;
      if (Date.now() > deadline) throw new Error(`no line matching ${re} in ${JSON.stringify(this.received)}`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 100);
      });
    }
  }

  async connected(): Promise<net.Socket> {
    while (!this.client) await new Promise<void>((r) => this.waiters.push(r));
    return this.client;
  }

  say(...l: string[]): void {
    this.client!.write(l.join('\n') + '\n');
  }
}

describe('guest hints: HintChannel', function () {
  this.timeout(30_000);
  let dir: string;
  let fake: FakeChardev;
  let channel: HintChannel | undefined;
  const policy = { intervalMs: 1000, processes: ['lethe-workload'], cgroups: [], files: ['/mnt'] };

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lethe-hints-'));
    fake = new FakeChardev(dir);
  });
  afterEach(async () => {
    channel?.close();
    channel = undefined;
    await fake.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('waits for the socket to appear, sends the policy on hello and emits complete reports', async () => {
    const logs: string[] = [];
    channel = new HintChannel(fake.path, policy, (l) => logs.push(l));
    const seen: HintReport[] = [];
    channel.on('report', (r: HintReport) => seen.push(r));
    channel.start();
    await new Promise((r) => setTimeout(r, 300)); // QEMU not listening yet
    expect(channel.connected).to.equal(false);
    await fake.listen();
    await fake.connected();
    const hello = once(channel, 'hello');
    fake.say('hello lethe-guestd 1');
    expect(await hello).to.deep.equal([{ driver: 'lethe-guestd', version: 1 }]);
    expect(await fake.line(/^policy /)).to.equal('policy interval=1000 procs=lethe-workload cgroups= files=/mnt');
    const report = once(channel, 'report');
    fake.say('ok policy', 'report 1 begin', 's 5 2');
    fake.say('report 1 end sensitive=2 free=0 procs=1', 'report 2 begin', 'report 3 begin', 'report 3 end sensitive=0 free=0 procs=0');
    await report;
    await new Promise((r) => setTimeout(r, 100));
    expect(seen.map((r) => r.seq)).to.deep.equal([1, 3]);
    expect(seen[0].sensitive).to.deep.equal([[5, 2]]);
    expect(channel.counters).to.include({ reports: 2, brokenReports: 1, connects: 1 });
    expect(logs.filter((l) => l.includes('cannot connect'))).to.have.length(1);
  });

  it('emits refusals as GuestHintError, and a throwing listener does not break the channel', async () => {
    await fake.listen();
    const logs: string[] = [];
    channel = new HintChannel(fake.path, policy, (l) => logs.push(l));
    channel.start();
    await fake.connected();
    const errors: GuestHintError[] = [];
    channel.on('error', (e: GuestHintError) => errors.push(e));
    channel.on('report', () => {
      throw new Error('listener bug');
    });
    fake.say('hello lethe-guestd 1');
    await fake.line(/^policy /);
    fake.say('ok policy', 'report 1 begin', 'report 1 end sensitive=0 free=0 procs=0', "error unknown command 'x'");
    fake.say('report 2 begin', 'report 2 end sensitive=0 free=0 procs=0');
    await until(() => channel!.counters.reports === 2);
    expect(errors.map((e) => [e.name, e.reason, e.message])).to.deep.equal([
      ['GuestHintError', "unknown command 'x'", "the guest driver refused a hint command: unknown command 'x'"],
    ]);
    expect(logs.filter((l) => l.includes('listener bug'))).to.deep.equal([
      "hints: a listener failed on 'report': listener bug",
      "hints: a listener failed on 'report': listener bug",
    ]);
  });

  it('reconnects after the socket drops and sends the policy again on the next hello', async () => {
    await fake.listen();
    channel = new HintChannel(fake.path, policy);
    channel.start();
    (await fake.connected()).destroy();
    fake.client = undefined;
    await once(channel, 'disconnect');
    await fake.connected();
    fake.received = '';
    fake.say('hello lethe-guestd 1');
    await fake.line(/^policy interval=1000 /);
    channel.setPolicy({ ...policy, intervalMs: 0, processes: [] });
    expect(await fake.line(/^policy interval=0 /)).to.equal('policy interval=0 procs= cgroups= files=/mnt');
    expect(channel.requestReport()).to.equal(true);
    await fake.line(/^report$/);
    expect(channel.counters).to.include({ connects: 2, hellos: 1 });
    // A driver restarted inside the guest says hello on the same connection: it gets the policy again.
    fake.received = '';
    fake.say('hello lethe-guestd 1');
    expect(await fake.line(/^policy /)).to.equal('policy interval=0 procs= cgroups= files=/mnt');
    expect(channel.counters).to.include({ connects: 2, hellos: 2 });
  });

  it('drops reports made under an older policy, until the driver answers the new one', async () => {
    await fake.listen();
    channel = new HintChannel(fake.path, policy);
    const seen: number[] = [];
    channel.on('report', (r: HintReport) => seen.push(r.seq));
    channel.start();
    await fake.connected();
    const empty = 'end sensitive=0 free=0 procs=0';
    fake.say('hello lethe-guestd 1', 'report 1 begin', `report 1 ${empty}`);
    await fake.line(/^policy /);
    fake.say('ok policy', 'report 2 begin', `report 2 ${empty}`);
    await once(channel, 'report');
    channel.setPolicy({ ...policy, files: [] });
    await fake.line(/ files=$/);
    fake.say('report 3 begin', `report 3 ${empty}`, 'ok policy', 'report 4 begin', `report 4 ${empty}`);
    await once(channel, 'report');
    expect(seen).to.deep.equal([2, 4]);
    expect(channel.counters).to.include({ reports: 2, staleReports: 2 });
  });

  it('after a reconnect, drops the reports of a driver that has not taken the policy set while the host was away', async () => {
    await fake.listen();
    channel = new HintChannel(fake.path, policy);
    const seen: number[] = [];
    channel.on('report', (r: HintReport) => seen.push(r.seq));
    channel.start();
    await fake.connected();
    const empty = 'end sensitive=0 free=0 procs=0';
    fake.say('hello lethe-guestd 1');
    await fake.line(/^policy interval=1000 /);
    fake.say('ok policy', 'report 1 begin', `report 1 ${empty}`);
    await once(channel, 'report');
    fake.client!.destroy();
    fake.client = undefined;
    await once(channel, 'disconnect');
    channel.setPolicy({ ...policy, intervalMs: 0 }); // down: sent on the next hello
    await fake.connected();
    fake.received = '';
    // The driver did not notice the host leave: it reports on under the old policy.
    fake.say('report 2 begin', `report 2 ${empty}`);
    await until(() => channel!.counters.staleReports === 1);
    fake.say('hello lethe-guestd 1');
    expect(await fake.line(/^policy /)).to.equal('policy interval=0 procs=lethe-workload cgroups= files=/mnt');
    fake.say('ok policy', 'report 3 begin', `report 3 ${empty}`);
    await until(() => seen.length === 2);
    expect(seen).to.deep.equal([1, 3]);
    expect(channel.counters).to.include({ reports: 2, staleReports: 1, connects: 2 });
  });

  it('drops the reports of a driver of another protocol version, which gets no policy', async () => {
    await fake.listen();
    const logs: string[] = [];
    channel = new HintChannel(fake.path, policy, (l) => logs.push(l));
    channel.start();
    await fake.connected();
    fake.say('hello lethe-guestd 2', 'report 1 begin', 'report 1 end sensitive=0 free=0 procs=0');
    await until(() => channel!.counters.staleReports === 1);
    expect(channel.counters.reports).to.equal(0);
    expect(fake.received).to.not.match(/^policy /m);
    expect(logs).to.include('hints: the guest driver speaks protocol version 2, this agent 1; not sending it a policy');
  });

  it('drops reports while the driver keeps an older policy after refusing the new one', async () => {
    await fake.listen();
    channel = new HintChannel(fake.path, policy);
    channel.on('error', () => {});
    channel.start();
    await fake.connected();
    const empty = 'end sensitive=0 free=0 procs=0';
    fake.say('hello lethe-guestd 1');
    await fake.line(/^policy interval=1000 /);
    fake.say('ok policy', 'report 1 begin', `report 1 ${empty}`);
    await until(() => channel!.counters.reports === 1);
    channel.setPolicy({ ...policy, intervalMs: 0 });
    await fake.line(/^policy interval=0 /);
    fake.say("error unknown policy field 'x'", 'report 2 begin', `report 2 ${empty}`);
    await until(() => channel!.counters.staleReports === 1);
    expect(channel.counters.reports).to.equal(1);
  });

  it('asks for a hello when the driver stays silent after a connect', async () => {
    await fake.listen();
    channel = new HintChannel(fake.path, policy);
    channel.start();
    await fake.connected();
    expect(await fake.line(/^hello$/, 10_000)).to.equal('hello');
  });

  it('dropCache: answered, timed out, refused when not connected, failed when the host goes', async () => {
    channel = new HintChannel(fake.path, policy);
    const notConnected = await channel.dropCache().catch((e: LetheError) => e);
    expect(notConnected).to.be.instanceOf(LetheError);
    expect((notConnected as LetheError).message).to.equal('cannot drop the guest page cache: the guest driver is not connected');
    await fake.listen();
    channel.start();
    await fake.connected();
    while (!channel.connected) await new Promise((r) => setTimeout(r, 20));
    const answered = channel.dropCache();
    await fake.line(/^drop-cache$/);
    fake.say('dropped files=2 pages=300');
    expect(await answered).to.deep.equal({ files: 2, pages: 300 });
    const late = await channel.dropCache(200).catch((e: LetheError) => e);
    expect((late as LetheError).message).to.equal('the guest driver did not answer drop-cache within 0.2 s');
    const cut = channel.dropCache();
    fake.client!.destroy();
    expect(((await cut.catch((e: LetheError) => e)) as LetheError).message).to.equal('the guest driver went away before answering drop-cache');
  });

  it('refuses a bad policy before it connects', () => {
    expect(() => new HintChannel(fake.path, { ...policy, intervalMs: -1 })).to.throw(LetheError, 'bad hint policy: interval -1 ms');
  });
});
