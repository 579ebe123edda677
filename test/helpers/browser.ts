// Drives Debian's chromium (puppeteer-core, no bundled browser) for the admin console's
// tests: pages that record their own errors, screenshots, axe checks and a check that
// every visible control can be reached with Tab.
//
// Functions passed to page.evaluate run in the browser, not in Node: they declare no
// named inner functions, because tsx (esbuild keepNames) wraps those in a __name()
// helper that exists only on the Node side.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import puppeteer, { type Browser, type BrowserContext, type Page } from 'puppeteer-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const AXE_SCRIPT = path.join(ROOT, 'node_modules', 'axe-core', 'axe.min.js');

/** Debian's package `chromium` (scripts/setup installs it). */
export const CHROMIUM = '/usr/bin/chromium';

/** Tests wait on progress, not on speed: a busy 2-core machine can take seconds per step. */
export const BROWSER_TIMEOUT_MS = 60_000;

export const VIEWPORT = { width: 1280, height: 900 };

/**
 * Starts a headless chromium that accepts the console's self-signed certificate.
 * Throws when chromium is not installed or does not start within BROWSER_TIMEOUT_MS.
 */
export async function launchBrowser(): Promise<Browser> {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`browser tests need '${CHROMIUM}', which is missing (hint: run scripts/setup as root, or 'apt-get install chromium')`);
  }
  const args = [
    // Test machines have no GPU: render in software from the start rather than probe for one.
    '--disable-gpu',
    // Also puppeteer's default; a container's small /dev/shm crashes renderers otherwise.
    '--disable-dev-shm-usage',
  ];
  // Chromium refuses to run as root with its sandbox on (CI containers run as root).
  if (process.getuid?.() === 0) args.push('--no-sandbox');
  try {
    return await puppeteer.launch({
      executablePath: CHROMIUM,
      headless: true,
      acceptInsecureCerts: true,
      timeout: BROWSER_TIMEOUT_MS,
      args,
    });
  } catch (err) {
    throw new Error(`failed to start '${CHROMIUM}'`, { cause: err });
  }
}

export interface TestPage {
  page: Page;
  /** Console errors and uncaught page errors, in order; a test asserts this stays empty. */
  errors: string[];
}

/**
 * Opens a page with a desktop viewport and generous timeouts that records its errors, in
 * the browser's default context or in one of its own (browser.createBrowserContext(): a
 * fresh profile with its own cookies).
 * Content-Security-Policy stays enforced, so a CSP violation shows up in `errors`:
 * axeViolations() injects axe through DevTools evaluation, which CSP does not block.
 */
export async function newPage(browser: Browser | BrowserContext): Promise<TestPage> {
  const page = await browser.newPage();
  const errors: string[] = [];
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    // "Failed to load resource" names its URL only in the location.
    const url = msg.location().url;
    errors.push(url ? `console: ${msg.text()} (${url})` : `console: ${msg.text()}`);
  });
  page.on('pageerror', (err) => errors.push(`page error: ${err instanceof Error ? err.message : String(err)}`));
  page.setDefaultTimeout(BROWSER_TIMEOUT_MS);
  await page.setViewport(VIEWPORT);
  return { page, errors };
}

/**
 * Saves a full-page PNG as test-output/screenshots/NAME.png, or under $LETHE_SCREENSHOTS;
 * returns its path.
 */
export async function screenshot(page: Page, name: string): Promise<string> {
  const dir = process.env.LETHE_SCREENSHOTS || path.join(ROOT, 'test-output', 'screenshots');
  fs.mkdirSync(dir, { recursive: true });
  // Test titles make fine names once path separators and spaces are gone.
  const file = path.join(dir, `${name.replace(/[^\w.-]+/g, '-')}.png`);
  fs.writeFileSync(file, await page.screenshot({ fullPage: true }));
  return file;
}

/** How many offending elements a violation names before it says "and N more". */
const AXE_NODES_SHOWN = 5;

/**
 * Runs axe-core's WCAG 2 A and AA rules on the page; returns one line per violation,
 * `id: help (selector, …)`, or [] when there is none.
 */
export async function axeViolations(page: Page): Promise<string[]> {
  // page.evaluate of a string is DevTools evaluation, allowed under a strict CSP where
  // an injected <script> (page.addScriptTag) would be refused.
  if (!(await page.evaluate(() => 'axe' in window))) {
    await page.evaluate(fs.readFileSync(AXE_SCRIPT, 'utf8'));
  }
  const violations = await page.evaluate(async () => {
    const axe = (window as unknown as { axe: typeof import('axe-core') }).axe;
    const results = await axe.run(document, { runOnly: ['wcag2a', 'wcag2aa'] });
    // A target is a selector per frame (and shadow root) level.
    return results.violations.map((v) => ({ id: v.id, help: v.help, targets: v.nodes.map((n) => n.target.flat().join(' ')) }));
  });
  return violations.map(({ id, help, targets }) => {
    const more = targets.length > AXE_NODES_SHOWN ? `, and ${targets.length - AXE_NODES_SHOWN} more` : '';
    return `${id}: ${help} (${targets.slice(0, AXE_NODES_SHOWN).join(', ')}${more})`;
  });
}

/**
 * Presses Tab from the top of the page, five more times than there are controls, and
 * returns the visible, enabled controls (a[href], button, input, select, textarea and
 * [tabindex >= 0]) that never got focus, as `tag "name"`; [] when all were reached.
 * A radio button counts as reached when any of its group was, as Tab visits one per group.
 */
