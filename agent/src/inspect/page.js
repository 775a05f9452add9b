// The ferry inspector page. Everything that came through the tunnel is shown with textContent,
// never as HTML.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const auth = token ? { Authorization: "Bearer " + token } : {};
const withToken = (url) => (token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url);
const $ = (id) => document.getElementById(id);

const rows = new Map(); // id -> summary
let picked = null; // id of the record in the detail view
let pickedDetail = null;
let refreshTimer = null;

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children) node.append(child);
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...auth, ...(options.headers || {}) } });
  const value = await response.json();
  if (!response.ok) throw new Error(value.error ? value.error.code + ": " + value.error.message : response.status);
  return value;
}

const bytes = (n) => (n < 1024 ? n + " B" : n < 1 << 20 ? (n / 1024).toFixed(1) + " KiB" : (n / (1 << 20)).toFixed(1) + " MiB");
const ms = (v) => (v == null ? "…" : v < 1000 ? v.toFixed(1) + " ms" : (v / 1000).toFixed(2) + " s");

function statusText(s) {
  if (s.error) return (s.status ? s.status + " " : "") + s.error.code;
  if (s.upgraded) return "101 upgraded";
  return s.status == null ? "…" : String(s.status);
}

function matches(s) {
  const status = $("filter-status").value;
  const method = $("filter-method").value;
  const path = $("filter-path").value;
  if (status === "error" && !s.error) return false;
  if (/^[1-5]xx$/.test(status) && !(s.status && Math.floor(s.status / 100) === Number(status[0]))) return false;
  if (method && s.method !== method) return false;
  if (path && !s.path.includes(path)) return false;
  return true;
}

function row(s) {
  const tr = el("tr");
  tr.dataset.id = s.id;
  if (s.replay_of) tr.classList.add("replay");
  if (s.id === picked) tr.classList.add("picked");
  const status = el("td", { textContent: statusText(s), className: "status" });
  if (s.error) status.classList.add("failed");
  else if (s.status) status.classList.add("s" + Math.floor(s.status / 100));
  tr.append(
    el("td", { textContent: new Date(s.time_ms).toLocaleTimeString() }),
    el("td", { textContent: s.method, className: "method" }),
    el("td", { textContent: s.path, className: "path", title: s.path }),
    status,
    el("td", { textContent: ms(s.duration_ms) }),
    el("td", { textContent: bytes(s.request_bytes) }),
    el("td", { textContent: bytes(s.response_bytes) }),
    el("td", { textContent: s.client || "" }),
  );
  tr.addEventListener("click", () => pick(s.id));
  return tr;
}

function render() {
  const body = $("requests").tBodies[0];
  const ids = [...rows.keys()].sort((a, b) => b - a);
  body.replaceChildren(...ids.map((id) => rows.get(id)).filter(matches).map(row));
  $("empty").hidden = rows.size > 0;
}

let memoryTimer = null;
function refreshMemory() {
  if (memoryTimer) return;
  memoryTimer = setTimeout(() => {
    memoryTimer = null;
    api("/api/requests?limit=0").then((l) => showMemory(l.memory)).catch(() => {});
  }, 300);
}

function upsert(s) {
  rows.set(s.id, s);
  refreshMemory();
  const body = $("requests").tBodies[0];
  const old = body.querySelector(`tr[data-id="${s.id}"]`);
  if (!matches(s)) {
    if (old) old.remove();
  } else if (old) {
    old.replaceWith(row(s));
  } else {
    // Newest first: ids only grow, so a new one goes on top.
    body.prepend(row(s));
  }
  $("empty").hidden = true;
  if (s.id === picked) scheduleRefresh();
}

function showMemory(memory) {
  $("memory").textContent = `${memory.kept} kept · ${bytes(memory.held_bytes)} held (at most ${bytes(memory.bound_bytes)}: ${memory.max_requests} × 2 × ${bytes(memory.body_limit)})`;
}

