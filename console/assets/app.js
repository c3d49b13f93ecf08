// chalkcompute web console. Plain DOM code: every value from the API is put
// on the page with textContent, never parsed as HTML. The page calls the
// Connect API (JSON) with its session cookie and the session's CSRF token in
// a header; the terminal is xterm.js over a WebSocket to /console/terminal.
'use strict';

const session = { csrf: '', header: 'X-Chalk-Csrf', info: null };
let stopView = () => {};   // stops the current page's polling and streams

// ------------------------------------------------------------ DOM helpers

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function table(caption, headers, rows, id) {
  return el('table', { id },
    el('caption', { text: caption }),
    el('thead', {}, el('tr', {}, headers.map(h => el('th', { scope: 'col', text: h })))),
    el('tbody', {}, rows.length ? rows : [el('tr', {}, el('td', { colspan: headers.length, text: 'None.' }))]));
}

function errorBox(id) { return el('p', { id, class: 'error', role: 'alert' }); }

function age(ts) {
  if (!ts) return '';
  const s = Math.max(0, Math.round((Date.now() - Date.parse(ts)) / 1000));
  if (s < 120) return s + 's';
  if (s < 7200) return Math.round(s / 60) + 'm';
  if (s < 172800) return Math.round(s / 3600) + 'h';
  return Math.round(s / 86400) + 'd';
}

// ------------------------------------------------------------ the API

class APIError extends Error {
  constructor(code, message) { super(message); this.code = code; }
}

function headers(extra) {
  return Object.assign({ [session.header]: session.csrf }, extra);
}

// call makes a unary Connect call with JSON.
async function call(service, method, msg) {
  const r = await fetch(`/chalk.compute.v1.${service}/${method}`, {
    method: 'POST', credentials: 'same-origin',
    headers: headers({ 'Content-Type': 'application/json', 'Connect-Protocol-Version': '1' }),
    body: JSON.stringify(msg || {}),
  });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    if (body.code === 'unauthenticated') showSignIn('Your session ended: sign in again.');
    throw new APIError(body.code || String(r.status), userMessage(body.message || r.statusText));
  }
  return body;
}

// userMessage drops the error class the server appends (": invalid argument").
function userMessage(m) {
  return m.replace(/: (invalid argument|not found|permission denied|unauthenticated|failed precondition|already exists|resource exhausted)$/, '');
}

// stream makes a server-streaming Connect call (enveloped JSON) and calls
// onMsg for each message until the stream ends or signal aborts it.
async function stream(service, method, msg, onMsg, signal) {
  const payload = new TextEncoder().encode(JSON.stringify(msg || {}));
  const env = new Uint8Array(5 + payload.length);
  new DataView(env.buffer).setUint32(1, payload.length);
  env.set(payload, 5);
  const r = await fetch(`/chalk.compute.v1.${service}/${method}`, {
    method: 'POST', credentials: 'same-origin', signal,
    headers: headers({ 'Content-Type': 'application/connect+json', 'Connect-Protocol-Version': '1' }),
    body: env,
  });
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    throw new APIError(body.code || String(r.status), body.message || r.statusText);
  }
  const reader = r.body.getReader();
  let buf = new Uint8Array(0);
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    const next = new Uint8Array(buf.length + value.length);
    next.set(buf); next.set(value, buf.length); buf = next;
    while (buf.length >= 5) {
      const flags = buf[0], n = new DataView(buf.buffer, buf.byteOffset).getUint32(1);
      if (buf.length < 5 + n) break;
      const m = JSON.parse(new TextDecoder().decode(buf.subarray(5, 5 + n)));
      buf = buf.slice(5 + n);
      if (flags & 2) {
        if (m.error) throw new APIError(m.error.code, m.error.message);
        return;
      }
      onMsg(m);
    }
  }
}

