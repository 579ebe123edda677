// `lethe agent selftest`: the whole read path, chunk by chunk, with nothing kept.
import { CHUNK_SIZE, type ChunkKind } from '../../common/constants.js';
import { secureBuffer, wipe } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';
import type { AgentCore } from '../chunks/core.js';

/** Decrypts up to `count` chunks into a locked scratch buffer, zeroing it after each: checks the whole read path. */
export async function selfTest(core: AgentCore, count: number) {
  const m = core.manifest;
  if (!m) throw new LetheError('LEASE_EXPIRED', 'no lease yet');
  const sources: Record<string, number> = { cache: 0, server: 0, zero: 0 };
  const buf = secureBuffer(CHUNK_SIZE.disk);
  let n = 0;
  try {
    for (const kind of ['state', 'mem', 'disk'] as ChunkKind[]) {
      for (const index of core.chunkIndexes(kind)) {
        if (n++ >= count) break;
        const size = Math.min(CHUNK_SIZE[kind], m.sizes[kind] - index * CHUNK_SIZE[kind]);
        const out = buf.subarray(0, size);
        sources[await core.readInto(kind, index, out)]++;
        wipe(out);
        core.evict(kind, index);
      }
    }
  } finally {
    wipe(buf);
  }
  return { chunks: Math.min(n, count), sources };
}
