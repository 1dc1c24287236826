// One cluster: overview (facts, nodes, namespaces), workloads per
// namespace, one object (summary, YAML, JSON, events, logs). Everything
// inside the cluster is fetched through /k8s/clusters/NAME/... with the
// person's token, so the cluster's RBAC decides; a refusal shows the
// cluster's own message where the data would have been.

import { hub, kube, KINDS, kindOf, objectPath, TABLE, api } from './api.js';
import {
  h, put, loading, errorBox, forbiddenBox, empty, badge, table, when, localTime, quantity, toYaml,
  copyButton, download, downloadButton, confirmDialog,
} from './dom.js';
import { presence } from './clusters.js';
import { showInstall } from './admin.js';

const enc = encodeURIComponent;
const base = (name) => `#/clusters/${enc(name)}`;

/** The right callout for a failed cluster request. */
function failed(e, what) {
  return e.forbidden ? forbiddenBox(e) : errorBox(e, `Could not load ${what}`);
}

export async function clusterView(ctx, parts) {
  const [name, section, ...rest] = parts;
  const { main, signal } = ctx;
  const head = h('div', { class: 'cluster-head' });
  const body = h('div');
  const crumbs = h('nav', { class: 'crumbs', 'aria-label': 'Breadcrumb' });
  put(main, crumbs, head, body);

  let cluster = null;
  async function loadHead() {
    try {
      cluster = await hub.get(`/clusters/${enc(name)}`, { signal });
    } catch (e) {
      if (signal.aborted) return;
      put(head, h('h1', { tabindex: '-1' }, name), errorBox(e, 'Could not load this cluster',
        e.status === 404 ? h('p', h('a', { href: '#/' }, 'Back to the clusters')) : null));
      return;
    }
    renderHead(ctx, head, cluster, section);
  }
  ctx.onEvents((events, reset) => {
    if (reset || events.some((e) => e.cluster === name)) loadHead();
  });
  ctx.every(30000, loadHead);

  const tabs = [
    ['Overview', base(name), !section],
    ['Workloads', `${base(name)}/ns/${enc(section === 'ns' && rest[0] ? rest[0] : lastNamespace(name))}`, section === 'ns'],
  ];
  const crumbList = [h('a', { href: '#/' }, 'Clusters'), h('a', { href: base(name) }, name)];
  if (section === 'ns' && rest[0]) crumbList.push(h('a', { href: `${base(name)}/ns/${enc(rest[0])}` }, rest[0]));
  if (section === 'ns' && rest[2]) crumbList.push(h('span', `${rest[1]}/${rest[2]}`));
  if (section === 'nodes' && rest[0]) crumbList.push(h('span', `nodes/${rest[0]}`));
  put(crumbs, h('ol', crumbList.map((c) => h('li', c))));

  const headDone = loadHead();
  put(body, h('nav', { class: 'tabs', 'aria-label': 'Cluster sections' }, tabs.map(([t, href, active]) => h('a', { href, 'aria-current': active ? 'page' : null }, t))));
  const content = h('div', { class: 'section' });
  body.append(content);

  if (!section) {
    ctx.title(name);
    await headDone;
    await overview(ctx, name, content, cluster);
  } else if (section === 'ns' && rest[0] && !rest[1]) {
    ctx.title(`${rest[0]} · ${name}`);
    rememberNamespace(name, rest[0]);
    await Promise.all([headDone, workloads(ctx, name, rest[0], content)]);
  } else if (section === 'ns' && rest[1] && rest[2]) {
    const k = kindOf(rest[1]);
    if (!k) return put(content, errorBox({ message: `The console does not show ${rest[1]}.` }, 'Unknown kind'));
    ctx.title(`${rest[2]} · ${name}`);
    await Promise.all([headDone, detail(ctx, name, k, rest[0], rest[2], rest[3], content)]);
  } else if (section === 'nodes' && rest[0]) {
    ctx.title(`${rest[0]} · ${name}`);
    const nodeKind = { plural: 'nodes', kind: 'Node', title: 'Nodes', api: '/api/v1' };
    await Promise.all([headDone, detail(ctx, name, nodeKind, null, rest[0], rest[1], content)]);
  } else {
    put(content, errorBox({ message: 'There is no such page in this cluster.' }, 'Page not found'));
  }
}

