// What the TypeScript fuzzer feeds (fuzz/ts/engine.ts): each parser that takes bytes
// from outside, with the refusals it is meant to give. Anything else it throws, or a
// connection it never closes, is a crash. Seeds for each are in fuzz/corpus/NAME,
// written by fuzz/ts/seeds.ts from the formats' own encoders.
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { parseChunkFrames } from '../../common/frames.js';
import { CHUNK_CT_AT, chunkKey, decryptChunkInto, decryptChunkRangeInto, encryptChunk, plaintextSize, type ChunkCoord } from '../../common/chunk.js';
import { randomBytes, signKeyPair } from '../../common/crypto.js';
import { CHUNK_OVERHEAD, DISK_CHUNK_SIZE, HDR_DEVICE, HDR_NONCE, HDR_SIGNATURE, HDR_TIMESTAMP } from '../../common/constants.js';
import { LetheError } from '../../common/errors.js';
import { verifyRequest } from '../../common/signing.js';
import { PAGES_CONTENT_TYPE } from '../../common/wire.js';
import { HintParser } from '../../agent/vm/hints.js';
import { NbdServer, type BlockBackend } from '../../agent/disk/nbd/server.js';
import { FileBackend } from '../../agent/disk/nbd/file-backend.js';
import { NativeDiskReads, aeadOpen, aeadPieceTags, aeadSeal, aeadStream, aeadVerify } from '../../native/index.js';
import sodium from 'sodium-native';
import { parsePolicy } from '../../policies/policy.js';
import { signatureHeaders } from '../../server/auth.js';
import { parseTrace } from '../../server/traces.js';
import type { FuzzTarget } from './engine.js';

/** A refusal the API answers with a 4xx: the parser did its job. */
const refused = (e: unknown) => e instanceof LetheError && e.status >= 400 && e.status < 500;

/** Fixed key and coordinates for the envelope target (seeds.ts encrypts under them). */
export const ENVELOPE_KEY = Buffer.alloc(32, 7);
export const ENVELOPE_COORD: ChunkCoord = { imageId: Buffer.alloc(16, 1), gen: 3, kind: 'disk', index: 5, cls: 'sensitive' };
export const TRACE_PAGES = 4096;
export const NBD_EXPORT = 'vm';
const NBD_SIZE = 1 << 20;

const ascii = (...words: string[]) => words.map((w) => Buffer.from(w, 'latin1'));

function u32(...vs: number[]): Buffer {
  const b = Buffer.alloc(4 * vs.length);
  vs.forEach((v, i) => b.writeUInt32BE(v >>> 0, 4 * i));
  return b;
}

const chunkFrames: FuzzTarget = {
  name: 'chunk-frames',
  about: 'check-in and push bodies: kind, index, length, blob frames (common/frames.ts)',
  maxLen: 4096,
  run: (d) => void parseChunkFrames(d),
  expected: refused,
  dictionary: [Buffer.from([1]), Buffer.from([2]), Buffer.from([3]), u32(0), u32(0xffffffff), u32(4096), u32(131072)],
};

const trace = {
  name: 'trace',
  about: 'first-touch trace uploads: little-endian page numbers (server/traces.ts)',
  maxLen: 4096,
  // The first byte picks the content type the device claims, so that check is fuzzed too.
  run: (d: Buffer) => void parseTrace(d.length > 0 && d[0] === 0xff ? 'text/plain' : `${PAGES_CONTENT_TYPE}; x=1`, d.subarray(1), TRACE_PAGES),
  expected: refused,
  dictionary: [Buffer.from([0xff, 0x0f, 0, 0]), Buffer.from([0, 0x10, 0, 0]), Buffer.from([0, 0, 0, 0])],
} satisfies FuzzTarget;

const policy: FuzzTarget = {
  name: 'policy',
  about: 'image policies as an admin uploads them: YAML, then the schema and meaning checks (policies/)',
  maxLen: 8192,
  run: (d) => void parsePolicy(d.toString('utf8'), 'fuzz.yaml'),
  expected: refused,
  dictionary: ascii(
    'version: 1\n', 'lease:\n', '  ttl: ', 'eviction:\n', '  idle: ', 'prefetch:\n', '  startup: ', 'sensitive:\n', '  - ', 'disk:\n',
    'memory:\n', 'guest:\n', ': ', '\n', '- ', '"', "'", '{', '}', '[', ']', '&a', '*a', '!!binary', '15m', '2s', '64MiB', 'auto', 'none', 'true', '~', '0x', '1e309', '-1',
  ),
};

