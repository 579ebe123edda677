// The agent's chunk API for the disk and memory paths:
//   readInto(kind, index, out)   plaintext of a chunk into the caller's buffer
//   readRange(kind, index, from, out)   bytes of it, decrypting only those
//   write(kind, index, data)     a guest write, encrypted into the cache as dirty
//   evict(kind, index)           the caller dropped a resident plaintext copy
// Every chunk is checked against the signed manifest (SHA-256 of its blob; a blob
// this device wrote and has not checked in yet, against its seal id: cache.ts)
// and by its AEAD tag before a byte of plaintext is handed out; a chunk that
// fails is refused and reported, never served.
//
// A facade over its parts: chunk-map.ts (the manifest and this device's writes),
// chunk-keys.ts (keys), blob-source.ts (ciphertext from cache or server, prefetch),
// residency.ts (plaintext callers keep) and writes.ts (writes and check-in). The
// read path itself is here.
import {
  CHUNK_OVERHEAD, DISK_CHECKED_BYTES, DISK_CHUNK_SIZE, DISK_PIECE_CHUNKS, DISK_REPLY_BUFFER_BYTES, NBD_PROXY_COPY_BYTES, NBD_PROXY_REPLY_BUFFERS,
  NBD_PROXY_WRITE_BUFFERS,
  type ChunkKind, type Sensitivity,
} from '../../common/constants.js';
import { CHUNK_CT_AT, decryptChunkInto, decryptChunkPartInto, decryptChunkRangeInto, verifyChunk } from '../../common/chunk.js';
import { b64u, tampered, wipe } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';
import { NativeDiskReads, type DiskReadsStats } from '../../native/disk-reads.js';
import type { Identity } from '../keys/identity.js';
import type { KeyRing } from '../keys/keyring.js';
import type { LeaseKeeper } from '../keys/lease-keeper.js';
import type { WireManifest } from '../remote/device-client.js';
import type { ChunkRef, Fetcher } from '../remote/fetcher.js';
import { BlobSource, type PrefetchOptions, type ReadSource } from './blob-source.js';
import type { ChunkCache } from './cache.js';
import { CheckedBlobs } from './checked-blobs.js';
import { ChunkKeys } from './chunk-keys.js';
import { ChunkMap, keyId, parseKeyId, readManifest, type Entry, type ManifestHead } from './chunk-map.js';
import { PIECE_BYTES, PieceDigests } from './piece-digests.js';
import { Residency } from './residency.js';
import { ChunkWriter, type CheckinClient, type CheckinResult } from './writes.js';

/** Reads of a disk chunk up to this long take only the pieces they need from the cache file (readPieces). */
const PIECE_READ_MAX = 32 * 1024;

export type { Entry } from './chunk-map.js';
export type { ReadSource } from './blob-source.js';

export class AgentCore {
  readonly stats = { reads: 0, fromCache: 0, fromServer: 0, zero: 0, writes: 0, evicted: 0, tampered: 0, keyRequests: 0, writeKeyFailures: 0, readahead: 0, pieceReads: 0 };
  /** Blobs readRange() has checked, kept so that later reads of parts of them decrypt only those parts. */
  readonly checked: CheckedBlobs;
  /** Digests of the 4 KiB pieces of disk chunks readRange() has checked, for small reads from the cache file. */
  readonly pieces = new PieceDigests(DISK_PIECE_CHUNKS);
  /** readPieces()' ciphertext (not secret): the pieces one read covers. */
  private readonly pieceBuf = Buffer.allocUnsafe(PIECE_READ_MAX + PIECE_BYTES);
  private readonly map = new ChunkMap();
  /**
   * Normal-class disk chunks whose tag was checked, read in native code from the cache
   * file (native/disk-reads.ts): a warm read in one call, with the class key kept
   * readable there rather than opened for each use. Other chunks' pieces: `pieces`.
   */
  private readonly fast: NativeDiskReads;
  /** Generations whose class key the native table holds. */
  private readonly fastGens = new Set<number>();
  private readonly chunkKeys: ChunkKeys;
  private readonly blobs: BlobSource;
  private readonly residency: Residency;
  private readonly writer: ChunkWriter;

