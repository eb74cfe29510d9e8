// The playground's entry point: theme, API key, the model's identity and context use, tabs,
// keyboard shortcuts, and the views (chat.js, compare.js, sweep.js, inside.js, steering.js).

import {apiKey, get, setApiKey} from "./api.js";
import {installChat, stopChat} from "./chat.js";
import {installCompare, stopCompare} from "./compare.js";
import {$, clear, h, installTooltips, showError} from "./dom.js";
import {installInside} from "./inside.js";
import {emit, on, readCapabilities, state} from "./state.js";
import {installSteering, refreshVectors, renderAttached} from "./steering.js";
import {installSweep, stopSweep} from "./sweep.js";

const THEME = "tiller.theme";

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  $("theme").setAttribute("aria-label", `theme: ${theme} (Alt+T to switch)`);
}

function toggleTheme() {
  const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
  localStorage.setItem(THEME, next);
  applyTheme(next);
}

function initialTheme() {
  const saved = localStorage.getItem(THEME);
  if (saved === "light" || saved === "dark") return saved;
  return window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
}

// tabs: buttons with roving focus (arrow keys), as the WAI-ARIA tabs pattern -------------------

const TABS = ["chat", "compare", "sweep", "inside"];

function selectTab(name, focus = false) {
  for (const t of TABS) {
    const on = t === name;
    $(`tab-${t}`).setAttribute("aria-selected", String(on));
    $(`tab-${t}`).tabIndex = on ? 0 : -1;
    $(`view-${t}`).hidden = !on;
  }
  if (focus) $(`tab-${name}`).focus();
  document.body.dataset.view = name;
}

function installTabs() {
  TABS.forEach((t, i) => {
    const tab = $(`tab-${t}`);
    tab.addEventListener("click", () => selectTab(t));
    tab.addEventListener("keydown", (e) => {
      const step = {ArrowRight: 1, ArrowLeft: -1}[e.key];
      if (step) selectTab(TABS[(i + step + TABS.length) % TABS.length], true);
    });
  });
  selectTab("chat");
}

function installKeys() {
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") {
      stopChat();
      stopCompare();
      stopSweep();
    } else if (e.altKey && /^[1-4]$/.test(e.key)) {
      e.preventDefault();
      selectTab(TABS[Number(e.key) - 1], true);
    } else if (e.altKey && (e.key === "t" || e.key === "T")) {
      e.preventDefault();
      toggleTheme();
    }
  });
}

// the model and the server -------------------------------------------------------------------

function showModel() {
  const m = state.model;
  const el = clear($("model"));
  if (!m) return;
  el.append(h("strong", {class: "model-name"}, m.name),
    h("span", {class: "muted"}, ` · ${m.nLayers} layers · width ${m.dim} · `),
    h("span", {title: `model key (BLAKE3 of the file): ${m.key}`}, "key ",
      h("code", {class: "model-key"}, m.key.slice(0, 12))),
    h("span", {title: `model uuid: ${m.uuid}`}, " · uuid ",
      h("code", {class: "model-uuid"}, m.uuid)));
}

function showContext(used) {
  const m = state.model;
  if (!m || !m.nCtx) return;
  const el = clear($("context"));
  const share = Math.min(1, used / m.nCtx);
  el.append(`context ${used} / ${m.nCtx}`,
    h("meter", {min: 0, max: 1, value: share, "aria-label": "context used"}));
}

function banner(error) {
  showError($("banner"), error);
}

async function connect() {
  banner(null);
  try {
    const models = await get("v1/models"); // public: says which model even without a key
    const card = models.data[0];
    if (!card) throw new Error("the server has no model loaded yet; reload in a moment");
    state.model = {name: card.id, key: card.meta.key, uuid: card.meta.uuid,
      nLayers: card.meta.n_layer, dim: card.meta.n_embd, nCtx: card.meta.n_ctx_train};
    showModel();
    const [props, spec] = await Promise.all([get("props"), get("openapi.json")]);
    state.model.nCtx = props.default_generation_settings?.n_ctx ?? state.model.nCtx;
    state.capabilities = readCapabilities(spec);
    document.body.dataset.entryFields = Object.keys(state.capabilities.entryFields).join(",");
    emit("capabilities");
    renderAttached();
    showContext(0);
    await refreshVectors();
    document.body.dataset.ready = "true";
  } catch (e) {
    banner(e);
    if (e.status === 401) $("api-key").focus();
  }
}

function installKey() {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey($("api-key").value.trim());
    connect();
  });
}

applyTheme(initialTheme());
$("theme").addEventListener("click", toggleTheme);
installTooltips();
installTabs();
installKeys();
installKey();
installSteering();
installChat();
installCompare();
installSweep();
installInside();
on("usage", (usage) => showContext(usage.total_tokens));
connect();
