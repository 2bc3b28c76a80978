// metertwin dashboard: reads the SSE stream with fetch() (EventSource cannot send a bearer token).
"use strict";

function token() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) { sessionStorage.setItem("mt-token", fromHash); history.replaceState(null, "", location.pathname + location.search); }
  return sessionStorage.getItem("mt-token");
}

function showLogin(message) {
  const form = document.getElementById("login");
  form.hidden = false;
  if (message) document.getElementById("login-error").textContent = message;
  form.onsubmit = (e) => {
    e.preventDefault();
    sessionStorage.setItem("mt-token", document.getElementById("token").value.trim());
    location.reload();
  };
}

// Every stream of this page, ended when the page goes away: a navigation does not always close a
// fetch() stream (the browser may keep the page, and its connections, for back/forward), and six
// open streams to one host leave no connection for the next page's reads.
const streams = new AbortController();
window.addEventListener("pagehide", () => streams.abort());

// Follow /events with the given query; onEvent(event) per event; resumes with Last-Event-ID.
async function follow(query, onEvent) {
  const status = document.getElementById("status");
  let lastId = null;
  for (;;) {
    const headers = { Authorization: "Bearer " + token() };
    if (lastId) headers["Last-Event-ID"] = lastId;
    let resp;
    try {
      resp = await fetch("/events?" + query, { headers, signal: streams.signal });
    } catch (err) {
      if (streams.signal.aborted) return;
      status.textContent = "disconnected, retrying";
      await new Promise((r) => setTimeout(r, 1000));
      continue;
    }
    if (resp.status === 401 || resp.status === 403) {
      const body = await resp.json();
      status.textContent = "not allowed";
      showLogin(body.message);
      return;
    }
    if (!resp.ok) {  // e.g. a zone this service does not follow: say so, do not retry forever
      let body = {};
      try { body = await resp.json(); } catch (err) { body = {}; }
      status.textContent = "no live updates: " + (body.message || "HTTP " + resp.status);
      return;
    }
    status.textContent = "live";
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      let chunk;
      try { chunk = await reader.read(); } catch (err) { if (streams.signal.aborted) return; break; }
      const { value, done } = chunk;
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let data = null, kind = "";
        for (const line of frame.split("\n")) {
          if (line.startsWith("data: ")) data = line.slice(6);
          else if (line.startsWith("event: ")) kind = line.slice(7);
          else if (line.startsWith("id: ")) lastId = line.slice(4);
        }
        if (data === null) continue;
        if (kind === "close") status.textContent = "cut off: " + JSON.parse(data).reason;
        else if (kind === "") onEvent(JSON.parse(data));
      }
    }
    status.textContent = "reconnecting";
    await new Promise((r) => setTimeout(r, 500));
  }
}

function meterPage() {
  const meter = new URLSearchParams(location.search).get("id");
  document.getElementById("meter-id").textContent = meter;
  const xs = [], ys = [];
  const chart = new uPlot({ width: 800, height: 300, title: "Power (W)",
    series: [{}, { label: "power_w", stroke: "#0b3d5c" }] }, [xs, ys], document.getElementById("chart"));
  const commands = document.getElementById("commands");
  follow("meter=" + encodeURIComponent(meter), (ev) => {
    if (ev.type === "reading") {
      const m = ev.data.measurement;
      xs.push(m.ts); ys.push(m.power_w);
      if (xs.length > 600) { xs.shift(); ys.shift(); }
      chart.setData([xs, ys]);
      document.getElementById("last-power").textContent = m.power_w;
      document.getElementById("last-seq").textContent = ev.data.seq;
    } else if (ev.type === "command") {
      const tr = document.createElement("tr");
      for (const text of [ev.data.id, ev.data.status, ev.data.kind || ""]) {
        const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
      }
      commands.prepend(tr);
    } else if (ev.type === "delta") {
      document.getElementById("delta").textContent = JSON.stringify(ev.data.delta);
    } else if (ev.type === "status") {
      document.getElementById("online").textContent = ev.data.online ? "online" : "offline";
    }
  });
}

window.addEventListener("DOMContentLoaded", () => {
  if (!token()) { showLogin(""); return; }
  const page = document.body.dataset.page;
  if (page === "meter") meterPage();
});
