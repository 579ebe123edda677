// One kind's chunks in the chunk map: the manifest's, kept packed as they came
// (common/manifest.ts: 41 bytes a chunk), with this device's writes laid over them.
// A disk of 128 GiB lists a million chunks; as a Map of entry objects and base64
// strings they took about 150 bytes each, and the parsed JSON they came from as much
// again. Read like a Map: an entry of the manifest is made when asked for.
import { classOfCode, findChunk, type ChunkList } from '../../common/manifest.js';
import type { Entry } from './chunk-map.js';

const EMPTY: ChunkList = { count: 0, idx: new Uint32Array(0), gen: new Uint32Array(0), cls: new Uint8Array(0), sha: Buffer.alloc(0) };

export class ChunkEntries {
  /** This device's entries over the manifest's, by index; null where one was deleted. */
  private readonly over = new Map<number, Entry | null>();

  constructor(private list: ChunkList = EMPTY) {}

  /**
   * The chunk's entry: one this device set (the same object each time: a check-in renames
   * it in place), or the manifest's (a new object each time; changing it changes nothing).
   */
  get(index: number): Entry | undefined {
    const o = this.over.get(index);
    if (o !== undefined) return o ?? undefined;
    const i = findChunk(this.list, index);
    return i < 0 ? undefined : this.at(i);
  }

  set(index: number, e: Entry): this {
    this.over.set(index, e);
    return this;
  }

  delete(index: number): boolean {
    const had = this.get(index) !== undefined;
    if (findChunk(this.list, index) >= 0) this.over.set(index, null);
    else this.over.delete(index);
    return had;
  }

  clear(): void {
    this.list = EMPTY;
    this.over.clear();
  }

  /** The indexes with an entry: the manifest's in order, then those only this device set. */
  *keys(): IterableIterator<number> {
    const { list, over } = this;
    for (let i = 0; i < list.count; i++) if (over.get(list.idx[i]) !== null) yield list.idx[i];
    for (const [index, e] of over) if (e && findChunk(list, index) < 0) yield index;
  }

  *[Symbol.iterator](): IterableIterator<[number, Entry]> {
    for (const index of this.keys()) yield [index, this.get(index)!];
  }

  private at(i: number): Entry {
    const { list } = this;
    return { gen: list.gen[i], cls: classOfCode(list.cls[i]), ctHash: list.sha.toString('base64url', 32 * i, 32 * i + 32) };
  }
}
