// The steering panel: stored vectors (create from prompts, import a control-vector GGUF,
// download, delete) and the vectors attached to the conversation, each with its layers, a
// scale slider, and whatever other entry fields the server advertises (scope, operator, ...).

import {del, get, post, call} from "./api.js";
import {$, clear, download, h, showError} from "./dom.js";
import {
  emit, layersText, parseLayers, rememberImport, state, vectorName,
} from "./state.js";

const SCALE_RANGE = 10; // the slider's reach either side of 0; the number box takes any value

export async function refreshVectors() {
  try {
    const out = await get("v1/steering");
    state.vectors = out.data;
    showError($("vectors-error"), null);
  } catch (e) {
    showError($("vectors-error"), e);
  }
  renderVectors();
  emit("vectors");
}

function renderVectors() {
  const list = clear($("vectors"));
  if (!state.vectors.length) list.append(h("li", {class: "hint"}, "No stored vectors yet."));
  for (const info of state.vectors) {
    const name = vectorName(info);
    let confirming = false;
    const remove = h("button", {type: "button", class: "danger", title: "delete from the store",
      onclick: async () => {
        if (!confirming) {
          confirming = true;
          remove.textContent = "Sure?";
          return;
        }
        try {
          await del(`v1/steering/${encodeURIComponent(info.id)}`);
          state.attached = state.attached.filter((a) => a.info.id !== info.id);
          renderAttached();
          emit("steering-changed");
        } catch (e) {
          showError($("vectors-error"), e);
        }
        refreshVectors();
      }}, "Delete");
    const downloads = [h("button", {type: "button", title: "download as .npy",
      onclick: () => save(info, "npy")}, ".npy")];
    if (info.kind === "control") {
      downloads.push(h("button", {type: "button", title: "llama.cpp control vector",
        onclick: () => save(info, "gguf")}, ".gguf"));
    }
    list.append(h("li", {class: "vector", dataset: {id: info.id}},
      h("div", {class: "name", title: info.id}, name),
      h("div", {class: "meta"}, `${info.kind} · layers ${layersText(info.layers)} · `,
        h("code", {}, info.id.slice(0, 14))),
      h("div", {class: "buttons"},
        h("button", {type: "button", class: "attach", onclick: () => attach(info)}, "Attach"),
        ...downloads, remove)));
  }
}

async function save(info, format) {
  try {
    const response = await call("GET",
      `v1/steering/${encodeURIComponent(info.id)}?format=${format}`, undefined, {raw: true});
    download(await response.blob(), `${info.id}.${format}`);
  } catch (e) {
    showError($("vectors-error"), e);
  }
}

export function attach(info) {
  state.attached.push({info, layers: layersText(info.layers), scale: 1, extra: {}});
  renderAttached();
  emit("steering-changed");
}

// extra entry fields, from their JSON schema ---------------------------------------------------

function variants(schema, resolve) {
  const all = (schema.anyOf ?? schema.oneOf ?? [schema]).map(resolve);
  return all.filter((s) => s.type !== "null");
}

/** A control for one advertised entry field; calls set(value) (undefined: leave it out). */
function fieldControl(name, schema, resolve, set) {
  const kinds = variants(schema, resolve);
  const enums = kinds.flatMap((s) => s.enum ?? (s.const !== undefined ? [s.const] : []));
  const range = kinds.find((s) => s.type === "array");
  const numeric = kinds.find((s) => s.type === "number" || s.type === "integer");
  const boolean = kinds.find((s) => s.type === "boolean");
  const label = (control) => h("label", {class: "extra", title: schema.description ?? name},
    `${name} `, control);
  if (enums.length || range) {
    const start = h("input", {type: "number", class: "small", placeholder: "start",
      "aria-label": `${name} start`});
    const end = h("input", {type: "number", class: "small", placeholder: "end",
      "aria-label": `${name} end`});
    const bounds = h("span", {hidden: true}, start, end);
    const select = h("select", {"aria-label": name},
      h("option", {value: ""}, "(default)"),
      enums.map((v) => h("option", {value: JSON.stringify(v)}, String(v))),
      range ? h("option", {value: "range"}, "range [start, end)") : null);
    const update = () => {
      bounds.hidden = select.value !== "range";
      if (select.value === "range") {
        set(start.value && end.value ? [Number(start.value), Number(end.value)] : undefined);
      } else {
        set(select.value ? JSON.parse(select.value) : undefined);
      }
    };
    for (const el of [select, start, end]) el.addEventListener("change", update);
    return label(h("span", {}, select, bounds));
  }
  if (numeric) {
    const input = h("input", {type: "number", class: "small", step: "any", "aria-label": name,
      onchange: () => set(input.value === "" ? undefined : Number(input.value))});
    return label(input);
  }
  if (boolean) {
    const box = h("input", {type: "checkbox", "aria-label": name,
      onchange: () => set(box.checked ? true : undefined)});
    return label(box);
  }
  const text = h("input", {placeholder: "JSON", "aria-label": name, onchange: () => {
    try {
      set(text.value.trim() ? JSON.parse(text.value) : undefined);
      text.setCustomValidity("");
    } catch {
      text.setCustomValidity(`${name}: not JSON`);
      text.reportValidity();
    }
  }});
  return label(text);
}

