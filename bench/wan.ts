// Resume over last-mile links, with vTube's metrics, in one run with a real server,
// agents and QEMU (TCG). The server sits behind the link emulator (test/helpers/link.ts:
// one-way delay and a shared bandwidth cap; this kernel has no netem). For each link:
//   - Lethe, cold device: agent start → guest running (startup delay), → the workload's
//     first full verify pass, demand requests, bytes over the link;
//   - Lethe, second device: the same with the first device's first-touch order (trace-
//     learned prefetch, the first device trusted as tracer);
//   - yardstick "full download": `lethe image pull` of the whole image over the same link,
//     then a resume of the pulled files from local disk (Internet Suspend/Resume's way);
//   - yardstick "QEMU post-copy": the same snapshot migrated by QEMU itself, post-copy
//     from the start, from a source QEMU through the same link to a destination QEMU.
// Every time is to the first LETHE-VERIFY line the guest prints after it runs again.
// The phase "refault" runs the same guest with every page sensitive and evicted 2 s
// after it arrives, and reports what a re-fault of a sensitive page cost inside the
// running guest (p50, p99) against the target of one round trip + 0.5 ms.
//
//   node --import tsx bench/wan.ts [--links loopback,100/20,20/40,5/80] [--guest-mem 256M]
//                                  [--guest-mib 32] [--phases resume,refault] [--refaults 3000]
//                                  [--startup auto|SIZE] [--skip-qemu] [--json]
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { buildGuest } from '../guest-driver/build.js';
import { Vm, makeRunDir, type VmSpec, control, type AgentStatus } from '../agent/index.js';
import { table } from '../cli/output.js';
import { assign, enrolledDevice } from '../test/helpers/fixtures.js';
import { Link } from '../test/helpers/link.js';
import { lethe, startAgentProc, startServer, waitFor, type ServerProc } from '../test/helpers/proc.js';

const { values } = parseArgs({
  options: {
    links: { type: 'string', default: 'loopback,100/20,20/40,5/80' },
    'guest-mem': { type: 'string', default: '256M' },
    'guest-mib': { type: 'string', default: '32' },
    /** resume (startup and first pass, with the yardsticks) and refault (sensitive re-faults in a running guest). */
    phases: { type: 'string', default: 'resume,refault' },
    /** Re-faults of sensitive pages to wait for in the refault phase. */
    refaults: { type: 'string', default: '3000' },
    /** The resume image's prefetch.startup: auto (the shipped policies) or a size. */
    startup: { type: 'string', default: 'auto' },
    /** Leave out QEMU's own post-copy migration (the slowest yardstick to set up). */
    'skip-qemu': { type: 'boolean', default: false },
    /** Print each agent's log (without the guest's console lines) to stderr. */
    verbose: { type: 'boolean', default: false },
    json: { type: 'boolean', default: false },
  },
});

const IMAGE = 'wan';
/** The same snapshot with every page sensitive and evicted 2 s after it arrives. */
const SENSITIVE_IMAGE = 'wan-sensitive';
const VERIFY_RE = /LETHE-VERIFY pass=(\d+) ok=(\d+) bad=(\d+)/;
/** How long any one resume may take before the bench gives up on it. */
const RUN_LIMIT_MS = 15 * 60_000;

interface LinkSpec {
  name: string;
  /** One-way delay, ms. */
  delayMs: number;
  mbit: number;
}

/** "loopback" or "MBIT/RTT_MS". */
function parseLink(s: string): LinkSpec {
  if (s === 'loopback') return { name: 'loopback', delayMs: 0, mbit: 0 };
  const m = /^(\d+(?:\.\d+)?)\/(\d+)$/.exec(s);
  if (!m) throw new Error(`bad link '${s}': use loopback or MBIT/RTT_MS, e.g. 20/40`);
  return { name: `${m[1]} Mbit/s, ${m[2]} ms RTT`, delayMs: Number(m[2]) / 2, mbit: Number(m[1]) };
}

