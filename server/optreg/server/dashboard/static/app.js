// optreg dashboard: a landing page of sessions, live charts of one session or several overlaid, over
// server-sent events (id = step), and alerts. No build step; uPlot is vendored (static/vendor).
// State is exposed as window.optregDash for tests: steps/alerts/connects are the first selected session's.
"use strict";

const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
                 "#7f7f7f", "#bcbd22", "#17becf"];
const TOKEN_KEY = "optreg-token";
const LIVE_SECONDS = 10;  // a session that stepped this recently is "training"
const $ = (id) => document.getElementById(id);

const dash = window.optregDash = {
  selected: [], runs: {}, sessionId: null, steps: [], alerts: [], charts: {}, latencies: [], connects: 0,
  pendingDraw: [], sessionList: [], smoothing: 0.6, lossLog: true,
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
  closeStreams();
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
$("home").addEventListener("click", (e) => { e.preventDefault(); select([]); });

// ---- sessions: the list, and the landing page's table ----------------------------------------
let searchTimer = null;
$("search").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(refreshSessions, 150); });

function ago(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}

function stateOf(s) { return s.age < LIVE_SECONDS ? "training" : `idle, last step ${ago(s.age)}`; }

function alertText(s) { return s.alerts ? `${s.alerts} alert${s.alerts > 1 ? "s" : ""}` : "no alerts"; }

const fmt = (v) => (v === null || v === undefined ? "–" : +v.toPrecision(3));

