// Which chunks' plaintext a caller keeps (guest RAM pages installed in the VM), by
// class, so that eviction knows what is out there and the status can say how much
// sensitive plaintext is resident. A sensitive chunk's key leaves with its plaintext.
import type { ChunkKind, Sensitivity } from '../../common/constants.js';
import type { KeyRing } from '../keys/keyring.js';
import type { ChunkKeys } from './chunk-keys.js';

export class Residency {
  /** Resident plaintext bytes by class. */
  readonly bytes: Record<Sensitivity, number> = { sensitive: 0, normal: 0 };
  private readonly set = new Map<string, { cls: Sensitivity; bytes: number }>();

  constructor(
    private readonly chunkKeys: ChunkKeys,
    private readonly ring: KeyRing,
    private readonly stats: { evicted: number },
  ) {}

  mark(kind: ChunkKind, index: number, cls: Sensitivity, bytes: number): void {
    const id = `${kind}/${index}`;
    if (this.set.has(id)) return;
    this.set.set(id, { cls, bytes });
    this.bytes[cls] += bytes;
  }

  /**
   * Call after the caller dropped a resident plaintext copy. A sensitive
   * chunk's key goes with it, so the next read asks the server again.
   */
  evict(kind: ChunkKind, index: number): void {
    const id = `${kind}/${index}`;
    const r = this.set.get(id);
    if (r) {
      this.set.delete(id);
      this.bytes[r.cls] -= r.bytes;
    }
    this.chunkKeys.dropFor(kind, index);
    this.stats.evicted++;
  }

  /** Drops every sensitive key and resident-plaintext record (lease expiry, wipe). */
  evictAllSensitive(): void {
    for (const [id, r] of this.set) {
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
    return this.ring.dropSensitiveKeysWhere((id, since) => {
      if (since > before) return false;
      // ids are gen/kind/index
      const at = id.indexOf(infix);
      if (at < 0) return false;
      const index = id.slice(at + infix.length);
      return !this.set.has(`${kind}/${index}`) && !keep(Number(index));
    });
  }

  clear(): void {
    this.set.clear();
  }
}
