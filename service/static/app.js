// The page: draw a 28 × 28 binary digit, score it with POST /loglik, decode it with POST /reconstruct,
// show samples (GET /sample) and the model cards (GET /models). Public API only; no libraries, no build step.
"use strict";

const SIDE = 28;
const pixels = new Uint8Array(SIDE * SIDE); // 1 = ink (white on black, as in MNIST)
const pen = { x: 14, y: 14, down: false, last: null };
const $ = (id) => document.getElementById(id);
let models = [];

// --- drawing ------------------------------------------------------------------------------------------
const pad = $("pad");
const ctx = pad.getContext("2d");

function render() {
  const img = ctx.createImageData(SIDE, SIDE);
  for (let i = 0; i < pixels.length; i++) {
    const v = pixels[i] ? 255 : 0;
    img.data.set([v, v, v, 255], 4 * i);
  }
  ctx.putImageData(img, 0, 0);
}

// A pen 3 pixels wide (a plus shape): about the stroke width of MNIST digits.
function stamp(x, y) {
  for (const [dx, dy] of [[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]]) {
    const u = x + dx, v = y + dy;
    if (u >= 0 && u < SIDE && v >= 0 && v < SIDE) pixels[v * SIDE + u] = 1;
  }
}

// Every cell on the segment, so that fast strokes stay connected.
function line(a, b) {
  const steps = Math.max(Math.abs(b.x - a.x), Math.abs(b.y - a.y), 1);
  for (let i = 0; i <= steps; i++) {
    stamp(Math.round(a.x + ((b.x - a.x) * i) / steps), Math.round(a.y + ((b.y - a.y) * i) / steps));
  }
}

function cellOf(event) {
  const r = pad.getBoundingClientRect();
  const x = Math.floor(((event.clientX - r.left) / r.width) * SIDE);
  const y = Math.floor(((event.clientY - r.top) / r.height) * SIDE);
  return { x: Math.min(SIDE - 1, Math.max(0, x)), y: Math.min(SIDE - 1, Math.max(0, y)) };
}

pad.addEventListener("pointerdown", (e) => {
  e.preventDefault();
  pad.setPointerCapture(e.pointerId);
  pen.last = cellOf(e);
  stamp(pen.last.x, pen.last.y);
  render();
});
pad.addEventListener("pointermove", (e) => {
  if (pen.last === null) return;
  const c = cellOf(e);
  line(pen.last, c);
  pen.last = c;
  render();
});
for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
  pad.addEventListener(type, () => { pen.last = null; });
}

// Keyboard: arrows move the pen, Space lowers or lifts it, Delete clears, Enter scores.
const MOVES = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
pad.addEventListener("keydown", (e) => {
  if (e.key in MOVES) {
    const [dx, dy] = MOVES[e.key];
    const next = { x: Math.min(SIDE - 1, Math.max(0, pen.x + dx)), y: Math.min(SIDE - 1, Math.max(0, pen.y + dy)) };
    if (pen.down) line(pen, next);
    Object.assign(pen, next);
  } else if (e.key === " ") {
    pen.down = !pen.down;
    if (pen.down) stamp(pen.x, pen.y);
  } else if (e.key === "Delete" || e.key === "Backspace") {
    clearPad();
  } else if (e.key === "Enter") {
    $("score-form").requestSubmit();
  } else {
    return;
  }
  e.preventDefault();
  render();
  showPen();
});
pad.addEventListener("blur", () => { $("pen-position").textContent = ""; });

function showPen() {
  $("pen-position").textContent = `Pen at column ${pen.x + 1}, row ${pen.y + 1}, ${pen.down ? "drawing" : "lifted"}.`;
  let cursor = $("pen-cursor");
  if (!cursor) {
    cursor = document.createElement("div");
    cursor.id = "pen-cursor";
    cursor.setAttribute("aria-hidden", "true");
    pad.parentElement.appendChild(cursor);
  }
  cursor.style.left = `${(100 * pen.x) / SIDE}%`;
  cursor.style.top = `${(100 * pen.y) / SIDE}%`;
  cursor.classList.toggle("down", pen.down);
}

