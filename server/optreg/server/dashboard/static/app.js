// optreg dashboard: sessions list, live charts over server-sent events (id = step), alerts.
// No build step; uPlot is vendored (static/vendor). State is exposed as window.optregDash for tests.
"use strict";

const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
                 "#7f7f7f", "#bcbd22", "#17becf"];
const TOKEN_KEY = "optreg-token";
const $ = (id) => document.getElementById(id);

const dash = window.optregDash = {
  sessionId: null, es: null, steps: [], byStep: new Set(), alerts: [], alertSeqs: new Set(),
  charts: {}, series: {}, latencies: [], connects: 0, pendingDraw: [],
};

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function api(path) {
  const headers = token() ? { Authorization: "Bearer " + token() } : {};
  const r = await fetch(path, { headers, cache: "no-store" });
  if (r.status === 401) { showLogin(await r.text()); throw new Error("unauthorized"); }
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}

function showLogin(message) {
  $("login").hidden = false;
  $("layout").hidden = true;
  $("login-error").textContent = token() ? message : "";
  dash.unauthorized = true;
  closeStream();
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("login").hidden = true;
  $("layout").hidden = false;
  dash.unauthorized = false;
  refreshSessions();
});
$("logout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); location.reload(); });

// ---- sessions list -------------------------------------------------------------------------
let searchTimer = null;
$("search").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(refreshSessions, 150); });

