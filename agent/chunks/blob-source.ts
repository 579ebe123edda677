// Where a chunk's ciphertext comes from: the cache when its hash matches the signed
// manifest, else the server (then cached), with readahead for guest RAM read in
// order and one fetch shared by every read that wants the same chunk; and the
// background prefetch, which fills the cache in a given order under a rate cap.
import { CHUNK_OVERHEAD, CHUNK_SIZE, type ChunkKind } from '../../common/constants.js';
import { sha256 } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';
import type { LeaseKeeper } from '../keys/lease-keeper.js';
import type { ChunkRef, Fetcher } from '../remote/fetcher.js';
import type { CacheKey, ChunkCache } from './cache.js';
import { keyId, type ChunkMap, type Entry } from './chunk-map.js';

export type ReadSource = 'zero' | 'cache' | 'server';

/** A chunk from the server, and whether it matched the manifest (and went to the cache). */
type Fetched = { blob: Buffer; ok: boolean };

/** Spare blob buffers kept for reuse (as many as reads usually run at once). */
const SPARES_KEPT = 16;
/**
 * Chunks fetched ahead in one request when a kind is read in order: 16 guest pages
 * (64 KiB), 8 disk chunks (1 MiB), as a disk's readahead does. The device state is
 * read whole at resume anyway.
 */
const READAHEAD: Record<ChunkKind, number> = { mem: 16, disk: 8, state: 1 };

export interface PrefetchOptions {
  onProgress?: (done: number, total: number) => void;
  /** Called with each batch once its chunks are cached (fetched now or before), and awaited. */
  onBatch?: (refs: ChunkRef[]) => Promise<void>;
  batch?: number;
  bandwidth?: number | null;
}

export class BlobSource {
  /** Chunks on their way from the server (cached when they come), by key id: a read of one waits for it. */
  private readonly inFlight = new Map<string, Promise<Fetched>>();
  /** Buffers for blobs read from the cache, reused: a read of a 128 KiB chunk allocates nothing. */
  private readonly spares: Buffer[] = [];

  constructor(
    private readonly map: ChunkMap,
    private readonly cache: ChunkCache,
    private readonly fetcher: Fetcher,
    private readonly lease: LeaseKeeper,
    private readonly stats: { tampered: number; readahead: number },
  ) {}

  /**
   * The blob of a chunk: the cache's if it matches the manifest, else the server's
   * (then cached). A cached blob is read into `into` when given (see spare()).
   */
  async blob(kind: ChunkKind, index: number, e: Entry, into?: Buffer): Promise<{ blob: Buffer; source: ReadSource }> {
    const ck = this.map.cacheKey(kind, index, e);
    // The stored hash is compared with the signed manifest; damage to the data
    // itself fails the AEAD tag, and the chunk is then fetched again (drop()).
    const cached = this.cache.getWithHash(ck, false, into);
    if (cached && cached.sha256.toString('base64url') === e.ctHash) return { blob: cached.data, source: 'cache' };
    if (cached) this.cache.drop(ck);
    const fetched = await (this.inFlight.get(keyId(kind, index, e.gen)) ?? this.fetchWithReadahead(kind, index, e));
    if (!fetched.ok) {
      this.stats.tampered++;
      throw new LetheError('TAMPERED', `${kind} chunk ${index} from the server does not match the signed manifest; refused`);
    }
    return { blob: fetched.blob, source: 'server' };
  }

  /**
   * A buffer for one read's cached blob (ciphertext, so ordinary memory), to hand back
   * with giveBack() once nothing refers to the blob: a blob kept past the read (the
   * checked-blob memory) is copied out of it first.
   */
  spare(): Buffer {
    return this.spares.pop() ?? Buffer.allocUnsafe(CHUNK_SIZE.disk + CHUNK_OVERHEAD);
  }

  giveBack(b: Buffer): void {
    if (this.spares.length < SPARES_KEPT) this.spares.push(b);
  }

  /** Forgets the cached blob of a chunk that failed its tag. */
  drop(kind: ChunkKind, index: number, e: Entry): void {
    this.cache.drop(this.map.cacheKey(kind, index, e));
  }

  /** Caches a blob from the server if it matches the signed manifest; tells whether it did. */
  private keep(kind: ChunkKind, index: number, e: Entry, blob: Buffer): boolean {
    const hash = sha256(blob);
    if (hash.toString('base64url') !== e.ctHash) return false;
    this.cache.put(this.map.cacheKey(kind, index, e), blob, false, undefined, hash);
    return true;
  }

  /** keep() of a batch in one cache transaction; how many did not match their manifest entry. */
  private keepMany(items: { kind: ChunkKind; index: number; e: Entry; blob: Buffer }[]): number {
    const good: { k: CacheKey; blob: Buffer; hash: Buffer }[] = [];
    for (const { kind, index, e, blob } of items) {
      const hash = sha256(blob);
      if (hash.toString('base64url') === e.ctHash) good.push({ k: this.map.cacheKey(kind, index, e), blob, hash });
    }
    this.cache.putMany(good);
    return items.length - good.length;
  }

