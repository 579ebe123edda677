// A lease's manifest at real disk sizes: the server making it and the agent checking and
// installing it, packed (format 2, common/manifest.ts) beside the JSON of format 1 (the
// yardstick, in the same run), for disks whose every chunk is stored.
//
//   node --expose-gc --import tsx bench/manifest.ts [--gib 4,50,200] [--reps 3]
//
// The server's part starts from its rows (the database query is the same for both);
// the agent's ends with the chunk map installed and the wire bytes dropped, and reports
// the heap the map keeps.
import { randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';
import { ChunkMap, readManifest, type ChunkCache, type Manifest } from '../agent/index.js';
import { canonical } from '../common/audit-hash.js';
import { CHUNK_SIZE, MANIFEST_CONTEXT } from '../common/constants.js';
import { b64u, sha256, sign, signKeyPair } from '../common/crypto.js';
import { encodeManifest, type ChunkRowOf } from '../common/manifest.js';

const { values } = parseArgs({ options: { gib: { type: 'string', default: '4,50,200' }, reps: { type: 'string', default: '3' } } });
const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) throw new Error('run with node --expose-gc');
const REPS = Number(values.reps);
const server = signKeyPair();
/** A cache with no dirty chunks: what install() asks of it. */
const noCache = { forgetStale() {}, dirtyChunks: () => [] } as unknown as ChunkCache;

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
function timed<T>(f: () => T): [T, number] {
  const t0 = performance.now();
  const r = f();
  return [r, performance.now() - t0];
}
function heap(): number {
  gc!();
  gc!();
  return process.memoryUsage().heapUsed + process.memoryUsage().arrayBuffers;
}

console.log('| disk | chunks | format | bytes | server ms | agent ms | agent ×JSON | map heap MB |');
console.log('|---|---|---|---|---|---|---|---|');
for (const gib of values.gib!.split(',').map(Number)) {
  const n = (gib * 2 ** 30) / CHUNK_SIZE.disk;
  const rows: ChunkRowOf[] = Array.from({ length: n }, (_, idx) => ({ idx, gen: 3 + (idx % 5), cls: idx % 7 === 0 ? 'sensitive' : 'normal', sha: randomBytes(32) }));
  const head = { format: 1, image: 'desk', imageId: 'ab'.repeat(16), version: 9, sizes: { disk: n * CHUNK_SIZE.disk, mem: 0, state: 0 }, chunkSizes: { ...CHUNK_SIZE } };
  const out: Record<string, { bytes: number; server: number; agent: number; heap: number }> = {};
  for (const format of ['json', 'packed'] as const) {
    const s: number[] = [];
    const a: number[] = [];
    let bytes = 0;
    /** The server: its rows into the signed manifest, on the wire. */
    const serve = (): Buffer | string => {
      if (format === 'packed') return encodeManifest({ ...head, format: 2 }, { disk: rows, mem: [], state: [] }, server.secretKey);
      const body = { ...head, chunks: { disk: rows.map((r) => [r.idx, r.gen, r.cls, b64u.encode(r.sha)]), mem: [], state: [] } };
      const signature = b64u.encode(sign(server.secretKey, Buffer.from(`${MANIFEST_CONTEXT}\n${sha256(canonical(body)).toString('hex')}`)));
      return JSON.stringify({ ...body, signature });
    };
    /** The agent: parse, check the signature, install. */
    const install = (wire: Buffer | string): ChunkMap => {
      const m = readManifest(typeof wire === 'string' ? (JSON.parse(wire) as Manifest) : wire, server.publicKey);
      const map = new ChunkMap();
      map.install(m, undefined, noCache);
      return map;
    };
    for (let rep = 0; rep < REPS; rep++) {
      const [wire, ms] = timed(serve);
      s.push(ms);
      bytes = wire.length;
      const [map, ams] = timed(() => install(wire));
      a.push(ams);
      if (map.entry('disk', n - 1)?.gen !== rows[n - 1].gen) throw new Error('the map lost a chunk');
    }
    // What the map keeps once the wire bytes and what was parsed of them are gone.
    const before = heap();
    const kept = [install(serve())];
    const keptBytes = heap() - before;
    if (kept.length !== 1) throw new Error('unreachable');
    out[format] = { bytes, server: median(s), agent: median(a), heap: keptBytes };
  }
  for (const format of ['json', 'packed'] as const) {
    const r = out[format];
    console.log(`| ${gib} GiB | ${n.toLocaleString('en')} | ${format === 'json' ? 'JSON (format 1)' : 'packed (format 2)'} | ${(r.bytes / 1e6).toFixed(1)} MB | ${r.server.toFixed(0)} | ${r.agent.toFixed(0)} | ${(r.agent / out.json.agent).toFixed(2)} | ${(r.heap / 1e6).toFixed(1)} |`);
  }
}
