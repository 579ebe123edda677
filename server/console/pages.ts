// Console pages other than devices: overview, images and policies, audit,
// administrators, one's own account, login.
import { can, ROLES } from '../accounts.js';
import type { Diagnostic } from '../../policies/index.js';
import type { auditEntries } from '../audit-read.js';
import type { listImages } from '../images.js';
import type { listTokens, listUsers } from '../accounts.js';
import { ago, bytes, html, type Html } from './html.js';
import { badge, bare, live, note, postForm, table, type View } from './layout.js';
import type { DeviceView, chainStatus, keyReleasesPerMinute, recentAlarms, replicas } from './data.js';

type Entries = Awaited<ReturnType<typeof auditEntries>>;

function detailOf(data: Record<string, unknown>): string {
  const { actor: _a, ...rest } = data;
  return Object.entries(rest)
    .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)
    .join(' ')
    .slice(0, 300);
}

export function overviewPage(
  v: View,
  o: {
    devices: DeviceView[];
    releases: Awaited<ReturnType<typeof keyReleasesPerMinute>> | null;
    replicas: Awaited<ReturnType<typeof replicas>>;
    alarms: Awaited<ReturnType<typeof recentAlarms>> | null;
    chain: Awaited<ReturnType<typeof chainStatus>> | null;
  },
): Html {
  const count = (s: string) => o.devices.filter((d) => d.status === s).length;
  const max = Math.max(1, ...(o.releases ?? []).map((r) => r.keys));
  return html`<section aria-labelledby="status-h" data-live-id="status">
<h2 id="status-h">Devices by status</h2>
<ul class="tiles" id="device-counts">
${['active', 'revoked', 'wipe-pending', 'wiped'].map((s) => html`<li><span class="n">${count(s)}</span> ${badge(s)}</li>`)}
<li><span class="n">${o.devices.filter((d) => d.connected).length}</span> connected now</li>
</ul>
</section>
${
  o.releases
    ? html`<section aria-labelledby="rel-h" data-live-id="rel">
<h2 id="rel-h">Key releases per minute</h2>
<table class="bars">
<caption>Chunk keys released to devices in the last ${o.releases.length} minutes (UTC)</caption>
<thead><tr><th scope="col">Minute</th><th scope="col">Keys</th><th scope="col">Of sensitive chunks</th></tr></thead>
<tbody>${o.releases.map(
        (r) =>
          html`<tr><td>${r.minute}</td><td><meter min="0" max="${max}" value="${r.keys}" aria-label="${r.keys} keys at ${r.minute}"></meter> ${r.keys}</td><td>${r.sensitive}</td></tr>`,
      )}</tbody>
</table>
</section>`
    : ''
}
<section aria-labelledby="rep-h" data-live-id="rep">
<h2 id="rep-h">Servers</h2>
${table(
  'Server replicas',
  ['Replica', 'Started', 'Last beat', 'Health', 'Push channels'],
  o.replicas.map((r) => [html`<code>${r.id}</code>`, html`${r.startedAt}`, html`${ago(r.seenAt, v.now)}`, r.healthy ? html`<span class="yes">healthy</span>` : html`<span class="bad">not beating</span>`, html`${r.channels}`]),
  'no replica has recorded itself yet',
)}
</section>
${
  o.alarms
    ? html`<section aria-labelledby="alarm-h" data-live-id="alarm">
<h2 id="alarm-h">Recent alarms</h2>
${
  o.chain && !o.chain.result.ok
    ? note('error', `The audit chain does not verify: entry ${o.chain.result.firstBad ?? '?'}: ${o.chain.result.reason ?? ''} (checked ${o.chain.at})`, "the log was changed outside the server: check it with 'lethe audit verify --against' an exported checkpoint")
    : o.chain
      ? html`<p id="chain-ok">Audit chain verified: ${o.chain.result.entries} entries (checked ${o.chain.at}).</p>`
      : ''
}
${table(
  'Alarms, failed logins and refused devices in the last 7 days',
  ['Time', 'Type', 'Device', 'Detail'],
  o.alarms.map((a) => [html`${a.ts}`, html`${a.type}`, html`${a.device ?? (a.data.device as string | undefined) ?? '–'}`, html`${detailOf(a.data)}`]),
  'none',
)}
</section>`
    : ''
}`;
}

