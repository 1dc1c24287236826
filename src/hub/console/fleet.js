// The fleet page: one question to every cluster the signed-in person may
// reach (GET /api/v1/fleet/k8s/...?clusters=PATTERN, NDJSON, one line per
// cluster as it answers), each cluster's RBAC deciding. It shows what
// needs attention: nodes not Ready, pods not Running or not Ready, pods
// that restarted, deployments not fully available; and, per cluster,
// what could not be seen and why (forbidden, disconnected, timed out).
// Not here: writes of any kind, per-object detail (links go to the
// cluster's own pages).

import { api } from './api.js';
import { h, put, loading, errorBox, empty, table } from './dom.js';

const REFRESH_MS = 15000;
const e = encodeURIComponent;

/** Streams a fleet query; `onEvent` sees each NDJSON line as it arrives. */
async function fleet(path, pattern, signal, onEvent) {
  const res = await api(`/api/v1/fleet/k8s${path}?clusters=${e(pattern)}`, { signal, raw: true, accept: 'application/x-ndjson' });
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      if (line) onEvent(JSON.parse(line));
    }
  }
}

const clusterLink = (c) => h('a', { href: `#/clusters/${e(c)}` }, c);
const podLink = (c, p) => h('a', { href: `#/clusters/${e(c)}/ns/${e(p.metadata.namespace)}/pods/${e(p.metadata.name)}` }, p.metadata.name);
const nsLink = (c, ns) => h('a', { href: `#/clusters/${e(c)}/ns/${e(ns)}` }, ns);

function nodeReady(n) {
  return (n.status?.conditions ?? []).some((c) => c.type === 'Ready' && c.status === 'True');
}

function podState(p) {
  const statuses = p.status?.containerStatuses ?? [];
  const ready = statuses.filter((s) => s.ready).length;
  const restarts = statuses.reduce((a, s) => a + (s.restartCount ?? 0), 0);
  const waiting = statuses.map((s) => s.state?.waiting?.reason).find(Boolean);
  const phase = p.status?.phase ?? 'Unknown';
  const healthy = phase === 'Succeeded' || (phase === 'Running' && ready === statuses.length && statuses.length > 0);
  return { ready: `${ready}/${statuses.length || p.spec?.containers?.length || 0}`, restarts, status: waiting ?? phase, healthy };
}

/** What one query found, by cluster, as lines arrive. */
function section(id, title) {
  const body = h('div', { 'aria-busy': 'true' }, loading(`Asking the clusters…`, 'Slow clusters answer last; the others are shown as they come.'));
  const count = h('span', { class: 'count' });
  return { el: h('section', { id, class: 'fleet-section' }, h('h2', title, ' ', count), body), body, count };
}

