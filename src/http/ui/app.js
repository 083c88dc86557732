// tickgate operator page. No framework, no build step. Every value from the server is inserted
// with textContent or as an attribute through the DOM API, never as HTML. The admin token lives
// in this tab's sessionStorage only; every request sends it as `Authorization: Bearer`.
// Live updates: GET /admin/events read with fetch() (EventSource cannot send headers) and parsed
// here as Server-Sent Events; on a broken stream the page waits, re-reads its lists, reconnects.
'use strict';
(function () {
  const TOKEN_KEY = 'tickgate.admin_token';
  const TASKS_SHOWN = 50;
  const SVG = 'http://www.w3.org/2000/svg';
  const $ = (id) => document.getElementById(id);

  let token = null;
  let stream = null;          // AbortController of the live feed
  let lastFrameNow = 0;
  const agentRows = new Map(); // id -> {tr, cells}
  const tasks = new Map();     // id -> record
  const taskRows = new Map();  // id -> tr
  let selected = null;         // id of the task shown in the detail panel
  const rotateTimers = new Map(); // agent id -> timer that disarms its rotate button

  // ---------- helpers ----------
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function fmtTime(s) { return s ? String(s).replace('T', ' ').replace(/\.\d+/, '') : '—'; }
  function ago(ms, now) {
    if (!ms) return '—';
    const s = Math.max(0, Math.round((now - ms) / 1000));
    if (s < 60) return s + 's ago';
    if (s < 3600) return Math.floor(s / 60) + 'm ago';
    return Math.floor(s / 3600) + 'h ago';
  }
  function pretty(v) { return v === undefined || v === null ? '—' : JSON.stringify(v, null, 2); }
  function notice(text, isError) {
    const n = $('notice');
    n.textContent = text;
    n.className = isError ? 'error' : '';
    n.hidden = false;
  }

  class ApiError extends Error {
    constructor(status, code, message) { super(message); this.status = status; this.code = code; }
  }

  async function api(method, path, body) {
    const headers = { Authorization: 'Bearer ' + token, Accept: 'application/json' };
    const init = { method, headers, cache: 'no-store' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const res = await fetch(path, init);
    let data = null;
    try { data = await res.json(); } catch (_) { data = null; }
    if (!res.ok) {
      const e = data && data.error ? data.error : {};
      throw new ApiError(res.status, e.code || 'http_' + res.status, e.message || res.status + ' ' + res.statusText);
    }
    return data;
  }

  function authMessage(e) {
    if (e.status === 401) return 'The admin token was refused.';
    if (e.status === 404) return 'The admin API is not enabled on this server (no admin token is configured).';
    if (e.status === 429) return 'Too many failed attempts from this address; wait and try again.';
    return 'Cannot reach the admin API: ' + e.message;
  }

  // ---------- sign in / out ----------
  function showLogin(error) {
    $('app').hidden = true;
    $('login').hidden = false;
    $('logout').hidden = true;
    setConn('off', 'signed out');
    const err = $('login-error');
    err.textContent = error || '';
    err.hidden = !error;
  }

  function wipe() {
    if (stream) stream.abort();
    stream = null;
    token = null;
    agentRows.clear(); tasks.clear(); taskRows.clear(); selected = null;
    clear($('agents').tBodies[0]); clear($('tasks').tBodies[0]); clear($('deliveries').tBodies[0]);
    clear($('detail-fields'));
    $('task-detail').hidden = true;
    $('secret').hidden = true;
    $('notice').hidden = true;
    const f = $('filter-agent');
    while (f.options.length > 1) f.remove(1);
  }

  function signOut(error) {
    sessionStorage.removeItem(TOKEN_KEY);
    wipe();
    showLogin(error);
  }

  async function signIn(candidate) {
    wipe();
    token = candidate;
    let agents;
    try {
      agents = await api('GET', '/admin/agents');
    } catch (e) {
      signOut(authMessage(e));
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, candidate);
    $('token').value = '';
    $('login').hidden = true;
    $('login-error').hidden = true;
    $('app').hidden = false;
    $('logout').hidden = false;
    renderAgents({ now: Date.now(), agents: agents.agents });
    await Promise.all([loadTasks(), loadDeliveries()]).catch((e) => notice(e.message, true));
    connect();
  }

  // ---------- live feed ----------
  function setConn(kind, text) {
    const c = $('conn');
    c.className = 'conn conn-' + kind;
    c.textContent = text;
  }

  function parseFrame(raw) {
    let event = 'message';
    const data = [];
    for (const line of raw.split('\n')) {
      if (line.startsWith(':')) continue;
      const i = line.indexOf(':');
      const field = i < 0 ? line : line.slice(0, i);
      const value = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
    }
    return { event, data: data.join('\n') };
  }

  function dispatch(frame) {
    if (!frame.data) return;
    const data = JSON.parse(frame.data);
    switch (frame.event) {
      case 'agents': renderAgents(data); break;
      case 'task': upsertTask(data); break;
      case 'deliveries': renderDeliveries(data.deliveries); break;
      case 'resync': loadTasks().catch((e) => notice(e.message, true)); break;
      default: break;
    }
  }

  async function connect() {
    const ctl = new AbortController();
    if (stream) stream.abort();
    stream = ctl;
    setConn('wait', 'connecting');
    try {
      const res = await fetch('/admin/events', {
        headers: { Authorization: 'Bearer ' + token, Accept: 'text/event-stream' },
        signal: ctl.signal,
        cache: 'no-store',
      });
      if (res.status === 401 || res.status === 404) {
        signOut(authMessage(new ApiError(res.status, '', '')));
        return;
      }
      if (!res.ok || !res.body) throw new Error('HTTP ' + res.status);
      setConn('live', 'live');
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value.replace(/\r\n?/g, '\n');
        let i;
        while ((i = buf.indexOf('\n\n')) >= 0) {
          const raw = buf.slice(0, i);
          buf = buf.slice(i + 2);
          dispatch(parseFrame(raw));
        }
      }
    } catch (_) {
      if (ctl.signal.aborted) return;
    }
    if (stream !== ctl) return;
    setConn('wait', 'reconnecting');
    setTimeout(() => {
      if (stream !== ctl) return;
      Promise.all([loadTasks(), loadDeliveries()]).catch(() => {});
      connect();
    }, 2000);
  }

  // ---------- agents ----------
  function chart(history) {
    const w = 180, h = 36;
    const s = svg('svg', { width: w, height: h, viewBox: '0 0 ' + w + ' ' + h, class: 'chart', role: 'img' });
    s.appendChild(svg('rect', { x: 0, y: 0, width: w, height: h, class: 'frame' }));
    const ticks = history.ticks || [];
    const avg = history.avg_ms || [];
    const fails = history.failures || [];
    const n = ticks.length || 1;
    const bw = w / n;
    const maxT = Math.max(1, ...ticks);
    const maxMs = Math.max(1, ...avg);
    ticks.forEach((t, i) => {
      if (!t) return;
      const bh = Math.max(1, (t / maxT) * (h - 2));
      s.appendChild(svg('rect', { x: (i * bw).toFixed(2), y: (h - bh).toFixed(2), width: Math.max(1, bw).toFixed(2), height: bh.toFixed(2), class: fails[i] ? 'fail' : 'bar' }));
    });
    const pts = [];
    avg.forEach((ms, i) => { if (ms > 0) pts.push((i * bw + bw / 2).toFixed(1) + ',' + (h - 1 - (ms / maxMs) * (h - 4)).toFixed(1)); });
    if (pts.length > 1) s.appendChild(svg('polyline', { points: pts.join(' '), class: 'line' }));
    const total = ticks.reduce((a, b) => a + b, 0);
    const title = svg('title');
    title.textContent = total + ' ticks in ' + n + ' s; peak ' + maxT + '/s; longest mean ' + maxMs + ' ms';
    s.appendChild(title);
    return s;
  }

  // The first agents frame of a stream carries the whole window; later ones only the seconds
  // that may have changed since, merged here into the window the chart shows.
  const HISTORY_KEYS = ['ticks', 'failures', 'avg_ms', 'max_ms'];
  function mergeHistory(old, h, windowSecs) {
    if (!h) return old;
    const len = h.ticks.length;
    if (!old || len >= windowSecs) return h;
    const start = h.start + len - windowSecs;
    const out = { start, last_tick_at: h.last_tick_at, last_tick_ms: h.last_tick_ms };
    for (const k of HISTORY_KEYS) {
      const values = new Array(windowSecs);
      for (let i = 0; i < windowSecs; i++) {
        const sec = start + i;
        const j = sec - old.start;
        values[i] = sec >= h.start ? h[k][sec - h.start] : (j >= 0 && j < old[k].length ? old[k][j] : 0);
      }
      out[k] = values;
    }
    return out;
  }

  function agentRow(id) {
    let row = agentRows.get(id);
    if (row) return row;
    const tr = el('tr');
    tr.dataset.agent = id;
    const cells = {};
    for (const k of ['id', 'breaker', 'queue', 'ticks', 'last', 'next', 'chart', 'actions']) {
      cells[k] = el('td', k);
      tr.appendChild(cells[k]);
    }
    cells.id.textContent = id;
    cells.id.classList.add('mono');
    cells.badge = el('span', 'badge');
    cells.breaker.appendChild(cells.badge);
    const reset = el('button', 'reset-breaker', 'Reset breaker');
    reset.type = 'button';
    reset.addEventListener('click', () => resetBreaker(id));
    const rotate = el('button', 'rotate-token', 'Rotate token');
    rotate.type = 'button';
    rotate.addEventListener('click', () => rotateToken(id, rotate));
    cells.actions.append(reset, rotate);
    $('agents').tBodies[0].appendChild(tr);
    row = { tr, cells };
    agentRows.set(id, row);
    const opt = el('option', null, id);
    opt.value = id;
    $('filter-agent').appendChild(opt);
    return row;
  }

  function renderAgents(data) {
    lastFrameNow = data.now || Date.now();
    for (const a of data.agents) {
      const row = agentRow(a.id);
      const { cells } = row;
      row.history = mergeHistory(row.history, a.history, data.window_secs || 180);
      cells.badge.textContent = a.breaker;
      cells.badge.className = 'badge b-' + a.breaker;
      cells.queue.textContent = a.queued + ' / ' + a.mailbox;
      cells.ticks.textContent = a.ticks;
      const h = row.history || {};
      cells.last.textContent = h.last_tick_at ? ago(h.last_tick_at, lastFrameNow) + ' (' + h.last_tick_ms + ' ms)' : '—';
      const next = (a.schedules || []).map((s) => s.next_at).filter(Boolean).sort()[0];
      cells.next.textContent = next ? fmtTime(next) : '—';
      if (row.history) {
        clear(cells.chart);
        cells.chart.appendChild(chart(row.history));
        const ticks = row.history.ticks || [];
        const total = ticks.reduce((x, y) => x + y, 0);
        const failed = (row.history.failures || []).reduce((x, y) => x + y, 0);
        const ms = (row.history.max_ms || []).reduce((x, y) => Math.max(x, y), 0);
        cells.chart.appendChild(el('div', 'chart-note', total + (total === 1 ? ' tick' : ' ticks') + (failed ? ', ' + failed + ' failed' : '') + ' · peak ' + Math.max(0, ...ticks) + '/s · longest ' + ms + ' ms'));
      }
    }
  }

  async function resetBreaker(id) {
    const [ns, name] = id.split('/');
    try {
      const r = await api('POST', '/admin/agents/' + encodeURIComponent(ns) + '/' + encodeURIComponent(name) + '/breaker/reset');
      const row = agentRows.get(id);
      if (row) { row.cells.badge.textContent = r.breaker; row.cells.badge.className = 'badge b-' + r.breaker; }
      notice('Breaker of ' + id + ' reset.');
    } catch (e) { notice('Reset of ' + id + ' failed: ' + e.message, true); }
  }

  async function rotateToken(id, button) {
    // A two-step click instead of a dialog: rotation breaks the URL senders use today.
    if (!button.classList.contains('confirm')) {
      button.classList.add('confirm');
      button.textContent = 'Confirm rotate';
      rotateTimers.set(id, setTimeout(() => { button.classList.remove('confirm'); button.textContent = 'Rotate token'; }, 10000));
      return;
    }
    clearTimeout(rotateTimers.get(id));
    rotateTimers.delete(id);
    button.classList.remove('confirm');
    button.textContent = 'Rotate token';
    const [ns, name] = id.split('/');
    try {
      const r = await api('POST', '/admin/agents/' + encodeURIComponent(ns) + '/' + encodeURIComponent(name) + '/token');
      $('secret-agent').textContent = r.agent;
      $('secret-url').textContent = r.webhook_url;
      $('secret').hidden = false;
    } catch (e) { notice('Token rotation for ' + id + ' failed: ' + e.message, true); }
  }

  // ---------- tasks ----------
  function filters() {
    return { agent: $('filter-agent').value, status: $('filter-status').value };
  }

  async function loadTasks() {
    const f = filters();
    const q = new URLSearchParams({ limit: String(TASKS_SHOWN) });
    if (f.agent) q.set('agent', f.agent);
    if (f.status) q.set('status', f.status);
    const page = await api('GET', '/admin/tasks?' + q.toString());
    tasks.clear();
    for (const t of page.tasks) tasks.set(t.task_id, t);
    renderTasks();
  }

  // A burst of task changes is drawn once, a tenth of a second after its first change.
  let renderQueued = false;
  function upsertTask(t) {
    tasks.set(t.task_id, t);
    if (!renderQueued) {
      renderQueued = true;
      setTimeout(() => { renderQueued = false; renderTasks(); }, 100);
    }
    if (selected === t.task_id) openTask(t.task_id);
  }

  function taskRow(t) {
    let tr = taskRows.get(t.task_id);
    if (!tr) {
      tr = el('tr', 'clickable');
      tr.dataset.task = t.task_id;
      for (const k of ['id', 'agent', 'status', 'title', 'created', 'attempt']) tr.appendChild(el('td', k));
      tr.cells[0].classList.add('mono');
      tr.cells[2].appendChild(el('span', 'badge'));
      tr.addEventListener('click', () => openTask(tr.dataset.task));
      taskRows.set(t.task_id, tr);
    }
    tr.cells[0].textContent = t.task_id.slice(0, 8);
    tr.cells[0].title = t.task_id;
    tr.cells[1].textContent = t.agent;
    const badge = tr.cells[2].firstChild;
    badge.textContent = t.status;
    badge.className = 'badge s-' + t.status;
    tr.cells[3].textContent = t.title || '';
    tr.cells[4].textContent = fmtTime(t.created_at);
    tr.cells[5].textContent = t.attempt;
    tr.classList.toggle('selected', selected === t.task_id);
    return tr;
  }

  function renderTasks() {
    const f = filters();
    const shown = [...tasks.values()]
      .filter((t) => (!f.agent || t.agent === f.agent) && (!f.status || t.status === f.status))
      .sort((a, b) => (a.created_at < b.created_at ? 1 : a.created_at > b.created_at ? -1 : 0))
      .slice(0, TASKS_SHOWN);
    const body = $('tasks').tBodies[0];
    const keep = new Set(shown.map((t) => t.task_id));
    for (const [id, tr] of taskRows) if (!keep.has(id)) { tr.remove(); taskRows.delete(id); }
    for (const id of [...tasks.keys()]) if (!keep.has(id)) tasks.delete(id);
    for (const t of shown) body.appendChild(taskRow(t)); // moves existing rows into order
    $('no-tasks').hidden = shown.length > 0;
  }

  function field(dl, name, value) {
    dl.appendChild(el('dt', null, name));
    dl.appendChild(el('dd', null, value === undefined || value === null || value === '' ? '—' : value));
  }

  async function openTask(id) {
    selected = id;
    for (const [tid, tr] of taskRows) tr.classList.toggle('selected', tid === id);
    let t;
    try { t = await api('GET', '/admin/tasks/' + encodeURIComponent(id)); } catch (e) { notice('Cannot open task ' + id + ': ' + e.message, true); return; }
    if (selected !== id) return;
    $('task-detail').hidden = false;
    $('detail-id').textContent = t.task_id;
    const st = $('detail-status');
    st.textContent = t.status;
    st.className = 'badge s-' + t.status;
    st.dataset.status = t.status;
    const dl = $('detail-fields');
    clear(dl);
    field(dl, 'Agent', t.agent);
    field(dl, 'Title', t.title);
    field(dl, 'Tick', t.tick);
    field(dl, 'Attempt', t.attempt);
    field(dl, 'Created', fmtTime(t.created_at));
    field(dl, 'Started', fmtTime(t.started_at));
    field(dl, 'Finished', fmtTime(t.finished_at));
    field(dl, 'Source', [t.source && t.source.method, t.source && t.source.event, t.source && t.source.schedule].filter(Boolean).join(' · '));
    field(dl, 'Error', t.error);
    field(dl, 'Next attempt', t.next_attempt_at ? fmtTime(t.next_attempt_at) : '');
    field(dl, 'Replay of', t.replay_of);
    $('detail-inputs').textContent = pretty(t.inputs);
    $('detail-response').textContent = pretty(t.response);
    const ab = $('detail-attempts').tBodies[0];
    clear(ab);
    for (const a of t.attempts || []) {
      const tr = el('tr');
      tr.append(el('td', null, a.attempt), el('td', null, fmtTime(a.started_at)), el('td', null, fmtTime(a.finished_at)), el('td', null, a.error || ''));
      ab.appendChild(tr);
    }
    const waiting = t.status === 'AWAITING_INPUT' && t.awaiting;
    $('detail-awaiting').hidden = !waiting;
    $('detail-request').textContent = waiting ? pretty(t.awaiting.request) : '';
    const terminal = ['SUCCESS', 'FAILURE', 'REVOKED'].includes(t.status);
    $('detail-replay').hidden = !terminal;
    $('detail-cancel').hidden = !['PENDING', 'RETRY', 'AWAITING_INPUT'].includes(t.status);
  }

  async function taskAction(kind) {
    const id = selected;
    if (!id) return;
    try {
      const r = await api('POST', '/admin/tasks/' + encodeURIComponent(id) + '/' + kind);
      if (kind === 'replay' && r && r.task_id) notice('Replayed as task ' + r.task_id + '.');
      else notice('Task ' + id + ': ' + kind + ' done.');
      openTask(id);
    } catch (e) { notice(kind + ' of ' + id + ' failed: ' + e.message, true); }
  }

  async function resume() {
    const id = selected;
    if (!id) return;
    let answer;
    try { answer = JSON.parse($('resume-answer').value); } catch (e) { notice('The answer is not valid JSON: ' + e.message, true); return; }
    try {
      await api('POST', '/tasks/' + encodeURIComponent(id) + '/resume', { response: answer });
      $('resume-answer').value = '';
      notice('Task ' + id + ' resumed.');
      openTask(id);
    } catch (e) { notice('Resume of ' + id + ' failed: ' + e.message, true); }
  }

  // ---------- deliveries ----------
  async function loadDeliveries() {
    const page = await api('GET', '/admin/deliveries?status=failed&limit=100');
    renderDeliveries(page.deliveries);
  }

  function renderDeliveries(list) {
    const body = $('deliveries').tBodies[0];
    clear(body);
    for (const d of list) {
      const tr = el('tr');
      tr.dataset.delivery = d.id;
      const retry = el('button', 'retry-delivery', 'Retry');
      retry.type = 'button';
      retry.addEventListener('click', async () => {
        try { await api('POST', '/admin/deliveries/' + encodeURIComponent(d.id) + '/retry'); notice('Delivery ' + d.id + ' queued again.'); tr.remove(); } catch (e) { notice('Retry of delivery ' + d.id + ' failed: ' + e.message, true); }
      });
      const actions = el('td');
      actions.appendChild(retry);
      tr.append(el('td', 'mono', d.id), el('td', null, d.agent), el('td', null, d.endpoint), el('td', null, d.type), el('td', 'mono', String(d.task_id).slice(0, 8)), el('td', null, d.attempts), el('td', null, d.last_error || ''), actions);
      body.appendChild(tr);
    }
    $('no-deliveries').hidden = list.length > 0;
  }

  // ---------- wiring ----------
  document.addEventListener('DOMContentLoaded', () => {
    $('login-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const candidate = $('token').value.trim();
      if (candidate) signIn(candidate);
    });
    $('logout').addEventListener('click', () => signOut());
    $('secret-dismiss').addEventListener('click', () => { $('secret-url').textContent = ''; $('secret').hidden = true; });
    $('filter-agent').addEventListener('change', () => loadTasks().catch((e) => notice(e.message, true)));
    $('filter-status').addEventListener('change', () => loadTasks().catch((e) => notice(e.message, true)));
    $('detail-close').addEventListener('click', () => { selected = null; $('task-detail').hidden = true; renderTasks(); });
    $('detail-replay').addEventListener('click', () => taskAction('replay'));
    $('detail-cancel').addEventListener('click', () => taskAction('cancel'));
    $('resume-button').addEventListener('click', resume);
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) signIn(saved); else showLogin();
  });
})();