type Images = Awaited<ReturnType<typeof listImages>>;

const logical = (img: Images[number]) => img.versions.reduce((n, x) => n + x.sizes.disk + x.sizes.mem + x.sizes.state, 0);

export function imagesPage(v: View, images: Images, policies: Map<string, string>): Html {
  return live('images', table(
    'Images',
    ['Image', 'Current version', 'Versions', 'Size of all versions', 'Stored', 'Dedupe', 'Policy'],
    images.map((img) => [
      html`<a href="/console/images/${encodeURIComponent(img.name)}">${img.name}</a>`,
      html`${img.current ?? '–'}`,
      html`${img.versions.length}`,
      html`${bytes(logical(img))}`,
      html`${bytes(img.stored.bytes)} (${img.stored.chunks} chunks)`,
      html`${img.stored.bytes > 0 ? `${(logical(img) / img.stored.bytes).toFixed(1)}×` : '–'}`,
      html`${policies.get(img.name) ?? 'built-in'}`,
    ]),
    'no images pushed yet',
  ));
}

export function imagePage(
  v: View,
  img: Images[number],
  explanation: string,
  policyText: string,
  check?: { diagnostics: Diagnostic[]; saved: boolean; changed?: boolean },
): Html {
  const name = encodeURIComponent(img.name);
  const findings = check
    ? check.diagnostics.length === 0
      ? note('ok', check.saved ? (check.changed ? 'Policy saved: no errors, no warnings. Running devices take it now.' : 'Policy unchanged.') : 'No errors, no warnings.')
      : html`<div class="note ${check.diagnostics.some((d) => d.severity === 'error') ? 'note-error' : 'note-info'}" role="alert" id="policy-findings">
<p>${check.saved ? 'Policy saved with warnings:' : check.diagnostics.some((d) => d.severity === 'error') ? 'The policy has errors and was not saved:' : 'Warnings:'}</p>
<ul>${check.diagnostics.map(
          (d) =>
            html`<li><span class="sev sev-${d.severity}">${d.severity}</span> <strong>${d.line === null ? 'policy' : `line ${d.line}`}</strong>: <code>${d.field}</code>: ${d.message}${d.hint ? html`<br><span class="hint">hint: ${d.hint}</span>` : ''}</li>`,
        )}</ul></div>`
    : '';
  return html`<section aria-labelledby="versions-h" data-live-id="versions">
<h2 id="versions-h">Versions</h2>
${table(
  `Versions of ${img.name}`,
  ['Version', 'State', 'Committed', 'Disk', 'Memory', 'Device state', 'Branch of'],
  img.versions.map((x) => [
    html`${x.version}${x.version === img.current ? ' (current)' : ''}`,
    html`${x.state}`,
    html`${x.committedAt ?? '–'}`,
    html`${bytes(x.sizes.disk)}`,
    html`${bytes(x.sizes.mem)}`,
    html`${bytes(x.sizes.state)}`,
    html`${'device' in x && x.device ? `${x.device} (on ${x.base})` : '–'}`,
  ]),
  'no version',
)}
<p>Stored: ${bytes(img.stored.bytes)} in ${img.stored.chunks} chunks for ${bytes(logical(img))} of versions.</p>
</section>
<section aria-labelledby="policy-h">
<h2 id="policy-h">Policy in plain words</h2>
<pre class="explain" id="policy-explained">${explanation}</pre>
</section>
<section aria-labelledby="upload-h">
<h2 id="upload-h">${can(v.p.role, 'images.write') ? 'Change the policy' : 'Check a policy'}</h2>
${findings}
${postForm(
  v,
  `/console/images/${name}/policy`,
  html`<label for="policy-file">Load a policy file from this computer</label>
<input type="file" id="policy-file" accept=".yaml,.yml,text/yaml,text/plain" data-fill="policy-text">
<label for="policy-text">Policy YAML (as <code>lethe policy check</code> reads it)</label>
<textarea id="policy-text" name="policy" rows="16" spellcheck="false">${policyText}</textarea>
<div class="row"><button type="submit" name="action" value="check">Check</button>
${can(v.p.role, 'images.write') ? html`<button type="submit" name="action" value="save" id="policy-save">Save policy</button>` : ''}</div>`,
  { label: 'Policy' },
)}
</section>`;
}

