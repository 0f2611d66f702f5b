// breastfusion web page: a form built from GET /schema/fields, POST /predict, results drawn with textContent only.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(x) {
  return Number(x).toPrecision(4).replace(/\.?0+$/, "");
}

// One labelled input per clinical field: the bundle's display name and unit, the column name for reference, and
// hints *outside* the input (an empty input is "unknown"; a placeholder never looks like an entered value).
function fieldInput(f, i) {
  const id = "field-" + i;
  const hintId = id + "-hint";
  const wrap = el("div", { class: "field" });
  const label = el("label", { for: id });
  label.appendChild(el("span", { class: "field-label" }, f.label || f.name));
  if (f.unit) label.appendChild(el("span", { class: "unit" }, " (" + f.unit + ")"));
  label.appendChild(el("code", { class: "colname" }, f.name));
  wrap.appendChild(label);
  const hints = [];
  if (f.about) hints.push(f.about);
  if (f.kind === "numeric" && f.median !== null && f.median !== undefined) {
    hints.push("training median " + fmt(f.median) + (f.unit ? " " + f.unit : ""));
  }
  let input;
  if (f.kind === "categorical" || f.kind === "ordinal") {
    input = el("select", { id, name: f.name, "data-kind": f.kind });
    input.appendChild(el("option", { value: "" }, "— unknown —"));
    for (const c of f.categories || []) input.appendChild(el("option", { value: c }, c));
  } else if (f.kind === "bool") {
    input = el("select", { id, name: f.name, "data-kind": f.kind });
    input.appendChild(el("option", { value: "" }, "— unknown —"));
    input.appendChild(el("option", { value: "true" }, "yes"));
    input.appendChild(el("option", { value: "false" }, "no"));
  } else if (f.kind === "multi") {
    input = el("input", { id, name: f.name, type: "text", "data-kind": f.kind,
                          placeholder: "optional; several joined by " + (f.separator || "&") });
  } else {
    input = el("input", { id, name: f.name, type: "number", step: "any", "data-kind": f.kind,
                          placeholder: "optional" });
  }
  input.setAttribute("aria-describedby", hintId);
  wrap.appendChild(input);
  wrap.appendChild(el("p", { class: "field-hint", id: hintId }, hints.join(" · ")));
  return wrap;
}

function pct(target) {
  return Math.round(100 * target) + "%";
}

function calibrationSummary(h) {
  if (!h.calibration) return "NOT calibrated: probabilities are the model's own; no prediction sets, no referral flag";
  const parts = [h.probabilities_calibrated ? "calibrated probabilities" : "probabilities NOT calibrated"];
  if (h.prediction_sets) parts.push("conformal prediction sets at " + pct(h.calibration.target_coverage) + " coverage");
  return parts.join(" · ");
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
    $("bundle-calibration").textContent = calibrationSummary(health);
    if (health.calibration && health.calibration.reason) $("bundle-calibration").title = health.calibration.reason;
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

function renderReferral(res) {
  const box = $("refer-box");
  const set = "{" + res.prediction_set.join(", ") + "}";
  if (res.refer === true) {
    box.className = "refer-box refer";
    box.textContent = "REFER: the prediction set " + set + " holds " + res.prediction_set.length +
      " classes; the model cannot single out one class at " + pct(res.calibration.target_coverage) +
      " coverage. A person should decide.";
  } else if (res.refer === false) {
    // caveats about the sets themselves (e.g. calibrated on predictions without an error: referral never learnt)
    const caveats = (res.calibration.warnings || []).filter((w) => !w.startsWith("probabilities are not calibrated"));
    box.className = "refer-box" + (caveats.length ? " caution" : " no-refer");
    box.textContent = "No referral flag: the " + pct(res.calibration.target_coverage) + " prediction set holds one class, " +
      set + "." + (caveats.length ? " Caution: " + caveats.join("; ") + "." : "");
  } else {
    box.className = "refer-box caution";
    box.textContent = "No referral flag available: this bundle has no conformal calibration, so the model cannot " +
      "say when it is unsure. Treat the result as unreviewed model output.";
  }
}

function render(res) {
  $("predicted").textContent = res.predicted;
  const chip = $("calibration-chip");
  chip.textContent = res.probabilities_calibrated ? "calibrated" : "uncalibrated";
  chip.className = "chip " + (res.probabilities_calibrated ? "ok" : "warn");
  renderReferral(res);
  $("probabilities-title").textContent = res.probabilities_calibrated
    ? "Calibrated probabilities" : "Model probabilities (uncalibrated)";
  $("probabilities-note").textContent = res.probabilities_calibrated
    ? "Temperature-scaled on out-of-fold predictions, as batch prediction returns them."
    : "Not calibrated: " + (res.calibration ? res.calibration.reason : "the bundle carries no calibration") +
      ". These are the network's raw softmax outputs and may be over- or under-confident.";
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
    (res.prediction_sets ? " (conformal, " + pct(res.calibration.target_coverage) + " target coverage)"
                    : " (no conformal calibration: top class only)");
  const warnings = $("warnings");
  warnings.textContent = "";
  for (const w of res.warnings || []) {
    // the calibration status and caveats are shown above, next to what they qualify
    if (w.startsWith("Probabilities are the model's own") || w.startsWith("Calibration caveat:")) continue;
    warnings.appendChild(el("li", {}, w));
  }
  const fig = $("overlay-figure");
  if (res.explanation_png_base64) {
    $("overlay").src = "data:image/png;base64," + res.explanation_png_base64;
    $("original").src = lastImageUrl || "";
    $("original").hidden = !lastImageUrl;
    const method = res.explanation_method === "gradcam" ? "Grad-CAM" : "input-gradient saliency";
    $("overlay-title").textContent = "Explanation (" + method + ") for class " + res.predicted;
    $("overlay-caption").textContent = "Left: the uploaded image. Right: the image as the model saw it (grey, " +
      "resized), tinted where the regions raised the score of '" + res.predicted + "': untinted (low), then red, " +
      "yellow and white (high). The scale is relative to this image, not a probability.";
    fig.hidden = false;
  } else {
    fig.hidden = true;
  }
  $("result").hidden = false;
}

let lastImageUrl = null;

function readAsDataUrl(file) {
  return new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => resolve(null);
    reader.readAsDataURL(file);
  });
}

async function submit(ev) {
  ev.preventDefault();
  $("error").hidden = true;
  const data = new FormData();
  const file = $("image").files[0];
  if (file) data.append("image", file);
  // shown beside the overlay (a data: URL: the page's CSP allows no other image source); TIFF may not display
  lastImageUrl = file && $("explain").checked ? await readAsDataUrl(file) : null;
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