const hintReader: FuzzTarget = {
  name: 'hint-reader',
  about: "the guest driver's lines on the host side of the hint port, which a compromised guest writes (agent/vm/hints.ts)",
  maxLen: 8192,
  run: (d) => {
    // The first byte says where the stream is cut in two reads: lines across reads are fuzzed too.
    const p = new HintParser();
    const cut = d.length > 0 ? d[0] % d.length : 0;
    p.push(d.subarray(1, Math.max(1, cut)));
    p.push(d.subarray(Math.max(1, cut)));
    p.reset();
  },
  expected: () => false,
  dictionary: ascii('hello lethe-guestd ', 'ok ', 'error ', 'dropped files=', ' pages=', 'report ', ' begin', ' end ', 'sensitive=', ' free=', ' procs=', 's ', 'f ', '\n', ' ', '0', '9007199254740991', '18446744073709551615'),
};

const signer = signKeyPair();
const signedRequest: FuzzTarget = {
  name: 'signed-request',
  about: "a device request's signature headers and the check of its signature (server/auth.ts, common/signing.ts)",
  maxLen: 2048,
  run: (d) => {
    // Lines: device id, timestamp, nonce, signature, method, path; the rest is the body.
    const [device, ts, nonce, signature, method, p, ...rest] = d.toString('latin1').split('\n');
    const h = signatureHeaders({ headers: { [HDR_DEVICE]: device, [HDR_TIMESTAMP]: ts, [HDR_NONCE]: nonce, [HDR_SIGNATURE]: signature } });
    if (!h) return;
    const ok = verifyRequest(signer.publicKey, h, method ?? '', p ?? '', Buffer.from(rest.join('\n'), 'latin1'));
    if (typeof ok !== 'boolean') throw new Error(`verifyRequest gave ${String(ok)}`);
  },
  expected: () => false,
  dictionary: ascii('dev-', '\n', 'POST', 'GET', '/v1/device/keys', 'AAAA', '_-', '1700000000000'),
};

const chunkEnvelope: FuzzTarget = {
  name: 'chunk-envelope',
  about: 'a chunk blob opened with its key: the version byte, nonce, tag and ciphertext (common/chunk.ts)',
  maxLen: 8192,
  run: (d) => {
    const size = Math.max(0, d.length - CHUNK_OVERHEAD);
    if (plaintextSize(d) !== d.length - CHUNK_OVERHEAD) throw new Error('plaintextSize disagrees');
    const out = Buffer.alloc(size);
    decryptChunkInto(out, ENVELOPE_KEY, ENVELOPE_COORD, d);
    // A blob that opened: any part of it decrypts on its own (a range read).
    if (size > 0) decryptChunkRangeInto(Buffer.alloc(Math.min(64, size)), ENVELOPE_KEY, d, Math.floor(size / 2) & ~63);
  },
  expected: (e) => e instanceof LetheError && e.code === 'TAMPERED',
};

/**
 * The native chunk cipher (native/aead.cc) against libsodium on the same input: the
 * first byte picks sealing, opening (of bytes that are mostly not a valid box), the
 * keystream from a block, checking a box's tag alone, or the tags of its 4 KiB pieces;
 * then key, nonce, the associated data's length and bytes (its first four, the block to
 * start from), and the message. Any difference between the two is a crash.
 */
const aead: FuzzTarget = {
  name: 'aead',
  about: "the native XChaCha20-Poly1305 on Node's OpenSSL against libsodium's, byte for byte (native/aead.cc)",
  maxLen: 8192,
  run: (d) => {
    if (d.length < 58) return;
    const key = d.subarray(1, 33);
    const nonce = d.subarray(33, 57);
    const adLen = Math.min(d[57], d.length - 58);
    const ad = d.subarray(58, 58 + adLen);
    const m = d.subarray(58 + adLen);
    const op = d[0] % 5;
    let same: boolean;
    if (op === 0) {
      const want = Buffer.alloc(m.length + 16);
      sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(want, m, ad, null, nonce, key);
      same = aeadSeal(key, nonce, ad, m).equals(want);
    } else if (op === 1 || op === 3) {
      if (m.length < 16) return;
      const want = Buffer.alloc(m.length - 16);
      let ok = true;
      try {
        sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(want, null, m, ad, nonce, key);
      } catch {
        ok = false;
      }
      if (op === 3) same = aeadVerify(key, nonce, ad, m) === ok;
      else {
        const got = aeadOpen(key, nonce, ad, m);
        same = ok ? got !== null && got.equals(want) : got === null;
      }
    } else if (op === 2) {
      const ic = ad.length >= 4 ? ad.readUInt32LE(0) : ad.length;
      const want = Buffer.alloc(m.length);
      sodium.crypto_stream_xchacha20_xor_ic(want, m, nonce, ic, key);
      same = aeadStream(key, nonce, ic, m).equals(want);
    } else {
      // Piece tags: each 4 KiB piece's Poly1305 under the first 32 bytes of block first + i.
      const first = ad.length >= 4 ? ad.readUInt32LE(0) : ad.length;
      const got = aeadPieceTags(key, nonce, first, m);
      same = got.length === Math.ceil(m.length / 4096) * 16;
      for (let i = 0; same && i * 4096 < m.length; i++) {
        const block = Buffer.alloc(64);
        sodium.crypto_stream_xchacha20_xor_ic(block, Buffer.alloc(64), nonce, first + i, key);
        const tag = Buffer.alloc(16);
        sodium.crypto_onetimeauth(tag, m.subarray(i * 4096, (i + 1) * 4096), block.subarray(0, 32));
        same = tag.equals(got.subarray(i * 16, i * 16 + 16));
      }
    }
    if (!same) throw new Error(`the native cipher and libsodium disagree (op ${op}, ${m.length} bytes, ${ad.length} bytes of ad)`);
  },
  expected: () => false,
  dictionary: [Buffer.from([0]), Buffer.from([1]), Buffer.from([2]), Buffer.from([3]), Buffer.from([0xff, 0xff, 0xff, 0xff]), Buffer.from([0xfe, 0xff, 0xff, 0xff])],
};

