// Looking inside a prompt: a layer x position heatmap of its hidden states (norms, or the
// projection on a stored vector) from /v1/features, and the logit lens when the server offers
// it (a `logit_lens` capture point advertised in /openapi.json).

import {post} from "./api.js";
import {$, clear, diverging, h, showError, tooltipFor} from "./dom.js";
import {direction, dot} from "./readout.js";
import {on, state, steeringEntries, vectorName} from "./state.js";

/** The steering layer a capture point of block b reads (resid_post: the stream after it). */
function streamLayer(block, point) {
  return point === "resid_post" ? block + 1 : block;
}

async function measure(data, point, layers, vectorId) {
  if (!vectorId) {
    return data.map((rows) => rows.map((x) => Math.sqrt(dot(x, x))));
  }
  const info = state.vectors.find((v) => v.id === vectorId);
  if (!info) throw new Error("that vector is no longer stored");
  return Promise.all(data.map(async (rows, i) => {
    let unit;
    try {
      ({unit} = await direction(info, streamLayer(layers[i], point)));
    } catch {
      return rows.map(() => null); // a control vector without a direction at this layer
    }
    return rows.map((x) => dot(x, unit));
  }));
}

/**
 * NOTE: colours are relative within each block (row): the stream's size grows with depth and
 * the first position's state is often far larger than the rest, which would leave every other
 * cell of a shared scale blank. Norms run from the row's smallest to its largest, projections
 * from -max|v| to +max|v|. The values themselves are on hover.
 */
function heatmap(out, values, point, signed, vectorLabel) {
  const map = clear($("heatmap"));
  const table = h("table", {class: "heat", dataset: {point}});
  table.append(h("tr", {}, h("th", {}, "block"),
    ...out.pieces.map((p, i) => h("th", {class: "piece", title: `position ${i}`}, p))));
  values.forEach((row, i) => {
    const block = out.layers[i];
    const known = row.filter((v) => v !== null);
    const top = Math.max(1e-9, ...known.map(Math.abs));
    const low = Math.min(...known);
    const span = Math.max(1e-9, top - low);
    table.append(h("tr", {}, h("th", {}, String(block)), ...row.map((v, pos) => {
      const cell = h("td", {tabindex: "0", dataset: {block: String(block), pos: String(pos)}});
      if (v === null) {
        cell.textContent = "–";
        tooltipFor(cell, `block ${block} has no direction of ${vectorLabel}`);
        return cell;
      }
      cell.style.background = signed ? diverging(v / top)
        : `hsla(265, 70%, 55%, ${(0.05 + 0.9 * ((v - low) / span)).toFixed(3)})`;
      cell.dataset.value = v.toFixed(4);
      tooltipFor(cell, `block ${block} ${point} · position ${pos} ` +
        `${JSON.stringify(out.pieces[pos])} · ${signed ? `projection on ${vectorLabel}` : "norm"}` +
        ` ${v.toFixed(4)}`);
      return cell;
    })));
  });
  map.append(table);
}

/** One logit-lens cell: the top token, the top-k with their logprobs on hover. */
function lensCell(tokens, logprobs) {
  const cell = h("td", {tabindex: "0"}, String(tokens[0] ?? ""));
  tooltipFor(cell, tokens.map((t, k) => `${JSON.stringify(t)} ${logprobs[k].toFixed(3)}`)
    .join("\n"));
  return cell;
}

async function lens(ids, steering) {
  const el = clear($("lens"));
  if (!state.capabilities.logitLens) {
    el.append(h("p", {class: "hint"}, "This server's /v1/features offers no logit_lens point " +
      `(its /openapi.json lists ${state.capabilities.points.join(", ")}), so there is no ` +
      "logit-lens table. It appears here when the server advertises the point."));
    return;
  }
  const body = {input: ids, points: ["logit_lens"], positions: "all"};
  if (steering !== undefined) body.steering = steering;
  const out = await post("v1/features", body);
  const table = h("table", {class: "lens-table"});
  table.append(h("tr", {}, h("th", {}, "block"), ...out.pieces.map((p) => h("th", {}, p))));
  // out.logit_lens: tokens and logprobs, each (layers, positions, top_k)
  const {tokens, logprobs} = out.logit_lens;
  tokens.forEach((row, i) => {
    table.append(h("tr", {}, h("th", {}, String(out.layers[i])),
      ...row.map((top, pos) => lensCell(top, logprobs[i][pos]))));
  });
  el.append(table);
}

async function run(event) {
  event?.preventDefault();
  showError($("heat-error"), null);
  const button = $("heat-run");
  button.disabled = true;
  try {
    const point = $("heat-point").value;
    const vectorId = $("heat-measure").value === "norm" ? "" : $("heat-measure").value;
    const steering = $("heat-steered").checked ? steeringEntries() : [];
    const tokens = (await post("tokenize", {content: $("heat-prompt").value,
      add_special: true})).tokens;
    const body = {input: tokens, points: [point], positions: "all"};
    if (steering !== undefined) body.steering = steering;
    const out = await post("v1/features", body);
    const values = await measure(out.data[point], point, out.layers, vectorId);
    const info = state.vectors.find((v) => v.id === vectorId);
    heatmap(out, values, point, Boolean(vectorId), info ? vectorName(info) : "");
    await lens(tokens, steering);
  } catch (e) {
    showError($("heat-error"), e);
  } finally {
    button.disabled = false;
  }
}

function fill() {
  const points = $("heat-point");
  const chosenPoint = points.value;
  clear(points).append(...state.capabilities.points.map((p) => h("option", {value: p}, p)));
  if (chosenPoint) points.value = chosenPoint;
  const select = $("heat-measure");
  const chosen = select.value;
  clear(select).append(h("option", {value: "norm"}, "norm"),
    ...state.vectors.map((v) => h("option", {value: v.id}, `projection on ${vectorName(v)}`)));
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
}

export function installInside() {
  $("heat-form").addEventListener("submit", run);
  $("heat-prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(e);
  });
  on("vectors", fill);
  on("capabilities", fill);
  fill();
}
