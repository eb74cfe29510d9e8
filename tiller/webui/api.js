// tiller's HTTP API from the page. Every URL is relative (no leading slash), so the page works
// when a proxy serves tiller under a path. The API key, if any, goes as a Bearer token.

const KEY_STORAGE = "tiller.apiKey";

export class ApiError extends Error {
  constructor(status, message, param = null, code = null) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
  }
}

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) ?? "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

function headers(extra = {}) {
  const out = {...extra};
  const key = apiKey();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

/** An error answer as an ApiError with the server's message (OpenAI's error shape). */
async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  let param = null;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      param = body.error.param ?? null;
      code = body.error.code ?? null;
    }
  } catch {
    // not JSON (a proxy's own page): the status line says enough
  }
  if (response.status === 401) message = `${message} (set the API key at the top right)`;
  if (param) message = `${message} [${param}]`;
  return new ApiError(response.status, message, param, code);
}

/** fetch, with the key; rejects with ApiError for any answer that is not a 2xx. */
export async function call(method, path, body = undefined, {signal, raw = false} = {}) {
  const init = {method, headers: headers(), signal};
  if (body instanceof Blob || body instanceof ArrayBuffer) {
    init.headers["Content-Type"] = "application/octet-stream";
    init.body = body;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `cannot reach the server: ${e.message}`);
  }
  if (!response.ok) throw await failure(response);
  return raw ? response : response.json();
}

export const get = (path, options) => call("GET", path, undefined, options);
export const post = (path, body, options) => call("POST", path, body, options);
export const del = (path, options) => call("DELETE", path, undefined, options);

/**
 * POST with `stream: true` and call onEvent(json) for each server-sent event until [DONE] or
 * the end. An `{"error": ...}` event (an error after the stream started) rejects.
 */
export async function stream(path, body, onEvent, signal) {
  const response = await call("POST", path, {...body, stream: true}, {signal, raw: true});
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const json = JSON.parse(data);
      if (json.error) {
        throw new ApiError(500, json.error.message, json.error.param, json.error.code);
      }
      onEvent(json);
    }
  }
}