function lastNamespace(name) {
  return sessionStorage.getItem(`uplink.ns.${name}`) || 'default';
}

function rememberNamespace(name, ns) {
  sessionStorage.setItem(`uplink.ns.${name}`, ns);
}

// ---- header -----------------------------------------------------------------

function renderHead(ctx, head, c, section) {
  const { me } = ctx;
  const focusedHeading = document.activeElement?.tagName === 'H1' && head.contains(document.activeElement);
  const actions = h('div', { class: 'actions' },
    c.status !== 'DEREGISTERED'
      ? h('button', { type: 'button', onclick: () => kubeconfig(c.name) }, 'Download kubeconfig')
      : null,
    me.admin && c.status === 'PENDING'
      ? h('button', { type: 'button', id: 'renew', onclick: () => renew(ctx, c) }, 'New activation…')
      : null,
    me.admin && c.status !== 'DEREGISTERED'
      ? h('button', { type: 'button', class: 'danger', id: 'deregister', onclick: () => deregister(ctx, c) }, 'Deregister…')
      : null);
  const h1 = h('h1', { tabindex: '-1' }, c.name, ' ', badge(c.status));
  put(head,
    h('div', { class: 'page-head' }, h1, actions),
    h('dl', { class: 'facts' },
      fact('Status', presence(c)),
      fact('Kubernetes', c.kube_version ?? '—'),
      fact('Agent', c.agent_version ?? '—'),
      fact('Architecture', c.arch ?? '—'),
      fact('Nodes', c.node_count ?? '—'),
      fact('Agents connected', String(c.agents ?? 0))),
    c.status === 'DISCONNECTED' ? h('div', { class: 'callout warn', role: 'status' },
      h('strong', 'The agent is not connected.'),
      h('p', 'What is shown below may fail until it reconnects. Check the agent: ', h('code', 'kubectl -n uplink logs deploy/uplink-agent'), ' or ', h('code', 'journalctl -u uplink'), '.')) : null,
    c.status === 'PENDING' ? h('div', { class: 'callout info', role: 'status' },
      h('strong', 'Waiting for the agent.'),
      h('p', 'Install the manifest or activation file you got at registration; this page turns ACTIVE by itself when the agent dials in. Lost them, or the code expired? A hub admin can issue a new activation here (or with ', h('code', `uplink-hub cluster renew ${c.name}`), ').')) : null,
    c.status === 'DEREGISTERED' ? h('div', { class: 'callout warn', role: 'status' },
      h('strong', 'This cluster was deregistered.'), h('p', 'Its agent credential is revoked. Register it again to reconnect.')) : null);
  if (focusedHeading) h1.focus();
  void section;
}

function fact(term, value) {
  return h('div', h('dt', term), h('dd', value));
}

async function kubeconfig(name) {
  try {
    const text = await api(`/api/v1/kubeconfig?cluster=${enc(name)}`, { accept: 'application/yaml' });
    download(`uplink-${name}.kubeconfig.yaml`, text, 'application/yaml');
  } catch (e) {
    confirmDialog({ title: 'Could not get a kubeconfig', body: [e.message], confirm: 'OK' });
  }
}

/** A fresh activation for a PENDING cluster; the earlier code stops working. */
async function renew(ctx, c) {
  const ok = await confirmDialog({
    title: `New activation for ${c.name}?`,
    body: ['The hub issues a new one-time activation code and the manifest and activation file that carry it. The code from the earlier files stops working.'],
    confirm: 'Issue a new activation',
  });
  if (!ok) return;
  const { main } = ctx;
  let r;
  try {
    r = await hub.post(`/clusters/${enc(c.name)}/activation`, {});
  } catch (e) {
    main.prepend(errorBox(e, `Could not renew the activation of ${c.name}`));
    return;
  }
  const result = h('div', { id: 'register-result' });
  put(main, h('h1', { tabindex: '-1' }, `New activation for ${c.name}`), result);
  showInstall(ctx, result, r);
}

