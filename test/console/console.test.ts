// Issue #20: the admin console in a real browser (Debian chromium), against a
// real server process, a real agent holding a real lease (push channel on), and
// named administrators. Screenshots of each page go to test-output/screenshots.
import { expect } from 'chai';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import fs from 'node:fs';
import type { Browser, BrowserContext, ElementHandle, Page } from 'puppeteer-core';
import type { RunningAgent } from '../../agent/daemon/start.js';
import { enrollDevice } from '../../agent/keys/identity.js';
import { base32Decode, totp } from '../../common/totp.js';
import { agentInProcess, pushImage, testUnlock } from '../helpers/fixtures.js';
import { axeViolations, clickLive, launchBrowser, newPage, screenshot, typeInLive, unreachableByKeyboard, waitForText } from '../helpers/browser.js';
import { lethe, startServer, tmpDir, waitFor, type ServerProc } from '../helpers/proc.js';
import { serverDb } from '../helpers/server-db.js';

const PW = { alice: 'alice-console-passphrase', bob: 'bob-console-passphrase' };

describe('admin console in a real browser (issue #20)', function () {
  this.timeout(120_000);
  let s: ServerProc;
  let browser: Browser;
  let agent: RunningAgent;
  let deviceId = '';
  let secret: Buffer;
  let lastStep = 0;
  const contexts: BrowserContext[] = [];
  const pageErrors: string[][] = [];

  /**
   * A TOTP code alice has not used yet: the current step or a later one within the
   * server's window. Never the step before: that code dies at the next boundary,
   * which a slow page load can cross between reading the code and posting it.
   */
  const nextCode = async () => {
    for (;;) {
      const now = Math.floor(Date.now() / 30_000);
      const step = Math.max(now, lastStep + 1);
      if (step <= now + 1) {
        lastStep = step;
        return totp(secret, step * 30_000);
      }
      await new Promise((r) => setTimeout(r, 1000));
    }
  };

  /** A fresh browser profile (its own cookies) with one page. */
  const freshPage = async (): Promise<Page> => {
    const ctx = await browser.createBrowserContext();
    contexts.push(ctx);
    const { page, errors } = await newPage(ctx);
    pageErrors.push(errors);
    openPages.push(page);
    return page;
  };

  const login = async (page: Page, user: keyof typeof PW, code?: string) => {
    await page.goto(`${s.url}/console`);
    await page.waitForSelector('#user');
    await page.type('#user', user);
    await page.type('#password', PW[user]);
    if (code) await page.type('#totp', code);
    await Promise.all([page.waitForNavigation(), page.click('form[aria-label="Sign in"] button[type=submit]')]);
    // A refused sign-in stays on the login page; every test after it would fail for a reason far from here.
    const refused = await page.$eval('.note-error', (e) => e.textContent).catch(() => null);
    expect(new URL(page.url()).pathname, `signing in as ${user}: ${refused ?? 'no error shown'}`).to.not.equal('/console/login');
  };

  /** Every page of the console: no accessibility violation, every control reachable by keyboard, a screenshot. */
  const checkPage = async (page: Page, name: string) => {
    await screenshot(page, name);
    expect(await axeViolations(page), `axe on ${name}`).to.deep.equal([]);
    expect(await unreachableByKeyboard(page), `keyboard on ${name}`).to.deep.equal([]);
  };

  const liveReady = (page: Page) => waitForText(page, '#live', 'live');

  /** Alice's browser profile, signed in once (each admin login spends a one-time code). */
  let aliceCtx: BrowserContext;
  const alicePage = async (): Promise<Page> => {
    const { page, errors } = await newPage(aliceCtx);
    pageErrors.push(errors);
    openPages.push(page);
    return page;
  };
  /** Closed after each test: each open console page holds a live-update stream, and a browser keeps six connections per server. */
  const openPages: Page[] = [];

  before(async () => {
    s = await startServer();
    // A real agent with a lease, on the push channel, reporting every second.
    ({ agent } = await agentInProcess(s, 'desk', {}, { push: true, heartbeatMs: 1000 }));
    deviceId = agent.status().device;
    const out = Buffer.alloc(4096);
    for (const i of [0, 2]) await agent.core.readInto('mem', i, out, { resident: true });
    await pushImage(s, 'spare');
    const r = await lethe(['admin', 'user', 'add', 'alice', '--role', 'admin', '--password-fd', '0', '--json'], s.env, PW.alice + '\n');
    expect(r.code, r.stderr).to.equal(0);
    secret = base32Decode((JSON.parse(r.stdout) as { totp: { secret: string } }).totp.secret);
    browser = await launchBrowser();
    aliceCtx = await browser.createBrowserContext();
    contexts.push(aliceCtx);
    await login(await alicePage(), 'alice', await nextCode());
  });
  after(async () => {
    for (const c of contexts) await c.close().catch(() => {});
    await browser?.close();
    agent?.stop();
    await agent?.done;
    await s?.stop();
  });
  afterEach(async function () {
    // A failed test leaves a picture of every page it had open.
    if (this.currentTest?.state === 'failed') for (const [i, p] of openPages.entries()) await screenshot(p, `failed-${this.currentTest.title.slice(0, 40)}-${i}`).catch(() => {});
    for (const p of openPages.splice(0)) await p.close().catch(() => {});
    // A refused request (401, 403, 422) is logged by chromium as "Failed to load resource": the tests make those on purpose.
    for (const errs of pageErrors.splice(0)) expect(errs.filter((e) => !/Failed to load resource/.test(e)), 'browser console errors').to.deep.equal([]);
  });

  it('signs in with password and one-time code; a wrong code is refused on the page', async () => {
    const page = await freshPage();
    await page.goto(`${s.url}/console/devices`);
    expect(page.url()).to.include('/console/login?next=%2Fconsole%2Fdevices');
    await checkPage(page, 'login');
    await page.type('#user', 'alice');
    await page.type('#password', PW.alice);
    await page.type('#totp', '000000');
    await Promise.all([page.waitForNavigation(), page.click('form[aria-label="Sign in"] button[type=submit]')]);
    expect(await page.$eval('.note-error', (e) => e.textContent)).to.include('user name, password or one-time code wrong');
    await login(page, 'alice', await nextCode());
    expect(new URL(page.url()).pathname).to.equal('/console');
    const cookies = await page.browserContext().cookies();
    const session = cookies.find((c) => c.name === '__Host-lethe-session')!;
    expect(session).to.include({ httpOnly: true, secure: true, sameSite: 'Strict', path: '/' });
    await liveReady(page);
    expect(await page.$eval('#device-counts', (e) => e.textContent)).to.match(/1\s*active/);
    await checkPage(page, 'overview');
  });

  it('makes an enrollment token whose command enrolls a real laptop, shown in the fleet list', async () => {
    const page = await alicePage();
    await page.goto(`${s.url}/console/devices`);
    await page.select('#ttl', '86400');
    await Promise.all([page.waitForNavigation(), page.click('form[aria-label="Make an enrollment token"] button')]);
    const cmd = await page.$eval('#enroll-cmd', (e) => e.textContent ?? '');
    expect(cmd).to.match(/^lethe enroll lethe-enroll-\S+$/);
    await checkPage(page, 'devices-enroll');
    await liveReady(page);
    // A laptop whose name is markup: the console shows it as text.
    const name = 'console-laptop <img src=x id=injected><script>window.injected=1</script>';
    await enrollDevice(tmpDir('lethe-home-'), cmd.split(' ')[2], name, { seal: 'passphrase', unlock: testUnlock(), argon2: 'interactive' });
    // The fleet list updates by itself.
    await waitForText(page, '#main table', 'console-laptop <img src=x id=injected>');
    expect(await page.$('#injected')).to.equal(null);
    expect(await page.evaluate(() => (window as unknown as { injected?: number }).injected)).to.equal(undefined);
    expect(await page.$eval('#main', (e) => (e as HTMLElement).dataset.updated ?? '')).to.not.equal('');
    await checkPage(page, 'devices');
  });

  it('a helpdesk user sees devices but no revoke or wipe, and the console refuses a wipe posted anyway', async () => {
    const r = await lethe(['admin', 'user', 'add', 'bob', '--role', 'helpdesk', '--password-fd', '0'], { ...s.env, LETHE_ADMIN_TOKEN: await aliceToken() }, PW.bob + '\n');
    expect(r.code, r.stderr).to.equal(0);
    const page = await freshPage();
    await login(page, 'bob');
    await page.goto(`${s.url}/console/devices/${deviceId}`);
    expect(await page.$('#wipe-button')).to.equal(null);
    expect(await page.$('#revoke-button')).to.equal(null);
    expect(await page.$$eval('nav a', (as) => as.map((a) => a.textContent))).to.not.include('Audit');
    await checkPage(page, 'device-helpdesk');
    // The same form a page for an admin has, posted with bob's own session and CSRF token.
    const answer = await page.evaluate(async (id) => {
      const csrf = (document.querySelector('input[name=_csrf]') as HTMLInputElement).value;
      const r = await fetch(`/console/devices/${id}/wipe`, { method: 'POST', body: new URLSearchParams({ _csrf: csrf, confirm: 'laptop' }) });
      return { status: r.status, text: await r.text() };
    }, deviceId);
    expect(answer.status).to.equal(403);
    expect(answer.text).to.include('FORBIDDEN');
    const st = await lethe(['admin', 'devices', '--json'], { ...s.env, LETHE_ADMIN_TOKEN: await aliceToken() });
    expect(JSON.parse(st.stdout).devices.find((d: { id: string }) => d.id === deviceId).status).to.equal('active');
  });

  it('a form posted from another origin is refused (CSRF) and changes nothing', async () => {
    const page = await alicePage();
    // A page on another port of the same host: same site, another origin, so the session cookie goes along.
    const evil = https.createServer({ key: await serverKey(), cert: await serverCert() }, (_req, res) => {
      res.setHeader('content-type', 'text/html');
      res.end(`<!doctype html><html lang="en"><title>x</title><form id="f" method="post" action="${s.url}/console/devices/${deviceId}/revoke"><input name="confirm" value="laptop"></form><script>document.getElementById('f').submit()</script></html>`);
    });
    await new Promise<void>((r) => evil.listen(0, '127.0.0.1', r));
    try {
      const port = (evil.address() as AddressInfo).port;
      const [res] = await Promise.all([page.waitForResponse((r) => r.url().includes('/revoke')), page.goto(`https://127.0.0.1:${port}/`)]);
      expect(res.status()).to.equal(403);
      expect(await res.text()).to.include('CSRF_FAILED');
    } finally {
      evil.close();
    }
    pageErrors.pop(); // the forged page runs an inline script of its own
    const st = await lethe(['admin', 'devices', '--json'], { ...s.env, LETHE_ADMIN_TOKEN: await aliceToken() });
    expect(JSON.parse(st.stdout).devices.find((d: { id: string }) => d.id === deviceId).status).to.equal('active');
  });

  it('the lost-laptop page answers what the device was given, with CSV and a printable report', async () => {
    const page = await alicePage();
    // The agent reports what it holds at its heartbeats (every second here).
    await waitFor(async () => {
      const r = await lethe(['admin', 'devices', '--json'], { ...s.env, LETHE_ADMIN_TOKEN: await aliceToken() });
      const d = JSON.parse(r.stdout).devices.find((x: { id: string }) => x.id === deviceId);
      return (d?.lastReport?.resident?.sensitiveBytes ?? 0) > 0 ? true : undefined;
    }, 60_000, 'a heartbeat report with resident plaintext');
    await page.goto(`${s.url}/console/devices/${deviceId}/exposure?since=1h`);
    const text = await page.$eval('#exposure-answer', (e) => e.textContent ?? '');
    const audit = JSON.parse((await lethe(['audit', 'device', deviceId, '--since', '1h', '--json'], { ...s.env, LETHE_ADMIN_TOKEN: await aliceToken() })).stdout) as {
      summary: { keysReleased: number; sensitiveKeys: number };
    };
    expect(audit.summary.keysReleased).to.be.greaterThan(0);
    expect(text).to.include(`released ${audit.summary.keysReleased} chunk key`);
    expect(text).to.include(`(${audit.summary.sensitiveKeys} of sensitive chunks)`);
    expect(text).to.match(/A lease still runs/);
    expect(text).to.match(/At its last heartbeat \(.*\) it held [\d.]+ (KiB|B|MiB) of sensitive plaintext/);
    await checkPage(page, 'lost-laptop');
    const csv = await page.evaluate(async () => {
      const a = document.querySelector('a[download]') as HTMLAnchorElement;
      const r = await fetch(a.href);
      return { type: r.headers.get('content-type'), disposition: r.headers.get('content-disposition'), body: await r.text() };
    });
    expect(csv.type).to.match(/^text\/csv/);
    expect(csv.disposition).to.include(`lethe-exposure-${deviceId}.csv`);
    const rows = csv.body.trim().split('\r\n');
    expect(rows[0]).to.equal('seq,time,type,device,image,version,count,sensitive,lease,actor,data');
    expect(rows.filter((r) => r.split(',')[2] === 'keys.release').length).to.be.greaterThan(0);
    await page.emulateMediaType('print');
    expect(await page.$eval('header.top', (e) => getComputedStyle(e).display)).to.equal('none');
    await screenshot(page, 'lost-laptop-print');
  });

  it('a policy with an error is shown with its line and not saved; a good one is saved', async () => {
    const page = await alicePage();
    await page.goto(`${s.url}/console/images`);
    await checkPage(page, 'images');
    // The images table is a live part: a heartbeat's update can replace the link between finding it and clicking it.
    await Promise.all([page.waitForNavigation(), clickLive(page, 'a[href="/console/images/desk"]')]);
    expect(await page.$eval('#policy-explained', (e) => e.textContent)).to.include('what is sensitive');
    // A policy file from this computer, loaded into the text area and saved.
    const file = `${tmpDir('lethe-policy-')}/broken.yaml`;
    fs.writeFileSync(file, 'name: broken\neviction:\n  idle: soon\n');
    const input = (await page.$('#policy-file')) as ElementHandle<HTMLInputElement>;
    await input.uploadFile(file);
    await page.waitForFunction(() => (document.getElementById('policy-text') as HTMLTextAreaElement).value.includes('broken'));
    await Promise.all([page.waitForNavigation(), clickLive(page, '#policy-save')]);
    const findings = await page.$eval('#policy-findings', (e) => e.textContent ?? '');
    expect(findings).to.include('not saved');
    expect(findings).to.match(/line 3.*eviction\.idle/s);
    await checkPage(page, 'policy-error');
    const explained = JSON.parse((await lethe(['image', 'ls', '--json'], { ...s.env, LETHE_ADMIN_TOKEN: await aliceToken() })).stdout);
    expect(JSON.stringify(explained)).to.not.include('broken');
    await page.$eval('#policy-text', (e) => ((e as HTMLTextAreaElement).value = ''));
    await page.type('#policy-text', 'name: console-made\neviction:\n  idle: 30s\n');
    await Promise.all([page.waitForNavigation(), clickLive(page, '#policy-save')]);
    expect(await page.$eval('.note-ok', (e) => e.textContent)).to.include('Policy saved');
    expect(await page.$eval('#policy-explained', (e) => e.textContent)).to.include('console-made');
  });

  it('revoke and wipe a real device from its page: typed confirmation, status changing live on another open page', async () => {
    const watcher = await alicePage();
    await watcher.goto(`${s.url}/console/devices/${deviceId}`);
    await liveReady(watcher);
    await checkPage(watcher, 'device');
    // The actor in a window of its own (alice's session copied into it), so both pages stay visible.
    const actor = await freshPage();
    await actor.setCookie(...(await watcher.cookies()));
    await actor.goto(`${s.url}/console/devices/${deviceId}`);
    await liveReady(actor);
    // A wrong name revokes nothing.
    // (Submitted with Enter: the facts above the form change as the agent reports, and a click could land where the button was.)
    await Promise.all([actor.waitForNavigation(), typeInLive(actor, '#confirm-revoke', 'not-the-name\n')]);
    expect(await actor.$eval('.note-error', (e) => e.textContent)).to.include('the name typed does not match');
    expect(await watcher.$eval('#device-status', (e) => e.textContent)).to.equal('active');
    // Revoke: the agent, told by push, erases its keys and stops; the watching page shows it without a reload.
    await Promise.all([actor.waitForNavigation(), typeInLive(actor, '#confirm-revoke', 'laptop\n')]);
    await waitForText(watcher, '#device-status', 'revoked');
    expect(await agent.done).to.equal(3);
    await waitForText(watcher, '.facts', /Erased its keys and cache/);
    // Wipe of the revoked device: done already (it erased everything when revoked).
    await liveReady(actor);
    await Promise.all([actor.waitForNavigation(), typeInLive(actor, '#confirm-wipe', 'laptop\n')]);
    await waitForText(watcher, '#device-status', 'wiped');
    expect(watcher.url(), 'no reload: the same page, updated in place').to.equal(`${s.url}/console/devices/${deviceId}`);
    await checkPage(watcher, 'device-wiped');
    // Both actions are in the audit chain with the acting user.
    const log = JSON.parse((await lethe(['audit', 'log', '--device', deviceId, '--json'], { ...s.env, LETHE_ADMIN_TOKEN: await aliceToken() })).stdout) as {
      entries: { type: string; data: { actor?: string } }[];
    };
    expect(log.entries.find((e) => e.type === 'device.revoke')?.data.actor).to.equal('user:alice');
    expect(log.entries.find((e) => e.type === 'device.wipe')?.data.actor).to.equal('user:alice');
  });

  it('audit timeline with filters and the chain verified; administrators page adds a user with a TOTP secret', async () => {
    const page = await alicePage();
    await page.goto(`${s.url}/console/audit?device=${deviceId}&type=device.*`);
    expect(await page.$eval('#chain-status', (e) => e.textContent)).to.match(/verified: \d+ entries/);
    const types = await page.$$eval('#main tbody tr td:nth-child(3)', (tds) => tds.map((t) => t.textContent));
    expect(types).to.include.members(['device.revoke', 'device.wipe']);
    expect(types.every((t) => t!.startsWith('device.'))).to.equal(true);
    await checkPage(page, 'audit');
    await page.goto(`${s.url}/console/users`);
    await page.type('#u-name', 'carol');
    await page.select('#u-role', 'admin');
    await page.type('#u-pw', 'carol-console-passphrase');
    await Promise.all([page.waitForNavigation(), page.click('form[aria-label="Add an administrator"] button')]);
    expect(await page.$eval('#totp-secret', (e) => e.textContent)).to.match(/^[A-Z2-7]{32}$/);
    await checkPage(page, 'users');
    await page.goto(`${s.url}/console/account`);
    await checkPage(page, 'account');
    await Promise.all([page.waitForNavigation(), page.click('form[aria-label="Log out everywhere"] button')]);
    expect(new URL(page.url()).pathname).to.equal('/console/login');
    await page.goto(`${s.url}/console/devices`);
    expect(new URL(page.url()).pathname).to.equal('/console/login');
  });

  it('a session idle for 30 minutes, or 12 hours old, is over: the next page asks to sign in again', async () => {
    const db = await serverDb(s);
    try {
      for (const [column, value] of [
        ['seen_at', Date.now() - 31 * 60_000],
        ['expires_at', Date.now() - 1000],
      ] as const) {
        const page = await freshPage();
        await login(page, 'bob');
        await page.goto(`${s.url}/console/devices`);
        expect(new URL(page.url()).pathname).to.equal('/console/devices');
        await db.sql.run(`UPDATE sessions SET ${column} = ? WHERE user_name = 'bob'`, value);
        await page.goto(`${s.url}/console/devices`);
        expect(new URL(page.url()).pathname, column).to.equal('/console/login');
      }
    } finally {
      await db.close();
    }
  });

  /** An API token of alice's (a CLI login), made once. */
  let aliceTok: string | undefined;
  async function aliceToken(): Promise<string> {
    if (aliceTok) return aliceTok;
    const r = await lethe(['admin', 'login', 'alice', '--password-fd', '0', '--totp', await nextCode()], { ...s.env, LETHE_ADMIN_TOKEN: undefined }, PW.alice + '\n');
    expect(r.code, r.stderr).to.equal(0);
    aliceTok = /LETHE_ADMIN_TOKEN=(\S+)/.exec(r.stdout)![1];
    return aliceTok;
  }
  const serverKey = async () => (await import('node:fs')).readFileSync(`${s.dir}/tls/key.pem`);
  const serverCert = async () => (await import('node:fs')).readFileSync(`${s.dir}/tls/cert.pem`);
});
