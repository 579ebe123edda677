// The lease state machine (docs/lease-state.md), written as events and expiries.
//
//   none ──granted──▶ active ──renewed──▶ active
//                       │ expiry without renewal
//                       ▼
//                    expired ──granted──▶ active      (keys zeroed while expired)
//   any ──403 revoked──▶ revoked (final)   any ──wipe command──▶ wiping (final)
//   active ──any call on it answered NOT_ASSIGNED, LEASE_EXPIRED, UNKNOWN_LEASE──▶ expired
//
// Refusals reach serverRefused() from every device call (the device client's
// 'refused' event), not only from renewal and heartbeat: a key or chunk fetch
// that is refused ends the lease, or the agent, at that answer.
//
// Renewal starts at renewAfter (TTL/3 by default) and is retried until the
// lease runs out. Expiry is timed locally from the TTL the server sent, so a
// device whose clock is wrong still gives up its keys on time.
import { EventEmitter } from 'node:events';
import { b64u, openSealed, wipe } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';
import type { TLeaseResponse } from '../../common/wire.js';
import type { DeviceClient, Refusal } from '../remote/device-client.js';
import { isTransient } from '../remote/fetcher.js';
import { keepCheckpoint } from './anchor.js';
import type { Identity } from './identity.js';
import type { KeyRing } from './keyring.js';
import { openCommand, PushRefused, type TPushCommand } from '../../common/push.js';
import { readLastSeq, writeLastSeq } from '../remote/push-channel.js';
import { Backoff } from '../remote/backoff.js';

export type LeaseState = 'none' | 'active' | 'expired' | 'revoked' | 'wiping' | 'stopped';

export interface LeaseKeeperEvents {
  granted: [TLeaseResponse];
  renewed: [TLeaseResponse];
  expired: [];
  revoked: [LetheError];
  wipe: [string];
  log: [string];
}

/** A lease asked for again after 250 ms, doubling to 5 s; a renewal the same, to a tenth of the TTL. */
const RETRY_MIN_MS = 250;
const ACQUIRE_RETRY_MAX_MS = 5_000;
/** How long before an unrenewed lease runs out beforeExpiry starts: min(10 s, TTL/6). */
export const expiryMargin = (ttlMs: number): number => Math.min(10_000, ttlMs / 6);
/** How long beforeExpiry may take when it could not start a margin ahead (the server ended the lease, or the laptop slept). */
const EARLY_END_GRACE_MS = 3_000;
/**
 * The wall clock is checked against the expiry this often. Timers run on the
 * monotonic clock, which stops while the laptop sleeps (Linux CLOCK_MONOTONIC): a
 * lease that ran out during a sleep would otherwise keep its keys until the timer
 * caught up after waking.
 */
const WALL_CHECK_MS = 1_000;

export class LeaseKeeper extends EventEmitter<LeaseKeeperEvents> {
  state: LeaseState = 'none';
  lease?: TLeaseResponse;
  /** Local time the lease runs out. */
  expiresAt = 0;
  renewals = 0;
  lastError?: string;
  private renewTimer?: NodeJS.Timeout;
  private expiryTimer?: NodeJS.Timeout;
  private wallTimer?: NodeJS.Timeout;
  private heartbeatTimer?: NodeJS.Timeout;
  private waiters: { resolve: () => void; reject: (e: Error) => void }[] = [];

  /** Runs before a new lease counts as active (e.g. fetch and check its manifest). */
  prepare?: (l: TLeaseResponse) => Promise<void>;
  /**
   * Runs while the keys are still held, when the lease is about to run out unrenewed
   * (expiryMargin before) or the server ended it: e.g. evict every sensitive page.
   */
  beforeExpiry?: () => Promise<void>;
  private expiringTimer?: NodeJS.Timeout;
  /** This lease's beforeExpiry run, once started. */
  private ending?: Promise<void>;
  /** The lease the server said is over, once its end has started here. */
  private endedByServer?: string;
  /** A check-in is moving the lease to a new version: answers about the old one do not end it. */
  private moving = false;
  /** The highest command number this device carried out (push.json in its home): one at or below it is refused. */
  private lastSeq: number;
  /** Commands being carried out now, by number: the same one arriving again (push and heartbeat) is not done twice. */
  private readonly inHand = new Set<number>();
  /** What a heartbeat tells the server besides the lease state (resident plaintext: the console's "what could a thief read"). */
  report?: () => Record<string, unknown>;
  /** When the order that ended the agent arrived (a wipe, a revoke, a refusal), and the command, if one. */
  endedBy?: { at: number; command?: string };

  constructor(
    private readonly client: DeviceClient,
    private readonly id: Identity,
    private readonly keys: KeyRing,
    readonly image: string,
    private readonly heartbeatMs: number,
  ) {
    super();
    this.lastSeq = readLastSeq(id.home);
  }