async function deregister(ctx, c) {
  const ok = await confirmDialog({
    title: `Deregister ${c.name}?`,
    body: [
      'The hub revokes the agent’s credential and tells connected agents to stop. Everyone loses access to this cluster through the hub at once.',
      'This cannot be undone: to connect the cluster again, register it again and install a new manifest.',
    ],
    confirm: 'Deregister',
    danger: true,
    typeToConfirm: c.name,
  });
  if (!ok) return;
  const { main } = ctx;
  let r;
  try {
    r = await hub.del(`/clusters/${enc(c.name)}`);
  } catch (e) {
    main.prepend(errorBox(e, `Could not deregister ${c.name}`));
    return;
  }
  put(main,
    h('h1', { tabindex: '-1' }, `${c.name} is deregistered`),
    h('p', { class: 'lede' }, r.agents_notified
      ? `${r.agents_notified} connected agent(s) were told to stop.`
      : 'No agent was connected; if one starts later, the hub refuses it.'),
    h('h2', 'Clean up the cluster'),
    h('p', 'Delete what the agent left behind (Kubernetes or systemd, whichever you installed):'),
    h('div', { class: 'code-block' }, h('div', { class: 'code-actions' }, copyButton(r.cleanup), downloadButton(`cleanup-${c.name}.txt`, r.cleanup, 'Download')),
      h('pre', { id: 'cleanup', tabindex: '0' }, r.cleanup)),
    h('p', h('a', { href: '#/' }, 'Back to the clusters')));
  main.querySelector('h1').focus();
  ctx.announce(`${c.name} deregistered`);
}

// ---- overview ---------------------------------------------------------------

function nodeReady(n) {
  const c = (n.status?.conditions ?? []).find((x) => x.type === 'Ready');
  if (!c) return 'Unknown';
  const ready = c.status === 'True' ? 'Ready' : 'NotReady';
  return n.spec?.unschedulable ? `${ready},SchedulingDisabled` : ready;
}

function nodeRoles(n) {
  const roles = Object.keys(n.metadata?.labels ?? {})
    .filter((l) => l.startsWith('node-role.kubernetes.io/'))
    .map((l) => l.slice('node-role.kubernetes.io/'.length));
  return roles.length ? roles.join(',') : '<none>';
}

