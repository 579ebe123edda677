// Chunk blobs whose AEAD tag the agent has checked, kept in memory so that a
// read of part of a chunk decrypts that part only (docs/nbd.md, "Reads").
//
// Ciphertext only: nothing here is secret, so it is ordinary memory, bounded
// by bytes and dropped least recently used first. An entry is tied to the
// ciphertext hash the signed manifest names; when the manifest moves on (a
// write, a new version) the old blob is not served.
export class CheckedBlobs {
  private readonly blobs = new Map<string, { hash: string; blob: Buffer }>();
  private held = 0;

  constructor(readonly limitBytes: number) {}

  /** The checked blob of `id` if it is the one with ciphertext hash `hash`. */
  get(id: string, hash: string): Buffer | undefined {
    const hit = this.blobs.get(id);
    if (!hit) return undefined;
    this.blobs.delete(id);
    if (hit.hash !== hash) {
      this.held -= hit.blob.length;
      return undefined;
    }
    this.blobs.set(id, hit);
    return hit.blob;
  }

  /** Keeps a blob whose tag was just checked (or that this device just encrypted). */
  put(id: string, hash: string, blob: Buffer): void {
    this.delete(id);
    if (blob.length > this.limitBytes) return;
    // A view into a larger response would keep all of it alive: keep a copy of the blob alone.
    const own = blob.byteOffset === 0 && blob.byteLength === blob.buffer.byteLength ? blob : Buffer.from(blob);
    this.blobs.set(id, { hash, blob: own });
    this.held += own.length;
    for (const [old, v] of this.blobs) {
      if (this.held <= this.limitBytes) break;
      this.blobs.delete(old);
      this.held -= v.blob.length;
    }
  }

  delete(id: string): void {
    const hit = this.blobs.get(id);
    if (!hit) return;
    this.blobs.delete(id);
    this.held -= hit.blob.length;
  }

  clear(): void {
    this.blobs.clear();
    this.held = 0;
  }

  get bytes(): number {
    return this.held;
  }

  get count(): number {
    return this.blobs.size;
  }
}
