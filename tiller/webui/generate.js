// Generations the views share: the sampling form's values, and token-level runs through
// llama.cpp's /completion, whose streamed chunks carry each token's id (readouts need ids).

import {post, stream} from "./api.js";
import {$} from "./dom.js";

/** The sampling form as OpenAI fields ({temperature, top_p, max_tokens, seed?, stop?}). */
export function sampling() {
  const out = {
    temperature: Number($("temperature").value || 0),
    top_p: Number($("top-p").value || 1),
    max_tokens: Math.max(1, Number($("max-tokens").value || 1)),
  };
  if ($("seed").value !== "") out.seed = Number($("seed").value);
  const stop = $("stop").value.replaceAll("\\n", "\n").split("|").filter(Boolean);
  if (stop.length) out.stop = stop;
  return out;
}

export function randomSeed() {
  return Math.floor(Math.random() * 2 ** 31);
}

/**
 * The token ids a prompt runs as: in chat mode the conversation of one user message rendered
 * by the model's chat template (/apply-template), then /tokenize with BOS, as /completion
 * tokenizes a text prompt.
 */
export async function promptIds(text, mode, signal) {
  let prompt = text;
  if (mode === "chat") {
    prompt = (await post("apply-template", {messages: [{role: "user", content: text}]},
      {signal})).prompt;
  }
  const out = await post("tokenize", {content: prompt, add_special: true}, {signal});
  return out.tokens;
}

/**
 * Generate from prompt ids with `steering` (undefined: the server's default), streaming each
 * piece to onPiece(text, tokenId). Resolves to {tokens, texts, probs, final}: the generated
 * ids, the text each one released and its probability.
 */
export async function generateTokens(ids, params, steering, onPiece, signal) {
  const body = {
    prompt: ids, n_predict: params.max_tokens, temperature: params.temperature,
    top_p: params.top_p, top_k: 0, min_p: 0, repeat_penalty: 1, seed: params.seed,
    stop: params.stop ?? [],
    // NOTE: with n_probs every token gets its own chunk, even one whose text is held back (a
    // partial UTF-8 character, the start of a stop string): no id is missing from the stream
    n_probs: 1,
  };
  if (steering !== undefined) body.steering = steering;
  const tokens = [];
  const texts = [];
  const probs = [];
  let final = null;
  await stream("completion", body, (chunk) => {
    if (chunk.stop) {
      final = chunk;
      return;
    }
    for (const id of chunk.tokens ?? []) {
      tokens.push(id);
      texts.push("");
      const p = chunk.completion_probabilities?.[0];
      probs.push(p && p.logprob !== undefined && p.logprob !== null ? Math.exp(p.logprob) : null);
    }
    if (chunk.content) {
      // text a token releases late (a partial character, a held-back stop) joins the last one
      if (!texts.length) texts.push("");
      texts[texts.length - 1] += chunk.content;
    }
    onPiece(chunk.content ?? "", chunk.tokens?.[0]);
  }, signal);
  return {tokens, texts, probs, final};
}
