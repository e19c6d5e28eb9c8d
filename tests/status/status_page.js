// Opens the gateway's /status page in Debian's headless Chromium (driven by playwright-core, no
// browser download), at a desktop and at a phone viewport, and prints as JSON what a person sees:
// readiness, the servers' rows, the decisions, the alarms (with their computed colour), whether
// the page reloaded itself, every request the page made, and the phone layout's overflow.
// Screenshots go to ARTIFACTS_DIR (status.png, status-phone.png).
//
//   node status_page.js URL [ARTIFACTS_DIR]

'use strict';

const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const url = process.argv[2];
const artifacts = process.argv[3] || process.env.ARTIFACTS_DIR || '.';
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';

/** What the page shows, read from its DOM as rendered. */
function extract() {
  const text = (el) => (el ? el.innerText.trim() : null);
  // Each row's cells by their column's heading.
  const rows = (id) => {
    const table = document.getElementById(id);
    if (!table) return [];
    const heads = Array.from(table.tHead.rows[0].cells).map((th) => th.innerText.trim());
    return Array.from(table.tBodies[0].rows).map((tr) => ({
      server: tr.dataset.server || null,
      health: (tr.querySelector('[data-health]') || {}).dataset?.health || null,
      cells: Object.fromEntries(Array.from(tr.cells).map((td, i) => [heads[i], td.innerText.trim()])),
    }));
  };
  const alarms = document.getElementById('alarms');
  const alarmStyle = alarms ? getComputedStyle(alarms) : null;
  const refresh = document.querySelector('meta[http-equiv="refresh"]');
  return {
    title: document.title,
    readiness: text(document.getElementById('readiness')),
    refresh: refresh ? refresh.getAttribute('content') : null,
    servers: rows('servers'),
    eventServers: rows('event-servers'),
    decisions: rows('decisions'),
    alarms: {
      text: text(alarms),
      color: alarmStyle ? alarmStyle.color : null,
      borderColor: alarmStyle ? alarmStyle.borderTopColor : null,
      isSection: alarms ? alarms.tagName === 'SECTION' : false,
    },
    generation: text(document.getElementById('generation')),
    configSha256: text(document.getElementById('config-sha256')),
    auditSeq: text(document.getElementById('audit-seq')),
    scripts: document.scripts.length,
    bodyText: document.body.innerText,
    html: document.documentElement.outerHTML,
  };
}

/** How far the page itself overflows the viewport sideways, and how the tables scroll. */
function overflow() {
  const doc = document.documentElement;
  return {
    viewport: window.innerWidth,
    pageScrollWidth: Math.max(doc.scrollWidth, document.body.scrollWidth),
    scrollers: Array.from(document.querySelectorAll('.scroll')).map((el) => ({
      clientWidth: el.clientWidth,
      scrollWidth: el.scrollWidth,
      overflowX: getComputedStyle(el).overflowX,
      right: el.getBoundingClientRect().right,
    })),
  };
}

async function main() {
  if (!url) throw new Error('usage: node status_page.js URL [ARTIFACTS_DIR]');
  fs.mkdirSync(artifacts, { recursive: true });
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    // Root in a container has no user namespace for Chromium's sandbox.
    args: ['--no-sandbox', '--disable-dev-shm-usage'],
  });
  const out = { url, requests: [], consoleErrors: [] };
  try {
    // Desktop.
    const desktop = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await desktop.newPage();
    page.on('request', (r) => out.requests.push(r.url()));
    page.on('console', (m) => m.type() === 'error' && out.consoleErrors.push(m.text()));
    const response = await page.goto(url, { waitUntil: 'load' });
    out.status = response.status();
    out.headers = response.headers();
    out.desktop = await page.evaluate(extract);
    await page.screenshot({ path: path.join(artifacts, 'status.png'), fullPage: true });
    // The page reloads itself (meta refresh): wait for the next load of the main frame.
    const started = Date.now();
    out.reloaded = await page
      .waitForEvent('load', { timeout: 12000 })
      .then(() => true)
      .catch(() => false);
    out.reloadAfterMs = Date.now() - started;
    await desktop.close();

    // Phone.
    const phone = await browser.newContext({
      viewport: { width: 390, height: 844 },
      deviceScaleFactor: 2,
      isMobile: true,
      hasTouch: true,
    });
    const p = await phone.newPage();
    p.on('request', (r) => out.requests.push(r.url()));
    await p.goto(url, { waitUntil: 'load' });
    out.phone = await p.evaluate(overflow);
    out.phoneAlarmsVisible = await p.evaluate(() => {
      const a = document.getElementById('alarms');
      const r = a.getBoundingClientRect();
      return r.top < window.innerHeight && r.width > 0;
    });
    await p.screenshot({ path: path.join(artifacts, 'status-phone.png'), fullPage: true });
    await phone.close();
  } finally {
    await browser.close();
  }
  out.screenshots = ['status.png', 'status-phone.png'].map((f) => path.join(artifacts, f));
  process.stdout.write(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
