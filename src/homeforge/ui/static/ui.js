// homeforge ui: line charts (inline SVG), live polling of metrics.jsonl, streaming chat. No dependencies.
"use strict";
const CSRF = () => document.body.dataset.csrf || "";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];
const METRICS = [["loss", "loss"], ["val_loss", "val loss"], ["lr", "learning rate"], ["tokens_per_s", "tokens/s"], ["mfu", "MFU"]];
const NS = "http://www.w3.org/2000/svg";

function el(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function fmt(v) {
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a >= 1000 ? v.toFixed(0) : a >= 1 ? v.toPrecision(4) : v.toExponential(2);
}

// one chart: series = [{name, points: [[x, y], ...]}]
function drawChart(box, title, series) {
  box.textContent = "";
  const W = 360, H = 200, L = 56, R = 10, T = 22, B = 24;
  const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title}, box);
  el("text", {x: L, y: 14, class: "title"}, svg).textContent = title;
  const pts = series.flatMap(s => s.points);
  if (!pts.length) { el("text", {x: L, y: H / 2, class: "muted"}, svg).textContent = "no data yet"; return; }
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 = y0 + (Math.abs(y0) || 1) * 0.05; y0 = y0 - (Math.abs(y0) || 1) * 0.05; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R), sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"}, svg);
  el("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"}, svg);
  for (const [v, y] of [[y1, T + 4], [y0, H - B]]) el("text", {x: L - 4, y, class: "tick", "text-anchor": "end"}, svg).textContent = fmt(v);
  for (const [v, x, a] of [[x0, L, "start"], [x1, W - R, "end"]]) el("text", {x, y: H - 8, class: "tick", "text-anchor": a}, svg).textContent = fmt(v);
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    el("path", {d, fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": 1.6, class: "series", "data-n": s.points.length}, svg);
    if (s.points.length === 1) el("circle", {cx: sx(s.points[0][0]), cy: sy(s.points[0][1]), r: 2.5, fill: COLORS[i % COLORS.length]}, svg);
  });
  if (series.length > 1) series.forEach((s, i) => {
    el("text", {x: W - R, y: T + 12 * (i + 1), class: "legend", "text-anchor": "end", fill: COLORS[i % COLORS.length]}, svg).textContent = s.name;
  });
}

function chartBoxes(root) {
  const boxes = {};
  for (const [k] of METRICS) { boxes[k] = document.createElement("div"); boxes[k].className = "chartbox"; boxes[k].dataset.metric = k; root.appendChild(boxes[k]); }
  return boxes;
}

async function liveCurves(root) {
  const url = root.dataset.curves, boxes = chartBoxes(root);
  const data = Object.fromEntries(METRICS.map(([k]) => [k, []]));
  let offset = 0, inode = "", records = 0, live = root.dataset.live === "yes";
  const poll = async () => {
    try {
      const r = await fetch(`${url}?offset=${offset}${inode === "" ? "" : `&inode=${inode}`}`, {credentials: "same-origin"});
      if (!r.ok) return;
      const j = await r.json();
      if (j.reset) { for (const [k] of METRICS) data[k] = []; records = 0; }  // a resumed run rewrote the file
      for (const [k] of METRICS) data[k].push(...(j.curves[k] || []));
      offset = j.offset; inode = j.inode === null ? "" : j.inode; records += j.records;
      for (const [k, title] of METRICS) drawChart(boxes[k], title, [{name: k, points: data[k]}]);
      const n = document.getElementById("nrec"); if (n) n.textContent = records;
      root.dataset.records = records;
      // keep polling while the dashboard's trainer runs or the file is still being written (a CLI run)
      live = live && (j.running === true || j.active || (!j.finished && j.running === null && records === 0));
      if (j.running === false && j.finished) { const s = document.getElementById("state"); if (s) s.textContent = "finished"; }
    } finally {
      if (live) setTimeout(poll, 1000);
    }
  };
  poll();
}

