// Console pages of devices: the fleet list with enrollment, one device with its
// actions, and the lost-laptop report ("what could the thief read?").
import { can } from '../accounts.js';
import { ago, bytes, csvField, html, type Html } from './html.js';
import { badge, live, note, postForm, table, type View } from './layout.js';
import { residentOf, type DeviceView, type LeaseView, type exposure } from './data.js';

const deviceLink = (d: { id: string; name: string }) => html`<a href="/console/devices/${encodeURIComponent(d.id)}">${d.name}</a>`;

function residentCell(d: DeviceView): Html {
  const r = residentOf(d.lastReport);
  if (!r) return html`<span class="muted">no report</span>`;
  const pages = r.guestSensitivePages === null ? '' : `, ${r.guestSensitivePages} guest page${r.guestSensitivePages === 1 ? '' : 's'}`;
  return html`${bytes(r.sensitiveBytes)}${pages} <span class="muted">(${ago(r.at)})</span>`;
}

export function devicesPage(v: View, devices: DeviceView[], expiries: Map<string, string>, minted?: { token: string; expiresAt: string }): Html {
  const enroll = can(v.p.role, 'devices.enroll')
    ? html`<section aria-labelledby="enroll-h">
<h2 id="enroll-h">Enroll a laptop</h2>
${
  minted
    ? html`${note('ok', `Enrollment token made; it works once, until ${minted.expiresAt}.`)}
<p>On the laptop, run:</p>
<pre class="copyable"><code id="enroll-cmd">lethe enroll ${minted.token}</code></pre>
<button type="button" data-copy="enroll-cmd">Copy command</button>`
    : ''
}
${postForm(
  v,
  '/console/enroll-tokens',
  html`<label for="ttl">Token valid for</label>
<select id="ttl" name="ttl"><option value="3600">1 hour</option><option value="86400">1 day</option><option value="604800">7 days</option></select>
<button type="submit">Make enrollment token</button>`,
  { cls: 'row', label: 'Make an enrollment token' },
)}
</section>`
    : '';
  const rows = devices.map((d) => [
    deviceLink(d),
    html`<code>${d.id}</code>`,
    badge(d.status),
    d.connected ? html`<span class="yes">now</span>` : html`<span class="muted">no</span>`,
    html`${ago(d.lastSeen, v.now)}`,
    html`${d.images.join(', ') || '–'}`,
    html`${expiries.get(d.id) ? ago(expiries.get(d.id), v.now) : '–'}`,
    residentCell(d),
  ]);
  return html`${enroll}
${live(
  'fleet',
  html`<h2 id="fleet-h">Fleet</h2>
${table('Enrolled devices', ['Name', 'ID', 'Status', 'Connected', 'Last seen', 'Images', 'Lease expires', 'Sensitive plaintext resident'], rows, 'no devices enrolled yet')}`,
  'section',
  'fleet-h',
)}`;
}

function leaseRows(v: View, leases: LeaseView[]): Html[][] {
  return leases.map((l) => [
    html`<code>${l.id}</code>`,
    html`${l.image}@${l.version}`,
    html`${l.createdAt}`,
    l.endedAt ? html`ended ${l.endedAt}` : l.over ? html`expired ${l.expiresAt}` : html`<strong>runs</strong>, expires ${ago(l.expiresAt, v.now)}`,
  ]);
}

