// The live whiteboard's page. Plain DOM and SVG: no framework, no CDN, so it works offline.
"use strict";

const $ = (selector) => document.querySelector(selector);
const COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
const SVG = "http://www.w3.org/2000/svg";

// What each board shows, in order, with the seed's words and the standard name.
const VIEWS = {
  LSTM: [
    ["cell", "the whiteboard", "cell state c_t: what the board holds after this word"],
    ["forget_gate", "selective forget", "forget gate f_t: what was kept (1) or erased (0)"],
    ["input_gate", "selective read", "input gate i_t: how much of the new word came in"],
    ["output_gate", "selective write", "output gate o_t: how much of the board went out"],
    ["hidden", "what is shown to the next step", "hidden state h_t = o_t · tanh(c_t)"],
  ],
  GRU: [
    ["hidden", "the whiteboard", "hidden state h_t"],
    ["update_gate", "how much is rewritten", "update gate z_t: 1 keeps the old board"],
    ["reset_gate", "what the new word may read", "reset gate r_t"],
    ["candidate", "what could be written", "candidate state"],
  ],
  RNN: [
    ["hidden", "the whiteboard, overwritten at every step", "hidden state h_t: the one state an RNN has"],
    ["preactivation", "what is about to be written", "W x_t + U h_(t-1) + b, before the nonlinearity"],
  ],
};

const state = { info: null, analysis: null, current: 0, sequence: 0, corpusResult: null };

function decode(packed) {
  // Little-endian float32 in row-major order (see whiteboard.explorer.analysis.pack).
  const bytes = Uint8Array.from(atob(packed.data), (c) => c.charCodeAt(0));
  return { shape: packed.shape, values: new Float32Array(bytes.buffer) };
}

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) {
    const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
    throw new Error(`${response.status}: ${detail}`);
  }
  return data;
}

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text) node.textContent = text;
  return node;
}

function options(select, values, labels = values) {
  select.replaceChildren(...values.map((v, i) => element("option", { value: v }, String(labels[i]))));
}

// A character model's space, tab and line end, made visible.
const VISIBLE = { " ": "␣", "\t": "⇥", "\n": "↵" };
const visible = (token) => VISIBLE[token] || token;

function showError(message) { $("#error").textContent = message || ""; }

// ---------------------------------------------------------------- predictions

function probabilityColor(p) {
  if (p === null || p === undefined) return "#eee";
  return `hsl(${Math.round(120 * p)}, 70%, 80%)`;
}

async function analyze() {
  const sequence = ++state.sequence;
  const text = $("#text").value;
  $("#status").textContent = "reading…";
  try {
    const result = await api("/api/analyze", { text, top_k: 5 });
    if (sequence !== state.sequence) return;  // a newer text is on its way
    showError("");
    state.analysis = result;
    const first = Object.values(result.models)[0];
    state.current = Math.min(state.current, first.tokens.length - 1);
    if (state.current < 0 || state.freshText) state.current = first.tokens.length - 1;
    state.freshText = false;
    renderPredictions();
    renderBoards();
    $("#status").textContent = `${first.tokens.length} tokens`;
    document.body.dataset.analyzed = String(sequence);
    runReach();
  } catch (error) {
    if (sequence !== state.sequence) return;
    $("#status").textContent = "";
    showError(error.message);
  }
}

function renderPredictions() {
  const rows = Object.entries(state.analysis.models).map(([name, result]) => {
    const row = element("div", { class: "model-row", "data-model": name });
    row.append(element("span", { class: "model-name" }, name));
    const tokens = element("div", { class: "tokens" });
    result.tokens.forEach((token, i) => {
      // The colour of word i is the probability it was given after word i - 1.
      const p = i > 0 ? result.next_probability[i - 1] : null;
      const span = element("span", {
        class: "tok" + (token.unknown ? " unknown" : ""), "data-index": i,
        title: (token.unknown ? `"${token.typed}" is not in ${name}'s vocabulary. ` : "") +
          (p === null ? "the first word" : `p(${token.shown}) = ${p.toFixed(3)}`),
      }, visible(token.shown));
      span.style.background = probabilityColor(p);
      span.addEventListener("mouseenter", () => setCurrent(i));
      span.addEventListener("click", () => setCurrent(i));
      tokens.append(span);
    });
    row.append(tokens);
    return row;
  });
  $("#predictions").replaceChildren(...rows);
  renderTopK();
}