export function auditPage(
  v: View,
  entries: Entries,
  filter: { device?: string; type?: string; since?: string; until?: string },
  chain: Awaited<ReturnType<typeof chainStatus>>,
  checkpoint: { seq: number; hash: string; signature: string } | null,
): Html {
  const more = entries.length > 0 ? entries[entries.length - 1].seq : null;
  const q = (extra: Record<string, string>) =>
    new URLSearchParams(Object.entries({ ...filter, ...extra }).filter((e): e is [string, string] => typeof e[1] === 'string' && e[1] !== '')).toString();
  const r = chain.result;
  return html`<section aria-labelledby="chain-h" data-live-id="chain">
<h2 id="chain-h">Chain</h2>
<p id="chain-status">${
    r.ok
      ? html`<span class="yes">verified</span>: ${r.entries} entries, ${r.checkpoints} signed checkpoints (checked ${chain.at})`
      : html`<span class="bad">broken</span> at entry ${r.firstBad ?? '?'}: ${r.reason ?? ''} (checked ${chain.at})`
  }</p>
<p>Last signed checkpoint: ${checkpoint ? html`entry ${checkpoint.seq}, hash <code>${checkpoint.hash.slice(0, 16)}…</code>, signature <code>${checkpoint.signature.slice(0, 16)}…</code>` : 'none yet'}</p>
</section>
<section aria-labelledby="timeline-h">
<h2 id="timeline-h">Timeline</h2>
<form method="get" action="/console/audit" class="row" aria-label="Filter the timeline">
<label for="f-device">Device</label><input id="f-device" name="device" value="${filter.device ?? ''}">
<label for="f-type">Type (e.g. keys.release, user.*)</label><input id="f-type" name="type" value="${filter.type ?? ''}">
<label for="f-since">Since</label><input id="f-since" name="since" value="${filter.since ?? ''}" placeholder="24h">
<label for="f-until">Until</label><input id="f-until" name="until" value="${filter.until ?? ''}">
<button type="submit">Filter</button>
</form>
${live('timeline', table(
  'Audit entries, newest first',
  ['Seq', 'Time', 'Type', 'Device', 'Actor', 'Detail'],
  entries.map((e) => [html`${e.seq}`, html`${e.ts}`, html`${e.type}`, e.device ? html`<a href="/console/devices/${encodeURIComponent(e.device)}">${e.device}</a>` : html`–`, html`${(e.data.actor as string | undefined) ?? '–'}`, html`${detailOf(e.data)}`]),
  'no entries match',
))}
${more !== null && more > 1 ? html`<p><a href="/console/audit?${q({ before: String(more) })}">Older entries</a></p>` : ''}
</section>`;
}

type Users = Awaited<ReturnType<typeof listUsers>>;

export function usersPage(v: View, users: Users, added?: { name: string; role: string; totp?: { secret: string; uri: string } }): Html {
  return html`${
    added
      ? html`${note('ok', `Added ${added.name} (${added.role}).`)}
${added.totp ? html`<div class="note note-info" role="status"><p>Two-factor secret for ${added.name}'s authenticator app, shown once:</p><pre><code id="totp-secret">${added.totp.secret}</code></pre><p><code id="totp-uri">${added.totp.uri}</code></p></div>` : ''}`
      : ''
  }
${live('users', table(
  'Administrators',
  ['Name', 'Role', 'Two-factor', 'Last login', 'API tokens', 'Sessions', 'Added by', ''],
  users.map((u) => [
    html`${u.name}`,
    html`${u.role}`,
    html`${u.totp ? 'TOTP' : '–'}`,
    html`${ago(u.lastLogin, v.now)}`,
    html`${u.tokens}`,
    html`${u.sessions}`,
    html`${u.createdBy}`,
    u.name === v.p.user ? html`<span class="muted">you</span>` : postForm(v, `/console/users/${encodeURIComponent(u.name)}/remove`, html`<button type="submit">Remove ${u.name}</button>`, { cls: 'inline' }),
  ]),
  'no named administrators',
))}
<section aria-labelledby="adduser-h">
<h2 id="adduser-h">Add an administrator</h2>
${postForm(
  v,
  '/console/users',
  html`<label for="u-name">Name</label><input id="u-name" name="name" autocomplete="off" required pattern="[a-z][a-z0-9._\\-]{0,63}">
<label for="u-role">Role</label><select id="u-role" name="role">${ROLES.map((r) => html`<option>${r}</option>`)}</select>
<label for="u-pw">Password (12 characters or more)</label><input id="u-pw" name="password" type="password" autocomplete="new-password" required minlength="12">
<button type="submit">Add</button>`,
  { cls: 'stack', label: 'Add an administrator' },
)}
<p class="muted">admin: everything, with a one-time code at login; auditor: reads devices, images and the audit log; helpdesk: enrollment tokens and device status.</p>
</section>`;
}

