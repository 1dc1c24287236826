// The clusters page: every cluster the signed-in person may reach, with
// live status from the hub's events feed.

import { hub } from './api.js';
import { h, put, loading, errorBox, empty, badge, table, when } from './dom.js';

function facts(c) {
  return [
    c.agent_version ?? '—',
    c.arch ?? '—',
    c.kube_version ?? '—',
    c.node_count ?? '—',
  ];
}

/** "connected 3 min ago" for a live cluster, "last seen …" otherwise. */
export function presence(c) {
  if (c.status === 'ACTIVE') return h('span', 'since ', when(c.connected_since));
  if (c.status === 'PENDING') return h('span', { class: 'muted' }, 'waiting for the agent to activate');
  if (c.last_seen) return h('span', 'last seen ', when(c.last_seen));
  return h('span', { class: 'muted' }, 'never connected');
}

export async function clustersView(ctx) {
  const { main, me, signal } = ctx;
  ctx.title('Clusters');
  const region = h('div', { 'aria-busy': 'true' }, loading('Loading clusters…'));
  const count = h('span', { class: 'count' });
  put(main,
    h('div', { class: 'page-head' },
      h('h1', { tabindex: '-1' }, 'Clusters ', count),
      me.admin ? h('a', { class: 'button primary', href: '#/register' }, 'Register a cluster') : null),
    h('p', { class: 'lede' }, me.admin
      ? 'Every registered cluster. Status updates live as agents connect and disconnect.'
      : 'The clusters shared with you. What you see inside each one is what its own RBAC grants your user.'),
    region);

  let shown = false;
  async function refresh() {
    let data;
    try {
      data = await hub.get('/clusters', { signal });
    } catch (e) {
      if (signal.aborted) return;
      if (!shown) put(region, errorBox(e, 'Could not load the clusters'));
      return;
    }
    shown = true;
    region.removeAttribute('aria-busy');
    const list = data.clusters;
    count.textContent = list.length ? `(${list.length})` : '';
    if (!list.length) {
      put(region, me.admin
        ? empty('No clusters yet.', h('p', 'Register one: the hub gives you a manifest to ', h('code', 'kubectl apply'), ' (or an activation file for a systemd host), and the cluster appears here as soon as its agent dials in.'),
          h('a', { class: 'button primary', href: '#/register' }, 'Register your first cluster'))
        : empty('No cluster is shared with you yet.', h('p', 'Ask a hub admin to grant you access, e.g. ', h('code', `uplink-hub grant add --user ${me.name} --clusters 'edge-*'`), '.')));
      return;
    }
    const focused = document.activeElement?.dataset?.focusKey;
    const rows = list.map((c) => h('tr', { 'data-cluster': c.name },
      h('th', { scope: 'row' }, h('a', { href: `#/clusters/${encodeURIComponent(c.name)}`, 'data-focus-key': `c-${c.name}` }, c.name)),
      h('td', badge(c.status), c.agents > 1 ? h('span', { class: 'muted' }, ` ${c.agents} agents`) : null),
      ...facts(c).map((f) => h('td', f)),
      h('td', presence(c))));
    put(region, table('Clusters', ['Cluster', 'Status', 'Agent', 'Arch', 'Kubernetes', 'Nodes', 'Connected'], rows, { class: 'clusters' }));
    if (focused) region.querySelector(`[data-focus-key="${CSS.escape(focused)}"]`)?.focus();
  }

  ctx.onEvents(() => refresh());
  // Relative times ("3 min ago") and last-seen stay fresh between events.
  ctx.every(15000, refresh);
  await refresh();
}
