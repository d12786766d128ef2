// Drives the status page in a real headless Chromium (Debian's, never a
// downloaded one) for tests/e2e/status.rs, which starts the host, reads
// what this prints (one JSON object a line) and publishes the orders.
//
//   node status.mjs URL HANDLERS...
//
// 1. Opens URL at 1280×760 and waits until a card is shown for every
//    named handler; prints {"event":"loaded", "charts": ...}.
// 2. Waits (60 s at most) until every named handler's rate chart shows
//    events — the test publishes once it has read "loaded" — then looks
//    a state key up through the page's form (STATUS_LOOKUP=handler/key);
//    prints {"event":"moved", ...}.
// 3. With STATUS_SCREENSHOT=FILE, waits STATUS_SCREENSHOT_AFTER_SECS more
//    (default 0) and saves a screenshot of the page there.
// With STATUS_TOKEN=T (a host with `admin_token`), instead: waits for the
// page to ask for the token, gives a wrong one, then T; waits for the
// cards; reloads the page and checks that it did not ask again (the token
// is kept for the tab); prints {"event":"token", ...}.
// Every line carries what the browser reported: console errors, uncaught
// page errors, failed requests and HTTP errors. Exit 0 unless the browser
// could not be driven (the test judges the rest).
import { chromium } from 'playwright-core';

const [url, ...handlers] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const problems = { console_errors: [], page_errors: [], failed_requests: [], http_errors: [] };
const say = (event, fields) => console.log(JSON.stringify({ event, ...fields, ...problems }));

// The charts as the page draws them: per handler, the rate path's `d` and
// the latest and peak events per second it shows.
const charts = (page) => page.evaluate(() => Object.fromEntries(
  Array.from(document.querySelectorAll('article.card')).map((card) => {
    const svg = card.querySelector('svg.chart.rate');
    return [card.dataset.handler, {
      d: svg?.querySelector('path.events')?.getAttribute('d') ?? null,
      latest: Number(svg?.dataset.latestRate ?? NaN),
      peak: Number(svg?.dataset.peakRate ?? NaN),
    }];
  })));

const cardsShown = (page) => page.waitForFunction(
  (names) => names.every((n) => document.querySelector(`article.card[data-handler="${n}"]`)),
  handlers, { timeout: 30_000 });

async function tokenFlow(page, token) {
  await page.waitForSelector('#login:not([hidden])', { timeout: 30_000 });
  const asked = await page.isVisible('#token');
  await page.fill('#token', token + '-wrong');
  await page.click('#login button[type=submit]');
  await page.waitForFunction(() => document.querySelector('#login-why').textContent.includes('refused'),
    null, { timeout: 10_000 });
  const refused = await page.$eval('#login-why', (e) => e.textContent);
  await page.fill('#token', token);
  await page.click('#login button[type=submit]');
  await cardsShown(page);
  const stored = await page.evaluate(() => sessionStorage.getItem('event-host.admin-token'));
  await page.reload({ waitUntil: 'load' });
  await cardsShown(page);
  const askedAgain = await page.isVisible('#login');
  say('token', { asked, refused, stored, asked_again: askedAgain });
}

// Orders flowing: see the header.
async function flow(page) {
  await page.waitForFunction(
    (names) => names.every((n) => document.querySelector(`article.card[data-handler="${n}"] h2`)?.textContent === n),
    handlers, { timeout: 30_000 });
  const shown = await page.$$eval('article.card h2', (hs) => hs.map((h) => h.textContent));
  say('loaded', { handlers: shown, charts: await charts(page), title: await page.title() });

  await page.waitForFunction(
    (names) => names.every((n) => Number(document.querySelector(
      `article.card[data-handler="${n}"] svg.chart.rate`)?.dataset.peakRate) > 0),
    handlers, { timeout: 60_000, polling: 250 });
  let lookup = null;
  if (process.env.STATUS_LOOKUP) {
    const [handler, ...key] = process.env.STATUS_LOOKUP.split('/');
    await page.selectOption('#lookup-handler', handler);
    await page.fill('#lookup-key', key.join('/'));
    await page.click('#lookup button[type=submit]');
    await page.waitForFunction(() => document.querySelector('#lookup-result').dataset.status, null, { timeout: 10_000 });
    lookup = await page.$eval('#lookup-result', (r) => ({ status: r.dataset.status, text: r.textContent }));
  }
  say('moved', { charts: await charts(page), lookup });

  if (process.env.STATUS_SCREENSHOT) {
    const after = Number(process.env.STATUS_SCREENSHOT_AFTER_SECS || 0);
    await page.waitForTimeout(after * 1000);
    await page.screenshot({ path: process.env.STATUS_SCREENSHOT, fullPage: true });
    say('screenshot', { path: process.env.STATUS_SCREENSHOT });
  }
}

const browser = await chromium.launch({
  executablePath,
  headless: true,
  // Root in a container: Chromium's sandbox needs user namespaces it may
  // not get. The page is the test's own.
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 760 } });
  page.on('console', (m) => { if (m.type() === 'error') problems.console_errors.push(m.text()); });
  page.on('pageerror', (e) => problems.page_errors.push(String(e)));
  page.on('requestfailed', (r) => problems.failed_requests.push(`${r.url()}: ${r.failure()?.errorText}`));
  page.on('response', (r) => { if (r.status() >= 400) problems.http_errors.push(`${r.status()} ${r.url()}`); });

  await page.goto(url, { waitUntil: 'load' });
  if (process.env.STATUS_TOKEN) {
    await tokenFlow(page, process.env.STATUS_TOKEN);
  } else {
    await flow(page);
  }
} catch (e) {
  say('failed', { error: String(e && e.stack || e) });
  process.exitCode = 1;
} finally {
  await browser.close();
}