export async function unreachableByKeyboard(page: Page): Promise<string[]> {
  await page.bringToFront();
  // Keys move focus only in a page that has it; with several pages open (and the browser
  // slow to switch on a busy machine) the page is told it has focus whichever is in front.
  const cdp = await page.createCDPSession();
  await cdp.send('Emulation.setFocusEmulationEnabled', { enabled: true });
  const state = await page.evaluateHandle(() => {
    const controls = [
      ...document.querySelectorAll<HTMLElement>('a[href], button, input:not([type="hidden"]), select, textarea, [tabindex]'),
    ].filter(
      (el) =>
        (el.matches('a[href], button, input, select, textarea') || el.tabIndex >= 0) &&
        !el.matches(':disabled') &&
        !el.closest('[inert]') &&
        el.checkVisibility({ visibilityProperty: true }),
    );
    const focused = new Set<Element>();
    // Named by role and label while attached, so that a control a live update replaced
    // while the keys were pressed (console.js swaps parts nobody works in) counts as its
    // replacement: once detached, an input's label is no longer found. Held in an array:
    // a function given a name would need __name in the page.
    const named = new Map<Element, string>();
    const nameOf = [
      (el: Element) => {
        const labelledBy = el.getAttribute('aria-labelledby');
        const label =
          el.getAttribute('aria-label') ||
          (labelledBy && document.getElementById(labelledBy)?.textContent) ||
          (el as HTMLInputElement).labels?.[0]?.textContent ||
          el.textContent ||
          el.getAttribute('title') ||
          el.getAttribute('name') ||
          el.id;
        const name = (label || '').replace(/\s+/g, ' ').trim().slice(0, 60);
        const type = el instanceof HTMLInputElement ? `[type=${el.type}]` : '';
        return `${el.tagName.toLowerCase()}${type} "${name}"`;
      },
    ];
    for (const el of controls) named.set(el, nameOf[0](el));
    // An AbortController removes the listener later: a named listener would need __name.
    const listening = new AbortController();
    document.addEventListener(
      'focusin',
      (e) => {
        focused.add(e.target as Element);
        named.set(e.target as Element, nameOf[0](e.target as Element));
      },
      { capture: true, signal: listening.signal },
    );
    // Focus an invisible first element, so the next Tab goes to the page's first control
    // wherever focus was before.
    const start = document.createElement('span');
    start.tabIndex = -1;
    document.body.prepend(start);
    start.focus();
    focused.clear();
    return { controls, focused, named, listening, start };
  });
  try {
    const presses = (await state.evaluate((s) => s.controls.length)) + 5;
    for (let i = 0; i < presses; i++) await page.keyboard.press('Tab');
    return await state.evaluate((s) => {
      const names = s.controls.map((el) => s.named.get(el)!);
      const reached = new Set([...s.focused].map((el) => s.named.get(el)!));
      const radios = [...s.focused].filter((el) => el instanceof HTMLInputElement && el.type === 'radio') as HTMLInputElement[];
      return s.controls
        .map((el, i) => ({ el, name: names[i] }))
        .filter(
          ({ el, name }) =>
            !s.focused.has(el) &&
            !reached.has(name) &&
            !(el instanceof HTMLInputElement && el.type === 'radio' && el.name && radios.some((r) => r.name === el.name && r.form === el.form)),
        )
        .map(({ name }) => name);
    });
  } finally {
    await state
      .evaluate((s) => {
        s.listening.abort();
        s.start.remove();
      })
      .catch(() => {}); // the page may have navigated or closed; nothing is left to clean
    await state.dispose().catch(() => {});
    await cdp.detach().catch(() => {});
  }
}

/**
 * Waits until the first element matching SELECTOR has text containing TEXT (or matching
 * the RegExp), whitespace runs counting as one space. Throws after timeoutMs with the
 * text last seen.
 */
export async function waitForText(page: Page, selector: string, text: string | RegExp, timeoutMs = BROWSER_TIMEOUT_MS): Promise<void> {
  // A RegExp does not survive the trip to the browser; its source and flags do.
  const pattern = typeof text === 'string' ? { text } : { source: text.source, flags: text.flags };
  try {
    await page.waitForFunction(
      (sel: string, p: { text?: string; source?: string; flags?: string }) => {
        const shown = (document.querySelector(sel)?.textContent ?? '').replace(/\s+/g, ' ').trim();
        return p.text !== undefined ? shown.includes(p.text) : new RegExp(p.source!, p.flags).test(shown);
      },
      { timeout: timeoutMs, polling: 100 },
      selector,
      pattern,
    );
  } catch (err) {
    const shown = await page
      .$eval(selector, (el) => JSON.stringify((el.textContent ?? '').replace(/\s+/g, ' ').trim()))
      .catch(() => 'no such element');
    throw new Error(`'${selector}' did not show ${typeof text === 'string' ? `'${text}'` : text} within ${timeoutMs} ms (it shows ${shown})`, {
      cause: err,
    });
  }
}

/**
 * Types TEXT into the field SELECTOR of a live part (server/console/assets/console.js):
 * finds and focuses it in one step in the page, then types. console.js leaves a part
 * with focus in it alone. page.type() finds the element and focuses it in two steps,
 * and a live update between them could replace the field: the keys then went to a
 * detached element, and the form was never submitted.
 */
export async function typeInLive(page: Page, selector: string, text: string): Promise<void> {
  await page.$eval(selector, (e) => (e as HTMLElement).focus());
  await page.keyboard.type(text);
}

/**
 * Clicks the button SELECTOR of a live part, found and clicked in one step in the page,
 * as typeInLive() types: page.click() finds it first and clicks after, and a live update
 * between them could replace it.
 */
export async function clickLive(page: Page, selector: string): Promise<void> {
  await page.$eval(selector, (e) => (e as HTMLElement).click());
}
