// agentq dashboard: relative times, self-refreshing tables (server-rendered fragments),
// and the job page fed by server-sent events. Text from jobs is only ever inserted as
// text nodes, or as HTML that the server escaped.
(() => {
  'use strict';

  const conn = document.getElementById('conn');
  function setConn(state, title) {
    if (!conn) return;
    conn.dataset.state = state;
    conn.title = title || state;
  }

  function span(s) {
    if (s < 60) return s + 's';
    if (s < 3600) return Math.floor(s / 60) + 'm';
    if (s < 172800) return Math.floor(s / 3600) + 'h';
    return Math.floor(s / 86400) + 'd';
  }
  function ago(ms) {
    const s = Math.round((Date.now() - ms) / 1000);
    if (s < -5) return 'in ' + span(-s);
    if (s < 5) return 'just now';
    return span(s) + ' ago';
  }
  function updateTimes(root) {
    for (const t of (root || document).querySelectorAll('time[data-ms]')) {
      t.textContent = ago(Number(t.dataset.ms));
    }
  }
  updateTimes();
  setInterval(updateTimes, 1000);

  // Confirm before cancelling (the form works without this script too).
  document.addEventListener('submit', (e) => {
    if (e.target.matches('form.cancel') && !window.confirm('Cancel this job?')) {
      e.preventDefault();
    }
  });

  // Tables that refresh themselves: the list and failures pages.
  const live = document.querySelector('[data-fragment]');
  if (live) {
    const every = Number(live.dataset.refresh) || 2000;
    let busy = false;
    const refresh = async () => {
      if (busy || document.hidden) return;
      busy = true;
      try {
        const r = await fetch(live.dataset.fragment + location.search, { cache: 'no-store' });
        if (!r.ok) throw new Error('HTTP ' + r.status);
        live.innerHTML = await r.text(); // escaped by the server
        updateTimes(live);
        setConn('live', 'updated ' + new Date().toLocaleTimeString());
      } catch (err) {
        setConn('error', 'updates failing: ' + err.message);
      } finally {
        busy = false;
      }
    };
    setConn('live');
    setInterval(refresh, every);
  }

  // Log tabs.
  for (const tab of document.querySelectorAll('[data-tab]')) {
    tab.addEventListener('click', () => {
      for (const t of document.querySelectorAll('[data-tab]')) {
        t.setAttribute('aria-selected', String(t === tab));
      }
      for (const p of document.querySelectorAll('pre.log')) {
        p.hidden = p.dataset.stream !== tab.dataset.tab;
      }
    });
  }

  // The job page: summary and log tail from /jobs/{id}/live.
  const summary = document.getElementById('summary');
  if (summary && summary.dataset.live) {
    const job = summary.dataset.job;
    const MAX_CHARS = 2000000;
    const panes = {};
    for (const p of document.querySelectorAll('pre.log')) {
      panes[p.dataset.stream] = { el: p, lines: 0, chars: 0, attempt: undefined };
    }
    const logNote = document.getElementById('log-note');

    const element = (tag, cls, text) => {
      const el = document.createElement(tag);
      el.className = cls;
      el.textContent = text;
      return el;
    };

    const append = (d) => {
      const pane = panes[d.stream];
      if (!pane) return;
      const el = pane.el;
      const stick = el.scrollTop + el.clientHeight >= el.scrollHeight - 4;
      if (pane.attempt !== undefined && pane.attempt !== d.attempt) {
        el.appendChild(element('span', 'marker', '── attempt ' + Number(d.attempt) + ' ──\n'));
      }
      pane.attempt = d.attempt;
      if (d.skipped > 0) {
        const note = element('span', 'skipped', '… ' + Number(d.skipped) + ' earlier bytes not shown (');
        const a = document.createElement('a');
        a.href = '/jobs/' + encodeURIComponent(job) + '/logs/' + Number(d.attempt) + '/' +
          encodeURIComponent(d.stream);
        a.textContent = 'whole log';
        note.appendChild(a);
        note.appendChild(document.createTextNode(')\n'));
        el.appendChild(note);
      }
      el.appendChild(document.createTextNode(d.text));
      pane.chars += d.text.length;
      pane.lines += (d.text.match(/\n/g) || []).length;
      while (pane.chars > MAX_CHARS && el.firstChild) {
        pane.chars -= el.firstChild.textContent.length;
        el.removeChild(el.firstChild);
      }
      const count = document.getElementById('count-' + d.stream);
      if (count) count.textContent = String(pane.lines);
      if (stick) el.scrollTop = el.scrollHeight;
    };

    const es = new EventSource(summary.dataset.live);
    es.addEventListener('open', () => setConn('live', 'streaming'));
    es.addEventListener('summary', (e) => {
      summary.innerHTML = JSON.parse(e.data).html; // escaped by the server
      updateTimes(summary);
    });
    es.addEventListener('log', (e) => append(JSON.parse(e.data)));
    es.addEventListener('problem', (e) => setConn('error', JSON.parse(e.data).message));
    es.addEventListener('end', () => {
      es.close();
      setConn('done', 'the job is over: nothing more will arrive');
      if (logNote) logNote.textContent = 'complete';
    });
    es.addEventListener('error', () => {
      setConn('error', es.readyState === EventSource.CLOSED ? 'disconnected: reload the page' : 'reconnecting…');
    });
  }
})();
