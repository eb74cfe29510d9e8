// A small Markdown subset rendered as DOM nodes: fenced code, paragraphs, "- " lists,
// headings, `code`, **bold** and *italic*. Text only ever becomes text nodes, so model output
// cannot inject markup, whatever it contains.

import {h} from "./dom.js";

const INLINE = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\n]+\*)/g;

function inline(text) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) out.push(text.slice(last, m.index));
    const s = m[0];
    if (s.startsWith("`")) out.push(h("code", {}, s.slice(1, -1)));
    else if (s.startsWith("**")) out.push(h("strong", {}, s.slice(2, -2)));
    else out.push(h("em", {}, s.slice(1, -1)));
    last = m.index + s.length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

function block(lines) {
  const text = lines.join("\n");
  const heading = /^(#{1,4})\s+(.*)$/.exec(text);
  if (heading && lines.length === 1) return h(`h${heading[1].length + 2}`, {}, inline(heading[2]));
  if (lines.every((l) => /^\s*[-*]\s+/.test(l))) {
    return h("ul", {}, lines.map((l) => h("li", {}, inline(l.replace(/^\s*[-*]\s+/, "")))));
  }
  const p = h("p");
  lines.forEach((line, i) => {
    if (i) p.append(h("br"));
    p.append(...inline(line).map((x) => (typeof x === "string" ? document.createTextNode(x) : x)));
  });
  return p;
}

/** A DocumentFragment for `text` (an unfinished code fence is shown as code so far). */
export function renderMarkdown(text) {
  const frag = document.createDocumentFragment();
  const lines = text.split("\n");
  let para = [];
  const flush = () => {
    if (para.length) frag.append(block(para));
    para = [];
  };
  for (let i = 0; i < lines.length; i++) {
    const fence = /^```\s*([\w+-]*)\s*$/.exec(lines[i]);
    if (fence) {
      flush();
      const code = [];
      i++;
      while (i < lines.length && !/^```\s*$/.test(lines[i])) code.push(lines[i++]);
      frag.append(h("pre", {}, h("code", {dataset: {lang: fence[1]}}, code.join("\n"))));
    } else if (!lines[i].trim()) {
      flush();
    } else {
      para.push(lines[i]);
    }
  }
  flush();
  return frag;
}
