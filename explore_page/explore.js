// The explorer's page: asks explore.py's JSON API for the numbers and draws them. No library, no network
// beyond the server that sent this page. document.body.dataset.busy counts the requests in flight (tests wait
// for it to be "0").
"use strict";

const state = {
  card: null,       // GET /api/model
  analysis: null,   // POST /api/analyze of the text shown
  text: "",         // the text that analysis is of
  selected: 0,      // the selected token's position
  added: null,      // the position of the token "add the next token" appended, if the text is still that
};

const $ = (id) => document.getElementById(id);

// ----------------------------------------------------------------------------- requests

async function api(path, body) {
  const busy = document.body.dataset;
  busy.busy = String(Number(busy.busy) + 1);
  try {
    const options = body === undefined ? {} :
      { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
    const response = await fetch(path, options);
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `${path}: HTTP ${response.status}`);
    showError(null);
    return answer;
  } catch (e) {
    showError(e.message);
    throw e;
  } finally {
    busy.busy = String(Number(busy.busy) - 1);
  }
}

function showError(message) {
  const box = $("error");
  box.hidden = !message;
  box.textContent = message || "";
}

function settings() {
  const topK = Number($("top-k").value);
  const topP = Number($("top-p").value);
  return {
    temperature: Number($("temperature").value),
    top_k: topK >= 1 ? Math.floor(topK) : null,
    top_p: topP < 1 ? topP : null,
    seed: $("seed").value === "" ? null : Math.floor(Number($("seed").value)),
  };
}

// ----------------------------------------------------------------------------- helpers

// A token's text with its whitespace made visible: · a space, ↵ a newline, → a tab.
function visible(text) {
  return text.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "→").replace(/\r/g, "␍");
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function percent(p) {
  return p >= 0.001 ? (100 * p).toFixed(1) + "%" : p.toExponential(1);
}

const SURPRISE_MAX = 12; // bits at which a token's colour is at its strongest

// ----------------------------------------------------------------------------- 1. tokens

// added: the id of the token "add the next token" appended to the text, marked if it is the last token
async function analyze(added = null) {
  const text = $("text").value;
  const analysis = await api("/api/analyze", { text });
  state.analysis = analysis;
  state.text = text;
  state.selected = analysis.tokens.length - 1;
  const last = analysis.tokens[state.selected];
  state.added = added !== null && last.id === added ? state.selected : null;
  const truncated = $("truncated");
  truncated.hidden = !analysis.truncated;
  truncated.textContent = analysis.truncated ? analysis.truncated.message : "";
  const bpb = analysis.bits_per_byte === null ? "n/a" : analysis.bits_per_byte.toFixed(3);
  $("summary").textContent = `${analysis.tokens.length} tokens · ${bpb} bits per byte`;
  drawTokens();
  drawSelection();
}

function drawTokens() {
  const box = $("tokens");
  box.replaceChildren();
  state.analysis.tokens.forEach((token, i) => {
    const bits = state.analysis.loss_bits[i];
    const span = el("span", "tok");
    span.dataset.pos = i;
    span.appendChild(el("span", "t", visible(token.text)));
    span.appendChild(el("span", "i", String(token.id)));
    if (bits === null) {
      span.classList.add("first");
      span.title = `id ${token.id}: the first token (nothing before it predicts it)`;
    } else {
      span.style.background = `rgba(214, 39, 40, ${(0.8 * Math.min(1, bits / SURPRISE_MAX)).toFixed(3)})`;
      span.dataset.bits = bits.toFixed(4);
      span.title = `id ${token.id}: ${bits.toFixed(2)} bits (p = ${percent(Math.pow(2, -bits))})`;
    }
    span.addEventListener("click", () => select(i));
    box.appendChild(span);
  });
}

function select(i) {
  state.selected = i;
  drawSelection();
}

function drawSelection() {
  const i = state.selected;
  document.querySelectorAll("#tokens .tok").forEach((span, j) => {
    span.classList.toggle("selected", j === i);
    span.classList.toggle("added", j === state.added);
  });
  const after = `after “${visible(state.analysis.tokens[i].text)}” (token ${i})`;
  $("odds-after").textContent = after;
  $("lens-after").textContent = after;
  drawAttention();
  drawLens();
  updateOdds();
}

// ----------------------------------------------------------------------------- 2. next-token odds

let oddsRequest = 0; // only the latest request's answer is drawn

async function updateOdds() {
  if (!state.analysis) return;
  const mine = ++oddsRequest;
  const answer = await api("/api/next", { text: state.text, position: state.selected, ...settings() });
  if (mine !== oddsRequest) return;
  drawBars(answer.distribution, null);
  $("kept").textContent = `${answer.kept} token${answer.kept === 1 ? "" : "s"} kept` +
    (answer.kept > answer.distribution.length ? `, the ${answer.distribution.length} most likely shown` : "");
}