function renderTopK() {
  const boxes = Object.entries(state.analysis.models).map(([name, result]) => {
    const box = element("div", { class: "topk", "data-model": name });
    const i = Math.min(state.current, result.tokens.length - 1);
    box.append(element("h3", {}, `${name} after "${visible(result.tokens[i].shown)}"`));
    const list = element("ol");
    for (const p of result.predictions[i]) {
      list.append(element("li", { "data-token": p.token }, `${visible(p.token)} ${p.probability.toFixed(3)}`));
    }
    box.append(list);
    return box;
  });
  $("#topk").replaceChildren(...boxes);
  document.querySelectorAll(".tok").forEach((t) => t.classList.toggle("current", Number(t.dataset.index) === state.current));
}

function setCurrent(index) {
  if (!state.analysis) return;
  const first = Object.values(state.analysis.models)[0];
  state.current = Math.max(0, Math.min(index, first.tokens.length - 1));
  renderTopK();
  renderBoards();
}

// ---------------------------------------------------------------- the board

function boardColor(value, signed, scale) {
  if (signed) {
    const t = Math.max(-1, Math.min(1, value / scale));
    return t >= 0 ? `rgb(255, ${Math.round(255 * (1 - t))}, ${Math.round(255 * (1 - t))})`
                  : `rgb(${Math.round(255 * (1 + t))}, ${Math.round(255 * (1 + t))}, 255)`;
  }
  const t = Math.max(0, Math.min(1, value));
  return `rgb(${Math.round(255 - 200 * t)}, ${Math.round(255 - 90 * t)}, ${Math.round(255 - 200 * t)})`;
}

function renderBoards() {
  if (!state.analysis) return;
  const name = $("#board-model").value;
  const result = state.analysis.models[name];
  const model = state.info.models.find((m) => m.name === name);
  const layer = Number($("#board-layer").value) || 0;
  const i = Math.min(state.current, result.tokens.length - 1);
  $("#step-label").textContent = `token ${i}: "${visible(result.tokens[i].shown)}"`;
  const boards = VIEWS[model.mode].filter(([field]) => field in result.layers[layer]).map(([field, seed, standard]) => {
    const { shape, values } = decode(result.layers[layer][field]);
    const units = shape[1];
    const row = values.subarray(i * units, (i + 1) * units);
    const signed = !field.endsWith("_gate");
    let scale = 1e-6;  // one colour scale for the whole text, so a board's change from word to word shows
    if (signed) for (const v of values) scale = Math.max(scale, Math.abs(v));
    const board = element("div", { class: "board", "data-field": field, "data-token": i });
    board.append(element("div", { class: "board-title" }, seed), element("div", { class: "board-subtitle" }, standard));
    const grid = element("div", { class: "grid" });
    grid.style.gridTemplateColumns = `repeat(${Math.ceil(Math.sqrt(units))}, 16px)`;
    row.forEach((v, unit) => {
      const cell = element("div", { class: "cell", "data-unit": unit, "data-value": v.toFixed(4),
                                    title: `unit ${unit}: ${v.toFixed(4)}` });
      cell.style.background = boardColor(v, signed, scale);
      grid.append(cell);
    });
    board.append(grid);
    return board;
  });
  $("#boards").replaceChildren(...boards);
  document.body.dataset.board = `${name}:${layer}:${i}`;
}

async function selectSpan() {
  const name = $("#board-model").value;
  const model = state.info.models.find((m) => m.name === name);
  try {
    const result = await api("/api/select-span", {
      model: name, text: $("#text").value, layer: Number($("#board-layer").value) || 0,
      field: VIEWS[model.mode][0][0], start: Number($("#span-start").value), end: Number($("#span-end").value),
      threshold: Number($("#span-threshold").value),
    });
    const units = result.units.map((u) => u.unit);
    const box = $("#span-units");
    box.replaceChildren(element("p", {}, units.length ? `Units on throughout: ${units.join(", ")}` : "No unit is on throughout that span."));
    if (units.length) {
      const button = element("button", { type: "button", id: "span-match" }, "Match them in the corpus");
      button.addEventListener("click", () => {
        $("#corpus-model").value = name;
        fillCorpusChoices();
        $("#corpus-field").value = VIEWS[model.mode][0][0];
        $("#threshold").value = $("#span-threshold").value;
        startMatch(units);
      });
      box.append(button);
    }
  } catch (error) { showError(error.message); }
}