function b64decode(s) {
  const bin = atob(s || '');
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function b64encode(bytes) {
  let s = '';
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

// ------------------------------------------------------------ session

function showSignIn(message) {
  stopView();
  session.csrf = '';
  document.getElementById('nav').hidden = true;
  document.getElementById('signout').hidden = true;
  document.getElementById('who').textContent = '';
  document.getElementById('view').replaceChildren();
  document.getElementById('signin').hidden = false;
  document.getElementById('signin-error').textContent = message || '';
  document.getElementById('apikey').focus();
}

function signedIn(info) {
  session.csrf = info.csrf;
  session.header = info.csrf_header || session.header;
  session.info = info;
  document.getElementById('signin').hidden = true;
  document.getElementById('nav').hidden = false;
  document.getElementById('signout').hidden = false;
  document.getElementById('who').textContent = `${info.user} in ${info.org} (${info.role})`;
  route();
}

async function signIn(ev) {
  ev.preventDefault();
  const input = document.getElementById('apikey');
  const errp = document.getElementById('signin-error');
  errp.textContent = '';
  const r = await fetch('/console/session', {
    method: 'POST', credentials: 'same-origin',
    headers: { Authorization: 'Bearer ' + input.value.trim() },
  });
  input.value = '';
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    errp.textContent = 'Sign-in failed: ' + (body.error || r.statusText);
    input.focus();
    return;
  }
  signedIn(body);
}

async function signOut() {
  await fetch('/console/session', { method: 'DELETE', credentials: 'same-origin', headers: headers() });
  showSignIn('Signed out.');
}

// ------------------------------------------------------------ pages

function setView(title, ...children) {
  stopView();
  stopView = () => {};
  document.title = title + ' · chalkcompute';
  document.getElementById('view').replaceChildren(el('h1', { text: title }), ...children);
}

// poll runs fn now and every ms until the view changes.
function poll(fn, ms) {
  let timer = null, stopped = false;
  const tick = async () => {
    try { await fn(); } catch (e) { /* shown by fn */ }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

function sandboxesPage() {
  const err = errorBox('sandboxes-error');
  const holder = el('div', { 'aria-live': 'polite' });
  const showAll = el('input', { type: 'checkbox', id: 'show-all', checked: true });
  const image = el('input', { type: 'text', id: 'new-image', value: 'busybox' });
  const cmd = el('input', { type: 'text', id: 'new-cmd', value: 'sleep 3600' });
  const createErr = errorBox('create-error');
  const create = el('form', { id: 'create-form', onsubmit: async ev => {
    ev.preventDefault();
    createErr.textContent = '';
    try {
      const sb = await call('SandboxService', 'Create', { image: image.value.trim(), entrypoint: cmd.value.trim().split(/\s+/).filter(Boolean) });
      location.hash = '#/sandbox/' + sb.id;
    } catch (e) { createErr.textContent = 'Create failed: ' + e.message; }
  } },
  el('label', { for: 'new-image', text: 'Image' }), image,
  el('label', { for: 'new-cmd', text: 'Command' }), cmd,
  el('button', { type: 'submit', text: 'Create sandbox' }), createErr);
  setView('Sandboxes',
    el('p', {}, showAll, ' ', el('label', { for: 'show-all', class: 'inline', text: 'Show ended sandboxes' })),
    err, holder, el('details', {}, el('summary', { text: 'New sandbox' }), create));
  stopView = poll(async () => {
    try {
      const r = await call('SandboxService', 'List', { all: showAll.checked });
      err.textContent = '';
      const rows = (r.sandboxes || []).map(sb => el('tr', { 'data-id': sb.id },
        el('td', {}, el('a', { href: '#/sandbox/' + sb.id, class: 'mono', text: sb.id })),
        el('td', { class: 'state state-' + sb.state, text: sb.state }),
        el('td', { class: 'mono', text: sb.image }),
        el('td', { text: age(sb.createdAt) }),
        el('td', { text: sb.orgId }),
        el('td', { class: 'mono', text: sb.createdBy }),
        el('td', {}, sb.state === 'running' || sb.state === 'creating'
          ? el('button', { type: 'button', 'aria-label': 'Terminate ' + sb.id, text: 'Terminate', onclick: () => terminate(sb.id, err) })
          : '')));
      holder.replaceChildren(table('Sandboxes', ['ID', 'State', 'Image', 'Age', 'Org', 'Created by', 'Actions'], rows, 'sandboxes'));
    } catch (e) { err.textContent = 'Could not list sandboxes: ' + e.message; }
  }, 2000);
}

async function terminate(id, err) {
  if (!confirm(`Terminate sandbox ${id}?`)) return;
  try { await call('SandboxService', 'Terminate', { id }); } catch (e) { err.textContent = 'Terminate failed: ' + e.message; }
}

function sandboxPage(id) {
  const err = errorBox('sandbox-error');
  const details = el('dl', { class: 'details', id: 'details' });
  const termBox = el('div', { id: 'terminal', role: 'region', 'aria-label': 'Terminal' });
  const termStatus = el('p', { id: 'terminal-status', 'aria-live': 'polite' });
  const openTerm = el('button', { type: 'button', id: 'open-terminal', text: 'Open terminal' });
  const log = el('pre', { class: 'log', id: 'log', tabindex: '0', 'aria-label': 'Console log' });
  const files = el('div', { id: 'files' });
  const egress = el('div', { id: 'egress' });
  const termBtn = el('button', { type: 'button', id: 'terminate', text: 'Terminate', onclick: () => terminate(id, err) });
  const claims = el('dl', { class: 'details', id: 'claims' });
  setView('Sandbox ' + id, err, details, termBtn,
    el('section', { 'aria-labelledby': 'h-claims' }, el('h2', { id: 'h-claims', text: 'Identity claims' }), claims),
    el('section', { 'aria-labelledby': 'h-term' }, el('h2', { id: 'h-term', text: 'Terminal' }), openTerm, termStatus, termBox),
    el('section', { 'aria-labelledby': 'h-log' }, el('h2', { id: 'h-log', text: 'Log' }), log),
    el('section', { 'aria-labelledby': 'h-files' }, el('h2', { id: 'h-files', text: 'Files' }), files),
    el('section', { 'aria-labelledby': 'h-egress' }, el('h2', { id: 'h-egress', text: 'Blocked egress' }), egress));
  const ctl = new AbortController();
  let term = null;
  const stopPoll = poll(async () => {
    try {
      const sb = await call('SandboxService', 'Get', { id });
      const rows = [['State', sb.state], ['Image', sb.image], ['Digest', sb.imageDigest], ['Org', sb.orgId],
        ['Created by', sb.createdBy], ['Created', sb.createdAt], ['Started', sb.startedAt], ['Ended', sb.endedAt],
        ['End reason', sb.endReason], ['Exit code', sb.state === 'stopped' ? String(sb.exitCode || 0) : ''],
        ['Address', sb.ip], ['Network policies', (sb.networkPolicies || []).join(', ')],
        ['Tunnels', (sb.tunnels || []).join(', ')], ['Memory (MiB)', sb.memoryMb], ['Error', sb.error]];
      details.replaceChildren(...rows.filter(([, v]) => v !== undefined && v !== '').flatMap(([k, v]) =>
        [el('dt', { text: k }), el('dd', { id: 'detail-' + k.toLowerCase().replace(/\W+/g, '-'), text: String(v) })]));
      // The workload identity's claims (docs/IDENTITY.md) that follow from the sandbox.
      claims.replaceChildren(...[['sub', `chalk:org:${sb.orgId}:sbx:${sb.id}`], ['org_id', sb.orgId], ['sandbox_id', sb.id],
        ['image_digest', sb.imageDigest], ['created_by', sb.createdBy]].flatMap(([k, v]) =>
        [el('dt', { class: 'mono', text: k }), el('dd', { class: 'mono', text: v || '' })]));
      termBtn.hidden = !(sb.state === 'running' || sb.state === 'creating');
      openTerm.disabled = sb.state !== 'running';
    } catch (e) { err.textContent = e.message; }
  }, 2000);
  stream('SandboxService', 'Logs', { sandboxId: id, follow: true }, m => {
    log.append(new TextDecoder().decode(b64decode(m.data)));
    log.scrollTop = log.scrollHeight;
  }, ctl.signal).catch(e => { if (!ctl.signal.aborted) log.append(`\n[log: ${e.message}]`); });
  openTerm.addEventListener('click', () => {
    if (term) term.dispose();
    term = openTerminal(id, termBox, termStatus);
  });
  filesBrowser(id, files);
  egressLog(id, egress);
  stopView = () => { stopPoll(); ctl.abort(); if (term) term.dispose(); };
}

// openTerminal connects an xterm.js terminal to a shell in the sandbox.
function openTerminal(id, box, status) {
  box.replaceChildren();
  const term = new Terminal({ cursorBlink: true, convertEol: false, fontSize: 14, screenReaderMode: false });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  box.dataset.size = `${term.rows} ${term.cols}`; // as `stty size` prints it
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(`${proto}//${location.host}/console/terminal?sandbox=${encodeURIComponent(id)}`);
  ws.binaryType = 'arraybuffer';
  const enc = new TextEncoder();
  let pty = true, line = '';
  status.textContent = 'Connecting…';
  ws.onopen = () => ws.send(JSON.stringify({ csrf: session.csrf, rows: term.rows, cols: term.cols }));
  ws.onmessage = ev => {
    if (typeof ev.data !== 'string') { term.write(new Uint8Array(ev.data)); return; }
    const c = JSON.parse(ev.data);
    if (c.type === 'mode') {
      pty = !!c.pty;
      term.options.convertEol = !pty;
      status.textContent = pty ? 'Connected.' : 'Connected (line mode: this node has no terminals).';
      term.focus();
    } else if (c.type === 'exit') {
      status.textContent = `The shell exited (${c.code}).`;
    } else if (c.type === 'error') {
      status.textContent = 'Terminal error: ' + c.message;
    }
  };
  ws.onclose = () => { if (!status.textContent.startsWith('The shell') && !status.textContent.startsWith('Terminal error')) status.textContent = 'Disconnected.'; };
  term.onData(d => {
    if (ws.readyState !== WebSocket.OPEN) return;
    if (pty) { ws.send(enc.encode(d)); return; }
    // Line mode: the shell reads a pipe, so the page echoes and edits.
    for (const ch of d) {
      if (ch === '\r' || ch === '\n') { term.write('\r\n'); ws.send(enc.encode(line + '\n')); line = ''; }
      else if (ch === '\x7f' || ch === '\b') { if (line) { line = line.slice(0, -1); term.write('\b \b'); } }
      else if (ch === '\x03') { term.write('^C\r\n'); line = ''; }
      else if (ch === '\x04') { if (!line) ws.send(new Uint8Array(0)); }
      else if (ch >= ' ') { line += ch; term.write(ch); }
    }
  });
  term.onResize(({ rows, cols }) => {
    box.dataset.size = `${rows} ${cols}`;
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: 'resize', rows, cols }));
  });
  // The terminal follows its box (window resizes, layout changes).
  const ro = new ResizeObserver(() => fit.fit());
  ro.observe(box);
  return { dispose: () => { ro.disconnect(); ws.close(); term.dispose(); } };
}

