// What the page knows: the model, what the server offers (from /openapi.json), the stored
// vectors and the steering attached to the conversation. Views subscribe to changes.

export const state = {
  model: null, // {name, key, uuid, nLayers, dim, nCtx}
  capabilities: {
    entryFields: {}, // steering entry properties beyond the ones every tiller has
    points: ["resid_pre", "attn_out", "mlp_out", "resid_post"], // /v1/features capture points
    logitLens: false,
  },
  vectors: [], // GET v1/steering data
  attached: [], // {info, layers: string, scale: number, extra: {}}
};

const listeners = new Map();

export function on(topic, fn) {
  if (!listeners.has(topic)) listeners.set(topic, []);
  listeners.get(topic).push(fn);
}

export function emit(topic, ...args) {
  for (const fn of listeners.get(topic) ?? []) fn(...args);
}

// The entry fields every tiller takes; others in the schema are offered when advertised.
// NOTE: `direction` is left out too: an attachment's direction is its stored vector
export const BASE_ENTRY_FIELDS = new Set(
  ["vector", "layers", "layer", "scale", "add", "sub", "source_layer", "mul", "direction"]);

function resolve(spec, schema) {
  let s = schema;
  while (s && s.$ref) s = spec.components.schemas[s.$ref.split("/").pop()];
  return s ?? {};
}

/** What this server's /openapi.json advertises: extra steering-entry fields, feature points. */
export function readCapabilities(spec) {
  const schemas = spec.components?.schemas ?? {};
  const entry = schemas.SteeringEntry?.properties ?? {};
  const extra = {};
  for (const [name, schema] of Object.entries(entry)) {
    if (!BASE_ENTRY_FIELDS.has(name)) extra[name] = resolve(spec, schema);
  }
  const pointsSchema = resolve(spec, schemas.FeaturesRequest?.properties?.points);
  const items = resolve(spec, pointsSchema.items ?? pointsSchema.anyOf?.find((s) => s.items)?.items);
  const points = items.enum ?? state.capabilities.points;
  return {
    entryFields: extra,
    points: points.filter((p) => p !== "logit_lens"),
    logitLens: points.includes("logit_lens"),
    resolve: (s) => resolve(spec, s),
  };
}

/** "2-5" or "2,3,4" or "3" as a list of layer numbers (an Error naming the text otherwise). */
export function parseLayers(text) {
  const out = [];
  for (const part of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const range = /^(-?\d+)\s*(?:-|\.\.)\s*(-?\d+)$/.exec(part);
    if (range) {
      const [a, b] = [Number(range[1]), Number(range[2])];
      if (b < a) throw new Error(`layers: ${part} is an empty range`);
      for (let l = a; l <= b; l++) out.push(l);
    } else if (/^-?\d+$/.test(part)) {
      out.push(Number(part));
    } else {
      throw new Error(`layers: ${JSON.stringify(part)} is not a layer, a list or a range`);
    }
  }
  return out;
}

/** A stored vector's own layers as text: "3" or "2-5" or "2,4". */
export function layersText(layers) {
  if (!layers.length) return "";
  const contiguous = layers.every((l, i) => i === 0 || l === layers[i - 1] + 1);
  return contiguous && layers.length > 1 ? `${layers[0]}-${layers[layers.length - 1]}`
    : layers.join(",");
}

// the server keeps no file name for an imported vector: the page remembers the ones it sent
const NAMES = "tiller.importedNames";

export function importedNames() {
  try {
    return JSON.parse(localStorage.getItem(NAMES) ?? "{}");
  } catch {
    return {};
  }
}

export function rememberImport(id, filename) {
  localStorage.setItem(NAMES, JSON.stringify({...importedNames(), [id]: filename}));
}

/** A short human name for a stored vector, from the request that built it. */
export function vectorName(info) {
  const r = info.request ?? {};
  if (r.method === "actadd") return `actadd “${r.add}” − “${r.sub}”`;
  if (r.method === "mean" || r.method === "pca") {
    const first = (r.positive ?? [])[0] ?? "";
    return `${r.method} of ${(r.positive ?? []).length} pairs: “${first.slice(0, 24)}”…`;
  }
  if (r.method === "import") {
    const file = importedNames()[info.id];
    return file ? `imported ${file}` : `imported control vector ${(r.blake3 ?? "").slice(0, 8)}`;
  }
  return info.kind === "control" ? "control vector" : "vector";
}

/** One attachment as a request's steering entry. */
export function entryOf(a, scale = a.scale, layersOverride = null) {
  const layers = parseLayers(layersOverride ?? a.layers);
  const entry = {vector: a.info.id, scale};
  if (a.info.kind === "actadd") {
    if (layers.length !== 1) throw new Error("an ActAdd vector is added at one layer");
    entry.layer = layers[0];
  } else {
    entry.layers = layers;
  }
  for (const [name, value] of Object.entries(a.extra)) {
    if (value !== undefined && value !== null && value !== "") entry[name] = value;
  }
  return entry;
}

/** The attached steering as a request's `steering` list (undefined: none attached). */
export function steeringEntries() {
  if (!state.attached.length) return undefined;
  return state.attached.map((a) => entryOf(a));
}
