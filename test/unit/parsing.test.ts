// Parsers that face people: durations, times, tokens, fingerprints, policies, canonical JSON.
import { expect } from 'chai';
import { canonical } from '../../common/audit-hash.js';
import { parseDuration, parseSince } from '../../common/duration.js';
import { LetheError } from '../../common/errors.js';
import { decodeEnrollToken, encodeEnrollToken, normalizeFingerprint } from '../../common/tokens.js';
import { classOf, parsePolicy, storedPolicy } from '../../policies/policy.js';
import { DEFAULT_FULL_POLICY } from '../../policies/schema.js';
import { ranges } from '../../server/leases.js';

describe('parsing', () => {
  it('durations with units, and a clear error otherwise', () => {
    expect(parseDuration('90s')).to.equal(90_000);
    expect(parseDuration('15m')).to.equal(900_000);
    expect(parseDuration('1.5h')).to.equal(5_400_000);
    expect(parseDuration('7d')).to.equal(604_800_000);
    expect(parseDuration('30')).to.equal(30_000);
    expect(() => parseDuration('soon', '--ttl')).to.throw(LetheError, "bad --ttl: 'soon'");
    expect(() => parseDuration('99999999999999999999h', '--ttl')).to.throw(LetheError, "bad --ttl: '99999999999999999999h' is longer than 36500d");
    expect(() => parseDuration('9'.repeat(400))).to.throw(LetheError, 'is longer than 36500d');
    expect(() => parseDuration('30d', '--heartbeat', { max: 2 ** 31 - 1 })).to.throw(LetheError, "bad --heartbeat: '30d' is longer than 2147483647ms");
    expect(() => parseDuration('0', '--heartbeat', { min: 100 })).to.throw(LetheError, "bad --heartbeat: '0' is shorter than 100ms");
  });

  it('times as ISO or as a duration ago', () => {
    const now = Date.parse('2026-01-02T00:00:00Z');
    expect(parseSince('24h', now)).to.equal(Date.parse('2026-01-01T00:00:00Z'));
    expect(parseSince('2025-12-31T12:00:00Z', now)).to.equal(Date.parse('2025-12-31T12:00:00Z'));
    expect(() => parseSince('last tuesday')).to.throw(LetheError, "bad time: 'last tuesday'");
    expect(() => parseSince('20000d', now)).to.not.throw();
    expect(() => parseSince('30000d', now)).to.throw(LetheError, "bad time: '30000d' is before 1970");
    expect(() => parseSince('1969-12-31T23:59:59Z', now)).to.throw(LetheError, "bad time: '1969-12-31T23:59:59Z' is before 1970");
  });

  it('enrollment tokens round-trip and junk is named', () => {
    const t = encodeEnrollToken({ u: 'https://127.0.0.1:7443', f: 'a'.repeat(64), s: 'secret-secret-secret' });
    expect(decodeEnrollToken(`  ${t}\n`)).to.deep.equal({ v: 1, u: 'https://127.0.0.1:7443', f: 'a'.repeat(64), s: 'secret-secret-secret' });
    expect(() => decodeEnrollToken('lethe-enroll-!!!')).to.throw(LetheError, "not an enrollment token: 'lethe-enroll-!!!'");
  });

  it('fingerprints in colon or plain form', () => {
    const hex = 'AB'.repeat(32);
    expect(normalizeFingerprint(hex.match(/../g)!.join(':'))).to.equal('ab'.repeat(32));
    expect(() => normalizeFingerprint('abc')).to.throw(LetheError, "not a SHA-256 certificate fingerprint: 'abc'");
  });

  it('policies: defaults, overrides, and errors that name the line and field', () => {
    expect(parsePolicy(undefined)).to.deep.equal(DEFAULT_FULL_POLICY);
    const p = parsePolicy('lease:\n  ttl: 10m\n  renew: 2m\nsensitive:\n  memory: false\n  disk: [[0, 131072]]\n');
    expect(p).to.deep.include({ leaseTtlMs: 600_000, renewAfterMs: 120_000, sensitiveMemory: false });
    expect(classOf(p, 'disk', 0, 131072)).to.equal('sensitive');
    expect(classOf(p, 'disk', 131072, 131072)).to.equal('normal');
    expect(classOf(p, 'mem', 0, 4096)).to.equal('normal');
    expect(() => parsePolicy('lease:\n  ttl: 10m\nsensitive:\n  memory: "yes"\n', 'strict.yaml')).to.throw(
      LetheError,
      "strict.yaml:4: sensitive.memory: expected all, hinted or none, got 'yes'",
    );
    expect(() => parsePolicy('lease:\n  ttl: 1m\n  renew: 5m\n', 'p.yaml')).to.throw(LetheError, 'p.yaml:3: lease.renew: must be shorter than lease.ttl (5 min ≥ 1 min)');
    expect(() => parsePolicy('lease: [\n', 'broken.yaml')).to.throw(LetheError, /^broken\.yaml:\d+: /);
  });

  it('canonical JSON sorts keys and drops undefined', () => {
    expect(canonical({ b: 1, a: [3, { d: undefined, c: 'x' }], e: null })).to.equal('{"a":[3,{"c":"x"}],"b":1,"e":null}');
  });

  it("canonical JSON writes an array of plain values (a manifest's chunk lists) as element by element", () => {
    // canonical() as it is defined: element by element, keys sorted.
    const reference = (v: unknown): string => {
      if (v === null || typeof v !== 'object') return JSON.stringify(v) ?? 'null';
      if (Array.isArray(v)) return `[${v.map(reference).join(',')}]`;
      const o = v as Record<string, unknown>;
      const keys = Object.keys(o).filter((k) => o[k] !== undefined).sort();
      return `{${keys.map((k) => `${JSON.stringify(k)}:${reference(o[k])}`).join(',')}}`;
    };
    const strings = ['', 'normal', 'a"b\\c', 'é✓', '\u0000\n\t', '\ud800', 'x'.repeat(43)];
    const values = [0, -0, 1.5, -7, 2 ** 40, 1e-7, true, false, null, undefined, ...strings];
    let seed = 7;
    const pick = <T>(xs: T[]) => xs[(seed = (seed * 1103515245 + 12345) % 2 ** 31) % xs.length];
    const tree = (depth: number): unknown[] =>
      Array.from({ length: pick([0, 1, 2, 4]) }, () => (depth > 0 && pick([true, false]) ? tree(depth - 1) : pick([...values, { b: 1, a: [2] }])));
    for (let i = 0; i < 500; i++) {
      const t = tree(3);
      expect(canonical(t), JSON.stringify(t)).to.equal(reference(t));
    }
    expect(canonical([[1, 3, 'normal', 'h']])).to.equal('[[1,3,"normal","h"]]');
    expect(() => canonical([1, [NaN]]), 'a non-finite number is refused, shortcut or not').to.throw(TypeError);
  });

  it('audit chunk lists compress to ranges', () => {
    const refs = [5, 1, 2, 3, 9].map((index) => ({ kind: 'mem' as const, index }));
    expect(ranges([...refs, { kind: 'disk', index: 0 }])).to.deep.equal({ mem: [[1, 3], [5, 5], [9, 9]], disk: [[0, 0]] });
  });

  it("a stored policy is read, not judged again: a check it fails now does not lock devices out", () => {
    const text = 'sensitive:\n  disk: [[0, 100], [50, 200]]\n'; // overlapping ranges: an error for new policies
    expect(() => parsePolicy(text, 'p.yaml')).to.throw(LetheError, /overlaps/);
    const p = storedPolicy(text);
    expect(p.sensitiveDisk).to.deep.equal([[0, 100], [50, 200]]);
    expect(storedPolicy(text), 'read once per text').to.equal(p);
    expect(storedPolicy(null)).to.equal(DEFAULT_FULL_POLICY);
  });
});