async function refreshSessions() {
  let data;
  try { data = await api("api/sessions?q=" + encodeURIComponent($("search").value)); } catch (e) { return; }
  $("logout").hidden = !data.auth;
  const ul = $("sessions");
  ul.replaceChildren();
  for (const s of data.sessions) {
    const li = document.createElement("li");
    li.dataset.id = s.session_id;
    li.className = s.session_id === dash.sessionId ? "active" : "";
    li.textContent = s.session_id;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${s.optimizer} · step ${s.step}`;
    if (s.alerts) {
      const b = document.createElement("span");
      b.className = "badge";
      b.textContent = ` · ${s.alerts} alert${s.alerts > 1 ? "s" : ""}`;
      meta.appendChild(b);
    }
    li.appendChild(meta);
    li.addEventListener("click", () => openSession(s.session_id));
    ul.appendChild(li);
  }
  $("no-sessions").hidden = data.sessions.length > 0;
  dash.sessionList = data.sessions.map((s) => s.session_id);
}

// ---- one session -----------------------------------------------------------------------------
function closeStream() { if (dash.es) { dash.es.close(); dash.es = null; } }

function openSession(id) {
  closeStream();
  for (const c of Object.values(dash.charts)) c.destroy();
  Object.assign(dash, { sessionId: id, steps: [], byStep: new Set(), alerts: [], alertSeqs: new Set(),
                        charts: {}, series: {}, latencies: [], pendingDraw: [] });
  location.hash = "session=" + encodeURIComponent(id);
  $("empty").hidden = true;
  $("session").hidden = false;
  $("title").textContent = id;
  $("alerts").replaceChildren();
  $("alert-count").textContent = "(none)";
  for (const li of $("sessions").children) li.className = li.dataset.id === id ? "active" : "";
  // EventSource cannot send headers: the token goes in the URL (the server keeps no access log).
  const q = token() ? "?token=" + encodeURIComponent(token()) : "";
  const es = dash.es = new EventSource("api/sessions/" + encodeURIComponent(id) + "/events" + q);
  es.onopen = () => { dash.connects += 1; $("status").textContent = "live"; };
  es.onerror = () => {
    $("status").textContent = "reconnecting…";
    // EventSource retries a broken stream by itself, but gives up on an error answer (a session with
    // no step yet is 404): try again from scratch while this session stays selected.
    if (es.readyState === EventSource.CLOSED) {
      setTimeout(() => { if (dash.es === es && !dash.unauthorized) openSession(id); }, 1000);
    }
  };
  es.addEventListener("step", (e) => onStep(JSON.parse(e.data)));
  es.addEventListener("alert", (e) => onAlert(JSON.parse(e.data)));
  es.addEventListener("deleted", () => { $("status").textContent = "session deleted"; closeStream(); });
}

// series families: key -> {label: (name) => text, value: (rec, name) => number|null, names: Set}
const FAMILIES = {
  metrics: { log: false, names: (rec) => Object.keys(rec.metrics), value: (rec, n) => rec.metrics[n] },
  ratio: { log: true, names: (rec) => Object.keys(rec.tensors), value: (rec, n) => rec.tensors[n] && rec.tensors[n].update_ratio,
           band: [1e-4, 1e-3, 1e-2] },
  grad: { log: true, names: (rec) => Object.keys(rec.tensors), value: (rec, n) => rec.tensors[n] && rec.tensors[n].grad_norm },
  // effective lr is measured every 10th step (docs/telemetry.md): join the points
  elr: { log: true, spanGaps: true, names: (rec) => Object.keys(rec.tensors).filter((n) => rec.tensors[n].effective_lr.length),
         value: (rec, n) => (rec.tensors[n] && rec.tensors[n].effective_lr.length) ? rec.tensors[n].effective_lr[1] : null },
};

// tensors in natural order (W1, b1, W2, ... W10), whatever order the step carried them in
const byName = (a, b) => a.localeCompare(b, undefined, { numeric: true });

function onStep(rec) {
  if (dash.byStep.has(rec.step)) return;  // a resent step (should not happen; Last-Event-ID resumes after it)
  dash.byStep.add(rec.step);
  dash.steps.push(rec.step);
  for (const [key, fam] of Object.entries(FAMILIES)) {
    const s = dash.series[key] || (dash.series[key] = { names: [], cols: {} });
    for (const n of fam.names(rec).sort(byName)) {
      if (!(n in s.cols)) { s.names.push(n); s.cols[n] = new Array(dash.steps.length - 1).fill(null); s.rebuild = true; }
    }
    for (const n of s.names) {
      let v = fam.value(rec, n);
      if (v === undefined || v === null || (fam.log && !(v > 0))) v = null;
      s.cols[n].push(v);
    }
  }
  dash.pendingDraw.push(rec);
  $("summary").textContent = `step ${rec.step} · ` + Object.entries(rec.hp).map(([k, v]) => `${k}=${+v.toPrecision(4)}`).join(" ");
  if (!dash.drawScheduled) { dash.drawScheduled = true; requestAnimationFrame(draw); }
}

function draw() {
  dash.drawScheduled = false;
  for (const [key, fam] of Object.entries(FAMILIES)) {
    const s = dash.series[key];
    if (!s || !s.names.length) continue;  // e.g. no effective lr for a non-adaptive optimizer
    const data = [dash.steps, ...s.names.map((n) => s.cols[n])];
    if (fam.band) for (const b of fam.band) data.push(dash.steps.map(() => b));
    if (!dash.charts[key] || s.rebuild) {
      if (dash.charts[key]) dash.charts[key].destroy();
      s.rebuild = false;
      dash.charts[key] = makeChart(key, fam, s.names, data);
    } else {
      dash.charts[key].setData(data);
    }
  }
  const now = Date.now() / 1000;
  for (const rec of dash.pendingDraw) dash.latencies.push([rec.step, now - rec.t]);
  if (dash.latencies.length > 5000) dash.latencies.splice(0, dash.latencies.length - 5000);
  dash.pendingDraw = [];
}

function makeChart(key, fam, names, data) {
  const el = $("chart-" + key);
  el.replaceChildren();
  const series = [{ label: "step" }];
  names.forEach((n, i) => series.push({ label: n, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: !!fam.spanGaps }));
  if (fam.band) for (const b of fam.band) series.push({ label: b.toExponential(0), stroke: b === 1e-3 ? "#2a2" : "#aaa", dash: [4, 4], width: 1, points: { show: false } });
  const width = Math.max(320, el.clientWidth || 520);
  return new uPlot({
    width, height: 240, series,
    scales: { x: { time: false }, y: fam.log ? { distr: 3 } : {} },
    axes: [{ label: "step" }, fam.log
      ? { size: 70, values: (u, vals) => vals.map((v) => (v == null ? "" : v.toExponential(0))) }
      : { size: 70 }],
    legend: { live: true },
  }, data, el);
}

function onAlert(a) {
  if (dash.alertSeqs.has(a.seq)) return;  // alerts are resent on reconnect; keep each once
  dash.alertSeqs.add(a.seq);
  dash.alerts.push(a);
  const li = document.createElement("li");
  li.className = a.kind;
  li.textContent = a.kind === "refused" ? a.message : `step ${a.step} · ${a.kind}: ${a.message}`;
  $("alerts").prepend(li);
  $("alert-count").textContent = `(${dash.alerts.length})`;
}

window.addEventListener("resize", () => {
  for (const [key, c] of Object.entries(dash.charts)) c.setSize({ width: Math.max(320, $("chart-" + key).clientWidth), height: 240 });
});

// ---- start -----------------------------------------------------------------------------------
(async function start() {
  await refreshSessions();
  setInterval(() => { if (!dash.unauthorized) refreshSessions(); }, 2000);
  const m = /session=([^&]+)/.exec(location.hash);
  if (m && !dash.unauthorized) openSession(decodeURIComponent(m[1]));
})();
