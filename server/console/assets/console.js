// Lethe console: live updates and two small conveniences. Pages work without it.
// Live updates: the server sends an event when anything changed (any replica);
// the page fetches its main part again and swaps in its live parts, except one
// the user is working in.
'use strict';
(function () {
  const main = document.getElementById('main');
  const live = document.getElementById('live');
  const say = (text) => {
    if (live) live.textContent = text;
  };

  /**
   * A live part is left alone while someone works in it: focus inside it (a
   * keyboard user's place would be lost), or a form in it holding something typed.
   */
  function busy(part) {
    const a = document.activeElement;
    if (a && a !== part && part.contains(a)) return true;
    for (const el of part.querySelectorAll('input:not([type=hidden]), textarea')) if (el.value !== el.defaultValue) return true;
    return false;
  }

  if (main && main.dataset.live === '1' && window.EventSource) {
    let fetching = false;
    let again = false;
    let es = null;
    // The page's own address, or (for a page shown after a form) the page it belongs to.
    const url = main.dataset.liveUrl || location.href;
    /** Swaps in the fresh copy of each live part (data-live-id) that nobody is working in. */
    const swap = (text) => {
      const fresh = document.createElement('template');
      fresh.innerHTML = text;
      let missed = false;
      for (const part of main.querySelectorAll('[data-live-id]')) {
        const next = fresh.content.querySelector('[data-live-id="' + part.dataset.liveId + '"]');
        if (!next) continue;
        if (busy(part)) missed = true;
        else part.replaceWith(next);
      }
      main.dataset.updated = new Date().toISOString();
      return missed;
    };
    const refresh = async () => {
      if (fetching) {
        again = true;
        return;
      }
      fetching = true;
      try {
        const r = await fetch(url, { headers: { 'x-lethe-fragment': 'main' }, credentials: 'same-origin', cache: 'no-store' });
        if (r.ok && r.headers.get('x-lethe-fragment') === 'main') {
          if (swap(await r.text())) again = true;
        } else if (r.status === 401) {
          location.reload();
        }
      } catch (e) {
        again = true;
      } finally {
        fetching = false;
        if (again) {
          again = false;
          setTimeout(refresh, 2000);
        }
      }
    };
    // A stream per visible tab only: a browser keeps few connections per server
    // open at once (six over HTTP/1.1), and a hidden tab needs no updates.
    const connect = () => {
      if (es || document.visibilityState === 'hidden') return;
      es = new EventSource('/console/events');
      es.addEventListener('ready', () => say('live'));
      es.addEventListener('change', refresh);
      es.addEventListener('error', () => {
        say('reconnecting…');
        // A session that ended turns the next fetch into a 401, and the page goes to sign-in.
        refresh();
      });
    };
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'hidden') {
        if (es) es.close();
        es = null;
        say('paused');
      } else {
        connect();
        refresh();
      }
    });
    connect();
  } else {
    say('');
  }

  // A policy file chosen on this computer fills the text area (nothing is sent until Check or Save).
  document.addEventListener('change', (e) => {
    const input = e.target.closest('input[type=file][data-fill]');
    const file = input && input.files && input.files[0];
    if (file) file.text().then((t) => (document.getElementById(input.dataset.fill).value = t));
  });

  document.addEventListener('click', (e) => {
    const copy = e.target.closest('[data-copy]');
    if (copy) {
      const text = document.getElementById(copy.dataset.copy)?.textContent ?? '';
      navigator.clipboard?.writeText(text).then(() => (copy.textContent = 'Copied'), () => (copy.textContent = 'Select and copy the command'));
    }
    if (e.target.closest('[data-print]')) window.print();
  });
})();
