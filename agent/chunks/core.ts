// The agent's chunk API for the disk and memory paths:
//   readInto(kind, index, out)   plaintext of a chunk into the caller's buffer
//   readRange(kind, index, from, out)   bytes of it, decrypting only those
//   write(kind, index, data)     a guest write, encrypted into the cache as dirty
//   evict(kind, index)           the caller dropped a resident plaintext copy
// Every chunk is checked against the signed manifest (SHA-256 of its blob)
// and by its AEAD tag before a byte of plaintext is handed out; a chunk that
// fails is refused and reported, never served.
import { canonical } from '../../common/audit-hash.js';
import { CHUNK_OVERHEAD, CHUNK_SIZE, DISK_CHECKED_BYTES, KEY_BYTES, MANIFEST_CONTEXT, MAX_BATCH, type ChunkKind, type Sensitivity } from '../../common/constants.js';
import { chunkKeyInto, decryptChunkInto, decryptChunkRangeInto, encryptChunk, verifyChunk, type ChunkCoord } from '../../common/chunk.js';
import { b64u, openSealed, secureBuffer, sha256, tampered, verify, wipe } from '../../common/crypto.js';
import { crashPoint } from '../../common/crash-point.js';
import { LetheError } from '../../common/errors.js';
import type { ChunkCache, CacheKey } from './cache.js';
import { CheckedBlobs } from './checked-blobs.js';
import { encodeChunkFrame } from '../../common/frames.js';
import type { Manifest } from '../remote/device-client.js';
import type { ChunkRef, Fetcher } from '../remote/fetcher.js';
import type { Identity } from '../keys/identity.js';
import type { KeyRing } from '../keys/keyring.js';
import type { LeaseKeeper } from '../keys/lease-keeper.js';

export interface Entry {
  gen: number;
  cls: Sensitivity;
  ctHash: string;
}

export type ReadSource = 'zero' | 'cache' | 'server';

/** A chunk from the server, and whether it matched the manifest (and went to the cache). */
type Fetched = { blob: Buffer; ok: boolean };

/** Sensitive keys are asked for in batches: the chunk and its next neighbours not yet held. */
const KEY_BATCH = 64;
/** Guest pages fetched ahead in one request when guest RAM is read in order (64 KiB). */
const READAHEAD = 16;
/** Check-in requests stay under the server's upload limit. */
const CHECKIN_PART_BYTES = 4 * 1024 * 1024;

export function verifyManifest(m: Manifest, serverSignPublicKey: Buffer): void {
  const { signature, ...body } = m;
  const msg = Buffer.from(`${MANIFEST_CONTEXT}\n${sha256(canonical(body)).toString('hex')}`);
  if (!verify(serverSignPublicKey, msg, b64u.decode(signature))) {
    throw new LetheError('TAMPERED', `manifest of ${m.image}@${m.version} has a bad signature`);
  }
}

export class AgentCore {
  manifest?: Manifest;
  private entries: Record<ChunkKind, Map<number, Entry>> = { disk: new Map(), mem: new Map(), state: new Map() };
  private imageIdBytes = Buffer.alloc(16);
  private readonly scratch = secureBuffer(KEY_BYTES);
  readonly resident: Record<Sensitivity, number> = { sensitive: 0, normal: 0 };
  private readonly residentSet = new Map<string, { cls: Sensitivity; bytes: number }>();
  private readonly keysInFlight = new Map<string, Promise<void>>();
  readonly stats = { reads: 0, fromCache: 0, fromServer: 0, zero: 0, writes: 0, evicted: 0, tampered: 0, keyRequests: 0, writeKeyFailures: 0, readahead: 0 };
  /** Chunks on their way from the server (cached when they come), by key id: a read of one waits for it. */
  private readonly blobsInFlight = new Map<string, Promise<Fetched>>();

  constructor(
    private readonly id: Identity,
    private readonly cache: ChunkCache,
    private readonly keys: KeyRing,
    private readonly fetcher: Fetcher,
    private readonly lease: LeaseKeeper,
    checkedBytes = DISK_CHECKED_BYTES,
  ) {
    this.checked = new CheckedBlobs(checkedBytes);
  }

  /** Blobs readRange() has checked, kept so that later reads of parts of them decrypt only those parts. */
  readonly checked: CheckedBlobs;

  /** The draft generation this device's writes are encrypted for, once it has written (or adopted earlier writes). */
  writeGen?: number;
  private readonly writeCls = new Map<string, Sensitivity>();