interface Run {
  link: string;
  method: string;
  /** Start → the guest runs again (for the full download: the download included). */
  startupS: number;
  /** Start → the first verify line after it runs. */
  firstPassS: number;
  /** Pages fetched before the guest ran (Lethe's startup buffer). */
  startupPages?: number;
  /** Bytes over the link, both ways. */
  mib: number;
  demandRequests: number | null;
  /** Guest RAM faults served, and the guest's total wait on them. */
  faults: number | null;
  faultS: number | null;
  /** Pages of guest RAM the agent installed before the guest touched them. */
  installedAhead: number | null;
  /** Faults the guest waited on that needed the network, and their total wait (from the agent's fault timing, when it has it). */
  stalls: number | null;
  stallS: number | null;
}

/** ms since the epoch of an agent log line's ISO timestamp. */
function lineTime(log: string, re: RegExp, what: string): number {
  for (const line of log.split('\n')) {
    if (!re.test(line)) continue;
    const t = Date.parse(line.slice(0, line.indexOf(' ')));
    if (Number.isFinite(t)) return t;
  }
  throw new Error(`no ${what} in the agent's log`);
}

/** A ServerProc whose URL goes through `link` (devices enrolled with it keep that URL). */
function through(s: ServerProc, link: Link): ServerProc {
  const url = link.via(s.url);
  return { ...s, url, env: { ...s.env, LETHE_SERVER: url } };
}

/** Lethe on a fresh device behind `link`; resolves with its run and its device id. */
async function letheResume(s: ServerProc, link: Link, spec: LinkSpec, method: string): Promise<Run & { deviceId: string }> {
  const d = await enrolledDevice(s, `wan-${method.replace(/\W+/g, '-')}-${Date.now() % 100000}`);
  // The device reaches the server through the link from now on, as a laptop behind it would.
  const info = path.join(d.home, 'device.json');
  fs.writeFileSync(info, JSON.stringify({ ...JSON.parse(fs.readFileSync(info, 'utf8')), server: link.via(s.url) }, null, 2) + '\n');
  await assign(s, d.deviceId, IMAGE);
  const before = link.stats();
  const t0 = Date.now();
  const a = await startAgentProc(d.home, IMAGE, ['--vm', '--accel', 'tcg', '--log-guest-console']);
  try {
    await waitFor(async () => VERIFY_RE.test(a.log()) || undefined, RUN_LIMIT_MS, `the first verify pass (${method}, ${spec.name})`);
    const log = a.log();
    if (values.verbose) process.stderr.write(`--- ${method}, ${spec.name}\n${log.split('\n').filter((l) => !l.includes(' guest: ')).join('\n')}\n`);
    const bad = /LETHE-VERIFY pass=\d+ ok=\d+ bad=([1-9]\d*)/.exec(log);
    if (bad) throw new Error(`bad pages in ${method} on ${spec.name}: ${bad[0]}`);
    const st = await control<AgentStatus>(d.home, { cmd: 'status' });
    const after = link.stats();
    const wait = st.vm?.faultWait;
    // The first verify line's own time: the agent stamps each console line as it logs it.
    const run: Run & { deviceId: string } = {
      deviceId: d.deviceId,
      link: spec.name,
      method,
      startupS: (lineTime(log, /VM resumed post-copy/, 'resume line') - t0) / 1000,
      firstPassS: (lineTime(log, VERIFY_RE, 'verify line') - t0) / 1000,
      startupPages: Number(/startup buffer: (\d+) page\(s\) fetched/.exec(log)?.[1] ?? 0),
      mib: (after.up + after.down - before.up - before.down) / 2 ** 20,
      demandRequests: st.fetch.demandBatches,
      faults: st.vm?.faults ?? null,
      installedAhead: st.vm?.installedAhead ?? null,
      faultS: wait ? wait.ms / 1000 : null,
      stalls: wait ? wait.server : null,
      stallS: wait ? wait.serverMs / 1000 : null,
    };
    // Long enough for the first-touch order to reach the server (it goes up 30 s after resume).
    if (method.startsWith('Lethe, cold')) {
      await waitFor(async () => /first-touch order of \d+ page\(s\) uploaded/.test(a.log()) || undefined, RUN_LIMIT_MS, 'the first-touch order upload');
    }
    a.proc.kill('SIGTERM');
    await a.exited;
    return run;
  } finally {
    if (a.proc.exitCode === null) a.proc.kill('SIGKILL');
    d.close();
  }
}

