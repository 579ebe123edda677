// Trace-learned prefetch order: the aggregation on its own, then uploads and
// orders through a real server process — one slot per device, an untrusted
// device's traces reaching no other device however many it uploads (issue
// #14), a trusted device's joining and leaving, carry-over to another version,
// the newest few trusted kept, bad traces refused with nothing stored, revoked
// devices and ended leases refused.
import { expect } from 'chai';
import path from 'node:path';
import { sha256 } from '../../common/crypto.js';
import { signRequest } from '../../common/signing.js';
import { HDR_TOUCH_CURVE, HDR_TRACES, MAX_CURVE_POINTS, TIMED_TRACE_CONTENT_TYPE, TraceUploadResponse, TrustResponse, decodePages, encodeCurve, encodePages, parseCurve } from '../../common/wire.js';
import { MAX_TRACE_BODY, TRACES_KEPT, aggregateOrder, touchCurve } from '../../server/traces.js';
import { admin, assign, enrolledDevice, pushImage, rejects, type TestDevice } from '../helpers/fixtures.js';
import { lethe, startServer, tmpDir, type ServerProc } from '../helpers/proc.js';
import { migrate } from '../../server/db.js';
import { serverDb } from '../helpers/server-db.js';
import { openSqlite } from '../../server/sql.js';

const pages = (...p: number[]) => Uint32Array.from(p);
const list = (a: Uint32Array) => Array.from(a);

/** The definition, written plainly, to hold the fast version to. */
function referenceOrder(traces: Uint32Array[], memChunks: number): number[] {
  const score = new Map<number, { sum: number; held: number }>();
  for (const t of traces) {
    const first = new Map<number, number>();
    t.forEach((p, i) => {
      if (p < memChunks && !first.has(p)) first.set(p, i / t.length);
    });
    for (const [p, r] of first) {
      const s = score.get(p) ?? { sum: 0, held: 0 };
      s.sum += r;
      s.held++;
      score.set(p, s);
    }
  }
  const mean = (p: number) => (score.get(p)!.sum + (traces.length - score.get(p)!.held)) / traces.length;
  return [...score.keys()].sort((a, b) => mean(a) - mean(b) || score.get(b)!.held - score.get(a)!.held || a - b);
}

describe('trace aggregation', () => {
  it('is empty without traces or without memory', () => {
    expect(list(aggregateOrder([], 16))).to.deep.equal([]);
    expect(list(aggregateOrder([pages(1, 2)], 0))).to.deep.equal([]);
  });

  it('one trace gives its own order', () => {
    expect(list(aggregateOrder([pages(7, 2, 9, 0)], 16))).to.deep.equal([7, 2, 9, 0]);
  });

  it('scores by mean normalised rank, a missing page ranking 1.0', () => {
    // 1: (1/4 + 0)/2, 3: (0 + 1/3)/2, 12: (2/4 + 1)/2, 5: (1 + 2/3)/2, 0: (3/4 + 1)/2
    expect(list(aggregateOrder([pages(3, 1, 12, 0), pages(1, 3, 5)], 16))).to.deep.equal([1, 3, 12, 5, 0]);
  });

  it('breaks ties by how many traces hold the page, then by index', () => {
    // 6: 1/2 + 2/4 = 1, 2: 1 + 0 = 1, 5: 0 + 1 = 1; 6 is in both traces
    expect(list(aggregateOrder([pages(5, 6), pages(2, 3, 6, 4)], 16))).to.deep.equal([6, 2, 5, 3, 4]);
    expect(list(aggregateOrder([pages(0, 1), pages(1, 0)], 16))).to.deep.equal([0, 1]);
  });

  it('leaves out pages past the memory, which still count in their trace length', () => {
    expect(list(aggregateOrder([pages(9, 1, 20)], 10))).to.deep.equal([9, 1]);
    expect(list(aggregateOrder([pages(9, 1, 20)], 5))).to.deep.equal([1]);
    // 1 ranks 1/3 in the first trace, so the second trace's 2 (rank 0) beats it.
    expect(list(aggregateOrder([pages(9, 1, 20), pages(2)], 5))).to.deep.equal([2, 1]);
  });

  it('agrees with the plain definition on random traces', () => {
    let seed = 7;
    const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) % n);
    /** Up to `length` distinct pages below `range` in random order: a trace the server accepts for a version of `range` pages. */
    const trace = (length: number, range: number) => {
      const pool = Array.from({ length: range }, (_, i) => i);
      for (let i = range - 1; i > 0; i--) {
        const j = rand(i + 1);
        [pool[i], pool[j]] = [pool[j], pool[i]];
      }
      return Uint32Array.from(pool.slice(0, length));
    };
    for (let round = 0; round < 50; round++) {
      const mem = 1 + rand(200);
      const traces = Array.from({ length: rand(9) }, () => trace(1 + rand(150), mem + 20));
      expect(list(aggregateOrder(traces, mem)), `round ${round}`).to.deep.equal(referenceOrder(traces, mem));
    }
  });

  it('page lists travel as little-endian uint32', () => {
    const body = encodePages(pages(1, 0x01020304));
    expect(body.toString('hex')).to.equal('0100000004030201');
    expect(list(decodePages(Buffer.concat([Buffer.alloc(1), body]).subarray(1)))).to.deep.equal([1, 0x01020304]);
    expect(() => decodePages(Buffer.alloc(7))).to.throw('7 bytes is not a whole number of 4-byte page indices');
  });
});

