// `lethe image …` through the real CLI against a real server: bit-exact round
// trips, zero chunks cost nothing, a new version uploads only what changed, a
// killed push resumes, a tampered chunk is named by verify, bad input is
// refused before anything is uploaded.
import { expect } from 'chai';
import { serverDb } from '../helpers/server-db.js';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { lethe, ROOT, startServer, tmpDir, type ServerProc } from '../helpers/proc.js';
import { admin, agentInProcess, rejects, testUnlock } from '../helpers/fixtures.js';
import { DeviceClient } from '../../agent/remote/device-client.js';
import { closeIdentity, loadIdentity } from '../../agent/keys/identity.js';
import { expectSameBytes } from '../helpers/bytes.js';

interface PushOut {
  image: string;
  version: number;
  resumed: boolean;
  chunks: { uploaded: number; unchanged: number; zero: number; total: number };
}

function files(dir: string, memMiB = 8) {
  const disk = Buffer.alloc(3 * 128 * 1024 + 5000); // a partial last chunk
  randomBytes(128 * 1024).copy(disk, 0);
  randomBytes(5000).copy(disk, 3 * 128 * 1024);
  const mem = Buffer.alloc(memMiB * 1024 * 1024);
  for (let p = 0; p < mem.length / 4096; p += 4) randomBytes(4096).copy(mem, p * 4096); // 3 of 4 pages zero
  const state = Buffer.concat([Buffer.from('QEVM\0\0\0\x03', 'latin1'), randomBytes(200_000)]);
  const f = { disk: path.join(dir, 'disk.raw'), mem: path.join(dir, 'ram.bin'), state: path.join(dir, 'state.bin') };
  fs.writeFileSync(f.disk, disk);
  fs.writeFileSync(f.mem, mem);
  fs.writeFileSync(f.state, state);
  return f;
}

