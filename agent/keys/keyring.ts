// Keys the agent holds: the lease's normal-class keys (one per generation) and
// sensitive chunk keys released one batch at a time. They live in sodium_malloc
// slabs (locked, guard-paged, excluded from core dumps), each made inaccessible
// (mprotect PROT_NONE) whenever none of its keys is being used, and zeroed when
// the lease ends. A sensitive key is dropped with its page's plaintext, so a
// re-read needs a fresh, audited release.
//
// Slabs are small (4 pages) and only the slab holding a key is opened: an
// mprotect pair costs ~4 µs on 4 pages and ~21 µs on 64 here (it flushes each
// page's TLB entry on every core), and a fault opens one key.
//
// Write keys live in slabs of their own, and such a slab, once opened for a use,
// stays open until the end of the event loop's turn (a setImmediate): a copy onto
// the disk uses a write key a chunk, and an mprotect pair for each, with the TLB
// shootdown it sends to the other core, was 9% of the agent's CPU in that copy. A
// turn's writes now share one pair (about seven writes a pair in a 1 GiB copy).
// Read keys, class keys and sensitive keys still open and close around each use,
// and never share a slab with a write key.
import sodium from 'sodium-native';
import { KEY_BYTES, KEY_RING_MAX_KEYS, KEY_SLAB_SLOTS } from '../../common/constants.js';


export class KeyRing {
  private readonly slabs: Buffer[] = [];
  /** Whether each slab holds write keys (and only those); an empty slab may change sides (take()). */
  private readonly writeSlab: boolean[] = [];
  /** How many of each slab's slots hold a key. */
  private readonly used: number[] = [];
  /** How many use() calls have each slab open (a write slab kept open for the turn counts one). */
  private readonly openDepth: number[] = [];
  /** Free slots of read slabs, then of write slabs. */
  private readonly free: number[] = [];
  private readonly freeWrite: number[] = [];
  /** Write slabs kept open until the end of this turn. */
  private readonly openForTurn = new Set<number>();
  private readonly classSlots = new Map<number, number>();
  private readonly sensitiveSlots = new Map<string, number>();
  /** When each sensitive key was stored (Date.now()). */
  private readonly sensitiveSince = new Map<string, number>();

  constructor(
    readonly slabSlots = KEY_SLAB_SLOTS,
    private readonly maxKeys = KEY_RING_MAX_KEYS,
  ) {
    this.grow(false);
  }

  private grow(write: boolean): void {
    const slab = sodium.sodium_malloc(this.slabSlots * KEY_BYTES);
    this.slabs.push(slab);
    this.writeSlab.push(write);
    this.used.push(0);
    this.openDepth.push(0);
    this.freeAll(this.slabs.length - 1);
    sodium.sodium_mprotect_noaccess(slab);
  }

  /** The free slots of read slabs, or of write slabs. */
  private freeList(write: boolean): number[] {
    return write ? this.freeWrite : this.free;
  }

  /** Every slot of slab `n` to its side's free list (the slab holds no key). */
  private freeAll(n: number): void {
    const free = this.freeList(this.writeSlab[n]);
    for (let i = this.slabSlots - 1; i >= 0; i--) free.push(n * this.slabSlots + i);
  }

  /** Runs `fn` with the slabs holding these slots readable and writable; closes them again after. */
  private use<T>(slots: Iterable<number>, fn: () => T): T {
    const opened = new Set<number>();
    for (const i of slots) opened.add(Math.floor(i / this.slabSlots));
    for (const s of opened) this.open(s);
    try {
      return fn();
    } finally {
      for (const s of opened) this.close(s);
    }
  }

  /** use() for the one slot a key lives in (the fault path: no set to build). */
  private useOne<T>(slot: number, fn: () => T): T {
    return this.useSlab(Math.floor(slot / this.slabSlots), fn);
  }

  /** Runs `fn` with slab `n` readable and writable; `forTurn` false: closed at once, a write slab too. */
  private useSlab<T>(n: number, fn: () => T, forTurn = true): T {
    this.open(n);
    try {
      return fn();
    } finally {
      this.close(n, forTurn);
    }
  }