export function devicePage(v: View, d: DeviceView, leases: LeaseView[], images: string[], msg?: Html): Html {
  const r = residentOf(d.lastReport);
  const actions = can(v.p.role, 'devices.act');
  const unassigned = images.filter((i) => !d.images.includes(i));
  const confirmForm = (what: 'revoke' | 'wipe', text: string) =>
    postForm(
      v,
      `/console/devices/${encodeURIComponent(d.id)}/${what}`,
      html`<p>${text}</p>
<label for="confirm-${what}">Type the device name <strong>${d.name}</strong> to confirm</label>
<input id="confirm-${what}" name="confirm" autocomplete="off" required>
<button type="submit" class="danger" id="${what}-button">${what === 'wipe' ? 'Wipe device' : 'Revoke device'}</button>`,
      { cls: 'danger-zone', label: what === 'wipe' ? 'Wipe this device' : 'Revoke this device' },
    );
  return html`${msg ?? ''}
${live(
  'facts',
  html`<dl class="facts">
<dt>Status</dt><dd id="device-status">${badge(d.status)}</dd>
<dt>Connected now</dt><dd id="device-connected">${d.connected ? 'yes (push channel open)' : 'no'}</dd>
<dt>Device id</dt><dd><code>${d.id}</code></dd>
<dt>Enrolled</dt><dd>${d.enrolledAt}</dd>
<dt>Last seen</dt><dd>${d.lastSeen ?? 'never'} (${ago(d.lastSeen, v.now)})</dd>
<dt>Keys sealed with</dt><dd>${d.seal}</dd>
<dt>Images</dt><dd>${d.images.join(', ') || 'none assigned'}</dd>
<dt>Resident at last heartbeat</dt><dd>${r ? html`${bytes(r.sensitiveBytes)} of sensitive plaintext held by the agent${r.guestSensitivePages === null ? '' : `, ${r.guestSensitivePages} sensitive guest pages`} (${r.at})` : 'no report yet'}</dd>
${d.revokeAckedAt ? html`<dt>Erased its keys and cache</dt><dd>${d.revokeAckedAt}</dd>` : ''}
</dl>`,
)}
<p><a href="/console/devices/${encodeURIComponent(d.id)}/exposure">Lost laptop: what could the thief read?</a></p>
${live('leases', html`<h2 id="leases-h">Leases</h2>
${table('Leases, newest first', ['Lease', 'Image', 'Granted', 'State'], leaseRows(v, leases), 'no lease yet')}`, 'section', 'leases-h')}
${
  actions
    ? html`<section aria-labelledby="assign-h" data-live-id="assign">
<h2 id="assign-h">Images</h2>
${d.images.map((i) => postForm(v, `/console/devices/${encodeURIComponent(d.id)}/unassign`, html`<input type="hidden" name="image" value="${i}"><button type="submit">Unassign ${i}</button>`, { cls: 'inline' }))}
${
  unassigned.length > 0
    ? postForm(
        v,
        `/console/devices/${encodeURIComponent(d.id)}/assign`,
        html`<label for="assign-image">Assign image</label>
<select id="assign-image" name="image">${unassigned.map((i) => html`<option>${i}</option>`)}</select>
<button type="submit">Assign</button>`,
        { cls: 'row', label: 'Assign an image' },
      )
    : html`<p class="muted">every image is assigned</p>`
}
</section>
${
  d.status === 'active' || d.status === 'revoked'
    ? html`<section aria-labelledby="danger-h" data-live-id="danger">
<h2 id="danger-h">Revoke or wipe</h2>
${d.status === 'active' ? confirmForm('revoke', 'Refuse every request of this device from now on; if it is online it erases its keys and cache at once.') : ''}
${confirmForm('wipe', 'Order the device to wipe itself: at once if it is online, else at its next check-in.')}
</section>`
    : ''
}`
    : ''
}`;
}

type Exposure = Awaited<ReturnType<typeof exposure>>;

