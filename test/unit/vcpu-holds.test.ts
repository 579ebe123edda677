// Nested vCPU holds: a later hold waits for the stop an earlier one sent; a failed
// stop holds nothing; the guest continues when the last hold goes.
import { expect } from 'chai';
import { HOLD_WAIT_MS, VcpuHolds } from '../../agent/memory/vcpu-holds.js';

/** A QMP stand-in whose 'stop' answers when the test says so. */
function fakeQemu() {
  const sent: string[] = [];
  let answerStop!: (ok: boolean) => void;
  let inFlight = false;
  const holds = new VcpuHolds({
    execute: (cmd) => {
      sent.push(cmd);
      if (cmd === 'cont') return Promise.resolve();
      return new Promise((resolve, reject) => (answerStop = (ok) => (ok ? resolve(undefined) : reject(new Error('stop refused')))));
    },
    faultInFlight: () => inFlight,
    exited: () => false,
  });
  // Commands go out in order, a turn later: wait for the 'stop' before answering it.
  const stop = async (ok = true) => {
    await new Promise((r) => setImmediate(r));
    answerStop(ok);
  };
  return { holds, sent, stop, setInFlight: (v: boolean) => (inFlight = v) };
}

const settled = async (p: Promise<unknown>) => {
  let done = false;
  void p.then(
    () => (done = true),
    () => (done = true),
  );
  await new Promise((r) => setTimeout(r, 20));
  return done;
};

describe('vCPU holds', () => {
  it('a second hold waits for the stop the first one sent; the guest continues after the last release', async () => {
    const q = fakeQemu();
    const a = q.holds.hold('lease');
    const b = q.holds.hold('eviction');
    expect(await settled(b), 'the second hold must wait for the stop').to.equal(false);
    expect(q.sent).to.deep.equal(['stop']);
    await q.stop();
    const [releaseA, releaseB] = await Promise.all([a, b]);
    expect(q.holds.reasons()).to.have.members(['lease', 'eviction']);
    await releaseB();
    expect(q.sent, 'still held for the lease').to.deep.equal(['stop']);
    await releaseA();
    expect(q.sent).to.deep.equal(['stop', 'cont']);
    expect(q.holds.reasons()).to.deep.equal([]);
  });

  it('a failed stop holds nothing, and the next hold sends stop again', async () => {
    const q = fakeQemu();
    const a = q.holds.hold('eviction');
    await q.stop(false);
    await a.then(
      () => expect.fail('the hold should have failed'),
      (e: Error) => expect(e.message).to.equal('stop refused'),
    );
    expect(q.holds.reasons()).to.deep.equal([]);
    const b = q.holds.hold('eviction');
    await q.stop();
    expect(q.sent).to.deep.equal(['stop', 'stop']);
    await (await b)();
  });

  it('goes on without the stop answer only while a fault is in flight (a vCPU blocked in it)', async function () {
    this.timeout(10_000);
    const q = fakeQemu();
    const a = q.holds.hold('lease');
    await new Promise((r) => setTimeout(r, HOLD_WAIT_MS + 200));
    expect(await settled(a), 'no fault in flight: waits for QEMU').to.equal(false);
    q.setInFlight(true);
    await new Promise((r) => setTimeout(r, HOLD_WAIT_MS + 200));
    expect(await settled(a)).to.equal(true);
  });
});