async function overview(ctx, name, content, cluster) {
  const { signal } = ctx;
  if (cluster && cluster.status !== 'ACTIVE') {
    // Nothing to ask the cluster; the header says why and updates live.
    const again = h('button', { type: 'button', onclick: () => ctx.reload() }, 'Try again');
    put(content, empty(`${name} is ${cluster.status}: the console can show its nodes and namespaces once its agent is connected.`, again));
    if (cluster.status !== 'DEREGISTERED') {
      ctx.onEvents((events) => { if (events.some((e) => e.cluster === name && e.status === 'ACTIVE')) ctx.reload(); });
    }
    return;
  }
  const version = h('div', loading('Asking the cluster…'));
  const nodes = h('div', loading('Loading nodes…'));
  const namespaces = h('div', loading('Loading namespaces…'));
  const events = h('div', loading('Loading hub events…'));
  put(content,
    h('section', { 'aria-labelledby': 'ov-version' }, h('h2', { id: 'ov-version' }, 'API server'), version),
    h('section', { 'aria-labelledby': 'ov-nodes' }, h('h2', { id: 'ov-nodes' }, 'Nodes'), nodes),
    h('section', { 'aria-labelledby': 'ov-ns' }, h('h2', { id: 'ov-ns' }, 'Namespaces'), namespaces),
    h('section', { 'aria-labelledby': 'ov-events' }, h('h2', { id: 'ov-events' }, 'Connection history'), events));

  const guard = (p, el, what, render) => p.then((v) => put(el, render(v))).catch((e) => { if (!signal.aborted) put(el, failed(e, what)); });

  await Promise.all([
    guard(kube(name, '/version', { signal }), version, 'the version', (v) => h('dl', { class: 'facts' },
      fact('Version', v.gitVersion ?? '—'), fact('Platform', v.platform ?? '—'), fact('Go', v.goVersion ?? '—'), fact('Built', localTime(v.buildDate)))),
    guard(kube(name, '/api/v1/nodes', { signal }), nodes, 'the nodes', (list) => {
      const items = list.items ?? [];
      if (!items.length) return empty('This cluster reports no nodes.');
      return table('Nodes', ['Name', 'Status', 'Roles', 'Arch', 'OS', 'Kubelet', 'CPU', 'Memory', 'Pods', 'Age'],
        items.map((n) => {
          const cap = n.status?.capacity ?? {};
          const info = n.status?.nodeInfo ?? {};
          const ready = nodeReady(n);
          return h('tr', { 'data-node': n.metadata.name },
            h('th', { scope: 'row' }, h('a', { href: `${base(name)}/nodes/${enc(n.metadata.name)}` }, n.metadata.name)),
            h('td', h('span', { class: `state ${ready.startsWith('Ready') ? 'ok' : 'bad'}` }, ready)),
            h('td', nodeRoles(n)),
            h('td', info.architecture ?? n.metadata.labels?.['kubernetes.io/arch'] ?? '—'),
            h('td', info.osImage ?? info.operatingSystem ?? '—'),
            h('td', info.kubeletVersion ?? '—'),
            h('td', cap.cpu ?? '—'),
            h('td', quantity(cap.memory)),
            h('td', cap.pods ?? '—'),
            h('td', when(n.metadata.creationTimestamp)));
        }), { class: 'nodes' });
    }),
    guard(kube(name, '/api/v1/namespaces', { signal }), namespaces, 'the namespaces', (list) => {
      const items = list.items ?? [];
      if (!items.length) return empty('No namespaces.');
      return h('ul', { class: 'chips', id: 'namespaces' }, items.map((n) => h('li',
        h('a', { href: `${base(name)}/ns/${enc(n.metadata.name)}` }, n.metadata.name))));
    }),
    guard(hub.get(`/clusters/${enc(name)}`, { signal }), events, 'the history', (c) => {
      const list = c.events ?? [];
      if (!list.length) return empty('Nothing has happened yet.');
      return table('Connection history', ['When', 'What', 'Details'], list.map((e) => h('tr',
        h('td', when(e.time)), h('td', e.kind), h('td', e.message))));
    }),
  ]);
}

// ---- workloads ------------------------------------------------------------------

/** Status words as kubectl prints them, coloured by what they mean. */
function cellClass(col, v) {
  const s = String(v);
  if (/^(Running|Completed|Complete|Succeeded|Ready|Active|Bound)$/.test(s)) return 'state ok';
  if (/^(Pending|ContainerCreating|Terminating|Unknown|Suspended)$/.test(s)) return 'state warn';
  if (/(Error|BackOff|Failed|NotReady|OOMKilled|Evicted|Invalid)/.test(s)) return 'state bad';
  const m = /^(\d+)\/(\d+)$/.exec(s);
  if (m && /ready|completions/i.test(col)) return `state ${m[1] === m[2] ? 'ok' : 'warn'}`;
  return null;
}

function tableView(name, ns, k, t, wide) {
  const cols = (t.columnDefinitions ?? []).map((c, i) => ({ ...c, i })).filter((c) => wide || !c.priority);
  const rows = t.rows ?? [];
  if (!rows.length) return empty(`No ${k.title.toLowerCase()} in ${ns}.`);
  return table(`${k.title} in ${ns}`, cols.map((c) => c.name), rows.map((r) => {
    const objName = r.object?.metadata?.name ?? r.cells?.[0];
    return h('tr', { 'data-name': objName }, cols.map((c) => {
      const v = r.cells?.[c.i];
      const text = v === null || v === undefined || v === '' ? '<none>' : (typeof v === 'object' ? JSON.stringify(v) : String(v));
      if (c.format === 'name' || c.i === 0) {
        return h('th', { scope: 'row' }, h('a', { href: `${base(name)}/ns/${enc(ns)}/${k.plural}/${enc(objName)}` }, text));
      }
      const cls = cellClass(c.name, text);
      return h('td', cls ? h('span', { class: cls }, text) : text);
    }));
  }), { class: `workloads kind-${k.plural}` });
}

