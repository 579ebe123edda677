// The agent's systemd unit: the settings that keep its memory out of dumps, swap and
// other programs' reach.
import path from 'node:path';
import type { HostCheck } from './host.js';
import { Host } from './host.js';

// ---- the agent's systemd unit ----

const UNIT_FILES = ['lethe-agent@.service', 'lethe-agent.service'];
const unitDirs = (home: string) => [path.join(home, '.config/systemd/user'), '/etc/systemd/user', '/usr/lib/systemd/user', '/etc/systemd/system', '/usr/lib/systemd/system'];

/** Settings the unit must have (a fail without) and should have (a warning): name, value, what goes wrong without. */
const UNIT_MUST: [string, string, string][] = [
  ['LimitCORE', '0', 'a crash of the agent or QEMU may write keys and guest RAM to a core file'],
  ['NoNewPrivileges', 'yes', 'a program the agent or QEMU runs may gain privileges through a setuid binary'],
  ['ProtectSystem', 'strict', 'the agent and its QEMU may write wherever their user can'],
  ['PrivateTmp', 'yes', "the agent's run dir (QEMU's sockets, the state FIFO) is in the /tmp every program shares"],
];
const UNIT_SHOULD: [string, string, string][] = [
  ['UMask', '0077', 'files the agent makes may be readable by other users'],
  ['RestrictSUIDSGID', 'yes', 'the agent may make setuid files'],
];

/** systemd's booleans, as one spelling. */
const unitValue = (v: string) => (/^(yes|true|on|1)$/i.test(v) ? 'yes' : /^(no|false|off)$/i.test(v) ? 'no' : v === '0:0' ? '0' : v);

/** The [Service] settings of a unit file and its drop-ins (`FILE.d/*.conf`, in order; the last one set wins). */
function unitSettings(h: Host, file: string): Map<string, string> {
  const out = new Map<string, string>();
  const texts = [h.read(file), ...h.list(`${file}.d`).filter((f) => f.endsWith('.conf')).map((f) => h.read(`${file}.d/${f}`))];
  for (const text of texts) {
    let service = false;
    for (const raw of (text ?? '').split('\n')) {
      const l = raw.trim();
      if (!l || l.startsWith('#') || l.startsWith(';')) continue;
      if (l.startsWith('[')) {
        service = l === '[Service]';
        continue;
      }
      const eq = l.indexOf('=');
      if (service && eq > 0) out.set(l.slice(0, eq).trim(), unitValue(l.slice(eq + 1).trim()));
    }
  }
  return out;
}

export function checkAgentUnit(h: Host): Omit<HostCheck, 'id'> {
  const dirs = unitDirs(h.home);
  const file = dirs.flatMap((d) => UNIT_FILES.map((f) => path.join(d, f))).find((f) => h.exists(f));
  if (!file) {
    return {
      status: 'warn',
      found: `no lethe-agent unit is installed (looked in ${dirs.join(', ')}): an agent started from a shell has none of its limits`,
      fix: 'cp agent/lethe-agent.service ~/.config/systemd/user/lethe-agent@.service && systemctl --user daemon-reload (then run the agent as lethe-agent@IMAGE)',
    };
  }
  const set = unitSettings(h, file);
  const lacking = (wanted: [string, string, string][]) => wanted.filter(([k, v]) => set.get(k) !== v);
  const must = lacking(UNIT_MUST);
  const should = lacking(UNIT_SHOULD);
  const fix = (l: [string, string, string][]) => `add to [Service] in ${file} (or a drop-in in ${file}.d/): ${l.map(([k, v]) => `${k}=${v}`).join(' ')}; then systemctl daemon-reload (--user for a user unit)`;
  const say = (l: [string, string, string][]) => l.map(([k, v, why]) => `${k} is ${set.has(k) ? set.get(k) : 'not set'}, not ${v}: ${why}`).join('; ');
  if (must.length > 0) return { status: 'fail', found: `${file}: ${say(must)}`, fix: fix([...must, ...should]) };
  if (should.length > 0) return { status: 'warn', found: `${file}: ${say(should)}`, fix: fix(should) };
  return { status: 'ok', found: `${file} has ${[...UNIT_MUST, ...UNIT_SHOULD].map(([k, v]) => `${k}=${v}`).join(', ')}`, fix: '' };
}

