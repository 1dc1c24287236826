// The console shell: sign-in, the header and navigation, the hash router,
// and the live feed of cluster status changes (GET /api/v1/events, a long
// poll) that views subscribe to.
//
// Routes (the hash never holds a secret):
//   #/                                   clusters
//   #/clusters/NAME                      a cluster's overview
//   #/clusters/NAME/ns/NS                workloads in a namespace
//   #/clusters/NAME/ns/NS/KIND/OBJ[/TAB] one object (TAB: yaml, json, events, logs)
//   #/clusters/NAME/nodes/NODE[/TAB]     one node
//   #/fleet?clusters=PATTERN&ns=NS       every reachable cluster at once
//   #/register  #/users  #/audit         admin pages

import { api, hub, onUnauthorized, session } from './api.js';
import { h, put, errorBox } from './dom.js';
import { clustersView } from './clusters.js';
import { clusterView } from './cluster.js';
import { fleetView } from './fleet.js';
import { registerView, usersView, auditView } from './admin.js';

const root = document.getElementById('app');
let me = null; // { name, groups, admin }
let current = null; // AbortController of the view on screen
let feed = null; // AbortController of the events feed
const subscribers = new Set();
const announcer = h('div', { class: 'visually-hidden', 'aria-live': 'polite', id: 'announcer' });

function announce(text) {
  announcer.textContent = '';
  setTimeout(() => { announcer.textContent = text; }, 50);
}

// ---- sign in / out ------------------------------------------------------

/** The organisation's identity provider, if the hub has one (GET /api/v1/hub). */
let provider;

async function loadProvider() {
  if (provider === undefined) {
    try { provider = (await hub.get('/hub')).oidc ?? null; } catch { provider = null; }
  }
  return provider;
}

function signInView(notice) {
  stopAll();
  document.title = 'Sign in · uplink';
  const input = h('input', { id: 'token', name: 'token', type: 'password', autocomplete: 'off', spellcheck: 'false', required: true, 'aria-describedby': 'token-help' });
  const status = h('div', { 'aria-live': 'polite' });
  const button = h('button', { type: 'submit', class: 'primary' }, 'Sign in');
  const form = h('form', { class: 'card signin', 'aria-labelledby': 'signin-title' },
    h('h1', { id: 'signin-title' }, h('img', { src: iconUrl(), alt: '', width: 28, height: 28 }), ' Sign in to uplink'),
    notice ? h('div', { class: 'callout info', role: 'status' }, notice) : null,
    h('label', { for: 'token' }, 'Hub token'),
    input,
    h('p', { id: 'token-help', class: 'hint' },
      'The token a hub admin gave you (it starts with ', h('code', 'uh_'), '). It is kept in this browser tab only and forgotten when you close the tab or sign out.'),
    status,
    button);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    button.disabled = true;
    put(status, h('span', { class: 'loading' }, h('span', { class: 'spinner', 'aria-hidden': 'true' }), ' Checking…'));
    session.set(token);
    try {
      me = await hub.get('/whoami');
      session.setCsrf(null);
      input.value = '';
      start();
    } catch (e) {
      session.clear();
      button.disabled = false;
      const msg = e.status === 401
        ? { message: 'This token is not valid on this hub.', hint: 'Check for copy mistakes (no spaces), or ask an admin for a new one: uplink-hub user token NAME.' }
        : e;
      put(status, errorBox(msg, 'Could not sign in'));
      input.focus();
    }
  });
  put(root, h('main', { id: 'main', class: 'signin-page' }, form), announcer);
  input.focus();
  // With an identity provider: one click, then the provider's own page.
  loadProvider().then((p) => {
    if (!p) return;
    const sso = h('div', { class: 'sso' },
      h('a', { href: p.login_path, class: 'button primary', id: 'sign-in-sso' }, 'Sign in with your organisation'),
      h('p', { class: 'hint' }, 'Through ', h('code', p.issuer), '. Or use a hub token below.'));
    form.insertBefore(sso, form.querySelector('label'));
  });
}

async function signOut(notice = 'You are signed out.') {
  // A cookie session ends on the hub too (the call carries the CSRF token).
  if (!session.token && session.csrf) await api('/auth/logout', { method: 'POST' }).catch(() => {});
  session.clear();
  me = null;
  signInView(notice);
}

onUnauthorized(() => {
  if (!me) return;
  session.setCsrf(null); // the hub has already ended the session
  signOut('You are no longer accepted by the hub (revoked or expired). Sign in again.');
});

function stopAll() {
  current?.abort();
  feed?.abort();
  current = null;
  feed = null;
  subscribers.clear();
}

// ---- live feed ------------------------------------------------------------

const live = h('span', { class: 'live', id: 'live-indicator', title: 'Live cluster status' }, 'connecting…');

function setLive(ok, why) {
  live.className = ok ? 'live on' : 'live off';
  live.textContent = ok ? 'Live' : 'Reconnecting…';
  live.title = ok ? 'Cluster status updates live' : `Live updates paused: ${why ?? ''} Retrying.`;
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const t = setTimeout(resolve, ms);
  signal.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
});

