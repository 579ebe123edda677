// A check-in while the guest writes on (the `checkin` command runs beside a running
// guest), against a real server: no write is left behind in a draft nobody sends.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import type { CheckinClient } from '../../agent/chunks/writes.js';
import { closeIdentity, loadIdentity, type Identity } from '../../agent/keys/identity.js';
import { DeviceClient } from '../../agent/remote/device-client.js';
import { expectSameBytes } from '../helpers/bytes.js';
import { LetheError } from '../../common/errors.js';
import { agentInProcessSuite, jsonManifest, rejects, testUnlock } from '../helpers/fixtures.js';

const CHUNK = 128 * 1024;
const CHUNKS = 64;

describe('a check-in while the guest writes (agent core, real server)', function () {
  this.timeout(60_000);
  const t = agentInProcessSuite('checkin-writes', { plain: { disk: randomBytes(CHUNKS * CHUNK), mem: Buffer.alloc(0), state: Buffer.alloc(0) } });
  let id: Identity;
  let client: DeviceClient;
  before(async () => {
    id = await loadIdentity(t.home, testUnlock());
    client = new DeviceClient(id);
  });
  after(() => {
    client?.close();
    if (id) closeIdentity(id);
  });

  /** The real client, with `during` run as each part goes (before it is sent). */
  const watched = (during: (final: boolean, part: number) => Promise<void> | void): CheckinClient & { finals: boolean[] } => {
    const finals: boolean[] = [];
    return {
      finals,
      async checkin(leaseId, frames, final, part) {
        finals.push(final);
        await during(final, finals.length - 1);
        return client.checkin(leaseId, frames, final, part);
      },
    };
  };
  const read = async (index: number) => {
    const out = Buffer.alloc(CHUNK);
    const source = await t.agent.core.readInto('disk', index, out);
    return { out, source };
  };

  it('a write while the bulk goes up is not held, and the version holds it, not the blob sent before it', async () => {
    const core = t.agent.core;
    const written = Array.from({ length: 40 }, () => randomBytes(CHUNK)); // 5 MiB: more than one part
    for (let i = 0; i < written.length; i++) await core.write('disk', i, written[i]);
    const again = randomBytes(CHUNK);
    const c = watched(async (final, part) => {
      // Chunk 3 went up in this first part; the guest writes it again before the part is sent.
      if (part === 0) await core.write('disk', 3, again);
    });
    const r = await core.checkin(c, () => t.agent.lease.reacquire());
    expect(c.finals.slice(0, 2), 'two parts while the guest writes on').to.deep.equal([false, false]);
    expect(c.finals.at(-1), 'then the part that commits').to.equal(true);
    expect(c.finals.length, 'the chunk written again went in a part of its own').to.equal(3);
    expect(r.chunks).to.equal(40);
    expect(core.manifest!.version, 'the lease moved to the new version').to.equal(r.version);
    expect(t.agent.status().cache.dirty, 'nothing left dirty').to.equal(0);
    for (const i of [2, 3, 4]) {
      const { out, source } = await read(i);
      expectSameBytes(out, i === 3 ? again : written[i], `chunk ${i}`);
      expect(source, `chunk ${i} from the cache: the version names the blob it holds`).to.equal('cache');
    }
  });

  it("a write during the part that commits waits for the new lease, and goes into the next version", async () => {
    const core = t.agent.core;
    const mine = randomBytes(CHUNK);
    await core.write('disk', 10, mine);
    const later = randomBytes(CHUNK);
    let writing: Promise<void> | undefined;
    let wrote = false;
    const c = watched((final) => {
      if (final) writing = core.write('disk', 11, later).then(() => void (wrote = true));
    });
    const r = await core.checkin(c, async () => {
      expect(wrote, 'the write waits while the version is committed').to.equal(false);
      await t.agent.lease.reacquire();
      expect(wrote, 'and while the lease moves').to.equal(false);
    });
    expect(c.finals).to.deep.equal([true]);
    expect(r.chunks).to.equal(1);
    await writing;
    expect(core.writeGen, "the write is the next draft's").to.be.greaterThan(r.version);
    expectSameBytes((await read(11)).out, later);
    expectSameBytes((await read(10)).out, mine);
    const next = await core.checkin(client, () => t.agent.lease.reacquire());
    expect(next.chunks).to.equal(1);
    const { out, source } = await read(11);
    expectSameBytes(out, later, 'chunk 11 in the version after');
    expect(source).to.equal('cache');
  });

  it('a write under way when the last part is due is waited for, and goes into the version', async () => {
    const core = t.agent.core;
    await core.write('disk', 30, randomBytes(CHUNK));
    const late = randomBytes(CHUNK);
    const writing = core.write('disk', 31, late); // its seal on a pool thread as the check-in starts
    const c = watched(() => {});
    const r = await core.checkin(c, () => t.agent.lease.reacquire());
    await writing;
    expect(r.chunks, 'both chunks').to.equal(2);
    const { out, source } = await read(31);
    expectSameBytes(out, late);
    expect(source, 'the version names the blob the cache holds').to.equal('cache');
  });

  it('a last part that fails lets the held writes go on, and the next check-in sends them all', async () => {
    const core = t.agent.core;
    const first = randomBytes(CHUNK);
    await core.write('disk', 40, first);
    const second = randomBytes(CHUNK);
    let writing: Promise<void> | undefined;
    const failing: CheckinClient = {
      async checkin() {
        writing = core.write('disk', 41, second);
        throw new LetheError('SERVER_UNREACHABLE', 'the link went down');
      },
    };
    const e = await rejects(core.checkin(failing, () => t.agent.lease.reacquire()));
    expect(String(e)).to.match(/the link went down/);
    await writing; // not held for ever
    const r = await core.checkin(client, () => t.agent.lease.reacquire());
    expect(r.chunks).to.equal(2);
    expectSameBytes((await read(40)).out, first);
    expectSameBytes((await read(41)).out, second);
  });

  it("a smaller device state after a check-in whose parts went up and whose last part failed: the version has only the new state", async () => {
    const core = t.agent.core;
    await core.replaceState(randomBytes(40 * CHUNK)); // 5 MiB: two parts before the last
    const failing = watched((final) => {
      if (final) throw new LetheError('SERVER_UNREACHABLE', 'cut off before the last part');
    });
    await rejects(core.checkin(failing));
    expect(failing.finals).to.deep.equal([false, false, true]);
    const state = randomBytes(CHUNK + 1000);
    await core.replaceState(state);
    const r = await core.checkin(client, () => t.agent.lease.reacquire());
    const m = await jsonManifest(client, t.agent.lease.leaseId());
    expect(m.version).to.equal(r.version);
    expect(m.chunks.state.map(([i]) => i), 'the 38 chunks staged past the new end are not committed').to.deep.equal([0, 1]);
    const out = Buffer.alloc(state.length);
    await core.readInto('state', 0, out.subarray(0, CHUNK));
    await core.readInto('state', 1, out.subarray(CHUNK));
    expectSameBytes(out, state);
  });

  it('a new device state while a check-in is under way is refused (CONFLICT), and the check-in commits', async () => {
    const core = t.agent.core;
    await core.write('disk', 60, randomBytes(CHUNK));
    let refused: Promise<{ code: string }> | undefined;
    const c = watched(() => {
      refused ??= rejects(core.replaceState(randomBytes(1000)));
    });
    const r = await core.checkin(c, () => t.agent.lease.reacquire());
    expect((await refused!).code).to.equal('CONFLICT');
    expect(r.chunks).to.equal(1);
  });

  it('a second check-in while one is under way is refused, and the first commits', async () => {
    const core = t.agent.core;
    await core.write('disk', 20, randomBytes(CHUNK));
    let second: Promise<unknown> | undefined;
    const c = watched(() => {
      second ??= rejects(core.checkin(client));
    });
    const r = await core.checkin(c, () => t.agent.lease.reacquire());
    expect(((await second) as { code: string }).code).to.equal('CONFLICT');
    expect(r.chunks).to.equal(1);
    expect(t.agent.status().cache.dirty).to.equal(0);
  });
  it("a signed manifest of another version than the lease's is refused, and the map keeps the lease's", async () => {
    const core = t.agent.core;
    const lease = { image: core.manifest!.image, version: core.manifest!.version };
    const wire = await client.manifest(t.agent.lease.leaseId());
    const e = await rejects(Promise.resolve().then(() => core.setManifest(wire, core.writeGen, { ...lease, version: lease.version - 1 })));
    expect(e.code).to.equal('TAMPERED');
    expect(core.manifest!.version).to.equal(lease.version);
    core.setManifest(wire, core.writeGen, lease);
  });

  // Last: the lease stays ended on the server.
  it('a lease that cannot move after the commit is said so with the version, and writes are not held for ever', async () => {
    const core = t.agent.core;
    await core.write('disk', 50, randomBytes(CHUNK));
    let writing: Promise<unknown> | undefined;
    const e = await rejects(
      core.checkin(client, async () => {
        writing = core.write('disk', 51, randomBytes(CHUNK)).catch((err) => err);
        throw new LetheError('SERVER_UNREACHABLE', 'no route to the server');
      }),
    );
    expect(e.code).to.equal('SERVER_UNREACHABLE');
    expect(e.message).to.match(/checked in 1 chunk\(s\) as version \d+, but the lease did not move to it: no route to the server/);
    await writing; // it goes on once the check-in is done, and fails with the ended lease
  });
});
