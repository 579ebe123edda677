// Chunk blobs whose AEAD tag the agent has checked, kept in memory so that a
// read of part of a chunk decrypts that part only (docs/nbd.md, "Reads").
//
// Ciphertext only: nothing here is secret, so it is ordinary memory, bounded by
// bytes. An entry is tied to the blob's name in the chunk map (ctHash); when
// the manifest moves on (a write, a new version) the old blob is not served.
//
// Scan-resistant (2Q): a blob comes in on probation, a FIFO, and when memory is
// full and probation holds over a quarter of it, the oldest on probation leave,
// remembered by id only. One asked for again after it left comes back into the
// main part, kept least recently used first.
// A sequential pass over a disk larger than the memory goes through probation and
// leaves the blobs the guest reads again and again where they were. Reads of one
// blob in quick succession (4 KiB reads of a 128 KiB chunk) are hits on probation
// and promote nothing.
interface Kept {
  hash: string;
  blob: Buffer;
  /** Checked by a read (its tag), not encrypted here: the one kind onLeave() is told of. */
  read: boolean;
}

/** The share of the bytes probation may hold. */
const PROBATION_SHARE = 0.25;
/** Ids remembered after they left probation, at most. */
const GHOSTS_MAX = 65_536;

export class CheckedBlobs {
  /** On probation, oldest first. */
  private readonly probation = new Map<string, Kept>();
  /** The main part, least recently used first. */
  private readonly main = new Map<string, Kept>();
  /** Ids that left probation, oldest first. */
  private readonly ghosts = new Set<string>();
  private probationBytes = 0;
  private mainBytes = 0;
  /** Blobs that came back from a ghost into the main part. */
  promoted = 0;

  /** `onLeave`: told of each blob checked by a read as it leaves for want of room (or clear()), not when it goes stale. */
  constructor(
    readonly limitBytes: number,
    private readonly onLeave?: (id: string, hash: string, blob: Buffer) => void,
  ) {}

  /** The checked blob of `id` if it is the one with ciphertext hash `hash`. */
  get(id: string, hash: string): Buffer | undefined {
    const onProbation = this.probation.get(id);
    const hit = onProbation ?? this.main.get(id);
    if (!hit) return undefined;
    if (hit.hash !== hash) {
      this.delete(id);
      return undefined;
    }
    if (!onProbation) {
      this.main.delete(id);
      this.main.set(id, hit);
    }
    return hit.blob;
  }

  /**
   * Keeps a blob whose tag a read just checked (`read`), or that this device just
   * encrypted. A `borrowed` blob lives in a buffer the caller reuses: a kept one is a
   * copy. A read blob too large to keep leaves at once (onLeave).
   */
  put(id: string, hash: string, blob: Buffer, o: { read?: boolean; borrowed?: boolean } = {}): void {
    const read = o.read ?? false;
    this.delete(id);
    if (blob.length > this.limitBytes) {
      if (read) this.onLeave?.(id, hash, blob);
      return;
    }
    // A view into a larger response would keep all of it alive: keep a copy of the blob alone.
    const own = !o.borrowed && blob.byteOffset === 0 && blob.byteLength === blob.buffer.byteLength ? blob : Buffer.from(blob);
    if (this.ghosts.delete(id)) {
      this.main.set(id, { hash, blob: own, read });
      this.mainBytes += own.length;
      this.promoted++;
    } else {
      this.probation.set(id, { hash, blob: own, read });
      this.probationBytes += own.length;
    }
    this.fit();
  }

  /**
   * Within the limit: while probation holds more than its share its oldest go, to the
   * ghosts; else the main part's least recently used. Nothing goes while there is room.
   */
  private fit(): void {
    const probationCap = this.limitBytes * PROBATION_SHARE;
    while (this.bytes > this.limitBytes) {
      const fromProbation = this.probationBytes > probationCap || this.main.size === 0;
      const [id, v] = (fromProbation ? this.probation : this.main).entries().next().value as [string, Kept];
      if (fromProbation) {
        this.probation.delete(id);
        this.probationBytes -= v.blob.length;
        this.ghosts.add(id);
      } else {
        this.main.delete(id);
        this.mainBytes -= v.blob.length;
      }
      if (v.read) this.onLeave?.(id, v.hash, v.blob);
    }
    for (const id of this.ghosts) {
      if (this.ghosts.size <= GHOSTS_MAX) break;
      this.ghosts.delete(id);
    }
  }

  /** Whether a blob of `id` is kept (of any hash). */
  has(id: string): boolean {
    return this.probation.has(id) || this.main.has(id);
  }

  delete(id: string): void {
    const p = this.probation.get(id);
    if (p) {
      this.probation.delete(id);
      this.probationBytes -= p.blob.length;
    }
    const m = this.main.get(id);
    if (m) {
      this.main.delete(id);
      this.mainBytes -= m.blob.length;
    }
  }

  clear(): void {
    for (const [id, v] of [...this.probation, ...this.main]) if (v.read) this.onLeave?.(id, v.hash, v.blob);
    this.probation.clear();
    this.main.clear();
    this.ghosts.clear();
    this.probationBytes = 0;
    this.mainBytes = 0;
  }

  get bytes(): number {
    return this.probationBytes + this.mainBytes;
  }

  get count(): number {
    return this.probation.size + this.main.size;
  }
}