// ---------------------------------------------------------------- distance

async function runDistance() {
  const fillers = Number($("#fillers").value);
  $("#fillers-label").textContent = String(fillers);
  const sequence = (state.distanceSequence = (state.distanceSequence || 0) + 1);
  try {
    const result = await api("/api/distance", {
      clue: $("#clue").value, question: $("#question").value, answer: $("#answer").value, fillers,
    });
    if (sequence !== state.distanceSequence) return;
    drawDistance(result);
    $("#distance-prompt").textContent = result.prompt;
  } catch (error) { showError(error.message); }
}

function drawDistance(result) {
  const svg = $("#distance-chart");
  const [width, height, left, bottom, top, right] = [640, 260, 48, 36, 12, 120];
  const n = result.fillers.length;
  const x = (i) => left + (n > 1 ? (i / (n - 1)) * (width - left - right) : 0);
  const y = (p) => top + (1 - p) * (height - top - bottom);
  const nodes = [];
  const line = (x1, y1, x2, y2, stroke) => {
    const l = document.createElementNS(SVG, "line");
    Object.entries({ x1, y1, x2, y2, stroke }).forEach(([k, v]) => l.setAttribute(k, v));
    return l;
  };
  const text = (tx, ty, content, anchor = "middle") => {
    const t = document.createElementNS(SVG, "text");
    Object.entries({ x: tx, y: ty, "text-anchor": anchor, "font-size": 11 }).forEach(([k, v]) => t.setAttribute(k, v));
    t.textContent = content;
    return t;
  };
  for (const p of [0, 0.25, 0.5, 0.75, 1]) {
    nodes.push(line(left, y(p), width - right, y(p), "#eee"), text(left - 6, y(p) + 4, p.toFixed(2), "end"));
  }
  nodes.push(text((left + width - right) / 2, height - 6, "filler sentences between the clue and the question"));
  nodes.push(text(left, height - 20, "0"), text(width - right, height - 20, String(n - 1)));
  Object.entries(result.models).forEach(([name, curve], k) => {
    const color = COLORS[k % COLORS.length];
    if (!curve.probabilities) {
      nodes.push(text(width - right + 8, top + 16 * (k + 1), `${name}: ${curve.note}`, "start"));
      return;
    }
    const polyline = document.createElementNS(SVG, "polyline");
    polyline.setAttribute("points", curve.probabilities.map((p, i) => `${x(i).toFixed(1)},${y(p).toFixed(1)}`).join(" "));
    polyline.setAttribute("fill", "none");
    polyline.setAttribute("stroke", color);
    polyline.setAttribute("stroke-width", 2);
    polyline.setAttribute("class", "curve");
    polyline.setAttribute("data-model", name);
    polyline.setAttribute("data-values", curve.probabilities.join(","));
    nodes.push(polyline);
    const last = curve.probabilities[curve.probabilities.length - 1];
    const label = text(width - right + 8, y(last) + 4, `${name} ${last.toFixed(2)}`, "start");
    label.setAttribute("fill", color);
    nodes.push(label);
  });
  svg.replaceChildren(...nodes);
}

// ---------------------------------------------------------------- gradient reach

async function runReach() {
  const sequence = (state.reachSequence = (state.reachSequence || 0) + 1);
  try {
    const result = await api("/api/reach", { text: $("#text").value, answer: $("#reach-answer").value });
    if (sequence !== state.reachSequence) return;
    const rows = Object.entries(result.models).map(([name, reach]) => {
      const row = element("div", { class: "reach-row", "data-model": name });
      const known = reach.answer_known ? "" : " (the answer is not in its vocabulary: its own top guess is used)";
      row.append(element("div", {}, `${name.toUpperCase()}: answer "${reach.target}", p = ${reach.target_probability.toFixed(3)}${known}`));
      const largest = Math.max(...reach.shares, 1e-12);
      reach.tokens.forEach((token, i) => {
        const share = reach.shares[i];
        const span = element("span", { class: "reach-tok", "data-share": share.toPrecision(4),
                                       title: `${(100 * share).toFixed(2)}% of the gradient` }, visible(token.shown));
        span.style.background = `rgba(214, 39, 40, ${Math.sqrt(share / largest).toFixed(3)})`;
        row.append(span);
      });
      return row;
    });
    $("#reach").replaceChildren(...rows);
  } catch (error) { showError(error.message); }
}

