// The dashboard in a real browser: Debian's Chromium driven by playwright-core.
// Run by producer/tests/dashboard_browser.rs, which starts the AWS emulator, the
// dashboard and an agent poller running JOB_ID (a job that prints for a while), and
// prepares XSS_JOB_ID (a failed job whose label, reason and logs are hostile markup).
//
// Environment: DASH_URL, JOB_ID, XSS_JOB_ID; SHOTS (a directory for screenshots, optional);
// CHROMIUM (default /usr/bin/chromium).
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const { DASH_URL, JOB_ID, XSS_JOB_ID, SHOTS } = process.env;
for (const [k, v] of Object.entries({ DASH_URL, JOB_ID, XSS_JOB_ID })) {
  if (!v) throw new Error(`${k} is not set`);
}
const started = Date.now();
const step = (what) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s] ${what}`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  // Playwright gives every launch a fresh, empty profile directory.
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
  timeout: 30000,
});
let passed = 0;
const check = (name) => { passed += 1; step(`ok ${name}`); };
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(20000);
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(m.text()); });
  const shot = async (name, fullPage = false) => {
    if (!SHOTS) return;
    mkdirSync(SHOTS, { recursive: true });
    await page.evaluate(() => window.scrollTo(0, 0));
    await page.screenshot({ path: join(SHOTS, name), fullPage });
  };

  // 1. The list shows the submitted job and updates itself when the agent starts it.
  await page.goto(`${DASH_URL}/`);
  const row = page.locator(`tr[data-job="${JOB_ID}"]`);
  await row.waitFor();
  check('the list shows the submitted job');
  await row.locator('.state', { hasText: 'RUNNING' }).waitFor();
  check('the list updates live (RUNNING)');
  const filtered = await page.evaluate(async () => {
    const r = await fetch('/fragments/jobs?label=suite%3Dbrowser');
    return r.text();
  });
  assert.ok(filtered.includes(JOB_ID) && !filtered.includes(XSS_JOB_ID), filtered);
  check('the label filter');
  await shot('dashboard-jobs.png');

  // 2. A job's hostile text is shown as text, never run or parsed as markup.
  await page.goto(`${DASH_URL}/jobs/${XSS_JOB_ID}`);
  const xssPane = page.locator('#log-stdout');
  await page.waitForFunction(() => document.querySelector('#log-stdout').textContent.includes('onerror'));
  const xssText = await xssPane.textContent();
  assert.ok(xssText.includes('<img src=x onerror="window.__xss=1">'), xssText);
  assert.ok(xssText.includes('</pre><script>window.__xss=2</script>'), xssText);
  await page.locator('#summary dd', { hasText: '<b>bold</b> <img src=x onerror="window.__xss=3">' }).first().waitFor();
  assert.equal(await page.locator('main img, main script, main b').count(), 0);
  assert.equal(await page.evaluate(() => window.__xss), undefined);
  check('hostile labels, reasons and log lines are escaped');

  // 3. The job page: log lines appear as the agent uploads them; the chart fills in.
  await page.goto(`${DASH_URL}/jobs/${JOB_ID}`);
  const turns = async () =>
    ((await page.locator('#log-stdout').textContent()).match(/turn \d+/g) || []).length;
  const grows = async (from) => {
    const deadline = Date.now() + 15000;
    for (;;) {
      const n = await turns();
      if (n > from) return n;
      if (Date.now() > deadline) throw new Error(`no new log lines after ${from} turns`);
      await page.waitForTimeout(200);
    }
  };
  const first = await grows(0);
  const second = await grows(first);
  const third = await grows(second);
  step(`turn lines seen: ${first} → ${second} → ${third}`);
  check('log lines arrive while the page is open');
  await page.locator('svg.chart path.line').first().waitFor();
  await page.waitForFunction(() => {
    const v = document.querySelector('svg.chart .p0 .value');
    return v && Number(v.textContent) > 0;
  });
  check('the chart shows turns');
  await page.locator('[data-tab="events"]').click();
  await page.waitForFunction(() => document.querySelector('#log-events').textContent.includes('"type"'));
  assert.equal(await page.locator('#log-stdout').isHidden(), true);
  await page.locator('[data-tab="stdout"]').click();
  check('the events tab');
  await shot('dashboard-job.png', true);

  // 4. Cancel from the page: the agent stops the job at its next heartbeat.
  page.once('dialog', (d) => d.accept());
  await page.locator('#cancel').click();
  await page.waitForURL(/cancel=flagged/).catch(async (e) => {
    throw new Error(`no redirect after cancel: at ${page.url()}: ${await page.locator('main').textContent()}: ${e}`);
  });
  await page.locator('.notice', { hasText: 'Cancel requested' }).waitFor();
  check('cancel is accepted');
  await page.locator('#summary .head .state', { hasText: 'CANCELLED' }).waitFor();
  await page.locator('#conn[data-state="done"]').waitFor();
  check('the job ends CANCELLED and the stream closes');

  // 5. Failures: the failed job with its reason, the queues' depths.
  await page.goto(`${DASH_URL}/failures`);
  await page.locator(`#waiting tr[data-job="${XSS_JOB_ID}"]`).waitFor();
  await page.locator('[data-queue="dlq"]').waitFor();
  check('the failures page');
  await shot('dashboard-failures.png');

  assert.deepEqual(pageErrors, [], 'no script errors on any page');
  check('no script errors');
  console.log(`${passed} passed, 0 failed`);
} finally {
  await browser.close();
}
