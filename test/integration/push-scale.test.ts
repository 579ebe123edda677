// 1,000 devices connected to one server's push channel at once (light clients
// speaking the real protocol, test/helpers/push-clients.ts): each gets its own
// policy change and then its own wipe, checks the server's signature, acknowledges
// on the socket; nothing is dropped (bench/push.ts measures memory per connection).
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { PinnedClient } from '../../common/http-client.js';
import { admin, pushImage } from '../helpers/fixtures.js';
import { startServer, waitFor, type ServerProc } from '../helpers/proc.js';
import { closeLight, connectLight, enrollLight, lightCall, type LightDevice } from '../helpers/push-clients.js';

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

  it('every device connected gets a policy change and then its own wipe, each once and signed, and every acknowledgement lands: none dropped', async () => {
    devices = await enrollLight(s, DEVICES, 'fleet');
    await pushImage(s, 'fleet', { chunks: 1, policy: 'device:\n  seal: [tpm, passphrase, none]\n' });
    const a = admin(s);
    const http = new PinnedClient(s.url, s.fingerprint);
    try {
      // Each holds a lease on one image: a policy change there is one command to each at once.
      let n = 0;
      await Promise.all(
        Array.from({ length: 16 }, async () => {
          while (n < devices.length) {
            const d = devices[n++];
            await a.json('POST', `/devices/${d.deviceId}/assignments`, { image: 'fleet' });
            await lightCall(http, d, 'POST', '/v1/device/leases', { image: 'fleet' });
          }
        }),
      );
      const listed = async () => (await a.json<{ devices: { id: string; connected: boolean; status: string }[] }>('GET', '/devices')).devices;
      const serverKey = fs.readFileSync(path.join(s.dir, 'signing.key')).subarray(32);
      await connectLight(s, devices, serverKey);
      await waitFor(async () => (await listed()).filter((d) => d.connected).length === DEVICES, 60_000, 'every device listed as connected');

      await a.json('PUT', '/images/fleet/policy', { policy: 'device:\n  seal: [tpm, passphrase, none]\neviction:\n  idle: 45s\n' });
      await waitFor(async () => devices.every((d) => d.got.length === 1), 60_000, 'the policy command on every device');

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
        ).to.deep.equal([
          [1, 'policy'],
          [2, 'wipe'],
        ]);
      }
      // No audit gap: each device's log says the wipe was delivered by push and acknowledged.
      next = 0;
      await Promise.all(
        Array.from({ length: 16 }, async () => {
          while (next < devices.length) {
            const d = devices[next++];
            const { entries } = await a.json<{ entries: { type: string; data: { via?: string } }[] }>('GET', `/audit/devices/${d.deviceId}`);
            // The policy's acknowledgement may land before or after the wipe was issued (both are the device's, in any order).
            expect(entries.filter((e) => e.type === 'policy.ack').length, d.deviceId).to.equal(1);
            const tail = entries
              .filter((e) => e.type !== 'policy.ack')
              .slice(-3)
              .map((e) => (e.type === 'wipe.delivered' ? `${e.type}:${e.data.via}` : e.type));
            expect(tail, d.deviceId).to.deep.equal(['device.wipe', 'wipe.delivered:push', 'wipe.ack']);
          }
        }),
      );
    } finally {
      a.close();
      http.close();
    }
  });
});