// ---------------------------------------------------------------- corpus

function fillCorpusChoices() {
  const model = state.info.models.find((m) => m.name === $("#corpus-model").value);
  const layer = $("#corpus-layer").value;
  options($("#corpus-layer"), [...Array(model.layers).keys()]);
  if (layer !== "" && Number(layer) < model.layers) $("#corpus-layer").value = layer;
  const field = $("#corpus-field").value;
  const fields = VIEWS[model.mode].map(([f]) => f);
  options($("#corpus-field"), fields, VIEWS[model.mode].map(([f, seed]) => `${f} (${seed})`));
  if (fields.includes(field)) $("#corpus-field").value = field;
}

function corpusChoice() {
  return { corpus: $("#corpus-select").value, model: $("#corpus-model").value,
           layer: Number($("#corpus-layer").value) || 0, field: $("#corpus-field").value };
}

async function followJob(job, render) {
  $("#corpus-status").textContent = `${job.kind}: scanning…`;
  while (job.status === "queued" || job.status === "running") {
    $("#corpus-progress").value = job.progress;
    await new Promise((resolve) => setTimeout(resolve, 150));
    job = await api(`/api/jobs/${job.id}`);
  }
  $("#corpus-progress").value = job.progress;
  if (job.status === "failed") {
    $("#corpus-status").textContent = "";
    showError(job.error);
    return;
  }
  $("#corpus-status").textContent = `${job.kind}: done`;
  state.corpusResult = job.result;
  $("#download-corpus").disabled = false;
  render(job.result);
}

async function findUnits() {
  try {
    showError("");
    const job = await api("/api/corpus/select", { ...corpusChoice(), pattern: $("#pattern").value });
    await followJob(job, renderUnits);
  } catch (error) { showError(error.message); }
}

function renderUnits(result) {
  const table = element("table", { id: "units" });
  table.append(element("tr", {}), element("tbody"));
  table.rows[0].append(element("th", {}, "unit"), element("th", {}, "r with the pattern"), element("th", {}, ""));
  for (const { unit, r } of result.units) {
    const tr = element("tr", { class: "unit-row", "data-unit": unit });
    const button = element("button", { type: "button", class: "match-unit" }, "where it fires");
    button.addEventListener("click", () => startMatch([unit]));
    const cell = element("td");
    cell.append(button);
    tr.append(element("td", {}, String(unit)), element("td", {}, r.toFixed(3)), cell);
    table.append(tr);
  }
  const share = (100 * result.pattern_share).toFixed(1);
  $("#units-table").replaceChildren(
    element("p", {}, `${result.tokens.toLocaleString()} tokens of ${result.corpus}; the pattern is on at ${share}% of them.`), table);
}

async function startMatch(units) {
  try {
    showError("");
    const job = await api("/api/corpus/match", { ...corpusChoice(), units, threshold: Number($("#threshold").value) });
    await followJob(job, renderSpans);
  } catch (error) { showError(error.message); }
}

function renderSpans(result) {
  const header = element("p", {}, `Units ${result.units.join(", ")} ≥ ${result.threshold} at ` +
    `${(100 * result.on_share).toFixed(1)}% of ${result.tokens.toLocaleString()} tokens, in ${result.span_count} spans; the longest:`);
  const rows = result.spans.map((span) => {
    const row = element("div", { class: "span-row", "data-start": span.start, "data-length": span.length });
    row.append(element("span", { class: "context" }, span.before.join(" ") + " "),
               element("span", { class: "inside" }, span.inside.join(" ")),
               element("span", { class: "context" }, " " + span.after.join(" ")));
    return row;
  });
  $("#spans").replaceChildren(header, ...rows);
}

// ---------------------------------------------------------------- downloads

function download(name, type, content) {
  const link = element("a", { href: URL.createObjectURL(new Blob([content], { type })), download: name });
  document.body.append(link);
  link.click();
  link.remove();
}

