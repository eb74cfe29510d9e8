// Sweep: one vector at several scales, all requests sent at once (the server batches them),
// each streamed into its own cell of a grid.

import {$, clear, h, showError} from "./dom.js";
import {generateTokens, promptIds, randomSeed, sampling} from "./generate.js";
import {layersText, on, parseLayers, state, vectorName} from "./state.js";

let controller = null;

function busy(on) {
  $("sweep-run").disabled = on;
  $("sweep-stop").disabled = !on;
}

export function parseScales(text) {
  const scales = text.split(/[\s,]+/).filter(Boolean).map(Number);
  if (!scales.length || scales.some((s) => !Number.isFinite(s))) {
    throw new Error(`scales: ${JSON.stringify(text)} is not a list of numbers`);
  }
  return scales;
}

async function run(event) {
  event?.preventDefault();
  controller?.abort();
  const mine = new AbortController();
  controller = mine;
  showError($("sweep-error"), null);
  const grid = clear($("sweep-grid"));
  busy(true);
  try {
    const info = state.vectors.find((v) => v.id === $("sweep-vector").value);
    if (!info) throw new Error("create or import a vector first");
    const layers = parseLayers($("sweep-layers").value || layersText(info.layers));
    const scales = parseScales($("sweep-scales").value);
    const params = sampling();
    if (params.seed === undefined) params.seed = randomSeed();
    const ids = await promptIds($("sweep-prompt").value, $("mode").value, mine.signal);
    grid.dataset.seed = String(params.seed);
    await Promise.all(scales.map(async (scale) => {
      const out = h("div", {class: "output"});
      const cell = h("section", {class: "cell", dataset: {scale: String(scale)}},
        h("h3", {}, `scale ${scale}`), out);
      grid.append(cell);
      const entry = info.kind === "actadd" ? {vector: info.id, layer: layers[0], scale}
        : {vector: info.id, layers, scale};
      const steering = scale === 0 ? [] : [entry];
      const result = await generateTokens(ids, params, steering,
        (text) => out.append(text), mine.signal);
      cell.dataset.tokens = JSON.stringify(result.tokens);
      cell.dataset.done = "true";
    }));
  } catch (e) {
    if (e.name !== "AbortError") showError($("sweep-error"), e);
  } finally {
    if (controller === mine) {
      controller = null;
      busy(false);
    }
  }
}

export function stopSweep() {
  controller?.abort();
}

function fill() {
  const select = $("sweep-vector");
  const chosen = select.value;
  clear(select).append(...state.vectors.map((v) => h("option", {value: v.id}, vectorName(v))));
  if (state.vectors.some((v) => v.id === chosen)) select.value = chosen;
}

export function installSweep() {
  $("sweep-form").addEventListener("submit", run);
  $("sweep-stop").addEventListener("click", stopSweep);
  $("sweep-prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(e);
  });
  $("sweep-vector").addEventListener("change", () => { $("sweep-layers").value = ""; });
  on("vectors", fill);
}
