// metertwin dashboard pages beyond fleet and meter: REST reads through the stream service's
// /api/function/... (same origin, the caller's token) and live refreshes from /events.
"use strict";

async function api(path) {
  const resp = await fetch("/api/function/" + path, { headers: { Authorization: "Bearer " + token() } });
  let body = null;
  try { body = await resp.json(); } catch (err) { body = null; }
  return { status: resp.status, body: body || {} };
}

function put(id, value) { document.getElementById(id).textContent = String(value); }

function fill(tbodyId, items, cells) {
  const tbody = document.getElementById(tbodyId);
  tbody.replaceChildren();
  for (const item of items) {
    const tr = document.createElement("tr");
    for (const value of cells(item)) {
      const td = document.createElement("td");
      td.textContent = value === null || value === undefined ? "–" : String(value);
      tr.appendChild(td);
    }
    tbody.appendChild(tr);
  }
}

// Why a read gave nothing, in words; true when the caller should stop.
function explain(r, what) {
  if (r.status === 401 || r.status === 403) { put("note", "Not allowed to see " + what + ": " + (r.body.message || r.status)); return true; }
  if (r.status === 404 && r.body.error === "not_configured") { put("note", what + " is not available here: " + r.body.message); return true; }
  if (r.status >= 400) { put("note", what + ": " + (r.body.message || "HTTP " + r.status)); return true; }
  return false;
}

function later(fn, ms) {  // at most one refresh per ms while events pour in
  let timer = null;
  return () => { if (timer === null) timer = setTimeout(() => { timer = null; fn(); }, ms); };
}

function param(name) { return new URLSearchParams(location.search).get(name); }

function lineChart(id, title, labels) {
  const series = [{}].concat(labels.map((l, i) => ({ label: l, stroke: ["#0b3d5c", "#b35900"][i], scale: i ? "y2" : "y" })));
  const axes = [{}, { scale: "y" }].concat(labels.length > 1 ? [{ scale: "y2", side: 1 }] : []);
  const data = [[]].concat(labels.map(() => []));
  return { data, plot: new uPlot({ width: 800, height: 260, title, series, axes }, data, document.getElementById(id)) };
}

async function feederPage() {
  const id = param("id"), level = param("level") || "feeder";
  if (!id) { put("note", "Pick a feeder or transformer."); return; }
  document.getElementById("node").value = id; document.getElementById("level").value = level;
  put("subject", level + " " + id);
  const r = await api("edge-fleet/meters?" + level + "=" + encodeURIComponent(id) + "&limit=1000");
  if (explain(r, "the " + level + "'s meters")) return;
  const power = new Map(r.body.meters.map((m) => [m.meter_id || m.id || m, null]));
  put("meters", r.body.count);
  const chart = lineChart("chart", "Aggregate load (W)", ["load_w"]);
  const show = () => {
    let sum = 0;
    for (const w of power.values()) sum += w || 0;
    put("load", sum.toFixed(1));
    fill("meter-rows", [...power.entries()], ([m, w]) => [m, w]);
    return sum;
  };
  show();
  const g = await api("fog-grid/nodes/" + level + "/" + encodeURIComponent(id));
  const alerts = g.status === 200 ? (g.body.alerts || []) : [];
  put("aggregates", g.status === 200 ? "Aggregates from the fog zone's grid service." :
    "No aggregates yet: the grid service does not answer here, so the load is the sum of the meters' live readings.");
  put("alerts", alerts.length);
  fill("alert-rows", alerts, (a) => [a.opened_at || a.ts, a.rule || a.rule_id, a.state, a.value]);
  const redraw = later(() => {
    chart.data[0].push(Date.now() / 1000); chart.data[1].push(show());
    if (chart.data[0].length > 600) { chart.data[0].shift(); chart.data[1].shift(); }
    chart.plot.setData(chart.data);
  }, 1000);
  follow("type=reading", (ev) => {
    if (ev.type === "reading" && power.has(ev.meter)) { power.set(ev.meter, ev.data.measurement.power_w); redraw(); }
  });
}

async function drPage() {
  const meter = param("meter");
  if (meter) {  // one twin: its events and its own opt-in/out
    put("subject", "meter " + meter);
    const [ev, pref] = await Promise.all([api("edge-dr-event/meters/" + encodeURIComponent(meter) + "/events"),
      api("edge-dr-event/meters/" + encodeURIComponent(meter) + "/dr-preferences")]);
    if (explain(ev, "this meter's events") || explain(pref, "this meter's preferences")) return;
    const events = ev.body.events || [];
    put("events", events.length);
    const out = pref.body.preferences ? pref.body.preferences.opt_out : pref.body.opt_out;
    put("opt-in", out ? 0 : 1); put("opt-out", out ? 1 : 0); put("shed", "–");
    fill("event-rows", events, (e) => [e.event_id, e.start, 1, e.opt === "optIn" ? 1 : 0, e.opt === "optOut" ? 1 : 0, e.shed_w]);
    return;
  }
  const refresh = async () => {
    const r = await api("edge-dr-event/events?limit=20");
    if (explain(r, "demand response events")) return false;
    const events = r.body.events;
    const summaries = await Promise.all(events.map((e) => api("edge-dr-event/events/" + encodeURIComponent(e.event_id))));
    const totals = summaries.map((s) => (s.status === 200 ? s.body.totals : {}));
    put("events", events.length);
    put("opt-in", totals.reduce((a, t) => a + (t.opt_in || 0), 0));
    put("opt-out", totals.reduce((a, t) => a + (t.opt_out || 0), 0));
    put("shed", totals.reduce((a, t) => a + (t.shed_w || 0), 0).toFixed(1));
    fill("event-rows", events.map((e, i) => [e, totals[i]]), ([e, t]) =>
      [e.event_id, new Date(e.start * 1000).toISOString(), t.twins, t.opt_in, t.opt_out, t.shed_w]);
    const latest = summaries.length && summaries[0].status === 200 ? Object.entries(summaries[0].body.meters) : [];
    fill("twin-rows", latest, ([m, t]) => [m, t.opt, t.exec, t.baseline_w, t.power_w, t.shed_w]);
    return true;
  };
  if (await refresh()) follow("type=reading,command", later(refresh, 2000));  // load limits are commands
}