function filesBrowser(id, box) {
  const pathIn = el('input', { type: 'text', id: 'files-path', value: '/' });
  const err = errorBox('files-error');
  const list = el('div', {});
  const upload = el('input', { type: 'file', id: 'upload' });
  const load = async () => {
    err.textContent = '';
    try {
      const dir = pathIn.value.replace(/\/+$/, '') || '';
      const r = await call('SandboxService', 'ListFiles', { sandboxId: id, path: dir || '/' });
      const rows = (r.files || []).map(f => {
        const full = dir + '/' + f.name;
        return el('tr', {},
          el('td', {}, f.isDir
            ? el('button', { type: 'button', class: 'linkish', text: f.name + '/', onclick: () => { pathIn.value = full; load(); } })
            : el('span', { class: 'mono', text: f.name })),
          el('td', { text: f.isDir ? '' : String(f.size || 0) }),
          el('td', { text: f.modTime || '' }),
          el('td', {}, f.isDir ? '' : el('button', { type: 'button', 'aria-label': 'Download ' + f.name, text: 'Download', onclick: () => download(id, full, f.name, err) })));
      });
      list.replaceChildren(table('Files in ' + (dir || '/'), ['Name', 'Size', 'Modified', 'Actions'], rows, 'files-table'));
    } catch (e) { err.textContent = 'Could not list files: ' + e.message; }
  };
  upload.addEventListener('change', async () => {
    const f = upload.files[0];
    if (!f) return;
    try {
      const data = new Uint8Array(await f.arrayBuffer());
      const dir = pathIn.value.replace(/\/+$/, '');
      await call('SandboxService', 'WriteFile', { sandboxId: id, path: dir + '/' + f.name, data: b64encode(data), mode: 0o644 });
      upload.value = '';
      load();
    } catch (e) { err.textContent = 'Upload failed: ' + e.message; }
  });
  box.replaceChildren(el('form', { onsubmit: ev => { ev.preventDefault(); load(); } },
    el('label', { for: 'files-path', text: 'Directory' }), pathIn, el('button', { type: 'submit', text: 'List' }),
    el('label', { for: 'upload', text: 'Upload a file to this directory' }), upload), err, list);
  load();
}

