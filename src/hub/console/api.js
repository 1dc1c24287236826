// The console's only way out: fetch() to this hub, as the signed-in
// person: either with their hub token as a bearer token (kept in
// sessionStorage: this tab only, gone when it closes, never in a URL), or
// with the hub's session cookie after signing in with the organisation's
// identity provider (/auth/login). The cookie is HttpOnly: this code never
// sees it; it sends the session's CSRF token (from /whoami, kept in memory
// only) on every call that changes something.

const KEY = 'uplink.token';
let csrf = null;

export const session = {
  get token() { return sessionStorage.getItem(KEY); },
  set(token) { sessionStorage.setItem(KEY, token); },
  clear() { sessionStorage.removeItem(KEY); csrf = null; },
  /** The CSRF token of a cookie session (null with a bearer token). */
  get csrf() { return csrf; },
  setCsrf(token) { csrf = token ?? null; },
};

/** Table columns as kubectl prints them; plain JSON if the server has no tables. */
export const TABLE = 'application/json;as=Table;v=v1;g=meta.k8s.io, application/json';

/** A failed request. `status` 0 is a network failure; `forbidden` is the
 * cluster's RBAC (or the hub's) saying no, with its own message. */
export class ApiError extends Error {
  constructor(status, message, { code, reason, hint, kube } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.reason = reason;
    this.hint = hint;
    this.kube = kube;
  }
  get forbidden() { return this.status === 403; }
}

const listeners = new Set();
/** Called with the error when the hub no longer accepts the token. */
export function onUnauthorized(fn) { listeners.add(fn); return () => listeners.delete(fn); }

function hintFor(status, kube) {
  if (status === 0) return 'Check your network connection and that the hub is running; the console retries live updates by itself.';
  if (status === 503 && kube) return 'Check the agent in that cluster: `kubectl -n uplink logs deploy/uplink-agent`, or `journalctl -u uplink` on a systemd host.';
  if (status === 504) return 'The cluster took too long to answer; try again, or narrow what you ask for.';
  if (status >= 500) return 'Try again in a moment; if it persists, the hub log says more.';
  return undefined;
}

async function failure(res, kube) {
  const text = await res.text().catch(() => '');
  let data = null;
  try { data = JSON.parse(text); } catch { /* text/plain answers */ }
  const message = data?.message || text.trim() || `${res.status} ${res.statusText}`;
  return new ApiError(res.status, message, { code: data?.error, reason: data?.reason, kube, hint: hintFor(res.status, kube) });
}

/**
 * fetch() against the hub. Resolves to parsed JSON (or text); with `raw`,
 * to the Response (for streaming). Rejects with ApiError, or the
 * AbortError when `signal` aborts.
 */
export async function api(path, { method = 'GET', body, signal, accept = 'application/json', raw = false } = {}) {
  const headers = { Accept: accept };
  const token = session.token;
  if (token) headers.Authorization = `Bearer ${token}`;
  else if (csrf && method !== 'GET' && method !== 'HEAD') headers['X-CSRF-Token'] = csrf;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const kube = path.startsWith('/k8s/');
  let res;
  try {
    res = await fetch(path, {
      method, headers, signal, cache: 'no-store', credentials: token ? 'omit' : 'same-origin', redirect: 'error',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'Cannot reach the hub.', { hint: hintFor(0) });
  }
  if (!res.ok) {
    const err = await failure(res, kube);
    // The hub refuses the token itself (not a cluster saying 401).
    if (res.status === 401 && (!kube || /bearer token|your credentials/.test(err.message))) listeners.forEach((fn) => fn(err));
    throw err;
  }
  if (raw) return res;
  const text = await res.text();
  const type = res.headers.get('content-type') ?? '';
  if (type.includes('json')) return text ? JSON.parse(text) : null;
  return text;
}

export const hub = {
  get: (path, opts) => api(`/api/v1${path}`, opts),
  post: (path, body, opts) => api(`/api/v1${path}`, { ...opts, method: 'POST', body }),
  del: (path, opts) => api(`/api/v1${path}`, { ...opts, method: 'DELETE' }),
};

/** A request to a cluster's API server through the hub, as the signed-in person. */
export function kube(cluster, path, opts) {
  return api(`/k8s/clusters/${encodeURIComponent(cluster)}${path}`, opts);
}

/** The resources the console lists, with their API paths. */
export const KINDS = [
  { plural: 'deployments', kind: 'Deployment', title: 'Deployments', api: '/apis/apps/v1' },
  { plural: 'daemonsets', kind: 'DaemonSet', title: 'DaemonSets', api: '/apis/apps/v1' },
  { plural: 'statefulsets', kind: 'StatefulSet', title: 'StatefulSets', api: '/apis/apps/v1' },
  { plural: 'replicasets', kind: 'ReplicaSet', title: 'ReplicaSets', api: '/apis/apps/v1' },
  { plural: 'jobs', kind: 'Job', title: 'Jobs', api: '/apis/batch/v1' },
  { plural: 'pods', kind: 'Pod', title: 'Pods', api: '/api/v1' },
];

export function kindOf(plural) {
  return KINDS.find((k) => k.plural === plural);
}

/** `/apis/apps/v1/namespaces/NS/deployments[/NAME]` */
export function objectPath(k, ns, name) {
  const e = encodeURIComponent;
  return `${k.api}/namespaces/${e(ns)}/${k.plural}${name ? '/' + e(name) : ''}`;
}