async function workloads(ctx, name, ns, content) {
  const { signal } = ctx;
  const picker = h('div', { class: 'ns-picker' }, loading('Loading namespaces…'));
  const wideBox = h('input', { type: 'checkbox', id: 'wide' });
  const sections = new Map();
  const tables = new Map();
  const sectionEls = KINDS.map((k) => {
    const box = h('div', loading(`Loading ${k.title.toLowerCase()}…`));
    const count = h('span', { class: 'count' });
    sections.set(k.plural, { box, count });
    return h('section', { id: `kind-${k.plural}`, 'aria-labelledby': `h-${k.plural}` },
      h('h2', { id: `h-${k.plural}` }, k.title, ' ', count), box);
  });
  put(content,
    h('div', { class: 'toolbar' }, picker,
      h('div', { class: 'check' }, wideBox, h('label', { for: 'wide' }, 'More columns (kubectl -o wide)')),
      h('button', { type: 'button', onclick: () => loadAll() }, 'Refresh')),
    h('nav', { class: 'jump', 'aria-label': 'Kinds' }, h('ul', KINDS.map((k) => h('li', h('a', { href: `#kind-${k.plural}`, onclick: (ev) => { ev.preventDefault(); document.getElementById(`kind-${k.plural}`)?.scrollIntoView(); document.getElementById(`h-${k.plural}`)?.focus(); } }, k.title))))),
    ...sectionEls);
  for (const k of KINDS) document.getElementById(`h-${k.plural}`)?.setAttribute('tabindex', '-1');
  wideBox.addEventListener('change', () => {
    for (const k of KINDS) {
      const t = tables.get(k.plural);
      if (t) put(sections.get(k.plural).box, tableView(name, ns, k, t, wideBox.checked));
    }
  });

  // The namespace picker: filled from the cluster; typed by hand when
  // listing namespaces is not allowed.
  const go = (v) => { if (v && v !== ns) location.hash = `${base(name)}/ns/${enc(v)}`; };
  kube(name, '/api/v1/namespaces', { signal }).then((list) => {
    const names = (list.items ?? []).map((n) => n.metadata.name);
    if (!names.includes(ns)) names.unshift(ns);
    const select = h('select', { id: 'namespace', onchange: (ev) => go(ev.target.value) },
      names.map((n) => h('option', { value: n, selected: n === ns }, n)));
    put(picker, h('label', { for: 'namespace' }, 'Namespace'), select);
  }).catch((e) => {
    if (signal.aborted) return;
    const input = h('input', { id: 'namespace', value: ns, spellcheck: 'false' });
    const form = h('form', { class: 'inline' }, h('label', { for: 'namespace' }, 'Namespace'), input, h('button', { type: 'submit' }, 'Show'));
    form.addEventListener('submit', (ev) => { ev.preventDefault(); go(input.value.trim()); });
    put(picker, form, h('p', { class: 'hint' }, e.forbidden ? `You may not list namespaces here (${e.message}); type one you may read.` : `Could not list namespaces: ${e.message}`));
  });

  async function load(k) {
    const { box, count } = sections.get(k.plural);
    try {
      const t = await kube(name, objectPath(k, ns), { signal, accept: TABLE });
      if (t.kind !== 'Table') {
        // An API server without tables: synthesize name and age.
        t.columnDefinitions = [{ name: 'Name', format: 'name' }, { name: 'Created', format: '' }];
        t.rows = (t.items ?? []).map((o) => ({ cells: [o.metadata.name, o.metadata.creationTimestamp], object: o }));
      }
      tables.set(k.plural, t);
      count.textContent = `(${t.rows?.length ?? 0})`;
      put(box, tableView(name, ns, k, t, wideBox.checked));
    } catch (e) {
      if (signal.aborted) return;
      count.textContent = '';
      put(box, failed(e, k.title.toLowerCase()));
    }
  }
  function loadAll() { return Promise.all(KINDS.map(load)); }
  await loadAll();
}

// ---- one object -------------------------------------------------------------