function drawBars(distribution, chosen) {
  const box = $("bars");
  box.replaceChildren();
  const top = distribution.length ? distribution[0].p : 1;
  for (const c of distribution) {
    const label = el("span", "bar-label", visible(c.text));
    label.title = `id ${c.id}`;
    if (chosen !== null && c.id === chosen) label.classList.add("chosen");
    const track = el("div", "bar-track");
    const bar = el("div", "bar");
    bar.style.width = (100 * c.p / top).toFixed(2) + "%";
    bar.dataset.id = c.id;
    bar.dataset.p = c.p;
    track.appendChild(bar);
    box.append(label, track, el("span", "bar-p", percent(c.p)));
  }
}

async function addToken() {
  const answer = await api("/api/next", { text: $("text").value, ...settings() });
  $("text").value = answer.text;
  $("added").textContent = "";
  await analyze(answer.token.id);
  $("added").textContent = `added “${visible(answer.token.text)}” (id ${answer.token.id}, ` +
    `p = ${percent(answer.p)}, seed ${answer.seed})`;
  $("added").dataset.id = answer.token.id;
}

// ----------------------------------------------------------------------------- 3. attention

function fillAttentionControls() {
  const card = state.card;
  const layer = $("layer");
  for (let l = 0; l < card.config.n_layers; l++) layer.appendChild(new Option(`${l + 1}`, String(l)));
  const head = $("head");
  head.appendChild(new Option("mean of the heads", "mean"));
  const grouped = card.config.arch === "llama" && card.config.n_kv_heads !== card.config.n_heads;
  for (let h = 0; h < card.config.n_heads; h++) {
    const kv = grouped ? ` (key/value head ${card.kv_head_of[h] + 1})` : "";
    head.appendChild(new Option(`${h + 1}${kv}`, String(h)));
  }
  $("kv-note").textContent = grouped ?
    `grouped-query attention: ${card.config.n_heads} query heads share ${card.config.n_kv_heads} key/value heads` : "";
  layer.addEventListener("change", drawAttention);
  head.addEventListener("change", drawAttention);
}

// The (T, T) weights of the chosen layer and head, or the mean of the layer's heads.
function attentionMatrix() {
  const heads = state.analysis.attention[Number($("layer").value)];
  const choice = $("head").value;
  if (choice !== "mean") return heads[Number(choice)];
  const T = heads[0].length;
  return heads[0].map((row, q) => row.map((_, k) => heads.reduce((s, h) => s + h[q][k], 0) / heads.length));
}

function drawAttention() {
  if (!state.analysis || !$("layer").options.length) return;
  const att = attentionMatrix();
  const i = state.selected;
  // the selected token's row, on the tokens it can see
  const row = $("att-row");
  row.replaceChildren();
  for (let k = 0; k <= i; k++) {
    const span = el("span", "tok");
    span.appendChild(el("span", "t", visible(state.analysis.tokens[k].text)));
    span.appendChild(el("span", "i", att[i][k].toFixed(2)));
    span.style.background = `rgba(31, 95, 191, ${att[i][k].toFixed(3)})`;
    span.dataset.w = att[i][k];
    span.title = `weight ${att[i][k].toFixed(4)}`;
    row.appendChild(span);
  }
  // the heat map, made anew only for another text, layer or head; another selection only moves the frame
  const key = `${$("layer").value}/${$("head").value}`;
  if (drawnMap.analysis !== state.analysis || drawnMap.key !== key) {
    drawHeatmap(att);
    drawnMap = { analysis: state.analysis, key };
  }
  document.querySelectorAll("#heatmap .row-selected").forEach((c) => c.classList.remove("row-selected"));
  document.querySelectorAll(`#heatmap .cell[data-q="${i}"]`).forEach((c) => c.classList.add("row-selected"));
}

let drawnMap = { analysis: null, key: null }; // what the heat map shows

function drawHeatmap(att) {
  const T = att.length;
  const map = $("heatmap");
  const size = Math.max(3, Math.min(24, Math.floor((map.parentElement.clientWidth - 4) / T)));
  map.style.gridTemplateColumns = `repeat(${T}, ${size}px)`;
  map.style.gridAutoRows = `${size}px`;
  const tokens = state.analysis.tokens;
  const cells = [];
  for (let q = 0; q < T; q++) {
    for (let k = 0; k < T; k++) {
      const cell = el("div", "cell");
      const w = att[q][k];
      cell.dataset.q = q;
      cell.dataset.k = k;
      cell.dataset.w = w;
      // shade by the square root, so that the many small weights stay visible next to a large one
      cell.style.background = k > q ? "#f3f3f3" : `rgba(31, 95, 191, ${Math.sqrt(w).toFixed(3)})`;
      cell.title = `${visible(tokens[q].text)} → ${visible(tokens[k].text)}: ${w.toFixed(4)}`;
      cells.push(cell);
    }
  }
  map.replaceChildren(...cells);
  map.onclick = (e) => { if (e.target.dataset.q !== undefined) select(Number(e.target.dataset.q)); };
}

// ----------------------------------------------------------------------------- 4. logit lens