export function accountPage(v: View, tokens: Awaited<ReturnType<typeof listTokens>>, msg?: Html): Html {
  return html`${msg ?? ''}
<p>Signed in as <strong>${v.p.user ?? 'bootstrap'}</strong> (${v.p.role}); this session ends ${v.p.session ? ago(new Date(v.p.session.expiresAt).toISOString(), v.now) : '–'} or after 30 minutes idle.</p>
${live('tokens', table(
  'Your API tokens (make one with lethe admin login)',
  ['Token', 'Role', 'Label', 'Expires', 'Last used', ''],
  tokens.map((t) => [html`<code>${t.id}</code>`, html`${t.role}`, html`${t.label}`, html`${t.expiresAt}`, html`${ago(t.lastUsed, v.now)}`, postForm(v, `/console/tokens/${encodeURIComponent(t.id)}/revoke`, html`<button type="submit">Revoke ${t.id}</button>`, { cls: 'inline' })]),
  'none',
))}
<section aria-labelledby="pw-h">
<h2 id="pw-h">Change your password</h2>
${postForm(
  v,
  '/console/account/password',
  html`<label for="pw-current">Current password</label><input id="pw-current" name="current" type="password" autocomplete="current-password" required>
${v.p.role === 'admin' ? html`<label for="pw-totp">One-time code</label><input id="pw-totp" name="totp" inputmode="numeric" autocomplete="one-time-code" pattern="[0-9]{6}" required>` : ''}
<label for="pw-new">New password (12 characters or more)</label><input id="pw-new" name="password" type="password" autocomplete="new-password" required minlength="12">
<button type="submit">Change password</button>`,
  { cls: 'stack', label: 'Change your password' },
)}
<p class="muted">Changing it ends every browser session of yours, this one too.</p>
</section>
<section aria-labelledby="out-h">
<h2 id="out-h">Sessions</h2>
${postForm(v, '/console/logout-all', html`<button type="submit">Log out everywhere</button>`, { label: 'Log out everywhere' })}
</section>`;
}

export function loginPage(next: string, error?: { message: string; hint?: string }, noAdmins = false): Html {
  return bare(
    'Sign in',
    html`${error ? note('error', error.message, error.hint) : ''}
${noAdmins ? note('info', 'No administrator exists yet.', "add the first on the server's host: lethe admin user add NAME --role admin, with LETHE_ADMIN_TOKEN set to the token lethe server init printed") : ''}
<form method="post" action="/console/login" class="stack" aria-label="Sign in">
<input type="hidden" name="next" value="${next}">
<label for="user">User name</label><input id="user" name="user" autocomplete="username" required autofocus>
<label for="password">Password</label><input id="password" name="password" type="password" autocomplete="current-password" required>
<label for="totp">One-time code (admins: from your authenticator app)</label><input id="totp" name="totp" inputmode="numeric" autocomplete="one-time-code" pattern="[0-9]{6}">
<button type="submit">Sign in</button>
</form>`,
  );
}

export function errorPage(status: number, code: string, message: string, hint?: string): Html {
  return bare(
    status === 403 ? 'Not allowed' : status === 404 ? 'Not found' : 'Something went wrong',
    html`${note('error', html`${message} <code>${code}</code>`, hint)}<p><a href="/console">Back to the console</a></p>`,
  );
}