describe('touch curves', () => {
  const times = (...t: number[]) => Uint32Array.from(t);

  it('is empty when no trace has times', () => {
    expect(touchCurve([])).to.deep.equal([]);
    expect(touchCurve([{ pages: pages(1, 2) }])).to.deep.equal([]);
  });

  it('lists every count of a short trace, and the earliest time over traces at each', () => {
    expect(touchCurve([{ pages: pages(4, 2, 9), times: times(0, 5, 40) }])).to.deep.equal([[1, 0], [2, 5], [3, 40]]);
    const curve = touchCurve([
      { pages: pages(4, 2, 9), times: times(10, 20, 30) },
      { pages: pages(1, 2), times: times(0, 25) },
      { pages: pages(7, 8, 9, 10) },
    ]);
    // count 3: only the first trace reached it; the untimed one does not count.
    expect(curve).to.deep.equal([[1, 0], [2, 20], [3, 30]]);
  });

  it(`samples a long trace at ${MAX_CURVE_POINTS} counts, the last its length, never going back`, () => {
    const n = 10_000;
    const t = Uint32Array.from({ length: n }, (_, i) => Math.floor(i / 7));
    const curve = touchCurve([{ pages: Uint32Array.from({ length: n }, (_, i) => i), times: t }]);
    expect(curve).to.have.length(MAX_CURVE_POINTS);
    expect(curve.at(-1)).to.deep.equal([n, t[n - 1]]);
    for (const [k, ms] of curve) expect(ms).to.equal(t[k - 1]);
    expect(parseCurve(encodeCurve(curve))).to.deep.equal(curve);
  });

  it('travels as count:ms pairs; a malformed header is refused with what is wrong', () => {
    expect(encodeCurve([[1, 0], [64, 12]])).to.equal('1:0,64:12');
    expect(parseCurve('')).to.deep.equal([]);
    expect(() => parseCurve('1:0,x')).to.throw("'x' is not a count:ms pair");
    expect(() => parseCurve('5:10,3:20')).to.throw('point 1 does not follow point 0');
    expect(() => parseCurve('1:10,3:5')).to.throw('point 1 does not follow point 0');
    expect(() => parseCurve(Array.from({ length: MAX_CURVE_POINTS + 1 }, (_, i) => `${i + 1}:${i}`).join(','))).to.throw(`more than ${MAX_CURVE_POINTS}`);
  });
});