async function detail(ctx, name, k, ns, objName, tab = 'summary', content) {
  const { signal } = ctx;
  const path = k.plural === 'nodes' ? `/api/v1/nodes/${enc(objName)}` : objectPath(k, ns, objName);
  const here = k.plural === 'nodes' ? `${base(name)}/nodes/${enc(objName)}` : `${base(name)}/ns/${enc(ns)}/${k.plural}/${enc(objName)}`;
  const tabs = [['summary', 'Summary'], ['yaml', 'YAML'], ['json', 'JSON'], ['events', 'Events']];
  if (k.plural === 'pods') tabs.push(['logs', 'Logs']);
  const pane = h('div', { class: 'pane', id: 'detail-pane' });
  put(content,
    h('h2', { class: 'object-title' }, h('span', { class: 'kind' }, k.kind), ' ', objName, ns ? h('span', { class: 'muted' }, ` in ${ns}`) : null),
    h('nav', { class: 'tabs small', 'aria-label': 'Object views' }, tabs.map(([id, t]) =>
      h('a', { href: id === 'summary' ? here : `${here}/${id}`, 'aria-current': id === tab ? 'page' : null }, t))),
    pane);

  if (tab === 'logs') return logs(ctx, name, ns, objName, pane);
  if (tab === 'events') return objectEvents(ctx, name, ns, objName, k, pane);

  put(pane, loading(`Loading ${k.kind.toLowerCase()} ${objName}…`));
  let obj;
  try {
    obj = await kube(name, path, { signal });
  } catch (e) {
    if (!signal.aborted) put(pane, failed(e, `${k.kind} ${objName}`));
    return;
  }
  if (tab === 'yaml' || tab === 'json') {
    const text = tab === 'yaml' ? toYaml(obj) + '\n' : JSON.stringify(obj, null, 2) + '\n';
    const file = `${objName}.${tab}`;
    put(pane, h('div', { class: 'code-block' },
      h('div', { class: 'code-actions' }, copyButton(text), downloadButton(file, text, 'Download')),
      h('pre', { class: 'source', tabindex: '0', 'aria-label': `${k.kind} ${objName} as ${tab.toUpperCase()}` }, text)));
    return;
  }
  put(pane, summary(name, k, obj));
}

function kv(map) {
  const entries = Object.entries(map ?? {});
  if (!entries.length) return h('span', { class: 'muted' }, '<none>');
  return h('ul', { class: 'chips plain' }, entries.map(([key, v]) => h('li', h('code', `${key}=${v.length > 120 ? v.slice(0, 120) + '…' : v}`))));
}

