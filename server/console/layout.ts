// The console's frame: head, navigation by role, the live-update indicator and
// the small pieces every page uses (forms with their CSRF token, status badges,
// tables, messages).
import { can, type Permission, type Principal } from '../accounts.js';
import { Html, html } from './html.js';

/** What every page is rendered for: who asks, and where. */
export interface View {
  p: Principal;
  csrf: string;
  path: string;
  now: number;
}

const NAV: [path: string, label: string, perm: Permission | null][] = [
  ['/console', 'Overview', null],
  ['/console/devices', 'Devices', 'devices.read'],
  ['/console/images', 'Images and policies', 'images.read'],
  ['/console/audit', 'Audit', 'audit.read'],
  ['/console/users', 'Administrators', 'users.manage'],
  ['/console/account', 'My account', null],
];

/** The document head of every console page; `script`: the live-update script (pages outside the frame have none). */
function head(title: string, script: boolean): Html {
  return html`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${title} · Lethe console</title>
<link rel="stylesheet" href="/console/assets/console.css">
<link rel="icon" href="/console/assets/icon.svg" type="image/svg+xml">
${script ? html`<script src="/console/assets/console.js" defer></script>` : ''}
</head>`;
}

export function page(v: View, title: string, body: Html, opts: { live?: boolean; liveUrl?: string } = {}): Html {
  const current = (path: string) => (path === '/console' ? v.path === '/console' : v.path.startsWith(path));
  return html`${head(title, true)}
<body>
<a class="skip" href="#main">Skip to content</a>
<header class="top">
  <span class="brand">Lethe</span>
  <nav aria-label="Console">
    <ul>${NAV.filter(([, , perm]) => perm === null || can(v.p.role, perm)).map(
      ([path, label]) => html`<li><a href="${path}"${current(path) ? html` aria-current="page"` : ''}>${label}</a></li>`,
    )}</ul>
  </nav>
  <span class="who">${v.p.user ?? 'bootstrap'} <span class="role">${v.p.role}</span></span>
  <span id="live" class="live" role="status" aria-live="polite">${opts.live === false ? '' : 'connecting…'}</span>
  <form method="post" action="/console/logout" class="inline">${csrfField(v)}<button type="submit">Log out</button></form>
</header>
<main id="main" tabindex="-1"${opts.live === false ? '' : html` data-live="1"`}${opts.liveUrl ? html` data-live-url="${opts.liveUrl}"` : ''}>
${main(title, body)}
</main>
</body>
</html>
`;
}

/** The main part alone: what a live update fetches. */
export const main = (title: string, body: Html): Html => html`<h1>${title}</h1>
${body}`;

export const csrfField = (v: View): Html => html`<input type="hidden" name="_csrf" value="${v.csrf}">`;

/** A form that changes something: POST, with the session's CSRF token. */
export function postForm(v: View, action: string, inner: Html, opts: { cls?: string; label?: string } = {}): Html {
  return html`<form method="post" action="${action}"${opts.cls ? html` class="${opts.cls}"` : ''}${opts.label ? html` aria-label="${opts.label}"` : ''}>${csrfField(v)}${inner}</form>`;
}

export function badge(status: string): Html {
  return html`<span class="badge badge-${status.replace(/[^a-z-]/g, '')}">${status}</span>`;
}

export function note(kind: 'ok' | 'error' | 'info', text: string | Html, hint?: string): Html {
  return html`<div class="note note-${kind}" role="${kind === 'error' ? 'alert' : 'status'}"><p>${text}</p>${hint ? html`<p class="hint">${hint}</p>` : ''}</div>`;
}

export function table(caption: string, head: string[], rows: Html[][], empty = 'none'): Html {
  if (rows.length === 0) return html`<p class="empty">${caption}: ${empty}</p>`;
  return html`<table>
<caption>${caption}</caption>
<thead><tr>${head.map((h) => html`<th scope="col">${h}</th>`)}</tr></thead>
<tbody>${rows.map((r) => html`<tr>${r.map((c) => html`<td>${c}</td>`)}</tr>`)}</tbody>
</table>`;
}

/** A part of a page that live updates replace (the rest, forms above all, stays as the user left it). */
export const live = (id: string, inner: Html, tag: 'section' | 'div' = 'div', labelledBy?: string): Html =>
  html`<${new Html(tag)} data-live-id="${id}"${labelledBy ? html` aria-labelledby="${labelledBy}"` : ''}>${inner}</${new Html(tag)}>`;

/** A page outside the frame (login, errors before a session). */
export function bare(title: string, body: Html): Html {
  return html`${head(title, false)}
<body class="bare">
<main id="main">
<h1>${title}</h1>
${body}
</main>
</body>
</html>
`;
}
