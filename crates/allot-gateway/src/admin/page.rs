//! The admin listener's `/`: a status page with the live tables of `allot top`, drawn by
//! a few lines of script from `/status` and `/controllers` once a second. Everything is
//! in this one page: no external assets, nothing fetched but the admin API itself.

/// The page.
pub(crate) const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>allot gateway</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; }
  h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
  #summary { color: #555; }
  table { border-collapse: collapse; background: #fff; box-shadow: 0 1px 2px #0002; }
  th, td { padding: .3em .7em; text-align: right; border-bottom: 1px solid #eee; }
  th:first-child, td:first-child { text-align: left; }
  th { background: #f0f0f0; font-weight: 600; }
  td.bad { color: #b00; font-weight: 600; }
  svg.spark { vertical-align: middle; }
  #error { color: #b00; }
</style>
</head>
<body>
<h1>allot gateway</h1>
<div id="summary">loading…</div>
<div id="error"></div>
<h2>Classes</h2>
<table id="classes"><thead><tr>
  <th>class</th><th>arrivals/s</th><th>admitted/s</th><th>refused/s</th><th>queued</th>
  <th>in flight</th><th>delay p50 ms</th><th>delay p99 ms</th><th>service ms</th><th>arrivals</th>
</tr></thead><tbody></tbody></table>
<h2>Back ends</h2>
<table id="backends"><thead><tr>
  <th>back end</th><th>healthy</th><th>in flight</th><th>requests/s</th><th>failures/s</th><th>service ms</th>
</tr></thead><tbody></tbody></table>
<h2>Principals</h2>
<table id="principals"><thead><tr>
  <th>principal</th><th>guaranteed/s</th><th>demand/s</th><th>allocation/s</th><th>admitted/s</th><th>refused/s</th>
</tr></thead><tbody></tbody></table>
<h2>Controllers</h2>
<table id="controllers"><thead><tr>
  <th>controller</th><th>kind</th><th>signal</th><th>input</th><th>set point</th><th>outputs</th>
</tr></thead><tbody></tbody></table>
<script>
"use strict";
let last = null, lastAt = 0;
const history = {};
const fmt = (v, d = 1) => (v === null || v === undefined || !isFinite(v)) ? "–" : v.toFixed(d);
function quantileMs(h, q) {
  const n = h.counts.reduce((a, b) => a + b, 0);
  if (!n) return null;
  const rank = Math.max(1, Math.ceil(q * n));
  let seen = 0;
  for (let i = 0; i < h.counts.length; i++) {
    const c = h.counts[i];
    if (seen + c >= rank) {
      const lo = i === 0 ? 0 : h.bounds_s[i - 1];
      const hi = i < h.bounds_s.length ? h.bounds_s[i] : lo * 2;
      return (lo + (hi - lo) * (rank - seen) / c) * 1e3;
    }
    seen += c;
  }
  return null;
}
const meanMs = h => { const n = h.counts.reduce((a, b) => a + b, 0); return n ? h.sum_ns / n / 1e6 : null; };
function since(now, before) {
  if (!before) return null;
  return { counts: now.counts.map((c, i) => c - (before.counts[i] || 0)), sum_ns: now.sum_ns - before.sum_ns, bounds_s: now.bounds_s };
}
function spark(values) {
  const w = 80, h = 18, max = Math.max(1, ...values);
  const pts = values.map((v, i) => `${(i / Math.max(1, values.length - 1)) * w},${h - (v / max) * h}`).join(" ");
  return `<svg class="spark" width="${w}" height="${h}"><polyline fill="none" stroke="#36c" stroke-width="1.5" points="${pts}"/></svg>`;
}
function cell(v, cls = "") { return `<td${cls ? ` class="${cls}"` : ""}>${v}</td>`; }
function esc(s) { return String(s).replace(/[&<>"]/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c])); }
function fill(id, rows) { document.querySelector(`#${id} tbody`).innerHTML = rows.join(""); }
async function tick() {
  try {
    const [s, ctl] = await Promise.all([fetch("/status").then(r => r.json()), fetch("/controllers").then(r => r.json())]);
    const now = performance.now();
    const dt = last ? (now - lastAt) / 1000 : null;
    const prev = name => last && last.classes.find(c => c.name === name);
    const rate = (a, b) => (dt && b !== undefined) ? (a - b) / dt : null;
    document.getElementById("summary").textContent =
      `up ${Math.round(s.uptime_s)} s · ${s.running} of ${s.max_running} in service · ${s.connections} client connections`;
    fill("classes", s.classes.map(c => {
      const p = prev(c.name);
      const refused = k => k.refused_queue_full + k.refused_timeout + k.refused_rate + k.refused_quota + (k.refused_address || 0);
      const arr = rate(c.arrivals, p && p.arrivals);
      (history[c.name] = history[c.name] || []).push(arr || 0);
      if (history[c.name].length > 60) history[c.name].shift();
      const window = since(c.queue_delay, p && p.queue_delay) || c.queue_delay;
      const ref = rate(refused(c), p && refused(p));
      return `<tr data-class="${esc(c.name)}">` + cell(esc(c.name)) + cell(`${fmt(arr)} ${spark(history[c.name])}`)
        + cell(fmt(rate(c.admitted, p && p.admitted))) + cell(fmt(ref), ref > 0 ? "bad" : "")
        + cell(c.queued) + cell(c.in_flight) + cell(fmt(quantileMs(window, 0.5), 2)) + cell(fmt(quantileMs(window, 0.99), 2))
        + cell(fmt(meanMs(c.service_time), 2)) + cell(c.arrivals) + "</tr>";
    }));
    fill("backends", s.backends.map(b => {
      const p = last && last.backends.find(x => x.name === b.name);
      const fails = x => x.failures_connect + x.failures_timeout + x.failures_protocol + (x.failures_body_timeout || 0);
      const total = (b.addresses || []).length || b.healthy_addresses;
      return `<tr data-backend="${esc(b.name)}">` + cell(esc(b.name)) + cell(`${b.healthy_addresses} / ${total}`, b.healthy_addresses < total ? "bad" : "")
        + cell(b.in_flight) + cell(fmt(rate(b.requests, p && p.requests))) + cell(fmt(rate(fails(b), p && fails(p))))
        + cell(fmt(meanMs(b.service_time), 2)) + "</tr>";
    }));
    fill("principals", (s.principals || []).map(x => {
      const p = last && (last.principals || []).find(y => y.name === x.name);
      return `<tr data-principal="${esc(x.name)}">` + cell(esc(x.name)) + cell(fmt(x.mandatory)) + cell(fmt(x.demand)) + cell(fmt(x.allocation))
        + cell(fmt(rate(x.admitted, p && p.admitted))) + cell(fmt(rate(x.refused, p && p.refused))) + "</tr>";
    }));
    fill("controllers", ctl.map(r => `<tr data-controller="${esc(r.name)}">` + cell(esc(r.name)) + cell(esc(r.kind)) + cell(esc(r.signal))
      + cell(fmt(r.input, 2)) + cell(fmt(r.setpoint, 2)) + cell(esc(r.outputs.map(([k, v]) => `${k}=${fmt(v, 2)}`).join(" "))) + "</tr>"));
    document.getElementById("error").textContent = "";
    last = s; lastAt = now;
  } catch (e) {
    document.getElementById("error").textContent = `cannot read the admin API: ${e}`;
  }
}
tick();
setInterval(tick, 1000);
</script>
</body>
</html>
"##;
