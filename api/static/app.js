// The captioner page: pick a picture, caption it through POST /v1/captions (attention=true),
// and draw any word's attention grid as a heatmap over the picture in a canvas. The heatmap
// is drawn the way captioner.overlay.heatmap_overlay draws it: the grid scaled by its peak,
// stretched bilinearly over the whole picture, coloured, and blended at 0.55.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, picture: null, captions: [], pinned: null, card: null };
const OPACITY = 0.55;
const COLORS = [[20, 20, 120], [40, 120, 220], [230, 60, 40], [255, 230, 60]];
const VIEW_MAX = 512; // longest side of the canvas, in CSS pixels

// --- the API -------------------------------------------------------------

function apiHeaders() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...apiHeaders(), ...(options.headers || {}) } });
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    const error = (body && body.error) || { code: "http_" + response.status, message: response.statusText };
    throw Object.assign(new Error(error.message), { code: error.code, status: response.status });
  }
  return body;
}

// --- the model card ------------------------------------------------------

function describeTraining(data) {
  if (data == null) return null;
  if (typeof data === "string") return data;
  if (typeof data === "object") {
    const name = data.name || data.dataset || data.source;
    if (name) return name;  // a named data set says enough; its paths and split sizes are in the JSON card
    const rest = Object.entries(data).filter(([k]) => !["name", "dataset", "source"].includes(k))
      .map(([k, v]) => `${k.replace(/_/g, " ")}: ${typeof v === "object" ? JSON.stringify(v) : v}`);
    return [name, rest.length ? `(${rest.join(", ")})` : ""].filter(Boolean).join(" ");
  }
  return String(data);
}

function formatScore(v) {
  return typeof v === "number" ? (Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(3)) : String(v);
}

function renderCard(card) {
  state.card = card;
  const box = $("model-card");
  box.replaceChildren();
  const lead = document.createElement("p");
  lead.className = "lead";
  const trained = describeTraining(card.training_data);
  lead.textContent = (trained
    ? `This model was trained on ${trained}. It only knows what it saw there: ` +
      `pictures unlike its training data still get captions in its own ${card.vocabulary.length} words.`
    : `This model's card does not say what it was trained on. It can only use its ${card.vocabulary.length} words.`) +
    (card.description ? ` ${card.description}` : "");
  box.append(lead);

  const facts = document.createElement("p");
  facts.className = "facts";
  const [h, w] = card.attention_grid;
  const runtime = card.runtime ? ` on ${card.runtime.backend} ${card.runtime.precision}` : "";
  const parts = [`encoder ${card.encoder}${runtime}`, `${card.cell.toUpperCase()} decoder`,
    card.attention ? `attention over a ${h}×${w} grid` : "no attention (no heatmaps)",
    `${card.vocab_size} tokens`, `file ${card.checkpoint}`];
  facts.textContent = parts.join(" · ");
  box.append(facts);

  if (card.scores && typeof card.scores === "object" && Object.keys(card.scores).length) {
    const scores = document.createElement("p");
    scores.className = "scores";
    for (const [name, value] of Object.entries(card.scores)) {
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.textContent = `${name} ${typeof value === "object" ? JSON.stringify(value) : formatScore(value)}`;
      scores.append(chip);
    }
    box.append(scores);
  }
  if (card.vocabulary.length <= 300) {
    const words = document.createElement("details");
    words.innerHTML = "<summary>The words it knows</summary>";
    const list = document.createElement("p");
    list.className = "vocabulary";
    list.textContent = card.vocabulary.join(" ");
    words.append(list);
    box.append(words);
  }
  const limits = card.limits;
  for (const [name, max] of [["beam_size", limits.max_beam_size], ["num_captions", limits.max_captions],
                             ["max_length", limits.max_length], ["top_k", limits.max_top_k]]) {
    document.querySelector(`[name=${name}]`).max = max;
  }
}

async function loadCard() {
  try {
    renderCard(await api("/v1/model"));
  } catch (e) {
    const box = $("model-card");
    if (e.status === 401) {
      box.textContent = "This server needs an API key: enter it under “API key” above.";
      $("key-box").open = true;
    } else {
      box.textContent = `Could not load the model card: ${e.message}`;
    }
    box.classList.add("error");
    return;
  }
  $("model-card").classList.remove("error");
}

