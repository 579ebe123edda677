// `lethe image push`: chunk local files, skip zero chunks and chunks the server
// already holds (same keyed hash), and upload the rest in batches over pinned
// TLS; the server encrypts them under the new version's keys. A push that is
// killed resumes: the server keeps the draft version and what landed in it.
import fs from 'node:fs';
import { CHUNK_SIZE, MEM_CHUNK_SIZE, type ChunkKind } from '../common/constants.js';
import { isZero } from '../common/chunk.js';
import { b64u, keyedHash, wipe } from '../common/crypto.js';
import { LetheError } from '../common/errors.js';
import { encodeChunkFrame, FRAME_HEADER } from '../common/frames.js';
import type { AdminClient } from './admin-client.js';
import { loadPolicyOrRefuse } from './policy-file.js';

export interface PushOptions {
  name: string;
  disk: string;
  memory?: string;
  state?: string;
  policy?: string;
}

export interface PushResult {
  image: string;
  version: number;
  resumed: boolean;
  chunks: { uploaded: number; unchanged: number; zero: number; total: number };
  bytes: { read: number; uploaded: number };
  seconds: number;
}

const BATCH_BYTES = 4 * 1024 * 1024;
const IN_FLIGHT = 3;
/** QEMU's migration stream starts with "QEVM" and format version 3. */
const QEMU_STATE_MAGIC = Buffer.from([0x51, 0x45, 0x56, 0x4d, 0x00, 0x00, 0x00, 0x03]);

interface Input {
  kind: ChunkKind;
  file: string;
  size: number;
}

function checkReadable(flag: string, file: string): number {
  let st: fs.Stats;
  try {
    st = fs.statSync(file);
    fs.accessSync(file, fs.constants.R_OK);
  } catch (e) {
    const why = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : 'not readable';
    throw new LetheError('BAD_REQUEST', `cannot read ${flag} '${file}': ${why}`, { hint: 'check the path and its permissions' });
  }
  if (!st.isFile()) throw new LetheError('BAD_REQUEST', `${flag} '${file}' is not a regular file`);
  return st.size;
}

/** Everything that can be checked locally is checked before the server hears of the push. */
export function validatePush(o: PushOptions): { inputs: Input[]; policy?: string } {
  if ((o.memory === undefined) !== (o.state === undefined)) {
    throw new LetheError('BAD_REQUEST', '--memory and --state go together', {
      hint: "'lethe vm snapshot' writes both (ram.bin and state.bin)",
    });
  }
  const inputs: Input[] = [{ kind: 'disk', file: o.disk, size: checkReadable('--disk', o.disk) }];
  if (o.memory && o.state) {
    const mem = checkReadable('--memory', o.memory);
    if (mem === 0 || mem % MEM_CHUNK_SIZE !== 0) {
      throw new LetheError('BAD_REQUEST', `--memory '${o.memory}' is ${mem} bytes, not a whole number of ${MEM_CHUNK_SIZE}-byte pages`, {
        hint: 'pass the guest RAM file as QEMU wrote it (ram.bin)',
      });
    }
    const stateSize = checkReadable('--state', o.state);
    const head = Buffer.alloc(QEMU_STATE_MAGIC.length);
    const fd = fs.openSync(o.state, 'r');
    try {
      fs.readSync(fd, head, 0, head.length, 0);
    } finally {
      fs.closeSync(fd);
    }
    if (!head.equals(QEMU_STATE_MAGIC)) {
      throw new LetheError('BAD_REQUEST', `--state '${o.state}' is not a QEMU device state file (no QEVM header)`, {
        hint: "use the state.bin that 'lethe vm snapshot' saved",
      });
    }
    inputs.push({ kind: 'mem', file: o.memory, size: mem }, { kind: 'state', file: o.state, size: stateSize });
  }
  let policy: string | undefined;
  if (o.policy) {
    checkReadable('--policy', o.policy);
    policy = loadPolicyOrRefuse(o.policy, 'nothing was pushed').text;
  }
  return { inputs, policy };
}