async function runFeed(signal) {
  let since = null;
  let failures = 0;
  while (!signal.aborted) {
    try {
      if (since === null) {
        since = (await hub.get('/events', { signal })).next;
        setLive(true);
        continue;
      }
      const r = await hub.get(`/events?since=${since}&wait=25`, { signal });
      since = r.next;
      failures = 0;
      setLive(true);
      if (r.events.length || r.reset) {
        for (const e of r.events) if (e.kind === 'disconnected' || e.kind === 'connected') announce(`Cluster ${e.cluster} is now ${e.status}`);
        subscribers.forEach((fn) => fn(r.events, r.reset));
      }
    } catch (e) {
      if (signal.aborted) return;
      failures += 1;
      setLive(false, e.message);
      await sleep(Math.min(1000 * 2 ** failures, 15000), signal);
      // After an outage, views reload what they show.
      if (!signal.aborted && failures === 1) subscribers.forEach((fn) => fn([], true));
    }
  }
}

// ---- shell and routing -----------------------------------------------------

function iconUrl() {
  return new URL('./icon.svg', import.meta.url).pathname;
}

let main;
let nav;

function shell() {
  const links = [
    ['#/', 'Clusters', (r) => r === '' || r.startsWith('clusters')],
    ['#/fleet', 'Fleet', (r) => r === 'fleet'],
    ...(me.admin ? [
      ['#/register', 'Register a cluster', (r) => r === 'register'],
      ['#/users', 'Users & grants', (r) => r === 'users'],
      ['#/audit', 'Audit log', (r) => r.startsWith('audit')],
    ] : []),
  ];
  nav = h('nav', { 'aria-label': 'Main' }, h('ul', links.map(([href, text, active]) => {
    const a = h('a', { href }, text);
    a.isActive = active;
    return h('li', a);
  })));
  main = h('main', { id: 'main', tabindex: '-1' });
  const out = h('button', { type: 'button', id: 'sign-out', onclick: () => signOut() }, 'Sign out');
  put(root,
    h('a', { class: 'skip', href: '#main', onclick: (ev) => { ev.preventDefault(); main.focus(); } }, 'Skip to content'),
    h('header', { class: 'top' },
      h('a', { class: 'brand', href: '#/' }, h('img', { src: iconUrl(), alt: '', width: 24, height: 24 }), 'uplink'),
      nav,
      h('div', { class: 'who' }, live,
        h('span', { class: 'user', id: 'whoami' }, me.name, me.admin ? h('span', { class: 'tag' }, 'admin') : null),
        out)),
    main,
    announcer);
}

function route() {
  if (!me) return;
  current?.abort();
  current = new AbortController();
  const signal = current.signal;
  const raw = location.hash.replace(/^#\/?/, '');
  const [pathPart, query = ''] = raw.split('?');
  // Each segment decoded on its own, after splitting on '/'; a malformed
  // escape is kept as typed rather than failing the whole page.
  const parts = pathPart.split('/').filter(Boolean).map((p) => { try { return decodeURIComponent(p); } catch { return p; } });
  for (const li of nav.querySelectorAll('a')) {
    if (li.isActive(pathPart)) li.setAttribute('aria-current', 'page'); else li.removeAttribute('aria-current');
  }
  const ctx = {
    main, me, signal,
    params: new URLSearchParams(query),
    /** Runs `fn(events, reset)` on each status change while this view is shown. */
    onEvents(fn) { subscribers.add(fn); signal.addEventListener('abort', () => subscribers.delete(fn)); },
    /** Runs `fn` every `ms` while this view is shown. */
    every(ms, fn) { const t = setInterval(fn, ms); signal.addEventListener('abort', () => clearInterval(t)); },
    title(t) { document.title = `${t} · uplink`; },
    reload: route,
    announce,
  };
  main.replaceChildren();
  let view;
  if (parts.length === 0) view = clustersView(ctx);
  else if (parts[0] === 'clusters' && parts[1]) view = clusterView(ctx, parts.slice(1));
  else if (parts[0] === 'fleet') view = fleetView(ctx);
  else if (parts[0] === 'register') view = registerView(ctx);
  else if (parts[0] === 'users') view = usersView(ctx);
  else if (parts[0] === 'audit') view = auditView(ctx);
  else {
    put(main, h('h1', { tabindex: '-1' }, 'Page not found'), h('p', 'There is no page at this address. ', h('a', { href: '#/' }, 'Go to the clusters')));
  }
  Promise.resolve(view).catch((e) => {
    if (e?.name === 'AbortError' || signal.aborted) return;
    console.error(e);
    main.append(errorBox(e, 'This page failed'));
  });
  // Move focus to the new page's heading for keyboard and screen reader users.
  if (focusOnRoute) queueMicrotask(() => main.querySelector('h1')?.focus({ preventScroll: false }));
  focusOnRoute = true;
}

let focusOnRoute = false;

function start() {
  shell();
  feed = new AbortController();
  runFeed(feed.signal);
  focusOnRoute = false;
  route();
}

window.addEventListener('hashchange', route);

async function boot() {
  try {
    // No token in this tab: perhaps a session cookie from /auth/login.
    me = await hub.get('/whoami');
    if (!session.token && me.session !== 'oidc') return signInView();
    session.setCsrf(me.csrf_token);
    start();
  } catch (e) {
    if (e.status === 401) return session.token ? signOut('Your session ended: sign in again.') : signInView();
    put(root, h('main', { id: 'main' }, errorBox(e, 'The hub did not answer'), h('button', { type: 'button', onclick: boot }, 'Try again')));
  }
}

boot();
