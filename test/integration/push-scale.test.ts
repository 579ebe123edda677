// 1,000 devices connected to one server's push channel at once (light clients
// speaking the real protocol, test/helpers/push-clients.ts): each gets its own
// wipe, checks the server's signature, acknowledges on the socket; nothing is
// dropped, and the server's memory per connection is printed.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { admin } from '../helpers/fixtures.js';
import { startServer, waitFor, type ServerProc } from '../helpers/proc.js';
import { closeLight, connectLight, enrollLight, rssOf, type LightDevice } from '../helpers/push-clients.js';

const DEVICES = 1000;

describe('push channel at 1,000 connected devices (real server, light clients)', function () {
  this.timeout(600_000);
  let s: ServerProc;
  let devices: LightDevice[] = [];

  before(async () => {
    s = await startServer({ runArgs: ['--rate-enroll', 'off', '--rate-device', 'off', '--rate-device-address', 'off'] });
  });
  afterEach(function () {
    if (this.currentTest?.state === 'failed') console.log(`--- server log, last lines:\n${s.stderr().split('\n').slice(-30).join('\n')}`);
  });
  after(async () => {
    closeLight(devices);
    await s?.stop();
  });

  it('every device connected gets its wipe once, signed, and its acknowledgement lands: none dropped', async () => {
    devices = await enrollLight(s, DEVICES, 'fleet');
    const a = admin(s);
    try {
      const listed = async () => (await a.json<{ devices: { id: string; connected: boolean; status: string }[] }>('GET', '/devices')).devices;
      const before = rssOf(s.proc.pid!);
      const serverKey = fs.readFileSync(path.join(s.dir, 'signing.key')).subarray(32);
      await connectLight(s, devices, serverKey);
      await waitFor(async () => (await listed()).filter((d) => d.connected).length === DEVICES, 60_000, 'every device listed as connected');
      const after = rssOf(s.proc.pid!);
      console.log(`      server memory for ${DEVICES} push connections: ${((after - before) / DEVICES / 1024).toFixed(1)} KiB each (RSS ${(before / 2 ** 20).toFixed(0)} → ${(after / 2 ** 20).toFixed(0)} MiB)`);

      let next = 0;
      await Promise.all(
        Array.from({ length: 16 }, async () => {
          while (next < devices.length) await a.json('POST', `/devices/${devices[next++].deviceId}/wipe`);
        }),
      );
      await waitFor(async () => (await listed()).filter((d) => d.status === 'wiped').length === DEVICES, 120_000, 'every device wiped (acknowledged)');
      for (const d of devices) {
        expect(d.refused, d.deviceId).to.equal(0);
        expect(
          d.got.map((g) => [g.cmd.seq, g.cmd.type]),
          d.deviceId,
        ).to.deep.equal([[1, 'wipe']]);
      }
      // No audit gap: each device's log says the wipe was delivered by push and acknowledged.
      next = 0;
      await Promise.all(
        Array.from({ length: 16 }, async () => {
          while (next < devices.length) {
            const d = devices[next++];
            const { entries } = await a.json<{ entries: { type: string; data: { via?: string } }[] }>('GET', `/audit/devices/${d.deviceId}`);
            const tail = entries.slice(-3).map((e) => (e.type === 'wipe.delivered' ? `${e.type}:${e.data.via}` : e.type));
            expect(tail, d.deviceId).to.deep.equal(['device.wipe', 'wipe.delivered:push', 'wipe.ack']);
          }
        }),
      );
    } finally {
      a.close();
    }
  });
});