async function refreshSessions() {
  let data;
  try { data = await api("api/sessions?q=" + encodeURIComponent($("search").value)); } catch (e) { return; }
  $("logout").hidden = !data.auth;
  const ul = $("sessions");
  ul.replaceChildren();
  const tbody = $("overview").tBodies[0];
  tbody.replaceChildren();
  for (const s of data.sessions) {
    const id = s.session_id;
    const li = document.createElement("li");
    li.dataset.id = id;
    li.className = dash.selected.includes(id) ? "active" : "";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = dash.selected.includes(id);
    box.title = "overlay with the other ticked sessions";
    box.setAttribute("aria-label", "compare " + id);
    box.addEventListener("click", (e) => {
      e.stopPropagation();
      select(box.checked ? [...dash.selected, id] : dash.selected.filter((x) => x !== id));
    });
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = id;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${s.optimizer} · step ${s.step} · ${s.age < LIVE_SECONDS ? "training" : "idle"}`;
    if (s.alerts) {
      const b = document.createElement("span");
      b.className = "badge";
      b.textContent = " · " + alertText(s);
      meta.appendChild(b);
    }
    li.append(box, name, meta);
    li.addEventListener("click", () => select([id]));
    ul.appendChild(li);

    const tr = document.createElement("tr");
    tr.dataset.id = id;
    for (const [text, cls] of [[id, "name"], [s.optimizer, ""], [s.step, ""], [fmt(s.loss), ""],
                               [stateOf(s), s.age < LIVE_SECONDS ? "live" : ""],
                               [alertText(s), s.alerts ? "badge" : "ok"]]) {
      const td = document.createElement("td");
      td.textContent = text;
      td.className = cls;
      tr.appendChild(td);
    }
    tr.addEventListener("click", () => select([id]));
    tbody.appendChild(tr);
  }
  $("no-sessions").hidden = data.sessions.length > 0;
  $("landing-empty").hidden = data.sessions.length > 0;
  $("overview").hidden = data.sessions.length === 0;
  dash.sessionList = data.sessions.map((s) => s.session_id);
  dash.optimizers = Object.fromEntries(data.sessions.map((s) => [s.session_id, s.optimizer]));
  explainElr();
}

// ---- the selection: one session, several overlaid, or none (the landing page) ----------------
function closeStreams() { for (const run of Object.values(dash.runs)) closeRun(run); }
function closeRun(run) { if (run.es) { run.es.close(); run.es = null; } }

function select(ids) {
  ids = [...new Set(ids)];
  for (const [id, run] of Object.entries(dash.runs)) if (!ids.includes(id)) { closeRun(run); delete dash.runs[id]; }
  for (const c of Object.values(dash.charts)) c.destroy();
  dash.charts = {};
  dash.selected = ids;
  for (const id of ids) if (!dash.runs[id]) openRun(id);
  const first = dash.runs[ids[0]];
  dash.sessionId = ids[0] || null;
  dash.steps = first ? first.steps : [];
  history.replaceState(null, "", ids.length ? "#session=" + ids.map(encodeURIComponent).join(",") : "#");
  $("landing").hidden = ids.length > 0;
  $("session").hidden = ids.length === 0;
  $("title").textContent = ids.length > 1 ? `comparing ${ids.length} sessions: ${ids.join(", ")}` : (ids[0] || "");
  for (const li of $("sessions").children) {
    li.className = ids.includes(li.dataset.id) ? "active" : "";
    li.querySelector("input").checked = ids.includes(li.dataset.id);
  }
  showAlerts();
  showSummary();
  explainElr();
  if (!ids.length) $("status").textContent = "";
  scheduleDraw();
}

function openRun(id) {
  const run = dash.runs[id] = { id, es: null, steps: [], byStep: new Set(), recs: [], alerts: [], alertSeqs: new Set(),
                                hp: {}, connects: 0 };
  // EventSource cannot send headers: the token goes in the URL (the server keeps no access log).
  const q = token() ? "?token=" + encodeURIComponent(token()) : "";
  const es = run.es = new EventSource("api/sessions/" + encodeURIComponent(id) + "/events" + q);
  es.onopen = () => { run.connects += 1; if (id === dash.sessionId) dash.connects += 1; $("status").textContent = "live"; };
  es.onerror = () => {
    $("status").textContent = "reconnecting…";
    // EventSource retries a broken stream by itself, but gives up on an error answer (a session with
    // no step yet is 404): try again from scratch while this session stays selected.
    if (es.readyState === EventSource.CLOSED) {
      setTimeout(() => {
        if (run.es === es && dash.runs[id] === run && !dash.unauthorized) { delete dash.runs[id]; select(dash.selected); }
      }, 1000);
    }
  };
  es.addEventListener("step", (e) => onStep(run, JSON.parse(e.data)));
  es.addEventListener("alert", (e) => onAlert(run, JSON.parse(e.data)));
  es.addEventListener("deleted", () => { $("status").textContent = `session ${id} deleted`; closeRun(run); });
}

// ---- figures -----------------------------------------------------------------------------------
// per tensor, and for the whole model (the series of a session when several are overlaid)
function sumSq(rec, key) { let s = 0; for (const t of Object.values(rec.tensors)) s += (t[key] || 0) ** 2; return s; }
function median(xs) { xs = xs.slice().sort((a, b) => a - b); const m = xs.length >> 1; return xs.length % 2 ? xs[m] : (xs[m - 1] + xs[m]) / 2; }

const FAMILIES = {
  ratio: { value: (rec, n) => rec.tensors[n] && rec.tensors[n].update_ratio,
           model: (rec) => { const p = sumSq(rec, "param_norm"); return p > 0 ? Math.sqrt(sumSq(rec, "update_norm") / p) : null; },
           band: [1e-4, 1e-3, 1e-2] },
  grad: { value: (rec, n) => rec.tensors[n] && rec.tensors[n].grad_norm, model: (rec) => Math.sqrt(sumSq(rec, "grad_norm")) },
  // effective lr is measured at step 1 and every 10th step (docs/telemetry.md): the lines join the points
  elr: { spanGaps: true,
         value: (rec, n) => (rec.tensors[n] && rec.tensors[n].effective_lr.length) ? rec.tensors[n].effective_lr[1] : null,
         model: (rec) => {
           const xs = Object.values(rec.tensors).filter((t) => t.effective_lr.length).map((t) => t.effective_lr[1]);
           return xs.length ? median(xs) : null;
         } },
};

// tensors in natural order (W1, b1, W2, ... W10), whatever order the step carried them in
const byName = (a, b) => a.localeCompare(b, undefined, { numeric: true });

function onStep(run, rec) {
  if (run.byStep.has(rec.step)) return;  // a resent step (should not happen; Last-Event-ID resumes after it)
  run.byStep.add(rec.step);
  run.steps.push(rec.step);
  run.recs.push(rec);
  run.hp = rec.hp;
  showSummary();
  dash.pendingDraw.push(rec);
  scheduleDraw();
}

// each selected session's last step and hyperparameters
function showSummary() {
  const several = dash.selected.length > 1;
  $("summary").textContent = dash.selected.map((id) => dash.runs[id]).filter((r) => r && r.steps.length).map((r) =>
    (several ? r.id + ": " : "") + `step ${r.steps[r.steps.length - 1]} · ` +
    Object.entries(r.hp).map(([k, v]) => `${k}=${+v.toPrecision(4)}`).join(" ")).join("; ");
}

function scheduleDraw() { if (!dash.drawScheduled) { dash.drawScheduled = true; requestAnimationFrame(draw); } }

// TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0
function smooth(values, weight) {
  let last = 0, n = 0;
  return values.map((v) => {
    if (v === null || !Number.isFinite(v)) return null;
    n += 1;
    last = last * weight + (1 - weight) * v;
    return last / (1 - weight ** n);
  });
}

const positive = (v) => (v > 0 ? v : null);

// one chart's series: [{label, values aligned with the run's steps, style}], per run
function seriesOf(key, run, several) {
  const out = [];
  const color = (i) => PALETTE[i % PALETTE.length];
  if (key === "metrics") {
    const names = new Set();
    for (const r of run.recs) for (const n of Object.keys(r.metrics)) names.add(n);
    let shown = [...names].sort((a, b) => (a === "loss" ? -1 : b === "loss" ? 1 : a.localeCompare(b)));
    if (several) shown = shown.slice(0, 1);  // compare the loss (or the first scalar)
    shown.forEach((n, i) => {
      let raw = run.recs.map((r) => (n in r.metrics ? r.metrics[n] : null));
      if (dash.lossLog) raw = raw.map(positive);
      const label = several ? run.id : n;
      const c = several ? color(dash.selected.indexOf(run.id)) : color(i);
      if (dash.smoothing > 0 && several) {  // overlaid: the averages alone (each step's line would hide them)
        out.push({ label, values: smooth(raw, dash.smoothing), stroke: c, width: 2 });
      } else if (dash.smoothing > 0) {
        out.push({ label: label + " (each step)", values: raw, stroke: c + "55", width: 1 });
        out.push({ label, values: smooth(raw, dash.smoothing), stroke: c, width: 2 });
      } else {
        out.push({ label, values: raw, stroke: c, width: 1.5 });
      }
    });
    return out;
  }
  const fam = FAMILIES[key];
  if (several) {
    out.push({ label: run.id, values: run.recs.map((r) => positive(fam.model(r))),
               stroke: color(dash.selected.indexOf(run.id)), width: 1.5 });
    return out;
  }
  const names = new Set();
  for (const r of run.recs) for (const n of Object.keys(r.tensors)) names.add(n);
  [...names].sort(byName).forEach((n, i) => {
    const values = run.recs.map((r) => positive(fam.value(r, n)));
    if (values.some((v) => v !== null)) out.push({ label: n, values, stroke: color(i), width: 1.5 });
  });
  return out;
}

function draw() {
  dash.drawScheduled = false;
  const runs = dash.selected.map((id) => dash.runs[id]).filter((r) => r && r.recs.length);
  const several = dash.selected.length > 1;
  for (const key of ["metrics", "ratio", "grad", "elr"]) {
    const fam = FAMILIES[key] || {};
    const tables = [], series = [];
    for (const run of runs) {
      const ss = seriesOf(key, run, several);
      if (!ss.length) continue;
      tables.push([run.steps, ...ss.map((s) => s.values)]);
      series.push(...ss);
    }
    const el = $("chart-" + key);
    if (!series.length) {
      if (dash.charts[key]) { dash.charts[key].destroy(); delete dash.charts[key]; }
      el.replaceChildren();
      if (runs.length) {
        const p = document.createElement("p");
        p.className = "muted";
        p.textContent = key === "metrics" ? "No scalar yet: send the loss with each step, session.step(grads, metrics={\"loss\": loss})."
          : "No figure for this optimizer.";
        el.appendChild(p);
      }
      continue;
    }
    // several sessions: their steps joined into one x axis (uPlot.join), gaps where a session has none
    const data = tables.length === 1 ? tables[0] : uPlot.join(tables);
    if (fam.band) for (const b of fam.band) data.push(data[0].map(() => b));
    const shape = JSON.stringify([series.map((s) => s.label), dash.lossLog, key]);
    const chart = dash.charts[key];
    if (!chart || chart.shape !== shape) {
      if (chart) chart.destroy();
      dash.charts[key] = makeChart(key, fam, series, data);
      dash.charts[key].shape = shape;
    } else {
      chart.setData(data);
    }
  }
  const now = Date.now() / 1000;
  for (const rec of dash.pendingDraw) dash.latencies.push([rec.step, now - rec.t]);
  if (dash.latencies.length > 5000) dash.latencies.splice(0, dash.latencies.length - 5000);
  dash.pendingDraw = [];
}

function makeChart(key, fam, series, data) {
  const el = $("chart-" + key);
  el.replaceChildren();
  const all = [{ label: "step" }];
  for (const s of series) all.push({ label: s.label, stroke: s.stroke, width: s.width, spanGaps: true, points: { show: false } });
  if (fam.band) for (const b of fam.band) all.push({ label: b.toExponential(0), stroke: b === 1e-3 ? "#2a2" : "#aaa", dash: [4, 4], width: 1, points: { show: false } });
  const log = key !== "metrics" || dash.lossLog;
  const width = Math.max(320, el.clientWidth || 520);
  return new uPlot({
    width, height: 240, series: all,
    scales: { x: { time: false }, y: log ? { distr: 3 } : {} },
    axes: [{ label: "step" }, log
      ? { size: 70, values: (u, vals) => vals.map((v) => (v == null ? "" : +v.toPrecision(2) >= 0.01 && v < 1000 ? +v.toPrecision(2) : v.toExponential(0))) }
      : { size: 70 }],
    legend: { live: true },
  }, data, el);
}

// the effective learning rate means something different for each family of optimizers: say what
function elrText(optimizer) {
  const o = (optimizer || "").toLowerCase();
  if (o.includes("adam")) {
    return "Adam: lr/(√v̂+ε), the multiplier on the averaged gradient m̂. Since m̂/√v̂ is about ±1, each element still moves " +
      "about lr a step, so this reads as lr / (typical |gradient|): ~1 at lr 0.001 means gradient elements near 0.001.";
  }
  if (o.includes("rmsprop")) return "RMSProp: lr/(√h+ε), the multiplier on the gradient, h a moving average of g²: about lr / (typical |gradient|).";
  if (o.includes("adagrad")) return "AdaGrad: lr/(√h+ε), the multiplier on the gradient, h the sum of every past g²: it only falls as training goes on.";
  return "The multiplier on the gradient (or on the momentum buffer): for SGD, Momentum and Nesterov the lr itself, the same for every element.";
}

function explainElr() {
  const opts = [...new Set(dash.selected.map((id) => (dash.optimizers || {})[id]).filter(Boolean))];
  let text = opts.map(elrText).filter((t, i, a) => a.indexOf(t) === i).join(" ");
  text += dash.selected.length > 1 ? " Overlaid: the median over each model's tensors." : " Per tensor: the median of a sample of its elements, measured every 10th step.";
  $("explain-elr").textContent = text;
}

function onAlert(run, a) {
  if (run.alertSeqs.has(a.seq)) return;  // alerts are resent on reconnect; keep each once
  run.alertSeqs.add(a.seq);
  run.alerts.push(a);
  if (run.id === dash.sessionId) dash.alerts = run.alerts;
  showAlerts();
}

function showAlerts() {
  const several = dash.selected.length > 1;
  const all = [];
  for (const id of dash.selected) if (dash.runs[id]) for (const a of dash.runs[id].alerts) all.push([id, a]);
  all.sort((x, y) => x[1].wall_time - y[1].wall_time);
  const ul = $("alerts");
  ul.replaceChildren();
  for (const [id, a] of all) {
    const li = document.createElement("li");
    li.className = a.kind;
    const text = a.kind === "refused" ? a.message : `step ${a.step} · ${a.kind}: ${a.message}`;
    li.textContent = several ? `${id}: ${text}` : text;
    ul.prepend(li);
  }
  $("alert-count").textContent = all.length ? `(${all.length})` : "(none: no sign of trouble)";
  $("alerts-panel").className = all.length ? "raised" : "quiet";
  const first = dash.runs[dash.sessionId];
  dash.alerts = first ? first.alerts : [];
}

$("smoothing").addEventListener("input", () => {
  dash.smoothing = +$("smoothing").value;
  $("smoothing-value").textContent = dash.smoothing.toFixed(2);
  scheduleDraw();
});
$("loss-log").addEventListener("change", () => { dash.lossLog = $("loss-log").checked; scheduleDraw(); });

window.addEventListener("resize", () => {
  for (const [key, c] of Object.entries(dash.charts)) c.setSize({ width: Math.max(320, $("chart-" + key).clientWidth), height: 240 });
});

// ---- start -----------------------------------------------------------------------------------
function selectFromHash() {  // #session=ID or #session=ID,ID,... (a link to a comparison)
  const m = /session=([^&]*)/.exec(location.hash);
  select(m && m[1] && !dash.unauthorized ? m[1].split(",").map(decodeURIComponent) : []);
}
window.addEventListener("hashchange", selectFromHash);  // select() itself replaces the hash without one

(async function start() {
  await refreshSessions();
  setInterval(() => { if (!dash.unauthorized) refreshSessions(); }, 2000);
  selectFromHash();
})();
