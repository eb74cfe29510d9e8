// Readouts computed from the API: a vector's direction (its .npy download) and hidden states
// (POST /v1/features), projected here. Teacher-forced: /v1/features runs the exact token ids
// that were generated, with the same steering, so these are the states the model computed.

import {call, post} from "./api.js";

/** A little-endian float32 .npy file (format 1.0-3.0) as {shape, data: Float32Array}. */
export function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  const magic = String.fromCharCode(...bytes.slice(1, 6));
  if (bytes[0] !== 0x93 || magic !== "NUMPY") throw new Error("not an .npy file");
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.slice(start, start + headerLength));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  if (descr !== "<f4") throw new Error(`.npy of ${descr}: expected little-endian float32`);
  if (/'fortran_order':\s*True/.test(header)) throw new Error(".npy in Fortran order");
  const shape = (/'shape':\s*\(([^)]*)\)/.exec(header)?.[1] ?? "")
    .split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const offset = start + headerLength;
  const count = shape.reduce((a, b) => a * b, 1);
  return {shape, data: new Float32Array(buffer.slice(offset, offset + 4 * count))};
}

const directionCache = new Map();

/**
 * The unit direction of stored vector `info` at steering layer `layer`: a control vector's
 * direction for that layer; an ActAdd vector's rows summed (the prompt difference as one
 * direction). Returns {unit: Float64Array, norm}.
 */
export async function direction(info, layer) {
  const key = `${info.id}@${layer}`;
  if (directionCache.has(key)) return directionCache.get(key);
  const response = await call("GET", `v1/steering/${encodeURIComponent(info.id)}?format=npy`,
    undefined, {raw: true});
  const {shape, data} = parseNpy(await response.arrayBuffer());
  const dim = shape[shape.length - 1];
  const v = new Float64Array(dim);
  if (info.kind === "control") {
    const row = info.layers.indexOf(layer);
    if (row < 0) throw new Error(`${info.id} has no direction at layer ${layer}`);
    for (let j = 0; j < dim; j++) v[j] = data[row * dim + j];
  } else {
    for (let r = 0; r < shape[0]; r++) for (let j = 0; j < dim; j++) v[j] += data[r * dim + j];
  }
  let norm = 0;
  for (let j = 0; j < dim; j++) norm += v[j] * v[j];
  norm = Math.sqrt(norm);
  if (!(norm > 0)) throw new Error(`${info.id} is zero at layer ${layer}`);
  for (let j = 0; j < dim; j++) v[j] /= norm;
  const out = {unit: v, norm};
  directionCache.set(key, out);
  return out;
}

/**
 * Where steering layer `layer` is in /v1/features' terms: the stream entering block l is
 * block l's resid_pre; the stream after the last block (l = n_layers) is its resid_post.
 */
export function featureSite(layer, nLayers) {
  const l = layer < 0 ? layer + nLayers + 1 : layer;
  return l < nLayers ? {block: l, point: "resid_pre"} : {block: nLayers - 1, point: "resid_post"};
}

export function dot(a, b) {
  let s = 0;
  for (let j = 0; j < a.length; j++) s += a[j] * b[j];
  return s;
}

/**
 * The projection of every position's hidden state at `layer` on `unit`, for token ids `ids`
 * run with `steering` (undefined: the server's default). Returns an array, one per token.
 */
export async function projections(ids, layer, unit, nLayers, steering, signal) {
  const site = featureSite(layer, nLayers);
  const body = {input: ids, layers: [site.block], points: [site.point], positions: "all"};
  if (steering !== undefined) body.steering = steering;
  const out = await post("v1/features", body, {signal});
  return out.data[site.point][0].map((row) => dot(row, unit));
}
