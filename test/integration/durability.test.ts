// A restart keeps devices, images, leases and the chain; a SIGKILL at any
// moment loses nothing the server had acknowledged.
import { expect } from 'chai';
import { testBackend } from '../helpers/pg.js';
import { LetheError } from '../../common/errors.js';
import { admin, assign, enrolledDevice, pushImage, rejects, testUnlock } from '../helpers/fixtures.js';
import { signRequest } from '../../common/signing.js';
import { lethe, startServer, type ServerProc } from '../helpers/proc.js';
import { expectSameBytes } from '../helpers/bytes.js';

describe('durability (real server process)', function () {
  this.timeout(120_000);

  it('a restart keeps devices, images, leases and the chain', async () => {
    let s = await startServer();
    try {
      const img = await pushImage(s, 'kept', { chunks: 2 });
      const d = await enrolledDevice(s);
      await assign(s, d.deviceId, 'kept');
      const lease = await d.client.lease('kept');
      await d.client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }]);
      const before = JSON.parse((await lethe(['audit', 'verify', '--json'], s.env)).stdout) as { entries: number; checkpoints: number };
      const devicesBefore = (await lethe(['admin', 'devices', '--json'], s.env)).stdout;
      d.close();

      await s.stop();
      s = await s.restart();

      expect((await lethe(['admin', 'devices', '--json'], s.env)).stdout).to.equal(devicesBefore);
      const a = admin(s);
      const images = await a.json<{ images: { name: string; current: number }[] }>('GET', '/images');
      a.close();
      expect(images.images).to.deep.include.members([{ ...images.images.find((i) => i.name === 'kept')!, current: img.version }]);
      // The same device home and the same lease carry on.
      const again = await enrolledDeviceFromHome(d.home);
      const renewed = await again.client.renew(lease.leaseId);
      expect(renewed.leaseId).to.equal(lease.leaseId);
      expect((await again.client.keys(lease.leaseId, [{ kind: 'mem', index: 2 }])).chunks).to.have.length(1);
      again.close();

      const after = JSON.parse((await lethe(['audit', 'verify', '--json'], s.env)).stdout) as { ok: boolean; entries: number; checkpoints: number };
      expect(after.ok).to.equal(true);
      expect(after.entries).to.equal(before.entries + 2);
      expect(after.checkpoints, 'the head checkpoint moved with the head').to.equal(before.checkpoints);
    } finally {
      await s.stop();
    }
  });

  it('a discarded draft whose version number comes back gets its own key, across a restart', async () => {
    let s = await startServer();
    try {
      const a = admin(s);
      await a.json('POST', '/images', { name: 'redo' });
      const first = await a.json<{ version: number }>('POST', '/images/redo/versions', { sizes: { disk: 0, mem: 8192, state: 0 } });
      await a.put(`/images/redo/versions/${first.version}/chunks/mem/0`, Buffer.alloc(4096, 7));
      a.close();
      // Different sizes discard that draft; the same version number is opened again.
      const img = await pushImage(s, 'redo', { plain: { disk: Buffer.alloc(0), mem: Buffer.alloc(4096, 9), state: Buffer.alloc(0) } });
      expect(img.version).to.equal(first.version);
      await s.stop();
      s = await s.restart();
      const d = await enrolledDevice(s);
      await assign(s, d.deviceId, 'redo');
      const lease = await d.client.lease('redo');
      const keys = await d.client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }]);
      const [blob] = await d.client.chunks(lease.leaseId, [{ kind: 'mem', index: 0 }]);
      const { openSealed, wipe } = await import('../../common/crypto.js');
      const { decryptChunkInto } = await import('../../common/chunk.js');
      const key = openSealed(d.id.box, Buffer.from(keys.sealed, 'base64url'));
      const out = Buffer.alloc(4096);
      decryptChunkInto(out, key, { imageId: Buffer.from(lease.imageId, 'hex'), gen: keys.chunks[0].gen, kind: 'mem', index: 0, cls: 'sensitive' }, blob);
      expectSameBytes(out, Buffer.alloc(4096, 9));
      wipe(key);
      d.close();
    } finally {
      await s.stop();
    }
  });

  it('a request replayed after a restart is refused (SQLite: nonces in memory, older requests stale; PostgreSQL: nonces in the database)', async () => {
    let s = await startServer();
    try {
      const d = await enrolledDevice(s);
      const body = Buffer.from('{}');
      const h = signRequest(d.id.sign.secretKey, d.deviceId, 'POST', '/v1/device/heartbeat', body);
      const send = () => d.client.http.request('POST', '/v1/device/heartbeat', { body, headers: { ...h, 'content-type': 'application/json' } });
      expect((await send()).status).to.equal(200);
      await s.kill9();
      s = await s.restart();
      d.client.http.close();
      const e = await rejects(send());
      expect([e.status, e.code]).to.deep.equal([401, testBackend() === 'postgres' ? 'SIGNATURE_REPLAYED' : 'SIGNATURE_STALE']);
      // A request signed after the restart goes through.
      expect((await d.client.heartbeat()).status).to.equal('active');
      d.close();
    } finally {
      await s.stop();
    }
  });

  it('SIGKILL at any moment loses nothing acknowledged and leaves the chain intact', async () => {
    let s = await startServer();
    await pushImage(s, 'busy', { chunks: 4 });
    const acknowledged = { devices: new Set<string>(), keyReleases: 0 };
    try {
      for (const killAfterMs of [150, 700, 1300]) {
        const stop = { now: false };
        const workers = Array.from({ length: 4 }, async (_, w) => {
          while (!stop.now) {
            try {
              const d = await enrolledDevice(s, `w${w}`);
              acknowledged.devices.add(d.deviceId);
              await assign(s, d.deviceId, 'busy');
              const lease = await d.client.lease('busy');
              for (let i = 0; i < 5 && !stop.now; i++) {
                await d.client.keys(lease.leaseId, [{ kind: 'mem', index: 2 * (i % 4) }]);
                acknowledged.keyReleases++;
              }
              d.close();
            } catch (e) {
              if (!(e instanceof LetheError) || e.code !== 'SERVER_UNREACHABLE') {
                if (!stop.now) throw e;
              }
            }
          }
        });
        await new Promise((r) => setTimeout(r, killAfterMs));
        await s.kill9();
        stop.now = true;
        await Promise.all(workers);
        s = await s.restart();
        const v = JSON.parse((await lethe(['audit', 'verify', '--json'], s.env)).stdout) as { ok: boolean; reason?: string };
        expect(v.ok, v.reason).to.equal(true);
      }
      const listed = JSON.parse((await lethe(['admin', 'devices', '--json'], s.env)).stdout) as { devices: { id: string }[] };
      const ids = new Set(listed.devices.map((d) => d.id));
      for (const id of acknowledged.devices) expect(ids.has(id), `device ${id} was acknowledged`).to.equal(true);
      const { serverDb } = await import('../helpers/server-db.js');
      const db = await serverDb(s);
      const releases = (await db.sql.get<{ n: number }>("SELECT COUNT(*) AS n FROM audit WHERE type = 'keys.release'"))!.n;
      await db.close();
      expect(releases).to.be.at.least(acknowledged.keyReleases);
      expect(acknowledged.devices.size).to.be.greaterThan(0);
    } finally {
      await s.stop();
    }
  });
});

async function enrolledDeviceFromHome(home: string) {
  const { loadIdentity } = await import('../../agent/keys/identity.js');
  const { DeviceClient } = await import('../../agent/remote/device-client.js');
  const id = await loadIdentity(home, testUnlock());
  const client = new DeviceClient(id);
  return { client, close: () => client.close() };
}

export type { ServerProc };