  private open(slab: number): void {
    if (this.openDepth[slab]++ === 0) sodium.sodium_mprotect_readwrite(this.slabs[slab]);
  }

  private close(slab: number, forTurn = true): void {
    if (forTurn && this.openDepth[slab] === 1 && this.writeSlab[slab] && !this.openForTurn.has(slab)) {
      // The turn's other writes use it without an mprotect pair of their own.
      if (this.openForTurn.add(slab).size === 1) setImmediate(() => this.closeTurn());
      return;
    }
    if (--this.openDepth[slab] === 0) sodium.sodium_mprotect_noaccess(this.slabs[slab]);
  }

  /** Closes the write slabs kept open for the turn that ended. */
  private closeTurn(): void {
    const slabs = [...this.openForTurn];
    this.openForTurn.clear();
    for (const slab of slabs) if (--this.openDepth[slab] === 0) sodium.sodium_mprotect_noaccess(this.slabs[slab]);
  }

  private slot(i: number): Buffer {
    const slab = this.slabs[Math.floor(i / this.slabSlots)];
    const at = (i % this.slabSlots) * KEY_BYTES;
    return slab.subarray(at, at + KEY_BYTES);
  }

  /**
   * A free slot of a read or a write slab, growing the ring if needed, or else taking an
   * empty, closed slab of the other side: the limit is on keys of both sides together.
   * The caller opens its slab before writing it.
   */
  private alloc(write = false): number {
    const free = this.freeList(write);
    if (free.length === 0) {
      if ((this.slabs.length + 1) * this.slabSlots <= this.maxKeys) this.grow(write);
      else this.take(write);
    }
    const i = free.pop()!;
    this.used[Math.floor(i / this.slabSlots)]++;
    return i;
  }

  /**
   * Moves an empty slab of the other side, in use by no call, to this side (closing it
   * first if it was kept open for the turn); throws when there is none.
   */
  private take(write: boolean): void {
    const idle = (s: number) => this.openDepth[s] === 0 || (this.openDepth[s] === 1 && this.openForTurn.has(s));
    const n = this.slabs.findIndex((_, s) => this.writeSlab[s] !== write && this.used[s] === 0 && idle(s));
    if (n < 0) throw new Error('key ring is full');
    if (this.openForTurn.delete(n)) {
      this.openDepth[n] = 0;
      sodium.sodium_mprotect_noaccess(this.slabs[n]);
    }
    const from = this.freeList(!write);
    let kept = 0;
    for (const i of from) if (Math.floor(i / this.slabSlots) !== n) from[kept++] = i;
    from.length = kept;
    this.writeSlab[n] = write;
    this.freeAll(n);
  }

  /** A slot back to its free list (never written, or zeroed). */
  private unalloc(i: number): void {
    const n = Math.floor(i / this.slabSlots);
    this.used[n]--;
    this.freeList(this.writeSlab[n]).push(i);
  }

  /** Zeroes a slot and frees it; its slab must be open. */
  private release(i: number): void {
    sodium.sodium_memzero(this.slot(i));
    this.unalloc(i);
  }

  /** Stores a class key (copied; the caller wipes its own copy). */
  setClassKey(gen: number, key: Uint8Array): void {
    this.put(this.classSlots, gen, key);
  }

  hasClassKey(gen: number): boolean {
    return this.classSlots.has(gen);
  }

  private put<K>(slots: Map<K, number>, id: K, key: Uint8Array): void {
    const old = slots.get(id);
    const i = this.alloc();
    this.use(old === undefined ? [i] : [i, old], () => {
      this.slot(i).set(key);
      if (old !== undefined) this.release(old);
    });
    slots.set(id, i);
  }