interface Refaults {
  link: string;
  rttMs: number;
  count: number;
  p50Ms: number;
  p99Ms: number;
  /** Audited key requests per re-fault. */
  keyRequestsPerRefault: number;
  evicted: number;
}

/** A running guest whose every page is sensitive and evicted 2 s after it arrives: what its re-faults cost. */
async function letheRefaults(s: ServerProc, link: Link, spec: LinkSpec): Promise<Refaults> {
  const d = await enrolledDevice(s, `wan-refault-${Date.now() % 100000}`);
  const info = path.join(d.home, 'device.json');
  fs.writeFileSync(info, JSON.stringify({ ...JSON.parse(fs.readFileSync(info, 'utf8')), server: link.via(s.url) }, null, 2) + '\n');
  await assign(s, d.deviceId, SENSITIVE_IMAGE);
  const a = await startAgentProc(d.home, SENSITIVE_IMAGE, ['--vm', '--accel', 'tcg', '--log-guest-console']);
  const want = Number(values.refaults);
  try {
    // Counted from the first verify pass on: the resume's own faults are not re-faults.
    await waitFor(async () => VERIFY_RE.test(a.log()) || undefined, RUN_LIMIT_MS, `the first verify pass (re-faults, ${spec.name})`);
    const status = () => control<AgentStatus>(d.home, { cmd: 'status' });
    const before = await status();
    const st = await waitFor(
      async () => {
        const now = await status();
        return now.vm!.sensitiveRefaults.count - before.vm!.sensitiveRefaults.count >= want ? now : undefined;
      },
      RUN_LIMIT_MS,
      `${want} sensitive re-faults (${spec.name})`,
    ).catch((e) => {
      throw new Error(`${e.message}\nthe agent's last lines:\n${a.log().split('\n').slice(-40).join('\n')}`);
    });
    const bad = /LETHE-VERIFY pass=\d+ ok=\d+ bad=([1-9]\d*)/.exec(a.log());
    if (bad) throw new Error(`bad pages in the re-fault run on ${spec.name}: ${bad[0]}`);
    const r = st.vm!.sensitiveRefaults;
    const count = r.count - before.vm!.sensitiveRefaults.count;
    return {
      link: spec.name,
      rttMs: spec.delayMs * 2,
      count,
      p50Ms: r.p50Ms!,
      p99Ms: r.p99Ms!,
      keyRequestsPerRefault: (st.reads.keyRequests - before.reads.keyRequests) / count,
      evicted: st.vm!.eviction.evicted - before.vm!.eviction.evicted,
    };
  } finally {
    a.proc.kill('SIGTERM');
    await a.exited;
    d.close();
  }
}

interface LocalQemu {
  vm: Vm;
  verified: Promise<number>;
}

/** Starts QEMU paused for an incoming migration, its RAM the file `ramFile` (shared, as the agent runs it). */
async function startQemu(guest: { vmlinux: string; initramfs: string }, memBytes: number, disk: string, ramFile: string): Promise<LocalQemu> {
  const runDir = makeRunDir();
  const spec: VmSpec = {
    kernel: guest.vmlinux,
    initrd: guest.initramfs,
    append: 'console=ttyS0',
    memBytes,
    memPath: ramFile,
    accel: 'tcg',
    qmpSocket: path.join(runDir, 'qmp.sock'),
    disk,
    hintSocket: path.join(runDir, 'hint.sock'),
    incomingDefer: true,
  };
  const vm = await Vm.start(spec, runDir);
  const verified = new Promise<number>((resolve) => vm.onConsoleLine((l) => VERIFY_RE.test(l) && resolve(Date.now())));
  return { vm, verified };
}

