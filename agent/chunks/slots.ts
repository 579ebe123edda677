// The free slots of one of the chunk cache's slot files (cache.ts): a slot a dirty
// chunk left is reused only after the next flush made the index that left it durable.
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
    this.free.push(...this.held);
    this.held = [];
  }

  /** Every slot below `next` not in use is free (at open). */
  rebuild(inUse: Set<number>): void {
    this.next = 0;
    for (const s of inUse) if (s >= this.next) this.next = s + 1;
    for (let s = this.next - 1; s >= 0; s--) if (!inUse.has(s)) this.free.push(s);
  }
}