async function download(id, path, name, err) {
  try {
    const parts = [];
    await stream('SandboxService', 'ReadFile', { sandboxId: id, path }, m => parts.push(b64decode(m.data)));
    const a = el('a', { href: URL.createObjectURL(new Blob(parts)), download: name });
    document.body.append(a); a.click(); a.remove();
  } catch (e) { err.textContent = 'Download failed: ' + e.message; }
}

async function egressLog(id, box) {
  try {
    const r = await call('SandboxService', 'EgressLog', { sandboxId: id });
    box.replaceChildren(table('Connections the policy dropped', ['Time', 'Proto', 'Destination', 'Port', 'Name', 'Count'],
      (r.drops || []).map(d => el('tr', {}, [d.time, d.proto, d.dst, d.port, d.name, d.count].map(v => el('td', { text: v === undefined ? '' : String(v) }))))));
  } catch (e) { box.replaceChildren(el('p', { text: 'Egress log unavailable: ' + e.message })); }
}

function policiesPage() {
  const err = errorBox('policies-error');
  const holder = el('div', {});
  const formErr = errorBox('policy-error');
  const name = el('input', { type: 'text', id: 'policy-name', required: true });
  const allowAll = el('input', { type: 'checkbox', id: 'policy-allow-all' });
  const hosts = el('textarea', { id: 'policy-hosts', rows: '6', 'aria-describedby': 'policy-hosts-help' });
  const desc = el('input', { type: 'text', id: 'policy-desc' });
  let editing = false;
  const form = el('form', { id: 'policy-form', onsubmit: async ev => {
    ev.preventDefault();
    formErr.textContent = '';
    const p = { name: name.value.trim(), allowAll: allowAll.checked, description: desc.value,
      allowedHostnames: hosts.value.split('\n').map(s => s.trim()).filter(Boolean) };
    try {
      await call('PolicyService', editing ? 'Update' : 'Create', p);
      formErr.textContent = '';
      status.textContent = `Saved policy ${p.name}.`;
      load();
    } catch (e) { formErr.textContent = 'Not saved: ' + e.message; status.textContent = ''; }
  } },
  el('h2', { id: 'policy-form-title', text: 'New policy' }),
  el('label', { for: 'policy-name', text: 'Name' }), name,
  el('p', {}, allowAll, ' ', el('label', { for: 'policy-allow-all', class: 'inline', text: 'Allow all destinations (hostnames below are then only logged)' })),
  el('label', { for: 'policy-hosts', text: 'Allowed hostnames and CIDRs' }), hosts,
  el('p', { id: 'policy-hosts-help', class: 'help', text: 'One a line: example.com, *.example.com, 203.0.113.0/24.' }),
  el('label', { for: 'policy-desc', text: 'Description' }), desc,
  el('button', { type: 'submit', id: 'policy-save', text: 'Save policy' }), formErr);
  const status = el('p', { id: 'policy-status', role: 'status' });
  const edit = p => {
    editing = !!p;
    name.value = p ? p.name : ''; name.readOnly = !!p;
    allowAll.checked = p ? p.allowAll !== false : false;
    hosts.value = p ? (p.allowedHostnames || []).join('\n') : '';
    desc.value = p ? p.description || '' : '';
    form.querySelector('h2').textContent = p ? 'Edit policy ' + p.name : 'New policy';
    formErr.textContent = '';
    (p ? hosts : name).focus();
  };
  const load = async () => {
    try {
      const r = await call('PolicyService', 'List', {});
      holder.replaceChildren(table('Network policies', ['Name', 'Allow all', 'Allowed', 'Description', 'Updated', 'Actions'],
        (r.policies || []).map(p => el('tr', {},
          el('td', { class: 'mono', text: p.name }), el('td', { text: p.allowAll === false ? 'no' : 'yes' }),
          el('td', { class: 'mono', text: (p.allowedHostnames || []).join(' ') }), el('td', { text: p.description || '' }),
          el('td', { text: p.updatedAt || '' }),
          el('td', {}, el('button', { type: 'button', 'aria-label': 'Edit ' + p.name, text: 'Edit', onclick: () => edit(p) }),
            el('button', { type: 'button', 'aria-label': 'Delete ' + p.name, text: 'Delete', onclick: async () => {
              if (!confirm(`Delete policy ${p.name}?`)) return;
              try { await call('PolicyService', 'Delete', { name: p.name }); load(); } catch (e) { err.textContent = e.message; }
            } })))), 'policies'));
    } catch (e) { err.textContent = 'Could not list policies: ' + e.message; }
  };
  setView('Network policies', err, holder, el('button', { type: 'button', text: 'New policy', onclick: () => edit(null) }), status, form);
  load();
}

