// Admin pages: register a cluster (manifest and activation file with the
// exact commands), users and their tokens, grants, and the audit log.

import { hub } from './api.js';
import {
  h, put, loading, errorBox, empty, table, when, localTime, bytes, copyButton, downloadButton, confirmDialog,
} from './dom.js';

function adminOnly(ctx) {
  if (ctx.me.admin) return false;
  put(ctx.main, h('h1', { tabindex: '-1' }, 'Admins only'),
    h('p', `This page is for hub admins; ${ctx.me.name} is not one. `, h('a', { href: '#/' }, 'Go to the clusters')));
  return true;
}

// Names are separated by commas or new lines, never by spaces: a
// Kubernetes user or group name may hold spaces ("Jane Doe").
const list = (s) => s.split(/[,\n]/).map((x) => x.trim()).filter(Boolean);

/** The audit page filtered to one user; the name is query-encoded. */
const auditOf = (user) => `#/audit?${new URLSearchParams({ user })}`;

function field(id, label, input, help) {
  input.id = id;
  if (help) input.setAttribute('aria-describedby', `${id}-help`);
  return h('div', { class: 'field' }, h('label', { for: id }, label), input, help ? h('p', { class: 'hint', id: `${id}-help` }, help) : null);
}

function formStatus() {
  return h('div', { class: 'form-status', 'aria-live': 'polite' });
}

/** Disables `button` while `fn` runs, showing progress in `status`. */
async function busy(button, status, what, fn) {
  button.disabled = true;
  put(status, h('span', { class: 'loading' }, h('span', { class: 'spinner', 'aria-hidden': 'true' }), ` ${what}`));
  try {
    await fn();
    put(status);
  } catch (e) {
    put(status, errorBox(e, 'That did not work'));
  } finally {
    button.disabled = false;
  }
}

// ---- register ------------------------------------------------------------------

export function registerView(ctx) {
  if (adminOnly(ctx)) return;
  ctx.title('Register a cluster');
  const name = h('input', { name: 'name', required: true, pattern: '[a-z0-9]([a-z0-9\\-]{0,61}[a-z0-9])?', autocomplete: 'off', spellcheck: 'false', placeholder: 'edge-1' });
  const expiry = h('select', { name: 'expiry' }, [[1, '1 hour'], [24, '24 hours'], [72, '72 hours'], [168, '7 days'], [720, '30 days']]
    .map(([v, t]) => h('option', { value: v, selected: v === 72 }, t)));
  const users = h('input', { name: 'users', autocomplete: 'off', spellcheck: 'false', placeholder: 'alice, bob' });
  const groups = h('input', { name: 'groups', autocomplete: 'off', spellcheck: 'false', placeholder: 'uplink:viewers' });
  const grant = h('input', { type: 'checkbox', id: 'grant', checked: true });
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Register');
  const status = formStatus();
  const result = h('div', { id: 'register-result' });
  const form = h('form', { class: 'card form', 'aria-labelledby': 'reg-title' },
    field('reg-name', 'Cluster name', name, 'A DNS label: lowercase letters, digits and “-”, e.g. edge-1. It appears in URLs and kubeconfigs.'),
    field('reg-expiry', 'Activation expires after', expiry, 'The agent must activate within this time; the one-time code is useless afterwards.'),
    field('reg-users', 'Users the agent may impersonate', users, 'Hub user names, separated by commas (a name may hold spaces, e.g. an IAM ARN or “Jane Doe”). The manifest lets the agent impersonate only these (and the groups below); the cluster’s own RBAC still decides what each may do.'),
    field('reg-groups', 'Groups the agent may impersonate', groups, 'Optional; separated by commas.'),
    h('div', { class: 'check' }, grant, h('label', { for: 'grant' }, 'Also grant these users and groups access to the cluster on the hub')),
    status,
    h('div', { class: 'actions' }, submit));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    if (!form.reportValidity()) return;
    busy(submit, status, 'Registering…', async () => {
      const body = { name: name.value.trim(), expires_in_hours: Number(expiry.value), users: list(users.value), groups: list(groups.value) };
      const r = await hub.post('/clusters', body);
      const grantErrors = [];
      if (grant.checked) {
        for (const [kind, names] of [['user', body.users], ['group', body.groups]]) {
          for (const n of names) {
            try { await hub.post('/grants', { [kind]: n, clusters: body.name }); } catch (e) { grantErrors.push(`${kind} ${n}: ${e.message}`); }
          }
        }
      }
      form.hidden = true;
      showInstall(ctx, result, r, grantErrors);
    });
  });
  put(ctx.main,
    h('h1', { tabindex: '-1', id: 'reg-title' }, 'Register a cluster'),
    h('p', { class: 'lede' }, 'The hub records the cluster as PENDING and gives you what to install in it: a Kubernetes manifest, or an activation file for a systemd host. The agent dials out to this hub; nothing needs to reach the cluster.'),
    form, result);
}

