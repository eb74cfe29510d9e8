// DOM helpers. Untrusted text (model output, vector names, error messages) only ever becomes
// text nodes: nothing here parses a string as HTML.

/** An element: h("div", {class: "x", onclick: f}, "text", child, ...). */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export const $ = (id) => document.getElementById(id);

export function clear(el) {
  el.replaceChildren();
  return el;
}

/** Show an error (an Error or a message) in `el`, or hide `el` when `error` is null. */
export function showError(el, error) {
  if (!error) {
    el.hidden = true;
    el.textContent = "";
    return;
  }
  el.hidden = false;
  el.textContent = error.message ?? String(error);
}

/** A small floating tooltip for hover values (one for the page). */
export function tooltipFor(el, text) {
  el.dataset.tip = text;
  el.setAttribute("aria-label", text);
}

export function installTooltips() {
  const tip = $("tooltip");
  const show = (target) => {
    tip.textContent = target.dataset.tip;
    tip.hidden = false;
    const r = target.getBoundingClientRect();
    const top = r.bottom + 6 + window.scrollY;
    const left = Math.min(r.left + window.scrollX, window.innerWidth - tip.offsetWidth - 8);
    tip.style.top = `${top}px`;
    tip.style.left = `${Math.max(4, left)}px`;
  };
  const find = (e) => e.target instanceof Element ? e.target.closest("[data-tip]") : null;
  document.addEventListener("mouseover", (e) => {
    const t = find(e);
    if (t) show(t); else tip.hidden = true;
  });
  document.addEventListener("focusin", (e) => {
    const t = find(e);
    if (t) show(t);
  });
  document.addEventListener("focusout", () => { tip.hidden = true; });
}

/** Save bytes as a file through a temporary object URL. */
export function download(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = h("a", {href: url, download: filename});
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/** A colour for value v in [-1, 1]: blue for negative, red for positive, transparent at 0. */
export function diverging(v) {
  const a = Math.min(1, Math.abs(v));
  const hue = v < 0 ? 215 : 5;
  return `hsla(${hue}, 85%, 55%, ${(0.08 + 0.72 * a).toFixed(3)})`;
}