  constructor(
    private readonly id: Identity,
    private readonly cache: ChunkCache,
    private readonly keys: KeyRing,
    fetcher: Fetcher,
    private readonly lease: LeaseKeeper,
    checkedBytes = DISK_CHECKED_BYTES,
  ) {
    // A disk blob leaving memory (or too large to keep) leaves its pieces' digests behind: later short reads take pieces from the cache file.
    this.checked = new CheckedBlobs(checkedBytes, (id, hash, blob) => {
      const { kind, index, gen } = parseKeyId(id);
      if (kind !== 'disk' || !this.putFast(index, gen, hash, blob)) this.pieces.put(id, hash, blob);
    });
    this.fast = NativeDiskReads.forDiskChunks(cache.slotFd('disk'), {
      maxChunks: DISK_PIECE_CHUNKS,
      proxy: { replies: NBD_PROXY_REPLY_BUFFERS, maxRead: DISK_REPLY_BUFFER_BYTES, copyBytes: NBD_PROXY_COPY_BYTES, writes: NBD_PROXY_WRITE_BUFFERS },
    });
    // What the table read lies where the cache has moved on, or was written over, or the keys are gone.
    cache.onReplace = (k) => k.kind === 'disk' && this.fast.forget(k.index);
    // A blob from the server (a prefetch, a read) lands in the cache file: the read proxy may admit it itself.
    cache.onStored = (k, at, len, sha, dirty) => {
      if (!dirty && k.kind === 'disk') this.place(k.imageId, k.index, k.gen, at, len, sha);
    };
    keys.onZeroAll(() => {
      this.fast.zeroKeys();
      this.fastGens.clear();
    });
    this.chunkKeys = new ChunkKeys(this.map, id, keys, fetcher, lease, this.stats);
    this.blobs = new BlobSource(this.map, cache, fetcher, lease, this.stats);
    this.residency = new Residency(this.chunkKeys, keys, this.stats);
    this.writer = new ChunkWriter(this.map, this.chunkKeys, cache, lease, this.checked, this.stats, (kind, index) => kind === 'disk' && this.fast.forget(index));
  }

  /** The lease's manifest, its state size moved by this device's suspend if there was one. */
  get manifest(): ManifestHead | undefined {
    return this.map.manifest;
  }

  /** The chunks of a kind the map holds (the version's stored chunks, and this device's writes), in order. */
  chunkIndexes(kind: ChunkKind): number[] {
    return [...this.map.entries[kind].keys()].sort((a, b) => a - b);
  }

  /** The draft generation this device's writes are encrypted for, once it has written (or adopted earlier writes). */
  get writeGen(): number | undefined {
    return this.map.writeGen;
  }

  /** Resident plaintext bytes by class (residency.ts). */
  get resident(): Record<Sensitivity, number> {
    return this.residency.bytes;
  }

  /**
   * Installs the lease's manifest after checking the server's signature; dirty
   * chunks in the cache written for `writeGen` override it.
   */
  setManifest(w: WireManifest, writeGen?: number, lease?: { image: string; version: number }): void {
    const m = readManifest(w, b64u.decode(this.id.info.serverSignPublicKey));
    // Signed, but of the lease's own version only: not another one of the server's manifests sent again.
    if (lease && (m.head.image !== lease.image || m.head.version !== lease.version)) {
      throw new LetheError('TAMPERED', `the manifest is of ${m.head.image}@${m.head.version}, not of the lease's ${lease.image}@${lease.version}`);
    }
    this.map.install(m, writeGen, this.cache);
    const { imageId } = m.head;
    this.fast.image(Buffer.from(imageId, 'hex'));
    // The cached blobs, not the manifest's entries: a disk of 200 GiB lists 1.6 million, its cache may hold 16,384.
    for (const p of this.cache.placesOf(imageId, 'disk')) {
      if (this.place(imageId, p.key.index, p.key.gen, p.at, p.len, p.sha) === false) break; // the table knows as many places as it may
    }
  }