describe('lethe image (real server process)', function () {
  this.timeout(60_000);
  let s: ServerProc;
  let dir: string;
  before(async () => {
    s = await startServer();
    dir = tmpDir();
  });
  after(async () => {
    await s?.stop();
  });

  const push = async (name: string, f: { disk: string; mem: string; state: string }, extra: string[] = []) => {
    const r = await lethe(['image', 'push', name, '--disk', f.disk, '--memory', f.mem, '--state', f.state, '--json', ...extra], s.env);
    expect(r.code, r.stderr).to.equal(0);
    return JSON.parse(r.stdout) as PushOut;
  };

  it('push → pull is bit-exact, and zero chunks cost no storage', async () => {
    const f = files(path.join(dir, ''), 8);
    const r = await push('roundtrip', f);
    expect(r.version).to.equal(1);
    expect(r.chunks.zero).to.equal(1536 + 2); // 3 of 4 pages, and disk chunks 1 and 2
    const out = path.join(dir, 'pulled');
    const p = await lethe(['image', 'pull', 'roundtrip', '--out', out, '--json'], s.env);
    expect(p.code, p.stderr).to.equal(0);
    for (const [a, b] of [
      [f.disk, 'disk.raw'],
      [f.mem, 'ram.bin'],
      [f.state, 'state.bin'],
    ]) {
      expectSameBytes(fs.readFileSync(path.join(out, b)), fs.readFileSync(a), b);
    }
    const ls = JSON.parse((await lethe(['image', 'ls', '--json'], s.env)).stdout) as {
      images: { name: string; stored: { chunks: number; bytes: number } }[];
    };
    const stored = ls.images.find((i) => i.name === 'roundtrip')!.stored;
    expect(stored.chunks).to.equal(r.chunks.uploaded);
    // Only non-zero chunks are stored, each with 41 bytes of envelope.
    const plainNonZero = 128 * 1024 + 5000 + 512 * 4096 + 200_008;
    expect(stored.bytes).to.equal(plainNonZero + stored.chunks * 41);
  });

  it('a second version uploads only the changed chunks', async () => {
    const f = files(path.join(dir, ''), 8);
    const first = await push('versions', f);
    const mem = fs.readFileSync(f.mem);
    randomBytes(4096).copy(mem, 8 * 4096); // a non-zero page changes
    randomBytes(4096).copy(mem, 9 * 4096); // a zero page becomes non-zero
    mem.fill(0, 12 * 4096, 13 * 4096); // a non-zero page becomes zero
    fs.writeFileSync(f.mem, mem);
    const second = await push('versions', f);
    expect(second.version).to.equal(first.version + 1);
    expect(second.chunks.uploaded).to.equal(2);
    expect(second.chunks.unchanged).to.equal(first.chunks.uploaded - 2);
    const out = path.join(dir, 'v2');
    expect((await lethe(['image', 'pull', 'versions@2', '--out', out], s.env)).code).to.equal(0);
    expectSameBytes(fs.readFileSync(path.join(out, 'ram.bin')), mem);
    const old = path.join(dir, 'v1');
    expect((await lethe(['image', 'pull', 'versions@1', '--out', old], s.env)).code).to.equal(0);
    expect(fs.readFileSync(path.join(old, 'ram.bin')).equals(mem)).to.equal(false);
  });

  it('equal content in two images is not visible as equal', async () => {
    const f = files(path.join(dir, ''), 1);
    await push('twin-a', f);
    await push('twin-b', f);
    const a = admin(s);
    const ha = await a.json<{ mem: [number, string][] }>('GET', '/images/twin-a/versions/1/hashes');
    const hb = await a.json<{ mem: [number, string][] }>('GET', '/images/twin-b/versions/1/hashes');
    a.close();
    expect(ha.mem.map((x) => x[0])).to.deep.equal(hb.mem.map((x) => x[0]));
    for (let i = 0; i < ha.mem.length; i++) expect(ha.mem[i][1]).to.not.equal(hb.mem[i][1]);
  });

  it('a push killed halfway resumes without re-sending what landed', async () => {
    const big = path.join(dir, 'big');
    fs.mkdirSync(big);
    const f = files(big, 1);
    const mem = randomBytes(96 * 1024 * 1024);
    fs.writeFileSync(f.mem, mem);
    const child = spawn(process.execPath, ['--import', 'tsx', path.join(ROOT, 'cli/main.ts'), 'image', 'push', 'resumable', '--disk', f.disk, '--memory', f.mem, '--state', f.state], {
      env: { ...process.env, ...s.env },
      stdio: 'ignore',
    });
    const db = await serverDb(s);
    const landed = async () =>
      (await db.sql.get<{ n: number }>("SELECT COUNT(*) AS n FROM chunks c JOIN images i ON i.id = c.image_id WHERE i.name = 'resumable' AND c.kind = 'mem'"))!.n;
    const t0 = Date.now();
    while ((await landed()) < 2048 && Date.now() - t0 < 30_000) await new Promise((r) => setTimeout(r, 20));
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    const before = await landed();
    await db.close();
    expect(before).to.be.within(2048, mem.length / 4096 - 1);

    const r = await push('resumable', f);
    expect(r.resumed).to.equal(true);
    expect(r.version).to.equal(1);
    expect(r.chunks.unchanged).to.be.at.least(before);
    expect(r.chunks.uploaded).to.be.at.most(mem.length / 4096 - before + 4);
    const v = await lethe(['image', 'verify', 'resumable', '--json'], s.env);
    expect(v.code, v.stdout).to.equal(0);
  });

  it('verify names the first tampered chunk; pull refuses to write a bad image', async () => {
    const f = files(path.join(dir, ''), 1);
    await push('tamper', f);
    const a = admin(s);
    const imgs = await a.json<{ images: { name: string; imageId: string }[] }>('GET', '/images');
    a.close();
    const id = imgs.images.find((i) => i.name === 'tamper')!.imageId;
    const db = await serverDb(s);
    const row = (await db.store.get<{ gen: number; idx: number; data: Buffer }>(
      "SELECT gen, idx, data FROM blobs WHERE image_id = ? AND kind = 'mem' ORDER BY idx LIMIT 1 OFFSET 2",
      id,
    ))!;
    const bad = Buffer.from(row.data);
    bad[100] ^= 1;
    await db.store.run("UPDATE blobs SET data = ? WHERE image_id = ? AND kind = 'mem' AND idx = ?", bad, id, row.idx);
    await db.close();
    const v = await lethe(['image', 'verify', 'tamper'], s.env);
    expect(v.code).to.equal(1);
    expect(v.stdout).to.equal(`tamper@1: 1 bad chunk(s); first: mem chunk ${row.idx} (generation 1): ciphertext does not match the manifest\n`);
    const out = path.join(dir, 'tampered');
    const p = await lethe(['image', 'pull', 'tamper', '--out', out], s.env);
    expect(p.code).to.equal(1);
    expect(fs.existsSync(path.join(out, 'ram.bin'))).to.equal(false);
  });

  it('bad input is refused before anything is uploaded', async () => {
    const f = files(path.join(dir, ''), 1);
    const odd = path.join(dir, 'odd.bin');
    fs.writeFileSync(odd, Buffer.alloc(5000, 1));
    const notState = path.join(dir, 'not-state.bin');
    fs.writeFileSync(notState, Buffer.from('hello world, not qemu'));
    const badPolicy = path.join(dir, 'bad.yaml');
    fs.writeFileSync(badPolicy, 'lease:\n  ttl: 15m\nsensitive:\n  memory: maybe\n');
    const twoBad = path.join(dir, 'two-bad.yaml');
    fs.writeFileSync(twoBad, 'eviction:\n  idle: soon\n  on-wipe: shred\n');
    const refused = (file: string, counts: string) =>
      `lethe: error: policy '${file}' has ${counts}; nothing was pushed\nlethe: hint: fix the errors above; 'lethe policy check ${file}' lists them again\n`;
    const cases: [string[], string][] = [
      [['--disk', path.join(dir, 'missing.raw')], `lethe: error: cannot read --disk '${path.join(dir, 'missing.raw')}': no such file\nlethe: hint: check the path and its permissions\n`],
      [['--disk', f.disk, '--memory', odd, '--state', f.state], `lethe: error: --memory '${odd}' is 5000 bytes, not a whole number of 4096-byte pages\nlethe: hint: pass the guest RAM file as QEMU wrote it (ram.bin)\n`],
      [['--disk', f.disk, '--memory', f.mem, '--state', notState], `lethe: error: --state '${notState}' is not a QEMU device state file (no QEVM header)\nlethe: hint: use the state.bin that 'lethe vm snapshot' saved\n`],
      [['--disk', f.disk, '--memory', f.mem], "lethe: error: --memory and --state go together\nlethe: hint: 'lethe vm snapshot' writes both (ram.bin and state.bin)\n"],
      [['--disk', f.disk, '--policy', badPolicy], `${badPolicy}:4: error: sensitive.memory: expected all, hinted or none, got 'maybe'\n${refused(badPolicy, '1 error, no warnings')}`],
      [
        ['--disk', f.disk, '--policy', twoBad],
        `${twoBad}:2: error: eviction.idle: expected a duration, got 'soon'\n  hint: use seconds or a number with a unit, e.g. 90s, 15m, 1h\n` +
          `${twoBad}:3: error: eviction.on-wipe: expected evict-all or poweroff, got 'shred'\n${refused(twoBad, '2 errors, no warnings')}`,
      ],
    ];
    for (const [args, stderr] of cases) {
      const r = await lethe(['image', 'push', 'never', ...args], s.env);
      expect(r.code, args.join(' ')).to.equal(2);
      expect(r.stderr).to.equal(stderr);
    }
    const ls = JSON.parse((await lethe(['image', 'ls', '--json'], s.env)).stdout) as { images: { name: string }[] };
    expect(ls.images.map((i) => i.name)).to.not.include('never');
  });

  it('rm removes an old version but keeps chunks a newer one still uses', async () => {
    const f = files(path.join(dir, ''), 1);
    await push('gc', f);
    const mem = fs.readFileSync(f.mem);
    randomBytes(4096).copy(mem, 0);
    fs.writeFileSync(f.mem, mem);
    await push('gc', f);
    const cur = await lethe(['image', 'rm', 'gc@2'], s.env);
    expect(cur.code).to.equal(1);
    expect(cur.stderr).to.equal("lethe: error: gc@2 is the current version\nlethe: hint: push a newer version first, or remove the whole image with 'lethe image rm gc'\n");
    const r = await lethe(['image', 'rm', 'gc@1', '--json'], s.env);
    expect(r.code, r.stderr).to.equal(0);
    expect(JSON.parse(r.stdout)).to.deep.include({ chunksFreed: 1 });
    expect((await lethe(['image', 'verify', 'gc'], s.env)).code).to.equal(0);
    expect((await lethe(['image', 'rm', 'gc'], s.env)).code).to.equal(0);
    const v = await lethe(['image', 'verify', 'gc'], s.env);
    expect(v.stderr).to.equal("lethe: error: no image 'gc'\nlethe: hint: list images with 'lethe image ls'\n");
  });

  it('policy replaces an image policy checked first, refuses a bad one, and clears back to the built-in one', async () => {
    await push('ruled', files(path.join(dir, ''), 1));
    const strict = path.join(ROOT, 'policies', 'finance-strict.yaml');
    const set = await lethe(['image', 'policy', 'ruled', strict], s.env);
    expect(set).to.deep.include({ code: 0, stdout: `ruled: policy replaced by ${strict}\n` });
    expect((await lethe(['image', 'policy', 'ruled', strict], s.env)).stdout).to.equal('ruled: policy unchanged\n');
    const bad = path.join(dir, 'bad-policy.yaml');
    fs.writeFileSync(bad, 'eviction:\n  idle: soon\n');
    const refused = await lethe(['image', 'policy', 'ruled', bad], s.env);
    expect(refused.code).to.equal(2);
    expect(refused.stderr, 'refused as policy explain and image push refuse').to.equal(
      `${bad}:2: error: eviction.idle: expected a duration, got 'soon'\n` +
        '  hint: use seconds or a number with a unit, e.g. 90s, 15m, 1h\n' +
        `lethe: error: policy '${bad}' has 1 error, no warnings; the image keeps its policy\n` +
        `lethe: hint: fix the errors above; 'lethe policy check ${bad}' lists them again\n`,
    );
    expect((await lethe(['image', 'policy', 'ruled', strict], s.env)).stdout, 'the bad one changed nothing').to.equal('ruled: policy unchanged\n');
    const cleared = await lethe(['image', 'policy', 'ruled', '--clear', '--json'], s.env);
    expect(JSON.parse(cleared.stdout)).to.deep.equal({ image: 'ruled', changed: true });
    const neither = await lethe(['image', 'policy', 'ruled'], s.env);
    expect(neither.code).to.equal(2);
    expect(neither.stderr).to.include('lethe: error: no policy file given');
  });

  it('rm of an image a device has leased ends the lease: the device is told at its next request', async () => {
    const { agent, home } = await agentInProcess(s, 'leased');
    const leaseId = agent.lease.leaseId();
    agent.stop();
    await agent.done;
    const r = await lethe(['image', 'rm', 'leased'], s.env);
    expect(r.code, r.stderr).to.equal(0);
    const id = await loadIdentity(home, testUnlock());
    const client = new DeviceClient(id);
    try {
      const e = await rejects(client.renew(leaseId));
      expect(e.code).to.equal('UNKNOWN_LEASE');
    } finally {
      client.close();
      closeIdentity(id);
    }
  });
});
