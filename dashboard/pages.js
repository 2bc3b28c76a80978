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

function lineChart(id, title, labels, oneScale = false) {  // a second series on its own right axis unless oneScale
  const series = [{}].concat(labels.map((l, i) => ({ label: l, stroke: ["#0b3d5c", "#b35900"][i], scale: i && !oneScale ? "y2" : "y" })));
  const axes = [{}, { scale: "y" }].concat(labels.length > 1 && !oneScale ? [{ scale: "y2", side: 1 }] : []);
  const data = [[]].concat(labels.map(() => []));
  return { data, plot: new uPlot({ width: 800, height: 260, title, series, axes }, data, document.getElementById(id)) };
}

// Feeder/transformer: fog-grid's node summary, its 15-min load history and its alerts (open first);
// refreshed on the fog's alert events for the node (the stream's zone=fog) and, throttled, on readings
// of the node's meters (the grid drains them every few seconds).
async function feederPage() {
  const id = param("id"), level = param("level") || "feeder";
  if (!id) { put("note", "Pick a feeder or transformer."); return; }
  document.getElementById("node").value = id; document.getElementById("level").value = level;
  put("subject", level + " " + id);
  const node = level + "s/" + encodeURIComponent(id);
  const chart = lineChart("chart", "Aggregate load per 15 min (kWh)", ["import_kwh", "export_kwh"], true);
  const cards = ["import_w", "export_w", "net_w", "meters", "reporting", "online", "stale", "voltage_min_v", "voltage_max_v"];
  const summary = async () => {
    const list = await api("fog-grid/" + level + "s?limit=1000");  // known nodes: no 404 for an empty one
    if (explain(list, "the grid's " + level + "s")) return false;
    if (!list.body.nodes.includes(id)) {
      cards.forEach((c) => put(c, "–"));
      put("aggregates", "No grid data for " + level + " " + id + " yet: no meter placed below it has reported.");
      return true;
    }
    const r = await api("fog-grid/" + node);
    if (explain(r, "the " + level + "'s aggregates")) return false;
    cards.forEach((c) => put(c, r.body[c] ?? "–"));
    put("aggregates", "Aggregates from fog-grid, updated " + (r.body.updated_at || "–") + ".");
    const to = Math.ceil(Date.now() / 900000) * 900, from = to - 86400;
    const h = await api("fog-grid/" + node + "/load?interval=15m&from=" + from + "&to=" + to);
    if (explain(h, "the " + level + "'s load")) return false;
    chart.data[0] = h.body.rows.map((x) => Date.parse(x.start) / 1000);
    chart.data[1] = h.body.rows.map((x) => x.import_kwh);
    chart.data[2] = h.body.rows.map((x) => x.export_kwh);
    chart.plot.setData(chart.data);
    chart.plot.setScale("x", { min: from, max: to });  // the whole day, however few intervals have data
    put("intervals", h.body.rows.length);
    return true;
  };
  const alerts = async () => {
    const a = await api("fog-grid/alerts?limit=200&subject=" + encodeURIComponent(id));
    if (explain(a, "the " + level + "'s alerts")) return;
    const rank = { open: 0, acknowledged: 1, resolved: 2 };
    const mine = a.body.alerts.filter((x) => x.level === level)
      .sort((x, y) => (rank[x.status] ?? 3) - (rank[y.status] ?? 3) || y.opened_at - x.opened_at);
    put("alerts", mine.filter((x) => x.status !== "resolved").length);
    fill("alert-rows", mine, (x) => [new Date(x.opened_at * 1000).toISOString(), x.rule, x.metric, x.status, x.value, x.threshold]);
  };
  if (!(await summary())) return;
  await alerts();
  const meters = new Set();
  const m = await api("edge-fleet/meters?" + level + "=" + encodeURIComponent(id) + "&limit=1000");
  if (m.status === 200) m.body.meters.forEach((x) => meters.add(x.meter_id || x.id || x));
  const resum = later(summary, 2000), realert = later(alerts, 300);
  follow("type=reading", (ev) => { if (meters.has(ev.meter)) resum(); });
  follow("zone=fog&type=alert", (ev) => {  // matched here: node names may hold "/", "+" or "#"
    if (ev.data.level !== level || ev.data.node !== id) return;
    lastChange(ev.data.rule + " " + ev.data.state); realert(); resum();
  });
}

// The sub-topic of an event (topic's last level), e.g. "received" for meters/m/dr/received.
function subOf(ev) { const parts = ev.topic.split("/"); return parts.length > (ev.meter ? 3 : 2) ? parts[parts.length - 1] : ""; }