  /**
   * Installs the lease's manifest after checking the server's signature; dirty
   * chunks in the cache written for `writeGen` override it.
   */
  setManifest(m: Manifest, writeGen?: number): void {
    verifyManifest(m, b64u.decode(this.id.info.serverSignPublicKey));
    this.manifest = m;
    this.imageIdBytes = Buffer.from(m.imageId, 'hex');
    this.entries = { disk: new Map(), mem: new Map(), state: new Map() };
    for (const kind of ['disk', 'mem', 'state'] as ChunkKind[]) {
      for (const [index, gen, cls, ctHash] of m.chunks[kind]) this.entries[kind].set(index, { gen, cls, ctHash });
    }
    this.writeGen = writeGen;
    const dirty = this.cache.dirtyChunks(m.imageId);
    // A new device state a suspend wrote (whole: replaceState is one transaction) replaces the version's, at its own size.
    const state = dirty.filter((d) => d.kind === 'state' && d.gen === writeGen).sort((a, b) => a.index - b.index);
    if (state.length > 0) {
      const last = state[state.length - 1];
      this.manifest = { ...m, sizes: { ...m.sizes, state: last.index * CHUNK_SIZE.state + last.data.length - CHUNK_OVERHEAD } };
      this.entries.state.clear();
    }
    for (const d of dirty) {
      const ctHash = sha256(d.data).toString('base64url');
      if (d.gen === writeGen && d.cls) this.entries[d.kind].set(d.index, { gen: d.gen, cls: d.cls, ctHash });
      // Checked in already: the server committed it, and the answer never came back (a crash, a lost link).
      else if (this.entries[d.kind].get(d.index)?.ctHash === ctHash) this.cache.markClean(d);
    }
  }

  entry(kind: ChunkKind, index: number): Entry | undefined {
    return this.entries[kind].get(index);
  }

  sizeOf(kind: ChunkKind): number {
    return this.manifest?.sizes[kind] ?? 0;
  }

  private must(): Manifest {
    if (!this.manifest) throw new LetheError('LEASE_EXPIRED', 'no manifest yet: the agent has no lease');
    return this.manifest;
  }

  private coord(kind: ChunkKind, index: number, e: Entry): ChunkCoord {
    return { imageId: this.imageIdBytes, gen: e.gen, kind, index, cls: e.cls };
  }

  private cacheKey(kind: ChunkKind, index: number, e: Entry): CacheKey {
    return { imageId: this.must().imageId, gen: e.gen, kind, index };
  }

  private keyId(kind: ChunkKind, index: number, gen: number): string {
    return `${gen}/${kind}/${index}`;
  }

  /** The blob of a chunk: the cache's if it matches the manifest, else the server's (then cached). */
  private async blob(kind: ChunkKind, index: number, e: Entry): Promise<{ blob: Buffer; source: ReadSource }> {
    const ck = this.cacheKey(kind, index, e);
    // The stored hash is compared with the signed manifest; damage to the data
    // itself fails the AEAD tag below, and the chunk is then fetched again.
    const cached = this.cache.getWithHash(ck, false);
    if (cached && cached.sha256.toString('base64url') === e.ctHash) return { blob: cached.data, source: 'cache' };
    if (cached) this.cache.drop(ck);
    const fetched = await (this.blobsInFlight.get(this.keyId(kind, index, e.gen)) ?? this.fetchWithReadahead(kind, index, e));
    if (!fetched.ok) {
      this.stats.tampered++;
      throw new LetheError('TAMPERED', `${kind} chunk ${index} from the server does not match the signed manifest; refused`);
    }
    return { blob: fetched.blob, source: 'server' };
  }

  /** Caches a blob from the server if it matches the signed manifest; tells whether it did. */
  private keep(kind: ChunkKind, index: number, e: Entry, blob: Buffer): boolean {
    const hash = sha256(blob);
    if (hash.toString('base64url') !== e.ctHash) return false;
    this.cache.put(this.cacheKey(kind, index, e), blob, false, undefined, hash);
    return true;
  }

  /** keep() of a batch in one cache transaction; how many did not match their manifest entry. */
  private keepMany(items: { kind: ChunkKind; index: number; e: Entry; blob: Buffer }[]): number {
    const good: { k: CacheKey; blob: Buffer; hash: Buffer }[] = [];
    for (const { kind, index, e, blob } of items) {
      const hash = sha256(blob);
      if (hash.toString('base64url') === e.ctHash) good.push({ k: this.cacheKey(kind, index, e), blob, hash });
    }
    this.cache.putMany(good);
    return items.length - good.length;
  }