function summary(name, k, o) {
  const m = o.metadata ?? {};
  const owners = (m.ownerReferences ?? []).map((r) => {
    const ok = KINDS.find((x) => x.kind === r.kind);
    return ok ? h('a', { href: `${base(name)}/ns/${enc(m.namespace)}/${ok.plural}/${enc(r.name)}` }, `${r.kind}/${r.name}`) : `${r.kind}/${r.name}`;
  });
  const rows = [
    fact('Name', m.name),
    m.namespace ? fact('Namespace', m.namespace) : null,
    fact('Created', h('span', when(m.creationTimestamp), ` (${localTime(m.creationTimestamp)})`)),
    owners.length ? fact('Controlled by', owners) : null,
    fact('Labels', kv(m.labels)),
    fact('Annotations', kv(m.annotations)),
  ];
  const s = o.status ?? {};
  const spec = o.spec ?? {};
  const more = [];
  if (k.plural === 'pods') {
    rows.push(fact('Phase', h('span', { class: cellClass('status', s.phase) ?? '' }, s.phase ?? '—')), fact('Node', spec.nodeName ?? '—'), fact('Pod IP', s.podIP ?? '—'));
    const statuses = new Map((s.containerStatuses ?? []).map((c) => [c.name, c]));
    more.push(h('h3', 'Containers'), table('Containers', ['Name', 'Image', 'Ready', 'Restarts', 'State'], (spec.containers ?? []).map((c) => {
      const st = statuses.get(c.name) ?? {};
      const state = Object.keys(st.state ?? {})[0] ?? '—';
      const reason = st.state?.[state]?.reason;
      return h('tr', h('th', { scope: 'row' }, c.name), h('td', h('code', c.image)), h('td', st.ready ? 'yes' : 'no'), h('td', String(st.restartCount ?? 0)), h('td', reason ? `${state} (${reason})` : state));
    })));
  } else if (k.plural === 'nodes') {
    const info = s.nodeInfo ?? {};
    rows.push(fact('Ready', nodeReady(o)), fact('Architecture', info.architecture ?? '—'), fact('OS image', info.osImage ?? '—'),
      fact('Kubelet', info.kubeletVersion ?? '—'), fact('Container runtime', info.containerRuntimeVersion ?? '—'),
      fact('Addresses', (s.addresses ?? []).map((a) => `${a.type}: ${a.address}`).join(', ') || '—'));
    const cap = s.capacity ?? {};
    const alloc = s.allocatable ?? {};
    more.push(h('h3', 'Capacity'), table('Capacity', ['Resource', 'Capacity', 'Allocatable'], Object.keys(cap).map((r) => h('tr',
      h('th', { scope: 'row' }, r), h('td', r === 'memory' ? quantity(cap[r]) : cap[r]), h('td', r === 'memory' ? quantity(alloc[r]) : alloc[r] ?? '—')))));
    more.push(h('h3', 'Conditions'), table('Conditions', ['Type', 'Status', 'Reason', 'Message'], (s.conditions ?? []).map((c) => h('tr',
      h('th', { scope: 'row' }, c.type), h('td', c.status), h('td', c.reason ?? ''), h('td', c.message ?? '')))));
  } else {
    if (spec.replicas !== undefined) rows.push(fact('Replicas', `${s.readyReplicas ?? 0} ready / ${spec.replicas} desired`));
    if (k.plural === 'daemonsets') rows.push(fact('Pods', `${s.numberReady ?? 0} ready / ${s.desiredNumberScheduled ?? 0} desired`));
    if (k.plural === 'jobs') rows.push(fact('Completions', `${s.succeeded ?? 0} / ${spec.completions ?? 1}`), fact('Started', localTime(s.startTime)), fact('Completed', localTime(s.completionTime)));
    const containers = spec.template?.spec?.containers ?? [];
    if (containers.length) more.push(h('h3', 'Containers'), table('Containers', ['Name', 'Image'], containers.map((c) => h('tr', h('th', { scope: 'row' }, c.name), h('td', h('code', c.image))))));
  }
  return h('div', h('dl', { class: 'facts wide' }, rows), more);
}

async function objectEvents(ctx, name, ns, objName, k, pane) {
  const { signal } = ctx;
  put(pane, loading('Loading events…'));
  const sel = `involvedObject.name=${objName}`;
  const path = ns ? `/api/v1/namespaces/${enc(ns)}/events?fieldSelector=${enc(sel)}` : `/api/v1/events?fieldSelector=${enc(sel)}`;
  try {
    const list = await kube(name, path, { signal });
    const items = (list.items ?? []).filter((e) => !e.involvedObject?.kind || e.involvedObject.kind === k.kind);
    if (!items.length) return put(pane, empty(`No events for this ${k.kind.toLowerCase()}. (Clusters keep events for an hour by default.)`));
    items.sort((a, b) => String(b.lastTimestamp ?? b.eventTime ?? '').localeCompare(String(a.lastTimestamp ?? a.eventTime ?? '')));
    put(pane, table('Events', ['Type', 'Reason', 'Last seen', 'Count', 'From', 'Message'], items.map((e) => h('tr',
      h('td', h('span', { class: e.type === 'Warning' ? 'state warn' : 'state ok' }, e.type ?? '')),
      h('td', e.reason ?? ''),
      h('td', when(e.lastTimestamp ?? e.eventTime ?? e.metadata?.creationTimestamp)),
      h('td', String(e.count ?? 1)),
      h('td', e.source?.component ?? e.reportingComponent ?? ''),
      h('td', e.message ?? '')))));
  } catch (e) {
    if (!signal.aborted) put(pane, failed(e, 'the events'));
  }
}

// ---- logs ---------------------------------------------------------------------

/** Most lines kept on screen; older ones scroll away. */
const MAX_LINES = 5000;