export function renderAttached() {
  const list = clear($("attached"));
  $("attached-empty").hidden = state.attached.length > 0;
  const {entryFields, resolve} = state.capabilities;
  state.attached.forEach((a, index) => {
    const number = h("input", {type: "number", step: "0.1", class: "small scale-value",
      value: String(a.scale), "aria-label": "scale"});
    const slider = h("input", {type: "range", class: "scale", min: String(-SCALE_RANGE),
      max: String(SCALE_RANGE), step: "0.1", value: String(a.scale),
      "aria-label": `scale of ${vectorName(a.info)}`});
    const setScale = (value, from) => {
      if (!Number.isFinite(value)) return;
      a.scale = value;
      if (from !== number) number.value = String(value);
      if (from !== slider) slider.value = String(value);
      emit("steering-changed");
    };
    slider.addEventListener("input", () => setScale(Number(slider.value), slider));
    number.addEventListener("change", () => setScale(Number(number.value), number));
    const layers = h("input", {class: "small layers", value: a.layers, "aria-label": "layers",
      title: "a layer, a range 2-5 or a list 2,3,4"});
    layers.addEventListener("change", () => {
      try {
        parseLayers(layers.value);
        a.layers = layers.value;
        layers.setCustomValidity("");
        emit("steering-changed");
      } catch (e) {
        layers.setCustomValidity(e.message);
        layers.reportValidity();
      }
    });
    const extras = Object.entries(entryFields).map(([name, schema]) =>
      fieldControl(name, schema, resolve ?? ((s) => s), (value) => {
        a.extra[name] = value;
        emit("steering-changed");
      }));
    list.append(h("li", {class: "attachment", dataset: {id: a.info.id}},
      h("div", {class: "name"}, vectorName(a.info),
        h("button", {type: "button", class: "remove", title: "detach", "aria-label": "detach",
          onclick: () => {
            state.attached.splice(index, 1);
            renderAttached();
            emit("steering-changed");
          }}, "×")),
      h("div", {class: "row"}, h("label", {}, "layer ", layers), slider, number),
      extras.length ? h("div", {class: "row extras"}, extras) : null));
  });
}

// create and import ------------------------------------------------------------------------------

function lines(id) {
  return $(id).value.split("\n").map((s) => s.trim()).filter(Boolean);
}

async function create(event) {
  event.preventDefault();
  const method = $("create-method").value;
  const button = $("create-submit");
  let body;
  try {
    if (method === "actadd") {
      body = {method, add: $("create-add").value, sub: $("create-sub").value,
        layer: Number($("create-layer").value)};
    } else {
      body = {method, positive: lines("create-positive"), negative: lines("create-negative")};
      if ($("create-layers").value.trim()) body.layers = parseLayers($("create-layers").value);
    }
    button.disabled = true;
    button.textContent = "Creating…";
    const info = await post("v1/steering", body);
    showError($("vectors-error"), null);
    await refreshVectors();
    emit("created", info);
  } catch (e) {
    showError($("vectors-error"), e);
  } finally {
    button.disabled = false;
    button.textContent = "Create";
  }
}

async function upload(event) {
  event.preventDefault();
  const file = $("import-file").files[0];
  if (!file) {
    showError($("vectors-error"), new Error("choose a .gguf control-vector file first"));
    return;
  }
  try {
    const info = await call("POST", "v1/steering/import", file);
    rememberImport(info.id, file.name);
    showError($("vectors-error"), null);
    await refreshVectors();
    emit("created", info);
  } catch (e) {
    showError($("vectors-error"), e);
  }
}

export function installSteering() {
  const method = $("create-method");
  method.addEventListener("change", () => {
    const actadd = method.value === "actadd";
    document.querySelector(".actadd-only").hidden = !actadd;
    document.querySelector(".pairs-only").hidden = actadd;
  });
  $("create-form").addEventListener("submit", create);
  $("import-form").addEventListener("submit", upload);
}
