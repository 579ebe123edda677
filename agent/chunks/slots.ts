// The free slots of one of the chunk cache's slot files (cache.ts): a slot a dirty
// chunk left is reused only after the index that left it is durable: after the next
// flush, or after settleHeld() made it so in the background.
import fs from 'node:fs';
import { CHUNK_KINDS, type ChunkKind } from '../../common/constants.js';

/** The free slots of one slot file. */
export class Slots {
  /** Free below `next`, reusable now. */
  private readonly free: number[] = [];
  /** Left by dirty chunks: reusable once a flush made the index that left them durable. */
  private held: number[] = [];
  next = 0;

  take(): number {
    return this.free.pop() ?? this.next++;
  }

  give(slot: number, afterFlush: boolean): void {
    if (afterFlush) this.held.push(slot);
    else this.free.push(slot);
  }

  flushed(): void {
    this.reuse(this.takeHeld());
  }

  get heldCount(): number {
    return this.held.length;
  }

  /** The held slots, taken out to be reused once what left them is durable (reuse()). */
  takeHeld(): number[] {
    const h = this.held;
    this.held = [];
    return h;
  }

  reuse(slots: number[]): void {
    for (const s of slots) this.free.push(s);
  }

  /** Every slot below `next` not in use is free (at open). */
  rebuild(inUse: { has(slot: number): boolean; keys(): Iterable<number> }): void {
    this.next = 0;
    for (const s of inUse.keys()) if (s >= this.next) this.next = s + 1;
    for (let s = this.next - 1; s >= 0; s--) if (!inUse.has(s)) this.free.push(s);
  }
}

/**
 * Held slots past this many bytes (with the stale clean blobs waiting on the same
 * syncs: ChunkCache.supersede) are settled: a long run of guest writes without a
 * flush (a copy onto the disk) reuses the slots its own earlier writes left, instead
 * of growing the slot files by every byte written. Reusing them also writes into pages
 * the page cache already holds: growing the file was a third of the agent's time in
 * such a run.
 */
export const SETTLE_HELD_BYTES = 16 * 1024 * 1024;

/**
 * Once the held slots of every kind, with `alsoBytes` more waiting on the same syncs
 * (the clean blobs writes made stale: ChunkCache.supersede), pass SETTLE_HELD_BYTES:
 * takes the held slots out, makes the index rows that left them durable as flush()
 * does but off the event loop (fsync of the slot files, then of the index's WAL, where
 * those rows already stand), and then frees them. Resolves true once that is done;
 * false when a sync failed, which leaves them out of use. Undefined when under the mark.
 */
export function settleHeld(slots: Record<ChunkKind, Slots>, fds: Record<ChunkKind, number>, slotBytes: Record<ChunkKind, number>, wal: string, alsoBytes = 0): Promise<boolean> | undefined {
  if (CHUNK_KINDS.reduce((n, k) => n + slots[k].heldCount * slotBytes[k], alsoBytes) < SETTLE_HELD_BYTES) return undefined;
  const held = CHUNK_KINDS.map((k) => slots[k].takeHeld());
  const sync = (fd: number) => new Promise<void>((done, fail) => fs.fsync(fd, (e) => (e ? fail(e) : done())));
  return Promise.all(CHUNK_KINDS.map((k) => sync(fds[k])))
    .then(async () => {
      // SQLite in WAL mode with synchronous = NORMAL syncs the WAL only at a checkpoint:
      // this syncs it now. A checkpoint in between has synced what it moved.
      const f = await fs.promises.open(wal, 'r');
      try {
        await f.sync();
      } finally {
        await f.close();
      }
    })
    .then(
      () => {
        CHUNK_KINDS.forEach((k, i) => slots[k].reuse(held[i]));
        return true;
      },
      () => false,
    );
}
