// DOM and formatting helpers. Every node is built with createElement and
// text nodes, never from HTML strings, so no value from a cluster (names,
// labels, log lines, messages) can become markup.

/** h('a', {href: '#/', class: 'x', onclick: fn}, 'text', child, [more]) */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs && (typeof attrs !== 'object' || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = !!v;
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  add(el, children);
  return el;
}

function add(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
}

/** Replaces the children of `el`. */
export function put(el, ...children) {
  el.replaceChildren();
  add(el, children);
  return el;
}

/** A polite loading indicator; after a few seconds it says why it may be slow. */
export function loading(what = 'Loading…', slowHint = 'The cluster is taking a while to answer: slow links and busy API servers do that.') {
  const hint = h('span', { class: 'hint' });
  const el = h('div', { class: 'loading', role: 'status', 'aria-live': 'polite' }, h('span', { class: 'spinner', 'aria-hidden': 'true' }), h('span', what), hint);
  setTimeout(() => { if (el.isConnected) hint.textContent = ' ' + slowHint; }, 4000);
  return el;
}

/** A callout for an error: what happened (`e.message`) and what to do. */
export function errorBox(e, title = 'Something went wrong', extra) {
  return h('div', { class: 'callout error', role: 'alert' },
    h('strong', title), h('p', { class: 'message' }, e?.message ?? String(e)),
    e?.hint ? h('p', { class: 'hint' }, e.hint) : null, extra ?? null);
}

/** A callout for a refusal by the cluster's RBAC: its own words. */
export function forbiddenBox(e) {
  const byHub = /^uplink-hub\b/.test(e.message);
  return h('div', { class: 'callout forbidden', role: 'note' },
    h('strong', byHub ? 'Refused by the hub' : 'Not allowed by the cluster’s RBAC'),
    h('p', { class: 'message' }, e.message),
    h('p', { class: 'hint' }, byHub
      ? 'The hub decides who may reach which cluster as whom; a hub admin can change your grants or the cluster’s registration.'
      : 'The cluster decides what you may see. Ask its administrator for a Role or ClusterRole that grants this to your user or one of your groups.'));
}

export function empty(text, ...more) {
  return h('div', { class: 'empty' }, h('p', text), ...more);
}

export function badge(status) {
  const s = String(status ?? 'UNKNOWN');
  return h('span', { class: `badge status-${s.toLowerCase()}`, 'data-status': s }, s);
}