/** What to install for a cluster just registered, or given a new
 * activation (`r.renewed`): the answer of both REST calls. */
export function showInstall(ctx, el, r, grantErrors = []) {
  const c = r.cluster;
  const file = `uplink-${c.name}.yaml`;
  put(el,
    h('div', { class: 'callout ok', role: 'status' },
      h('strong', r.renewed ? `Cluster ${c.name} has a new activation (PENDING); the earlier code no longer works.` : `Cluster ${c.name} is registered (PENDING).`),
      h('p', `Install one of the two below before ${localTime(r.activation.expires_at)} (`, when(r.activation.expires_at), '). ',
        'The files hold a one-time activation code: treat them as secrets. They are shown only now.')),
    grantErrors.length ? errorBox({ message: grantErrors.join('; '), hint: 'Add the grants on the Users & grants page.' }, 'Some grants were not added') : null,
    h('section', { class: 'card', 'aria-labelledby': 'install-k8s' },
      h('h2', { id: 'install-k8s' }, 'In the cluster (Kubernetes)'),
      h('p', 'Save the manifest, then apply it with a cluster-admin kubeconfig:'),
      command(`kubectl apply -f ${file}`, 'cmd-kubectl'),
      h('div', { class: 'code-actions' }, downloadButton(file, r.manifest, `Download ${file}`, 'application/yaml'), copyButton(r.manifest, 'Copy manifest')),
      h('details', h('summary', 'Show the manifest'), h('pre', { class: 'source', id: 'manifest', tabindex: '0' }, r.manifest))),
    h('section', { class: 'card', 'aria-labelledby': 'install-systemd' },
      h('h2', { id: 'install-systemd' }, 'Beside the cluster (systemd host, e.g. k3s)'),
      h('p', 'Save the activation file on the host, then install it and start the agent as root:'),
      command(r.install?.systemd ?? 'install -D -m 0600 activation.json /etc/uplink/activation.json && systemctl enable --now uplink', 'cmd-systemd'),
      h('div', { class: 'code-actions' }, downloadButton('activation.json', r.systemd_activation, 'Download activation.json', 'application/json'), copyButton(r.systemd_activation, 'Copy activation file')),
      h('details', h('summary', 'Show the activation file'), h('pre', { class: 'source', id: 'activation', tabindex: '0' }, r.systemd_activation))),
    h('p', h('a', { class: 'button primary', href: `#/clusters/${encodeURIComponent(c.name)}` }, `Open ${c.name}`), ' ',
      h('span', { class: 'muted' }, 'It turns ACTIVE there as soon as the agent connects.')));
  el.querySelector('h2')?.setAttribute('tabindex', '-1');
  el.querySelector('.callout')?.setAttribute('tabindex', '-1');
  el.querySelector('.callout')?.focus();
  ctx.announce(r.renewed ? `Cluster ${c.name} has a new activation` : `Cluster ${c.name} registered`);
}

function command(text, id) {
  return h('div', { class: 'command' }, h('code', { id }, text), copyButton(text));
}

// ---- users and grants ----------------------------------------------------------

