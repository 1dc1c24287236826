// The console scenario in headless Chromium, run by tests/console_e2e.rs
// (which starts the stand-in cluster, the hub and the agent, and acts on
// "@@ ..." lines this script prints: append-log, kill-agent).
//
// Env: HUB_URL, ADMIN_TOKEN, ALICE_TOKEN, CLUSTER, SCREENSHOTS, CHROMIUM,
// BROWSER_DATA (a fresh profile directory).

import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';
import { mkdtempSync, readFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import assert from 'node:assert/strict';

const env = (k, d) => process.env[k] ?? d ?? (() => { throw new Error(`${k} is not set`); })();
const HUB = env('HUB_URL');
const CLUSTER = env('CLUSTER', 'edge-1');
const SHOTS = env('SCREENSHOTS', 'screenshots');
const POD = 'web-7d4b9c8f6d-k2x9p';
const T = 30_000; // patience for anything that crosses the tunnel
mkdirSync(SHOTS, { recursive: true });

// ---- talking to the Rust side --------------------------------------------------
const answers = [];
const waiting = [];
createInterface({ input: process.stdin }).on('line', (l) => (waiting.length ? waiting.shift()(l) : answers.push(l)));
function world(cmd) {
  process.stdout.write(`@@ ${cmd}\n`);
  return new Promise((resolve) => (answers.length ? resolve(answers.shift()) : waiting.push(resolve)));
}

const started = Date.now();
const log = (...a) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s]`, ...a);
let step = '';
async function shot(page, name) {
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: false });
}

// One persistent context on a fresh profile directory; each page (tab) has
// its own sessionStorage, so alice and the admin are signed in side by side.
const browser = await chromium.launchPersistentContext(process.env.BROWSER_DATA ?? mkdtempSync(join(tmpdir(), 'uplink-chromium-')), {
  executablePath: env('CHROMIUM', '/usr/bin/chromium'),
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  ignoreHTTPSErrors: true,
  acceptDownloads: true,
  colorScheme: 'light',
  viewport: { width: 1280, height: 860 },
  // On a loaded 2-core CI machine Chromium has taken over a minute to
  // start and paint its first page; slowness is not what this test checks.
  timeout: 180_000,
});

const pageErrors = [];
async function newPage(viewport = { width: 1280, height: 860 }) {
  const page = await browser.newPage();
  await page.setViewportSize(viewport);
  page.setDefaultTimeout(T);
  page.setDefaultNavigationTimeout(180_000);
  page.on('pageerror', (e) => { pageErrors.push(`${step}: ${e.message}`); console.log(`page error during "${step}": ${e.message}`); });
  page.on('console', (m) => { if (m.type() === 'error' && !/status of (401|403|404|503)/.test(m.text())) pageErrors.push(`${step}: console: ${m.text()}`); });
  return page;
}

async function signIn(page, token) {
  await page.goto(HUB);
  const input = page.getByLabel('Hub token');
  await input.waitFor();
  // Keyboard only: the field has focus, Enter submits.
  assert.equal(await page.evaluate(() => document.activeElement?.id), 'token', 'the token field has focus on load');
  await page.keyboard.type(token);
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: /^Clusters/ }).waitFor();
}

const clusterRow = (page, name) => page.locator(`tr[data-cluster="${name}"]`);

try {
  // ---- Alice ---------------------------------------------------------------------
  step = 'alice signs in';
  log(step);
  const alice = await newPage();
  await alice.goto(HUB);
  await alice.getByLabel('Hub token').fill('uh_not-a-token');
  await alice.getByRole('button', { name: 'Sign in' }).click();
  await alice.getByText('This token is not valid on this hub.').waitFor();
  await shot(alice, '00-sign-in-error');
  await signIn(alice, env('ALICE_TOKEN'));
  assert.equal(await alice.locator('#whoami').innerText(), 'alice');
  // The token is in sessionStorage, never in the URL.
  assert.ok(!alice.url().includes('uh_'), 'no token in the URL');

  step = 'alice sees the cluster ACTIVE';
  log(step);
  await clusterRow(alice, CLUSTER).locator('[data-status="ACTIVE"]').waitFor();
  const row = await clusterRow(alice, CLUSTER).innerText();
  assert.match(row, /arm64|amd64|x86_64|aarch64/, `architecture in ${row}`);
  await alice.locator('#live-indicator.on').waitFor();
  await shot(alice, '01-clusters');

  step = 'alice opens the cluster: nodes and namespaces';
  log(step);
  await clusterRow(alice, CLUSTER).getByRole('link', { name: CLUSTER }).click();
  await alice.locator('table.nodes tbody tr').first().waitFor();
  const nodes = await alice.locator('table.nodes tbody tr').count();
  assert.ok(nodes >= 1, 'nodes listed');
  assert.match(await alice.locator('table.nodes').innerText(), /Ready/);
  await alice.locator('#namespaces').getByRole('link', { name: 'kube-system' }).waitFor();
  const namespaces = await alice.locator('#namespaces li').allInnerTexts();
  for (const ns of ['default', 'kube-system']) assert.ok(namespaces.includes(ns), `namespace ${ns} in ${namespaces}`);
  await shot(alice, '02-cluster-overview');

  step = 'alice sees the default workloads';
  log(step);
  await alice.locator('#namespaces').getByRole('link', { name: 'default', exact: true }).click();
  const expect = { deployments: 'web', daemonsets: 'node-exporter', statefulsets: 'db', replicasets: 'web-7d4b9c8f6d', jobs: 'backup', pods: POD };
  for (const [kind, name] of Object.entries(expect)) {
    await alice.locator(`table.kind-${kind} tr[data-name="${name}"]`).waitFor();
  }
  // kubectl's own columns, from the server's Table.
  assert.match(await alice.locator('table.kind-pods thead').innerText(), /READY[\s\S]*STATUS[\s\S]*RESTARTS[\s\S]*AGE/i);
  assert.match(await alice.locator(`table.kind-pods tr[data-name="${POD}"]`).innerText(), /Running/);
  assert.match(await alice.locator('table.kind-jobs tr[data-name="backup"]').innerText(), /Complete/);
  await shot(alice, '03-workloads-default');

  step = 'alice is shown the forbidden message in kube-system';
  log(step);
  await alice.getByLabel('Namespace').selectOption('kube-system');
  const forbidden = alice.locator('#kind-pods .callout.forbidden .message');
  await forbidden.waitFor();
  const msg = await forbidden.innerText();
  assert.match(msg, /pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "kube-system"/, msg);
  await alice.locator('#kind-deployments .callout.forbidden').waitFor();
  await shot(alice, '04-forbidden-kube-system');

  step = 'alice opens a pod: summary and YAML';
  log(step);
  await alice.goto(`${HUB}/#/clusters/${CLUSTER}/ns/default/pods/${POD}`);
  await alice.getByText('Containers').first().waitFor();
  await alice.getByRole('link', { name: 'YAML' }).click();
  await alice.locator('pre.source').waitFor();
  const yaml = await alice.locator('pre.source').innerText();
  assert.match(yaml, /^apiVersion: v1$/m);
  assert.match(yaml, /^kind: Pod$/m);
  assert.match(yaml, new RegExp(`^  name: ${POD}$`, 'm'));
  await shot(alice, '05-pod-yaml');
  await alice.getByRole('link', { name: 'Events' }).click();
  await alice.locator('#detail-pane .callout, #detail-pane .empty, #detail-pane table').first().waitFor();

  step = 'alice follows the pod logs and sees new lines arrive';
  log(step);
  await alice.getByRole('link', { name: 'Logs' }).click();
  const out = alice.locator('#log-output');
  await alice.locator('#log-state.on').waitFor();
  await out.getByText('console-e2e: first line before the browser came').waitFor();
  for (let i = 1; i <= 3; i += 1) {
    assert.equal(await world(`append-log default ${POD} console-e2e: live line ${i}`), 'ok');
    await out.getByText(`console-e2e: live line ${i}`).waitFor({ timeout: 15_000 });
  }
  await shot(alice, '06-pod-logs-follow');

  step = 'the page speaks h2: live streams do not hold up its other requests';
  log(step);
  // Over HTTP/1.1 a browser keeps six connections per origin, so six live
  // streams would queue every further request. Over h2 all share one
  // connection: with the log follow and eight more open on this page,
  // one more request still answers at once.
  const h2 = await alice.evaluate(async ({ cluster, token, pod }) => {
    const nav = performance.getEntriesByType('navigation')[0]?.nextHopProtocol;
    const ctl = new AbortController();
    const headers = { Authorization: `Bearer ${token}` };
    const url = `/k8s/clusters/${cluster}/api/v1/namespaces/default/pods/${pod}/log?follow=true`;
    const heads = await Promise.all([...Array(8).keys()].map((i) =>
      fetch(`${url}&n=${i}`, { headers, signal: ctl.signal }).then((r) => r.status)));
    const t0 = performance.now();
    const r = await fetch('/api/v1/whoami', { headers });
    const ms = performance.now() - t0;
    const who = (await r.json()).name;
    const protos = performance.getEntriesByType('resource')
      .filter((e) => e.name.includes('/api/v1/whoami'))
      .map((e) => e.nextHopProtocol);
    ctl.abort();
    return { nav, heads, ms, who, protos };
  }, { cluster: CLUSTER, token: env('ALICE_TOKEN'), pod: POD });
  log(`h2: ${JSON.stringify(h2)}`);
  assert.equal(h2.nav, 'h2', 'the console page came over h2');
  assert.deepEqual(h2.heads, Array(8).fill(200), 'eight more log follows open beside the console\'s own');
  assert.equal(h2.who, 'alice');
  assert.ok(h2.ms < 2000, `a request behind nine live streams took ${h2.ms} ms`);
  assert.ok(h2.protos.length >= 1 && h2.protos.every((p) => p === 'h2'), `protocols ${h2.protos}`);
  await alice.getByRole('button', { name: 'Stop' }).click();
  await alice.getByText('Stopped.').waitFor();

  // Alice is no admin: no admin pages in her navigation.
  assert.equal(await alice.getByRole('link', { name: 'Register a cluster' }).count(), 0);

  // ---- an admin ------------------------------------------------------------------
  step = 'admin registers a cluster';
  log(step);
  const admin = await newPage();
  await signIn(admin, env('ADMIN_TOKEN'));
  await admin.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Register a cluster' }).click();
  await admin.getByLabel('Cluster name').fill('edge-new');
  await admin.getByLabel('Users the agent may impersonate').fill('alice');
  await admin.getByRole('button', { name: 'Register', exact: true }).click();
  await admin.getByText('Cluster edge-new is registered (PENDING).').waitFor();
  assert.equal(await admin.locator('#cmd-kubectl').innerText(), 'kubectl apply -f uplink-edge-new.yaml');
  assert.match(await admin.locator('#cmd-systemd').innerText(), /systemctl enable --now uplink/);
  const [dl] = await Promise.all([
    admin.waitForEvent('download'),
    admin.getByRole('button', { name: 'Download uplink-edge-new.yaml' }).click(),
  ]);
  assert.equal(dl.suggestedFilename(), 'uplink-edge-new.yaml');
  const manifest = readFileSync(await dl.path(), 'utf8');
  assert.match(manifest, /kind: Deployment/);
  assert.match(manifest, /uplink-activation/);
  assert.match(manifest, /edge-new/);
  const [dl2] = await Promise.all([
    admin.waitForEvent('download'),
    admin.getByRole('button', { name: 'Download activation.json' }).click(),
  ]);
  const act = JSON.parse(readFileSync(await dl2.path(), 'utf8'));
  assert.equal(act.cluster, 'edge-new');
  assert.ok(act.activation_code && act.hub_url, 'activation file has a code and the hub URL');
  await shot(admin, '07-register-cluster');

  step = 'admin sees the new cluster PENDING and deregisters it';
  log(step);
  await admin.getByRole('link', { name: 'Open edge-new' }).click();
  await admin.locator('h1 [data-status="PENDING"]').waitFor();
  await admin.getByRole('button', { name: 'Deregister…' }).click();
  const dialog = admin.getByRole('dialog');
  await dialog.waitFor();
  const confirm = dialog.getByRole('button', { name: 'Deregister' });
  assert.ok(await confirm.isDisabled(), 'confirmation needs the typed name');
  await dialog.getByLabel(/to confirm/).fill('edge-new');
  await shot(admin, '08-deregister-confirm');
  await confirm.click();
  await admin.getByRole('heading', { name: 'edge-new is deregistered' }).waitFor();
  assert.match(await admin.locator('#cleanup').innerText(), /kubectl|systemctl/);
  await shot(admin, '09-deregistered-cleanup');
  await admin.goto(`${HUB}/#/`);
  await clusterRow(admin, CLUSTER).waitFor();
  assert.equal(await clusterRow(admin, 'edge-new').count(), 0, 'a deregistered cluster leaves the list');

  step = 'admin: users, grants and the audit log';
  log(step);
  await admin.goto(`${HUB}/#/users`);
  await admin.locator('tr[data-user="alice"]').waitFor();
  await admin.locator('tr[data-grant]').first().waitFor();
  await shot(admin, '10-users-grants');
  await admin.goto(`${HUB}/#/audit?user=alice`);
  await admin.locator('table.audit tbody tr').first().waitFor();
  const audit = await admin.locator('table.audit').innerText();
  assert.match(audit, /\/api\/v1\/namespaces\/kube-system\/pods/);
  assert.match(audit, /403/);
  await shot(admin, '11-audit-log');

  // ---- the fleet --------------------------------------------------------------------
  step = 'alice asks the whole fleet';
  log(step);
  await alice.goto(`${HUB}/#/fleet`);
  await alice.locator(`table.fleet-nodes tr[data-cluster="${CLUSTER}"]`).waitFor();
  assert.match(await alice.locator(`table.fleet-nodes tr[data-cluster="${CLUSTER}"]`).innerText(), /\d+\/\d+ Ready/);
  // All namespaces: the article's RBAC lets alice list pods only in default.
  const note = alice.locator(`#fleet-notes li[data-cluster="${CLUSTER}"]`);
  await note.waitFor();
  assert.match(await note.innerText(), /Forbidden[\s\S]*pods is forbidden: User "alice" cannot list resource "pods"/);
  await shot(alice, '14-fleet');
  await alice.getByLabel('Namespace').fill('default');
  await alice.getByRole('button', { name: 'Ask' }).click();
  await alice.waitForURL(/#\/fleet\?clusters=.*ns=default/);
  await alice.locator(`table.fleet-nodes tr[data-cluster="${CLUSTER}"]`).waitFor();
  await alice.locator('#fleet-pods').getByText(/running and ready|Pods not running/).first().waitFor();
  assert.equal(await note.count(), 0, 'in default alice may see everything asked');
  // The fleet links to the cluster's own pages.
  await alice.locator(`table.fleet-nodes tr[data-cluster="${CLUSTER}"]`).getByRole('link', { name: CLUSTER }).click();
  await alice.locator('table.nodes tbody tr').first().waitFor();

  // ---- a tablet --------------------------------------------------------------------
  step = 'alice on a tablet';
  log(step);
  const tablet = await newPage({ width: 820, height: 1180 });
  await signIn(tablet, env('ALICE_TOKEN'));
  await tablet.goto(`${HUB}/#/clusters/${CLUSTER}/ns/default`);
  await tablet.locator(`table.kind-pods tr[data-name="${POD}"]`).waitFor();
  const overflow = await tablet.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 1, `the page does not scroll sideways on a tablet (${overflow}px)`);
  await shot(tablet, '12-tablet-workloads');

  // ---- the agent goes away -------------------------------------------------------
  step = 'a disconnected agent turns the open page DISCONNECTED';
  log(step);
  await alice.goto(`${HUB}/#/`);
  await clusterRow(alice, CLUSTER).locator('[data-status="ACTIVE"]').waitFor();
  await alice.evaluate(() => { window.__sameDocument = true; });
  assert.equal(await world('kill-agent'), 'ok');
  await clusterRow(alice, CLUSTER).locator('[data-status="DISCONNECTED"]').waitFor({ timeout: 20_000 });
  assert.equal(await alice.evaluate(() => window.__sameDocument), true, 'no reload');
  assert.match(await clusterRow(alice, CLUSTER).innerText(), /last seen/);
  await shot(alice, '13-cluster-disconnected');
  step = 'the fleet page says which cluster is disconnected';
  log(step);
  await alice.goto(`${HUB}/#/fleet`);
  await alice.locator(`#fleet-notes li[data-cluster="${CLUSTER}"][data-reason="Disconnected"]`).waitFor({ timeout: 20_000 });
  assert.match(await alice.locator('#fleet-pods').innerText(), /No cluster could answer this/, 'nothing is called healthy that was not seen');
  await shot(alice, '15-fleet-disconnected');

  assert.deepEqual(pageErrors, [], 'no script errors in the pages');
  log('all console checks passed');
  await browser.close();
  process.exit(0);
} catch (e) {
  console.log(`FAILED at "${step}": ${e.stack ?? e}`);
  if (pageErrors.length) console.log('page errors:', pageErrors);
  for (const [n, p] of browser.pages().entries()) {
    await p.screenshot({ path: join(SHOTS, `failure-${n}.png`), fullPage: true }).catch(() => {});
  }
  await browser.close().catch(() => {});
  process.exit(1);
}
