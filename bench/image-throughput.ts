// Push and pull throughput of a memory image through a real server process on
// loopback, beside `cp` of the same file and beside the crypto alone (derive
// each chunk's key, XChaCha20-Poly1305 encrypt and decrypt), measured in the
// same run.
//
//   node --import tsx bench/image-throughput.ts [--mib 256] [--zero 0.5] [--json]
//
// --zero is the fraction of pages left zero (a booted guest's RAM is mostly
// zero pages, which are never stored or sent).
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { admin } from '../test/helpers/fixtures.js';
import { startServer, tmpDir } from '../test/helpers/proc.js';
import { pushImage } from '../cli/image-push.js';
import { checkImage } from '../cli/image-pull.js';
import { table } from '../cli/output.js';
import { MEM_CHUNK_SIZE } from '../common/constants.js';
import { chunkKeyInto, decryptChunkInto, isZero } from '../common/chunk.js';
import { encryptChunk } from '../common/chunk.js';
import { randomKey, secureBuffer, wipe } from '../common/crypto.js';

const { values } = parseArgs({
  options: { mib: { type: 'string', default: '256' }, zero: { type: 'string', default: '0.5' }, json: { type: 'boolean', default: false } },
});
const MIB = Number(values.mib);
const ZERO = Number(values.zero);

function makeImage(dir: string): { mem: string; disk: string; state: string; nonZeroBytes: number } {
  const pages = (MIB * 1024 * 1024) / MEM_CHUNK_SIZE;
  const mem = Buffer.alloc(MIB * 1024 * 1024);
  let nonZero = 0;
  for (let p = 0; p < pages; p++) {
    if ((p * 7919) % 1000 >= ZERO * 1000) {
      randomBytes(MEM_CHUNK_SIZE).copy(mem, p * MEM_CHUNK_SIZE);
      nonZero++;
    }
  }
  const f = { mem: path.join(dir, 'ram.bin'), disk: path.join(dir, 'disk.raw'), state: path.join(dir, 'state.bin') };
  fs.writeFileSync(f.mem, mem);
  fs.writeFileSync(f.disk, Buffer.alloc(128 * 1024));
  fs.writeFileSync(f.state, Buffer.concat([Buffer.from('QEVM\0\0\0\x03', 'latin1'), randomBytes(4096)]));
  return { ...f, nonZeroBytes: nonZero * MEM_CHUNK_SIZE };
}

function cpRate(file: string, dir: string): number {
  const t0 = process.hrtime.bigint();
  execFileSync('cp', [file, path.join(dir, 'copy.bin')]);
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  fs.rmSync(path.join(dir, 'copy.bin'));
  return fs.statSync(file).size / 1e6 / s;
}

/** What the server and the puller do per chunk, without I/O: derive, encrypt, decrypt. */
function cryptoRate(file: string): number {
  const data = fs.readFileSync(file);
  const vk = randomKey();
  const key = secureBuffer(32);
  const out = Buffer.alloc(MEM_CHUNK_SIZE);
  const imageId = randomBytes(16);
  const t0 = process.hrtime.bigint();
  for (let off = 0; off < data.length; off += MEM_CHUNK_SIZE) {
    const page = data.subarray(off, off + MEM_CHUNK_SIZE);
    if (isZero(page)) continue;
    const c = { imageId, gen: 1, kind: 'mem' as const, index: off / MEM_CHUNK_SIZE, cls: 'sensitive' as const };
    chunkKeyInto(key, vk, c);
    decryptChunkInto(out, key, c, encryptChunk(key, c, page));
  }
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  wipe(vk, key);
  return data.length / 1e6 / s; // over the whole file, as the others: zero pages are skipped by all
}

async function main(): Promise<void> {
  const dir = tmpDir('lethe-bench-image-');
  const img = makeImage(dir);
  const size = fs.statSync(img.mem).size;
  const s = await startServer();
  const a = admin(s);
  try {
    const cp = cpRate(img.mem, dir);
    const crypto = cryptoRate(img.mem);
    const push = await pushImage(a, { name: 'bench', disk: img.disk, memory: img.mem, state: img.state });
    const pushAgain = await pushImage(a, { name: 'bench', disk: img.disk, memory: img.mem, state: img.state });
    const pull = await checkImage(a, 'bench', path.join(dir, 'pulled'));
    if (!pull.ok || !fs.readFileSync(path.join(dir, 'pulled', 'ram.bin')).equals(fs.readFileSync(img.mem))) {
      throw new Error('pull was not bit-exact');
    }
    const r = {
      mib: MIB,
      zeroFraction: ZERO,
      nonZeroMB: img.nonZeroBytes / 1e6,
      cpMBs: cp,
      cryptoMBs: crypto,
      pushMBs: size / 1e6 / push.seconds,
      pushUnchangedMBs: size / 1e6 / pushAgain.seconds,
      pullMBs: size / 1e6 / pull.seconds,
    };
    if (values.json) {
      process.stdout.write(JSON.stringify(r) + '\n');
      return;
    }
    const row = (name: string, mbs: number) => [name, mbs.toFixed(0), (mbs / cp).toFixed(3), (mbs / crypto).toFixed(3)];
    console.log(`memory image: ${MIB} MiB, ${(ZERO * 100).toFixed(0)}% zero pages (${r.nonZeroMB.toFixed(0)} MB non-zero); rates over the whole file size`);
    console.log(
      table(
        ['what', 'MB/s', '× cp', '× crypto'],
        [
          row('cp (yardstick)', cp),
          row('crypto only (derive+encrypt+decrypt)', crypto),
          row('push, new image', r.pushMBs),
          row('push, unchanged (hash only)', r.pushUnchangedMBs),
          row('pull (fetch+decrypt+write)', r.pullMBs),
        ],
      ),
    );
  } finally {
    a.close();
    await s.stop();
    fs.rmSync(dir, { recursive: true, force: true });
    fs.rmSync(path.dirname(s.dir), { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
