// breastfusion web page: a form built from GET /schema/fields, POST /predict, results drawn with textContent only.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fieldInput(f, i) {
  const id = "field-" + i;
  const wrap = el("div", { class: "field" });
  const label = el("label", { for: id }, f.name);
  label.title = f.description || "";
  wrap.appendChild(label);
  let input;
  if (f.kind === "categorical") {
    input = el("select", { id, name: f.name, "data-kind": f.kind });
    input.appendChild(el("option", { value: "" }, "— unknown —"));
    for (const c of f.categories || []) input.appendChild(el("option", { value: c }, c));
  } else if (f.kind === "bool") {
    input = el("select", { id, name: f.name, "data-kind": f.kind });
    input.appendChild(el("option", { value: "" }, "— unknown —"));
    input.appendChild(el("option", { value: "true" }, "yes"));
    input.appendChild(el("option", { value: "false" }, "no"));
  } else {
    input = el("input", { id, name: f.name, type: "number", step: "any", "data-kind": f.kind });
    if (f.median !== null && f.median !== undefined) input.placeholder = "median " + Number(f.median).toPrecision(4);
  }
  wrap.appendChild(input);
  return wrap;
}

function showError(msg) {
  const box = $("error");
  box.textContent = msg;
  box.hidden = false;
}

async function init() {
  try {
    const [health, schema] = await Promise.all([
      fetch("/health").then((r) => r.json()),
      fetch("/schema/fields").then((r) => r.json()),
    ]);
    $("bundle-name").textContent = health.bundle;
    $("bundle-classes").textContent = health.classes.join(", ");
    $("version").textContent = health.version;
    $("bundle-calibration").textContent = health.calibrated
      ? "conformal sets at " + Math.round(100 * health.calibration.target_coverage) + "% coverage"
      : "not calibrated (prediction set = top class)";
    if (health.synthetic) $("synthetic-banner").hidden = false;
    if (!health.explanation) $("explain").disabled = true;
    $("mask-row").hidden = !schema.accepts_mask;
    const box = $("fields");
    box.textContent = "";
    if (!schema.fields.length) box.appendChild(el("p", { class: "hint" }, "This bundle uses no clinical fields."));
    schema.fields.forEach((f, i) => box.appendChild(fieldInput(f, i)));
    document.body.dataset.ready = "true";
  } catch (e) {
    showError("Could not load the service description: " + e);
  }
}

function render(res) {
  $("predicted").textContent = res.predicted;
  const bars = $("probabilities");
  bars.textContent = "";
  const entries = Object.entries(res.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [cls, p] of entries) {
    const row = el("div", { class: "row" + (cls === res.predicted ? " top" : ""), "data-class": cls });
    row.appendChild(el("span", { class: "cls" }, cls));
    const track = el("div", { class: "track" });
    const bar = el("div", { class: "bar" });
    bar.style.width = (100 * p).toFixed(1) + "%";
    track.appendChild(bar);
    row.appendChild(track);
    row.appendChild(el("span", { class: "pct" }, (100 * p).toFixed(1) + "%"));
    bars.appendChild(row);
  }
  $("set-line").textContent = "Prediction set: {" + res.prediction_set.join(", ") + "}" +
    (res.calibrated ? " (" + Math.round(100 * res.calibration.target_coverage) + "% conformal coverage)" : " (not calibrated: top class only)");
  const refer = $("refer-line");
  if (res.refer === true) {
    refer.textContent = "REFER: the model cannot single out one class at this coverage.";
    refer.className = "refer";
  } else if (res.refer === false) {
    refer.textContent = "Single-class set: no referral flag.";
    refer.className = "";
  } else {
    refer.textContent = "Referral flag: not available (bundle not calibrated).";
    refer.className = "hint";
  }
  const warnings = $("warnings");
  warnings.textContent = "";
  for (const w of res.warnings || []) warnings.appendChild(el("li", {}, w));
  const fig = $("overlay-figure");
  if (res.explanation_png_base64) {
    $("overlay").src = "data:image/png;base64," + res.explanation_png_base64;
    $("overlay-caption").textContent = "Explanation (" + res.explanation_method + ") for class " + res.predicted;
    fig.hidden = false;
  } else {
    fig.hidden = true;
  }
  $("result").hidden = false;
}

async function submit(ev) {
  ev.preventDefault();
  $("error").hidden = true;
  const data = new FormData();
  const file = $("image").files[0];
  if (file) data.append("image", file);
  const mask = $("mask").files[0];
  if (mask && !$("mask-row").hidden) data.append("mask", mask);
  for (const input of $("fields").querySelectorAll("[name]")) {
    if (input.value !== "") data.append(input.name, input.value);
  }
  if ($("explain").checked) data.append("explain", "true");
  $("submit").disabled = true;
  $("busy").hidden = false;
  try {
    const r = await fetch("/predict", { method: "POST", body: data });
    const body = await r.json().catch(() => ({ detail: "HTTP " + r.status }));
    if (!r.ok) {
      $("result").hidden = true;
      showError("Error " + r.status + ": " + (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)));
      return;
    }
    render(body);
  } catch (e) {
    showError("Request failed: " + e);
  } finally {
    $("submit").disabled = false;
    $("busy").hidden = true;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("predict-form").addEventListener("submit", submit);
  init();
});
