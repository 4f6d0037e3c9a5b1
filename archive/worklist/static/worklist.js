// The worklist page: plain JavaScript, no build step, no external resources.
// Authenticates with an HttpOnly cookie set by POST /api/worklist/session;
// live updates come from the Server-Sent Events at /api/worklist/events.
"use strict";

const state = { items: [], selected: 0, seen: null, source: null, loading: false, again: false };
const $ = (id) => document.getElementById(id);

function text(tag, content, cls) {
  const el = document.createElement(tag);
  if (content !== undefined && content !== null) el.textContent = content;
  if (cls) el.className = cls;
  return el;
}

function ago(iso, now) {
  if (!iso) return "";
  const seconds = Math.max(0, (now - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} d`;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) { showLogin(); throw new Error("not logged in"); }
  return response;
}

function query() {
  const p = new URLSearchParams();
  const priority = $("f-priority").value, triage = $("f-triage").value, reading = $("f-reading").value;
  if (priority) p.set("priority", priority);
  if (triage) p.set("triage_state", triage);
  if (reading) p.set("reading_state", reading);
  if ($("f-modality").value.trim()) p.set("modality", $("f-modality").value.trim());
  if ($("f-from").value) p.set("study_date_from", $("f-from").value);
  if ($("f-to").value) p.set("study_date_to", $("f-to").value);
  p.set("limit", "500");
  return p.toString();
}

async function load() {
  if (state.loading) { state.again = true; return; }
  state.loading = true;
  try {
    const response = await api(`/api/worklist?${query()}`);
    if (!response.ok) throw new Error(`worklist: HTTP ${response.status}`);
    const data = await response.json();
    const selectedUid = state.items[state.selected] && state.items[state.selected].StudyInstanceUID;
    const previous = state.seen;
    state.seen = new Set(data.items.map((i) => i.StudyInstanceUID));
    state.items = data.items;
    const keep = data.items.findIndex((i) => i.StudyInstanceUID === selectedUid);
    state.selected = keep >= 0 ? keep : 0;
    render(previous);
    $("summary").textContent = `${data.total} stud${data.total === 1 ? "y" : "ies"}`;
  } catch (error) {
    console.error(error);
  } finally {
    state.loading = false;
    if (state.again) { state.again = false; load(); }
  }
}

function badge(item) {
  const cls = item.priority_class || "none";
  const b = text("span", item.priority_class || "—", `badge ${cls}`);
  b.title = item.priority_reason || "not assessed by AI";
  const cell = text("td");
  cell.append(b);
  if (item.overdue) cell.append(text("span", "overdue", "overdue"));
  else if (item.effective_class !== (item.priority_class || "ROUTINE"))
    cell.append(text("span", `aged to ${item.effective_class}`, "overdue"));
  return cell;
}

function findingCell(item) {
  const cell = text("td");
  cell.append(text("div", item.headline, "finding"));
  const stateClass = item.triage_state === "failed" ? "state failed" : "state";
  if (!item.headline.startsWith(item.triage_label)) cell.append(text("div", item.triage_label, stateClass));
  for (const alert of item.alerts || []) {
    const target = alert.channel.split(":").slice(1).join(":");
    cell.append(text("div", `alert to ${target}: ${alert.status}`, `alert alert-${alert.status}`));
  }
  return cell;
}

function thumbCell(item) {
  const cell = text("td");
  // Key image when the AI stored one, else a middle slice; none while images still arrive.
  if (item.triage_state === "waiting_for_images") return cell;
  const img = document.createElement("img");
  img.className = "thumb";
  img.loading = "lazy";
  img.alt = item.key_image_sop_instance_uid ? "key image" : "middle slice";
  img.addEventListener("error", () => img.remove());
  const version = encodeURIComponent(item.key_image_sop_instance_uid || String(item.generation));
  img.src = `/api/worklist/${item.StudyInstanceUID}/thumbnail.png?size=192&v=${version}`;
  img.addEventListener("click", () => enlarge(item));
  cell.append(img);
  return cell;
}

function enlarge(item) {
  const version = encodeURIComponent(item.key_image_sop_instance_uid || String(item.generation));
  $("viewer-image").src = `/api/worklist/${item.StudyInstanceUID}/thumbnail.png?size=1024&v=${version}`;
  $("viewer").hidden = false;
  $("viewer-close").focus();
}

async function setState(item, newState) {
  const response = await api(`/api/worklist/${item.StudyInstanceUID}/state`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ state: newState }),
  });
  if (!response.ok) {
    const detail = (await response.json()).detail;
    alertRow(item, detail || `HTTP ${response.status}`);
  }
  load();
}

async function sendFeedback(item, verdict, comment) {
  const response = await api(`/api/worklist/${item.StudyInstanceUID}/feedback`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ verdict, comment: comment || "" }),
  });
  const row = document.querySelector(`tr[data-uid="${item.StudyInstanceUID}"] .feedback-status`);
  if (row) row.textContent = response.ok ? `thanks: ${verdict}` : `not saved (${response.status})`;
}

function alertRow(item, message) {
  const row = document.querySelector(`tr[data-uid="${item.StudyInstanceUID}"] .reading-status`);
  if (row) row.textContent = message;
}

function readingCell(item) {
  const cell = text("td", null, "actions");
  const status = text("div", item.reading_state, "reading-status");
  if (item.opened_by && item.reading_state !== "unread") status.title = `opened by ${item.opened_by}`;
  cell.append(status);
  const buttons = {
    unread: [["opened", "Open"], ["dismissed", "Dismiss"]],
    opened: [["reported", "Reported"], ["unread", "Release"]],
    dismissed: [["unread", "Restore"]],
    reported: [],
  }[item.reading_state] || [];
  for (const [target, label] of buttons) {
    const b = text("button", label, `action-${target}`);
    b.type = "button";
    b.addEventListener("click", (event) => { event.stopPropagation(); setState(item, target); });
    cell.append(b);
  }
  return cell;
}

function feedbackCell(item) {
  const cell = text("td", null, "feedback");
  if (item.triage_state !== "triaged") return cell;
  const comment = document.createElement("input");
  comment.placeholder = "comment";
  comment.className = "comment";
  comment.addEventListener("keydown", (event) => event.stopPropagation());
  const agree = text("button", "Agree", "agree");
  const disagree = text("button", "Disagree", "disagree");
  agree.type = disagree.type = "button";
  agree.addEventListener("click", () => sendFeedback(item, "agree", comment.value));
  disagree.addEventListener("click", () => sendFeedback(item, "disagree", comment.value));
  cell.append(comment, agree, disagree, text("div", "", "feedback-status muted"));
  return cell;
}

function render(previous) {
  const now = Date.now();
  const body = $("rows");
  body.replaceChildren();
  state.items.forEach((item, index) => {
    const row = text("tr", null, `row prio-${item.priority_class || "none"} state-${item.triage_state}`);
    if (item.triage_state === "failed") row.classList.add("failed");
    if (previous && !previous.has(item.StudyInstanceUID)) row.classList.add("new");
    if (index === state.selected) row.classList.add("selected");
    row.dataset.uid = item.StudyInstanceUID;
    row.tabIndex = -1;
    row.addEventListener("click", () => select(index));
    const patient = text("td");
    patient.append(text("div", item.PatientName.replace(/\^/g, " ")), text("div", item.PatientID, "muted"));
    const study = text("td");
    study.append(
      text("div", item.StudyDescription || item.ModalitiesInStudy),
      text("div", `${item.ModalitiesInStudy} · ${item.AccessionNumber || "no accession"} · ${item.StudyDate}`, "muted"),
    );
    row.append(
      badge(item), findingCell(item), thumbCell(item), patient, study,
      text("td", ago(item.arrived_at, now), "waiting"),
      text("td", item.triaged_at ? `${ago(item.triaged_at, now)} ago` : "—", "triaged"),
      readingCell(item), feedbackCell(item),
    );
    body.append(row);
  });
}

function select(index) {
  if (!state.items.length) return;
  state.selected = Math.max(0, Math.min(state.items.length - 1, index));
  document.querySelectorAll("tr.row").forEach((r, i) => r.classList.toggle("selected", i === state.selected));
  const row = document.querySelectorAll("tr.row")[state.selected];
  if (row) row.scrollIntoView({ block: "nearest" });
}

function onKey(event) {
  if (!$("viewer").hidden) { if (event.key === "Escape") $("viewer").hidden = true; return; }
  if (["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName)) return;
  const item = state.items[state.selected];
  switch (event.key) {
    case "j": case "ArrowDown": select(state.selected + 1); break;
    case "k": case "ArrowUp": select(state.selected - 1); break;
    case "o": if (item) setState(item, "opened"); break;
    case "r": if (item) setState(item, "reported"); break;
    case "a": if (item && item.triage_state === "triaged") sendFeedback(item, "agree", ""); break;
    case "d": if (item && item.triage_state === "triaged") sendFeedback(item, "disagree", ""); break;
    case "Enter": case " ": if (item) enlarge(item); break;
    default: return;
  }
  event.preventDefault();
}

function connect() {
  if (state.source) state.source.close();
  const source = new EventSource("/api/worklist/events");
  state.source = source;
  source.addEventListener("hello", () => { $("live").textContent = "live"; $("live").className = "live on"; });
  source.addEventListener("change", () => load());
  source.onerror = () => { $("live").textContent = "reconnecting"; $("live").className = "live off"; };
}

function showLogin() {
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  if (state.source) { state.source.close(); state.source = null; }
  $("token").focus();
}

async function start() {
  const response = await fetch("/api/worklist/whoami", { credentials: "same-origin" });
  if (response.status !== 200) { showLogin(); return; }
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  await load();
  connect();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const response = await fetch("/api/worklist/session", {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token: $("token").value }),
  });
  $("token").value = "";
  if (response.status === 204) { $("login-error").textContent = ""; start(); }
  else $("login-error").textContent = "That token was not accepted.";
});
$("logout").addEventListener("click", async () => {
  await fetch("/api/worklist/session", { method: "DELETE", credentials: "same-origin" });
  showLogin();
});
$("filters").addEventListener("change", () => load());
$("filters").addEventListener("submit", (event) => { event.preventDefault(); load(); });
$("viewer-close").addEventListener("click", () => { $("viewer").hidden = true; });
$("viewer").addEventListener("click", (event) => { if (event.target === $("viewer")) $("viewer").hidden = true; });
document.addEventListener("keydown", onKey);
setInterval(() => { if (!$("app").hidden) render(null); }, 30000);
start();