function lastChange(text) { put("last-change", new Date().toLocaleTimeString() + " " + text); }

async function drPage() {
  const meter = param("meter");
  if (meter) {  // one twin: its events and its own opt-in/out, refreshed on its dr events
    put("subject", "meter " + meter);
    const one = async () => {
      const [ev, pref] = await Promise.all([api("edge-dr-event/meters/" + encodeURIComponent(meter) + "/events"),
        api("edge-dr-event/meters/" + encodeURIComponent(meter) + "/dr-preferences")]);
      if (explain(ev, "this meter's events") || explain(pref, "this meter's preferences")) return false;
      const events = ev.body.events || [];
      put("events", events.length);
      const out = pref.body.preferences ? pref.body.preferences.opt_out : pref.body.opt_out;
      put("opt-in", out ? 0 : 1); put("opt-out", out ? 1 : 0); put("shed", "–");
      fill("event-rows", events, (e) => [e.event_id, e.start, 1, e.opt === "optIn" ? 1 : 0, e.opt === "optOut" ? 1 : 0, e.shed_w]);
      return true;
    };
    const again = later(one, 500);
    if (await one()) follow("type=dr&meter=" + encodeURIComponent(meter), (ev) => { lastChange(ev.data.event_id + " " + subOf(ev)); again(); });
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
  // DR state changes refresh at once; readings only move the shed, so they refresh slowly.
  const soon = later(refresh, 500), slow = later(refresh, 10000);
  if (await refresh()) {
    follow("type=dr,reading", (ev) => {
      if (ev.type !== "dr") { slow(); return; }
      lastChange(ev.meter + " " + ev.data.event_id + " " + subOf(ev));
      soon();
    });
  }
}

async function p2pPage() {
  let id = param("market");
  const chart = lineChart("chart", "Convergence: price and excess demand per round", ["price", "excess_kwh"]);
  const markets = async () => {
    const r = await api("edge-p2p-market/markets?limit=50");
    if (explain(r, "P2P markets")) return false;
    put("markets", r.body.markets.length);
    fill("market-rows", r.body.markets, (m) => [m.id, m.status, m.participants]);
    if (!id && r.body.markets.length) await select(r.body.markets[0].id);
    if (!id) put("note", "No market yet.");
    return true;
  };
  const trades = async () => {
    const t = await api("edge-p2p-market/markets/" + encodeURIComponent(id) + "/trades");
    if (explain(t, "the market's trades")) return;
    put("trades", t.body.trades.length);
    fill("trade-rows", t.body.trades, (x) => [x.meter_id, x.side, x.kwh ?? x.energy_kwh, x.price, x.amount]);
  };
  const showRounds = (list) => {
    chart.data[0] = list.map((x) => x.round); chart.data[1] = list.map((x) => x.price); chart.data[2] = list.map((x) => x.excess_kwh);
    chart.plot.setData(chart.data);
    put("rounds", list.length);
    put("price", list.length ? list[list.length - 1].price : "–");
  };
  async function select(market) {
    id = market; put("subject", id); put("note", "");
    const rounds = await api("edge-p2p-market/markets/" + encodeURIComponent(id) + "/rounds");
    if (explain(rounds, "the market's rounds")) return;
    showRounds(rounds.body.rounds);
    await trades();
  }
  if (!(await markets())) return;
  if (id && document.getElementById("subject").textContent !== id) await select(id);
  const relist = later(markets, 500), retrade = later(() => id && trades(), 500);
  // Live from the p2p events: a round extends the chart as it is negotiated; a market's status
  // refreshes the list; a trade refreshes the trades.
  follow("type=p2p", (ev) => {
    const market = ev.data.market_id, sub = subOf(ev);
    lastChange(market + " " + sub + (sub === "round" ? " " + ev.data.round : ""));
    if (sub === "round") {
      if (!id) { id = market; put("subject", id); put("note", ""); }
      if (market !== id) return;
      const rounds = chart.data[0].map((r, i) => ({ round: r, price: chart.data[1][i], excess_kwh: chart.data[2][i] }))
        .filter((r) => r.round < ev.data.round);
      showRounds(rounds.concat([ev.data]));
    } else if (sub === "trade") {
      if (market === id) retrade();
    } else {
      relist();
      if (sub === "cleared" && market === id) select(id);  // the stored rounds and trades, as REST gives them
    }
  });
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
    if (explain(j, "bulk jobs")) { put("jobs", "–"); return; }
    const jobs = j.body.jobs;
    put("jobs", jobs.length);
    fill("job-rows", jobs, (x) => {  // GET /jobs: progress {total, queued, in_progress, succeeded, failed, ...}
      const p = x.progress;
      return [x.id, x.state, p.finished + " / " + p.total + " (" + p.percent_done + " %)", p.succeeded, p.in_progress + p.queued,
        p.failed + p.rejected + p.timed_out, p.cancelled];
    });
  };
  await refresh();
  const again = later(refresh, 500);
  follow("type=upgrade,job", (ev) => {  // operation and job progress, each twin's step
    lastChange((ev.meter ? ev.meter + " " : "") + (ev.data.op || ev.data.job || "") + " " + subOf(ev));
    again();
  });
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

// Fleet: online/offline/stale counts by zone and feeder from the fleet search's exact counts (the
// same numbers as GET /meters), refreshed on status events and every 15 s (staleness moves with
// time); the ingest rate and the latest events live from the stream.
async function fleetPage() {
  const staleS = Number(param("stale_s") || 300);
  put("stale-s", staleS);
  const times = [], rows = document.getElementById("events");
  const counts = async (filter) => {
    const rs = await Promise.all(["", "&online=true", "&online=false", "&stale_s=" + staleS]
      .map((q) => api("edge-fleet/meters?limit=1" + filter + q)));
    const bad = rs.find((r) => r.status !== 200);
    if (bad) { explain(bad, "the fleet's counts"); return ["–", "–", "–", "–"]; }
    return rs.map((r) => r.body.count);
  };
  const groups = async () => {  // the zones and feeders of the first 5,000 meters
    const zones = new Set(), feeders = new Set();
    let cursor = null, pages = 0;
    do {
      const r = await api("edge-fleet/meters?limit=1000" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
      if (explain(r, "the fleet")) return null;
      for (const m of r.body.meters) {
        const t = m.topology || {};
        if (t.zone) zones.add(t.zone);
        if (t.feeder) feeders.add(t.feeder);
      }
      cursor = r.body.next_cursor; pages++;
    } while (cursor && pages < 5);
    return { zones: [...zones].sort(), feeders: [...feeders].sort().slice(0, 50), partial: !!cursor };
  };
  let busy = false;
  const refresh = async () => {
    if (busy) return;
    busy = true;
    try {
      const g = await groups();
      if (!g) return;
      const [all, zoneRows, feederRows] = await Promise.all([counts(""),
        Promise.all(g.zones.map(async (z) => [z].concat(await counts("&zone=" + encodeURIComponent(z))))),
        Promise.all(g.feeders.map(async (f) => [f].concat(await counts("&feeder=" + encodeURIComponent(f)))))]);
      ["meters", "online", "offline", "stale"].forEach((card, i) => put(card, all[i]));
      fill("zone-rows", zoneRows, (r) => r);
      fill("feeder-rows", feederRows, (r) => r);
      put("feeder-note", !g.feeders.length ? "No meter has a feeder in its topology." :
        g.partial ? "Feeders of the first 5,000 meters (at most 50)." : "");
    } finally { busy = false; }
  };
  await refresh();
  const again = later(refresh, 1000);
  setInterval(refresh, 15000);
  setInterval(() => {
    const now = Date.now();
    while (times.length && times[0] < now - 10000) times.shift();
    put("rate", (times.length / 10).toFixed(1));
  }, 500);
  follow("", (ev) => {
    if (ev.type === "reading") times.push(Date.now());
    if (ev.type === "status") again();
    const tr = document.createElement("tr");
    for (const text of [ev.id, ev.meter || ev.about || "", ev.type, JSON.stringify(ev.data).slice(0, 120)]) {
      const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
    }
    if (ev.meter) {
      const link = document.createElement("a"); link.href = "/meter?id=" + encodeURIComponent(ev.meter);
      link.textContent = ev.meter; tr.children[1].replaceChildren(link);
    }
    rows.prepend(tr);
    while (rows.children.length > 50) rows.lastChild.remove();
  });
}

window.addEventListener("DOMContentLoaded", () => {
  if (!token()) return;  // app.js shows the login form
  const run = { fleet: fleetPage, feeder: feederPage, dr: drPage, p2p: p2pPage, ops: opsPage, quality: qualityPage }[document.body.dataset.page];
  if (run) run().catch((err) => put("note", "Error: " + err.message));
});