  /**
   * Fetches a chunk into the cache; when its kind is being read in order (the chunk
   * before is cached), the next READAHEAD[kind] chunks not cached come too, as a
   * disk's readahead does, in a request right behind this chunk's (on a slow link
   * 15 pages more would add a quarter of a round trip to the fault). Reads of any
   * of them wait for their own fetch.
   */
  private fetchWithReadahead(kind: ChunkKind, index: number, e: Entry): Promise<Fetched> {
    const entries = this.map.entries[kind];
    const refs = [index];
    const prev = entries.get(index - 1);
    const ahead = READAHEAD[kind];
    if (ahead > 1 && prev && this.cache.has(this.map.cacheKey(kind, index - 1, prev))) {
      for (let i = index + 1; refs.length < ahead && i < index + 2 * ahead; i++) {
        const n = entries.get(i);
        if (n && !this.inFlight.has(keyId(kind, i, n.gen)) && !this.cache.has(this.map.cacheKey(kind, i, n))) refs.push(i);
      }
    }
    const fetches = refs.map((i) => {
      const n = i === index ? e : entries.get(i)!;
      const id = keyId(kind, i, n.gen);
      const p = this.fetcher.demand({ kind, index: i }, i !== index).then((blob) => ({ blob, ok: this.keep(kind, i, n, blob) }));
      this.inFlight.set(id, p);
      // A readahead page that fails is left for its own read to fetch again and refuse.
      p.catch(() => {}).finally(() => this.inFlight.delete(id));
      return p;
    });
    this.stats.readahead += refs.length - 1;
    return fetches[0];
  }

  /**
   * Brings these chunks' ciphertext into the cache, in this order, in requests
   * paced to the link: as many chunks a request and requests in flight as the
   * fetcher's pace() says (`batch` caps a request; fewer in flight while a demand
   * request is out, the fetcher's rule), each request's chunks kept, and handed to `onBatch`, in order.
   * At most `bandwidth` bytes a second when given. Chunks cached or zero are
   * skipped. Returns how many it fetched. Stops quietly when the lease's manifest
   * changes.
   */
  async prefetch(refs: ChunkRef[], o: PrefetchOptions = {}): Promise<number> {
    const m = this.map.must();
    const cap = o.batch;
    type Todo = { kind: ChunkKind; index: number; e: Entry };
    const todo: Todo[] = [];
    for (const { kind, index } of refs) {
      const e = this.map.entries[kind].get(index);
      if (e) todo.push({ kind, index, e });
    }
    let done = refs.length - todo.length;
    o.onProgress?.(done, refs.length);
    const t0 = Date.now();
    let bytes = 0;
    let fetched = 0;
    /** Requests out, oldest first: the chunks they cover, those asked for, and the answer. */
    const out: { all: Todo[]; slice: Todo[]; blobs: Promise<Buffer[]> }[] = [];
    let at = 0;
    for (;;) {
      const { batch, depth, beside } = this.fetcher.link.pace(CHUNK_SIZE[todo[at]?.kind ?? 'mem'] + CHUNK_OVERHEAD, cap);
      while (at < todo.length && out.length < depth) {
        await this.lease.whenActive();
        if (this.map.manifest !== m) return fetched;
        const all = todo.slice(at, at + batch);
        at += all.length;
        // Checked per request: a demand read may have brought a chunk meanwhile.
        const slice = all.filter(({ kind, index, e }) => !this.cache.has(this.map.cacheKey(kind, index, e)));
        const blobs = slice.length ? this.fetcher.prefetch(slice.map(({ kind, index }) => ({ kind, index })), beside) : Promise.resolve([]);
        blobs.catch(() => {}); // awaited in its turn below
        out.push({ all, slice, blobs });
      }
      const next = out.shift();
      if (!next) return fetched;
      const blobs = await next.blobs;
      if (this.map.manifest !== m) return fetched;
      for (const b of blobs) bytes += b.length;
      // A chunk that does not match is refused; a demand read will try again and report it.
      this.stats.tampered += this.keepMany(next.slice.map((c, j) => ({ ...c, blob: blobs[j] })));
      await o.onBatch?.(next.all.map(({ kind, index }) => ({ kind, index })));
      fetched += next.slice.length;
      done += next.all.length;
      o.onProgress?.(done, refs.length);
      // The cap: wait until the bytes so far fit the allowed rate.
      if (o.bandwidth) {
        const ahead = (bytes / o.bandwidth) * 1000 - (Date.now() - t0);
        if (ahead > 0) await new Promise((r) => setTimeout(r, ahead));
      }
    }
  }
}