/** A table whose wrapper scrolls sideways on narrow screens. */
export function table(caption, headers, rows, attrs = {}) {
  return h('div', { class: 'table-wrap', tabindex: '0', role: 'region', 'aria-label': caption },
    h('table', attrs,
      h('caption', { class: 'visually-hidden' }, caption),
      h('thead', h('tr', headers.map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', rows)));
}

/** A "Copy" button for `text()`. */
export function copyButton(text, label = 'Copy') {
  const b = h('button', { type: 'button', class: 'small' }, label);
  b.addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(typeof text === 'function' ? text() : text);
      b.textContent = 'Copied';
    } catch {
      b.textContent = 'Select and copy by hand';
    }
    setTimeout(() => { b.textContent = label; }, 2000);
  });
  return b;
}

/** Starts a download of `text` as `filename`. */
export function download(filename, text, type = 'text/plain') {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = h('a', { href: url, download: filename, class: 'visually-hidden' }, filename);
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

export function downloadButton(filename, text, label, type) {
  return h('button', { type: 'button', onclick: () => download(filename, typeof text === 'function' ? text() : text, type) }, label ?? `Download ${filename}`);
}

/** A modal confirmation; resolves true when confirmed. With `typeToConfirm`, the
 * person must type that word first (for what cannot be undone). */
export function confirmDialog({ title, body, confirm = 'Confirm', danger = false, typeToConfirm }) {
  return new Promise((resolve) => {
    const input = typeToConfirm ? h('input', { id: 'confirm-input', autocomplete: 'off', spellcheck: 'false' }) : null;
    const ok = h('button', { type: 'submit', class: danger ? 'danger' : 'primary', disabled: !!typeToConfirm }, confirm);
    const cancel = h('button', { type: 'button' }, 'Cancel');
    const titleId = 'dlg-title-' + Math.random().toString(36).slice(2);
    const form = h('form', { method: 'dialog' },
      h('h2', { id: titleId }, title),
      ...[].concat(body).map((p) => (p instanceof Node ? p : h('p', p))),
      input ? h('label', { for: 'confirm-input' }, 'Type ', h('code', typeToConfirm), ' to confirm') : null,
      input,
      h('div', { class: 'actions' }, cancel, ok));
    const dlg = h('dialog', { 'aria-labelledby': titleId }, form);
    let result = false;
    input?.addEventListener('input', () => { ok.disabled = input.value.trim() !== typeToConfirm; });
    form.addEventListener('submit', (ev) => { ev.preventDefault(); if (!ok.disabled) { result = true; dlg.close(); } });
    cancel.addEventListener('click', () => dlg.close());
    dlg.addEventListener('close', () => { dlg.remove(); resolve(result); });
    document.body.append(dlg);
    dlg.showModal();
    (input ?? cancel).focus();
  });
}

// ---- time ---------------------------------------------------------------

export function ago(iso) {
  if (!iso) return '—';
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return iso;
  let s = Math.round((Date.now() - t) / 1000);
  const future = s < 0;
  s = Math.abs(s);
  const txt = s < 5 ? 'just now'
    : s < 60 ? `${s} s`
      : s < 3600 ? `${Math.floor(s / 60)} min`
        : s < 86400 ? `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`
          : `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  if (txt === 'just now') return txt;
  return future ? `in ${txt}` : `${txt} ago`;
}

export function when(iso) {
  if (!iso) return h('span', { class: 'muted' }, '—');
  const d = new Date(iso);
  return h('time', { datetime: iso, title: d.toLocaleString() }, ago(iso));
}

export function localTime(iso) {
  return iso ? new Date(iso).toLocaleString() : '—';
}

// ---- sizes ----------------------------------------------------------------

/** Kubernetes quantities ("16318412Ki") as people read them ("15.6 GiB"). */
export function quantity(q) {
  if (q === undefined || q === null) return '—';
  const m = /^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?$/.exec(String(q));
  if (!m) return String(q);
  const units = { Ki: 2 ** 10, Mi: 2 ** 20, Gi: 2 ** 30, Ti: 2 ** 40, k: 1e3, M: 1e6, G: 1e9, T: 1e12 };
  if (!m[2] || m[2] === 'm') return String(q);
  const bytes = parseFloat(m[1]) * units[m[2]];
  const steps = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < steps.length - 1) { v /= 1024; i += 1; }
  return `${v.toFixed(v < 10 && i > 0 ? 1 : 0)} ${steps[i]}`;
}

export function bytes(n) {
  if (n === null || n === undefined) return '—';
  return n < 1024 ? `${n} B` : quantity(`${Math.round(n / 1024)}Ki`);
}

// ---- YAML ---------------------------------------------------------------

const RESERVED = /^(true|false|null|yes|no|on|off|y|n|~|)$/i;
const PLAIN = /^[A-Za-z_/][A-Za-z0-9_./:@=+()-]*( [A-Za-z0-9_./:@=+()-]+)*$/;

function str(s, ind) {
  if (PLAIN.test(s) && !RESERVED.test(s) && !/:( |$)/.test(s)) return s;
  if (s.includes('\n') && !/^[ \t]/.test(s) && !/[\r\u0085\u2028\u2029]/.test(s)) {
    const body = s.endsWith('\n') ? s.slice(0, -1) : s;
    return (s.endsWith('\n') ? '|' : '|-') + '\n' + body.split('\n').map((l) => (l ? ind + l : '')).join('\n');
  }
  return JSON.stringify(s);
}

function scalar(v, ind) {
  if (v === null || v === undefined) return 'null';
  if (typeof v === 'string') return str(v, ind);
  if (Array.isArray(v)) return '[]';
  if (typeof v === 'object') return '{}';
  return String(v);
}

const isObj = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
const full = (v) => (Array.isArray(v) ? v.length > 0 : isObj(v) && Object.keys(v).length > 0);

/** JSON → YAML as kubectl prints it (list items at their key's indent). */
export function toYaml(v, ind = '') {
  if (Array.isArray(v) && v.length) {
    return v.map((x) => (full(x) ? ind + '- ' + toYaml(x, ind + '  ').slice(ind.length + 2) : `${ind}- ${scalar(x, ind + '  ')}`)).join('\n');
  }
  if (isObj(v) && Object.keys(v).length) {
    return Object.entries(v).map(([k, x]) => {
      const key = `${ind}${str(k, ind)}:`;
      if (isObj(x) && full(x)) return `${key}\n${toYaml(x, ind + '  ')}`;
      if (Array.isArray(x) && x.length) return `${key}\n${toYaml(x, ind)}`;
      return `${key} ${scalar(x, ind + '  ')}`;
    }).join('\n');
  }
  return scalar(v, ind);
}
