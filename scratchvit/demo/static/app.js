// The demo page: draw on #pad, send the drawing to POST /api/predict as it is drawn, show the answer.
// Plain JavaScript, no libraries and no build step; every request goes to the server that served the page.
"use strict";

const SEND_INTERVAL_MS = 150;   // while drawing, at most one prediction this often: each costs a forward pass
const STROKE_WIDTH = 22;        // in pad pixels (280 wide): about the width of an MNIST stroke once scaled to 20x20
const INK = "#111";
const PAPER = "#fff";           // dark ink on light paper; the server's preprocessing inverts it to MNIST's white on black

// inferno-like colour map anchors (dark -> bright), interpolated linearly
const HEAT = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
              [250, 193, 39], [252, 255, 164]];

const pad = document.getElementById("pad");
const padContext = pad.getContext("2d", { willReadFrequently: true });
const statusLine = document.getElementById("status");
const predictionText = document.getElementById("prediction");
const confidenceText = document.getElementById("confidence");
const barsList = document.getElementById("bars");
const inputCanvas = document.getElementById("input");
const rolloutCanvas = document.getElementById("rollout");
const layerSelect = document.getElementById("layer");
const headsBox = document.getElementById("heads");

let info = null;            // {num_layers, num_heads, grid, classes} from GET /api/info
let hasInk = false;         // anything drawn since the last Clear
let drawing = null;         // the pointer id of the stroke in progress, and its last point
let inFlight = false;       // a request is on its way: never more than one at a time
let wanted = false;         // the drawing changed since the last request was sent
let lastSent = 0;
let timer = null;
let generation = 0;         // bumped by Clear: an answer to a request sent before it is dropped

// ------------------------------------------------------------------------------------------------
// drawing

function clearPad() {
  padContext.fillStyle = PAPER;
  padContext.fillRect(0, 0, pad.width, pad.height);
}

function padPoint(event) {
  // the canvas may be shown larger or smaller than its 280 x 280 pixels
  const box = pad.getBoundingClientRect();
  return { x: (event.clientX - box.left) * pad.width / box.width,
           y: (event.clientY - box.top) * pad.height / box.height };
}

function strokeTo(point) {
  padContext.strokeStyle = INK;
  padContext.lineWidth = STROKE_WIDTH;
  padContext.lineCap = "round";
  padContext.lineJoin = "round";
  padContext.beginPath();
  padContext.moveTo(drawing.point.x, drawing.point.y);
  padContext.lineTo(point.x, point.y);
  padContext.stroke();
  drawing.point = point;
}

pad.addEventListener("pointerdown", (event) => {
  if (drawing !== null || (event.pointerType === "mouse" && event.button !== 0)) return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);    // keep the stroke when the pointer leaves the pad
  drawing = { id: event.pointerId, point: padPoint(event) };
  strokeTo(drawing.point);                   // a dot for a tap
  hasInk = true;
  requestPrediction();
});

pad.addEventListener("pointermove", (event) => {
  if (drawing === null || event.pointerId !== drawing.id) return;
  event.preventDefault();
  // the points the browser merged into this event, for smooth curves from fast strokes
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const each of (events.length ? events : [event])) strokeTo(padPoint(each));
  requestPrediction();
});

function endStroke(event) {
  if (drawing === null || event.pointerId !== drawing.id) return;
  drawing = null;
  requestPrediction(true);                   // the finished stroke is always sent, throttle or not
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

document.getElementById("clear").addEventListener("click", () => {
  clearPad();
  hasInk = false;
  wanted = false;
  generation += 1;
  clearTimeout(timer);
  timer = null;
  showEmpty("Draw a digit from 0 to 9");
});

// ------------------------------------------------------------------------------------------------
// asking the server, throttled: at most one request in flight and one every SEND_INTERVAL_MS

function requestPrediction(now = false) {
  if (!hasInk || info === null) return;
  wanted = true;
  if (inFlight || (timer !== null && !now)) return;     // sent when the request in flight comes back
  const wait = now ? 0 : Math.max(0, lastSent + SEND_INTERVAL_MS - performance.now());
  clearTimeout(timer);
  timer = setTimeout(send, wait);
}

function padPixels() {
  // the pad is gray (ink and paper are grays), so the red channel is the gray value
  const rgba = padContext.getImageData(0, 0, pad.width, pad.height).data;
  const rows = [];
  for (let y = 0; y < pad.height; y++) {
    const row = new Array(pad.width);
    for (let x = 0; x < pad.width; x++) row[x] = rgba[4 * (y * pad.width + x)];
    rows.push(row);
  }
  return rows;
}

async function send() {
  timer = null;
  if (!wanted || inFlight) return;
  wanted = false;
  inFlight = true;
  lastSent = performance.now();
  const sentIn = generation;
  document.body.dataset.state = "waiting";
  try {
    const response = await fetch("/api/predict", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ pixels: padPixels(), layer: Number(layerSelect.value) }),
    });
    const answer = await response.json();
    if (sentIn !== generation) return;           // cleared meanwhile
    if (!response.ok) showError(answer.error || `the server answered ${response.status}`);
    else if (answer.blank) showEmpty(answer.message || "The drawing is blank", "blank");
    else showAnswer(answer);
  } catch (error) {
    if (sentIn === generation) showError(`cannot reach the demo server (${error.message})`);
  } finally {
    inFlight = false;
    if (wanted) requestPrediction();
  }
}