  /**
   * Tells the native table where the cached blob of a normal-class disk chunk of the
   * manifest lies (its stored hash the manifest's), so that the NBD read proxy admits it
   * at its first read on its own thread (NativeDiskReads.lies). Not a chunk this device
   * wrote, nor one whose key the ring holds apart (a write key): those stay in
   * JavaScript. False when the table knows as many places as it may.
   */
  private place(imageId: string, index: number, gen: number, at: number, len: number, sha: Buffer): boolean | undefined {
    const e = this.map.entries.disk.get(index);
    const id = keyId('disk', index, gen);
    if (!e || imageId !== this.map.manifest?.imageId || e.gen !== gen || e.cls !== 'normal' || e.gen === this.map.writeGen) return undefined;
    if (len !== this.map.plainLength('disk', index) + CHUNK_OVERHEAD || this.keys.hasSensitiveKey(id) || sha.toString('base64url') !== e.ctHash) return undefined;
    try {
      this.fastKeyed(id, e); // the table gets the generation's class key now if the ring holds it (else at the first read in JavaScript)
      return this.fast.lies(index, gen, at, len);
    } catch {
      return undefined; // the table is closed (the agent stopping): a hint only, the read goes the JavaScript way
    }
  }

  /** The native disk-read table, for the NBD read proxy (agent/disk/nbd/connection.ts). */
  get readTable(): NativeDiskReads {
    return this.fast;
  }

  /** The native disk-read table's counters. */
  get diskReads(): DiskReadsStats {
    return this.fast.stats();
  }

  /**
   * Puts a checked blob of disk chunk `index` in the native table (at its check, and again as it leaves
   * memory if the table let it go): a normal-class chunk of the manifest, keyed by its
   * generation's class key (held), lying in the cache file. False for any other (the
   * caller keeps its pieces' digests itself).
   */
  private putFast(index: number, gen: number, hash: string, blob: Buffer): boolean {
    const e = this.map.entries.disk.get(index);
    const id = keyId('disk', index, gen);
    if (!e || e.gen !== gen || e.ctHash !== hash || !this.fastKeyed(id, e)) return false;
    if (this.fast.has(index, gen)) return true;
    const p = this.cache.place(this.map.cacheKey('disk', index, e));
    if (p === undefined) return false;
    this.fast.put(index, gen, p.at + CHUNK_CT_AT, blob);
    this.pieces.delete(id);
    return true;
  }

  /**
   * Whether the native table can key this chunk: a normal-class chunk with no key of its
   * own (a write key), whose generation's class key the ring holds; the table is given
   * that class key the first time.
   */
  private fastKeyed(id: string, e: Entry): boolean {
    if (e.cls !== 'normal' || this.keys.hasSensitiveKey(id)) return false;
    if (this.fastGens.has(e.gen)) return true;
    if (!this.keys.withClassKey(e.gen, (k) => k !== undefined && this.fast.key(e.gen, k))) return false;
    this.fastGens.add(e.gen);
    return true;
  }

  /**
   * Bytes [from, from + out.length) of disk chunk `index`, now, without a promise or
   * the key ring (readNow): true when served; false (out's bytes undefined), and read
   * them with readRange().
   */
  readRangeNow(index: number, from: number, out: Buffer): boolean {
    if (this.lease.state !== 'active') return false;
    const e = this.map.entries.disk.get(index);
    if (!e || !this.readNow(index, e, keyId('disk', index, e.gen), from, out)) return false;
    this.stats.reads++;
    this.stats.fromCache++;
    return true;
  }

  /**
   * A normal-class disk chunk's bytes through the native table: from its blob kept in
   * memory (`checked`) under the table's class key, or from the table's pieces of the
   * cache file. False for any other chunk, or when the table cannot serve it.
   */
  private readNow(index: number, e: Entry, id: string, from: number, out: Buffer, checked = this.checked.get(id, e.ctHash)): boolean {
    if (e.cls !== 'normal') return false;
    if (checked) return this.fastKeyed(id, e) && this.fast.decrypt(index, e.gen, checked, from, out);
    if (!this.fast.read(index * DISK_CHUNK_SIZE + from, out)) return false;
    this.stats.pieceReads++;
    return true;
  }