function clearPad() {
  pixels.fill(0);
  pen.down = false;
  render();
}
$("clear").addEventListener("click", () => { clearPad(); pad.focus(); });

// --- API calls --------------------------------------------------------------------------------------------
async function api(path, options) {
  const r = await fetch(path, options);
  if (!r.ok) {
    let message = `${r.status} ${r.statusText}`;
    try {
      const body = await r.json();
      message = body.detail || body.error || message;
    } catch (_) { /* not JSON: keep the status line */ }
    throw new Error(message);
  }
  return r.json();
}

function imageRows() {
  const rows = [];
  for (let y = 0; y < SIDE; y++) rows.push(Array.from(pixels.subarray(y * SIDE, (y + 1) * SIDE)));
  return rows;
}

function postImages(path, params) {
  const query = new URLSearchParams(params).toString();
  return api(`${path}?${query}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ images: [imageRows()] }),
  });
}

// --- scoring ------------------------------------------------------------------------------------------
const fmt = (v, digits) => (v === null || v === undefined ? "n/a" : v.toFixed(digits));

function reading(p, k, pk) {
  if (p === null || p === undefined) {
    return { text: "This model's card has no test-set percentiles, so there is no reading.", unusual: false };
  }
  const at = pk === k ? "" : ` (compared with test digits scored at k = ${pk})`;
  if (p < 1) {
    const share = p === 0 ? "every" : `${fmt(100 - p, 1)}% of`;
    return { text: `Unusual: lower than ${share} test digits${at}.`, unusual: true };
  }
  if (p < 5) return { text: `Atypical: lower than ${fmt(100 - p, 1)}% of test digits${at}.`, unusual: true };
  if (p > 99) {
    return {
      text: `Unusual: higher than ${fmt(p, 1)}% of test digits${at}. Density models give simple images, ` +
        "such as an empty pad, a high likelihood.",
      unusual: true,
    };
  }
  return { text: `Typical of MNIST: higher than ${fmt(p, 1)}% of test digits${at}.`, unusual: false };
}

function showScore(body) {
  const r = body.results[0];
  const set = (id, text, value) => {
    const el = $(id);
    el.textContent = text;
    if (value !== undefined) el.dataset.value = String(value);
  };
  set("loglik", fmt(r.loglik, 2), r.loglik);
  set("stderr", fmt(r.stderr, 2), r.stderr);
  set("bpd", fmt(r.bits_per_dim, 4), r.bits_per_dim);
  set("ess", `${fmt(r.ess, 1)} of ${body.k}`, r.ess);
  const p = r.percentile;
  set("percentile", p === null || p === undefined ? "n/a" : `${fmt(p, 1)} (k = ${body.percentile_k})`, p);
  $("stats").hidden = false;
  const read = reading(p, body.k, body.percentile_k);
  $("reading").textContent = read.text;
  $("reading").classList.toggle("unusual", read.unusual);
  $("reading").hidden = false;
  $("status").textContent = `Model ${body.model}, k = ${body.k}, seed ${body.seed}.`;
  $("status").dataset.seed = String(body.seed);
}

function probsCanvas(probs, label, caption) {
  const fig = document.createElement("figure");
  fig.setAttribute("role", "listitem");
  const c = document.createElement("canvas");
  c.width = SIDE;
  c.height = SIDE;
  c.setAttribute("role", "img");
  c.setAttribute("aria-label", label);
  const g = c.getContext("2d");
  const img = g.createImageData(SIDE, SIDE);
  probs.forEach((p, i) => {
    const v = Math.round(255 * p);
    img.data.set([v, v, v, 255], 4 * i);
  });
  g.putImageData(img, 0, 0);
  const cap = document.createElement("figcaption");
  cap.textContent = caption || label;
  fig.append(c, cap);
  return fig;
}

function showRecons(body) {
  const box = $("recons");
  box.replaceChildren(probsCanvas(body.mean[0], "posterior mean", "mean"));
  (body.draws ? body.draws[0] : []).forEach((d, i) => box.append(probsCanvas(d, `draw ${i + 1}`)));
}

$("score-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const button = $("score");
  const params = { model: $("model").value, k: $("k").value };
  if ($("seed").value !== "") params.seed = $("seed").value;
  button.disabled = true;
  $("status").classList.remove("error");
  $("status").textContent = "Scoring…";
  try {
    const scored = await postImages("/loglik", params);
    showScore(scored);
    // The same seed: the three draws are the first three samples the bound weighed.
    const rec = await postImages("/reconstruct", { model: params.model, samples: 3, seed: scored.seed });
    showRecons(rec);
  } catch (err) {
    $("status").textContent = `Could not score: ${err.message}`;
    $("status").classList.add("error");
  } finally {
    button.disabled = false;
  }
});

// --- samples and model cards ----------------------------------------------------------------------------
// The first grid uses seed 1 (the same page every time); "New samples" draws with a random seed.
function loadSamples(event) {
  const model = $("model").value;
  const seed = event && event.type === "click" ? Math.floor(Math.random() * 2 ** 31) : 1;
  const img = $("samples");
  img.alt = `16 samples from model ${model}, seed ${seed}`;
  img.src = `/sample?${new URLSearchParams({ n: 16, format: "png", model, seed })}`;
}
$("new-samples").addEventListener("click", loadSamples);

function cardRow(dl, term, value) {
  const div = document.createElement("div");
  const dt = document.createElement("dt");
  const dd = document.createElement("dd");
  dt.textContent = term;
  dd.textContent = value;
  div.append(dt, dd);
  dl.append(div);
}

function renderCards() {
  const box = $("cards");
  box.replaceChildren();
  for (const m of models) {
    const card = m.card || {};
    const test = (card.eval && card.eval.test) || {};
    const art = document.createElement("article");
    const h = document.createElement("h3");
    h.textContent = m.name;
    if (m.default) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = "default";
      h.append(badge);
    }
    const dl = document.createElement("dl");
    const nll = test.nll !== undefined ? test.nll : test.loglik !== undefined ? -test.loglik : undefined;
    cardRow(dl, `test NLL${test.k ? ` (k = ${test.k})` : ""}`, nll === undefined ? "not evaluated" : `${nll.toFixed(2)} nats`);
    const au = test.active_units;
    cardRow(dl, "active units", Array.isArray(au) ? `${au.reduce((a, b) => a + b, 0)} (${au.join(" + ")})` : "n/a");
    cardRow(dl, "epochs", card.epochs !== undefined ? String(card.epochs) : "n/a");
    cardRow(dl, "objective", `${card.objective || "?"}${card.k ? `, k = ${card.k}` : ""}`);
    cardRow(dl, "latent units", (m.config.latent_dims || []).join(", "));
    cardRow(dl, "parameters", m.n_parameters.toLocaleString("en"));
    cardRow(dl, "percentiles", test.quantiles ? `k = ${Object.keys(test.quantiles.by_k).join(", ")}` : "none");
    art.append(h, dl);
    if (m.image_shape) {
      const img = document.createElement("img");
      img.width = 122;
      img.height = 122;
      img.alt = `16 samples from ${m.name} (seed 0)`;
      img.src = `/sample?${new URLSearchParams({ n: 16, format: "png", model: m.name, seed: 0 })}`;
      art.append(img);
    }
    box.append(art);
  }
}

async function init() {
  render();
  try {
    const listing = await api("/models");
    // Only image models can be drawn on this pad.
    models = listing.models.filter((m) => m.x_dim === SIDE * SIDE);
    const select = $("model");
    for (const m of models) {
      const o = document.createElement("option");
      o.value = m.name;
      o.textContent = m.name + (m.default ? " (default)" : "");
      o.selected = m.default;
      select.append(o);
    }
    select.addEventListener("change", loadSamples);
    renderCards();
    loadSamples();
    document.body.dataset.ready = "true";
  } catch (err) {
    $("status").textContent = `Could not load the models: ${err.message}`;
    $("status").classList.add("error");
  }
}
init();