  /**
   * Stores sensitive chunk keys, or with `write` write keys (copied; the caller wipes
   * its own copy): `keys` holds them back to back, in the order of `ids`. All or none:
   * a ring that fills part way keeps none of them.
   */
  setSensitiveKeys(ids: string[], keys: Uint8Array, write = false): void {
    const now = Date.now();
    const slots: number[] = [];
    try {
      for (let j = 0; j < ids.length; j++) slots.push(this.alloc(write));
    } catch (e) {
      for (const i of slots) this.unalloc(i); // never written: still zero
      throw e;
    }
    const old = ids.map((id) => this.sensitiveSlots.get(id)).filter((i): i is number => i !== undefined);
    this.use([...slots, ...old], () => {
      slots.forEach((i, j) => this.slot(i).set(keys.subarray(j * KEY_BYTES, (j + 1) * KEY_BYTES)));
      for (const i of old) this.release(i);
    });
    ids.forEach((id, j) => {
      this.sensitiveSlots.set(id, slots[j]);
      this.sensitiveSince.set(id, now);
    });
  }

  hasSensitiveKey(id: string): boolean {
    return this.sensitiveSlots.has(id);
  }

  /** Forgets one sensitive key (its page was evicted). */
  dropSensitiveKey(id: string): boolean {
    const i = this.sensitiveSlots.get(id);
    if (i === undefined) return false;
    this.useOne(i, () => this.release(i));
    this.sensitiveSlots.delete(id);
    this.sensitiveSince.delete(id);
    return true;
  }

  /** Forgets every sensitive key `drop` picks by its id and the time it was stored; returns how many. */
  dropSensitiveKeysWhere(drop: (id: string, since: number) => boolean): number {
    const ids: string[] = [];
    for (const [id, since] of this.sensitiveSince) if (drop(id, since)) ids.push(id);
    if (ids.length === 0) return 0;
    const slots = ids.map((id) => this.sensitiveSlots.get(id)!);
    this.use(slots, () => {
      for (const i of slots) this.release(i);
    });
    for (const id of ids) {
      this.sensitiveSlots.delete(id);
      this.sensitiveSince.delete(id);
    }
    return ids.length;
  }

  /** Calls `fn` with the class key of `gen` (or undefined); the key must not escape `fn`. */
  withClassKey<T>(gen: number, fn: (key: Buffer | undefined) => T): T {
    const i = this.classSlots.get(gen);
    if (i === undefined) return fn(undefined);
    return this.useOne(i, () => fn(this.slot(i)));
  }

  withSensitiveKey<T>(id: string, fn: (key: Buffer | undefined) => T): T {
    const i = this.sensitiveSlots.get(id);
    if (i === undefined) return fn(undefined);
    return this.useOne(i, () => fn(this.slot(i)));
  }

  counts(): { classKeys: number; sensitiveKeys: number } {
    return { classKeys: this.classSlots.size, sensitiveKeys: this.sensitiveSlots.size };
  }

  /** Told when every key is zeroed, so that copies held elsewhere (native/disk-reads.ts) go with them. */
  private readonly zeroHooks: (() => void)[] = [];

  onZeroAll(fn: () => void): void {
    this.zeroHooks.push(fn);
  }

  /** Zeroes every key (lease ended, revoked, wiped). The ring stays usable. */
  zeroAll(): void {
    for (const fn of this.zeroHooks) fn();
    this.slabs.forEach((s, n) => this.useSlab(n, () => sodium.sodium_memzero(s), false));
    this.classSlots.clear();
    this.sensitiveSlots.clear();
    this.sensitiveSince.clear();
    this.free.length = 0;
    this.freeWrite.length = 0;
    this.used.fill(0);
    for (let n = this.slabs.length - 1; n >= 0; n--) this.freeAll(n);
  }

  /** For tests: true when every byte of every slab is zero. */
  isAllZero(): boolean {
    return this.slabs.every((s, n) => this.useSlab(n, () => s.every((b) => b === 0), false));
  }

  /** Zeroes every key; the slabs stay closed (PROT_NONE) until the GC frees them (a write slab used this turn: from the turn's end). */
  destroy(): void {
    this.zeroAll();
  }
}