async function logs(ctx, name, ns, pod, pane) {
  const { signal } = ctx;
  put(pane, loading('Loading the pod…'));
  let obj;
  try {
    obj = await kube(name, objectPath(kindOf('pods'), ns, pod), { signal });
  } catch (e) {
    if (!signal.aborted) put(pane, failed(e, `pod ${pod}`));
    return;
  }
  const containers = (obj.spec?.containers ?? []).map((c) => c.name);
  const container = h('select', { id: 'log-container' }, containers.map((c) => h('option', { value: c }, c)));
  const tail = h('select', { id: 'log-tail' }, [['100', 'last 100 lines'], ['1000', 'last 1000 lines'], ['', 'everything']].map(([v, t]) => h('option', { value: v, selected: v === '100' }, t)));
  const follow = h('input', { type: 'checkbox', id: 'log-follow', checked: true });
  const stamps = h('input', { type: 'checkbox', id: 'log-timestamps' });
  const toggle = h('button', { type: 'button', id: 'log-toggle' }, 'Stop');
  const state = h('span', { class: 'log-state', id: 'log-state', role: 'status' });
  const errSlot = h('div');
  const out = h('pre', { class: 'logs', id: 'log-output', tabindex: '0', role: 'log', 'aria-label': `Logs of ${pod}` });
  let lines = 0;
  let running = null; // AbortController of the stream

  put(pane,
    h('div', { class: 'toolbar' },
      containers.length > 1 ? h('div', h('label', { for: 'log-container' }, 'Container'), container) : null,
      h('div', h('label', { for: 'log-tail' }, 'Show'), tail),
      h('div', { class: 'check' }, follow, h('label', { for: 'log-follow' }, 'Follow')),
      h('div', { class: 'check' }, stamps, h('label', { for: 'log-timestamps' }, 'Timestamps')),
      toggle,
      h('button', { type: 'button', onclick: () => { out.replaceChildren(); lines = 0; } }, 'Clear'),
      h('button', { type: 'button', onclick: () => download(`${pod}.log`, out.textContent) }, 'Download'),
      state),
    errSlot,
    out);

  function append(text) {
    const nearBottom = out.scrollHeight - out.scrollTop - out.clientHeight < 40;
    out.append(text);
    lines += (text.match(/\n/g) ?? []).length;
    while (out.childNodes.length > MAX_LINES) out.firstChild.remove();
    if (nearBottom) out.scrollTop = out.scrollHeight;
  }

  async function stream() {
    running?.abort();
    const mine = new AbortController();
    running = mine;
    const stop = () => mine.abort();
    signal.addEventListener('abort', stop, { once: true });
    out.replaceChildren();
    put(errSlot);
    lines = 0;
    const q = new URLSearchParams();
    if (follow.checked) q.set('follow', 'true');
    if (tail.value) q.set('tailLines', tail.value);
    if (stamps.checked) q.set('timestamps', 'true');
    if (container.value) q.set('container', container.value);
    toggle.textContent = 'Stop';
    state.textContent = 'Connecting…';
    try {
      const res = await kube(name, `${objectPath(kindOf('pods'), ns, pod)}/log?${q}`, { signal: mine.signal, raw: true, accept: 'text/plain, */*' });
      state.textContent = follow.checked ? 'Following: new lines appear as they are written' : 'Loaded';
      state.className = 'log-state on';
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let partial = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        // One text node per complete line keeps trimming cheap.
        const parts = (partial + value).split('\n');
        partial = parts.pop();
        for (const p of parts) append(p + '\n');
      }
      if (partial) append(partial);
      state.textContent = follow.checked ? 'The stream ended (the container stopped or the connection closed).' : `Loaded ${lines} lines.`;
      state.className = 'log-state';
    } catch (e) {
      if (e.name === 'AbortError') {
        state.textContent = 'Stopped.';
        state.className = 'log-state';
      } else {
        put(state);
        put(errSlot, failed(e, 'the logs'));
        state.className = 'log-state';
      }
    } finally {
      signal.removeEventListener('abort', stop);
      if (running === mine) { running = null; toggle.textContent = 'Resume'; }
    }
  }

  toggle.addEventListener('click', () => { if (running) running.abort(); else stream(); });
  for (const el of [container, tail, follow, stamps]) el.addEventListener('change', () => stream());
  await stream();
}
