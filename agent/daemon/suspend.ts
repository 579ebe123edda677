// `lethe agent suspend` (docs/eviction.md, suspend and handoff): holds the guest, encrypts every changed
// page and the new device state into the cache, and checks them in with the dirty
// disk chunks as a new version, which any device assigned the image resumes
// post-copy. This session is over once it is committed.
import { wipe } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';
import type { AgentCore } from '../chunks/core.js';
import type { AgentDiskBackend } from '../disk/backend.js';
import type { LeaseKeeper } from '../keys/lease-keeper.js';
import type { DeviceClient } from '../remote/device-client.js';
import type { AgentVm } from '../vm/runner.js';
import type { Prefetcher } from './prefetch.js';

export interface SuspendContext {
  image: string;
  core: AgentCore;
  lease: LeaseKeeper;
  client: DeviceClient;
  prefetcher: Prefetcher;
  vm(): AgentVm | undefined;
  disk(): AgentDiskBackend | undefined;
  /** The session ends after a committed suspend. */
  stop(): void;
  log(line: string): void;
}

export class Suspender {
  private suspending = false;

  constructor(private readonly c: SuspendContext) {}

  async suspend() {
    const { core, lease, prefetcher } = this.c;
    const vm = this.c.vm();
    if (!vm) throw new LetheError('BAD_REQUEST', 'no VM to suspend', { hint: 'the agent resumes a VM with: lethe agent run IMAGE --vm' });
    if (this.suspending) throw new LetheError('CONFLICT', 'a suspend is already under way');
    this.suspending = true;
    const t0 = Date.now();
    vm.evictor.stop();
    const release = await vm.hold('suspend');
    let pages: number;
    let r: Awaited<ReturnType<typeof core.checkin>>;
    try {
      await lease.whenActive();
      await prefetcher.uploadTrace();
      await vm.whenStopped();
      pages = await vm.evictor.captureDirty();
      const state = await vm.saveState();
      try {
        await core.replaceState(state);
      } finally {
        wipe(state);
      }
      await this.c.disk()?.flush();
      r = await core.checkin(this.c.client);
    } catch (e) {
      // Nothing was committed: the guest goes on (QEMU can run after a migration) and so does eviction.
      this.suspending = false;
      vm.evictor.start();
      await release();
      throw e;
    }
    prefetcher.suspended = true;
    // The check-in ended the lease on the server: its keys go now, and a late answer about it (a prefetch still out) ends nothing more.
    lease.stop();
    this.c.log(`suspended: ${pages} changed page(s), the device state and dirty disk chunks checked in as ${this.c.image}@${r.version} in ${Date.now() - t0} ms`);
    // This session is over: QEMU may not run again (its pages belong to the new version).
    setImmediate(() => this.c.stop());
    return { ...r, pages, stateBytes: core.sizeOf('state'), ms: Date.now() - t0 };
  }
}
