// What the lease's turns do to a running agent (docs/lease-state.md, "Hooks"). The
// lease keeper decides when a lease starts, renews, runs out or is taken away; these
// hooks are the agent's answer to each, one named function apiece, so that the
// whole of "what happens to the guest when the lease…" reads in one place. The
// daemon calls them from the keeper's events; they act through LeaseEffects, which
// the daemon provides and the unit test records.
import type { TAgentPolicy, TLeaseResponse } from '../../common/wire.js';
import { errorChain } from '../../common/errors.js';

/** The running guest, as the hooks need it. */
export interface GuestSide {
  /** Stops the vCPUs until the returned release is called. */
  hold(reason: 'lease'): Promise<() => Promise<void>>;
  /** What the policy asks for when a lease runs out unrenewed. */
  endingAction(): { evict: 'sensitive' | 'all'; suspend: boolean };
  /** Punches resident pages out of guest RAM (changed ones are kept, encrypted, while keys remain). */
  evictResident(why: string, scope: 'sensitive' | 'all'): Promise<unknown>;
  /** The lease's policy: eviction, hints, dropping the guest's page cache. */
  applyPolicy(p: TAgentPolicy): void;
}

export interface LeaseEffects {
  /** The guest, once the VM runs; undefined for a disk-only agent or before the resume. */
  guest(): GuestSide | undefined;
  policy(): TAgentPolicy;
  /** Drops every sensitive plaintext chunk the agent's own buffers hold. */
  evictAllSensitive(): void;
  /** Sends this session's first-touch order to the server. */
  uploadTrace(): Promise<void>;
  suspend(): Promise<unknown>;
  /** Starts the background prefetch for a new lease, or picks it up again. */
  prefetch(): void;
  /** Serves the disk over NBD, then resumes the VM (each once). */
  serve(): Promise<void>;
  /** Stops the agent with `code`; `removeCache` deletes the cache; `after` runs once everything is down. */
  shutdown(code: number, removeCache?: boolean, after?: () => Promise<void>): void;
  /** Erases the home of a revoked device and acknowledges it (docs/lease-state.md). */
  eraseRevoked(status: 'revoked' | 'wiped', zeroedAfterMs?: number): Promise<void>;
  /** Carries out IT's wipe order and acknowledges it. */
  wipe(command: string, zeroedAfterMs?: number): Promise<void>;
  /** Milliseconds since the server's word that ended the lease, if one did. */
  zeroedAfterMs(): number | undefined;
  /** Whether a VM was asked for (a failed start then stops the agent). */
  wantsVm: boolean;
  log(line: string): void;
}

/** The agent's exit code when the device was revoked or wiped: its service must not restart it. */
export const EXIT_REVOKED = 3;

export class LeaseHooks {
  /** The guest's hold while no lease is active: its faults could not be served. */
  private leaseHold: Promise<() => Promise<void>> | undefined;

  constructor(private readonly fx: LeaseEffects) {}

  /** Call after a new lease is active (its manifest checked, its keys in the ring). */
  leaseGranted(l: Pick<TLeaseResponse, 'leaseId' | 'image' | 'version' | 'classKeys' | 'ttlSeconds'>): void {
    this.fx.log(`lease ${l.leaseId} on ${l.image}@${l.version}, ${l.classKeys.length} class key(s), expires in ${l.ttlSeconds} s`);
    this.guestRuns();
    this.fx.prefetch();
    this.fx.serve().catch((e) => {
      this.fx.log(`could not start: ${errorChain(e)}`);
      if (this.fx.wantsVm) this.fx.shutdown(1);
    });
  }

  /** Call after the active lease was renewed (by its timer, or at once for a new policy). */
  leaseRenewed(): void {
    this.guestRuns();
  }

  /**
   * Call after the lease keeper's margin before expiry is reached without a renewal
   * (or the server ended the lease): the keys are still held. The guest is held, the
   * policy's eviction runs, and a suspend is tried if the policy asks for one.
   */
  async leaseEnding(): Promise<void> {
    const g = this.fx.guest();
    if (!g) return;
    void this.fx.uploadTrace();
    const action = g.endingAction();
    this.holdGuest(g);
    await this.leaseHold;
    await g.evictResident('the lease is running out unrenewed', action.evict);
    // The policy asks for a suspend: it needs the server, which may be why the lease is running out.
    if (action.suspend) this.fx.suspend().catch((e) => this.fx.log(`suspend at lease expiry failed: ${errorChain(e)}; the guest stays held, its pages evicted`));
  }

  /** Call after the lease ran out unrenewed and the keys were zeroed. */
  expiredLease(): void {
    const g = this.fx.guest();
    if (g) this.holdGuest(g);
    // Keys are gone: pages unchanged since they arrived are punched out; any changed
    // page left (leaseEnding should have taken it) stays until a new lease.
    if (g) g.evictResident('the lease expired', g.endingAction().evict).catch((e) => this.fx.log(`eviction at expiry: ${errorChain(e)}`));
    else this.fx.evictAllSensitive();
    this.fx.log('lease expired without renewal: keys zeroed, sensitive plaintext evicted; waiting for the server');
  }

  /** Call after the server refused the device (DEVICE_REVOKED or DEVICE_WIPED) and the keys were zeroed. */
  revoked(e: Error & { code?: string }): void {
    this.fx.log(`refused by the server: ${e.message}; keys zeroed, stopping the VM, deleting the cache and device keys`);
    this.fx.evictAllSensitive();
    const zeroedAfterMs = this.fx.zeroedAfterMs();
    this.fx.shutdown(EXIT_REVOKED, true, () => this.fx.eraseRevoked(e.code === 'DEVICE_WIPED' ? 'wiped' : 'revoked', zeroedAfterMs));
  }

  /** Call after a signed wipe command was accepted and the keys were zeroed. */
  wipeOrdered(command: string): void {
    this.fx.log(`wipe ordered by IT (${command}): zeroing keys, deleting the cache and device keys`);
    this.fx.evictAllSensitive();
    const zeroedAfterMs = this.fx.zeroedAfterMs();
    this.fx.shutdown(EXIT_REVOKED, true, () => this.fx.wipe(command, zeroedAfterMs));
  }

  /** A lease is active: the lease's policy applies and a guest held for the lease runs again. */
  private guestRuns(): void {
    this.fx.guest()?.applyPolicy(this.fx.policy());
    const held = this.leaseHold;
    this.leaseHold = undefined;
    void held?.then((release) => release()).catch(() => {});
  }

  private holdGuest(g: GuestSide): void {
    if (this.leaseHold) return;
    const held = g.hold('lease');
    this.leaseHold = held;
    // A failed stop (QEMU gone) holds nothing: say so, and let the next call try again.
    held.catch((e) => {
      this.fx.log(`could not hold the guest for the lease: ${errorChain(e)}`);
      if (this.leaseHold === held) this.leaseHold = undefined;
    });
  }
}