  /**
   * Fetches a chunk into the cache; when guest RAM is being read in order (the
   * page before is cached), the next READAHEAD pages not cached come in the same
   * request, as a disk's readahead does. Reads of any of them wait for this fetch.
   */
  private fetchWithReadahead(kind: ChunkKind, index: number, e: Entry): Promise<Fetched> {
    const refs = [index];
    const prev = this.entries[kind].get(index - 1);
    if (kind === 'mem' && prev && this.cache.has(this.cacheKey(kind, index - 1, prev))) {
      for (let i = index + 1; refs.length < READAHEAD && i < index + 2 * READAHEAD; i++) {
        const n = this.entries[kind].get(i);
        if (n && !this.blobsInFlight.has(this.keyId(kind, i, n.gen)) && !this.cache.has(this.cacheKey(kind, i, n))) refs.push(i);
      }
    }
    const fetches = refs.map((i) => {
      const n = i === index ? e : this.entries[kind].get(i)!;
      const id = this.keyId(kind, i, n.gen);
      const p = this.fetcher.demand({ kind, index: i }).then((blob) => ({ blob, ok: this.keep(kind, i, n, blob) }));
      this.blobsInFlight.set(id, p);
      // A readahead page that fails is left for its own read to fetch again and refuse.
      p.catch(() => {}).finally(() => this.blobsInFlight.delete(id));
      return p;
    });
    this.stats.readahead += refs.length - 1;
    return fetches[0];
  }

  /**
   * Fetches sensitive keys for this chunk and its next sensitive neighbours
   * not yet held or asked for. Concurrent reads share requests: a key already
   * on its way is waited for, not asked for again.
   */
  private async fetchSensitiveKeys(kind: ChunkKind, index: number, gen: number): Promise<void> {
    const pending = this.keysInFlight.get(this.keyId(kind, index, gen));
    if (pending) return pending;
    const refs = [{ kind, index }];
    for (let i = index + 1; refs.length < KEY_BATCH && i < index + 4 * KEY_BATCH; i++) {
      const n = this.entries[kind].get(i);
      // A chunk this device wrote is keyed by its write key: the server has no such chunk to release a key for.
      if (!n || n.cls !== 'sensitive' || n.gen === this.writeGen) continue;
      const id = this.keyId(kind, i, n.gen);
      if (!this.keys.hasSensitiveKey(id) && !this.keysInFlight.has(id)) refs.push({ kind, index: i });
    }
    const ids = refs.map((r) => this.keyId(r.kind, r.index, this.entries[r.kind].get(r.index)!.gen));
    const p = this.requestKeys(refs, false);
    for (const id of ids) this.keysInFlight.set(id, p);
    try {
      await p;
    } finally {
      for (const id of ids) this.keysInFlight.delete(id);
    }
  }

  /**
   * One audited key request (read keys, or write keys with `write`), kept in the
   * ring. An answer that comes after the lease it was asked under ended is wiped,
   * not kept: keys never outlive their lease here.
   */
  private async requestKeys(refs: ChunkRef[], write: boolean, stateSize?: number): Promise<void> {
    this.stats.keyRequests++;
    const leaseId = this.lease.leaseId();
    const res = await this.fetcher.keys(refs, write, stateSize);
    const all = openSealed(this.id.box, b64u.decode(res.sealed));
    try {
      if (this.lease.state !== 'active' || this.lease.leaseId() !== leaseId) {
        throw new LetheError('LEASE_EXPIRED', 'the lease ended while keys were on their way; they were dropped');
      }
      const ids = res.chunks.map((c) => {
        const id = this.keyId(c.kind, c.index, c.gen);
        if (write) {
          this.writeGen = c.gen;
          this.writeCls.set(id, c.cls);
        }
        return id;
      });
      this.keys.setSensitiveKeys(ids, all.subarray(0, ids.length * KEY_BYTES));
    } finally {
      wipe(all);
    }
  }

  /** Whether this device holds the key to encrypt new content of a chunk. */
  hasWriteKey(kind: ChunkKind, index: number): boolean {
    return this.writeGen !== undefined && this.keys.hasSensitiveKey(this.keyId(kind, index, this.writeGen));
  }