async function p2pPage() {
  const r = await api("edge-p2p-market/markets?limit=50");
  if (explain(r, "P2P markets")) return;
  const markets = r.body.markets;
  put("markets", markets.length);
  fill("market-rows", markets, (m) => [m.id, m.status, m.participants]);
  const id = param("market") || (markets[0] && markets[0].id);
  if (!id) { put("note", "No market yet."); return; }
  put("subject", id);
  const chart = lineChart("chart", "Convergence: price and excess demand per round", ["price", "excess_kwh"]);
  const refresh = async () => {
    const [rounds, trades] = await Promise.all([api("edge-p2p-market/markets/" + encodeURIComponent(id) + "/rounds"),
      api("edge-p2p-market/markets/" + encodeURIComponent(id) + "/trades")]);
    if (explain(rounds, "the market's rounds") || explain(trades, "the market's trades")) return;
    const list = rounds.body.rounds;
    chart.data[0] = list.map((x) => x.round); chart.data[1] = list.map((x) => x.price); chart.data[2] = list.map((x) => x.excess_kwh);
    chart.plot.setData(chart.data);
    put("rounds", list.length);
    put("price", list.length ? list[list.length - 1].price : "–");
    put("trades", trades.body.trades.length);
    fill("trade-rows", trades.body.trades, (t) => [t.meter_id, t.side, t.kwh ?? t.energy_kwh, t.price, t.amount]);
  };
  await refresh();
  follow("", later(refresh, 2000));  // no P2P event type yet: any twin change refreshes
}

async function opsPage() {
  const refresh = async () => {
    const r = await api("edge-upgrade-manager/operations");
    if (!explain(r, "upgrade operations")) {
      const ops = r.body.operations;
      put("operations", ops.length);
      put("failed", ops.filter((o) => /fail|roll/.test(o.state || "")).length);
      fill("op-rows", ops, (o) => [o.id || o.op_id, o.state, o.progress !== undefined ? JSON.stringify(o.progress) : (o.done ?? "–") + " / " + (o.total ?? "–"), o.failed ?? (o.failures || []).length]);
    }
    const j = await api("edge-jobs/jobs");
    if (j.status !== 200) { put("jobs-note", "No jobs service here (" + (j.body.message || "HTTP " + j.status) + ")."); put("jobs", "–"); return; }
    const jobs = j.body.jobs || [];
    put("jobs", jobs.length);
    fill("job-rows", jobs, (x) => [x.id || x.job_id, x.state || x.status, JSON.stringify(x.progress || x.counts || {}), x.failed ?? "–"]);
  };
  await refresh();
  follow("", later(refresh, 2000));  // no upgrade/job event types yet
}

async function qualityPage() {
  const refresh = async () => {
    const r = await api("fog-mdms-ingest/dead-letters?limit=1000");
    if (explain(r, "dead letters")) return false;
    const byRule = new Map();
    for (const d of r.body.dead_letters) {
      const e = byRule.get(d.rule) || { n: 0, reason: d.reason };
      e.n++; byRule.set(d.rule, e);
    }
    put("dead", r.body.total);
    put("rules", byRule.size);
    fill("rule-rows", [...byRule.entries()].sort((a, b) => b[1].n - a[1].n), ([rule, e]) => [rule, e.n, e.reason]);
    return true;
  };
  const meter = param("meter");
  if (meter) {
    document.getElementById("meter").value = meter;
    const to = Date.now() / 1000, from = to - 86400;
    const q = await api("fog-mdms-query/meters/" + encodeURIComponent(meter) + "/intervals?from=" + from + "&to=" + to);
    if (!explain(q, "this meter's intervals")) {
      const counts = new Map();
      for (const row of q.body.rows) counts.set(row.quality, (counts.get(row.quality) || 0) + 1);
      const n = q.body.rows.length;
      put("estimated", n ? (100 * (counts.get("estimated") || 0) / n).toFixed(1) : "–");
      fill("quality-rows", [...counts.entries()], ([k, c]) => [k, c, (100 * c / n).toFixed(1)]);
    }
  }
  if (await refresh()) follow("type=reading", later(refresh, 5000));
}

window.addEventListener("DOMContentLoaded", () => {
  if (!token()) return;  // app.js shows the login form
  const run = { feeder: feederPage, dr: drPage, p2p: p2pPage, ops: opsPage, quality: qualityPage }[document.body.dataset.page];
  if (run) run().catch((err) => put("note", "Error: " + err.message));
});