async function load() {
  const list = await api("/api/requests");
  rows.clear();
  for (const s of list.requests) rows.set(s.id, s);
  showMemory(list.memory);
  render();
}

function listen() {
  const events = new EventSource(withToken("/api/events"));
  events.addEventListener("hello", (e) => {
    $("live").textContent = "live";
    $("live").className = "live on";
    showMemory(JSON.parse(e.data).memory);
    load();
  });
  events.addEventListener("new", (e) => upsert(JSON.parse(e.data)));
  events.addEventListener("update", (e) => upsert(JSON.parse(e.data)));
  events.addEventListener("resync", () => load());
  events.onerror = () => {
    $("live").textContent = "reconnecting";
    $("live").className = "live off";
  };
}

function scheduleRefresh() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    if (picked != null) pick(picked, true);
  }, 150);
}

function header(name, detail) {
  const found = detail.find(([n]) => n.toLowerCase() === name);
  return found ? found[1] : "";
}

function hexdump(data) {
  const lines = [];
  for (let i = 0; i < data.length; i += 16) {
    const chunk = data.slice(i, i + 16);
    const hex = [...chunk].map((b) => b.toString(16).padStart(2, "0")).join(" ");
    const text = [...chunk].map((b) => (b >= 32 && b < 127 ? String.fromCharCode(b) : ".")).join("");
    lines.push(i.toString(16).padStart(8, "0") + "  " + hex.padEnd(48) + "  " + text);
  }
  return lines.join("\n");
}

function rawBytes(body) {
  if (body.encoding === "base64") return Uint8Array.from(atob(body.data), (c) => c.charCodeAt(0));
  return new TextEncoder().encode(body.data);
}