  /**
   * A signed command from the server, by push or in a heartbeat answer
   * (docs/push.md). One signed by another key, for another device, or numbered at
   * or below the last one carried out is refused and logged; the rest are carried
   * out: wipe and revoke end the agent (their acknowledgements come from the
   * erasure), lease-end zeroes the lease's keys, policy renews at once to take
   * the new policy, rotate checks in at once. `arrivedAt` times the acknowledgement.
   */
  command(signed: unknown, via: 'push' | 'heartbeat', arrivedAt = Date.now()): void {
    let cmd: TPushCommand;
    try {
      cmd = openCommand(b64u.decode(this.id.info.serverSignPublicKey), this.id.info.deviceId, signed);
    } catch (e) {
      this.emit('log', `refused a command (${via}): ${e instanceof PushRefused ? e.message : String(e)}`);
      return;
    }
    if (this.inHand.has(cmd.seq)) return;
    if (cmd.seq <= this.lastSeq) {
      this.emit('log', `refused command #${cmd.seq} (${cmd.type}, ${via}): #${this.lastSeq} was already carried out (a replay?)`);
      return;
    }
    if (this.final()) return;
    this.inHand.add(cmd.seq);
    this.emit('log', `command #${cmd.seq} from the server (${via}): ${cmd.type}${cmd.lease ? ` ${cmd.lease}` : ''}${cmd.image ? ` ${cmd.image}` : ''}`);
    if (cmd.type === 'wipe') {
      this.wipeNow(cmd.id, arrivedAt);
      return;
    }
    if (cmd.type === 'revoke') {
      this.refused(new LetheError('DEVICE_REVOKED', 'this device has been revoked', { hint: 'contact IT' }), { at: arrivedAt, command: cmd.id });
      return;
    }
    void this.carryOut(cmd, arrivedAt);
  }

  /** lease-end, policy, rotate: act, acknowledge, and remember the number once the server has the acknowledgement. */
  private async carryOut(cmd: TPushCommand, arrivedAt: number): Promise<void> {
    let detail = '';
    let zeroedAfterMs: number | undefined;
    try {
      if (cmd.type === 'lease-end') {
        if (this.state === 'active' && this.lease?.leaseId === cmd.lease) {
          await this.leaseEndedByServer(new LetheError('LEASE_EXPIRED', `the server ended lease ${cmd.lease}`));
          zeroedAfterMs = Date.now() - arrivedAt;
          detail = 'keys zeroed';
        } else detail = 'not the lease this device holds now';
      } else if (cmd.type === 'policy') {
        detail = (await this.renewNow()) ? 'renewed: the new policy applies' : 'no lease now: the next one carries the policy';
      } else if (cmd.type === 'rotate') {
        this.scheduleHeartbeat(0);
        detail = 'checking in now';
      }
      await this.client.ack(cmd.id, true, detail, zeroedAfterMs);
      this.lastSeq = Math.max(this.lastSeq, cmd.seq);
      writeLastSeq(this.id.home, this.lastSeq);
    } catch (e) {
      if (!this.refused(e)) this.emit('log', `command #${cmd.seq} (${cmd.type}) not acknowledged: ${e instanceof Error ? e.message : String(e)}; the server hands it out again`);
    } finally {
      this.inHand.delete(cmd.seq);
    }
  }

  /** Renews the active lease now (a new policy); false without one. */
  private async renewNow(): Promise<boolean> {
    if (this.state !== 'active' || !this.lease) return false;
    const l = await this.client.renew(this.lease.leaseId);
    if (this.state !== 'active') return false;
    this.renewals++;
    this.leaseGranted(l, true);
    return true;
  }

  private wipeNow(commandId: string, arrivedAt: number): void {
    if (this.final()) return;
    this.stopTimers();
    this.keys.zeroAll();
    this.state = 'wiping';
    this.refuseWaiters();
    this.endedBy = { at: arrivedAt, command: commandId };
    this.emit('wipe', commandId);
  }

  /** When the work before expiry starts (ms since the epoch); Infinity without an active lease. */
  evictionPoint(): number {
    return this.state === 'active' && this.lease ? this.expiresAt - expiryMargin(this.lease.ttlSeconds * 1000) : Infinity;
  }

  start(): void {
    void this.acquire();
    this.scheduleHeartbeat(0);
  }

