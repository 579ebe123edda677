// Live updates of the console: Server-Sent Events that say "something changed"
// (an audit entry appended on any replica, a device connected or gone, a
// heartbeat), and the page fetches its main part again. The database is the
// source, so a change made through any replica reaches every open console.
import type { Response } from 'express';
import type { Ctx } from '../context.js';
import { connectedDevices } from '../push.js';

/** How often this replica looks for a change while a console is open. */
export const CONSOLE_POLL_MS = 1_000;
/** A comment line this often keeps proxies from closing an idle stream. */
const KEEPALIVE_MS = 15_000;
/** How often each stream's session is checked: a stream ends soon after its session does. */
const SESSION_CHECK_MS = 15_000;

export class ConsoleEvents {
  /** Each open stream, with the check that its session still holds. */
  private readonly clients = new Map<Response, () => Promise<boolean>>();
  private lastSessionCheck = 0;
  private timer?: NodeJS.Timeout;
  private last = '';
  private lastSent = 0;
  private ticking = false;

  constructor(private readonly ctx: Ctx) {}

  /**
   * Streams changes to `res` until the client goes. `ready` is sent once the
   * state it is compared with is read: a change after it is never missed.
   */
  async add(res: Response, alive: () => Promise<boolean>): Promise<void> {
    res.status(200).set({ 'content-type': 'text/event-stream', 'cache-control': 'no-store', 'x-accel-buffering': 'no' });
    res.flushHeaders();
    let gone = false;
    res.on('close', () => {
      gone = true;
      this.clients.delete(res);
      if (this.clients.size === 0) this.stop();
    });
    if (this.clients.size === 0) this.last = await this.state();
    if (gone) return;
    res.write('retry: 2000\n\nevent: ready\ndata: {}\n\n');
    this.clients.set(res, alive);
    this.timer ??= setInterval(() => void this.tick(), CONSOLE_POLL_MS);
  }

  get size(): number {
    return this.clients.size;
  }

  private async tick(): Promise<void> {
    if (this.ticking) return;
    this.ticking = true;
    try {
      const key = await this.state();
      const now = Date.now();
      if (key !== this.last) {
        this.last = key;
        this.send(`event: change\ndata: ${JSON.stringify({ at: new Date(now).toISOString() })}\n\n`);
      } else if (now - this.lastSent > KEEPALIVE_MS) {
        this.send(': keepalive\n\n');
      }
      if (now - this.lastSessionCheck > SESSION_CHECK_MS) {
        this.lastSessionCheck = now;
        for (const [res, alive] of [...this.clients]) if (!(await alive())) res.end();
      }
    } catch {
      // The database is away for a moment: the next tick tries again.
    } finally {
      this.ticking = false;
    }
  }

  /** What the open pages show changes when this does. */
  private async state(): Promise<string> {
    const a = await this.ctx.db.get<{ seq: number | null }>('SELECT MAX(seq) AS seq FROM audit');
    const d = await this.ctx.db.get<{ seen: number | null }>('SELECT MAX(last_seen) AS seen FROM devices');
    const connected = [...(await connectedDevices(this.ctx))].sort().join(',');
    return `${a?.seq ?? 0}|${d?.seen ?? 0}|${connected}`;
  }

  private send(chunk: string): void {
    this.lastSent = Date.now();
    for (const res of this.clients.keys()) res.write(chunk);
  }

  private stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
    this.last = '';
  }

  close(): void {
    for (const res of this.clients.keys()) res.end();
    this.clients.clear();
    this.stop();
  }
}