async function compareCurves(root) {
  const ids = JSON.parse(root.dataset.compare || "[]"), boxes = chartBoxes(root);
  const all = await Promise.all(ids.map(id => fetch(`/api/metrics/${id}`).then(r => r.json())));
  for (const [k, title] of METRICS) drawChart(boxes[k], title, ids.map((id, i) => ({name: id, points: all[i].curves[k] || []})));
}

// ---------------------------------------------------------------- playground

async function streamChat(pane, history, maxTokens, temperature) {
  const [endpoint, model] = pane.querySelector("select.model").value.split(/\|(.*)/s);
  const out = document.createElement("div"); out.className = "msg assistant"; out.textContent = "";
  pane.querySelector(".chat").appendChild(out);
  const r = await fetch("/api/chat", {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": CSRF()},
    body: JSON.stringify({endpoint: Number(endpoint), model, messages: history, max_tokens: maxTokens, temperature})});
  if (!r.ok) { out.textContent = `error ${r.status}: ${await r.text()}`; out.classList.add("bad"); return ""; }
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, i).trim(); buf = buf.slice(i + 2);
      if (!line.startsWith("data:")) continue;
      const payload = line.slice(5).trim();
      if (payload === "[DONE]") continue;
      try {
        const j = JSON.parse(payload);
        if (j.error) { out.textContent += ` [${typeof j.error === "string" ? j.error : JSON.stringify(j.error)}]`; out.classList.add("bad"); continue; }
        const d = (j.choices && j.choices[0] && j.choices[0].delta) || {};
        if (d.content) { out.textContent += d.content; out.dataset.chunks = String(Number(out.dataset.chunks || 0) + 1); }
      } catch (e) { /* a partial line: wait for the rest */ }
    }
  }
  if (!out.textContent.trim()) out.classList.add("blank");  // an answer of newlines/spaces, said so
  out.dataset.done = "yes";
  return out.textContent;
}

function playground(form) {
  const histories = {a: [], b: []};
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    const input = document.getElementById("chat-input"), text = input.value.trim();
    if (!text) return;
    input.value = "";
    const both = document.getElementById("chat-both").checked;
    const maxTokens = Number(document.getElementById("chat-max").value) || 48;
    const temp = Number(document.getElementById("chat-temp").value) || 0;
    await Promise.all(["a", "b"].filter(s => both || s === "a").map(async side => {
      const pane = document.getElementById(`pane-${side}`);
      const u = document.createElement("div"); u.className = "msg user"; u.textContent = text;
      pane.querySelector(".chat").appendChild(u);
      histories[side].push({role: "user", content: text});
      const answer = await streamChat(pane, histories[side], maxTokens, temp);
      histories[side].push({role: "assistant", content: answer});
    }));
  });
}

function yamlPreview(form) {
  const pre = document.getElementById("yaml-preview");
  const render = () => {
    const f = new FormData(form), tree = {data: f.get("data"), output_dir: `runs/${f.get("name") || "NAME"}`};
    const pairs = [...f.entries()].filter(([k]) => k !== "overrides");
    for (const line of String(f.get("overrides") || "").split("\n")) {
      const i = line.indexOf("=");
      if (i > 0 && !line.trim().startsWith("#")) pairs.push([line.slice(0, i).trim(), line.slice(i + 1).trim()]);
    }
    for (const [k, v] of pairs) {
      if (["csrf", "name", "data", "output_dir"].includes(k) || !String(v).trim()) continue;
      const parts = k.split("."); let node = tree;
      for (const p of parts.slice(0, -1)) node = node[p] = node[p] || {};
      node[parts[parts.length - 1]] = v;
    }
    const dump = (o, ind) => Object.entries(o).map(([k, v]) => typeof v === "object"
      ? `${ind}${k}:\n${dump(v, ind + "  ")}` : `${ind}${k}: ${v}`).join("\n");
    pre.textContent = dump(tree, "");
  };
  form.addEventListener("input", render);
  render();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".charts[data-curves]").forEach(liveCurves);
  document.querySelectorAll(".charts[data-compare]").forEach(compareCurves);
  const chat = document.getElementById("chat-form"); if (chat) playground(chat);
  const run = document.getElementById("run-form"); if (run) yamlPreview(run);
});
