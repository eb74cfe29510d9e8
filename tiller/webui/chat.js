// The chat view: a conversation through /v1/chat/completions, or (completion mode) a text
// continued by /v1/completions, streamed as server-sent events, with the attached steering.

import {stream} from "./api.js";
import {$, clear, h, showError} from "./dom.js";
import {sampling} from "./generate.js";
import {renderMarkdown} from "./markdown.js";
import {emit, steeringEntries} from "./state.js";

const messages = []; // {role, content}
let controller = null;

function bubble(role, text) {
  const body = h("div", {class: "body"});
  body.append(renderMarkdown(text));
  const el = h("div", {class: `message ${role}`, dataset: {role}},
    h("div", {class: "role"}, role), body);
  $("messages").append(el);
  return body;
}

function busy(on) {
  $("chat-send").disabled = on;
  $("chat-stop").disabled = !on;
}

/** Re-render streamed text at most once per frame. */
function painter(body) {
  let text = "";
  let pending = false;
  return (delta) => {
    text += delta;
    if (pending) return text;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      body.replaceChildren(renderMarkdown(text));
      body.closest(".messages").scrollTop = 1e9;
    });
    return text;
  };
}

async function send(event) {
  event?.preventDefault();
  if (controller) return;
  const input = $("chat-input");
  const text = input.value;
  const mode = $("mode").value;
  if (!text.trim() && mode === "chat") return;
  showError($("chat-error"), null);
  let steering;
  try {
    steering = steeringEntries();
  } catch (e) {
    showError($("chat-error"), e);
    return;
  }
  const params = sampling();
  const body = {...params, stream_options: {include_usage: true}};
  if (steering !== undefined) body.steering = steering;
  let path;
  if (mode === "chat") {
    messages.push({role: "user", content: text});
    bubble("user", text);
    body.messages = messages.map((m) => ({...m}));
    path = "v1/chat/completions";
  } else {
    clear($("messages"));
    messages.length = 0;
    bubble("prompt", text);
    body.prompt = text;
    path = "v1/completions";
  }
  input.value = "";
  const out = bubble("assistant", "");
  const bubbleEl = out.parentElement;
  bubbleEl.classList.add("streaming");
  const paint = painter(out);
  let reply = "";
  controller = new AbortController();
  busy(true);
  try {
    await stream(path, body, (chunk) => {
      if (chunk.usage) emit("usage", chunk.usage);
      const choice = chunk.choices?.[0];
      const delta = mode === "chat" ? choice?.delta?.content : choice?.text;
      if (delta) {
        reply = paint(delta);
        bubbleEl.dataset.deltas = String(Number(bubbleEl.dataset.deltas ?? 0) + 1);
      }
    }, controller.signal);
  } catch (e) {
    if (e.name !== "AbortError") showError($("chat-error"), e);
  } finally {
    controller = null;
    busy(false);
    bubbleEl.classList.remove("streaming");
    out.replaceChildren(renderMarkdown(reply));
    if (mode === "chat") messages.push({role: "assistant", content: reply});
    input.focus();
  }
}

export function stopChat() {
  controller?.abort();
}

export function installChat() {
  $("chat-form").addEventListener("submit", send);
  $("chat-stop").addEventListener("click", stopChat);
  $("chat-clear").addEventListener("click", () => {
    stopChat();
    messages.length = 0;
    clear($("messages"));
    showError($("chat-error"), null);
  });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(e);
  });
}
