// Keys the agent holds: the lease's normal-class keys (one per generation) and
// sensitive chunk keys released one batch at a time. All live in one
// sodium_malloc slab (locked, guard-paged, excluded from core dumps) that is
// made inaccessible (mprotect PROT_NONE) whenever no key is being used, and is
// zeroed when the lease ends. A sensitive key is dropped with its page's
// plaintext, so a re-read needs a fresh, audited release.
import sodium from 'sodium-native';
import { KEY_BYTES } from '../common/constants.js';
import { wipe } from '../common/crypto.js';

const DEFAULT_SLOTS = 8192;
/** The ring grows by slabs of this many slots, up to MAX_SLABS (a 256 MiB guest's pages fit in 8). */
const MAX_SLABS = 64;

export class KeyRing {
  private readonly slabs: Buffer[] = [];
  private readonly free: number[] = [];
  private readonly classSlots = new Map<number, number>();
  private readonly sensitiveSlots = new Map<string, number>();
  /** When each sensitive key was stored (Date.now()). */
  private readonly sensitiveSince = new Map<string, number>();
  private openDepth = 0;

  constructor(readonly slabSlots = DEFAULT_SLOTS) {
    this.grow();
  }

  /** Adds a slab; call only while the ring is closed (openDepth 0) or from inside use(). */
  private grow(): void {
    const slab = sodium.sodium_malloc(this.slabSlots * KEY_BYTES);
    const base = this.slabs.length * this.slabSlots;
    this.slabs.push(slab);
    for (let i = this.slabSlots - 1; i >= 0; i--) this.free.push(base + i);
    if (this.openDepth === 0) sodium.sodium_mprotect_noaccess(slab);
  }

  /** Runs `fn` with the slabs readable and writable; closes them again after. */
  private use<T>(fn: () => T): T {
    if (this.openDepth++ === 0) for (const s of this.slabs) sodium.sodium_mprotect_readwrite(s);
    try {
      return fn();
    } finally {
      if (--this.openDepth === 0) for (const s of this.slabs) sodium.sodium_mprotect_noaccess(s);
    }
  }

  private slot(i: number): Buffer {
    const slab = this.slabs[Math.floor(i / this.slabSlots)];
    const at = (i % this.slabSlots) * KEY_BYTES;
    return slab.subarray(at, at + KEY_BYTES);
  }

  private take(src: Uint8Array): number {
    if (this.free.length === 0) {
      if (this.slabs.length >= MAX_SLABS) throw new Error('key ring is full');
      this.grow();
    }
    const i = this.free.pop()!;
    this.slot(i).set(src);
    return i;
  }

  private release(i: number): void {
    sodium.sodium_memzero(this.slot(i));
    this.free.push(i);
  }

  /** Stores a class key (copied; the caller wipes its own copy). */
  setClassKey(gen: number, key: Uint8Array): void {
    this.put(this.classSlots, gen, key);
  }

  hasClassKey(gen: number): boolean {
    return this.classSlots.has(gen);
  }

  /** Stores a sensitive chunk key or a write key (copied; the caller wipes its own copy). */
  setSensitiveKey(id: string, key: Uint8Array): void {
    this.put(this.sensitiveSlots, id, key);
    this.sensitiveSince.set(id, Date.now());
  }

  private put<K>(slots: Map<K, number>, id: K, key: Uint8Array): void {
    this.use(() => {
      const old = slots.get(id);
      if (old !== undefined) this.release(old);
      slots.set(id, this.take(key));
    });
  }

  hasSensitiveKey(id: string): boolean {
    return this.sensitiveSlots.has(id);
  }

  /** Forgets one sensitive key (its page was evicted). */
  dropSensitiveKey(id: string): boolean {
    const i = this.sensitiveSlots.get(id);
    if (i === undefined) return false;
    this.use(() => this.release(i));
    this.sensitiveSlots.delete(id);
    this.sensitiveSince.delete(id);
    return true;
  }

  /** Forgets every sensitive key `drop` picks by its id and the time it was stored; returns how many. */
  dropSensitiveKeysWhere(drop: (id: string, since: number) => boolean): number {
    const ids = [...this.sensitiveSince].filter(([id, since]) => drop(id, since)).map(([id]) => id);
    if (ids.length === 0) return 0;
    this.use(() => {
      for (const id of ids) this.release(this.sensitiveSlots.get(id)!);
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
    return this.use(() => fn(i === undefined ? undefined : this.slot(i)));
  }

  withSensitiveKey<T>(id: string, fn: (key: Buffer | undefined) => T): T {
    const i = this.sensitiveSlots.get(id);
    return this.use(() => fn(i === undefined ? undefined : this.slot(i)));
  }

  counts(): { classKeys: number; sensitiveKeys: number } {
    return { classKeys: this.classSlots.size, sensitiveKeys: this.sensitiveSlots.size };
  }

  /** Zeroes every key (lease ended, revoked, wiped). The ring stays usable. */
  zeroAll(): void {
    this.use(() => {
      for (const s of this.slabs) sodium.sodium_memzero(s);
    });
    this.classSlots.clear();
    this.sensitiveSlots.clear();
    this.sensitiveSince.clear();
    this.free.length = 0;
    for (let i = this.slabs.length * this.slabSlots - 1; i >= 0; i--) this.free.push(i);
  }

  /** For tests: true when every byte of every slab is zero. */
  isAllZero(): boolean {
    return this.use(() => this.slabs.every((s) => s.every((b) => b === 0)));
  }

  destroy(): void {
    this.zeroAll();
    for (const s of this.slabs) {
      sodium.sodium_mprotect_readwrite(s);
      wipe(s);
    }
  }
}