// --- the picture and its heatmaps -----------------------------------------

function colour(v) {
  const x = Math.min(Math.max(v, 0), 1) * (COLORS.length - 1);
  const low = Math.min(Math.floor(x), COLORS.length - 2);
  const f = x - low;
  return COLORS[low].map((c, i) => c * (1 - f) + COLORS[low + 1][i] * f);
}

// Bilinear resampling of a small grid (h, w) to (H, W), pixel centres aligned as in Pillow.
function stretch(grid, W, H) {
  const h = grid.length, w = grid[0].length;
  const out = new Float32Array(W * H);
  for (let y = 0; y < H; y++) {
    const sy = Math.min(Math.max((y + 0.5) * h / H - 0.5, 0), h - 1);
    const y0 = Math.floor(sy), y1 = Math.min(y0 + 1, h - 1), fy = sy - y0;
    for (let x = 0; x < W; x++) {
      const sx = Math.min(Math.max((x + 0.5) * w / W - 0.5, 0), w - 1);
      const x0 = Math.floor(sx), x1 = Math.min(x0 + 1, w - 1), fx = sx - x0;
      const top = grid[y0][x0] * (1 - fx) + grid[y0][x1] * fx;
      const bottom = grid[y1][x0] * (1 - fx) + grid[y1][x1] * fx;
      out[y * W + x] = top * (1 - fy) + bottom * fy;
    }
  }
  return out;
}

function drawPicture(grid) {
  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  ctx.drawImage(state.picture, 0, 0, canvas.width, canvas.height);
  if (!grid) return;
  const peak = Math.max(...grid.flat()) || 1;
  const scaled = grid.map((row) => row.map((v) => Math.round(v / peak * 255) / 255));
  const heat = stretch(scaled, canvas.width, canvas.height);
  const image = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const px = image.data;
  for (let i = 0; i < heat.length; i++) {
    const c = colour(heat[i]);
    for (let k = 0; k < 3; k++) px[4 * i + k] = px[4 * i + k] * (1 - OPACITY) + c[k] * OPACITY;
  }
  ctx.putImageData(image, 0, 0);
}

function showPicture(file) {
  state.picture = null; // until the new picture loads: never a stale one under new captions
  $("view").hidden = true;
  $("drop-text").hidden = false;
  $("dropzone").classList.remove("has-picture");
  $("view-label").innerHTML = "&nbsp;";
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {
    state.picture = img;
    const scale = VIEW_MAX / Math.max(img.naturalWidth, img.naturalHeight); // small pictures grow too
    const canvas = $("view");
    canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
    canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
    canvas.hidden = false;
    $("drop-text").hidden = true;
    $("dropzone").classList.add("has-picture");
    drawPicture(null);
    URL.revokeObjectURL(url);
  };
  img.onerror = () => URL.revokeObjectURL(url); // the browser cannot show it; the server will say why
  img.src = url;
}

function focusWord(target) {
  document.querySelectorAll(".word.active").forEach((el) => el.classList.remove("active"));
  if (!target || !state.picture) {
    if (state.picture) drawPicture(null);
    $("view-label").innerHTML = "&nbsp;";
    return;
  }
  const { caption, index } = target;
  const grid = state.captions[caption].attention[index];
  target.element.classList.add("active");
  drawPicture(grid);
  $("view-label").textContent = `where the model looked to say “${state.captions[caption].tokens[index]}”`;
}

// --- captioning ------------------------------------------------------------

function currentMethod() {
  return document.querySelector("input[name=method]:checked").value;
}

function updateKnobs() {
  const method = currentMethod();
  document.querySelectorAll(".knobs label").forEach((label) => {
    label.hidden = !label.dataset.for.split(" ").includes(method);
  });
}

