// What a lease lets the agent serve: the VM's disk over NBD, then the VM itself,
// resumed post-copy after its startup buffer (docs/uffd.md, docs/prefetch.md).
import path from 'node:path';
import { LetheError } from '../../common/errors.js';
import type { TAgentPolicy } from '../../common/wire.js';
import { builtGuestBoot } from '../../guest-driver/built.js';
import type { AgentCore } from '../chunks/core.js';
import { AgentDiskBackend } from '../disk/backend.js';
import { NbdServer, type NbdAddress } from '../disk/nbd/server.js';
import { nbdPeerCheck, type NbdPeers } from '../disk/nbd/peers.js';
import type { HintPolicy } from '../vm/hints.js';
import { chooseAccel, makeRunDir, type AccelChoice } from '../vm/qemu.js';
import { AgentVm } from '../vm/runner.js';
import { PageFeed, type Prefetcher } from './prefetch.js';

export interface ServeOptions {
  home: string;
  image: string;
  /** Where to serve the disk (default: nbd.sock in the home); null: not at all. */
  nbd?: NbdAddress | null;
  nbdPeers?: NbdPeers;
  vm?: { accel: AccelChoice; trace?: string };
  logGuestConsole?: boolean;
  onGuestConsole?: (line: string) => void;
}

export const hintPolicy = (p: TAgentPolicy): HintPolicy => ({ intervalMs: p.hintIntervalMs, processes: p.processes, cgroups: p.cgroups, files: p.files });

/** The disk export and the VM of one agent, each started once. */
export class Serving {
  nbd: NbdServer | undefined;
  disk: AgentDiskBackend | undefined;
  vm: AgentVm | undefined;
  private vmStarting = false;

  constructor(
    private readonly o: ServeOptions,
    private readonly core: AgentCore,
    private readonly prefetcher: Prefetcher,
    private readonly policy: () => TAgentPolicy,
    private readonly stopped: () => boolean,
    private readonly log: (line: string) => void,
  ) {}

  /** The disk over NBD, then the VM. */
  async start(): Promise<void> {
    await this.startNbd();
    await this.startVm();
  }

  private async startNbd(): Promise<void> {
    const { o, core } = this;
    if (this.nbd || o.nbd === null || this.stopped()) return;
    this.disk = new AgentDiskBackend(core);
    const address = o.nbd ?? { path: path.join(o.home, 'nbd.sock') };
    // Loopback TCP has no peer credentials: the CLI serves it only when forced.
    const allowPeer = 'path' in address ? nbdPeerCheck(o.nbdPeers ?? 'qemu') : undefined;
    this.nbd = new NbdServer(new Map([[o.image, this.disk]]), { defaultExport: o.image, allowPeer, log: this.log });
    const at = await this.nbd.listen(address);
    const who = !allowPeer ? 'any local process, unauthenticated' : o.nbdPeers === 'user' ? "this user's processes" : 'only the QEMU this agent starts';
    this.log(`disk served over NBD at ${'path' in at ? at.path : `${at.host}:${at.port}`} (export '${o.image}', ${core.sizeOf('disk')} bytes; ${who} may connect)`);
  }

  private async startVm(): Promise<void> {
    const { o, core, log } = this;
    if (!o.vm || this.vm || this.vmStarting || this.stopped()) return;
    this.vmStarting = true;
    const guest = builtGuestBoot();
    if (!guest) throw new LetheError('CONFIG', 'no guest is built to resume the VM with', { hint: 'build it once with: npm run guest' });
    const accel = await chooseAccel(o.vm.accel, { kernel: guest.vmlinux, initrd: guest.initramfs });
    const t0 = Date.now();
    // The startup buffer comes while QEMU starts, its pages going into guest RAM as they
    // arrive; the guest runs once the last is in.
    const feed = new PageFeed();
    const startup = this.prefetcher.plan().then(async (plan) => {
      const pf = await this.prefetcher.fetchStartup(plan, feed);
      if (pf.startup.length > 0) {
        const sized = pf.rate === undefined ? '' : `, sized for ${((pf.rate * 8) / 1e6).toFixed(1)} Mbit/s and the learned touch curve`;
        log(`startup buffer: ${pf.fetched} page(s) fetched (${pf.startup.length} planned${pf.learned ? `, learned order of ${pf.learned}` : ''}${sized}) in ${Date.now() - t0} ms`);
      }
      feed.end();
      return pf;
    });
    // The resume reads the feed; one that fails before then leaves this rejection to no one.
    startup.catch((e) => feed.fail(e));
    const p = this.policy();
    const vm = await AgentVm.resume(core, {
      runDir: makeRunDir(),
      kernel: guest.vmlinux,
      initrd: guest.initramfs,
      append: 'console=ttyS0',
      accel,
      nbd: o.nbd === null ? undefined : { socket: path.join(o.home, 'nbd.sock'), export: o.image },
      log,
      policy: p,
      hints: hintPolicy(p),
      dropGuestCache: p.dropGuestCache,
      traceFile: o.vm.trace,
      showConsole: o.logGuestConsole,
      installFirst: feed,
    });
    const pf = await startup;
    this.vm = vm;
    if (o.logGuestConsole) vm.vm.onConsoleLine((line) => log(`guest: ${line}`));
    if (o.onGuestConsole) vm.vm.onConsoleLine(o.onGuestConsole);
    this.prefetcher.start(pf.rest, pf.bandwidth);
    this.prefetcher.scheduleTraceUpload();
    log(`VM resumed post-copy under ${accel} in ${Date.now() - t0} ms (QEMU pid ${vm.vm.pid}); its pages come from the agent on first touch`);
  }
}