// ------------------------------------------------------------------------------------------------
// showing the answer

function heatColour(value) {
  const position = Math.min(Math.max(value, 0), 1) * (HEAT.length - 1);
  const low = Math.floor(position);
  const high = Math.min(low + 1, HEAT.length - 1);
  const t = position - low;
  return HEAT[low].map((channel, i) => channel + t * (HEAT[high][i] - channel));
}

function drawMap(canvas, input, map) {
  // input: 28 x 28 gray values 0..255; map: grid x grid weights or null.
  // One canvas pixel per input pixel, enlarged by CSS without smoothing (image-rendering: pixelated).
  // With a map, each pixel takes its patch's colour, scaled to the map's largest weight, over a dimmed input.
  const size = input.length;
  canvas.width = size;
  canvas.height = size;
  const context = canvas.getContext("2d");
  const image = context.createImageData(size, size);
  let largest = 0;
  if (map) for (const row of map) for (const value of row) largest = Math.max(largest, value);
  const patch = map ? size / map.length : 1;
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const gray = input[y][x];
      let rgb = [gray, gray, gray];
      if (map) {
        const heat = heatColour(largest > 0 ? map[Math.floor(y / patch)][Math.floor(x / patch)] / largest : 0);
        // the ink stays readable on top of the colour: a pale stroke over the map's colour
        const ink = gray / 255;
        rgb = heat.map((channel) => channel * (1 - 0.55 * ink) + 255 * 0.55 * ink);
      }
      const offset = 4 * (y * size + x);
      image.data[offset] = rgb[0];
      image.data[offset + 1] = rgb[1];
      image.data[offset + 2] = rgb[2];
      image.data[offset + 3] = 255;
    }
  }
  context.putImageData(image, 0, 0);
}

function blankInput() {
  return Array.from({ length: 28 }, () => new Array(28).fill(0));
}

function showBars(probabilities, prediction) {
  barsList.querySelectorAll("li").forEach((item, k) => {
    const p = probabilities ? probabilities[k] : 0;
    item.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    item.querySelector(".value").textContent = probabilities ? `${(100 * p).toFixed(1)}%` : "";
    item.classList.toggle("top", probabilities !== null && k === prediction);
  });
}

function showAnswer(answer) {
  document.body.dataset.state = "shown";
  document.body.dataset.layer = String(answer.layer);     // which layer's heads are shown (the browser test reads it)
  const best = answer.probabilities[answer.prediction];
  predictionText.textContent = answer.classes[answer.prediction];
  confidenceText.textContent = `${(100 * best).toFixed(1)}% sure`;
  statusLine.textContent = "Keep drawing, or Clear to start again";
  statusLine.classList.remove("error");
  showBars(answer.probabilities, answer.prediction);
  drawMap(inputCanvas, answer.input, null);
  drawMap(rolloutCanvas, answer.input, answer.rollout);
  headsBox.querySelectorAll("canvas").forEach((canvas, h) => drawMap(canvas, answer.input, answer.heads[h]));
}

function showEmpty(message, state = "empty") {
  document.body.dataset.state = state;
  predictionText.textContent = "–";
  confidenceText.textContent = "";
  statusLine.textContent = message;
  statusLine.classList.remove("error");
  showBars(null, -1);
  const input = blankInput();
  for (const canvas of [inputCanvas, rolloutCanvas, ...headsBox.querySelectorAll("canvas")]) drawMap(canvas, input, null);
}

function showError(message) {
  document.body.dataset.state = "error";
  statusLine.textContent = message;
  statusLine.classList.add("error");
}

// ------------------------------------------------------------------------------------------------
// start: ask the model's sizes, then lay out the bars, the layer choice and one map per head

function layOut() {
  for (const name of info.classes) {
    const item = document.createElement("li");
    item.innerHTML = '<span class="label"></span><span class="track"><span class="fill"></span></span><span class="value"></span>';
    item.querySelector(".label").textContent = name;
    barsList.appendChild(item);
  }
  for (let layer = 0; layer < info.num_layers; layer++) {
    const option = document.createElement("option");
    option.value = String(layer);
    option.textContent = `layer ${layer + 1} of ${info.num_layers}`;
    layerSelect.appendChild(option);
  }
  layerSelect.value = String(info.num_layers - 1);
  layerSelect.addEventListener("change", () => requestPrediction(true));
  for (let head = 0; head < info.num_heads; head++) {
    const figure = document.createElement("figure");
    const canvas = document.createElement("canvas");
    canvas.className = "map small";
    const caption = document.createElement("figcaption");
    caption.textContent = `head ${head + 1}`;
    figure.append(canvas, caption);
    headsBox.appendChild(figure);
  }
  document.getElementById("grid-size").textContent = `${info.grid}×${info.grid}`;
}

async function start() {
  clearPad();
  try {
    const response = await fetch("/api/info");
    info = await response.json();
    if (!response.ok) throw new Error(info.error || `status ${response.status}`);
  } catch (error) {
    info = null;
    showError(`cannot reach the demo server (${error.message})`);
    return;
  }
  layOut();
  showEmpty("Draw a digit from 0 to 9");
}

start();
