// The console's sign-in with the organisation's identity provider, in
// headless Chromium, run by tests/console_e2e.rs
// (console_oidc_sign_in_in_headless_chromium), which starts the test
// identity provider (tests/support/idp.rs, auto-approving ann) and a hub
// configured with it.
//
// Env: HUB_URL, PERSON (the expected hub user name), ALLOWED (a cluster
// the person's IdP group may reach), HIDDEN (one it may not), SCREENSHOTS,
// CHROMIUM, BROWSER_DATA.

import { chromium } from 'playwright-core';
import { mkdtempSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import assert from 'node:assert/strict';

const env = (k, d) => process.env[k] ?? d ?? (() => { throw new Error(`${k} is not set`); })();
const HUB = env('HUB_URL');
const SHOTS = env('SCREENSHOTS', 'screenshots');
mkdirSync(SHOTS, { recursive: true });

const browser = await chromium.launchPersistentContext(process.env.BROWSER_DATA ?? mkdtempSync(join(tmpdir(), 'uplink-chromium-')), {
  executablePath: env('CHROMIUM', '/usr/bin/chromium'),
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  // The hub and the provider have the tests' own CAs.
  ignoreHTTPSErrors: true,
  viewport: { width: 1280, height: 860 },
  timeout: 180_000,
});

const errors = [];
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(30_000);
  page.setDefaultNavigationTimeout(180_000);
  page.on('pageerror', (e) => errors.push(e.message));
  const hops = [];
  page.on('request', (r) => { if (r.isNavigationRequest()) hops.push(new URL(r.url()).pathname); });

  await page.goto(HUB);
  const sso = page.getByRole('link', { name: 'Sign in with your organisation' });
  await sso.waitFor();
  await page.screenshot({ path: join(SHOTS, '20-oidc-sign-in.png') });
  await sso.click();

  // Provider (auto-approves) → /auth/callback → the console, signed in.
  await page.getByRole('heading', { name: /^Clusters/ }).waitFor();
  assert.deepEqual(hops.slice(0, 4), ['/', '/auth/login', '/authorize', '/auth/callback'], `navigations: ${hops}`);
  assert.equal(new URL(page.url()).pathname, '/');
  assert.equal(await page.locator('#whoami').innerText(), env('PERSON'));
  await page.locator(`tr[data-cluster="${env('ALLOWED')}"]`).waitFor();
  assert.equal(await page.locator(`tr[data-cluster="${env('HIDDEN')}"]`).count(), 0, 'only clusters the group may reach');
  const cookies = await browser.cookies(HUB);
  const session = cookies.find((c) => c.name === 'uplink_session');
  assert.ok(session, `no session cookie in ${JSON.stringify(cookies.map((c) => c.name))}`);
  assert.equal(session.httpOnly, true);
  assert.equal(session.secure, true);
  assert.equal(session.sameSite, 'Strict');
  assert.equal(await page.evaluate(() => document.cookie), '', 'the session cookie is out of reach of scripts');
  await page.screenshot({ path: join(SHOTS, '21-oidc-clusters.png') });

  // A reload keeps the session; sign-out ends it on the hub.
  await page.reload();
  await page.getByRole('heading', { name: /^Clusters/ }).waitFor();
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByText('You are signed out.').waitFor();
  await page.reload();
  await sso.waitFor();
  assert.equal((await browser.cookies(HUB)).filter((c) => c.name === 'uplink_session').length, 0);
  assert.deepEqual(errors, [], 'no script errors');
  console.log('oidc console sign-in: ok');
} finally {
  await browser.close();
}