/** Waits for QEMU to leave the incoming states and runs the guest if it came in paused. */
async function runWhenLoaded(vm: Vm): Promise<void> {
  for (;;) {
    const st = await vm.qmp.execute<{ status: string }>('query-status');
    if (st.status === 'running') return;
    if (st.status === 'paused' || st.status === 'postmigrate') {
      await vm.qmp.execute('cont');
      return;
    }
    if (st.status !== 'inmigrate' && st.status !== 'prelaunch') throw new Error(`QEMU is '${st.status}' after the incoming migration`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Loads the device state from `state` into a deferred-incoming QEMU whose RAM file already holds the RAM. */
async function loadState(vm: Vm, state: string): Promise<void> {
  await vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
  await vm.qmp.execute('migrate-incoming', { uri: `exec:cat ${state}` });
  await runWhenLoaded(vm);
}

/** Yardstick: the whole image pulled over the link, then resumed from the local copy. */
async function fullDownload(s: ServerProc, link: Link, spec: LinkSpec, guest: { vmlinux: string; initramfs: string }, memBytes: number, dir: string): Promise<Run> {
  const out = path.join(dir, 'pulled');
  fs.rmSync(out, { recursive: true, force: true });
  const before = link.stats();
  const t0 = Date.now();
  const r = await lethe(['image', 'pull', IMAGE, '--out', out], through(s, link).env);
  if (r.code !== 0) throw new Error(`pull failed: ${r.stderr}`);
  const after = link.stats();
  const q = await startQemu(guest, memBytes, path.join(out, 'disk.raw'), path.join(out, 'ram.bin'));
  try {
    await loadState(q.vm, path.join(out, 'state.bin'));
    const running = Date.now();
    const first = await withLimit(q.verified, 'the first verify pass (full download)');
    return {
      link: spec.name,
      method: 'full download, then resume (yardstick)',
      startupS: (running - t0) / 1000,
      firstPassS: (first - t0) / 1000,
      mib: (after.up + after.down - before.up - before.down) / 2 ** 20,
      demandRequests: null,
      faults: null,
      faultS: null,
      installedAhead: null,
      stalls: null,
      stallS: null,
    };
  } finally {
    await q.vm.kill();
    fs.rmSync(out, { recursive: true, force: true });
  }
}

/** Yardstick: QEMU's own post-copy migration of the same snapshot through the link. */
async function qemuPostcopy(spec: LinkSpec, guest: { vmlinux: string; initramfs: string }, memBytes: number, snap: string, dir: string): Promise<Run> {
  const ram = path.join('/dev/shm', `lethe-bench-src-${process.pid}`);
  fs.copyFileSync(path.join(snap, 'ram.bin'), ram);
  // The destination's RAM starts empty; QEMU fills it post-copy through userfaultfd.
  const dstRam = path.join('/dev/shm', `lethe-bench-dst-${process.pid}`);
  fs.writeFileSync(dstRam, '');
  fs.truncateSync(dstRam, memBytes);
  const disk = path.join(dir, 'disk-postcopy.raw');
  fs.copyFileSync(path.join(snap, 'disk.raw'), disk);
  const src = await startQemu(guest, memBytes, disk, ram);
  let dst: LocalQemu | undefined;
  let link: Link | undefined;
  try {
    await loadState(src.vm, path.join(snap, 'state.bin'));
    await src.vm.qmp.execute('stop');
    dst = await startQemu(guest, memBytes, disk, dstRam);
    const port = freePort();
    await dst.vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'postcopy-ram', state: true }] });
    await dst.vm.qmp.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });
    link = await Link.start({ port }, { delayMs: spec.delayMs, mbit: spec.mbit });
    await src.vm.qmp.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'x-ignore-shared', state: false },
        { capability: 'postcopy-ram', state: true },
      ],
    });
    const t0 = Date.now();
    await src.vm.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${link.port}` });
    await src.vm.qmp.execute('migrate-start-postcopy');
    await runWhenLoaded(dst.vm);
    const running = Date.now();
    const first = await withLimit(dst.verified, 'the first verify pass (QEMU post-copy)');
    const st = link.stats();
    return {
      link: spec.name,
      method: 'QEMU post-copy (yardstick)',
      startupS: (running - t0) / 1000,
      firstPassS: (first - t0) / 1000,
      mib: (st.up + st.down) / 2 ** 20,
      demandRequests: null,
      faults: null,
      faultS: null,
      installedAhead: null,
      stalls: null,
      stallS: null,
    };
  } finally {
    await dst?.vm.kill();
    await src.vm.kill();
    await link?.close();
    fs.rmSync(ram, { force: true });
    fs.rmSync(dstRam, { force: true });
    fs.rmSync(disk, { force: true });
  }
}

function freePort(): number {
  const out = execFileSync(process.execPath, ['-e', "const s=require('net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})"]);
  return Number(String(out).trim());
}

function withLimit<T>(p: Promise<T>, what: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no ${what} within ${RUN_LIMIT_MS / 60000} min`)), RUN_LIMIT_MS);
    p.then(
      (v) => (clearTimeout(t), resolve(v)),
      (e) => (clearTimeout(t), reject(e)),
    );
  });
}

