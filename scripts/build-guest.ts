// Builds (or checks the cache of) the test guests under build/guest/:
//   node --import tsx scripts/build-guest.ts [--debian] [--force] [--json]
// --debian: the Debian 12 guest too (build/guest/debian, as root; docs/debian-guest.md).
import { buildGuest } from '../guest-driver/build.js';
import { buildDebianGuest } from '../guest-driver/debian.js';
import { reportError } from '../cli/output.js';

const args = process.argv.slice(2);
const json = args.includes('--json');
const log = (l: string) => process.stderr.write(`lethe guest: ${l}\n`);

try {
  const t0 = performance.now();
  const force = args.includes('--force');
  const g = await buildGuest({ force, log });
  const seconds = () => (performance.now() - t0) / 1000;
  const what = (built: boolean) => (built ? `built in ${seconds().toFixed(1)} s` : 'up to date');
  if (!json) process.stdout.write(`test guest ${what(g.built)}: ${g.dir} (kernel ${g.kernelRelease}, ${g.modules.length} modules)\n`);
  const d = args.includes('--debian') ? await buildDebianGuest({ force, log }) : undefined;
  if (d && !json) process.stdout.write(`Debian guest ${what(d.built)}: ${d.disk} (driver package ${d.deb})\n`);
  if (json) process.stdout.write(JSON.stringify({ ...g, debian: d, seconds: seconds() }) + '\n');
} catch (e) {
  process.exitCode = reportError(e, json);
}