export async function pushImage(c: AdminClient, o: PushOptions, onProgress?: (done: number, total: number) => void): Promise<PushResult> {
  const t0 = Date.now();
  const { inputs, policy } = validatePush(o);
  const name = encodeURIComponent(o.name);
  const images = await c.json<{ images: { name: string }[] }>('GET', '/images');
  let policyChanged = false;
  if (!images.images.some((i) => i.name === o.name)) {
    await c.json('POST', '/images', { name: o.name, ...(policy !== undefined ? { policy } : {}) });
  } else if (policy !== undefined) {
    policyChanged = (await c.json<{ changed: boolean }>('PUT', `/images/${name}/policy`, { policy })).changed;
  }
  const sizes = { disk: 0, mem: 0, state: 0 };
  for (const i of inputs) sizes[i.kind] = i.size;
  const v = await c.json<{ version: number; resumed: boolean }>('POST', `/images/${name}/versions`, { sizes });
  const dedupKey = b64u.decode((await c.json<{ key: string }>('GET', `/images/${name}/dedup-key`)).key);
  const held = await c.json<Record<ChunkKind, [number, string][]>>('GET', `/images/${name}/versions/${v.version}/hashes`);

  const result: PushResult = {
    image: o.name,
    version: v.version,
    resumed: v.resumed,
    chunks: { uploaded: 0, unchanged: 0, zero: 0, total: 0 },
    bytes: { read: 0, uploaded: 0 },
    seconds: 0,
  };
  const totalBytes = inputs.reduce((n, i) => n + i.size, 0);
  const inFlight = new Set<Promise<void>>();
  let batch: Buffer[] = [];
  let batchBytes = 0;
  const flush = async () => {
    if (batch.length === 0) return;
    const body = Buffer.concat(batch);
    batch = [];
    batchBytes = 0;
    const p = c.post(`/images/${name}/versions/${v.version}/chunks`, body).then(() => {
      inFlight.delete(p);
    });
    inFlight.add(p);
    if (inFlight.size >= IN_FLIGHT) await Promise.race(inFlight);
  };

  try {
    for (const input of inputs) {
      const have = new Map(held[input.kind].map(([i, h]) => [i, h]));
      const cs = CHUNK_SIZE[input.kind];
      const fd = fs.openSync(input.file, 'r');
      const buf = Buffer.alloc(Math.max(cs, Math.floor(BATCH_BYTES / cs) * cs));
      try {
        for (let off = 0; off < input.size; off += buf.length) {
          const n = fs.readSync(fd, buf, 0, Math.min(buf.length, input.size - off), off);
          for (let p = 0; p < n; p += cs) {
            const index = (off + p) / cs;
            const data = buf.subarray(p, Math.min(p + cs, n));
            result.chunks.total++;
            if (isZero(data)) {
              result.chunks.zero++;
              if (have.has(index)) batch.push(...encodeChunkFrame(input.kind, index, null));
              continue;
            }
            if (!policyChanged && have.get(index) === b64u.encode(keyedHash(dedupKey, data))) {
              result.chunks.unchanged++;
              continue;
            }
            // Copy: `buf` is reused for the next read while this batch is in flight.
            batch.push(...encodeChunkFrame(input.kind, index, Buffer.from(data)));
            batchBytes += FRAME_HEADER + data.length;
            result.chunks.uploaded++;
            result.bytes.uploaded += data.length;
            if (batchBytes >= BATCH_BYTES) await flush();
          }
          result.bytes.read += n;
          onProgress?.(result.bytes.read, totalBytes);
        }
      } finally {
        fs.closeSync(fd);
      }
    }
    await flush();
    await Promise.all(inFlight);
  } finally {
    wipe(dedupKey);
  }
  await c.json('POST', `/images/${name}/versions/${v.version}/commit`);
  result.seconds = (Date.now() - t0) / 1000;
  return result;
}
