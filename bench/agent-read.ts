// The agent's read path, measured in one run:
//   cached: ciphertext in the local cache → plaintext in the caller's buffer,
//           beside sodium-native's raw XChaCha20-Poly1305 decrypt of the same chunks;
//   cold:   demand reads with an empty cache from a real server on loopback,
//           beside one plain HTTPS GET of the same bytes from a bare node:https server.
//
//   node --import tsx bench/agent-read.ts [--disk-mib 64] [--mem-mib 16] [--inflight 32] [--json]
import https from 'node:https';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import type { AddressInfo } from 'node:net';
import { startAgent, type RunningAgent } from '../agent/index.js';
import { table } from '../cli/output.js';
import { CHUNK_SIZE, type ChunkKind } from '../common/constants.js';
import { chunkKeyInto, decryptChunkInto, encryptChunk } from '../common/chunk.js';
import { randomKey, secureBuffer, wipe } from '../common/crypto.js';
import { assign, enrolledDevice, pushImage, testUnlock } from '../test/helpers/fixtures.js';
import { startServer } from '../test/helpers/proc.js';
import { loadDataDir } from '../server/datadir.js';

const { values } = parseArgs({
  options: {
    'disk-mib': { type: 'string', default: '64' },
    'mem-mib': { type: 'string', default: '16' },
    inflight: { type: 'string', default: '32' },
    json: { type: 'boolean', default: false },
  },
});
const DISK = Number(values['disk-mib']) * 1024 * 1024;
const MEM = Number(values['mem-mib']) * 1024 * 1024;
const INFLIGHT = Number(values.inflight);

const seconds = (t0: bigint) => Number(process.hrtime.bigint() - t0) / 1e9;

/** Raw decrypt of `count` chunks of `size` bytes, each under its own derived key, as the agent does. */
function rawDecryptRate(kind: ChunkKind, count: number): number {
  const size = CHUNK_SIZE[kind];
  const vk = randomKey();
  const key = secureBuffer(32);
  const out = Buffer.alloc(size);
  const imageId = randomBytes(16);
  const blobs = Array.from({ length: Math.min(count, 256) }, (_, i) => {
    const c = { imageId, gen: 1, kind, index: i, cls: 'normal' as const };
    chunkKeyInto(key, vk, c);
    return encryptChunk(key, c, randomBytes(size));
  });
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < count; i++) {
    const c = { imageId, gen: 1, kind, index: i % blobs.length, cls: 'normal' as const };
    chunkKeyInto(key, vk, c);
    decryptChunkInto(out, key, c, blobs[i % blobs.length]);
  }
  const s = seconds(t0);
  wipe(vk, key);
  return (count * size) / 1e6 / s;
}

async function readAll(agent: RunningAgent, kind: ChunkKind, inflight: number): Promise<{ mbs: number; sources: Record<string, number> }> {
  const indices = agent.core.chunkIndexes(kind);
  const sources: Record<string, number> = { cache: 0, server: 0, zero: 0 };
  const bufs = Array.from({ length: inflight }, () => secureBuffer(CHUNK_SIZE[kind]));
  let next = 0;
  const t0 = process.hrtime.bigint();
  await Promise.all(
    bufs.map(async (buf) => {
      while (next < indices.length) {
        const index = indices[next++];
        sources[await agent.core.readInto(kind, index, buf)]++;
      }
    }),
  );
  const s = seconds(t0);
  bufs.forEach((b) => wipe(b));
  return { mbs: (indices.length * CHUNK_SIZE[kind]) / 1e6 / s, sources };
}

/** One GET of `bytes` from a bare HTTPS server with the same certificate, on loopback. */
async function plainHttpsGet(certDir: string, bytes: number): Promise<number> {
  const d = loadDataDir(certDir);
  const payload = randomBytes(bytes);
  const server = https.createServer({ key: d.tlsKey, cert: d.tlsCert }, (_req, res) => res.end(payload));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as AddressInfo).port;
  const t0 = process.hrtime.bigint();
  await new Promise<void>((resolve, reject) => {
    https
      .get({ host: '127.0.0.1', port, rejectUnauthorized: false }, (res) => {
        res.on('data', () => {});
        res.on('end', resolve);
      })
      .on('error', reject);
  });
  const s = seconds(t0);
  server.close();
  wipe(d.masterKey, d.signingKey);
  return bytes / 1e6 / s;
}