function formData() {
  const data = new FormData();
  data.append("images", state.file, state.file.name);
  const method = currentMethod();
  data.append("method", method);
  document.querySelectorAll(".knobs label").forEach((label) => {
    const input = label.querySelector("input");
    if (!label.hidden && input.value !== "") data.append(input.name, input.value);
  });
  if (method === "beam") { // beam search returns at most beam_size captions
    const beam = Number(data.get("beam_size")), wanted = Number(data.get("num_captions"));
    if (wanted > beam) data.set("num_captions", String(beam));
  }
  data.append("attention", "true");
  return data;
}

function renderCaptions(result) {
  state.captions = result.captions;
  state.pinned = null;
  const list = $("captions");
  list.replaceChildren();
  const canLook = Boolean(state.card ? state.card.attention : true);
  result.captions.forEach((caption, c) => {
    const item = document.createElement("li");
    const words = document.createElement("span");
    words.className = "words";
    caption.tokens.forEach((token, i) => {
      const word = document.createElement(canLook && caption.attention ? "button" : "span");
      word.type = "button";
      word.className = "word";
      word.textContent = token;
      if (canLook && caption.attention) {
        const target = { caption: c, index: i, element: word };
        word.addEventListener("mouseenter", () => focusWord(target));
        word.addEventListener("focus", () => focusWord(target));
        word.addEventListener("mouseleave", () => focusWord(state.pinned));
        word.addEventListener("blur", () => focusWord(state.pinned));
        word.addEventListener("click", () => {
          state.pinned = state.pinned && state.pinned.element === word ? null : target;
          document.querySelectorAll(".word.pinned").forEach((el) => el.classList.remove("pinned"));
          if (state.pinned) word.classList.add("pinned");
          focusWord(state.pinned || target);
        });
      }
      words.append(word, " ");
    });
    if (!caption.tokens.length) words.textContent = "(an empty caption)";
    const score = document.createElement("span");
    score.className = "logprob";
    score.title = "log-probability of the caption (higher is likelier)";
    score.textContent = `log p = ${caption.log_prob.toFixed(2)}`;
    item.append(words, score);
    list.append(item);
  });
  $("hint").hidden = !(canLook && result.captions.some((c) => c.attention));
}

async function caption(event) {
  if (event) event.preventDefault();
  if (!state.file) return;
  const button = $("run");
  button.disabled = true;
  $("status").className = "muted";
  $("status").textContent = "Captioning…";
  const started = performance.now();
  try {
    const body = await api("/v1/captions", { method: "POST", body: formData() });
    const result = body.results[0];
    renderCaptions(result);
    focusWord(null);
    const ms = Math.round(performance.now() - started);
    $("status").textContent = `${result.captions.length} caption${result.captions.length === 1 ? "" : "s"} ` +
      `by ${result.method} in ${ms} ms, for ${result.file} (${result.width}×${result.height}).`;
  } catch (e) {
    $("captions").replaceChildren();
    $("hint").hidden = true;
    $("status").className = "error";
    $("status").textContent = e.status === 401
      ? "The server needs an API key: enter it under “API key” above."
      : `Could not caption this picture: ${e.message}`;
  } finally {
    button.disabled = false;
  }
}

function pick(file) {
  if (!file) return;
  state.file = file;
  state.captions = [];
  $("captions").replaceChildren();
  showPicture(file);
  $("run").disabled = false;
  caption();
}

// --- wiring ----------------------------------------------------------------

// The API key lives in this tab's sessionStorage only: gone when the tab closes, never written to
// disk for other tabs and later visits as localStorage would (older versions put it there: removed).
const KEY_NAME = "captioner.apiKey";

function init() {
  const key = $("api-key");
  localStorage.removeItem(KEY_NAME);
  key.value = sessionStorage.getItem(KEY_NAME) || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_NAME, key.value.trim());
    loadCard();
  });
  $("key-form").addEventListener("submit", (e) => { e.preventDefault(); key.dispatchEvent(new Event("change")); });
  document.querySelectorAll("input[name=method]").forEach((r) => r.addEventListener("change", updateKnobs));
  updateKnobs();
  $("options").addEventListener("submit", caption);
  $("file").addEventListener("change", (e) => pick(e.target.files[0]));
  const zone = $("dropzone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    pick(e.dataTransfer.files[0]);
  });
  loadCard();
}

init();