  entry(kind: ChunkKind, index: number): Entry | undefined {
    return this.map.entry(kind, index);
  }

  sizeOf(kind: ChunkKind): number {
    return this.map.sizeOf(kind);
  }

  hasWriteKey(kind: ChunkKind, index: number): boolean {
    return this.chunkKeys.hasWriteKey(kind, index);
  }

  classOf(kind: ChunkKind, index: number): Sensitivity | undefined {
    return this.chunkKeys.classOf(kind, index);
  }

  ensureWriteKeys(kind: ChunkKind, indices: number[], stateSize?: number): Promise<void> {
    return this.chunkKeys.ensureWriteKeys(kind, indices, stateSize);
  }

  /**
   * Reads the plaintext of a chunk into `out` (exactly its size), or with `from`
   * only bytes [from, from + out.length), decrypting nothing else: then the
   * chunk's tag is checked once, when its blob comes from the cache or the
   * server, and the checked blob is kept in memory (`checked`) for the next read.
   * Waits for a lease if there is none. `resident` marks the plaintext as kept
   * (guest RAM) until evict() is called; otherwise the caller zeroes `out` after use.
   * `writable` (guest RAM) also asks for the chunk's write key, beside the read and
   * without waiting for it, so that whatever the guest writes there can be evicted
   * later without a server (the evictor asks again for a key that failed to come).
   * `companions` names chunks likely read next (guest RAM: the pages evicted after
   * this one), asked for only when a key request goes out: their keys come in the
   * same audited round trip (ChunkKeys.fetchSensitive).
   * Throws TAMPERED for a chunk that fails its checks twice (cache, then server).
   */
  async readInto(
    kind: ChunkKind,
    index: number,
    out: Buffer,
    opts: { resident?: boolean; writable?: boolean; from?: number; companions?: () => readonly number[] } = {},
  ): Promise<ReadSource> {
    await this.lease.whenActive();
    let named: readonly number[] | undefined;
    const companions = () => (named ??= opts.companions?.() ?? []);
    if (opts.writable && !this.chunkKeys.hasWriteKey(kind, index) && !this.chunkKeys.writeKeyPending(kind, index)) {
      this.chunkKeys.ensureWriteKeys(kind, this.chunkKeys.writeNeighbours(kind, index, companions())).catch(() => this.stats.writeKeyFailures++);
    }
    try {
      return await this.read(kind, index, out, opts.resident ?? false, opts.from, companions);
    } catch (e) {
      wipe(out);
      throw e;
    }
  }

  /** readInto() of bytes [from, from + out.length) of a chunk (the disk path). */
  readRange(kind: ChunkKind, index: number, from: number, out: Buffer): Promise<ReadSource> {
    return this.readInto(kind, index, out, { from });
  }

  private async read(kind: ChunkKind, index: number, out: Buffer, resident: boolean, from: number | undefined, companions: () => readonly number[]): Promise<ReadSource> {
    const { map, chunkKeys } = this;
    // A range outside the chunk is the caller's mistake: refused before any key is asked for.
    if (from !== undefined && (from < 0 || from + out.length > map.plainLength(kind, index))) {
      throw new RangeError(`range ${from}+${out.length} is outside ${kind} chunk ${index} (${map.plainLength(kind, index)} bytes)`);
    }
    this.stats.reads++;
    const e = map.entries[kind].get(index);
    if (!e) {
      out.fill(0);
      this.stats.zero++;
      if (resident) this.residency.mark(kind, index, chunkKeys.classOf(kind, index) ?? 'sensitive', out.length);
      return 'zero';
    }
    const id = keyId(kind, index, e.gen);
    const checked = from === undefined ? undefined : this.checked.get(id, e.ctHash);
    if (kind === 'disk' && from !== undefined && this.readNow(index, e, id, from, out, checked)) {
      this.stats.fromCache++;
      return 'cache';
    }
    if (!checked && from !== undefined && this.readPieces(kind, index, e, id, from, out)) {
      this.stats.fromCache++;
      this.stats.pieceReads++;
      return 'cache';
    }
    if (!checked && kind === 'disk' && from !== undefined && (await this.admitRead(index, e, id, from, out))) {
      this.stats.fromCache++;
      return 'cache';
    }
    // A disk chunk's blob is read into a spare buffer, handed back when this read is done.
    const spare = !checked && kind === 'disk' ? this.blobs.spare() : undefined;
    try {
      return await this.decryptRead(kind, index, e, id, out, resident, from, checked, spare, companions);
    } finally {
      if (spare) this.blobs.giveBack(spare);
    }
  }