  /** Resolves once a lease is active (immediately if it is). Rejects if the device is revoked or wiped. */
  whenActive(): Promise<void> {
    if (this.state === 'active') return Promise.resolve();
    if (this.final()) return Promise.reject(this.noLease());
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  private noLease(): LetheError {
    return new LetheError('LEASE_EXPIRED', `no lease: the agent is ${this.state}`);
  }

  /** Call after the state became final (revoked, wiping, stopped): whoever waits for a lease gets none. */
  private refuseWaiters(): void {
    for (const w of this.waiters.splice(0)) w.reject(this.noLease());
  }

  leaseId(): string {
    if (!this.lease) throw new LetheError('LEASE_EXPIRED', 'no lease yet');
    return this.lease.leaseId;
  }

  private final(): boolean {
    return this.state === 'revoked' || this.state === 'wiping' || this.state === 'stopped';
  }

  private async acquire(): Promise<void> {
    const pause = new Backoff(RETRY_MIN_MS, ACQUIRE_RETRY_MAX_MS);
    while (!this.final()) {
      try {
        const l = await this.client.lease(this.image);
        if (this.final()) return;
        await this.prepare?.(l);
        if (this.final()) return;
        this.leaseGranted(l);
        return;
      } catch (e) {
        if (this.refused(e)) return;
        this.lastError = e instanceof Error ? e.message : String(e);
        if (!isTransient(e)) this.emit('log', `lease refused: ${this.lastError}; retrying`);
        await pause.wait();
      }
    }
  }

  /** Call after the server granted or renewed a lease: installs its class keys and sets the timers. */
  private leaseGranted(l: TLeaseResponse, renewed = false): void {
    const receivedAt = Date.now();
    for (const ck of l.classKeys) {
      if (this.keys.hasClassKey(ck.gen) && renewed) continue;
      const key = openSealed(this.id.box, b64u.decode(ck.sealed));
      try {
        this.keys.setClassKey(ck.gen, key);
      } finally {
        wipe(key);
      }
    }
    const wasActive = this.state === 'active';
    this.lease = l;
    this.state = 'active';
    this.lastError = undefined;
    this.expiresAt = receivedAt + l.ttlSeconds * 1000;
    const renewIn = Math.max(0, Date.parse(l.renewAfter) - Date.parse(l.expiresAt) + l.ttlSeconds * 1000);
    this.clearLeaseTimers();
    this.renewTimer = setTimeout(() => void this.renew(), renewIn);
    this.ending = undefined;
    const margin = expiryMargin(l.ttlSeconds * 1000);
    this.expiryTimer = setTimeout(() => this.expire(), this.expiresAt - Date.now());
    this.expiringTimer = setTimeout(() => void this.startBeforeExpiry(), Math.max(0, this.expiresAt - margin - Date.now()));
    this.wallTimer = setInterval(() => {
      const now = Date.now();
      if (now >= this.expiresAt) this.expire();
      else if (now >= this.expiresAt - margin) void this.startBeforeExpiry();
    }, WALL_CHECK_MS);
    this.emit(renewed ? 'renewed' : 'granted', l);
    if (!wasActive) for (const w of this.waiters.splice(0)) w.resolve();
  }

  /**
   * Call after a check-in ended the lease on the server: takes a lease on the new
   * version without zeroing keys. If none comes, the old lease (ended on the
   * server) ends here too, as at expiry, and the keeper asks again.
   */
  async reacquire(): Promise<void> {
    this.clearLeaseTimers();
    this.moving = true;
    try {
      const l = await this.client.lease(this.image);
      await this.prepare?.(l);
      if (this.final()) return;
      this.leaseGranted(l);
    } catch (e) {
      if (!this.refused(e) && this.state === 'active') void this.endWithGrace();
      throw e;
    } finally {
      this.moving = false;
    }
  }

  private async renew(): Promise<void> {
    // Capped at a tenth of the TTL: several tries fit before the lease runs out.
    const pause = new Backoff(RETRY_MIN_MS, () => Math.max(RETRY_MIN_MS, ((this.lease?.ttlSeconds ?? 0) * 1000) / 10));
    while (this.state === 'active' && this.lease) {
      try {
        const l = await this.client.renew(this.lease.leaseId);
        if (this.state !== 'active') return;
        this.renewals++;
        this.leaseGranted(l, true);
        return;
      } catch (e) {
        if (this.refused(e)) return;
        // DEVICE_UNSEALED: the image's policy no longer allows how this device seals its keys.
        if (e instanceof LetheError && ['LEASE_EXPIRED', 'UNKNOWN_LEASE', 'NOT_ASSIGNED', 'DEVICE_UNSEALED'].includes(e.code)) {
          await this.leaseEndedByServer(e);
          return;
        }
        this.lastError = e instanceof Error ? e.message : String(e);
        await pause.wait();
      }
    }
  }

  /**
   * Call with every refusal a device call got, whichever part made it (the device
   * client's 'refused' event): revoked or wiped ends the agent at once, a pending
   * wipe brings the heartbeat forward, and an answer that the current lease is
   * over ends it as at expiry (the policy's eviction with the keys, then zeroed).
   */
  serverRefused(r: Refusal): void {
    if (this.refused(r.error)) return;
    if (r.leaseId !== undefined && !this.moving && this.state === 'active' && this.lease?.leaseId === r.leaseId) void this.leaseEndedByServer(r.error);
  }

  /** The server says the active lease is over: beforeExpiry gets its grace, then the keys go (once per lease). */
  private async leaseEndedByServer(e: LetheError): Promise<void> {
    const l = this.lease;
    if (!l || this.endedByServer === l.leaseId) return;
    this.endedByServer = l.leaseId;
    this.lastError = e.message;
    this.emit('log', `lease ended by the server (${e.message})`);
    await this.endWithGrace();
  }

  /** Runs beforeExpiry once for this lease (the margin timer, the wall check, or an early end started it). */
  private startBeforeExpiry(): Promise<void> {
    this.ending ??= (async () => {
      if (this.state !== 'active' || !this.beforeExpiry) return;
      try {
        await this.beforeExpiry();
      } catch (e) {
        this.emit('log', `before lease expiry: ${e instanceof Error ? e.message : String(e)}`);
      }
    })();
    return this.ending;
  }

  /**
   * The lease's time is up. beforeExpiry normally began a margin earlier; if it has
   * not (the laptop slept through the margin), it gets EARLY_END_GRACE_MS first.
   */
  private expire(): void {
    if (this.ending) this.expiredLease();
    else void this.endWithGrace();
  }

  /** beforeExpiry, for at most EARLY_END_GRACE_MS, then expiry; unless a new lease came meanwhile. */
  private async endWithGrace(): Promise<void> {
    const l = this.lease;
    clearTimeout(this.expiringTimer);
    clearTimeout(this.expiryTimer);
    clearInterval(this.wallTimer);
    await Promise.race([this.startBeforeExpiry(), new Promise((r) => setTimeout(r, EARLY_END_GRACE_MS))]);
    if (this.lease === l) this.expiredLease();
  }

  /** Call when the lease runs out unrenewed: zero every key, tell the owner, and keep asking for a new one. */
  private expiredLease(): void {
    if (this.state !== 'active') return;
    this.clearLeaseTimers();
    this.keys.zeroAll();
    this.state = 'expired';
    this.emit('expired');
    void this.acquire();
  }

  /** Handles 403s that end the agent (once, from any call, or a pushed revoke); returns true if `e` was one. */
  private refused(e: unknown, by: { at: number; command?: string } = { at: Date.now() }): boolean {
    if (!(e instanceof LetheError)) return false;
    if (e.code === 'DEVICE_REVOKED' || e.code === 'DEVICE_WIPED') {
      if (this.final()) return true;
      this.stopTimers();
      this.keys.zeroAll();
      this.endedBy = by;
      this.state = 'revoked';
      this.refuseWaiters();
      this.emit('revoked', e);
      return true;
    }
    if (e.code === 'DEVICE_WIPE_PENDING') {
      if (!this.final()) this.scheduleHeartbeat(0);
      return true;
    }
    return false;
  }

  private scheduleHeartbeat(ms: number): void {
    clearTimeout(this.heartbeatTimer);
    this.heartbeatTimer = setTimeout(() => void this.heartbeat(), ms);
  }

  private async heartbeat(): Promise<void> {
    if (this.final()) return;
    try {
      const hb = await this.client.heartbeat({ lease: this.state, ...this.report?.() });
      const anchorProblem = hb.checkpoint && keepCheckpoint(this.id.home, this.id.info.serverSignPublicKey, hb.checkpoint);
      if (anchorProblem) this.emit('log', `audit: ${anchorProblem}`);
      if (hb.pinProblem) this.emit('log', `tls: ${hb.pinProblem}`);
      // The push channel is the fast path; what it did not bring (or the device missed) comes here.
      const arrivedAt = Date.now();
      // A wipe goes first: it does all a revoke does, and more.
      const ordered = [...hb.commands].sort((a, b) => Number(b.type === 'wipe') - Number(a.type === 'wipe'));
      for (const c of ordered) this.command(c.signed, 'heartbeat', arrivedAt);
      if (this.final()) return;
    } catch (e) {
      if (this.refused(e) && this.final()) return;
    }
    if (!this.final()) this.scheduleHeartbeat(this.heartbeatMs);
  }

  private clearLeaseTimers(): void {
    clearTimeout(this.expiringTimer);
    clearTimeout(this.renewTimer);
    clearTimeout(this.expiryTimer);
    clearInterval(this.wallTimer);
  }

  private stopTimers(): void {
    this.clearLeaseTimers();
    clearTimeout(this.heartbeatTimer);
  }

  stop(): void {
    this.stopTimers();
    this.keys.zeroAll();
    this.state = 'stopped';
    this.refuseWaiters();
  }
}
