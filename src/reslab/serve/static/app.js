// The page of `reslab serve`: sends the picked or dropped image to POST /predict and draws the
// answer (top-5 bars, or boxes for a detector), the Grad-CAM overlay when the server offers
// one, and the run's pictures and config from GET /run. No library, nothing from the network.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;

function say(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function errorText(response) {
  try {
    return (await response.json()).error || response.statusText;
  } catch (e) {
    return response.statusText;
  }
}

function showBars(top) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const { class: name, probability } of top) {
    const row = document.createElement("li");
    const label = document.createElement("span");
    label.textContent = name;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = `${(100 * probability).toFixed(1)}%`;
    bar.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = `${(100 * probability).toFixed(1)}%`;
    row.append(label, bar, pct);
    bars.append(row);
  }
}

function showBoxes(answer) {
  const canvas = $("boxes");
  const side = 224;
  canvas.width = canvas.height = side;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, side, side);
  const scale = side / Math.max(answer.width, answer.height);
  const dx = (side - answer.width * scale) / 2, dy = (side - answer.height * scale) / 2;
  ctx.lineWidth = 2;
  ctx.font = "12px sans-serif";
  for (const d of answer.detections) {
    const [x0, y0, x1, y1] = d.box_xyxy.map((v) => v * scale);
    ctx.strokeStyle = ctx.fillStyle = "#e53e3e";
    ctx.strokeRect(dx + x0, dy + y0, x1 - x0, y1 - y0);
    ctx.fillText(`${d.label} ${d.score.toFixed(2)}`, dx + x0 + 2, dy + y0 + 12);
  }
  $("prediction").textContent = `${answer.detections.length} objects`;
  showBars(answer.detections.slice(0, 5).map((d) => ({ class: d.label, probability: d.score })));
}

async function explain(file, name) {
  const form = new FormData();
  form.append("file", file);
  const response = await fetch("/explain", { method: "POST", body: form });
  if (!response.ok) {
    $("explained").hidden = true;
    return;
  }
  const old = $("cam").src;
  $("cam").src = URL.createObjectURL(await response.blob());
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  $("cam-caption").textContent = `Grad-CAM of ${name}, last stage`;
  $("explained").hidden = false;
}

async function send(file) {
  if (!file) return;
  say(`classifying ${file.name}…`);
  const old = $("preview").src;
  $("preview").src = URL.createObjectURL(file);
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  const form = new FormData();
  form.append("file", file);
  let response;
  try {
    response = await fetch("/predict", { method: "POST", body: form });
  } catch (e) {
    say(`the server did not answer: ${e}`, true);
    return;
  }
  if (!response.ok) {
    say(await errorText(response), true);
    $("result").hidden = true;
    return;
  }
  const answer = await response.json();
  $("result").hidden = false;
  $("boxes").getContext("2d").clearRect(0, 0, $("boxes").width, $("boxes").height);
  if (answer.task === "detection") {
    showBoxes(answer);
  } else {
    $("prediction").textContent = answer.prediction;
    showBars(answer.top);
  }
  say(`${file.name}`);
  if (info && info.explain) await explain(file, answer.prediction);
}

function showRun(run) {
  $("model").textContent = `${run.model} · ${run.task} · ${run.classes.length} classes` +
    (run.epoch ? ` · epoch ${run.epoch}` : "");
  const pictures = $("pictures");
  for (const name of run.pictures) {
    const img = document.createElement("img");
    img.src = `/run/${name}.png`;
    img.alt = name;
    pictures.append(img);
  }
  if (!run.pictures.length) pictures.textContent = "no curves or confusion matrix beside this checkpoint";
  const table = $("config");
  for (const [key, value] of Object.entries(run.config)) {
    const row = table.insertRow();
    row.insertCell().textContent = key;
    row.insertCell().textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
  }
}

async function start() {
  const response = await fetch("/run");
  info = await response.json();
  showRun(info);
  const drop = $("drop");
  $("file").addEventListener("change", (e) => send(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    send(e.dataTransfer.files[0]);
  });
}

start();