function analysisRows() {
  const rows = [["model", "index", "token", "typed", "p_of_this_token", "top_1", "p_top_1"]];
  for (const [name, result] of Object.entries(state.analysis.models)) {
    result.tokens.forEach((token, i) => {
      const p = i > 0 ? result.next_probability[i - 1] : "";
      const top = result.predictions[i][0];
      rows.push([name, i, token.shown, token.typed, p, top.token, top.probability]);
    });
  }
  return rows;
}

function csv(rows) {
  const quote = (v) => (/[",\n]/.test(String(v)) ? `"${String(v).replace(/"/g, '""')}"` : String(v));
  return rows.map((r) => r.map(quote).join(",")).join("\n") + "\n";
}

function downloadJSON() {
  if (!state.analysis) return;
  const models = {};
  for (const [name, result] of Object.entries(state.analysis.models)) {
    const layers = result.layers.map((layer) => Object.fromEntries(Object.entries(layer).map(([field, packed]) => {
      const { shape, values } = decode(packed);
      return [field, [...Array(shape[0]).keys()].map((t) => Array.from(values.subarray(t * shape[1], (t + 1) * shape[1])))];
    })));
    models[name] = { tokens: result.tokens, predictions: result.predictions, next_probability: result.next_probability, layers };
  }
  download("whiteboard-analysis.json", "application/json", JSON.stringify({ text: $("#text").value, models }));
}

// ---------------------------------------------------------------- start

function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

async function start() {
  try {
    state.info = await api("/api/models");
  } catch (error) { showError(error.message); return; }
  const info = state.info;
  $("#models-list").textContent = info.models.map((m) => `${m.name} (${m.mode}, ${m.hidden.join("/")} units)`).join(", ");
  options($("#story-select"), info.stories.map((_, i) => i), info.stories.map((s) => s.title));
  const names = info.models.map((m) => m.name);
  options($("#board-model"), names);
  options($("#corpus-model"), names);
  const lstm = info.models.find((m) => m.mode === "LSTM");
  if (lstm) $("#board-model").value = lstm.name;
  const layersOf = () => options($("#board-layer"), [...Array(info.models.find((m) => m.name === $("#board-model").value).layers).keys()]);
  layersOf();
  options($("#corpus-select"), info.corpora);
  fillCorpusChoices();
  $("#fillers").max = info.limits.fillers;
  $("#clue").value = info.distance.clue;
  $("#question").value = info.distance.question;
  $("#answer").value = info.distance.answer;
  $("#fillers").value = info.distance.fillers;

  const chooseStory = () => {
    const story = info.stories[Number($("#story-select").value)];
    $("#text").value = story.text;
    $("#reach-answer").value = story.answer;
    state.freshText = true;
    analyze();
  };
  $("#story-select").addEventListener("change", chooseStory);
  $("#read").addEventListener("click", () => { state.freshText = true; analyze(); });
  $("#text").addEventListener("input", debounce(() => { state.freshText = true; analyze(); }, 250));
  $("#board-model").addEventListener("change", () => { layersOf(); renderBoards(); });
  $("#board-layer").addEventListener("change", renderBoards);
  $("#step-prev").addEventListener("click", () => setCurrent(state.current - 1));
  $("#step-next").addEventListener("click", () => setCurrent(state.current + 1));
  document.addEventListener("keydown", (event) => {
    if (event.target.matches("input, textarea, select")) return;
    if (event.key === "ArrowLeft") setCurrent(state.current - 1);
    if (event.key === "ArrowRight") setCurrent(state.current + 1);
  });
  $("#span-select").addEventListener("click", selectSpan);
  $("#fillers").addEventListener("input", debounce(runDistance, 60));
  for (const id of ["#clue", "#question", "#answer"]) $(id).addEventListener("change", runDistance);
  $("#reach-run").addEventListener("click", runReach);
  $("#corpus-model").addEventListener("change", fillCorpusChoices);
  $("#find-units").addEventListener("click", findUnits);
  $("#download-json").addEventListener("click", downloadJSON);
  $("#download-csv").addEventListener("click", () => state.analysis && download("whiteboard-analysis.csv", "text/csv", csv(analysisRows())));
  $("#download-corpus").addEventListener("click", () => download("whiteboard-corpus.json", "application/json", JSON.stringify(state.corpusResult)));
  chooseStory();
  runDistance();
  document.body.dataset.ready = "yes";
}

start();