  /** A chunk's class: the manifest's, or (for a chunk zero so far) the one its write key came with. */
  classOf(kind: ChunkKind, index: number): Sensitivity | undefined {
    return this.entries[kind].get(index)?.cls ?? (this.writeGen === undefined ? undefined : this.writeCls.get(this.keyId(kind, index, this.writeGen)));
  }

  /**
   * Asks for the write keys of these chunks that this device does not hold (one
   * audited request per MAX_BATCH), sharing requests already on their way. With
   * `stateSize`, the lease's draft first takes that device-state size.
   */
  async ensureWriteKeys(kind: ChunkKind, indices: number[], stateSize?: number): Promise<void> {
    const waits: Promise<void>[] = [];
    const todo: number[] = [];
    for (const i of indices) {
      const pending = this.keysInFlight.get(`w/${kind}/${i}`);
      if (pending) waits.push(pending);
      else if (stateSize !== undefined || !this.hasWriteKey(kind, i)) todo.push(i);
    }
    for (let at = 0; at < todo.length; at += MAX_BATCH) {
      const slice = todo.slice(at, at + MAX_BATCH);
      const p = this.requestKeys(
        slice.map((index) => ({ kind, index })),
        true,
        stateSize,
      );
      for (const i of slice) this.keysInFlight.set(`w/${kind}/${i}`, p);
      waits.push(
        p.finally(() => {
          for (const i of slice) this.keysInFlight.delete(`w/${kind}/${i}`);
        }),
      );
    }
    await Promise.all(waits);
  }

  /**
   * This chunk and its next neighbours (up to KEY_BATCH, within 4 × KEY_BATCH pages)
   * without a write key: batched into one audited request, as sensitive keys are.
   */
  private writeNeighbours(kind: ChunkKind, index: number): number[] {
    const count = Math.ceil(this.sizeOf(kind) / CHUNK_SIZE[kind]);
    const out = [index];
    for (let i = index + 1; out.length < KEY_BATCH && i < Math.min(count, index + 4 * KEY_BATCH); i++) {
      if (!this.hasWriteKey(kind, i) && !this.keysInFlight.has(`w/${kind}/${i}`)) out.push(i);
    }
    return out;
  }

