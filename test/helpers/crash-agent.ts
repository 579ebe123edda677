// A child process of test/integration/crash-agent.test.ts: the real agent (no VM,
// no NBD) on a device home. Each line on stdout is one JSON report.
//
//   work HOME IMAGE     writes disk chunks and flushes them (reported: those writes
//                       are acknowledged, as a guest's FLUSH is), replaces the device
//                       state as a suspend does, and checks in. LETHE_CRASH_AT kills it
//                       at a point of that path.
//   recover HOME IMAGE  starts again on the same home and cache: reports the device
//                       state it would resume and what its cache holds dirty, checks
//                       in what is dirty, and reports the cache after.
import { createHash, randomBytes } from 'node:crypto';
import { CHUNK_SIZE } from '../../common/constants.js';
import { startAgent, type RunningAgent } from '../../agent/daemon/start.js';
import { DeviceClient } from '../../agent/remote/device-client.js';
import { closeIdentity, loadIdentity } from '../../agent/keys/identity.js';
import { testUnlock } from './fixtures.js';

export const WRITTEN = Array.from({ length: 36 }, (_, i) => i + 2); // 4.5 MiB: a check-in in two requests

const say = (o: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(o)}\n`);
const hash = (b: Buffer) => createHash('sha256').update(b).digest('hex');

async function stateOf(agent: RunningAgent): Promise<Buffer> {
  const size = agent.core.sizeOf('state');
  const out = Buffer.alloc(size);
  for (let i = 0; i * CHUNK_SIZE.state < size; i++) {
    if (agent.core.entry('state', i)) await agent.core.readInto('state', i, out.subarray(i * CHUNK_SIZE.state, Math.min((i + 1) * CHUNK_SIZE.state, size)));
  }
  return out;
}

async function checkin(agent: RunningAgent, home: string): Promise<number> {
  const id = await loadIdentity(home, testUnlock());
  const client = new DeviceClient(id);
  try {
    return (await agent.core.checkin(client)).version;
  } finally {
    client.close();
    closeIdentity(id);
  }
}

async function main(): Promise<void> {
  const [mode, home, image] = process.argv.slice(2);
  const agent = await startAgent({ home, image, cacheBytes: 1 << 26, heartbeatMs: 60_000, prefetch: false, nbd: null, push: false, unlock: testUnlock(), log: () => {} });
  try {
    await agent.lease.whenActive();
    if (mode === 'work') {
      const writes: Record<number, string> = {};
      for (const i of WRITTEN) {
        const data = randomBytes(CHUNK_SIZE.disk);
        await agent.core.write('disk', i, data);
        writes[i] = hash(data);
      }
      agent.core.flush();
      say({ flushed: writes });
      const state = randomBytes(2 * CHUNK_SIZE.state + 1000 + Math.floor(Math.random() * 100_000));
      say({ newState: hash(state) });
      await agent.core.replaceState(state);
      agent.core.flush();
      say({ checkedIn: await checkin(agent, home) });
    } else if (mode === 'recover') {
      say({ version: agent.core.manifest!.version, state: hash(await stateOf(agent)), dirty: agent.status().cache.dirty });
      if (agent.status().cache.dirty > 0) say({ checkedIn: await checkin(agent, home) });
      say({ dirtyAfter: agent.status().cache.dirty });
    } else {
      throw new Error(`unknown mode ${mode}`);
    }
  } finally {
    agent.stop();
    await agent.done;
  }
}

main().then(
  () => process.exit(0),
  (e: unknown) => {
    process.stderr.write(`${e instanceof Error ? e.stack : String(e)}\n`);
    process.exit(1);
  },
);