function drawLens() {
  const table = $("lens");
  table.replaceChildren();
  const i = state.selected;
  const lens = state.analysis.lens[i];
  const next = i + 1 < state.analysis.tokens.length ? state.analysis.tokens[i + 1] : null;
  const head = el("tr");
  head.append(el("th", "", "depth"), el("th", "", "most likely next tokens"),
              el("th", "", next ? `p(“${visible(next.text)}”, the actual next)` : ""));
  table.appendChild(head);
  lens.forEach((depth, d) => {
    const tr = el("tr");
    tr.dataset.depth = d;
    tr.appendChild(el("th", "", d === 0 ? "embeddings" : `after layer ${d}`));
    const td = el("td");
    for (const c of depth.top) {
      const cand = el("span", "cand", visible(c.text));
      if (next && c.id === next.id) cand.classList.add("next");
      td.append(cand, el("span", "p", ` ${percent(c.p)}`));
    }
    tr.appendChild(td);
    tr.appendChild(el("td", "p", depth.p_next === null ? "" : percent(depth.p_next)));
    table.appendChild(tr);
  });
}

// ----------------------------------------------------------------------------- 5. model card

function drawCard() {
  const card = state.card;
  $("model-line").textContent = `${card.description} · ${card.parameters.toLocaleString("en")} parameters`;
  const rows = [
    ["checkpoint", card.checkpoint],
    ["saved at step", card.step === null ? "unknown" : String(card.step)],
    ["architecture", card.description],
    ["parameters", `${card.parameters.toLocaleString("en")} (${card.parameters_without_embeddings.toLocaleString("en")} without the embeddings)`],
    ["context", `${card.config.max_seq_len} tokens`],
    ["tokenizer", `${card.tokenizer.name} (${card.tokenizer.type}, ${card.tokenizer.n_vocab.toLocaleString("en")} tokens, end-of-text id ${card.tokenizer.eot_id})`],
  ];
  const table = $("card");
  for (const [name, value] of rows) {
    const tr = el("tr");
    tr.append(el("th", "", name), el("td", "", value));
    table.appendChild(tr);
  }
  drawCurves(card.metrics);
}

function drawCurves(metrics) {
  const svg = $("curves");
  const note = $("curves-note");
  if (!metrics || (!metrics.train.length && !metrics.eval.length)) {
    svg.style.display = "none";
    note.textContent = metrics && metrics.note ? metrics.note :
      "no metrics.jsonl beside the checkpoint: no loss curves to draw";
    return;
  }
  note.textContent = `loss in nats per token, from ${metrics.path}`;
  const W = 520, H = 240, left = 44, right = 10, top = 10, bottom = 30;
  const all = metrics.train.concat(metrics.eval);
  const xMax = Math.max(...all.map((p) => p[0]), 1), xMin = Math.min(...all.map((p) => p[0]));
  const yMax = Math.max(...all.map((p) => p[1])), yMin = Math.min(...all.map((p) => p[1]));
  const x = (s) => left + (W - left - right) * (s - xMin) / Math.max(xMax - xMin, 1);
  const y = (v) => top + (H - top - bottom) * (yMax - v) / Math.max(yMax - yMin, 1e-9);
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e);
    return e;
  };
  add("line", { x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, stroke: "#999" });
  add("line", { x1: left, y1: top, x2: left, y2: H - bottom, stroke: "#999" });
  add("text", { x: left - 4, y: top + 10, "text-anchor": "end" }, yMax.toFixed(2));
  add("text", { x: left - 4, y: H - bottom, "text-anchor": "end" }, yMin.toFixed(2));
  add("text", { x: left, y: H - 10 }, `step ${xMin}`);
  add("text", { x: W - right, y: H - 10, "text-anchor": "end" }, `step ${xMax}`);
  const line = (points, colour, cls) => add("polyline", {
    points: points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "),
    fill: "none", stroke: colour, "stroke-width": 1.5, class: cls });
  if (metrics.train.length) line(metrics.train, "#4a72c4", "train");
  if (metrics.eval.length) {
    line(metrics.eval, "#e07b00", "eval");
    for (const p of metrics.eval) add("circle", { cx: x(p[0]), cy: y(p[1]), r: 2.5, fill: "#e07b00" });
  }
  add("text", { x: W - right - 150, y: top + 12, fill: "#4a72c4" }, "— train loss");
  add("text", { x: W - right - 70, y: top + 12, fill: "#e07b00" }, "— val loss");
}

// ----------------------------------------------------------------------------- wiring

function debounce(f, ms) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(f, ms); };
}

async function start() {
  state.card = await api("/api/model");
  drawCard();
  fillAttentionControls();
  $("analyze").addEventListener("click", () => analyze().catch(() => {}));
  $("add-token").addEventListener("click", () => addToken().catch(() => {}));
  const oddsLater = debounce(() => updateOdds().catch(() => {}), 120);
  $("temperature").addEventListener("input", () => {
    $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
    oddsLater();
  });
  $("top-p").addEventListener("input", () => {
    const p = Number($("top-p").value);
    $("top-p-value").textContent = p < 1 ? p.toFixed(2) : "off";
    oddsLater();
  });
  $("top-k").addEventListener("input", oddsLater);
  $("top-k").max = state.card.tokenizer.n_vocab;
  $("text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) analyze().catch(() => {});
  });
  await analyze();
}

start().catch(() => {});
