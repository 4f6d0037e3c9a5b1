// The quality view: per-model figures from /api/worklist/quality (login via the worklist page).
"use strict";
const percent = (v) => (v === null || v === undefined ? "—" : `${(v * 100).toFixed(0)} %`);
async function loadQuality() {
  const window_ = document.getElementById("window").value;
  const response = await fetch(`/api/worklist/quality?window=${window_}`, { credentials: "same-origin" });
  const message = document.getElementById("message");
  if (response.status === 401) { message.textContent = "Log in on the worklist page first."; return; }
  const data = await response.json();
  const body = document.getElementById("models");
  body.replaceChildren();
  for (const m of data.models) {
    const row = document.createElement("tr");
    const cells = [m.model, m.studies_analysed, m.studies_flagged, m.feedback_on_flagged,
      percent(m.positive_predictive_value), percent(m.false_alert_rate),
      m.median_time_to_triage_seconds === null ? "—" : `${m.median_time_to_triage_seconds.toFixed(1)} s`];
    for (const value of cells) { const td = document.createElement("td"); td.textContent = value; row.append(td); }
    body.append(row);
  }
  message.textContent = data.models.length ? "" : "No triaged studies in this window.";
}
document.getElementById("window").addEventListener("change", loadQuality);
loadQuality();