describe('traces table', () => {
  it("goes with its image: a trace or a trusted tracer never blocks removing one", async () => {
    const sql = openSqlite(path.join(tmpDir(), 'lethe.db'));
    await migrate(sql, 'sqlite');
    const db = sql.raw;
    try {
      db.exec(`INSERT INTO images(id, name, created_at, dedup_key_wrapped) VALUES ('i1', 'desk', 0, x'00');
        INSERT INTO devices(id, name, sign_pk, box_pk, enrolled_at) VALUES ('dev-1', 'alice', x'00', x'00', 0);
        INSERT INTO traces(image_id, version, device_id, lease_id, created_at, pages, data) VALUES ('i1', 1, 'dev-1', 'lease-1', 0, 1, x'01000000');`);
      db.exec("INSERT INTO trusted_tracers(image_id, device_id, trusted_at) VALUES ('i1', 'dev-1', 0);");
      db.exec("DELETE FROM images WHERE id = 'i1'");
      expect(db.prepare('SELECT COUNT(*) AS n FROM traces').get()).to.deep.equal({ n: 0 });
      expect(db.prepare('SELECT COUNT(*) AS n FROM trusted_tracers').get(), 'nor does a trusted tracer').to.deep.equal({ n: 0 });
    } finally {
      db.close();
    }
  });
});

/** A server with image 'desk' (16 memory pages) assigned to two enrolled devices, alice and bob. */
async function deskWithTwoDevices() {
  const s = await startServer();
  await pushImage(s, 'desk', { chunks: 8 });
  const dev = await enrolledDevice(s, 'alice');
  const other = await enrolledDevice(s, 'bob');
  await assign(s, dev.deviceId, 'desk');
  await assign(s, other.deviceId, 'desk');
  return { s, dev, other };
}