  private async decryptRead(
    kind: ChunkKind,
    index: number,
    e: Entry,
    id: string,
    out: Buffer,
    resident: boolean,
    from: number | undefined,
    checked: Buffer | undefined,
    spare: Buffer | undefined,
    companions: () => readonly number[],
  ): Promise<ReadSource> {
    const { map, chunkKeys } = this;
    let { blob, source } = checked ? { blob: checked, source: 'cache' as const } : await this.blobs.blob(kind, index, e, spare);
    if (!chunkKeys.holds(kind, index, e.gen)) {
      // A chunk this device wrote (before a restart, say) is keyed for the write
      // generation: its key comes as a write key. Others: sensitive keys by release.
      if (e.gen === map.writeGen && (e.cls === 'sensitive' || !chunkKeys.hasClassKey(e.gen))) await chunkKeys.ensureWriteKeys(kind, [index]);
      else if (e.cls === 'sensitive') await chunkKeys.fetchSensitive(kind, index, e.gen, companions());
    }
    await this.lease.whenActive();
    const scratch = chunkKeys.scratch;
    for (let attempt = 0; ; attempt++) {
      if (!chunkKeys.keyInto(kind, index, e)) throw new LetheError('LEASE_EXPIRED', `no key for ${kind} chunk ${index}: the lease ended`);
      try {
        if (from === undefined) decryptChunkInto(out, scratch, map.coord(kind, index, e), blob);
        else {
          if (!checked) {
            if (!verifyChunk(scratch, map.coord(kind, index, e), blob)) throw tampered();
            // A blob in the spare buffer is borrowed: the buffer goes back for the next read.
            this.checked.put(id, e.ctHash, blob, { read: true, borrowed: spare !== undefined && blob.buffer === spare.buffer });
            // Checked: the native table serves it from the cache file from now on, to the NBD proxy too.
            if (kind === 'disk') this.putFast(index, e.gen, e.ctHash, blob);
          }
          decryptChunkRangeInto(out, scratch, blob, from);
        }
        break;
      } catch (err) {
        if (source !== 'cache' || attempt > 0) {
          this.stats.tampered++;
          throw new LetheError('TAMPERED', `${kind} chunk ${index} failed authentication; refused`, { cause: err });
        }
        this.blobs.drop(kind, index, e);
        ({ blob, source } = await this.blobs.blob(kind, index, e, spare));
      } finally {
        wipe(scratch);
      }
    }
    if (source === 'cache') this.stats.fromCache++;
    else this.stats.fromServer++;
    if (resident) this.residency.mark(kind, index, e.cls, out.length);
    return source;
  }

  /**
   * The first read of a disk chunk whose blob lies in the cache file: the native table
   * reads it, checks its tag and takes it in on a pool thread, off the event loop
   * (NativeDiskReads.admit), and decrypts the range read. False when it cannot: not a
   * normal-class chunk the table has the key of, not in the cache file, a blob that fails
   * its check, a write meanwhile. The full read then does it, and drops a damaged blob.
   */
  private async admitRead(index: number, e: Entry, id: string, from: number, out: Buffer): Promise<boolean> {
    if (e.cls !== 'normal' || !this.fastKeyed(id, e)) return false;
    // The blob the manifest names, as the full read's cache lookup (BlobSource.blob) asks.
    const p = this.cache.place(this.map.cacheKey('disk', index, e));
    if (!p || p.sha.toString('base64url') !== e.ctHash || p.len !== this.map.plainLength('disk', index) + CHUNK_OVERHEAD) return false;
    if (!(await this.fast.admit(index, e.gen, p.at, p.len, from, out))) return false;
    this.pieces.delete(id);
    return true;
  }