export async function usersView(ctx) {
  if (adminOnly(ctx)) return;
  const { signal } = ctx;
  ctx.title('Users & grants');
  const usersBox = h('div', loading('Loading users…'));
  const grantsBox = h('div', loading('Loading grants…'));
  const tokenBox = h('div', { id: 'new-token' });

  // Add a user.
  const uname = h('input', { required: true, autocomplete: 'off', spellcheck: 'false', placeholder: 'alice' });
  const ugroups = h('input', { autocomplete: 'off', spellcheck: 'false', placeholder: 'uplink:viewers' });
  const uadmin = h('input', { type: 'checkbox', id: 'user-admin' });
  const usubmit = h('button', { type: 'submit', class: 'primary' }, 'Add user');
  const ustatus = formStatus();
  const uform = h('form', { class: 'card form', 'aria-labelledby': 'add-user' },
    h('h3', { id: 'add-user' }, 'Add a user'),
    field('user-name', 'Name', uname, 'The name clusters see (Impersonate-User), exactly as their RBAC bindings name it: an IAM ARN such as arn:aws:iam::1234567890:user/Alice, an email, an OIDC subject; any text without control characters or spaces at either end.'),
    field('user-groups', 'Groups', ugroups, 'Optional, separated by commas (Impersonate-Group).'),
    h('div', { class: 'check' }, uadmin, h('label', { for: 'user-admin' }, 'Hub admin (may register clusters and manage users)')),
    ustatus, h('div', { class: 'actions' }, usubmit));
  uform.addEventListener('submit', (ev) => {
    ev.preventDefault();
    busy(usubmit, ustatus, 'Adding…', async () => {
      const r = await hub.post('/users', { name: uname.value.trim(), groups: list(ugroups.value), admin: uadmin.checked });
      uname.value = ''; ugroups.value = ''; uadmin.checked = false;
      showToken(r.user.name ?? r.user, r.token);
      await loadUsers();
    });
  });

  // Add a grant.
  const gkind = h('select', h('option', { value: 'user' }, 'User'), h('option', { value: 'group' }, 'Group'));
  const gname = h('input', { required: true, autocomplete: 'off', spellcheck: 'false' });
  const gclusters = h('input', { required: true, autocomplete: 'off', spellcheck: 'false', placeholder: 'edge-* or edge-1' });
  const gsubmit = h('button', { type: 'submit', class: 'primary' }, 'Add grant');
  const gstatus = formStatus();
  const gform = h('form', { class: 'card form', 'aria-labelledby': 'add-grant' },
    h('h3', { id: 'add-grant' }, 'Grant access to clusters'),
    field('grant-kind', 'To a', gkind),
    field('grant-name', 'Name', gname),
    field('grant-clusters', 'Clusters', gclusters, 'A cluster name or a pattern with *, e.g. edge-*. A grant lets the person reach the cluster through the hub; the cluster’s RBAC still decides what they may do there.'),
    gstatus, h('div', { class: 'actions' }, gsubmit));
  gform.addEventListener('submit', (ev) => {
    ev.preventDefault();
    busy(gsubmit, gstatus, 'Adding…', async () => {
      await hub.post('/grants', { [gkind.value]: gname.value.trim(), clusters: gclusters.value.trim() });
      gname.value = ''; gclusters.value = '';
      await loadGrants();
    });
  });

  function showToken(user, token) {
    put(tokenBox, h('div', { class: 'callout ok', role: 'status', tabindex: '-1' },
      h('strong', `Token for ${user}`),
      h('p', 'Shown only this once: hand it to the person over a safe channel. They sign in with it here, or use it with kubectl through a kubeconfig from the hub.'),
      h('div', { class: 'command' }, h('code', { class: 'secret', id: 'token-value' }, token), copyButton(token)),
      h('button', { type: 'button', class: 'small', onclick: () => put(tokenBox) }, 'Done, hide it')));
    tokenBox.firstChild.focus();
  }

  async function loadUsers() {
    try {
      const { users } = await hub.get('/users', { signal });
      if (!users.length) return put(usersBox, empty('No users.'));
      put(usersBox, table('Users', ['Name', 'Groups', 'Role', 'Created', 'State', 'Actions'], users.map((u) => h('tr', { 'data-user': u.name },
        h('th', { scope: 'row' }, h('a', { href: auditOf(u.name), title: `Audit log of ${u.name}` }, u.name)),
        h('td', u.groups.length ? u.groups.join(', ') : h('span', { class: 'muted' }, '—')),
        h('td', u.admin ? 'admin' : 'user'),
        h('td', when(u.created_at)),
        h('td', u.revoked_at ? h('span', { class: 'state bad' }, 'revoked') : h('span', { class: 'state ok' }, 'active')),
        h('td', { class: 'row-actions' }, u.revoked_at ? null : h('div',
          h('button', { type: 'button', class: 'small', 'aria-label': `New token for ${u.name}`, onclick: () => newToken(u.name) }, 'New token'),
          u.name === ctx.me.name ? null : h('button', { type: 'button', class: 'small danger', 'aria-label': `Revoke ${u.name}`, onclick: () => revoke(u.name) }, 'Revoke…')))))));
    } catch (e) {
      if (!signal.aborted) put(usersBox, errorBox(e, 'Could not load users'));
    }
  }

  async function newToken(user) {
    try {
      const r = await hub.post(`/users/${encodeURIComponent(user)}/tokens`, {});
      showToken(user, r.token);
    } catch (e) {
      put(tokenBox, errorBox(e, `Could not make a token for ${user}`));
    }
  }

  async function revoke(user) {
    const ok = await confirmDialog({
      title: `Revoke ${user}?`,
      body: ['Every token of this user stops working at once, for the console, the REST API and kubectl.'],
      confirm: 'Revoke', danger: true,
    });
    if (!ok) return;
    try {
      await hub.del(`/users/${encodeURIComponent(user)}`);
      ctx.announce(`${user} revoked`);
    } catch (e) {
      put(tokenBox, errorBox(e, `Could not revoke ${user}`));
    }
    await loadUsers();
  }

  async function loadGrants() {
    try {
      const { grants } = await hub.get('/grants', { signal });
      if (!grants.length) return put(grantsBox, empty('No grants: only admins reach clusters.'));
      put(grantsBox, table('Grants', ['#', 'Subject', 'Clusters', 'Created', 'Actions'], grants.map((g) => h('tr', { 'data-grant': g.id },
        h('td', String(g.id)),
        h('th', { scope: 'row' }, g.user ? `user ${g.user}` : `group ${g.group}`),
        h('td', h('code', g.clusters)),
        h('td', when(g.created_at)),
        h('td', h('button', {
          type: 'button', class: 'small danger', 'aria-label': `Remove grant ${g.id}`,
          onclick: async () => {
            const ok = await confirmDialog({ title: 'Remove this grant?', body: [`${g.user ? 'User ' + g.user : 'Group ' + g.group} loses access to ${g.clusters} through the hub.`], confirm: 'Remove', danger: true });
            if (!ok) return;
            try { await hub.del(`/grants/${g.id}`); } catch (e) { put(grantsBox, errorBox(e, 'Could not remove the grant')); return; }
            await loadGrants();
          },
        }, 'Remove'))))));
    } catch (e) {
      if (!signal.aborted) put(grantsBox, errorBox(e, 'Could not load grants'));
    }
  }

  put(ctx.main,
    h('h1', { tabindex: '-1' }, 'Users & grants'),
    h('p', { class: 'lede' }, 'People sign in with hub tokens. A grant lets a user or group reach clusters through the hub; inside each cluster, its own RBAC decides the rest.'),
    tokenBox,
    h('section', { 'aria-labelledby': 'users-h' }, h('h2', { id: 'users-h' }, 'Users'), usersBox, uform),
    h('section', { 'aria-labelledby': 'grants-h' }, h('h2', { id: 'grants-h' }, 'Grants'), grantsBox, gform));
  await Promise.all([loadUsers(), loadGrants()]);
}