async function main(): Promise<void> {
  const s = await startServer();
  const disk = randomBytes(DISK);
  const mem = randomBytes(MEM);
  await pushImage(s, 'bench', { plain: { disk, mem, state: Buffer.concat([Buffer.from('QEVM\0\0\0\x03', 'latin1'), randomBytes(1000)]) } });
  const d = await enrolledDevice(s);
  await assign(s, d.deviceId, 'bench');
  d.close();
  const agentOpts = { home: d.home, image: 'bench', cacheBytes: 4 * (DISK + MEM), heartbeatMs: 30_000, log: () => {}, unlock: testUnlock() };
  try {
    // Cold: empty cache, no prefetch, demand reads only.
    let agent = await startAgent({ ...agentOpts, prefetch: false });
    await agent.lease.whenActive();
    const coldDisk = await readAll(agent, 'disk', INFLIGHT);
    const coldMem = await readAll(agent, 'mem', INFLIGHT);
    agent.stop();
    await agent.done;
    // Cached: same home; sensitive keys fetched in a first pass, then measured with keys held.
    agent = await startAgent({ ...agentOpts, prefetch: false });
    await agent.lease.whenActive();
    await readAll(agent, 'mem', INFLIGHT);
    const warmDisk = await readAll(agent, 'disk', 1);
    const warmMem = await readAll(agent, 'mem', 1);
    agent.stop();
    await agent.done;
    const rawDisk = rawDecryptRate('disk', DISK / CHUNK_SIZE.disk);
    const rawMem = rawDecryptRate('mem', MEM / CHUNK_SIZE.mem);
    const plain = await plainHttpsGet(s.dir, DISK);
    const r = { coldDisk: coldDisk.mbs, coldMem: coldMem.mbs, warmDisk: warmDisk.mbs, warmMem: warmMem.mbs, rawDisk, rawMem, plainHttps: plain };
    for (const [name, x] of Object.entries({ coldDisk, coldMem, warmDisk, warmMem })) {
      const want = name.startsWith('cold') ? 'server' : 'cache';
      if (x.sources[want] === 0) throw new Error(`${name}: expected reads from the ${want}, got ${JSON.stringify(x.sources)}`);
    }
    if (values.json) {
      process.stdout.write(JSON.stringify(r) + '\n');
      return;
    }
    console.log(`image: ${DISK / 1048576} MiB disk (128 KiB chunks, normal class), ${MEM / 1048576} MiB memory (4 KiB pages, sensitive)`);
    console.log(
      table(
        ['path', 'MB/s', 'yardstick', 'MB/s', 'ratio'],
        [
          ['cached read, disk', warmDisk.mbs.toFixed(0), 'raw decrypt 128 KiB', rawDisk.toFixed(0), (warmDisk.mbs / rawDisk).toFixed(3)],
          ['cached read, memory', warmMem.mbs.toFixed(0), 'raw decrypt 4 KiB', rawMem.toFixed(0), (warmMem.mbs / rawMem).toFixed(3)],
          [`cold fetch, disk (${INFLIGHT} in flight)`, coldDisk.mbs.toFixed(0), 'plain HTTPS GET', plain.toFixed(0), (coldDisk.mbs / plain).toFixed(3)],
          [`cold fetch, memory (${INFLIGHT} in flight, keys too)`, coldMem.mbs.toFixed(0), 'plain HTTPS GET', plain.toFixed(0), (coldMem.mbs / plain).toFixed(3)],
        ],
      ),
    );
  } finally {
    await s.stop();
    fs.rmSync(d.home, { recursive: true, force: true });
    fs.rmSync(path.dirname(s.dir), { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