/** The class key and coordinate the disk-admit target's blobs are made for (seeds.ts encrypts under them). */
export const ADMIT_CLASS_KEY = Buffer.alloc(32, 8);
export const ADMIT_COORD: ChunkCoord = { imageId: Buffer.alloc(16, 2), gen: 3, kind: 'disk', index: 5, cls: 'normal' };

/**
 * A chunk's first read checked in native code (NativeDiskReads.admit, native/disk-admit.cc):
 * the input is the blob lying in the cache file. The table must take it in exactly when
 * the chunk format opens it in TypeScript, with the same plaintext, and a read from the
 * table afterwards must give those bytes too.
 */
class DiskAdmitTarget implements FuzzTarget {
  name = 'disk-admit';
  about = "a blob in the cache file at a chunk's first read, checked on a pool thread and taken into the native table (native/disk-admit.cc TableAdmit)";
  maxLen = 8192;
  private dir = '';
  private fd = -1;
  private table?: NativeDiskReads;

  async open(): Promise<void> {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lethe-fuzz-admit-'));
    this.fd = fs.openSync(path.join(this.dir, 'slots'), 'w+');
    this.table = NativeDiskReads.forDiskChunks(this.fd, { maxChunks: 4 });
    this.table.image(ADMIT_COORD.imageId);
    this.table.key(ADMIT_COORD.gen, ADMIT_CLASS_KEY);
  }

