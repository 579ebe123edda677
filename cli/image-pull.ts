// `lethe image verify` and `lethe image pull`: fetch every chunk of a version
// with its key (an audited admin export), check the ciphertext against the
// manifest, decrypt, check the plaintext against its keyed hash, and (pull)
// write the plaintext back into disk.raw, ram.bin and state.bin.
import fs from 'node:fs';
import path from 'node:path';
import { CHUNK_KINDS, CHUNK_SIZE, KEY_BYTES, type ChunkKind, type Sensitivity } from '../common/constants.js';
import { decryptChunkInto } from '../common/chunk.js';
import { b64u, keyedHash, sha256, wipe } from '../common/crypto.js';
import { LetheError } from '../common/errors.js';
import { writeFileAtomic } from '../common/fsutil.js';
import type { AdminClient } from './admin-client.js';

const BATCH = 256;
export const OUTPUT_FILES: Record<ChunkKind, string> = { disk: 'disk.raw', mem: 'ram.bin', state: 'state.bin' };

interface Manifest {
  image: string;
  imageId: string;
  version: number;
  sizes: Record<ChunkKind, number>;
  chunks: Record<ChunkKind, [number, number, Sensitivity, string][]>;
}

export interface BadChunk {
  kind: ChunkKind;
  index: number;
  gen: number;
  reason: string;
}

export interface CheckResult {
  image: string;
  version: number;
  ok: boolean;
  chunks: number;
  bad: number;
  firstBad: BadChunk | null;
  bytes: number;
  seconds: number;
  out?: string;
}

/** "name" or "name@3" → name and version (undefined: the current one). */
export function parseRef(ref: string): { name: string; version?: number } {
  const m = /^([^@]+)(?:@(\d+))?$/.exec(ref);
  if (!m) throw new LetheError('BAD_REQUEST', `bad image reference '${ref}'`, { hint: 'use NAME or NAME@VERSION' });
  return { name: m[1], version: m[2] === undefined ? undefined : Number(m[2]) };
}

async function resolveVersion(c: AdminClient, name: string, version?: number): Promise<number> {
  if (version !== undefined) return version;
  const { images } = await c.json<{ images: { name: string; current: number | null }[] }>('GET', '/images');
  const img = images.find((i) => i.name === name);
  if (!img) throw new LetheError('UNKNOWN_IMAGE', `no image '${name}'`, { hint: "list images with 'lethe image ls'" });
  if (img.current === null) throw new LetheError('UNKNOWN_VERSION', `image '${name}' has no committed version yet`);
  return img.current;
}

/** Verifies (and with `outDir`, reassembles) a version. Never throws for a bad chunk: reports it. */
export async function checkImage(
  c: AdminClient,
  ref: string,
  outDir?: string,
  onProgress?: (done: number, total: number) => void,
): Promise<CheckResult> {
  const t0 = Date.now();
  const { name, version: asked } = parseRef(ref);
  const version = await resolveVersion(c, name, asked);
  const enc = encodeURIComponent(name);
  const m = await c.json<Manifest>('GET', `/images/${enc}/versions/${version}/manifest`);
  const hashes = await c.json<Record<ChunkKind, [number, string][]>>('GET', `/images/${enc}/versions/${version}/hashes`);
  const dedupKey = b64u.decode((await c.json<{ key: string }>('GET', `/images/${enc}/dedup-key`)).key);
  const imageId = Buffer.from(m.imageId, 'hex');
  const total = CHUNK_KINDS.reduce((n, k) => n + m.chunks[k].length, 0);
  const result: CheckResult = { image: name, version, ok: true, chunks: 0, bad: 0, firstBad: null, bytes: 0, seconds: 0 };
  const fail = (b: BadChunk) => {
    result.ok = false;
    result.bad++;
    result.firstBad ??= b;
  };

  const tmpFiles: [string, string][] = [];
  if (outDir) fs.mkdirSync(outDir, { recursive: true, mode: 0o700 });
  try {
    for (const kind of CHUNK_KINDS) {
      if (m.sizes[kind] === 0 && !outDir) continue;
      const plainHash = new Map(hashes[kind].map(([i, h]) => [i, h]));
      let fd: number | undefined;
      if (outDir && (m.sizes[kind] > 0 || kind === 'disk')) {
        const final = path.join(outDir, OUTPUT_FILES[kind]);
        const tmp = `${final}.partial`;
        fd = fs.openSync(tmp, 'w', 0o600);
        fs.ftruncateSync(fd, m.sizes[kind]); // zero chunks stay holes
        tmpFiles.push([tmp, final]);
      }
      try {
        const entries = m.chunks[kind];
        const fetchBatch = (b: number) => {
          const p = c.postBinary(`/images/${enc}/versions/${version}/export`, {
            chunks: entries.slice(b, b + BATCH).map(([index]) => ({ kind, index })),
          });
          p.catch(() => {}); // awaited below; this only keeps an abandoned prefetch from crashing the process
          return p;
        };
        // One batch in flight while the previous one is checked and written.
        let next = entries.length > 0 ? fetchBatch(0) : undefined;
        for (let b = 0; b < entries.length; b += BATCH) {
          const slice = entries.slice(b, b + BATCH);
          const body = await next!;
          next = b + BATCH < entries.length ? fetchBatch(b + BATCH) : undefined;
          let off = 0;
          for (const [index, gen, cls, ctHash] of slice) {
            const len = body.readUInt32BE(off);
            const blob = body.subarray(off + 4, off + 4 + len);
            const key = body.subarray(off + 4 + len, off + 4 + len + KEY_BYTES);
            off += 4 + len + KEY_BYTES;
            result.chunks++;
            const size = Math.min(CHUNK_SIZE[kind], m.sizes[kind] - index * CHUNK_SIZE[kind]);
            if (sha256(blob).toString('base64url') !== ctHash) {
              fail({ kind, index, gen, reason: 'ciphertext does not match the manifest' });
              continue;
            }
            const plain = Buffer.alloc(size);
            try {
              decryptChunkInto(plain, key, { imageId, gen, kind, index, cls }, blob);
            } catch {
              fail({ kind, index, gen, reason: 'ciphertext failed authentication' });
              continue;
            } finally {
              wipe(key);
            }
            if (b64u.encode(keyedHash(dedupKey, plain)) !== plainHash.get(index)) {
              fail({ kind, index, gen, reason: 'plaintext does not match its hash' });
            } else if (fd !== undefined) {
              fs.writeSync(fd, plain, 0, plain.length, index * CHUNK_SIZE[kind]);
            }
            result.bytes += plain.length;
            wipe(plain);
          }
          onProgress?.(result.chunks, total);
        }
        if (fd !== undefined) fs.fsyncSync(fd);
      } finally {
        if (fd !== undefined) fs.closeSync(fd);
      }
    }
    if (outDir && result.ok) {
      for (const [tmp, final] of tmpFiles) fs.renameSync(tmp, final);
      writeFileAtomic(path.join(outDir, 'manifest.json'), JSON.stringify({ image: name, version, sizes: m.sizes }, null, 2) + '\n');
      result.out = outDir;
    }
  } finally {
    wipe(dedupKey);
    for (const [tmp] of tmpFiles) fs.rmSync(tmp, { force: true });
  }
  result.seconds = (Date.now() - t0) / 1000;
  return result;
}