describe('trace upload and prefetch order (real server process)', function () {
  this.timeout(60_000);
  let s: ServerProc;
  let dev: TestDevice;
  let other: TestDevice;
  let lease1: string;
  let lease2: string;
  let otherLease: string;

  before(async () => {
    ({ s, dev, other } = await deskWithTwoDevices());
    lease1 = (await dev.client.lease('desk')).leaseId;
    lease2 = (await dev.client.lease('desk')).leaseId;
    otherLease = (await other.client.lease('desk')).leaseId;
  });
  after(async () => {
    dev?.close();
    other?.close();
    await s?.stop();
  });

  /** The order and the number of traces it came from, as the server answers them. */
  async function order(d: TestDevice, leaseId: string) {
    const res = await d.client.signed('GET', `/v1/device/leases/${leaseId}/prefetch`);
    expect(res.headers['content-type']).to.equal('application/octet-stream');
    return { order: list(decodePages(res.body)), traces: Number(res.headers[HDR_TRACES]) };
  }

  async function auditRows(type: string): Promise<{ device: string | null; data: Record<string, unknown> }[]> {
    const db = await serverDb(s);
    try {
      const rows = await db.sql.all<{ device: string | null; data: string }>('SELECT device, data FROM audit WHERE type = ? ORDER BY seq', type);
      return rows.map((r) => ({ device: r.device, data: JSON.parse(r.data) as Record<string, unknown> }));
    } finally {
      await db.close();
    }
  }
  const audited = async (type: string) => (await auditRows(type)).map((r) => r.data);

  async function trust(deviceId: string, trusted: boolean) {
    const a = admin(s);
    try {
      return await a.json<{ changed: boolean }>(trusted ? 'PUT' : 'DELETE', `/images/desk/trusted/${deviceId}`);
    } finally {
      a.close();
    }
  }

  it('is empty before any trace', async () => {
    expect(await order(dev, lease1)).to.deep.equal({ order: [], traces: 0 });
    expect(await dev.client.prefetchOrder(lease1)).to.deep.equal({ order: new Uint32Array(0), curve: [] });
  });

  it("a device's trace gives its own order, and each upload is audited with its count only", async () => {
    const up1 = TraceUploadResponse.parse(await dev.client.uploadTrace(lease1, pages(3, 1, 12, 0)));
    expect(up1).to.deep.equal({ image: 'desk', version: 1, pages: 4, kept: 1 });
    expect(list((await dev.client.prefetchOrder(lease2)).order)).to.deep.equal([3, 1, 12, 0]);
    expect(await order(other, otherLease), 'not trusted: not in the other device\'s order').to.deep.equal({ order: [], traces: 0 });
  });

  it("a device's newer trace, from any lease, replaces its older one: one slot per device", async () => {
    expect((await dev.client.uploadTrace(lease2, pages(1, 3, 5))).kept).to.equal(1);
    expect(await order(dev, lease2)).to.deep.equal({ order: [1, 3, 5], traces: 1 });
    expect(await order(dev, lease1)).to.deep.equal({ order: [1, 3, 5], traces: 1 });
    expect(await audited('trace.upload')).to.deep.equal([
      { lease: lease1, image: 'desk', version: 1, count: 4 },
      { lease: lease2, image: 'desk', version: 1, count: 3 },
    ]);
  });

  it("issue #14: an untrusted device's traces reach no other device, however many it uploads", async () => {
    for (let i = 0; i < TRACES_KEPT + 2; i++) {
      const l = await other.client.lease('desk');
      expect((await other.client.uploadTrace(l.leaseId, pages(15, 14, 13))).kept, 'one slot each').to.equal(2);
    }
    expect(await order(dev, lease1)).to.deep.equal({ order: [1, 3, 5], traces: 1 });
    expect(await order(other, otherLease), 'its own order is its own trace').to.deep.equal({ order: [15, 14, 13], traces: 1 });
    expect((await other.client.uploadTrace(otherLease, pages(5, 0))).kept).to.equal(2);
    expect(await order(dev, lease1)).to.deep.equal({ order: [1, 3, 5], traces: 1 });
  });

  it("a trusted device's trace joins every device's order, and leaves it when untrusted; both audited", async () => {
    const t = await lethe(['image', 'trust', 'desk', other.deviceId], s.env);
    expect(t).to.deep.equal({ code: 0, stdout: `desk: ${other.deviceId} trusted; its traces now shape every device's prefetch order\n`, stderr: '' });
    // 5: (2/3 + 0)/2, 1: (0 + 1)/2, 3: (1/3 + 1)/2, 0: (1 + 1/2)/2
    expect(await order(dev, lease1)).to.deep.equal({ order: [5, 1, 3, 0], traces: 2 });
    expect(await order(other, otherLease), 'the untrusted one still reaches nobody else').to.deep.equal({ order: [5, 0], traces: 1 });
    expect((await lethe(['image', 'trust', 'desk', other.deviceId], s.env)).stdout).to.equal(`desk: ${other.deviceId} already trusted\n`);
    expect(TrustResponse.parse(await trust(other.deviceId, false))).to.deep.equal({ image: 'desk', device: other.deviceId, trusted: false, changed: true });
    expect(await order(dev, lease1)).to.deep.equal({ order: [1, 3, 5], traces: 1 });
    expect(await trust(other.deviceId, true)).to.deep.include({ changed: true });
    const actor = `token:${sha256(s.adminToken).toString('hex').slice(0, 8)}`;
    expect((await auditRows('image.trust')).concat(await auditRows('image.untrust'))).to.deep.equal([
      { device: other.deviceId, data: { image: 'desk', actor } },
      { device: other.deviceId, data: { image: 'desk', actor } },
      { device: other.deviceId, data: { image: 'desk', actor } },
    ]);
    expect(await auditRows('image.untrust')).to.have.length(1);
    const ls = JSON.parse((await lethe(['image', 'ls', '--json'], s.env)).stdout) as { images: { name: string; trustedTracers: string[] }[] };
    expect(ls.images.find((i) => i.name === 'desk')!.trustedTracers).to.deep.equal([other.deviceId]);
    const e = await rejects(trust('dev-0000000000000000', true));
    expect({ status: e.status, code: e.code }).to.deep.equal({ status: 404, code: 'UNKNOWN_DEVICE' });
  });

  it('a later upload for the same lease replaces its trace', async () => {
    expect((await other.client.uploadTrace(otherLease, pages(12))).kept).to.equal(2);
    // 1 and 12 both score (0 + 1)/2 and are in one trace each: the lower index first.
    expect(await order(dev, lease1)).to.deep.equal({ order: [1, 12, 3, 5], traces: 2 });
  });

  it('refuses bad traces with a stable code and stores nothing', async () => {
    const path = `/v1/device/leases/${lease1}/trace`;
    const raw = (body: Buffer, contentType?: string) => {
      const h = signRequest(dev.id.sign.secretKey, dev.deviceId, 'POST', path, body);
      return dev.client.http.request('POST', path, { body, headers: { ...h, ...(contentType ? { 'content-type': contentType } : {}) } });
    };
    const before = { order: await order(dev, lease1), audit: (await audited('trace.upload')).length };
    const cases: [string, () => Promise<unknown>, number, string, string][] = [
      ['json', () => raw(encodePages(pages(1)), 'application/json'), 400, 'BAD_REQUEST', "a trace must be sent as application/octet-stream or application/vnd.lethe.timed-trace, not 'application/json'"],
      ['odd length', () => raw(Buffer.alloc(6)), 400, 'BAD_REQUEST', 'the trace is 6 bytes, not a multiple of 4'],
      ['empty', () => dev.client.uploadTrace(lease1, pages()), 400, 'BAD_REQUEST', 'the trace is empty'],
      ['past the end', () => dev.client.uploadTrace(lease1, pages(2, 16)), 400, 'BAD_REQUEST', "page 16 at position 1 is past the end of memory (the lease's version has 16 pages)"],
      ['huge index', () => dev.client.uploadTrace(lease1, pages(0xffffffff)), 400, 'BAD_REQUEST', "page 4294967295 at position 0 is past the end of memory (the lease's version has 16 pages)"],
      ['duplicate', () => dev.client.uploadTrace(lease1, pages(4, 7, 8, 7)), 400, 'BAD_REQUEST', 'page 7 appears at positions 1 and 3'],
      ['duplicate, then past the end', () => dev.client.uploadTrace(lease1, pages(7, 7, 16)), 400, 'BAD_REQUEST', 'page 7 appears at positions 0 and 1'],
      ['past the end, then duplicate', () => dev.client.uploadTrace(lease1, pages(7, 16, 7)), 400, 'BAD_REQUEST', "page 16 at position 1 is past the end of memory (the lease's version has 16 pages)"],
      ['oversized', () => raw(Buffer.alloc(MAX_TRACE_BODY + 4)), 413, 'BODY_TOO_LARGE', 'request body is too large'],
      ['unknown lease', () => dev.client.uploadTrace('lease-0000000000000000', pages(1)), 404, 'UNKNOWN_LEASE', "no lease 'lease-0000000000000000' for this device"],
      ["another device's lease", () => dev.client.uploadTrace(otherLease, pages(1)), 404, 'UNKNOWN_LEASE', `no lease '${otherLease}' for this device`],
      ["another device's order", () => dev.client.prefetchOrder(otherLease), 404, 'UNKNOWN_LEASE', `no lease '${otherLease}' for this device`],
    ];
    for (const [what, call, status, code, message] of cases) {
      const e = await rejects(call());
      expect({ status: e.status, code: e.code, message: e.message }, what).to.deep.equal({ status, code, message });
    }
    const dup = await rejects(dev.client.uploadTrace(lease1, pages(4, 4)));
    expect(dup.hint).to.equal('a first-touch trace lists each page once');
    expect({ order: await order(dev, lease1), audit: (await audited('trace.upload')).length }).to.deep.equal(before);
    expect((await dev.client.heartbeat()).status).to.equal('active');
  });

  it("traces carry over to a version with less memory, bounded by that version's pages", async () => {
    await pushImage(s, 'desk', { chunks: 4 }); // version 2: 8 memory pages
    const v2 = await dev.client.lease('desk');
    expect(v2.version).to.equal(2);
    expect(await order(dev, v2.leaseId)).to.deep.equal({ order: [1, 3, 5], traces: 2 });
    const e = await rejects(dev.client.uploadTrace(v2.leaseId, pages(12)));
    expect(e.message).to.equal("page 12 at position 0 is past the end of memory (the lease's version has 8 pages)");
    // The version-1 lease still sees its own bound.
    expect((await order(dev, lease1)).order).to.deep.equal([1, 12, 3, 5]);
  });

  it(`an order takes the device's own trace and the newest ${TRACES_KEPT - 1} of trusted devices'`, async () => {
    // Stored so far, oldest first: alice's [1 3 5], bob's [12] (trusted); bob's is the only holder of page 12.
    const a = admin(s);
    const more: TestDevice[] = [];
    try {
      for (let i = 0; i < TRACES_KEPT - 1; i++) {
        const d = await enrolledDevice(s, `lab-${i}`);
        more.push(d);
        await assign(s, d.deviceId, 'desk');
        await a.json('PUT', `/images/desk/trusted/${d.deviceId}`);
        const l = await d.client.lease('desk');
        expect((await d.client.uploadTrace(l.leaseId, pages(2))).kept).to.equal(3 + i);
      }
    } finally {
      a.close();
      for (const d of more) d.close();
    }
    const l = await dev.client.lease('desk');
    expect(await order(dev, l.leaseId)).to.deep.equal({ order: [2, 1, 3, 5], traces: TRACES_KEPT });
    const db = await serverDb(s);
    try {
      expect(await db.sql.get('SELECT lease_id FROM traces WHERE lease_id = ?', lease1)).to.equal(undefined);
      expect((await db.sql.get<{ n: number }>('SELECT COUNT(*) AS n FROM traces'))!.n).to.equal(TRACES_KEPT + 1);
      expect(await db.sql.get('SELECT MAX(n) AS most FROM (SELECT COUNT(*) AS n FROM traces GROUP BY device_id) AS per_device')).to.deep.equal({ most: 1 });
    } finally {
      await db.close();
    }
  });

  it('an ended lease is refused', async () => {
    const a = admin(s);
    try {
      await a.json('DELETE', `/devices/${dev.deviceId}/assignments/desk`);
      await a.json('POST', `/devices/${dev.deviceId}/assignments`, { image: 'desk' });
    } finally {
      a.close();
    }
    for (const call of [() => dev.client.uploadTrace(lease2, pages(1)), () => dev.client.prefetchOrder(lease2)]) {
      const e = await rejects(call());
      expect({ status: e.status, code: e.code }).to.deep.equal({ status: 403, code: 'LEASE_EXPIRED' });
    }
  });

  it('a revoked device is refused, and its trace leaves the other devices\' orders though it stays trusted', async () => {
    // bob (trusted) uploads the newest trace, the only one that holds page 6.
    await other.client.uploadTrace(otherLease, pages(6));
    const fresh = (await dev.client.lease('desk')).leaseId;
    expect((await order(dev, fresh)).order, 'the trusted device counts while active').to.include(6);
    const a = admin(s);
    try {
      await a.json('POST', `/devices/${other.deviceId}/revoke`);
    } finally {
      a.close();
    }
    const count = (await audited('trace.upload')).length;
    for (const call of [() => other.client.uploadTrace(otherLease, pages(1)), () => other.client.prefetchOrder(otherLease)]) {
      const e = await rejects(call());
      expect({ status: e.status, code: e.code }).to.deep.equal({ status: 403, code: 'DEVICE_REVOKED' });
    }
    expect((await audited('trace.upload')).length).to.equal(count);
    const after = await order(dev, fresh);
    expect(after.order, 'not once it is revoked').to.not.include(6);
    expect(after.traces).to.equal(TRACES_KEPT);
  });
});

