// Prometheus text exposition of a few counters and gauges, written by hand:
// a handful of series does not justify a client library.
import type { NextFunction, Request, Response } from 'express';
import { constantTimeEqual, sha256 } from '../common/crypto.js';
import { LetheError } from '../common/errors.js';

type Labels = Record<string, string>;

function key(name: string, labels: Labels): string {
  const l = Object.entries(labels)
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([k, v]) => `${k}="${v.replace(/["\\\n]/g, '_')}"`)
    .join(',');
  return l ? `${name}{${l}}` : name;
}

export class Metrics {
  private readonly counters = new Map<string, number>();
  private readonly help = new Map<string, string>();
  private readonly gauges: (() => string[] | Promise<string[]>)[] = [];

  describe(name: string, help: string): void {
    this.help.set(name, help);
  }

  inc(name: string, labels: Labels = {}, by = 1): void {
    const k = key(name, labels);
    this.counters.set(k, (this.counters.get(k) ?? 0) + by);
  }

  /** Registers a function that yields gauge lines at scrape time. */
  gauge(fn: () => string[] | Promise<string[]>): void {
    this.gauges.push(fn);
  }

  async render(): Promise<string> {
    const byName = new Map<string, string[]>();
    for (const [k, v] of this.counters) {
      const name = k.split('{')[0];
      if (!byName.has(name)) byName.set(name, []);
      byName.get(name)!.push(`${k} ${v}`);
    }
    const out: string[] = [];
    for (const [name, lines] of [...byName].sort(([a], [b]) => a.localeCompare(b))) {
      if (this.help.has(name)) out.push(`# HELP ${name} ${this.help.get(name)}`);
      out.push(`# TYPE ${name} counter`, ...lines);
    }
    for (const g of this.gauges) out.push(...(await g()));
    return out.join('\n') + '\n';
  }
}

export function gaugeLines(name: string, help: string, values: [Labels, number][]): string[] {
  return [`# HELP ${name} ${help}`, `# TYPE ${name} gauge`, ...values.map(([l, v]) => `${key(name, l)} ${v}`)];
}

/**
 * GET /metrics asks for `token` as a bearer token, compared in constant time; a
 * server started without one does not serve /metrics at all (NOT_FOUND with a hint).
 */
export function metricsAuth(token: string | undefined) {
  const expected = token === undefined ? undefined : sha256(token);
  return (req: Request, _res: Response, next: NextFunction) => {
    if (!expected) {
      throw new LetheError('NOT_FOUND', 'metrics are not served: no metrics token is configured', {
        hint: 'start the server with --metrics-token (or $LETHE_METRICS_TOKEN) and scrape with that bearer token',
      });
    }
    const m = /^Bearer (\S+)$/.exec(req.get('authorization') ?? '');
    if (!m || !constantTimeEqual(sha256(m[1]), expected)) {
      throw new LetheError('METRICS_AUTH_FAILED', 'metrics token missing or wrong', {
        hint: 'scrape with the bearer token the server was started with (--metrics-token, $LETHE_METRICS_TOKEN)',
      });
    }
    next();
  };
}