// listPage shows one list RPC as a table.
function listPage(title, service, method, key, cols, req) {
  const err = errorBox('list-error');
  const holder = el('div', {});
  setView(title, err, holder);
  stopView = poll(async () => {
    try {
      const r = await call(service, method, req || {});
      holder.replaceChildren(table(title, cols.map(c => c[0]),
        (r[key] || []).map(o => el('tr', {}, cols.map(([, f]) => el('td', { text: f(o) === undefined ? '' : String(f(o)) }))))));
    } catch (e) { err.textContent = e.message; }
  }, 5000);
}

// nodePage shows the node's health: its sandboxes and the chalkd metrics
// (/metrics, which needs an admin's session).
function nodePage() {
  const err = errorBox('node-error');
  const summary = el('dl', { class: 'details', id: 'node-summary' });
  const holder = el('div', {});
  const filter = el('input', { type: 'text', id: 'metric-filter', value: 'chalk_' });
  setView('Node health', err, summary, el('label', { for: 'metric-filter', text: 'Metrics whose name contains' }), filter, holder);
  stopView = poll(async () => {
    try {
      const r = await call('SandboxService', 'List', { all: false });
      const sbs = r.sandboxes || [];
      summary.replaceChildren(el('dt', { text: 'Running sandboxes' }), el('dd', { text: String(sbs.filter(s => s.state === 'running').length) }),
        el('dt', { text: 'Creating' }), el('dd', { text: String(sbs.filter(s => s.state === 'creating').length) }));
      const m = await fetch('/metrics', { credentials: 'same-origin', headers: headers() });
      if (!m.ok) { err.textContent = m.status === 403 ? 'Metrics need an admin key.' : 'Metrics: ' + m.statusText; return; }
      err.textContent = '';
      const f = filter.value.trim();
      const rows = (await m.text()).split('\n').filter(l => l && !l.startsWith('#') && l.includes(f)).slice(0, 500).map(l => {
        const i = l.lastIndexOf(' ');
        return el('tr', {}, el('td', { class: 'mono', text: l.slice(0, i) }), el('td', { class: 'mono', text: l.slice(i + 1) }));
      });
      holder.replaceChildren(table('Metrics', ['Metric', 'Value'], rows, 'metrics'));
    } catch (e) { err.textContent = e.message; }
  }, 5000);
}