// The views a body can be shown in, best first.
function views(body, type, url) {
  const list = [];
  const t = type.toLowerCase();
  if (body.kept === 0) return list;
  if (t.startsWith("image/") && !t.startsWith("image/svg")) {
    list.push(["image", () => el("img", { className: "preview", src: withToken(url), alt: "image body" })]);
  }
  if (body.encoding === "utf8") {
    try {
      if (t.includes("json") || /^\s*[[{]/.test(body.data)) {
        const pretty = JSON.stringify(JSON.parse(body.data), null, 2);
        list.push(["json", () => el("pre", { className: "body-view", textContent: pretty })]);
      }
    } catch (_) { /* not JSON after all */ }
    if (t.startsWith("application/x-www-form-urlencoded")) {
      list.push(["form", () => {
        const table = el("table", { className: "fields body-view" });
        for (const [k, v] of new URLSearchParams(body.data)) table.append(el("tr", {}, el("td", { textContent: k }), el("td", { textContent: v })));
        return table;
      }]);
    }
    list.push(["text", () => el("pre", { className: "body-view", textContent: body.data })]);
  }
  list.push(["hex", () => el("pre", { className: "body-view", textContent: hexdump(rawBytes(body)) })]);
  return list;
}

function bodySection(title, body, fields, url) {
  const section = el("div", {}, el("h3", { textContent: title }));
  const note = `${bytes(body.size)}` + (body.truncated ? `, the first ${bytes(body.kept)} kept` : "") + (body.complete ? "" : ", not complete");
  section.append(el("p", { className: "note", textContent: body.size === 0 ? "no body" : note }));
  const choices = views(body, header("content-type", fields), url);
  if (choices.length === 0) return section;
  const holder = el("div");
  const buttons = el("div", { className: "views" });
  const show = (i) => {
    holder.replaceChildren(choices[i][1]());
    [...buttons.children].forEach((b, j) => b.classList.toggle("on", i === j));
  };
  choices.forEach(([name], i) => buttons.append(el("button", { type: "button", textContent: name, onclick: () => show(i) })));
  section.append(buttons, holder);
  show(0);
  return section;
}

function fieldsTable(fields) {
  const table = el("table", { className: "fields" });
  for (const [name, value] of fields) table.append(el("tr", {}, el("td", { textContent: name }), el("td", { textContent: value })));
  return table;
}

function exchange(d, title) {
  const parts = [el("h2", { textContent: `${title}: ${d.method} ${d.path} → ${statusText(d)} in ${ms(d.duration_ms)}` })];
  const facts = [`#${d.id}`];
  if (d.replay_of) facts.push(`replay of #${d.replay_of}`);
  if (d.client) facts.push(`from ${d.client}`);
  if (d.upstream) facts.push(`to ${d.upstream}`);
  if (d.first_byte_ms != null) facts.push(`first byte ${ms(d.first_byte_ms)}`);
  if (d.upgraded) facts.push(`upgraded: ${bytes(d.upgraded.to_upstream)} up, ${bytes(d.upgraded.from_upstream)} down`);
  parts.push(el("p", { className: "note", textContent: facts.join(" · ") }));
  if (d.error) parts.push(el("p", { className: "failed", textContent: `${d.error.code}: ${d.error.message}` }));
  parts.push(el("h3", { textContent: "Request headers" }), fieldsTable(d.request.headers));
  parts.push(bodySection("Request body", d.request.body, d.request.headers, `/api/requests/${d.id}/request/body`));
  parts.push(el("h3", { textContent: "Response headers" }), fieldsTable(d.response.headers));
  parts.push(bodySection("Response body", d.response.body, d.response.headers, `/api/requests/${d.id}/response/body`));
  return parts;
}

async function pick(id, refresh) {
  if (!refresh) $("replayed").hidden = true;
  picked = id;
  document.querySelectorAll("tbody tr").forEach((tr) => tr.classList.toggle("picked", Number(tr.dataset.id) === id));
  let d;
  try {
    d = await api(`/api/requests/${id}`);
  } catch (err) {
    $("detail-head").textContent = String(err);
    return;
  }
  if (picked !== id) return;
  pickedDetail = d;
  $("detail").hidden = false;
  $("detail-head").textContent = "";
  $("curl").textContent = d.curl;
  $("original").replaceChildren(...exchange(d, d.replay_of ? "Replay" : "Request"));
}

async function replay(edits) {
  const original = picked;
  $("replayed").hidden = false;
  $("replayed").replaceChildren(el("p", { className: "note", textContent: "replaying…" }));
  try {
    const d = await api(`/api/requests/${original}/replay`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(edits || {}),
    });
    $("replayed").replaceChildren(...exchange(d, "Replay"));
  } catch (err) {
    $("replayed").replaceChildren(el("p", { className: "failed", textContent: String(err) }));
  }
}

function openEditor() {
  const d = pickedDetail;
  if (!d) return;
  $("editor").hidden = false;
  $("edit-method").value = d.method;
  $("edit-path").value = d.path;
  $("edit-headers").value = d.request.headers.map(([n, v]) => `${n}: ${v}`).join("\n");
  $("edit-body").value = d.request.body.encoding === "utf8" ? d.request.body.data : "";
}

function sendEdited(event) {
  event.preventDefault();
  const headers = $("edit-headers").value.split("\n").filter((l) => l.includes(":")).map((l) => {
    const at = l.indexOf(":");
    return [l.slice(0, at).trim(), l.slice(at + 1).trim()];
  });
  replay({ method: $("edit-method").value.trim(), path: $("edit-path").value.trim(), headers, body: $("edit-body").value });
}

window.addEventListener("DOMContentLoaded", () => {
  $("filters").addEventListener("input", render);
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  $("clear").addEventListener("click", async () => {
    await api("/api/requests", { method: "DELETE" });
    rows.clear();
    picked = null;
    $("detail").hidden = true;
    render();
  });
  $("replay").addEventListener("click", () => replay());
  $("edit").addEventListener("click", openEditor);
  $("editor").addEventListener("submit", sendEdited);
  $("copy-curl").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($("curl").textContent));
  load().catch((err) => ($("empty").textContent = String(err)));
  listen();
});
