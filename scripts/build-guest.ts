// Builds (or checks the cache of) the test guest under build/guest/:
//   node --import tsx scripts/build-guest.ts [--force] [--json]
import { buildGuest } from '../guest-driver/build.js';
import { reportError } from '../cli/output.js';

const args = process.argv.slice(2);
const json = args.includes('--json');

try {
  const t0 = performance.now();
  const g = await buildGuest({ force: args.includes('--force'), log: (l) => process.stderr.write(`lethe guest: ${l}\n`) });
  const seconds = (performance.now() - t0) / 1000;
  if (json) process.stdout.write(JSON.stringify({ ...g, seconds }) + '\n');
  else {
    const what = g.built ? `built in ${seconds.toFixed(1)} s` : 'up to date';
    process.stdout.write(`test guest ${what}: ${g.dir} (kernel ${g.kernelRelease}, ${g.modules.length} modules)\n`);
  }
} catch (e) {
  process.exitCode = reportError(e, json);
}