function route() {
  if (!session.csrf) return;
  const h = location.hash.replace(/^#\/?/, '');
  const [page, arg] = h.split('/');
  switch (page) {
    case 'sandbox': return sandboxPage(decodeURIComponent(arg || ''));
    case 'policies': return policiesPage();
    case 'images': return listPage('Images', 'ImageService', 'List', 'images',
      [['Reference', i => i.ref], ['Digest', i => i.digest], ['Size', i => i.size], ['Warm', i => i.warm ? 'yes' : 'no']]);
    case 'tunnels': return listPage('Tunnels', 'TunnelService', 'List', 'tunnels',
      [['Name', t => t.name], ['Subnet', t => t.subnet], ['Members', t => (t.members || []).map(m => m.sandboxId + ' ' + m.address).join(', ')],
        ['Peers', t => (t.peers || []).length], ['Created', t => t.createdAt]]);
    case 'mcp': return listPage('MCP servers', 'McpService', 'ListServers', 'servers',
      [['Name', m => m.name], ['URL', m => m.url], ['Gateway URL', m => m.gatewayUrl], ['Allowed tools', m => (m.allowedTools || []).join(', ') || 'all'],
        ['Credential', m => m.hasCredential ? 'set' : 'none'], ['Created by', m => m.createdBy]]);
    case 'audit': return listPage('MCP gateway audit log', 'McpService', 'Audit', 'records',
      [['Time', a => a.at], ['Sandbox', a => a.sandboxId], ['Server', a => a.server], ['Method', a => a.method], ['Tool', a => a.tool],
        ['Decision', a => a.decision], ['Status', a => a.status], ['Latency (ms)', a => a.latencyMs && a.latencyMs.toFixed(1)]], { limit: 200 });
    case 'org-audit': return listPage('Audit log', 'TeamService', 'Audit', 'records',
      [['Time', a => a.at], ['Actor', a => a.actor], ['Via', a => a.via], ['Action', a => a.action], ['Object', a => a.object],
        ['Outcome', a => a.outcome], ['Detail', a => a.detail], ['From', a => a.peer]], { limit: 200 });
    case 'node': return nodePage();
    default: return sandboxesPage();
  }
}

document.addEventListener('DOMContentLoaded', async () => {
  document.getElementById('signin-form').addEventListener('submit', signIn);
  document.getElementById('signout').addEventListener('click', signOut);
  window.addEventListener('hashchange', route);
  const r = await fetch('/console/session', { credentials: 'same-origin' });
  if (r.ok) signedIn(await r.json());
  else showSignIn('');
});
