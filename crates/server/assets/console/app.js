// flowline admin console: plain JavaScript, no framework, no external resource.
// Talks to /api/v1 with the bearer token kept in this tab's sessionStorage.
(function () {
  'use strict';

  const TOKEN = 'flowline.console.token';
  const REFRESH = 'flowline.console.refresh';
  const USER = 'flowline.console.user';
  const SVGNS = 'http://www.w3.org/2000/svg';

  // ---------------------------------------------------------------- helpers

  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));

  function setAttrs(e, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'text') e.textContent = String(v);
      else if (k.startsWith('on') && typeof v === 'function') e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
  }
  function add(e, children) {
    for (const c of children.flat(Infinity)) {
      if (c === undefined || c === null || c === false) continue;
      e.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    setAttrs(e, attrs);
    return add(e, children);
  }
  function svg(tag, attrs, ...children) {
    const e = document.createElementNS(SVGNS, tag);
    setAttrs(e, attrs);
    return add(e, children);
  }
  function clear(e) {
    while (e.firstChild) e.removeChild(e.firstChild);
    return e;
  }

  function parseTime(v) {
    if (typeof v === 'number') return v > 1e14 ? v / 1000 : v; // micros or millis
    if (typeof v !== 'string') return NaN;
    return Date.parse(v);
  }
  function pad(n, w) {
    return String(n).padStart(w || 2, '0');
  }
  function fmtTime(v) {
    const t = parseTime(v);
    if (!isFinite(t)) return v == null ? '—' : String(v);
    const d = new Date(t);
    const time = pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds()) + '.' + pad(d.getMilliseconds(), 3);
    const now = new Date();
    if (d.toDateString() === now.toDateString()) return time;
    return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' + time;
  }
  function fmtMs(n) {
    if (typeof n !== 'number' || !isFinite(n)) return '—';
    if (n < 1) return n.toFixed(2) + ' ms';
    if (n < 100) return n.toFixed(1) + ' ms';
    if (n < 10000) return Math.round(n) + ' ms';
    return (n / 1000).toFixed(1) + ' s';
  }
  function fmtNum(n) {
    if (typeof n !== 'number' || !isFinite(n)) return String(n);
    if (Number.isInteger(n)) return n.toLocaleString('en-US');
    if (Math.abs(n) >= 100) return n.toFixed(0);
    return String(parseFloat(Math.abs(n) >= 1 ? n.toFixed(2) : n.toPrecision(3)));
  }
  function short(id) {
    id = String(id == null ? '' : id);
    return id.length > 16 ? id.slice(0, 8) + '…' + id.slice(-4) : id;
  }
  function compact(v, max) {
    const s = typeof v === 'string' ? v : JSON.stringify(v);
    max = max || 90;
    return s && s.length > max ? s.slice(0, max - 1) + '…' : s;
  }
  function badge(text, cls) {
    return el('span', { class: 'badge ' + (cls || text || ''), text: text });
  }
  function arrayOf(r, keys) {
    if (Array.isArray(r)) return r;
    if (!r || typeof r !== 'object') return [];
    for (const k of keys) if (Array.isArray(r[k])) return r[k];
    return [];
  }
  function debounce(fn, ms) {
    let t = null;
    return function () {
      clearTimeout(t);
      t = setTimeout(fn, ms);
    };
  }

  let measureCtx = null;
  function textWidth(s, font) {
    if (!measureCtx) measureCtx = document.createElement('canvas').getContext('2d');
    measureCtx.font = font || '12px system-ui, sans-serif';
    return Math.ceil(measureCtx.measureText(String(s)).width);
  }

  /** Repeats `fn` every `ms` while started, never two at once. */
  function poller(fn, ms) {
    let on = false;
    let running = false;
    let timer = null;
    async function tick() {
      if (!on || running) return;
      running = true;
      try {
        await fn();
      } finally {
        running = false;
        clearTimeout(timer);
        if (on) timer = setTimeout(tick, ms);
      }
    }
    return {
      start() {
        on = true;
        clearTimeout(timer);
        tick();
      },
      stop() {
        on = false;
        clearTimeout(timer);
      },
    };
  }

  // -------------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, problem) {
      super((problem && problem.title) || 'HTTP ' + status);
      this.status = status;
      this.problem = problem || {};
    }
    /** The route does not exist on this server (a feature not deployed). */
    get unavailable() {
      return this.status === 404 && (!this.problem.code || this.problem.code === 'route_not_found');
    }
  }

  async function api(path, opts) {
    opts = opts || {};
    const headers = { accept: 'application/json, application/problem+json' };
    const token = sessionStorage.getItem(TOKEN);
    if (token && !opts.anonymous) headers.authorization = 'Bearer ' + token;
    let body;
    if (opts.body !== undefined) {
      body = JSON.stringify(opts.body);
      headers['content-type'] = 'application/json';
    }
    let res;
    try {
      res = await fetch(path, { method: opts.method || 'GET', headers, body, cache: 'no-store' });
    } catch (e) {
      throw new ApiError(0, { title: 'The server cannot be reached', detail: String(e && e.message ? e.message : e) });
    }
    const text = await res.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (_) {
        data = res.ok ? text : { title: 'HTTP ' + res.status, detail: text.slice(0, 300) };
      }
    }
    if (res.ok) return data;
    if (res.status === 401 && !opts.anonymous && !opts.retried) {
      if (await refreshSession()) return api(path, Object.assign({}, opts, { retried: true }));
      signOut('Your session has ended: sign in again.');
    }
    throw new ApiError(res.status, data && typeof data === 'object' ? data : { title: res.statusText || 'HTTP ' + res.status });
  }

  let refreshing = null;
  function refreshSession() {
    const rt = sessionStorage.getItem(REFRESH);
    if (!rt) return Promise.resolve(false);
    if (!refreshing) {
      refreshing = (async () => {
        try {
          const r = await api('/api/v1/auth/refresh', { method: 'POST', body: { refresh_token: rt }, anonymous: true });
          sessionStorage.setItem(TOKEN, r.access_token);
          if (r.refresh_token) sessionStorage.setItem(REFRESH, r.refresh_token);
          return true;
        } catch (_) {
          return false;
        } finally {
          setTimeout(() => (refreshing = null), 0);
        }
      })();
    }
    return refreshing;
  }

  function showProblem(box, err) {
    clear(box);
    box.hidden = false;
    const p = (err && err.problem) || { title: String((err && err.message) || err) };
    const status = err && err.status ? ' (' + err.status + ')' : '';
    box.appendChild(el('strong', { text: (p.title || 'Something went wrong') + status }));
    if (p.detail) box.appendChild(el('div', { text: p.detail }));
    if (Array.isArray(p.errors) && p.errors.length) {
      box.appendChild(el('ul', {}, p.errors.map((f) => el('li', { text: (f.field || '?') + ': ' + (f.message || '') }))));
    }
    if (p.code) {
      const corr = p.correlation_id ? ' · correlation ' + p.correlation_id : '';
      box.appendChild(el('div', { class: 'code', text: 'code ' + p.code + corr }));
    }
  }
  function hideProblem(box) {
    box.hidden = true;
    clear(box);
  }
  function unavailable(what) {
    return el('div', { class: 'unavailable', 'data-testid': 'unavailable', text: what + ' not available on this server.' });
  }

  // ------------------------------------------------------------ session / tabs

  let currentTab = null;

  function signOut(message) {
    const token = sessionStorage.getItem(TOKEN);
    sessionStorage.removeItem(TOKEN);
    sessionStorage.removeItem(REFRESH);
    sessionStorage.removeItem(USER);
    if (currentTab && tabs[currentTab].hide) tabs[currentTab].hide();
    currentTab = null;
    if (token && !message) {
      fetch('/api/v1/auth/logout', { method: 'POST', headers: { authorization: 'Bearer ' + token } }).catch(() => {});
    }
    $('#app-view').hidden = true;
    $('#login-view').hidden = false;
    $('#logout').hidden = true;
    $('#whoami').textContent = '';
    const box = $('#login-error');
    if (message) showProblem(box, { problem: { title: message } });
    else hideProblem(box);
    $('#login-email').focus();
  }

  function enterApp() {
    let user = {};
    try {
      user = JSON.parse(sessionStorage.getItem(USER) || '{}');
    } catch (_) {
      user = {};
    }
    $('#login-view').hidden = true;
    $('#app-view').hidden = false;
    $('#logout').hidden = false;
    $('#whoami').textContent = user.email ? user.email + ' · admin' : 'admin';
    selectTab((location.hash || '').slice(1) || 'events');
  }

  async function login(ev) {
    ev.preventDefault();
    const box = $('#login-error');
    hideProblem(box);
    const email = $('#login-email').value.trim();
    const password = $('#login-password').value;
    if (!email || !password) {
      showProblem(box, { problem: { title: 'Email and password are required' } });
      return;
    }
    const button = $('#login-submit');
    button.disabled = true;
    try {
      const r = await api('/api/v1/auth/login', { method: 'POST', body: { email, password }, anonymous: true });
      if (!r || !r.access_token) throw new ApiError(500, { title: 'Unexpected answer from the server' });
      if (!r.user || r.user.role !== 'admin') {
        showProblem(box, { problem: { title: 'Not an administrator', detail: 'This account cannot use the console.' } });
        fetch('/api/v1/auth/logout', { method: 'POST', headers: { authorization: 'Bearer ' + r.access_token } }).catch(() => {});
        return;
      }
      sessionStorage.setItem(TOKEN, r.access_token);
      if (r.refresh_token) sessionStorage.setItem(REFRESH, r.refresh_token);
      sessionStorage.setItem(USER, JSON.stringify({ email: r.user.email, name: r.user.display_name }));
      $('#login-password').value = '';
      enterApp();
    } catch (e) {
      showProblem(box, e);
    } finally {
      button.disabled = false;
    }
  }

  function selectTab(name) {
    if (!Object.hasOwn(tabs, name)) name = 'events';
    if (currentTab === name) return;
    if (currentTab && tabs[currentTab].hide) tabs[currentTab].hide();
    currentTab = name;
    for (const b of $$('#tabs button')) {
      const on = b.dataset.tab === name;
      b.classList.toggle('active', on);
      b.setAttribute('aria-selected', on ? 'true' : 'false');
    }
    for (const p of $$('.panel')) p.hidden = p.dataset.panel !== name;
    if (location.hash !== '#' + name) history.replaceState(null, '', '#' + name);
    tabs[name].show();
  }

  // ----------------------------------------------------------- generic table

  const PREFERRED = ['seq', 'id', 'at', 'time', 'occurred_at', 'created_at', 'start', 'end', 'key', 'actor', 'user_id',
    'action', 'kind', 'subject', 'resource', 'target', 'outcome', 'status', 'name', 'count', 'sum', 'p50', 'p99', 'hash'];

  function columnsOf(items, max) {
    const seen = new Set();
    for (const it of items.slice(0, 50)) if (it && typeof it === 'object') Object.keys(it).forEach((k) => seen.add(k));
    const cols = PREFERRED.filter((k) => seen.has(k));
    for (const k of seen) if (!cols.includes(k)) cols.push(k);
    return cols.slice(0, max || 10);
  }
  function cell(v, key) {
    if (v === null || v === undefined) return el('td', { class: 'muted', text: '—' });
    if (typeof v === 'number') return el('td', { class: 'num', text: /ms$/.test(key || '') ? fmtMs(v) : fmtNum(v) });
    if (typeof v === 'boolean') return el('td', { text: v ? 'yes' : 'no' });
    if (typeof v === 'string') {
      if (/^\d{4}-\d\d-\d\dT/.test(v)) return el('td', { title: v, text: fmtTime(v) });
      if (/^[0-9a-f]{32,}$/i.test(v)) return el('td', { class: 'mono', title: v, text: v.slice(0, 12) + '…' });
      return el('td', { title: v.length > 60 ? v : null, class: v.length > 40 ? 'mono' : null, text: compact(v, 60) });
    }
    return el('td', { class: 'mono wrap', title: JSON.stringify(v), text: compact(v, 80) });
  }
  /** Rows of objects whatever their shape; a click shows the whole object. */
  function genericTable(table, items, testid) {
    const cols = columnsOf(items);
    clear(table.tHead || table.createTHead()).appendChild(el('tr', {}, cols.map((c) => el('th', { text: c }))));
    const body = clear(table.tBodies[0] || table.appendChild(document.createElement('tbody')));
    for (const it of items) {
      const row = el('tr', { class: 'expandable', 'data-testid': testid },
        it && typeof it === 'object' ? cols.map((c) => cell(it[c], c)) : [cell(it)]);
      row.addEventListener('click', () => toggleJson(row, it, cols.length));
      body.appendChild(row);
    }
  }
  function toggleJson(row, value, span) {
    const next = row.nextElementSibling;
    if (next && next.classList.contains('payload')) {
      next.remove();
      return;
    }
    row.after(el('tr', { class: 'payload' }, el('td', { colspan: span }, el('pre', { class: 'json', text: JSON.stringify(value, null, 2) }))));
  }

  // ------------------------------------------------------------------ events

  const Events = (() => {
    const MAX_ROWS = 500;
    const body = $('#events-table tbody');
    const errBox = $('#events-error');
    const types = new Set();
    let cursor = null;
    let gen = 0;
    let paused = false;
    let shown = 0;
    let topicsSig = '';
    let lastTruncated = false;

    function filters() {
      const q = new URLSearchParams({ limit: '200' });
      const topic = $('#events-topic').value;
      const type = $('#events-type').value.trim();
      if (topic) q.set('topic', topic);
      if (type) q.set('type', type);
      return q;
    }

    function updateTopics(topics) {
      const sig = topics.map((t) => t.topic).join(',');
      if (sig === topicsSig) return;
      topicsSig = sig;
      const sel = $('#events-topic');
      const keep = sel.value;
      clear(sel).appendChild(el('option', { value: '', text: 'all topics' }));
      for (const t of topics) sel.appendChild(el('option', { value: t.topic, text: t.topic }));
      if (keep && !topics.some((t) => t.topic === keep)) sel.appendChild(el('option', { value: keep, text: keep }));
      sel.value = keep;
    }

    function row(e, fresh) {
      const tr = el('tr', { class: 'expandable event-row' + (fresh ? ' fresh' : ''), 'data-testid': 'event-row',
        'data-event-id': e.id, 'data-type': e.type, 'data-topic': e.topic },
      el('td', { title: e.appended_at, text: fmtTime(e.appended_at) }),
      el('td', { text: e.topic }),
      el('td', { class: 'mono', text: e.partition + '/' + e.offset }),
      el('td', {}, el('strong', { text: e.type })),
      el('td', { class: 'mono', title: e.key, text: short(e.key) }),
      el('td', { class: 'mono', title: e.correlation_id, text: short(e.correlation_id) }));
      tr.addEventListener('click', () => toggleJson(tr, e, 6));
      return tr;
    }

    function prepend(items, fresh) {
      const frag = document.createDocumentFragment();
      for (const e of items) {
        frag.appendChild(row(e, fresh));
        if (e.type && !types.has(e.type)) {
          types.add(e.type);
          $('#events-types').appendChild(el('option', { value: e.type }));
        }
      }
      body.insertBefore(frag, body.firstChild);
      const rows = $$('tr.event-row', body);
      for (const r of rows.slice(MAX_ROWS)) {
        const next = r.nextElementSibling;
        if (next && next.classList.contains('payload')) next.remove();
        r.remove();
      }
      shown = Math.min(rows.length, MAX_ROWS);
    }

    function status() {
      const s = $('#events-status');
      s.className = 'status ' + (paused ? 'paused' : 'live');
      const when = new Date();
      s.textContent = (paused ? 'paused' : 'live') + ' · ' + shown + ' shown · polled ' +
        pad(when.getHours()) + ':' + pad(when.getMinutes()) + ':' + pad(when.getSeconds()) +
        (lastTruncated ? ' · some events skipped (a burst over 200)' : '');
      $('#events-empty').hidden = shown > 0;
    }

    async function poll() {
      const g = gen;
      const q = filters();
      if (cursor) q.set('after', cursor);
      try {
        const r = await api('/api/v1/admin/events?' + q.toString());
        if (g !== gen) return;
        hideProblem(errBox);
        updateTopics(r.topics || []);
        const first = cursor === null;
        cursor = r.cursor || null;
        lastTruncated = !first && !!r.truncated;
        const items = arrayOf(r, ['items']);
        if (items.length) prepend(items, !first);
        status();
      } catch (e) {
        if (g === gen) showProblem(errBox, e);
      }
    }

    const timer = poller(poll, 1000);

    function reset() {
      gen += 1;
      cursor = null;
      shown = 0;
      clear(body);
      if (!paused && currentTab === 'events') timer.start();
    }

    $('#events-topic').addEventListener('change', reset);
    $('#events-type').addEventListener('input', debounce(reset, 400));
    $('#events-clear').addEventListener('click', () => {
      clear(body);
      shown = 0;
      status();
    });
    $('#events-pause').addEventListener('click', () => {
      paused = !paused;
      $('#events-pause').textContent = paused ? 'Resume' : 'Pause';
      if (paused) timer.stop();
      else timer.start();
      status();
    });

    return {
      show() {
        if (!paused) timer.start();
      },
      hide() {
        timer.stop();
      },
    };
  })();

  // ---------------------------------------------------------- consumer groups

  const Groups = (() => {
    const body = $('#groups-table tbody');
    const errBox = $('#groups-error');

    async function load() {
      const q = $('#groups-lagging').checked ? '?min_lag=1' : '';
      try {
        const r = await api('/api/v1/admin/consumer-groups' + q);
        hideProblem(errBox);
        const groups = arrayOf(r, ['groups']);
        const items = arrayOf(r, ['items']);
        const maxLag = Math.max(1, ...groups.map((g) => g.lag || 0));
        clear(body);
        for (const g of groups) {
          const parts = items.filter((i) => i.group === g.group && i.topic === g.topic);
          const bar = el('span', { class: 'bar' + (g.lag ? '' : ' zero') });
          if (g.lag) bar.style.width = Math.max(4, Math.round((g.lag / maxLag) * 120)) + 'px';
          body.appendChild(el('tr', { 'data-testid': 'group-row', 'data-group': g.group, 'data-topic': g.topic },
            el('td', {}, el('strong', { text: g.group })),
            el('td', { text: g.topic }),
            el('td', { class: 'num', text: g.partitions }),
            el('td', { class: 'num' }, fmtNum(g.lag), bar),
            el('td', { class: 'parts wrap' }, parts.map((p) => el('span', {
              class: p.lag ? 'behind' : null,
              title: 'partition ' + p.partition + ': position ' + p.position + ', end ' + p.end + ', lag ' + p.lag,
              text: 'p' + p.partition + ' ' + p.position + '/' + p.end + '  ',
            })))));
        }
        if (!groups.length) body.appendChild(el('tr', {}, el('td', { colspan: 5, class: 'muted', text: 'No consumer groups.' })));
        const total = groups.reduce((a, g) => a + (g.lag || 0), 0);
        $('#groups-status').textContent = groups.length + ' group/topic pairs · total lag ' + fmtNum(total) + ' · ' + fmtTime(new Date().toISOString());
      } catch (e) {
        showProblem(errBox, e);
      }
    }

    const timer = poller(load, 3000);
    $('#groups-refresh').addEventListener('click', () => timer.start());
    $('#groups-lagging').addEventListener('change', () => timer.start());
    return { show: () => timer.start(), hide: () => timer.stop() };
  })();

  // ------------------------------------------------------------------- sagas

  const Sagas = (() => {
    const body = $('#sagas-table tbody');
    const errBox = $('#sagas-error');
    const detail = $('#saga-detail');
    let selected = null;
    let selectedStatus = null;

    async function loadList() {
      const status = $('#sagas-status').value;
      const q = new URLSearchParams({ limit: '100' });
      if (status) q.set('status', status);
      try {
        const r = await api('/api/v1/admin/sagas?' + q.toString());
        hideProblem(errBox);
        const items = arrayOf(r, ['items']);
        clear(body);
        for (const s of items) {
          const tr = el('tr', { 'data-testid': 'saga-row-' + s.id, 'data-saga-id': s.id, 'data-status': s.status,
            class: 'saga-row' + (s.id === selected ? ' selected' : '') },
          el('td', { class: 'mono', title: s.id, text: short(s.id) }),
          el('td', { text: s.name }),
          el('td', {}, badge(s.status), s.stuck ? [' ', badge('STUCK')] : null),
          el('td', { text: s.current_step || '—' }),
          el('td', { title: s.created_at, text: fmtTime(s.created_at) }));
          tr.addEventListener('click', () => open(s.id));
          body.appendChild(tr);
        }
        if (!items.length) body.appendChild(el('tr', {}, el('td', { colspan: 5, class: 'muted', text: 'No sagas.' })));
        $('#sagas-status-line').textContent = items.length + ' sagas · ' + fmtTime(new Date().toISOString());
        const sel = items.find((s) => s.id === selected);
        if (sel && (sel.status !== selectedStatus || /RUNNING|COMPENSATING/.test(sel.status))) await loadDetail();
      } catch (e) {
        showProblem(errBox, e);
      }
    }

    async function open(id) {
      selected = id;
      for (const r of $$('tr.saga-row', body)) r.classList.toggle('selected', r.dataset.sagaId === id);
      clear(detail).appendChild(el('p', { class: 'muted', text: 'Loading ' + id + '…' }));
      await loadDetail();
    }

    async function loadDetail() {
      const id = selected;
      try {
        const d = await api('/api/v1/admin/sagas/' + encodeURIComponent(id));
        if (id !== selected) return;
        selectedStatus = d.status;
        renderDetail(d);
      } catch (e) {
        if (id !== selected) return;
        clear(detail);
        const box = el('div', { class: 'problem' });
        showProblem(box, e);
        detail.appendChild(box);
      }
    }

    function renderDetail(d) {
      const timeline = arrayOf(d, ['timeline']);
      clear(detail);
      detail.setAttribute('data-saga-id', d.id);
      detail.appendChild(el('h2', {}, d.name + ' ', badge(d.status), d.stuck ? [' ', badge('STUCK')] : null));
      detail.appendChild(el('dl', { class: 'facts' },
        el('dt', { text: 'id' }), el('dd', { class: 'mono', text: d.id }),
        d.current_step ? [el('dt', { text: 'current step' }), el('dd', { text: d.current_step + ' (failed attempts: ' + d.attempt + ')' })] : null,
        d.failure ? [el('dt', { text: 'failure' }), el('dd', { text: d.failure })] : null,
        el('dt', { text: 'created' }), el('dd', { title: d.created_at, text: fmtTime(d.created_at) }),
        el('dt', { text: 'updated' }), el('dd', { title: d.updated_at, text: fmtTime(d.updated_at) }),
        el('dt', { text: 'steps run' }), el('dd', { text: timeline.length + ' attempts' })));
      detail.appendChild(el('h3', { text: 'Timeline' }));
      if (timeline.length) detail.appendChild(el('div', { class: 'diagram-wrap' }, gantt(timeline)));
      const table = el('table', { id: 'saga-timeline', class: 'grid', 'data-testid': 'saga-timeline' },
        el('thead', {}, el('tr', {}, ['#', 'step', 'phase', 'try', 'status', 'ms', 'started', 'detail'].map((h) => el('th', { class: h === 'ms' ? 'num' : null, text: h })))));
      const tb = el('tbody');
      for (const t of timeline) {
        const info = t.error ? t.error : t.output !== null && t.output !== undefined ? compact(t.output, 70) : '';
        tb.appendChild(el('tr', { 'data-testid': 'saga-step', 'data-step': t.step, 'data-phase': t.phase, 'data-status': t.status },
          el('td', { class: 'num', text: t.seq }),
          el('td', {}, el('strong', { text: t.step })),
          el('td', {}, t.phase === 'undo' ? badge('undo') : 'do'),
          el('td', { class: 'num', text: t.attempt }),
          el('td', {}, badge(t.status)),
          el('td', { class: 'num', text: fmtMs(t.duration_ms) }),
          el('td', { title: t.started_at, text: fmtTime(t.started_at) }),
          el('td', { class: 'mono wrap', title: t.error || (t.output != null ? JSON.stringify(t.output) : ''), text: info })));
      }
      if (!timeline.length) tb.appendChild(el('tr', {}, el('td', { colspan: 8, class: 'muted', text: 'No step has run yet.' })));
      table.appendChild(tb);
      detail.appendChild(el('div', { class: 'table-wrap' }, table));
      detail.appendChild(el('details', {}, el('summary', { text: 'Data and results' }),
        el('pre', { class: 'json', text: JSON.stringify({ data: d.data, results: d.results }, null, 2) })));
    }

    /** Each attempt as a bar on one time axis. */
    function gantt(timeline) {
      const starts = timeline.map((t) => parseTime(t.started_at));
      const ends = timeline.map((t, i) => Math.max(parseTime(t.finished_at) || starts[i], starts[i]));
      const t0 = Math.min(...starts);
      const span = Math.max(1, Math.max(...ends) - t0);
      const labels = timeline.map((t) => t.step + (t.phase === 'undo' ? ' (undo)' : '') + (t.attempt > 1 ? ' #' + t.attempt : ''));
      const labelW = Math.max(120, ...labels.map((l) => textWidth(l) + 16));
      const chartW = 460;
      const rowH = 22;
      const top = 22;
      const W = labelW + chartW + 80;
      const H = top + timeline.length * rowH + 8;
      const s = svg('svg', { width: W, height: H, viewBox: '0 0 ' + W + ' ' + H, 'data-testid': 'saga-gantt', role: 'img', 'aria-label': 'saga timeline' });
      for (const f of [0, 0.25, 0.5, 0.75, 1]) {
        const x = labelW + f * chartW;
        s.appendChild(svg('line', { class: 'grid-line', x1: x, x2: x, y1: top - 4, y2: H - 4 }));
        s.appendChild(svg('text', { class: 'tick', x: x, y: 12, 'text-anchor': 'middle', text: '+' + fmtMs(f * span) }));
      }
      timeline.forEach((t, i) => {
        const y = top + i * rowH;
        const x = labelW + ((starts[i] - t0) / span) * chartW;
        const w = Math.max(2, ((ends[i] - starts[i]) / span) * chartW);
        const cls = t.status !== 'ok' ? 'bar-' + t.status : t.phase === 'undo' ? 'bar-undo' : 'bar-ok';
        s.appendChild(svg('text', { x: labelW - 8, y: y + 14, 'text-anchor': 'end', text: labels[i] }));
        s.appendChild(svg('rect', { class: cls, x: x, y: y + 4, width: w, height: rowH - 8, rx: 3 },
          svg('title', { text: labels[i] + ': ' + t.status + ', ' + fmtMs(t.duration_ms) + (t.error ? ' — ' + t.error : '') })));
        s.appendChild(svg('text', { class: 'tick', x: x + w + 6, y: y + 14, text: fmtMs(t.duration_ms) }));
      });
      return s;
    }

    const timer = poller(loadList, 2000);
    $('#sagas-refresh').addEventListener('click', () => timer.start());
    $('#sagas-status').addEventListener('change', () => timer.start());
    return { show: () => timer.start(), hide: () => timer.stop(), open };
  })();

  // ---------------------------------------------------- sequence diagrams

  const EDGE_PARTICIPANTS = ['client', 'gateway', 'browser', 'user', 'edge'];
  function isTopic(name) {
    return /^[\w-]+(\.[\w-]+)+$/.test(String(name)) && !EDGE_PARTICIPANTS.includes(name);
  }
  function kindOf(name) {
    if (EDGE_PARTICIPANTS.includes(String(name).toLowerCase())) return 'edge';
    if (/ (db|database|store|cache)$/.test(String(name))) return 'store';
    return isTopic(name) ? 'topic' : 'service';
  }
  /** Long labels are cut in drawings; the whole text is in the tooltip. */
  function cut(s, n) {
    s = String(s == null ? '' : s);
    return s.length > n ? s.slice(0, n - 1) + '…' : s;
  }

  function arrowHead(x, y, angle, open) {
    const l = 9;
    const a1 = angle + Math.PI - 0.42;
    const a2 = angle + Math.PI + 0.42;
    const p1 = [x + l * Math.cos(a1), y + l * Math.sin(a1)];
    const p2 = [x + l * Math.cos(a2), y + l * Math.sin(a2)];
    if (open) return svg('polyline', { class: 'arrowhead open', points: p1.join(',') + ' ' + x + ',' + y + ' ' + p2.join(',') });
    return svg('polygon', { class: 'arrowhead', points: p1.join(',') + ' ' + x + ',' + y + ' ' + p2.join(',') });
  }

  /** A sequence diagram: participants across, messages down, in order. */
  function drawSequence(diagram) {
    const parts = arrayOf(diagram, ['participants']).map(String);
    const msgs = arrayOf(diagram, ['messages']).filter((m) => m && m.from != null && m.to != null);
    for (const m of msgs) for (const p of [String(m.from), String(m.to)]) if (!parts.includes(p)) parts.push(p);
    const FONT_B = '600 12px system-ui, sans-serif';
    const FONT = '11.5px system-ui, sans-serif';
    const boxW = parts.map((p) => Math.max(96, textWidth(p, FONT_B) + 24));
    // Server labels often carry their own timing; add it only when absent.
    const labelOf = (m) => cut(m.label, 40) +
      (typeof m.duration_ms === 'number' && m.duration_ms > 0 && !m.reply && !/\d ?(ms|s)\b/.test(String(m.label)) ? '  ' + fmtMs(m.duration_ms) : '');
    // Gaps between neighbouring lifelines wide enough for the labels between them.
    const gaps = parts.slice(1).map((_, i) => Math.max(boxW[i] / 2 + boxW[i + 1] / 2 + 24, 120));
    let tail = boxW[boxW.length - 1] / 2 + 20;
    for (const m of msgs) {
      const a = parts.indexOf(String(m.from));
      const b = parts.indexOf(String(m.to));
      const need = textWidth(labelOf(m), FONT) + 28;
      if (a === b) {
        if (a < gaps.length) gaps[a] = Math.max(gaps[a], need + 30);
        else tail = Math.max(tail, need + 40);
        continue;
      }
      const lo = Math.min(a, b);
      const hi = Math.max(a, b);
      let have = 0;
      for (let i = lo; i < hi; i++) have += gaps[i];
      if (have < need) for (let i = lo; i < hi; i++) gaps[i] += (need - have) / (hi - lo);
    }
    const gutter = 78;
    const xs = [gutter + boxW[0] / 2];
    gaps.forEach((g, i) => xs.push(xs[i] + g));
    const top = 14;
    const headH = 34;
    const rowH = 36;
    const firstY = top + headH + 34;
    const bottomY = firstY + Math.max(0, msgs.length - 1) * rowH + 30;
    const W = Math.ceil(xs[xs.length - 1] + tail);
    const H = bottomY + headH + top;
    const s = svg('svg', { id: 'trace-diagram', 'data-testid': 'trace-diagram', class: 'sequence', width: W, height: H,
      viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': 'sequence diagram' });

    parts.forEach((p, i) => {
      s.appendChild(svg('line', { class: 'lifeline', x1: xs[i], x2: xs[i], y1: top + headH, y2: bottomY }));
    });
    const box = (p, i, y, testid) => svg('g', { class: 'participant ' + kindOf(p), 'data-testid': testid, 'data-name': p },
      svg('rect', { x: xs[i] - boxW[i] / 2, y: y, width: boxW[i], height: headH, rx: kindOf(p) === 'topic' ? 12 : 5 }),
      svg('text', { x: xs[i], y: y + headH / 2 + 4, 'text-anchor': 'middle', text: p }));
    parts.forEach((p, i) => {
      s.appendChild(box(p, i, top, 'participant'));
      s.appendChild(box(p, i, bottomY, 'participant-foot'));
    });

    msgs.forEach((m, k) => {
      const a = parts.indexOf(String(m.from));
      const b = parts.indexOf(String(m.to));
      const y = firstY + k * rowH;
      const async = kindOf(m.to) === 'topic' || kindOf(m.from) === 'topic';
      const g = svg('g', { class: 'msg' + (m.reply ? ' reply' : '') + (async ? ' async' : ''), 'data-testid': 'message',
        'data-from': m.from, 'data-to': m.to });
      const label = labelOf(m);
      g.appendChild(svg('title', {
        text: m.from + ' → ' + m.to + ': ' + (m.label || '') +
          (typeof m.at_ms === 'number' ? '\nat +' + fmtMs(m.at_ms) : '') +
          (typeof m.duration_ms === 'number' ? '\ntook ' + fmtMs(m.duration_ms) : ''),
      }));
      if (typeof m.at_ms === 'number') {
        g.appendChild(svg('text', { class: 'when', x: 8, y: y + 4, text: '+' + fmtMs(m.at_ms) }));
      }
      if (a === b) {
        const x = xs[a];
        g.appendChild(svg('path', { d: 'M' + x + ',' + (y - 8) + ' h28 v16 h-26' }));
        g.appendChild(arrowHead(x + 1, y + 8, Math.PI, !!m.reply));
        g.appendChild(svg('text', { class: 'label', x: x + 34, y: y + 3, text: label }));
      } else {
        const x1 = xs[a];
        const x2 = xs[b];
        const dir = x2 > x1 ? 1 : -1;
        g.appendChild(svg('line', { x1: x1, x2: x2 - dir, y1: y, y2: y }));
        g.appendChild(arrowHead(x2 - dir, y, dir > 0 ? 0 : Math.PI, !!m.reply));
        g.appendChild(svg('text', { class: 'label', x: (x1 + x2) / 2, y: y - 6, 'text-anchor': 'middle', text: label }));
      }
      s.appendChild(g);
    });
    if (!msgs.length) s.appendChild(svg('text', { x: gutter, y: firstY, class: 'tick', text: 'no messages' }));
    return s;
  }

  /** A diagram without its database participants (and their messages). */
  function withoutStores(d) {
    const keep = (p) => kindOf(p) !== 'store';
    return {
      participants: arrayOf(d, ['participants']).filter(keep),
      messages: arrayOf(d, ['messages']).filter((m) => m && keep(m.from) && keep(m.to)),
    };
  }
  function fit(svgEl, on) {
    svgEl.classList.toggle('fit', !!on);
    return svgEl;
  }

  // ------------------------------------------------------------------ traces

  const Traces = (() => {
    const body = $('#traces-table tbody');
    const errBox = $('#traces-error');
    const detail = $('#trace-detail');
    let selected = null;
    let available = true;
    const known = new Map();
    const prefs = { hideStores: false, fit: false };
    // The console's own polling is traced too; hidden unless asked for.
    const isAdminRead = (t) => /^GET \/(api\/v1\/admin\/|console)/.test(t.root || '');

    function filterValue() {
      return $('#traces-filter').value.trim();
    }

    async function loadList() {
      const hide = $('#traces-hide-admin').checked;
      const q = new URLSearchParams({ limit: hide ? '300' : '50' });
      const f = filterValue();
      if (f) q.set('correlation_id', f);
      try {
        const r = await api('/api/v1/admin/traces?' + q.toString());
        available = true;
        hideProblem(errBox);
        const all = arrayOf(r, ['items']);
        const items = (hide ? all.filter((t) => !isAdminRead(t)) : all).slice(0, 50);
        clear(body);
        for (const t of items) {
          known.set(t.trace_id, t);
          const failed = typeof t.status === 'number' && t.status >= 400;
          const tr = el('tr', { class: 'trace-row' + (t.trace_id === selected ? ' selected' : ''), 'data-testid': 'trace-row-' + t.trace_id,
            'data-trace-id': t.trace_id, 'data-root': t.root || '', 'data-correlation-id': t.correlation_id || '' },
          el('td', { title: t.trace_id }, el('strong', { text: t.root || short(t.trace_id) })),
          el('td', {}, t.status != null ? badge(String(t.status), failed ? 'bad' : 'ok') : '—'),
          el('td', { title: t.started_at, text: fmtTime(t.started_at) }),
          el('td', { class: 'num', text: fmtMs(t.duration_ms) }),
          el('td', { class: 'num', text: Array.isArray(t.spans) ? t.spans.length : t.spans == null ? '—' : t.spans }),
          el('td', { class: 'mono', title: t.correlation_id || '', text: short(t.correlation_id || '') }));
          tr.addEventListener('click', () => open(t.trace_id));
          body.appendChild(tr);
        }
        if (!items.length) body.appendChild(el('tr', {}, el('td', { colspan: 6, class: 'muted', text: f ? 'No trace matches.' : 'No traces yet.' })));
        const hidden = all.length - (hide ? all.filter((t) => !isAdminRead(t)).length : all.length);
        $('#traces-status').textContent = items.length + ' traces' + (hidden ? ' (' + hidden + ' admin reads hidden)' : '') + ' · ' + fmtTime(new Date().toISOString());
      } catch (e) {
        if (e.unavailable) {
          available = false;
          hideProblem(errBox);
          clear(body).appendChild(el('tr', {}, el('td', { colspan: 6 }, unavailable('Traces are'))));
          $('#traces-status').textContent = '';
        } else {
          showProblem(errBox, e);
        }
      }
    }

    async function open(id) {
      selected = id;
      for (const r of $$('tr.trace-row', body)) r.classList.toggle('selected', r.dataset.traceId === id);
      clear(detail).appendChild(el('p', { class: 'muted', text: 'Loading trace ' + id + '…' }));
      try {
        const t = await api('/api/v1/admin/traces/' + encodeURIComponent(id));
        if (id !== selected) return;
        render(t || {});
      } catch (e) {
        if (id !== selected) return;
        clear(detail);
        if (e.unavailable) {
          detail.appendChild(unavailable('Traces are'));
          return;
        }
        const box = el('div', { class: 'problem' });
        showProblem(box, e);
        detail.appendChild(box);
      }
    }

    function render(t) {
      clear(detail);
      detail.setAttribute('data-trace-id', t.trace_id || selected);
      const spans = arrayOf(t, ['spans']);
      // The detail has the spans; the listing has the summary.
      t = Object.assign({}, known.get(t.trace_id || selected) || {}, t);
      const root = t.root || (spans[0] && (spans[0].name || spans[0].operation)) || 'trace';
      detail.appendChild(el('h2', {}, root, typeof t.status === 'number' ? [' ', badge(String(t.status), t.status >= 400 ? 'bad' : 'ok')] : null));
      detail.appendChild(el('dl', { class: 'facts' },
        el('dt', { text: 'trace id' }), el('dd', { class: 'mono', text: t.trace_id || selected }),
        t.correlation_id ? [el('dt', { text: 'correlation' }), el('dd', { class: 'mono', text: t.correlation_id })] : null,
        t.started_at ? [el('dt', { text: 'started' }), el('dd', { text: fmtTime(t.started_at) })] : null,
        typeof t.duration_ms === 'number' ? [el('dt', { text: 'duration' }), el('dd', { text: fmtMs(t.duration_ms) })] : null,
        el('dt', { text: 'spans' }), el('dd', { text: spans.length })));
      detail.appendChild(el('h3', { text: 'Sequence diagram' }));
      if (t.diagram && (arrayOf(t.diagram, ['participants']).length || arrayOf(t.diagram, ['messages']).length)) {
        const wrap = el('div', { class: 'diagram-wrap', id: 'trace-diagram-wrap' });
        const hideDb = el('input', { type: 'checkbox', id: 'trace-hide-stores', 'data-testid': 'trace-hide-stores' });
        const fitBox = el('input', { type: 'checkbox', id: 'trace-fit', 'data-testid': 'trace-fit' });
        hideDb.checked = prefs.hideStores;
        fitBox.checked = prefs.fit;
        const draw = () => {
          prefs.hideStores = hideDb.checked;
          prefs.fit = fitBox.checked;
          clear(wrap).appendChild(fit(drawSequence(hideDb.checked ? withoutStores(t.diagram) : t.diagram), fitBox.checked));
        };
        hideDb.addEventListener('change', draw);
        fitBox.addEventListener('change', draw);
        detail.appendChild(el('div', { class: 'toolbar small' },
          el('label', { class: 'check' }, hideDb, ' hide databases'),
          el('label', { class: 'check' }, fitBox, ' fit to width')));
        detail.appendChild(wrap);
        draw();
      } else {
        detail.appendChild(el('p', { class: 'muted', text: 'This trace has no diagram.' }));
      }
      if (t.mermaid) {
        detail.appendChild(el('details', {}, el('summary', { text: 'Mermaid source' }),
          el('pre', { id: 'trace-mermaid', class: 'mermaid', 'data-testid': 'trace-mermaid', text: t.mermaid })));
      }
      if (spans.length) {
        const table = el('table', { class: 'grid', id: 'trace-spans' });
        genericTable(table, spans, 'span-row');
        detail.appendChild(el('details', {}, el('summary', { text: 'Spans (' + spans.length + ')' }), el('div', { class: 'table-wrap' }, table)));
      }
    }

    const timer = poller(loadList, 3000);
    function search() {
      const f = filterValue();
      timer.start();
      if (/^[0-9a-f]{32}$/i.test(f)) open(f.toLowerCase());
    }
    $('#traces-search').addEventListener('click', search);
    $('#traces-filter').addEventListener('keydown', (e) => {
      if (e.key === 'Enter') search();
    });
    $('#traces-refresh').addEventListener('click', () => timer.start());
    $('#traces-hide-admin').addEventListener('change', () => timer.start());
    return { show: () => timer.start(), hide: () => timer.stop(), open, get available() { return available; } };
  })();

  // ------------------------------------------------------------------- flows

  /** Boxes in columns by longest path from the sources (crossings reduced by
   * barycentres), one arrow per pair of boxes, labels slid along their curve
   * until they overlap nothing. */
  function drawFlow(hops) {
    const nodes = [];
    for (const h of hops) for (const n of [String(h.from), String(h.to)]) if (!nodes.includes(n)) nodes.push(n);
    const out = new Map(nodes.map((n) => [n, []]));
    const preds = new Map(nodes.map((n) => [n, []]));
    for (const h of hops) {
      out.get(String(h.from)).push(String(h.to));
      preds.get(String(h.to)).push(String(h.from));
    }
    // Depth-first order; edges back into the current path (cycles) are ignored.
    const seen = new Set();
    const order = [];
    const visit = (n) => {
      seen.add(n);
      for (const m of out.get(n)) if (!seen.has(m)) visit(m);
      order.push(n);
    };
    const incoming = new Set(hops.map((h) => String(h.to)));
    for (const n of nodes) if (!incoming.has(n) && !seen.has(n)) visit(n);
    for (const n of nodes) if (!seen.has(n)) visit(n);
    order.reverse();
    const pos = new Map(order.map((n, i) => [n, i]));
    const depth = new Map(nodes.map((n) => [n, 0]));
    for (const n of order) {
      for (const m of out.get(n)) {
        if (pos.get(m) > pos.get(n)) depth.set(m, Math.max(depth.get(m), depth.get(n) + 1));
      }
    }
    const cols = new Map();
    for (const n of order) {
      const d = depth.get(n);
      if (!cols.has(d)) cols.set(d, []);
      cols.get(d).push(n);
    }
    const depths = Array.from(cols.keys()).sort((a, b) => a - b);
    const row = new Map();
    for (const d of depths) {
      const list = cols.get(d);
      const bary = (n) => {
        const r = preds.get(n).filter((p) => depth.get(p) < d && row.has(p)).map((p) => row.get(p));
        return r.length ? r.reduce((a, b) => a + b, 0) / r.length : Infinity;
      };
      const keyed = list.map((n, i) => [bary(n), i, n]);
      keyed.sort((a, b) => (a[0] === b[0] ? a[1] - b[1] : a[0] === Infinity ? 1 : b[0] === Infinity ? -1 : a[0] - b[0]));
      cols.set(d, keyed.map((k) => k[2]));
      cols.get(d).forEach((n, i) => row.set(n, i));
    }

    // One arrow per pair of boxes; its label lists every hop on it.
    const FONT = '11px system-ui, sans-serif';
    const stat = (h) => [h.count > 1 ? fmtNum(h.count) + '×' : null, h.p50_ms != null ? 'p50 ' + fmtMs(h.p50_ms) : null,
      h.p99_ms != null ? 'p99 ' + fmtMs(h.p99_ms) : null].filter(Boolean).join(' · ');
    const pairs = new Map();
    for (const h of hops) {
      const key = String(h.from) + '\u0000' + String(h.to);
      if (!pairs.has(key)) pairs.set(key, { from: String(h.from), to: String(h.to), hops: [] });
      pairs.get(key).hops.push(h);
    }
    const edges = Array.from(pairs.values());
    for (const e of edges) {
      e.lines = e.hops.slice(0, 4).map((h) => cut(h.label, 34) + '  ' + stat(h));
      if (e.hops.length > 4) e.lines.push('+' + (e.hops.length - 4) + ' more');
      e.w = Math.max(...e.lines.map((l) => textWidth(l, FONT))) + 10;
      e.h = e.lines.length * 13 + 4;
      e.forward = depth.get(e.to) > depth.get(e.from);
    }

    const FONT_B = '600 12px system-ui, sans-serif';
    const boxW = Math.min(230, Math.max(110, ...nodes.map((n) => textWidth(n, FONT_B) + 26)));
    const boxH = 36;
    const gapY = 44;
    const widest = Math.max(0, ...edges.filter((e) => e.forward).map((e) => e.w));
    const gapX = Math.min(420, Math.max(140, widest + 40));
    const maxRows = Math.max(...depths.map((d) => cols.get(d).length));
    const colH = (k) => k * (boxH + gapY) - gapY;
    const top = 30;
    const xy = new Map();
    for (const d of depths) {
      const list = cols.get(d);
      const y0 = top + (colH(maxRows) - colH(list.length)) / 2;
      list.forEach((n, i) => xy.set(n, [24 + d * (boxW + gapX), y0 + i * (boxH + gapY)]));
    }
    const nCols = depths[depths.length - 1] + 1;
    const baseH = top + colH(maxRows) + 20;
    const backs = edges.filter((e) => !e.forward);
    const W = 48 + nCols * boxW + (nCols - 1) * gapX;
    const H = baseH + (backs.length ? 40 + backs.length * 12 + Math.max(0, ...backs.map((e) => e.h)) : 0);
    const s = svg('svg', { id: 'flow-diagram', 'data-testid': 'flow-diagram', width: W, height: H, viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': 'data-flow graph' });

    const bez = (p, t) => {
      const u = 1 - t;
      return [0, 1].map((i) => u * u * u * p[0][i] + 3 * u * u * t * p[1][i] + 3 * u * t * t * p[2][i] + t * t * t * p[3][i]);
    };
    let backIndex = 0;
    for (const e of edges) {
      const [fx, fy] = xy.get(e.from);
      const [tx, ty] = xy.get(e.to);
      if (e.forward) {
        const a = [fx + boxW, fy + boxH / 2];
        const b = [tx - 2, ty + boxH / 2];
        const c = Math.max(40, (b[0] - a[0]) / 2);
        e.curve = [a, [a[0] + c, a[1]], [b[0] - c, b[1]], b];
      } else {
        const low = baseH + 14 + backIndex++ * 12;
        const a = [fx + boxW / 2 + 10, fy + boxH];
        const b = [tx + boxW / 2 - 10, ty + boxH + 2];
        e.curve = [a, [a[0], low], [b[0], low], b];
      }
      const p = e.curve;
      const d = 'M' + p[0].join(',') + ' C' + p[1].join(',') + ' ' + p[2].join(',') + ' ' + p[3].join(',');
      s.appendChild(svg('path', { class: 'edgepath', d: d }, svg('title', { text: e.from + ' → ' + e.to + '\n' + e.hops.map((h) => h.label + '  ' + stat(h)).join('\n') })));
      const angle = Math.atan2(p[3][1] - p[2][1], p[3][0] - p[2][0]);
      s.appendChild(arrowHead(p[3][0], p[3][1], angle, false));
    }

    // Labels: the first spot along the curve that overlaps no box and no label.
    const taken = nodes.map((n) => {
      const [x, y] = xy.get(n);
      return [x - 4, y - 4, boxW + 8, boxH + 8];
    });
    const overlap = (r) => taken.reduce((sum, q) => {
      const w = Math.min(r[0] + r[2], q[0] + q[2]) - Math.max(r[0], q[0]);
      const h = Math.min(r[1] + r[3], q[1] + q[3]) - Math.max(r[1], q[1]);
      return sum + (w > 0 && h > 0 ? w * h : 0);
    }, 0);
    const spots = [0.5, 0.42, 0.58, 0.34, 0.66, 0.26, 0.74, 0.2, 0.8, 0.14, 0.86];
    edges.sort((a, b) => b.lines.length - a.lines.length);
    for (const e of edges) {
      let best = null;
      let bestOverlap = Infinity;
      // Along the curve first, then just above or below it.
      const tries = [];
      for (const dy of [0, -(e.h + 2), e.h + 2]) for (const t of spots) tries.push([t, dy]);
      for (const [t, dy] of tries) {
        const [cx, cy] = bez(e.curve, t);
        const r = [cx - e.w / 2, cy - e.h / 2 + dy, e.w, e.h];
        const o = overlap(r);
        if (o < bestOverlap) {
          best = r;
          bestOverlap = o;
        }
        if (o === 0) break;
      }
      taken.push(best);
      s.appendChild(svg('rect', { class: 'edgelabel-bg', x: best[0], y: best[1], width: best[2], height: best[3], rx: 3 }));
      e.lines.forEach((l, i) => {
        s.appendChild(svg('text', { class: 'edgelabel', x: best[0] + best[2] / 2, y: best[1] + 13 + i * 13, 'text-anchor': 'middle', text: l }));
      });
    }
    for (const n of nodes) {
      const [x, y] = xy.get(n);
      s.appendChild(svg('g', { class: 'node ' + kindOf(n), 'data-testid': 'flow-node', 'data-name': n },
        svg('rect', { x: x, y: y, width: boxW, height: boxH, rx: kindOf(n) === 'topic' ? 14 : 6 }),
        svg('text', { x: x + boxW / 2, y: y + boxH / 2 + 4, 'text-anchor': 'middle', text: n })));
    }
    return s;
  }

  const Flows = (() => {
    const errBox = $('#flows-error');
    const detailBox = $('#flows-detail');
    const select = $('#flows-endpoint');
    let endpoints = [];

    async function load() {
      try {
        const r = await api('/api/v1/admin/flows/summary');
        hideProblem(errBox);
        endpoints = arrayOf(r, ['endpoints', 'items']).filter((e) => e && e.endpoint);
        // The richest flows first; the console's own reads last.
        const admin = (e) => (/^GET \/(api\/v1\/admin\/|console)/.test(e.endpoint) ? 1 : 0);
        endpoints.sort((a, b) => admin(a) - admin(b) || arrayOf(b, ['hops']).length - arrayOf(a, ['hops']).length ||
          (b.traces || 0) - (a.traces || 0));
        const keep = select.value;
        clear(select);
        for (const e of endpoints) select.appendChild(el('option', { value: e.endpoint, text: e.endpoint + (e.traces != null ? ' (' + e.traces + ' traces)' : '') }));
        if (endpoints.some((e) => e.endpoint === keep)) select.value = keep;
        $('#flows-status').textContent = endpoints.length + ' endpoints · ' + fmtTime(new Date().toISOString());
        render();
      } catch (e) {
        clear(select);
        if (e.unavailable) {
          hideProblem(errBox);
          clear(detailBox).appendChild(unavailable('Data-flow graphs are'));
        } else {
          showProblem(errBox, e);
        }
      }
    }

    function render() {
      clear(detailBox);
      const ep = endpoints.find((e) => e.endpoint === select.value) || endpoints[0];
      if (!ep) {
        detailBox.appendChild(el('div', { class: 'unavailable', text: 'No traced requests yet.' }));
        return;
      }
      const hideDb = $('#flows-hide-stores').checked;
      const hops = arrayOf(ep, ['hops']).filter((h) => h && h.from != null && h.to != null &&
        !(hideDb && (kindOf(h.from) === 'store' || kindOf(h.to) === 'store')));
      const card = el('div', { class: 'detail flow-card', 'data-endpoint': ep.endpoint });
      card.appendChild(el('h2', { text: ep.endpoint }));
      if (hops.length) card.appendChild(el('div', { class: 'diagram-wrap' }, fit(drawFlow(hops), $('#flows-fit').checked)));
      else card.appendChild(el('p', { class: 'muted', text: 'No hops recorded for this endpoint.' }));
      const table = el('table', { class: 'grid', id: 'flows-table' },
        el('thead', {}, el('tr', {}, ['from', 'to', 'label', 'count', 'p50', 'p99'].map((h) => el('th', { class: ['count', 'p50', 'p99'].includes(h) ? 'num' : null, text: h })))),
        el('tbody', {}, hops.map((h) => el('tr', { 'data-testid': 'flow-hop' },
          el('td', { text: h.from }), el('td', { text: h.to }), el('td', { text: h.label || '' }),
          el('td', { class: 'num', text: h.count != null ? fmtNum(h.count) : '—' }),
          el('td', { class: 'num', text: fmtMs(h.p50_ms) }), el('td', { class: 'num', text: fmtMs(h.p99_ms) })))));
      card.appendChild(el('h3', { text: 'Hops' }));
      card.appendChild(el('div', { class: 'table-wrap' }, table));
      if (ep.mermaid) {
        card.appendChild(el('details', {}, el('summary', { text: 'Mermaid source' }), el('pre', { class: 'mermaid', 'data-testid': 'flow-mermaid', text: ep.mermaid })));
      }
      detailBox.appendChild(card);
    }

    select.addEventListener('change', render);
    $('#flows-hide-stores').addEventListener('change', render);
    $('#flows-fit').addEventListener('change', render);
    $('#flows-refresh').addEventListener('click', load);
    return { show: load };
  })();

  // --------------------------------------------------------------- analytics

  /** A bar chart of `data` ([{label, value}]). */
  function barChart(data, title) {
    const n = data.length;
    const left = 56;
    const bottom = 62;
    const top = 16;
    const plotH = 200;
    const barW = Math.max(8, Math.min(40, Math.floor(900 / Math.max(1, n)) - 4));
    const W = left + n * (barW + 4) + 20;
    const H = top + plotH + bottom;
    const max = Math.max(0, ...data.map((d) => d.value));
    let niceMax = max <= 0 ? 1 : Math.pow(10, Math.floor(Math.log10(max))) * Math.ceil(max / Math.pow(10, Math.floor(Math.log10(max))));
    // Counts get whole-number ticks.
    if (data.every((d) => Number.isInteger(d.value))) niceMax = Math.max(4, Math.ceil(niceMax / 4) * 4);
    const s = svg('svg', { class: 'bar-chart', 'data-testid': 'analytics-chart', width: Math.max(W, 320), height: H, viewBox: '0 0 ' + Math.max(W, 320) + ' ' + H, role: 'img', 'aria-label': title });
    for (let i = 0; i <= 4; i++) {
      const v = (niceMax * i) / 4;
      const y = top + plotH - (v / niceMax) * plotH;
      s.appendChild(svg('line', { class: i ? 'grid-line' : 'axis', x1: left, x2: Math.max(W, 320) - 10, y1: y, y2: y }));
      s.appendChild(svg('text', { class: 'tick', x: left - 6, y: y + 4, 'text-anchor': 'end', text: fmtNum(v) }));
    }
    data.forEach((d, i) => {
      const x = left + 4 + i * (barW + 4);
      const h = niceMax ? (Math.max(0, d.value) / niceMax) * plotH : 0;
      s.appendChild(svg('rect', { class: 'chart-bar', x: x, y: top + plotH - h, width: barW, height: Math.max(h, 0.5) },
        svg('title', { text: d.label + ': ' + fmtNum(d.value) })));
      if (n <= 24) s.appendChild(svg('text', { class: 'value', x: x + barW / 2, y: top + plotH - h - 4, 'text-anchor': 'middle', text: fmtNum(d.value) }));
      if (n <= 40 || i % Math.ceil(n / 40) === 0) {
        const lx = x + barW / 2;
        const ly = top + plotH + 12;
        s.appendChild(svg('text', { class: 'tick', x: lx, y: ly, 'text-anchor': 'end', transform: 'rotate(-40 ' + lx + ' ' + ly + ')', text: compact(d.label, 22) }));
      }
    });
    return el('div', { class: 'chart' }, el('h4', { text: title }), el('div', { class: 'diagram-wrap' }, s));
  }

  const Analytics = (() => {
    const errBox = $('#analytics-error');
    const box = $('#analytics-detail');
    const jobSel = $('#analytics-job');
    const measureSel = $('#analytics-measure');
    let windows = [];

    function jobName(j) {
      return typeof j === 'string' ? j : j && (j.job || j.name || j.id);
    }

    async function loadJobs() {
      try {
        const r = await api('/api/v1/admin/analytics');
        hideProblem(errBox);
        const jobs = arrayOf(r, ['jobs', 'items']).map(jobName).filter(Boolean);
        const keep = jobSel.value;
        clear(jobSel);
        for (const j of jobs) jobSel.appendChild(el('option', { value: j, text: j }));
        if (jobs.includes(keep)) jobSel.value = keep;
        if (!jobs.length) {
          clear(box).appendChild(el('div', { class: 'unavailable', text: 'No analytics jobs.' }));
          return;
        }
        await loadJob();
      } catch (e) {
        clear(jobSel);
        if (e.unavailable) {
          hideProblem(errBox);
          clear(box).appendChild(unavailable('Analytics are'));
        } else {
          showProblem(errBox, e);
        }
      }
    }

    /** A window's numbers, one level of nesting flattened (`values.count`). */
    function flat(w) {
      const out = {};
      for (const [k, v] of Object.entries(w || {})) {
        if (typeof v === 'number' && k !== 'start' && k !== 'end') out[k] = v;
        else if (v && typeof v === 'object' && !Array.isArray(v)) {
          for (const [k2, v2] of Object.entries(v)) if (typeof v2 === 'number') out[k2] = v2;
        }
      }
      return out;
    }

    async function loadJob() {
      const job = jobSel.value;
      if (!job) return;
      try {
        const r = await api('/api/v1/admin/analytics/' + encodeURIComponent(job));
        hideProblem(errBox);
        windows = arrayOf(r, ['windows', 'items', 'results']);
        windows.sort((a, b) => (parseTime(a.start) || 0) - (parseTime(b.start) || 0) || String(a.key).localeCompare(String(b.key)));
        const measures = [];
        for (const w of windows) for (const k of Object.keys(flat(w))) if (!measures.includes(k)) measures.push(k);
        const keep = measureSel.value;
        clear(measureSel);
        for (const m of measures) measureSel.appendChild(el('option', { value: m, text: m }));
        if (measures.includes(keep)) measureSel.value = keep;
        else if (measures.includes('count')) measureSel.value = 'count';
        $('#analytics-status').textContent = windows.length + ' windows · ' + fmtTime(new Date().toISOString());
        render();
      } catch (e) {
        if (e.unavailable || e.status === 404) {
          hideProblem(errBox);
          clear(box).appendChild(unavailable('This job is'));
        } else {
          showProblem(errBox, e);
        }
      }
    }

    function render() {
      clear(box);
      const m = measureSel.value;
      if (!windows.length) {
        box.appendChild(el('div', { class: 'unavailable', text: 'No windows yet for this job.' }));
        return;
      }
      const recent = windows.slice(-60);
      const label = (w) => (w.start ? fmtTime(w.start).replace(/\.\d{3}$/, '') : '') + (w.key != null && w.key !== '' ? ' ' + w.key : '');
      if (m) box.appendChild(barChart(recent.map((w) => ({ label: label(w), value: flat(w)[m] || 0 })), jobSel.value + ' · ' + m + ' per window'));
      const table = el('table', { class: 'grid', id: 'analytics-table' });
      genericTable(table, windows.slice(-100).reverse(), 'analytics-row');
      box.appendChild(el('h3', { text: 'Windows (newest first)' }));
      box.appendChild(el('div', { class: 'table-wrap' }, table));
    }

    jobSel.addEventListener('change', loadJob);
    measureSel.addEventListener('change', render);
    $('#analytics-refresh').addEventListener('click', loadJobs);
    return { show: loadJobs };
  })();

  // ------------------------------------------------------------------- audit

  const Audit = (() => {
    const errBox = $('#audit-error');
    const table = $('#audit-table');
    const findingsBox = $('#audit-findings');

    async function load() {
      try {
        const r = await api('/api/v1/admin/audit');
        hideProblem(errBox);
        const items = arrayOf(r, ['items', 'entries']);
        genericTable(table, items, 'audit-row');
        if (!items.length) clear(table.tBodies[0]).appendChild(el('tr', {}, el('td', { class: 'muted', text: 'No audit entries.' })));
        $('#audit-status').textContent = items.length + ' entries · ' + fmtTime(new Date().toISOString());
      } catch (e) {
        if (e.unavailable) {
          hideProblem(errBox);
          clear(table.tHead || table.createTHead());
          clear(table.tBodies[0]).appendChild(el('tr', {}, el('td', {}, unavailable('The audit log is'))));
        } else {
          showProblem(errBox, e);
        }
      }
    }

    async function verify() {
      const st = $('#audit-verify-status');
      st.textContent = 'verifying…';
      clear(findingsBox);
      try {
        const r = (await api('/api/v1/admin/audit/verify')) || {};
        const findings = arrayOf(r, ['findings']);
        const ok = findings.length === 0 && r.ok !== false && r.valid !== false;
        const checked = [r.records, r.checked, r.entries, r.count].find((v) => typeof v === 'number');
        const head = r.head_hash ? ' · head #' + r.head_seq + ' ' + String(r.head_hash).slice(0, 12) + '…' : '';
        st.textContent = (ok ? '✓ chain intact' : '✗ ' + findings.length + ' finding(s)') +
          (checked != null ? ' · ' + checked + ' records checked' : '') + head;
        st.title = r.head_hash || '';
        st.className = 'status ' + (ok ? 'live' : 'paused');
        st.setAttribute('data-ok', ok ? 'true' : 'false');
        if (findings.length) {
          const t = el('table', { class: 'grid', id: 'audit-findings-table' });
          genericTable(t, findings, 'audit-finding');
          findingsBox.appendChild(el('div', { class: 'problem' }, el('strong', { text: 'Verification findings' })));
          findingsBox.appendChild(el('div', { class: 'table-wrap' }, t));
        }
      } catch (e) {
        st.textContent = '';
        if (e.unavailable) findingsBox.appendChild(unavailable('Audit verification is'));
        else {
          const box = el('div', { class: 'problem' });
          showProblem(box, e);
          findingsBox.appendChild(box);
        }
      }
    }

    $('#audit-refresh').addEventListener('click', load);
    $('#audit-verify').addEventListener('click', verify);
    return { show: load };
  })();

  const tabs = { events: Events, groups: Groups, sagas: Sagas, traces: Traces, flows: Flows, analytics: Analytics, audit: Audit };

  // -------------------------------------------------------------------- boot

  function boot() {
    $('#login-form').addEventListener('submit', login);
    $('#logout').addEventListener('click', () => signOut());
    for (const b of $$('#tabs button')) b.addEventListener('click', () => selectTab(b.dataset.tab));
    window.addEventListener('hashchange', () => {
      if (sessionStorage.getItem(TOKEN)) selectTab(location.hash.slice(1));
    });
    if (sessionStorage.getItem(TOKEN)) enterApp();
    else {
      $('#login-view').hidden = false;
      $('#login-email').focus();
    }
    // Lets tests and tools see that the script ran.
    document.documentElement.setAttribute('data-console', 'ready');
  }

  // For automation and debugging from the devtools console.
  window.flowlineConsole = { selectTab, drawSequence, drawFlow, openSaga: (id) => Sagas.open(id), openTrace: (id) => Traces.open(id) };

  boot();
})();
