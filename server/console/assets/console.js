// Lethe console: live updates and two small conveniences. Pages work without it.
// Live updates: the server sends an event when anything changed (any replica);
// the page fetches its main part again, unless the user is typing in a form.
'use strict';
(function () {
  const main = document.getElementById('main');
  const live = document.getElementById('live');
  const say = (text) => {
    if (live) live.textContent = text;
  };

  /** A form in the main part holds something the user typed, or has focus: leave it alone. */
  function busyForm() {
    const a = document.activeElement;
    if (a && main.contains(a) && a.matches('input:not([type=hidden]), textarea, select')) return true;
    for (const el of main.querySelectorAll('input:not([type=hidden]), textarea')) if (el.value !== el.defaultValue) return true;
    return false;
  }

  if (main && main.dataset.live === '1' && window.EventSource) {
    let fetching = false;
    let again = false;
    const refresh = async () => {
      if (fetching || busyForm()) {
        again = true;
        return;
      }
      fetching = true;
      try {
        const r = await fetch(location.href, { headers: { 'x-lethe-fragment': 'main' }, credentials: 'same-origin', cache: 'no-store' });
        if (r.ok && r.headers.get('x-lethe-fragment') === 'main') {
          main.innerHTML = await r.text();
          main.dataset.updated = new Date().toISOString();
        } else if (r.status === 401) {
          location.reload();
        }
      } catch (e) {
        again = true;
      } finally {
        fetching = false;
        if (again) {
          again = false;
          setTimeout(refresh, 1000);
        }
      }
    };
    const es = new EventSource('/console/events');
    es.addEventListener('ready', () => say('live'));
    es.addEventListener('change', refresh);
    es.addEventListener('error', () => say('reconnecting…'));
  } else {
    say('');
  }

  document.addEventListener('click', (e) => {
    const copy = e.target.closest('[data-copy]');
    if (copy) {
      const text = document.getElementById(copy.dataset.copy)?.textContent ?? '';
      navigator.clipboard?.writeText(text).then(() => (copy.textContent = 'Copied'), () => (copy.textContent = 'Select and copy the command'));
    }
    if (e.target.closest('[data-print]')) window.print();
  });
})();