  /** Derives the chunk key into the scratch buffer; false if this device holds no key for it. */
  private keyInto(kind: ChunkKind, index: number, e: Entry): boolean {
    // A key held for this very chunk: a released sensitive key, or a write key.
    const held = this.keys.withSensitiveKey(this.keyId(kind, index, e.gen), (k) => {
      if (!k) return false;
      this.scratch.set(k);
      return true;
    });
    if (held || e.cls === 'sensitive') return held;
    return this.keys.withClassKey(e.gen, (ck) => {
      if (!ck) return false;
      chunkKeyInto(this.scratch, ck, this.coord(kind, index, e));
      return true;
    });
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
   * Throws TAMPERED for a chunk that fails its checks twice (cache, then server).
   */
  async readInto(kind: ChunkKind, index: number, out: Buffer, opts: { resident?: boolean; writable?: boolean; from?: number } = {}): Promise<ReadSource> {
    await this.lease.whenActive();
    if (opts.writable && !this.hasWriteKey(kind, index) && !this.keysInFlight.has(`w/${kind}/${index}`)) {
      this.ensureWriteKeys(kind, this.writeNeighbours(kind, index)).catch(() => this.stats.writeKeyFailures++);
    }
    try {
      return await this.read(kind, index, out, opts.resident ?? false, opts.from);
    } catch (e) {
      wipe(out);
      throw e;
    }
  }

  /** How many plaintext bytes chunk `index` has (the last chunk of an image may be short). */
  private plainLength(kind: ChunkKind, index: number): number {
    return Math.min(CHUNK_SIZE[kind], this.must().sizes[kind] - index * CHUNK_SIZE[kind]);
  }

  /** readInto() of bytes [from, from + out.length) of a chunk (the disk path). */
  readRange(kind: ChunkKind, index: number, from: number, out: Buffer): Promise<ReadSource> {
    return this.readInto(kind, index, out, { from });
  }

  private async read(kind: ChunkKind, index: number, out: Buffer, resident: boolean, from?: number): Promise<ReadSource> {
    // A range outside the chunk is the caller's mistake: refused before any key is asked for.
    if (from !== undefined && (from < 0 || from + out.length > this.plainLength(kind, index))) {
      throw new RangeError(`range ${from}+${out.length} is outside ${kind} chunk ${index} (${this.plainLength(kind, index)} bytes)`);
    }
    this.stats.reads++;
    const e = this.entries[kind].get(index);
    if (!e) {
      out.fill(0);
      this.stats.zero++;
      if (resident) this.markResident(kind, index, this.classOf(kind, index) ?? 'sensitive', out.length);
      return 'zero';
    }
    const id = this.keyId(kind, index, e.gen);
    const checked = from === undefined ? undefined : this.checked.get(id, e.ctHash);
    let { blob, source } = checked ? { blob: checked, source: 'cache' as const } : await this.blob(kind, index, e);
    if (!this.keys.hasSensitiveKey(id)) {
      // A chunk this device wrote (before a restart, say) is keyed for the write
      // generation: its key comes as a write key. Others: sensitive keys by release.
      if (e.gen === this.writeGen && (e.cls === 'sensitive' || !this.keys.hasClassKey(e.gen))) await this.ensureWriteKeys(kind, [index]);
      else if (e.cls === 'sensitive') await this.fetchSensitiveKeys(kind, index, e.gen);
    }
    await this.lease.whenActive();
    for (let attempt = 0; ; attempt++) {
      if (!this.keyInto(kind, index, e)) throw new LetheError('LEASE_EXPIRED', `no key for ${kind} chunk ${index}: the lease ended`);
      try {
        if (from === undefined) decryptChunkInto(out, this.scratch, this.coord(kind, index, e), blob);
        else {
          if (!checked) {
            if (!verifyChunk(this.scratch, this.coord(kind, index, e), blob)) throw tampered();
            this.checked.put(id, e.ctHash, blob);
          }
          decryptChunkRangeInto(out, this.scratch, blob, from);
        }
        break;
      } catch (err) {
        if (source !== 'cache' || attempt > 0) {
          this.stats.tampered++;
          throw new LetheError('TAMPERED', `${kind} chunk ${index} failed authentication; refused`, { cause: err });
        }
        this.cache.drop(this.cacheKey(kind, index, e));
        ({ blob, source } = await this.blob(kind, index, e));
      } finally {
        wipe(this.scratch);
      }
    }
    if (source === 'cache') this.stats.fromCache++;
    else this.stats.fromServer++;
    if (resident) this.markResident(kind, index, e.cls, out.length);
    return source;
  }

  private markResident(kind: ChunkKind, index: number, cls: Sensitivity, bytes: number): void {
    const id = `${kind}/${index}`;
    if (this.residentSet.has(id)) return;
    this.residentSet.set(id, { cls, bytes });
    this.resident[cls] += bytes;
  }

  /**
   * Call after the caller dropped a resident plaintext copy. A sensitive
   * chunk's key goes with it, so the next read asks the server again.
   */
  evict(kind: ChunkKind, index: number): void {
    const id = `${kind}/${index}`;
    const r = this.residentSet.get(id);
    if (r) {
      this.residentSet.delete(id);
      this.resident[r.cls] -= r.bytes;
    }
    // Its read key and its write key both go: the ciphertext left is unreadable here.
    const e = this.entries[kind].get(index);
    if (e?.cls === 'sensitive') this.keys.dropSensitiveKey(this.keyId(kind, index, e.gen));
    if (this.writeGen !== undefined) this.keys.dropSensitiveKey(this.keyId(kind, index, this.writeGen));
    this.stats.evicted++;
  }

  /** Drops every sensitive key and resident-plaintext record (lease expiry, wipe). */
  evictAllSensitive(): void {
    for (const [id, r] of this.residentSet) {
      if (r.cls !== 'sensitive') continue;
      const [kind, index] = id.split('/');
      this.evict(kind as ChunkKind, Number(index));
    }
  }

  /**
   * Drops the sensitive and write keys of `kind` chunks held for `olderThanMs` or
   * longer whose plaintext is not resident and that `keep` does not name (a fault
   * being served): keys fetched for neighbours the guest did not touch in that
   * time, as a page's plaintext goes when it was not used. Returns how many went.
   */
  dropKeysWithoutPlaintext(kind: ChunkKind, olderThanMs: number, keep: (index: number) => boolean): number {
    const before = Date.now() - olderThanMs;
    const infix = `/${kind}/`;
    return this.keys.dropSensitiveKeysWhere((id, since) => {
      if (since > before) return false;
      // ids are gen/kind/index
      const at = id.indexOf(infix);
      if (at < 0) return false;
      const index = id.slice(at + infix.length);
      return !this.residentSet.has(`${kind}/${index}`) && !keep(Number(index));
    });
  }

  /**
   * A guest write: encrypts `data` under this chunk's write key (asked for
   * once per chunk, audited) and stores it in the cache as dirty. Throws
   * BAD_REQUEST for a write that does not fit the chunk.
   */
  async write(kind: ChunkKind, index: number, data: Buffer): Promise<void> {
    await this.lease.whenActive();
    const expect = this.plainLength(kind, index);
    if (index < 0 || expect <= 0 || data.length !== expect) {
      throw new LetheError('BAD_REQUEST', `write of ${data.length} bytes to ${kind} chunk ${index} does not fit (expected ${Math.max(expect, 0)})`);
    }
    await this.ensureWriteKeys(kind, [index]);
    this.adoptWrite(kind, index, this.storeWrite(kind, index, data));
  }

  /** Encrypts a write under its write key (held) into the cache as dirty; the caller adopts it once it stands. */
  private storeWrite(kind: ChunkKind, index: number, data: Buffer): { e: Entry; blob: Buffer } {
    const gen = this.writeGen!;
    const e: Entry = { gen, cls: this.writeCls.get(this.keyId(kind, index, gen))!, ctHash: '' };
    if (!this.keyInto(kind, index, e)) throw new LetheError('LEASE_EXPIRED', `no write key for ${kind} chunk ${index}: the lease ended`);
    try {
      const blob = encryptChunk(this.scratch, this.coord(kind, index, e), data);
      e.ctHash = sha256(blob).toString('base64url');
      this.cache.put(this.cacheKey(kind, index, e), blob, true, e.cls);
      return { e, blob };
    } finally {
      wipe(this.scratch);
    }
  }

  private adoptWrite(kind: ChunkKind, index: number, w: { e: Entry; blob: Buffer }): void {
    const old = this.entries[kind].get(index);
    this.entries[kind].set(index, w.e);
    // Encrypted here, so checked: a read of part of it decrypts only that part. The
    // blob it replaces (an older generation's) is not kept for nothing.
    if (old && old.gen !== w.e.gen) this.checked.delete(this.keyId(kind, index, old.gen));
    if (kind === 'disk') this.checked.put(this.keyId(kind, index, w.e.gen), w.e.ctHash, w.blob);
    this.stats.writes++;
  }

  /**
   * Replaces the device state with `state` (a suspend's new one, of any size):
   * the draft takes its size, and every chunk of it is written as dirty, in one
   * cache transaction: a crash leaves the old state or the whole new one.
   */
  async replaceState(state: Buffer): Promise<void> {
    const m = this.must();
    if (state.length === 0) throw new LetheError('BAD_REQUEST', 'an empty device state cannot replace the image\'s');
    await this.lease.whenActive();
    const count = Math.ceil(state.length / CHUNK_SIZE.state);
    await this.ensureWriteKeys('state', Array.from({ length: count }, (_, i) => i), state.length);
    const gen = this.writeGen!;
    const written = this.cache.batch(() => {
      // Dirty chunks of a larger state an earlier (failed) suspend wrote would be checked in past the end.
      for (const d of this.cache.dirtyChunks(m.imageId)) if (d.kind === 'state' && d.gen === gen && d.index >= count) this.cache.drop(d);
      return Array.from({ length: count }, (_, i) => {
        const w = this.storeWrite('state', i, state.subarray(i * CHUNK_SIZE.state, Math.min((i + 1) * CHUNK_SIZE.state, state.length)));
        crashPoint('agent.state-chunk-written');
        return w;
      });
    });
    this.manifest = { ...m, sizes: { ...m.sizes, state: state.length } };
    for (const index of [...this.entries.state.keys()]) if (index >= count) this.entries.state.delete(index);
    written.forEach((w, i) => this.adoptWrite('state', i, w));
  }

  /** Makes every write so far durable in the cache (FLUSH, FUA). */
  flush(): void {
    this.cache.flush();
  }

  /**
   * Uploads this lease's dirty chunks; the server checks each and commits
   * them as a new version, this device's own unless `shared` (docs/branches.md).
   * Marks them clean once committed.
   */
  async checkin(client: { checkin(leaseId: string, frames: Buffer, final: boolean): Promise<{ version: number; shared?: boolean }> }) {
    const m = this.must();
    const gen = this.writeGen;
    const dirty = gen === undefined ? [] : this.cache.dirtyChunks(m.imageId).filter((d) => d.gen === gen);
    if (dirty.length === 0) throw new LetheError('BAD_REQUEST', 'nothing to check in: no chunk was written since the last check-in');
    const leaseId = this.lease.leaseId();
    let part: Buffer[] = [];
    let bytes = 0;
    let result: { version: number; shared?: boolean } | undefined;
    for (let i = 0; i < dirty.length; i++) {
      const d = dirty[i];
      part.push(...encodeChunkFrame(d.kind, d.index, d.data));
      bytes += d.data.length + 13;
      const last = i === dirty.length - 1;
      if (last || bytes >= CHECKIN_PART_BYTES) {
        result = await client.checkin(leaseId, Buffer.concat(part), last);
        if (!last) crashPoint('agent.checkin-part-sent');
        part = [];
        bytes = 0;
      }
    }
    crashPoint('agent.checkin-committed');
    for (const d of dirty) this.cache.markClean(d);
    this.cache.flush();
    this.writeGen = undefined;
    // A server from before device branches made every check-in shared.
    return { version: result!.version, shared: result!.shared ?? true, chunks: dirty.length, bytes: dirty.reduce((n, d) => n + d.data.length, 0) };
  }

  /** Prefetches the ciphertext of every chunk not in the cache (no keys, no plaintext). */
  async prefetchAll(onProgress?: (done: number, total: number) => void, batch = 64): Promise<void> {
    const refs: ChunkRef[] = [];
    for (const kind of ['state', 'mem', 'disk'] as ChunkKind[]) for (const index of this.entries[kind].keys()) refs.push({ kind, index });
    await this.prefetchChunks(refs, { onProgress, batch });
  }

  /**
   * Brings these chunks' ciphertext into the cache, in this order, a batch per
   * request after any demand request (the fetcher's rule), at most `bandwidth`
   * bytes a second when given. Chunks cached or zero are skipped. Returns how many
   * it fetched. Stops quietly when the lease's manifest changes.
   */
  async prefetchChunks(
    refs: ChunkRef[],
    o: {
      onProgress?: (done: number, total: number) => void;
      /** Called with each batch once its chunks are cached (fetched now or before), and awaited. */
      onBatch?: (refs: ChunkRef[]) => Promise<void>;
      batch?: number;
      bandwidth?: number | null;
    } = {},
  ): Promise<number> {
    const m = this.must();
    const batch = o.batch ?? 64;
    const todo: { kind: ChunkKind; index: number; e: Entry }[] = [];
    for (const { kind, index } of refs) {
      const e = this.entries[kind].get(index);
      if (e) todo.push({ kind, index, e });
    }
    let done = refs.length - todo.length;
    o.onProgress?.(done, refs.length);
    const t0 = Date.now();
    let bytes = 0;
    let fetched = 0;
    for (let i = 0; i < todo.length; i += batch) {
      await this.lease.whenActive();
      if (this.manifest !== m) return fetched;
      // Checked per batch: a demand read may have brought a chunk meanwhile.
      const slice = todo.slice(i, i + batch).filter(({ kind, index, e }) => !this.cache.has(this.cacheKey(kind, index, e)));
      const blobs = slice.length ? await this.fetcher.prefetch(slice.map(({ kind, index }) => ({ kind, index }))) : [];
      for (const b of blobs) bytes += b.length;
      // A chunk that does not match is refused; a demand read will try again and report it.
      this.stats.tampered += this.keepMany(slice.map((c, j) => ({ ...c, blob: blobs[j] })));
      await o.onBatch?.(todo.slice(i, i + batch).map(({ kind, index }) => ({ kind, index })));
      fetched += slice.length;
      done += Math.min(batch, todo.length - i);
      o.onProgress?.(done, refs.length);
      // The cap: wait until the bytes so far fit the allowed rate.
      if (o.bandwidth) {
        const ahead = (bytes / o.bandwidth) * 1000 - (Date.now() - t0);
        if (ahead > 0) await new Promise((r) => setTimeout(r, ahead));
      }
    }
    return fetched;
  }

  destroy(): void {
    wipe(this.scratch);
    this.residentSet.clear();
  }
}
