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
    $("box-row").hidden = !schema.accepts_box;
    const note = $("outline-source-note");
    if (schema.accepts_mask) {
      note.textContent = schema.has_segmenter
        ? "Without a mask or a box, this model outlines the lesion itself (its segmenter); check the outline shown with the result."
        : "Without a mask or a box, this model has no lesion outline: its lesion radiomics are then scored as unknown.";
      note.hidden = false;
    }
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

// Where the lesion outline came from, in words (the API's mask_source).
const MASK_SOURCE_WORDS = {
  expert: "from your mask",
  box: "outline from your box (LiteMedSAM)",
  predicted: "predicted by the model's segmenter",
  none: "no outline: radiomics unknown",
};

function renderOutline(res) {
  const line = $("mask-source-line");
  if (res.mask_source) {
    $("mask-source").textContent = MASK_SOURCE_WORDS[res.mask_source] || res.mask_source;
    line.dataset.source = res.mask_source;
    line.hidden = false;
  } else {
    line.hidden = true;
  }
  const fig = $("outline-figure");
  if (res.lesion_outline_png_base64) {
    $("outline").src = "data:image/png;base64," + res.lesion_outline_png_base64;
    $("outline").alt = "the uploaded image with the lesion outline (" +
      (MASK_SOURCE_WORDS[res.mask_source] || res.mask_source) + ") drawn in green" +
      (res.mask_source === "box" ? " and your box in yellow" : "");
    $("outline-caption").textContent = "Green: the lesion outline the radiomics were read inside (" +
      (MASK_SOURCE_WORDS[res.mask_source] || res.mask_source) + ")" +
      (res.mask_source === "box" ? "; yellow: your box" : "") + ". Check that it follows the lesion.";
    fig.hidden = false;
  } else {
    fig.hidden = true;
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
  renderOutline(res);
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
  const bbox = $("bbox").value.trim();
  if (bbox && !$("box-row").hidden) data.append("bbox", bbox);
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

// ---- the box around the lesion: drawn by dragging on a canvas showing the chosen image, or typed. ----
// The box is kept in the ORIGINAL image's pixels (the canvas is drawn smaller and may be scaled by CSS too).
const boxState = { img: null, w: 0, h: 0, boxes: [], start: null, pointer: null };
const CANVAS_MAX_SIDE = 640;
const MIN_BOX_PX = 2;

function drawBoxes() {
  const c = $("box-canvas");
  if (!boxState.img) return;
  const ctx = c.getContext("2d");
  ctx.drawImage(boxState.img, 0, 0, c.width, c.height);
  const s = c.width / boxState.w;
  ctx.lineWidth = 2;
  ctx.strokeStyle = "#ffc800";
  for (const [x0, y0, x1, y1] of boxState.boxes) ctx.strokeRect(x0 * s, y0 * s, (x1 - x0) * s, (y1 - y0) * s);
}

function boxText(boxes) {
  return boxes.map((b) => b.map((v) => String(Math.round(v))).join(",")).join(";");
}

function setBoxStatus() {
  const b = boxState.boxes;
  $("box-status").textContent = b.length
    ? b.map(([x0, y0, x1, y1]) => "box from (" + x0 + ", " + y0 + ") to (" + x1 + ", " + y1 + "), " +
        (x1 - x0) + " × " + (y1 - y0) + " px").join("; ")
    : "No box.";
}

// pointer position on the canvas → original image pixels, clamped to the image
function imagePoint(ev) {
  const r = $("box-canvas").getBoundingClientRect();
  const x = ((ev.clientX - r.left) / r.width) * boxState.w;
  const y = ((ev.clientY - r.top) / r.height) * boxState.h;
  return [Math.min(Math.max(x, 0), boxState.w), Math.min(Math.max(y, 0), boxState.h)];
}

function spanBox(a, b) {
  return [Math.floor(Math.min(a[0], b[0])), Math.floor(Math.min(a[1], b[1])),
          Math.ceil(Math.max(a[0], b[0])), Math.ceil(Math.max(a[1], b[1]))];
}

function onPointerDown(ev) {
  if (!boxState.img || boxState.pointer !== null || (ev.pointerType === "mouse" && ev.button !== 0)) return;
  ev.preventDefault();
  boxState.pointer = ev.pointerId;
  $("box-canvas").setPointerCapture(ev.pointerId);
  boxState.start = imagePoint(ev);
  boxState.boxes = [];
  drawBoxes();
}

function onPointerMove(ev) {
  if (ev.pointerId !== boxState.pointer) return;
  ev.preventDefault();
  boxState.boxes = [spanBox(boxState.start, imagePoint(ev))];
  drawBoxes();
}

function onPointerUp(ev) {
  if (ev.pointerId !== boxState.pointer) return;
  boxState.pointer = null;
  const b = spanBox(boxState.start, imagePoint(ev));
  const tooSmall = b[2] - b[0] < MIN_BOX_PX || b[3] - b[1] < MIN_BOX_PX;
  boxState.boxes = tooSmall ? [] : [b];
  $("bbox").value = boxText(boxState.boxes);
  drawBoxes();
  setBoxStatus();
  if (tooSmall) $("box-status").textContent = "Too small to be a box: drag from one corner of the lesion to the opposite one.";
}

function onPointerCancel(ev) {
  if (ev.pointerId !== boxState.pointer) return;
  boxState.pointer = null;
  boxState.boxes = [];
  $("bbox").value = "";
  drawBoxes();
  setBoxStatus();
}

// a typed box (several joined by ';') is drawn too; the server checks it and names 'bbox' when it is wrong
function onBoxTyped() {
  const text = $("bbox").value.trim();
  const boxes = [];
  let ok = true;
  for (const part of text.split(";").map((p) => p.trim()).filter((p) => p)) {
    const v = part.split(/[\s,]+/).filter((t) => t).map(Number);
    if (v.length === 4 && v.every(Number.isFinite) && v[0] < v[2] && v[1] < v[3]) boxes.push(v);
    else ok = false;
  }
  boxState.boxes = boxes;
  drawBoxes();
  setBoxStatus();
  if (!ok) $("box-status").textContent = "Write a box as four numbers x0,y0,x1,y1 (top-left corner, then bottom-right).";
}

function clearBox() {
  boxState.boxes = [];
  boxState.pointer = null;
  $("bbox").value = "";
  drawBoxes();
  setBoxStatus();
}

async function onImageChosen() {
  clearBox();
  const c = $("box-canvas");
  boxState.img = null;
  c.hidden = true;
  const file = $("image").files[0];
  $("box-no-image").hidden = !!file;
  if (!file || $("box-row").hidden) return;
  const url = await readAsDataUrl(file);
  if (!url) return;
  const img = new Image();
  img.onload = () => {
    if ($("image").files[0] !== file) return; // another image was chosen meanwhile
    boxState.img = img;
    boxState.w = img.naturalWidth;
    boxState.h = img.naturalHeight;
    const s = Math.min(1, CANVAS_MAX_SIDE / Math.max(boxState.w, boxState.h));
    c.width = Math.max(1, Math.round(boxState.w * s));
    c.height = Math.max(1, Math.round(boxState.h * s));
    c.dataset.imageWidth = String(boxState.w);
    c.dataset.imageHeight = String(boxState.h);
    c.hidden = false;
    drawBoxes();
    setBoxStatus();
  };
  img.onerror = () => {
    $("box-status").textContent = "This browser cannot show this image (TIFF, for one): type the box in pixels instead.";
  };
  img.src = url;
}

document.addEventListener("DOMContentLoaded", () => {
  $("predict-form").addEventListener("submit", submit);
  const c = $("box-canvas");
  c.addEventListener("pointerdown", onPointerDown);
  c.addEventListener("pointermove", onPointerMove);
  c.addEventListener("pointerup", onPointerUp);
  c.addEventListener("pointercancel", onPointerCancel);
  $("clear-box").addEventListener("click", clearBox);
  $("bbox").addEventListener("input", onBoxTyped);
  $("image").addEventListener("change", onImageChosen);
  init();
});