  async close(): Promise<void> {
    this.table?.close();
    if (this.fd >= 0) fs.closeSync(this.fd);
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  async run(d: Buffer): Promise<void> {
    const t = this.table!;
    const { index, gen } = ADMIT_COORD;
    if (d.length < CHUNK_OVERHEAD) return;
    t.forget(index); // before its slot changes, as the cache does
    fs.ftruncateSync(this.fd, 0);
    fs.writeSync(this.fd, d, 0, d.length, 0);
    const size = d.length - CHUNK_OVERHEAD;
    // The range read: a byte of the nonce picks where it starts (from 0, the whole chunk: the tag checked in the pass that decrypts).
    const from = d[1] % (size + 1);
    const got = Buffer.alloc(size - from);
    const admitted = await t.admit(index, gen, 0, d.length, from, got);
    let want: Buffer | undefined = Buffer.alloc(size);
    try {
      decryptChunkInto(want, chunkKey(ADMIT_CLASS_KEY, ADMIT_COORD), ADMIT_COORD, d);
    } catch (e) {
      if (!(e instanceof LetheError && e.code === 'TAMPERED')) throw e;
      want = undefined;
    }
    if (admitted !== (want !== undefined)) throw new Error(`the table ${admitted ? 'admitted' : 'refused'} a blob the chunk format ${want ? 'opens' : 'refuses'}`);
    if (!want) return;
    if (!got.equals(want.subarray(from))) throw new Error('the admission decrypted other bytes than the chunk format');
    // A shorter read (its pieces checked against the tags the admission took), then the whole chunk.
    const part = Buffer.alloc(Math.min(100, size - Math.floor(size / 3)));
    if (part.length > 0 && (!t.read(index * DISK_CHUNK_SIZE + Math.floor(size / 3), part) || !part.equals(want.subarray(Math.floor(size / 3), Math.floor(size / 3) + part.length)))) {
      throw new Error('the table does not read back a part of what it admitted');
    }
    const again = Buffer.alloc(size);
    if (size > 0 && (!t.read(index * DISK_CHUNK_SIZE, again) || !again.equals(want))) throw new Error('the table does not read back what it admitted');
  }

  expected(): boolean {
    return false;
  }
}

/**
 * A file export whose reads of whole zero chunks the native read proxy can answer from
 * a disk-read table (native/disk-reads.cc), as the agent's export does: every input then
 * passes through the proxy's request parser before JavaScript's. Writes forget their
 * chunks first, as the agent's do.
 */
async function proxiedFile(dir: string, size: number): Promise<{ backend: BlockBackend; close: () => Promise<void> }> {
  const file = path.join(dir, 'disk');
  fs.writeFileSync(file, Buffer.alloc(size));
  const plain = await FileBackend.open(file);
  const slots = path.join(dir, 'slots');
  const fd = fs.openSync(slots, 'w+');
  const table = NativeDiskReads.forDiskChunks(fd, { maxChunks: size / DISK_CHUNK_SIZE, proxy: { replies: 2, maxRead: 256 * 1024, copyBytes: 4096, writes: 2 } });
  const imageId = Buffer.alloc(16, 3);
  const classKey = randomBytes(32);
  table.image(imageId);
  table.key(1, classKey);
  const slot = DISK_CHUNK_SIZE + 4096;
  for (let i = 0; i < size / DISK_CHUNK_SIZE; i++) {
    const c: ChunkCoord = { imageId, gen: 1, kind: 'disk', index: i, cls: 'normal' };
    const blob = encryptChunk(chunkKey(classKey, c), c, Buffer.alloc(DISK_CHUNK_SIZE));
    fs.writeSync(fd, blob, 0, blob.length, i * slot);
    table.put(i, 1, i * slot + CHUNK_CT_AT, blob);
  }
  const forget = (offset: number, length: number) => {
    for (let i = Math.floor(offset / DISK_CHUNK_SIZE); i * DISK_CHUNK_SIZE < offset + length; i++) table.forget(i);
  };
  const backend: BlockBackend = {
    size: plain.size,
    read: (o, n) => plain.read(o, n),
    write: (o, d, fua) => (forget(o, d.length), plain.write(o, d, fua)),
    flush: () => plain.flush(),
    trim: (o, n) => (forget(o, n), plain.trim(o, n)),
    writeZeroes: (o, n, fua) => (forget(o, n), plain.writeZeroes(o, n, fua)),
    readTable: () => table,
  };
  return {
    backend,
    close: async () => {
      table.close();
      fs.closeSync(fd);
      await plain.close();
    },
  };
}

/** The agent's NBD server on a unix socket, the native read proxy in front; each input is one client's whole conversation. */
class NbdTarget implements FuzzTarget {
  name = 'nbd';
  about = "the agent's NBD server: handshake, options and transmission requests from a client, through the native read proxy (agent/disk/nbd/server.ts, native/nbd-proxy.cc)";
  maxLen = 4096;
  private dir = '';
  private server?: NbdServer;
  private export?: { close: () => Promise<void> };
  dictionary = [
    Buffer.from('IHAVEOPT', 'latin1'),
    Buffer.from('NBDMAGIC', 'latin1'),
    u32(3),
    u32(0x25609513),
    u32(7),
    u32(6),
    u32(8),
    u32(NBD_EXPORT.length),
    Buffer.from(NBD_EXPORT, 'latin1'),
    u32(0, 0),
    u32(0, 4096),
    u32(0, DISK_CHUNK_SIZE),
  ];

  async open(): Promise<void> {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lethe-fuzz-nbd-'));
    const exp = await proxiedFile(this.dir, NBD_SIZE);
    this.export = exp;
    this.server = new NbdServer(new Map([[NBD_EXPORT, exp.backend]]), { defaultExport: NBD_EXPORT, log: () => {} });
    await this.server.listen({ path: path.join(this.dir, 'nbd.sock') });
  }

  async close(): Promise<void> {
    await this.server?.close();
    await this.export?.close();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  expected = () => false;

  /** Sends the input, ends the client's side, reads whatever comes back; the server must close within 5 s. */
  run(d: Buffer): Promise<void> {
    return new Promise((resolve, reject) => {
      const c = net.connect(path.join(this.dir, 'nbd.sock'));
      const hang = setTimeout(() => {
        c.destroy();
        reject(new Error(`the server kept the connection open 5 s after the client's last byte (input of ${d.length} bytes)`));
      }, 5_000);
      c.on('error', () => {}); // a reset after the server gave up on the client is an answer
      c.on('data', () => {});
      c.on('close', () => {
        clearTimeout(hang);
        resolve();
      });
      c.end(d);
    });
  }
}

export const TARGETS: FuzzTarget[] = [chunkFrames, trace, policy, hintReader, signedRequest, chunkEnvelope, aead, new DiskAdmitTarget(), new NbdTarget()];
