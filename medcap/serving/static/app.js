// medcap's page: choose an image, see it as the model reads it (POST /v1/preview), ask, watch the
// answer stream in (POST /v1/chat/completions, stream: true), ask follow-ups about the same image.
// Plain JavaScript, no build step, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  image: null,      // the data: URL sent with the first question (with a #plane=... selector for NIfTI)
  raw: null,        // the file as a data: URL, without selector
  isNifti: false,
  messages: [],     // the conversation so far, in OpenAI's format
  model: null,      // /v1/models card
  controller: null, // aborts the streaming request
};

function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error.message + (body.error.param ? " (" + body.error.param + ")" : "");
  } catch (e) { /* not JSON */ }
  return "HTTP " + response.status;
}

async function loadModel() {
  const label = $("model");
  try {
    const response = await fetch("/v1/models", { headers: headers(false) });
    if (response.status === 401) {
      label.textContent = "this server needs its API key: enter it under Settings";
      $("settings").open = true;
      $("key").focus();
      return;
    }
    if (!response.ok) throw new Error(await errorText(response));
    const card = (await response.json()).data[0];
    state.model = card;
    const info = card.medcap || {};
    label.textContent = "";
    const name = document.createElement("strong");
    name.textContent = card.id;
    label.append(name, " \u00b7 LLM " + (info.llm || "?") + " \u00b7 vision checkpoint " +
      (info.vision_checkpoint || "none (untrained)") + " \u00b7 " + (info.vision || "") + ", " +
      (info.num_image_tokens || "?") + " image tokens");
  } catch (e) {
    label.textContent = "server not reachable: " + e.message;
  }
}

function mimeFor(name, type) {
  const lower = name.toLowerCase();
  if (/\.(dcm|dicom|dic)$/.test(lower)) return "application/dicom";
  if (lower.endsWith(".nii.gz")) return "application/gzip";
  if (lower.endsWith(".nii")) return "application/x-nifti";
  return type || "application/octet-stream";
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function withSelector(url) {
  if (!state.isNifti) return url;
  const index = $("slice").value.trim();
  return url + "#plane=" + $("plane").value + (index ? "&index=" + index : "");
}

async function showPreview() {
  const caption = $("preview-caption");
  const img = $("preview");
  caption.textContent = "reading the image...";
  img.hidden = true;
  const response = await fetch("/v1/preview", {
    method: "POST", headers: headers(), body: JSON.stringify({ image_url: { url: state.image } }),
  });
  if (!response.ok) {
    img.hidden = true;
    caption.textContent = "cannot use this image: " + (await errorText(response));
    state.image = null;
    return;
  }
  const blob = await response.blob();
  if (img.src) URL.revokeObjectURL(img.src);
  img.onload = () => img.classList.toggle("upscaled", img.naturalWidth < img.clientWidth);
  img.src = URL.createObjectURL(blob);
  img.hidden = false;
  const size = (state.model && state.model.medcap && state.model.medcap.image_size) || null;
  caption.textContent = "As the model reads it: " + response.headers.get("X-Image-Width") + "\u00d7" +
    response.headers.get("X-Image-Height") + " pixels" + (size ? ", resized to " + size + " px for the encoder" : "") +
    ". " + (state.fileName || "");
}

async function chooseFile() {
  const file = $("file").files[0];
  if (!file) return;
  const url = await readAsDataURL(file);
  state.fileName = file.name;
  state.raw = "data:" + mimeFor(file.name, file.type) + ";base64," + url.slice(url.indexOf(",") + 1);
  state.isNifti = /\.nii(\.gz)?$/i.test(file.name);
  $("nifti").hidden = !state.isNifti;
  state.image = withSelector(state.raw);
  newConversation();
  await showPreview();
}

async function reslice() {
  if (!state.raw) return;
  state.image = withSelector(state.raw);
  newConversation();
  await showPreview();
}

function newConversation() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("conversation").replaceChildren();
}

function addEntry(kind, text) {
  const li = document.createElement("li");
  li.className = kind;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = kind === "user" ? "you" : kind === "assistant" ? "model" : "error";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(who, body);
  $("conversation").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function userContent(text) {
  const first = !state.messages.some((m) => m.role === "user");
  if (!first || !state.image) return text;
  return [{ type: "image_url", image_url: { url: state.image } }, { type: "text", text: text }];
}

// Server-sent events from a fetch body: "data: {...}" blocks separated by blank lines.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.controller) return;
  const message = { role: "user", content: userContent(question) };
  const request = { messages: [...state.messages, message], stream: true, stream_options: { include_usage: true } };
  if (state.model) request.model = state.model.id;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) request.max_tokens = maxTokens;
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) request.temperature = temperature;

  addEntry("user", question);
  $("question").value = "";
  const entry = addEntry("assistant", "");
  const text = entry.querySelector(".text");
  setBusy(true);
  state.controller = new AbortController();
  let answer = "", finish = null, usage = null, model = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      model = chunk.model || model;
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          answer += choice.delta.content;
          text.textContent = answer;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    state.messages.push(message, { role: "assistant", content: answer });
    const meta = document.createElement("span");
    meta.className = "meta";
    const info = (state.model && state.model.medcap) || {};
    meta.textContent = (model || "?") + " \u00b7 checkpoint " + (info.vision_checkpoint || "none") +
      (usage ? " \u00b7 " + usage.completion_tokens + " tokens" : "") + (finish ? " \u00b7 " + finish : "");
    entry.append(meta);
    entry.dataset.done = "true";
  } catch (e) {
    entry.className = "error";
    text.textContent = e.name === "AbortError" ? "stopped" : e.message;
    entry.dataset.done = "true";
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("ask").disabled = busy;
  $("stop").hidden = !busy;
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = sessionStorage.getItem("medcap-key") || "";
  $("key").addEventListener("change", () => {
    sessionStorage.setItem("medcap-key", $("key").value.trim());
    loadModel();
  });
  $("file").addEventListener("change", chooseFile);
  $("reslice").addEventListener("click", reslice);
  $("ask-form").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask-form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new").addEventListener("click", newConversation);
  loadModel();
});