async function main() {
  const links = String(values.links).split(',').map(parseLink);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lethe-bench-wan-'));
  const s = await startServer();
  const runs: Run[] = [];
  const refaults: Refaults[] = [];
  const phases = new Set(String(values.phases).split(','));
  /** The snapshot's boot from scratch to the workload's ready line (s): install-ahead's yardstick on loopback. */
  let bootS = NaN;
  try {
    const snap = path.join(dir, 'snap');
    const shot = await lethe(['vm', 'snapshot', '--out', snap, '--mem', String(values['guest-mem']), '--workload-mib', String(values['guest-mib']), '--accel', 'tcg', '--json']);
    if (shot.code !== 0) throw new Error(`snapshot failed: ${shot.stderr}`);
    bootS = Number(JSON.parse(shot.stdout).bootToReadySeconds);
    // Plaintext stays on the device for the run (the chunks in the normal class): this measures the link, not eviction.
    const policy = path.join(dir, 'push-policy.yaml');
    fs.writeFileSync(policy, `sensitive:\n  memory: none\nprefetch:\n  startup: ${values.startup}\n  order: trace\n`);
    const push = await lethe(['image', 'push', IMAGE, '--disk', path.join(snap, 'disk.raw'), '--memory', path.join(snap, 'ram.bin'), '--state', path.join(snap, 'state.bin'), '--policy', policy], s.env);
    if (push.code !== 0) throw new Error(`push failed: ${push.stderr}`);
    const sensitive = path.join(dir, 'sensitive-policy.yaml');
    fs.writeFileSync(sensitive, 'sensitive:\n  memory: all\neviction:\n  idle: 2s\nprefetch:\n  startup: 16MiB\n');
    if (phases.has('refault')) {
      const p = await lethe(['image', 'push', SENSITIVE_IMAGE, '--disk', path.join(snap, 'disk.raw'), '--memory', path.join(snap, 'ram.bin'), '--state', path.join(snap, 'state.bin'), '--policy', sensitive], s.env);
      if (p.code !== 0) throw new Error(`push failed: ${p.stderr}`);
    }
    const guest = await buildGuest();
    const memBytes = fs.statSync(path.join(snap, 'ram.bin')).size;

    for (const spec of links) {
      const link = await Link.start({ port: Number(new URL(s.url).port) }, { delayMs: spec.delayMs, mbit: spec.mbit });
      try {
        if (phases.has('refault')) refaults.push(await letheRefaults(s, link, spec));
      } finally {
        await link.close();
      }
      if (!phases.has('resume')) continue;
      const link2 = await Link.start({ port: Number(new URL(s.url).port) }, { delayMs: spec.delayMs, mbit: spec.mbit });
      try {
        const cold = await letheResume(s, link2, spec, 'Lethe, cold device');
        runs.push(cold);
        // The second device learns from the first: trust it as a tracer for the image.
        const t = await lethe(['image', 'trust', IMAGE, cold.deviceId], s.env);
        if (t.code !== 0) throw new Error(`image trust failed: ${t.stderr}`);
        runs.push(await letheResume(s, link2, spec, 'Lethe, second device (learned order)'));
        // The next link's cold device starts cold: this link's tracer stops shaping its order.
        const u = await lethe(['image', 'untrust', IMAGE, cold.deviceId], s.env);
        if (u.code !== 0) throw new Error(`image untrust failed: ${u.stderr}`);
        runs.push(await fullDownload(s, link2, spec, guest, memBytes, dir));
      } finally {
        await link2.close();
      }
      if (!values['skip-qemu']) runs.push(await qemuPostcopy(spec, guest, memBytes, snap, dir));
      if (!values.json) process.stderr.write(`${spec.name}: done\n`);
    }
  } finally {
    await s.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }

  if (values.json) {
    console.log(JSON.stringify({ guest: { mem: values['guest-mem'], workloadMib: Number(values['guest-mib']), bootToReadyS: bootS }, runs, refaults }, null, 2));
    return;
  }
  if (refaults.length > 0) {
    console.log(`re-faults of sensitive pages in the running guest (every page sensitive, evicted 2 s after it arrives); target: p50 ≤ RTT + 0.5 ms`);
    console.log(
      table(
        ['link', 're-faults', 'p50 ms', 'p99 ms', 'target ms', 'p50 ÷ target', 'key requests per re-fault', 'pages evicted'],
        refaults.map((r) => [r.link, r.count, r.p50Ms.toFixed(2), r.p99Ms.toFixed(2), (r.rttMs + 0.5).toFixed(1), (r.p50Ms / (r.rttMs + 0.5)).toFixed(2), r.keyRequestsPerRefault.toFixed(3), r.evicted]),
      ),
    );
  }
  if (runs.length === 0) return;
  console.log(`resume of the test guest (${values['guest-mem']} RAM, ${values['guest-mib']} MiB workload) to its first full verify pass, over each link`);
  const yard = (r: Run) => runs.find((x) => x.link === r.link && x.method.startsWith('full download'));
  const qemu = (r: Run) => runs.find((x) => x.link === r.link && x.method.startsWith('QEMU'));
  const fmt = (n: number | null | undefined, d = 1) => (n === null || n === undefined ? '—' : n.toFixed(d));
  console.log(
    table(
      ['link', 'method', 'startup s', 'startup pages', 'first pass s', '÷ full download', '÷ QEMU post-copy', 'MiB moved', 'demand requests', 'installed ahead', 'faults', 'fault wait s', 'network stalls', 'stall s'],
      runs.map((r) => [
        r.link,
        r.method,
        fmt(r.startupS),
        r.startupPages ?? '—',
        fmt(r.firstPassS),
        fmt(r.firstPassS / (yard(r)?.firstPassS ?? NaN), 2),
        fmt(qemu(r) ? r.firstPassS / qemu(r)!.firstPassS : null, 2),
        fmt(r.mib),
        r.demandRequests ?? '—',
        r.installedAhead ?? '—',
        r.faults ?? '—',
        fmt(r.faultS),
        r.stalls ?? '—',
        fmt(r.stallS),
      ]),
    ),
  );
  // Install-ahead's target: on loopback, the first pass after a resume (the second device's:
  // with a learned order it installs ahead) within twice the boot from scratch and a pass.
  const second = runs.find((r) => r.link === 'loopback' && r.method.startsWith('Lethe, second'));
  console.log(`boot from scratch to the workload's ready line: ${fmt(bootS, 2)} s` + (second ? `; loopback, second device's first pass ÷ boot: ${fmt(second.firstPassS / bootS, 2)}` : ''));
}

await main();
