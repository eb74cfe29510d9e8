// Side by side: one prompt and seed, unsteered and steered, streamed together into two
// columns; each token coloured by a readout (the projection of its hidden state on a chosen
// vector), with its value on hover.

import {$, clear, diverging, h, showError, tooltipFor} from "./dom.js";
import {generateTokens, promptIds, randomSeed, sampling} from "./generate.js";
import {direction, featureSite, projections} from "./readout.js";
import {layersText, on, parseLayers, state, steeringEntries, vectorName} from "./state.js";

let controller = null;
let ranOnce = false;
let rerun = null;

function busy(on) {
  $("compare-run").disabled = on;
  $("compare-stop").disabled = !on;
}

/** A column's output as one span per generated token. */
function column(el) {
  clear(el);
  return (text, id) => {
    if (id === undefined) {
      const last = el.lastElementChild;
      if (last) last.textContent += text;
      else el.append(h("span", {class: "token"}, text));
      return;
    }
    el.append(h("span", {class: "token", tabindex: "0", dataset: {pos: String(el.children.length),
      token: String(id)}}, text));
  };
}

/** The readout's vector and layer, or null when no colouring is asked for. */
function readoutChoice() {
  const id = $("readout-vector").value;
  const info = state.vectors.find((v) => v.id === id);
  if (!info) return null;
  const layers = parseLayers($("readout-layer").value || layersText(info.layers.slice(0, 1)));
  return {info, layer: layers[0]};
}

function legendSwatch(v) {
  const el = h("span", {class: "swatch"});
  el.style.background = diverging(v);
  return el;
}

async function colour(runs, signal) {
  const choice = readoutChoice();
  if (!choice) return;
  const {info, layer} = choice;
  const {unit} = await direction(info, layer);
  const nLayers = state.model.nLayers;
  const site = featureSite(layer, nLayers);
  const values = await Promise.all(runs.map((r) => projections([...r.ids, ...r.result.tokens],
    layer, unit, nLayers, r.steering, signal)));
  const generated = values.map((v, i) => v.slice(runs[i].ids.length));
  const top = Math.max(1e-9, ...generated.flat().map(Math.abs));
  $("readout-legend").replaceChildren(
    `projection on ${vectorName(info)} at layer ${layer}: `,
    legendSwatch(-1), ` −${top.toFixed(2)} `, legendSwatch(0), " 0 ", legendSwatch(1),
    ` +${top.toFixed(2)} (both columns on one scale; hover a token for its value)`);
  runs.forEach((r, i) => {
    const spans = r.el.querySelectorAll(".token[data-token]");
    spans.forEach((span, k) => {
      const v = generated[i][k];
      if (v === undefined) return;
      span.style.background = diverging(v / top);
      span.dataset.readout = v.toFixed(4);
      const p = r.result.probs[k];
      tooltipFor(span, `token ${JSON.stringify(r.result.texts[k])} (id ${r.result.tokens[k]})` +
        ` · projection ${v.toFixed(4)} on ${vectorName(info)} at layer ${layer}` +
        ` (block ${site.block} ${site.point})` + (p === null ? "" : ` · p ${p.toFixed(3)}`));
    });
    r.el.dataset.readoutLayer = String(layer);
    r.el.dataset.readoutVector = info.id;
  });
}

export async function runCompare(event) {
  event?.preventDefault();
  controller?.abort();
  const mine = new AbortController();
  controller = mine;
  ranOnce = true;
  showError($("compare-error"), null);
  clear($("readout-legend"));
  busy(true);
  try {
    const params = sampling();
    if (params.seed === undefined) params.seed = randomSeed();
    const steered = steeringEntries();
    $("col-steered-title").textContent = steered === undefined
      ? "steered (nothing attached: the server's default)"
      : `steered (${state.attached.map((a) => `${vectorName(a.info)} ×${a.scale}`).join(", ")})`;
    const ids = await promptIds($("compare-prompt").value, $("mode").value, mine.signal);
    const runs = [
      {el: $("col-unsteered"), steering: []},
      {el: $("col-steered"), steering: steered},
    ];
    for (const r of runs) {
      r.el.dataset.seed = String(params.seed);
      r.el.dataset.promptIds = JSON.stringify(ids);
      r.el.dataset.steering = JSON.stringify(r.steering ?? null);
      r.el.dataset.done = "false";
    }
    await Promise.all(runs.map(async (r) => {
      r.ids = ids;
      r.result = await generateTokens(ids, params, r.steering, column(r.el), mine.signal);
      r.el.dataset.tokens = JSON.stringify(r.result.tokens);
    }));
    await colour(runs, mine.signal);
    for (const r of runs) r.el.dataset.done = "true";
  } catch (e) {
    if (e.name !== "AbortError") showError($("compare-error"), e);
  } finally {
    if (controller === mine) {
      controller = null;
      busy(false);
    }
  }
}

export function stopCompare() {
  controller?.abort();
}

function fillReadoutChoices() {
  const select = $("readout-vector");
  const chosen = select.value;
  clear(select).append(h("option", {value: ""}, "nothing"),
    ...state.vectors.map((v) => h("option", {value: v.id}, vectorName(v))));
  if (state.vectors.some((v) => v.id === chosen)) select.value = chosen;
}

export function installCompare() {
  $("compare-form").addEventListener("submit", runCompare);
  $("compare-stop").addEventListener("click", stopCompare);
  $("compare-prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) runCompare(e);
  });
  const layer = h("input", {id: "readout-layer", class: "small", placeholder: "layer",
    "aria-label": "readout layer", title: "the layer to read (default: the vector's)"});
  $("readout-vector").after(" at ", layer);
  $("readout-vector").addEventListener("change", () => {
    const info = state.vectors.find((v) => v.id === $("readout-vector").value);
    layer.value = info ? String(info.layers[0]) : "";
  });
  on("vectors", fillReadoutChoices);
  // a moved slider (or any change to the attached steering) runs the comparison again
  on("steering-changed", () => {
    if (!ranOnce || $("view-compare").hidden) return;
    clearTimeout(rerun);
    rerun = setTimeout(runCompare, 350);
  });
}
