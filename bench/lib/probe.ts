// A process of its own that asks a server for /healthz every 20 ms until its stdin
// closes, then prints the longest any answer took: how long the server's event loop
// kept its other requests waiting, measured outside the process that loads it.
//
//   node --import tsx bench/lib/probe.ts URL FINGERPRINT     (prints "ready", then the longest wait in ms)
import { PinnedClient } from '../../common/http-client.js';

const c = new PinnedClient(process.argv[2], process.argv[3]);
let done = false;
let longest = 0;
process.stdin.on('end', () => (done = true)).resume();
await c.request('GET', '/healthz');
process.stdout.write('ready\n');
while (!done) {
  const t0 = performance.now();
  await c.request('GET', '/healthz');
  longest = Math.max(longest, performance.now() - t0);
  await new Promise((r) => setTimeout(r, 20));
}
process.stdout.write(`${longest.toFixed(0)}\n`);
c.close();
