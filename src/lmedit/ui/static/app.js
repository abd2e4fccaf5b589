// The lmedit page: a form, a job poll, a before/after table, an SVG chart and the patch stack.
// No library and no remote asset; every text from the server goes in with textContent, never as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg"; // a namespace name, not an address anything is fetched from
const POLL_MS = 300;
const $ = (id) => document.getElementById(id);
const state = {methods: {}, rows: [], targets: null, busy: false};

class ApiError extends Error {
  constructor(errors) { super(Object.values(errors).join("; ")); this.errors = errors; }
}

async function call(method, url, body, extraHeaders = {}) {
  const init = {method, headers: {"X-Lmedit": "1", ...extraHeaders}};
  if (body instanceof Blob) init.body = body;
  else if (body !== undefined) { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
  let response;
  try { response = await fetch(url, init); }
  catch (e) { throw new ApiError({form: "the lmedit server does not answer: is `lmedit ui` still running?"}); }
  let data = null;
  try { data = await response.json(); } catch (e) { /* not JSON: reported below */ }
  if (!response.ok || data === null) {
    throw new ApiError((data && data.errors) || {form: `the server answered ${response.status}`});
  }
  return data;
}

// ------------------------------------------------------------------ errors beside their fields

function errorBox(field) {
  const id = field.startsWith("setting:") ? "error-setting-" + field.slice(8) : "error-" + field;
  return $(id) || $("error-form");
}

function clearErrors() {
  for (const el of document.querySelectorAll(".error")) { el.textContent = ""; }
  for (const el of document.querySelectorAll(".invalid")) { el.classList.remove("invalid"); }
}

function showErrors(errors, fallback = "form") {
  for (const [field, message] of Object.entries(errors)) {
    const box = field === "form" ? $("error-" + fallback) || $("error-form") : errorBox(field);
    box.textContent = message;
    const input = box.previousElementSibling;
    if (input && input.matches("input, select, textarea")) input.classList.add("invalid");
  }
}

// ------------------------------------------------------------------ methods and their settings

function renderSettings() {
  const box = $("settings");
  for (const el of [...box.querySelectorAll(".setting")]) el.remove();
  const method = state.methods[$("method").value];
  $("method-summary").textContent = method ? method.summary : "";
  for (const [key, value] of Object.entries(method ? method.settings : {})) {
    const div = document.createElement("div");
    div.className = "setting";
    const label = document.createElement("label");
    label.htmlFor = "setting-" + key;
    label.textContent = key;
    const input = document.createElement("input");
    input.id = "setting-" + key;
    input.dataset.key = key;
    input.value = value;
    input.autocomplete = "off";
    const error = document.createElement("div");
    error.className = "error";
    error.id = "error-setting-" + key;
    div.append(label, input, error);
    box.append(div);
  }
}

async function loadInfo() {
  const info = await call("GET", "/api/info");
  $("model").textContent = `${info.model} (${info.model_type}, ${info.layers} layers)`;
  const select = $("method");
  select.textContent = "";
  for (const m of info.methods) {
    state.methods[m.name] = m;
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = m.fits ? m.name : `${m.name} (does not fit this model)`;
    option.disabled = !m.fits;
    if (!m.fits) option.title = m.reason;
    select.append(option);
  }
  const first = info.methods.find((m) => m.name === "rome" && m.fits) || info.methods.find((m) => m.fits);
  if (first) select.value = first.name;
  renderSettings();
  renderStack(info.stack);
}

// ------------------------------------------------------------------ the form

function formPrompts() {
  const subject = $("subject").value;
  let prompt = $("prompt").value;
  if (prompt.includes("{}") && subject.trim()) prompt = prompt.split("{}").join(subject);
  const probes = $("probes").value.split("\n").map((p) => p.trim()).filter((p) => p);
  return [prompt, ...probes.filter((p) => p !== prompt)];
}

function editForm() {
  const settings = {};
  for (const input of $("settings").querySelectorAll("input[data-key]")) settings[input.dataset.key] = input.value;
  return {prompt: $("prompt").value, subject: $("subject").value, target_new: $("target_new").value,
          target_true: $("target_true").value, method: $("method").value, settings,
          other_settings: $("other_settings").value, probes: $("probes").value.split("\n")};
}

function setBusy(busy) {
  state.busy = busy;
  $("edit-button").disabled = busy;
  $("edit-button").textContent = busy ? "Editing…" : "Edit";
}

async function submitEdit(event) {
  event.preventDefault();
  clearErrors();
  let job;
  try { job = await call("POST", "/api/edit", editForm()); }
  catch (e) { showErrors(e.errors); return; }
  setBusy(true);
  $("progress").hidden = false;
  await poll(job.job);
}

async function poll(jobId) {
  for (;;) {
    let status;
    try { status = await call("GET", `/api/jobs/${jobId}`); }
    catch (e) { showErrors(e.errors); setBusy(false); return; }
    renderProgress(status);
    if (status.state === "done") { showEdit(status.result); setBusy(false); return; }
    if (status.state === "failed") { showErrors({[status.error.field]: status.error.message}); setBusy(false); return; }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

function renderProgress(status) {
  const line = $("status");
  line.dataset.state = status.state;
  line.textContent = status.state === "queued" ? `queued: ${status.position} edit(s) ahead`
    : status.state === "running" ? `editing… ${status.elapsed} s`
    : status.state === "done" ? `done in ${status.result.seconds} s` : "failed";
  const bars = $("bars");
  bars.textContent = "";
  for (const bar of status.progress) {
    const row = document.createElement("div");
    row.className = "bar";
    const meter = document.createElement("progress");
    if (bar.total) { meter.max = bar.total; meter.value = bar.n; }
    const text = document.createElement("span");
    text.textContent = `${bar.desc} ${bar.n}${bar.total ? "/" + bar.total : ""} ${bar.unit}`;
    row.append(meter, text);
    bars.append(row);
  }
  $("log").textContent = status.log.slice(-8).join("\n");
}

// ------------------------------------------------------------------ before / after / now

function showEdit(result) {
  state.targets = {target_new: result.request.target_new, target_true: result.request.target_true};
  state.rows = result.before.map((b, i) => ({prompt: b.prompt, before: b, after: result.after[i],
                                             now: result.after[i]}));
  renderRows();
  renderStack(result.stack);
}

function fmt(p) {
  if (p === null || p === undefined) return "–";
  return p < 0.001 ? p.toExponential(1) : p.toFixed(3);
}

function renderRows() {
  const body = $("results").querySelector("tbody");
  body.textContent = "";
  state.rows.forEach((row, i) => {
    const tr = document.createElement("tr");
    tr.dataset.row = i;
    const head = document.createElement("td");
    head.textContent = row.prompt;
    head.className = "prompt";
    tr.append(head);
    for (const col of ["before", "after", "now"]) {
      const scores = row[col];
      for (const key of ["completion", "p_new", "p_true"]) {
        const td = document.createElement("td");
        td.dataset.col = col;
        td.dataset.key = key;
        if (scores) {
          if (key === "completion") { td.textContent = scores.completion; td.className = "completion"; }
          else {
            td.textContent = fmt(scores[key]);
            td.className = "p";
            if (scores[key] !== null) td.dataset.value = scores[key]; // full precision, for scripts and tests
          }
        }
        tr.append(td);
      }
    }
    body.append(tr);
  });
  $("results").hidden = state.rows.length === 0;
  $("results-empty").hidden = state.rows.length > 0;
  drawChart();
}

async function probeNow(prompts, targets) {
  const data = await call("POST", "/api/probe", {prompts, ...targets});
  const same = state.targets && targets.target_new === state.targets.target_new
    && targets.target_true === state.targets.target_true;
  const old = new Map(same ? state.rows.map((r) => [r.prompt, r]) : []);
  state.rows = data.rows.map((now) => ({...(old.get(now.prompt) || {prompt: now.prompt}), now}));
  if (!same) state.targets = targets;
  renderRows();
}

async function probeButton() {
  clearErrors();
  const targets = {target_new: $("target_new").value, target_true: $("target_true").value || null};
  try { await probeNow(formPrompts(), targets); } catch (e) { showErrors(e.errors, "probe"); }
}

async function refreshNow() {
  if (!state.targets || state.rows.length === 0) return;
  await probeNow(state.rows.map((r) => r.prompt), state.targets);
}

// ------------------------------------------------------------------ the chart (SVG, drawn here)

function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function drawChart() {
  const chart = $("chart");
  chart.textContent = "";
  const rows = state.rows.filter((r) => r.before && r.after);
  $("chart-box").hidden = rows.length === 0;
  if (!rows.length) return;
  const series = [["p_new", "before", "new-before", "P(new) before"],
                  ["p_new", "after", "new-after", "P(new) after"],
                  ["p_true", "before", "true-before", "P(true) before"],
                  ["p_true", "after", "true-after", "P(true) after"]]
    .filter(([key]) => key === "p_new" || rows.some((r) => r.before.p_true !== null));
  const labelW = 220, barW = 300, barH = 9, gap = 14, top = 28;
  const blockH = series.length * barH + gap;
  const width = labelW + Math.max(barW + 60, series.length * 105), height = top + rows.length * blockH + 18;
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  chart.setAttribute("width", width);
  chart.setAttribute("height", height);
  series.forEach(([, , cls, name], i) => {
    chart.append(svg("rect", {x: labelW + i * 105, y: 6, width: 10, height: 10, class: cls}));
    chart.append(svg("text", {x: labelW + i * 105 + 14, y: 15, class: "legend"}, name));
  });
  rows.forEach((row, r) => {
    const y0 = top + r * blockH;
    const label = row.prompt.length > 34 ? row.prompt.slice(0, 33) + "…" : row.prompt;
    const labelY = y0 + series.length * barH / 2 + 4;
    chart.append(svg("text", {x: labelW - 8, y: labelY, class: "label", "text-anchor": "end"}, label));
    series.forEach(([key, col, cls], i) => {
      const p = row[col][key] || 0;
      const y = y0 + i * barH;
      chart.append(svg("rect", {x: labelW, y, width: Math.max(1, p * barW), height: barH - 2, class: cls}));
      chart.append(svg("text", {x: labelW + Math.max(1, p * barW) + 4, y: y + barH - 2, class: "value"}, fmt(p)));
    });
  });
  const axisY = top + rows.length * blockH;
  chart.append(svg("line", {x1: labelW, y1: axisY, x2: labelW + barW, y2: axisY, class: "axis"}));
  for (const t of [0, 0.5, 1]) {
    chart.append(svg("text", {x: labelW + t * barW, y: axisY + 12, class: "tick", "text-anchor": "middle"}, String(t)));
  }
}

// ------------------------------------------------------------------ the patch stack

function renderStack(stack) {
  const list = $("stack");
  list.textContent = "";
  $("stack-empty").hidden = stack.length > 0;
  for (const entry of stack) {
    const li = document.createElement("li");
    li.dataset.id = entry.id;
    const title = document.createElement("strong");
    title.textContent = entry.label;
    const vstar = entry.meta.v_star && entry.meta.v_star.target_prob;
    const facts = [`${entry.num_params.toLocaleString()} numbers`,
      `‖ΔW‖ ${Object.values(entry.norms).map((n) => n.toPrecision(3)).join(", ")}`];
    if (vstar) facts.push(`v* reached P(new) ${vstar.map(fmt).join(", ")}`);
    const line = document.createElement("div");
    line.className = "note";
    line.textContent = facts.join(" · ");
    const revert = document.createElement("button");
    revert.type = "button";
    revert.className = "revert";
    revert.textContent = "Revert";
    revert.disabled = !entry.top;
    revert.title = entry.top ? "restore the weights this patch changed, bit for bit"
      : "revert the patches above it first";
    revert.addEventListener("click", () => revertEntry(entry.id));
    const save = document.createElement("a");
    save.className = "save";
    save.href = `/api/patches/${entry.id}/archive`;
    save.textContent = "Save (.zip)";
    save.setAttribute("download", "");
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = "metadata";
    const pre = document.createElement("pre");
    pre.textContent = entry.summary + "\n\n" + JSON.stringify(entry.meta, null, 1);
    details.append(summary, pre);
    li.append(title, line, revert, save, details);
    list.append(li);
  }
}

async function revertEntry(id) {
  clearErrors();
  try {
    const data = await call("POST", `/api/patches/${id}/revert`);
    renderStack(data.stack);
    await refreshNow();
  } catch (e) { showErrors(e.errors, "upload"); }
}

async function uploadPatch() {
  clearErrors();
  const file = $("upload").files[0];
  if (!file) { showErrors({upload: "choose a saved patch file first"}); return; }
  try {
    const data = await call("POST", "/api/patches", file, {"Content-Type": "application/octet-stream",
                                                            "X-Filename": encodeURIComponent(file.name)});
    renderStack(data.stack);
    await refreshNow();
  } catch (e) { showErrors(e.errors, "upload"); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("edit-form").addEventListener("submit", submitEdit);
  $("method").addEventListener("change", () => { clearErrors(); renderSettings(); });
  $("probe-button").addEventListener("click", probeButton);
  $("upload-button").addEventListener("click", uploadPatch);
  loadInfo().catch((e) => showErrors(e.errors || {form: String(e)}));
});