export async function fleetView(ctx) {
  const { main, signal, params } = ctx;
  ctx.title('Fleet');
  const pattern = params.get('clusters') || '*';
  const ns = params.get('ns') || '';
  const patternInput = h('input', { id: 'fleet-clusters', name: 'clusters', value: pattern, spellcheck: 'false', 'aria-describedby': 'fleet-help' });
  const nsInput = h('input', { id: 'fleet-ns', name: 'ns', value: ns, placeholder: 'all namespaces', spellcheck: 'false' });
  const form = h('form', { class: 'fleet-filter' },
    h('label', { for: 'fleet-clusters' }, 'Clusters'), patternInput,
    h('label', { for: 'fleet-ns' }, 'Namespace'), nsInput,
    h('button', { type: 'submit' }, 'Ask'),
    h('p', { id: 'fleet-help', class: 'hint' }, 'A cluster name with * wildcards, e.g. shop-*. Every cluster you may reach that matches is asked, as you.'));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams({ clusters: patternInput.value.trim() || '*' });
    if (nsInput.value.trim()) q.set('ns', nsInput.value.trim());
    location.hash = `#/fleet?${q}`;
  });
  const notes = h('div', { id: 'fleet-notes' });
  const stamp = h('span', { class: 'muted', id: 'fleet-updated' });
  const nodes = section('fleet-nodes', 'Nodes');
  const pods = section('fleet-pods', 'Pods not running or not ready');
  const restarts = section('fleet-restarts', 'Pods that restarted');
  const deploys = section('fleet-deployments', 'Deployments not fully available');
  put(main,
    h('div', { class: 'page-head' }, h('h1', { tabindex: '-1' }, 'Fleet'), stamp),
    h('p', { class: 'lede' }, 'Every cluster you may reach, at once. Each cluster’s own RBAC decides what you see; where it says no, it says so below. Updates every ', REFRESH_MS / 1000, ' s.'),
    form, notes, nodes.el, pods.el, restarts.el, deploys.el);

  const podsPath = ns ? `/api/v1/namespaces/${e(ns)}/pods` : '/api/v1/pods';
  const deploysPath = ns ? `/apis/apps/v1/namespaces/${e(ns)}/deployments` : '/apis/apps/v1/deployments';

  async function refresh() {
    // Per cluster and query: what it could not answer.
    const failures = new Map();
    const fail = (what, ev) => {
      const list = failures.get(ev.cluster) ?? [];
      list.push({ what, ...ev.error });
      failures.set(ev.cluster, list);
    };
    const nodeRows = [];
    const podRows = [];
    const restartRows = [];
    const deployRows = [];
    let asked = [];
    // How many clusters answered each query: "nothing to show" is only
    // said of what was actually seen.
    const answered = { nodes: 0, pods: 0, deployments: 0 };
    const run = (path, what, onItems) => fleet(path, pattern, signal, (ev) => {
      if (ev.fleet) asked = ev.fleet.clusters;
      else if (ev.error) fail(what, ev);
      else if (ev.items) {
        answered[what] += 1;
        onItems(ev.cluster, ev.items);
      }
    });
    const none = (what, text) => empty(answered[what] === 0
      ? 'No cluster could answer this (see above).'
      : `${text} (${answered[what]} of ${asked.length} ${asked.length === 1 ? 'cluster' : 'clusters'} answered)`);
    try {
      await Promise.all([
        run('/api/v1/nodes', 'nodes', (c, items) => {
          const ready = items.filter(nodeReady);
          const notReady = items.filter((n) => !nodeReady(n));
          nodeRows.push(h('tr', { 'data-cluster': c, class: notReady.length ? 'attention' : '' },
            h('th', { scope: 'row' }, clusterLink(c)),
            h('td', `${ready.length}/${items.length} Ready`),
            h('td', notReady.length ? notReady.map((n) => n.metadata.name).join(', ') : '—')));
        }),
        run(podsPath, 'pods', (c, items) => {
          for (const p of items) {
            const s = podState(p);
            const cells = [h('td', clusterLink(c)), h('td', nsLink(c, p.metadata.namespace)), h('th', { scope: 'row' }, podLink(c, p))];
            if (!s.healthy) podRows.push(h('tr', { 'data-cluster': c, 'data-name': p.metadata.name }, ...cells, h('td', s.ready), h('td', s.status), h('td', String(s.restarts))));
            if (s.restarts > 0) restartRows.push([s.restarts, h('tr', { 'data-cluster': c, 'data-name': p.metadata.name }, ...cells, h('td', String(s.restarts)), h('td', s.status))]);
          }
        }),
        run(deploysPath, 'deployments', (c, items) => {
          for (const d of items) {
            const want = d.spec?.replicas ?? 1;
            const have = d.status?.availableReplicas ?? 0;
            if (have < want) {
              deployRows.push(h('tr', { 'data-cluster': c, 'data-name': d.metadata.name },
                h('td', clusterLink(c)), h('td', nsLink(c, d.metadata.namespace)),
                h('th', { scope: 'row' }, h('a', { href: `#/clusters/${e(c)}/ns/${e(d.metadata.namespace)}/deployments/${e(d.metadata.name)}` }, d.metadata.name)),
                h('td', `${have}/${want}`)));
            }
          }
        }),
      ]);
    } catch (err) {
      if (signal.aborted) return;
      put(notes, errorBox(err, 'The fleet query failed'));
      return;
    }
    if (signal.aborted) return;
    for (const s of [nodes, pods, restarts, deploys]) s.body.removeAttribute('aria-busy');
    nodes.count.textContent = `(${nodeRows.length} ${nodeRows.length === 1 ? 'cluster' : 'clusters'})`;
    put(nodes.body, nodeRows.length ? table('Nodes per cluster', ['Cluster', 'Ready', 'Not ready'], nodeRows, { class: 'fleet-nodes' }) : none('nodes', 'No nodes'));
    pods.count.textContent = `(${podRows.length})`;
    put(pods.body, podRows.length ? table('Pods not running or not ready', ['Cluster', 'Namespace', 'Pod', 'Ready', 'Status', 'Restarts'], podRows, { class: 'fleet-pods' }) : none('pods', 'Every pod you may see is running and ready'));
    restartRows.sort((a, b) => b[0] - a[0]);
    restarts.count.textContent = `(${restartRows.length})`;
    put(restarts.body, restartRows.length ? table('Pods that restarted', ['Cluster', 'Namespace', 'Pod', 'Restarts', 'Status'], restartRows.slice(0, 50).map((r) => r[1]), { class: 'fleet-restarts' }) : none('pods', 'No pod you may see has restarted'));
    deploys.count.textContent = `(${deployRows.length})`;
    put(deploys.body, deployRows.length ? table('Deployments not fully available', ['Cluster', 'Namespace', 'Deployment', 'Available'], deployRows, { class: 'fleet-deployments' }) : none('deployments', 'Every deployment you may see is fully available'));
    const noteRows = [...failures.entries()].sort((a, b) => a[0].localeCompare(b[0])).map(([c, list]) =>
      h('li', { 'data-cluster': c, 'data-reason': list[0].reason }, h('strong', c), ': ',
        list.map((f, i) => h('span', i ? '; ' : '', h('span', { class: 'tag' }, f.reason), ` ${f.what}: ${f.message}`))));
    put(notes, asked.length === 0
      ? empty(`No cluster you may reach matches “${pattern}”.`)
      : noteRows.length
        ? h('div', { class: 'callout forbidden', role: 'note' }, h('strong', 'What could not be seen'), h('ul', { class: 'fleet-notes' }, noteRows))
        : null);
    stamp.textContent = `${asked.length} ${asked.length === 1 ? 'cluster' : 'clusters'} asked, updated ${new Date().toLocaleTimeString()}`;
  }

  ctx.every(REFRESH_MS, refresh);
  await refresh();
}