/** The one-paragraph answer at the top of the report. */
function answer(x: Exposure): string {
  const s = x.summary;
  const parts = [
    `Since ${x.since}, the server released ${s.keysReleased} chunk key${s.keysReleased === 1 ? '' : 's'} to ${x.device.name} (${s.sensitiveKeys} of sensitive chunks) and served ${s.chunksServed} encrypted chunk${s.chunksServed === 1 ? '' : 's'}${s.images.length ? ` of ${s.images.join(', ')}` : ''}.`,
    'The laptop keeps only ciphertext at rest: without keys the server still holds back, what is on its disk is unreadable.',
    x.running.length > 0
      ? `A lease still runs (until ${x.running[0].expiresAt}): revoke or wipe the device to end it now.`
      : x.lastRanOut
        ? `Its last lease ran out at ${x.lastRanOut}; keys it held were good only until then.`
        : x.leaseEntries > 0 || s.keysReleased > 0
          ? 'No lease of it runs now.'
          : `It was granted no lease since ${x.since}.`,
    x.resident
      ? `At its last heartbeat (${x.resident.at}) it held ${bytes(x.resident.sensitiveBytes)} of sensitive plaintext${x.resident.guestSensitivePages === null ? '' : ` and ${x.resident.guestSensitivePages} sensitive guest memory pages`}.`
      : 'It sent no heartbeat report of resident plaintext.',
  ];
  if (x.device.revokeAckedAt) parts.push(`It confirmed erasing its keys and cache at ${x.device.revokeAckedAt}.`);
  return parts.join(' ');
}

export function exposurePage(v: View, x: Exposure, sinceText: string): Html {
  const id = encodeURIComponent(x.device.id);
  const detail = (e: Exposure['entries'][number]) => {
    const d = e.data as Record<string, unknown>;
    return html`${['image', 'version', 'count', 'sensitive', 'lease', 'actor'].filter((k) => d[k] !== undefined).map((k) => `${k}=${String(d[k])}`).join(' ')}`;
  };
  return html`<form method="get" action="/console/devices/${id}/exposure" class="row noprint" aria-label="Choose the time">
<label for="since">Released after (ISO time, or a duration ago such as 24h or 7d)</label>
<input id="since" name="since" value="${sinceText}">
<button type="submit">Show</button>
</form>
<p class="noprint"><a href="/console/devices/${id}/exposure.csv?since=${encodeURIComponent(sinceText)}" download>Download CSV</a>
<button type="button" data-print="1">Print report</button></p>
<section aria-labelledby="answer-h" data-live-id="answer">
<h2 id="answer-h">What could the thief read?</h2>
<p id="exposure-answer" class="answer">${answer(x)}</p>
<dl class="facts">
<dt>Device</dt><dd>${x.device.name} <code>${x.device.id}</code> ${badge(x.device.status)}</dd>
<dt>Last seen</dt><dd>${x.device.lastSeen ?? 'never'}</dd>
<dt>Leases granted since</dt><dd>${x.summary.leases} (renewed ${x.summary.renewals} times)</dd>
</dl>
</section>
<section aria-labelledby="byimage-h" data-live-id="byimage">
<h2 id="byimage-h">By image</h2>
${table('Keys and chunks given, by image', ['Image', 'Keys released', 'Of sensitive chunks', 'Chunks served'], x.byImage.map((b) => [html`${b.image}`, html`${b.keys}`, html`${b.sensitive}`, html`${b.chunks}`]), 'nothing was released')}
</section>
<section aria-labelledby="xleases-h" data-live-id="xleases">
<h2 id="xleases-h">Leases</h2>
${table('Leases of the device', ['Lease', 'Image', 'Granted', 'State'], leaseRows(v, x.leases), 'no lease')}
</section>
<section aria-labelledby="entries-h" data-live-id="entries">
<h2 id="entries-h">Audit entries</h2>
${table('Audit entries of the device since the chosen time', ['Seq', 'Time', 'Type', 'Detail'], x.entries.map((e) => [html`${e.seq}`, html`${e.ts}`, html`${e.type}`, detail(e)]), 'none')}
</section>`;
}

export function exposureCsv(x: Exposure): string {
  const head = ['seq', 'time', 'type', 'device', 'image', 'version', 'count', 'sensitive', 'lease', 'actor', 'data'];
  const lines = [head.join(',')];
  for (const e of x.entries) {
    const d = e.data as Record<string, unknown>;
    lines.push([e.seq, e.ts, e.type, x.device.id, d.image, d.version, d.count, d.sensitive, d.lease, d.actor, d].map(csvField).join(','));
  }
  return lines.join('\r\n') + '\r\n';
}