  /**
   * A small read of a disk chunk whose blob is in the cache file only: the pieces it
   * covers, each checked against its digest, and those decrypted (piece-digests.ts).
   * False when it cannot: no digests or no key at hand, a longer read, a piece that
   * does not match. Then the whole blob is read and its tag checked, which drops a
   * damaged blob and fetches it again.
   */
  private readPieces(kind: ChunkKind, index: number, e: Entry, id: string, from: number, out: Buffer): boolean {
    if (kind !== 'disk' || out.length > PIECE_READ_MAX) return false;
    const r = this.pieces.get(id, e.ctHash);
    if (!r) return false;
    const first = Math.floor(from / PIECE_BYTES);
    const at = first * PIECE_BYTES;
    const end = Math.min(Math.ceil((from + out.length) / PIECE_BYTES) * PIECE_BYTES, this.map.plainLength(kind, index));
    const part = this.pieceBuf.subarray(0, end - at);
    if (!this.cache.readPart(this.map.cacheKey(kind, index, e), CHUNK_CT_AT + at, part)) return false;
    for (let p = first, o = 0; o < part.length; p++, o += PIECE_BYTES) {
      if (!this.pieces.matches(r, p, part.subarray(o, o + PIECE_BYTES))) {
        this.pieces.mismatches++;
        this.pieces.delete(id);
        return false;
      }
    }
    // A sensitive key not held, or a class key not come yet: the full read asks for it.
    const scratch = this.chunkKeys.scratch;
    try {
      if (!this.chunkKeys.keyInto(kind, index, e)) return false;
      decryptChunkPartInto(out, scratch, this.pieces.nonce(r), part, at, from);
    } finally {
      wipe(scratch);
    }
    return true;
  }

  /**
   * Call after the caller dropped a resident plaintext copy. A sensitive
   * chunk's key goes with it, so the next read asks the server again.
   */
  evict(kind: ChunkKind, index: number): void {
    this.residency.evict(kind, index);
  }

  /** Drops every sensitive key and resident-plaintext record (lease expiry, wipe). */
  evictAllSensitive(): void {
    this.residency.evictAllSensitive();
  }

  /** Drops keys of chunks whose plaintext is not resident, held for `olderThanMs` (residency.ts). */
  dropKeysWithoutPlaintext(kind: ChunkKind, olderThanMs: number, keep: (index: number) => boolean): number {
    return this.residency.dropKeysWithoutPlaintext(kind, olderThanMs, keep);
  }

  /** A guest write, encrypted into the cache as dirty (writes.ts). */
  write(kind: ChunkKind, index: number, data: Buffer): Promise<void> {
    return this.writer.write(kind, index, data);
  }

  /** A suspend's new device state, written whole in one cache transaction (writes.ts). */
  replaceState(state: Buffer): Promise<void> {
    return this.writer.replaceState(state);
  }

  /** Makes every write so far durable in the cache (FLUSH, FUA). */
  flush(): void {
    this.cache.flush();
  }

  /** Sends this lease's dirty chunks as a new version, then runs `moveLease` while guest writes wait (writes.ts). */
  checkin(client: CheckinClient, moveLease?: (r: CheckinResult) => Promise<void>) {
    return this.writer.checkin(client, moveLease);
  }

  /** Prefetches the ciphertext of every chunk not in the cache (no keys, no plaintext). */
  async prefetchAll(onProgress?: (done: number, total: number) => void, batch = 64): Promise<void> {
    const refs: ChunkRef[] = [];
    for (const kind of ['state', 'mem', 'disk'] as ChunkKind[]) for (const index of this.map.entries[kind].keys()) refs.push({ kind, index });
    await this.blobs.prefetch(refs, { onProgress, batch });
  }

  /** Brings these chunks' ciphertext into the cache in this order (blob-source.ts); how many it fetched. */
  prefetchChunks(refs: ChunkRef[], o: PrefetchOptions = {}): Promise<number> {
    return this.blobs.prefetch(refs, o);
  }

  destroy(): void {
    this.fast.close();
    this.chunkKeys.destroy();
    this.residency.clear();
  }
}