describe('timed traces and the touch curve (real server process)', function () {
  this.timeout(60_000);
  let s: ServerProc;
  let dev: TestDevice;
  let other: TestDevice;
  let lease: string;
  let otherLease: string;
  const times = (...t: number[]) => Uint32Array.from(t);

  before(async () => {
    ({ s, dev, other } = await deskWithTwoDevices());
    lease = (await dev.client.lease('desk')).leaseId;
    otherLease = (await other.client.lease('desk')).leaseId;
    expect((await lethe(['image', 'trust', 'desk', other.deviceId], s.env)).code).to.equal(0);
  });
  after(async () => {
    dev?.close();
    other?.close();
    await s?.stop();
  });

  it("a timed upload gives the order and its touch curve; an untimed one joins the order, not the curve", async () => {
    expect((await dev.client.uploadTrace(lease, pages(3, 1, 12), times(0, 40, 90))).pages).to.equal(3);
    const mine = await dev.client.prefetchOrder(lease);
    expect(list(mine.order)).to.deep.equal([3, 1, 12]);
    expect(mine.curve).to.deep.equal([[1, 0], [2, 40], [3, 90]]);
    const res = await dev.client.signed('GET', `/v1/device/leases/${lease}/prefetch`);
    expect(res.headers[HDR_TOUCH_CURVE], 'on the wire').to.equal('1:0,2:40,3:90');

    await other.client.uploadTrace(otherLease, pages(5, 6, 7, 8));
    const both = await dev.client.prefetchOrder(lease);
    expect(both.order).to.have.length(7);
    expect(both.curve, 'the untimed trace adds no point').to.deep.equal([[1, 0], [2, 40], [3, 90]]);

    // The trusted device's newer trace is timed and faster: the curve takes the earliest time at each count.
    await other.client.uploadTrace(otherLease, pages(5, 6, 7, 8), times(0, 10, 20, 30));
    expect((await dev.client.prefetchOrder(lease)).curve).to.deep.equal([[1, 0], [2, 10], [3, 20], [4, 30]]);
  });

  it('refuses a timed trace whose times go back or are not one per page, with a stable code, and stores nothing', async () => {
    const path = `/v1/device/leases/${lease}/trace`;
    const raw = (body: Buffer) => {
      const h = signRequest(dev.id.sign.secretKey, dev.deviceId, 'POST', path, body);
      return dev.client.http.request('POST', path, { body, headers: { ...h, 'content-type': TIMED_TRACE_CONTENT_TYPE } });
    };
    const before = await dev.client.prefetchOrder(lease);
    const cases: [string, () => Promise<unknown>, string][] = [
      ['uneven', () => raw(Buffer.alloc(12)), 'the trace is 12 bytes, not a multiple of 8'],
      ['going back', () => dev.client.uploadTrace(lease, pages(1, 2, 4), times(5, 9, 3)), 'the time at position 2 (3 ms) is earlier than the one before it (9 ms)'],
      ['a page twice', () => dev.client.uploadTrace(lease, pages(2, 2), times(0, 1)), 'page 2 appears at positions 0 and 1'],
      ['past the end', () => dev.client.uploadTrace(lease, pages(16), times(0)), "page 16 at position 0 is past the end of memory (the lease's version has 16 pages)"],
    ];
    for (const [what, call, message] of cases) {
      const e = await rejects(call());
      expect({ status: e.status, code: e.code, message: e.message }, what).to.deep.equal({ status: 400, code: 'BAD_REQUEST', message });
    }
    const uneven = await dev.client.uploadTrace(lease, pages(1, 2), times(0)).then(() => undefined, (e: unknown) => e);
    expect(uneven).to.be.instanceOf(RangeError).with.property('message', 'uploadTrace: 1 times for 2 pages');
    expect(await dev.client.prefetchOrder(lease)).to.deep.equal(before);
  });
});