// ---- audit ----------------------------------------------------------------------

export async function auditView(ctx) {
  if (adminOnly(ctx)) return;
  const { signal, params } = ctx;
  ctx.title('Audit log');
  const user = h('input', { value: params.get('user') ?? '', autocomplete: 'off', spellcheck: 'false' });
  const cluster = h('input', { value: params.get('cluster') ?? '', autocomplete: 'off', spellcheck: 'false' });
  const since = h('input', { type: 'datetime-local', value: params.get('since') ?? '' });
  const limit = h('select', [100, 500, 1000, 5000].map((n) => h('option', { value: n, selected: String(n) === (params.get('limit') ?? '100') }, String(n))));
  const form = h('form', { class: 'filters', 'aria-label': 'Audit filters' },
    field('audit-user', 'User', user), field('audit-cluster', 'Cluster', cluster),
    field('audit-since', 'Since (your time)', since), field('audit-limit', 'At most', limit),
    h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary' }, 'Apply'),
      h('a', { class: 'button', href: '#/audit' }, 'Clear')));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    if (user.value.trim()) q.set('user', user.value.trim());
    if (cluster.value.trim()) q.set('cluster', cluster.value.trim());
    if (since.value) q.set('since', since.value);
    if (limit.value !== '100') q.set('limit', limit.value);
    const next = `#/audit${q.size ? '?' + q : ''}`;
    if (location.hash === next) ctx.reload?.(); else location.hash = next;
  });
  const box = h('div', loading('Loading the audit log…'));
  put(ctx.main,
    h('h1', { tabindex: '-1' }, 'Audit log'),
    h('p', { class: 'lede' }, 'Every request people made to clusters through the hub, newest first.'),
    form, box);

  const q = new URLSearchParams();
  for (const k of ['user', 'cluster', 'limit']) if (params.get(k)) q.set(k, params.get(k));
  if (params.get('since')) q.set('since', new Date(params.get('since')).toISOString().replace(/\.\d+Z$/, 'Z'));
  try {
    const { entries } = await hub.get(`/audit${q.size ? '?' + q : ''}`, { signal });
    if (!entries.length) return put(box, empty(q.size ? 'No requests match these filters.' : 'No requests yet. They appear here as people use clusters through the hub.'));
    put(box, table('Audit log', ['Time', 'User', 'Cluster', 'Request', 'Status', 'Sent / received', 'Duration'], entries.map((e) => h('tr',
      h('td', h('time', { datetime: e.time, title: e.time }, localTime(e.time))),
      h('td', h('a', { href: auditOf(e.user) }, e.user)),
      h('td', e.cluster),
      h('td', { class: 'path' }, h('code', `${e.method} ${e.path}`), e.upgrade ? h('span', { class: 'tag' }, 'stream') : null),
      h('td', h('span', { class: `state ${e.status >= 400 ? (e.status === 403 ? 'warn' : 'bad') : 'ok'}` }, String(e.status))),
      h('td', `${bytes(e.bytes_in)} / ${bytes(e.bytes_out)}`),
      h('td', `${e.duration_ms} ms`))), { class: 'audit' }));
  } catch (e) {
    if (!signal.aborted) put(box, errorBox(e, 'Could not load the audit log'));
  }
}
