// The mmlm serve page: plain JavaScript against the OpenAI-shaped API of `mmlm serve`, no build step.
"use strict";

const KEY_STORAGE = "mmlm-api-key";
const $ = (id) => document.getElementById(id);

const state = {
  image: null, // the current image as a data: URL
  audio: null, // the current audio clip: { data: base64, format: "wav" | "mp3" | "flac" | "ogg" }
  keyRequest: null, // one pending "ask for the key" shared by concurrent 401s
};

// ---- errors -------------------------------------------------------------------------------------

class ApiError extends Error {}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// The message of an error body: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or the raw text.
function errorMessage(status, text) {
  let message = text.trim();
  try {
    const body = JSON.parse(text);
    if (body && body.error) {
      message = typeof body.error === "string" ? body.error : body.error.message || JSON.stringify(body.error);
    } else if (body && body.detail !== undefined) {
      message = Array.isArray(body.detail)
        ? body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ")
        : String(body.detail);
    }
  } catch (_) {
    // not JSON: keep the text
  }
  return `Error ${status}: ${message || "the server gave no reason"}`;
}

// ---- API key --------------------------------------------------------------------------------------

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

// Shows the key field and resolves once the user submits a key; concurrent 401s share one request.
function askForKey(rejected) {
  if (state.keyRequest) return state.keyRequest;
  const form = $("key-form");
  $("key-note").textContent = rejected
    ? "That key was refused; enter another. Kept for this tab only (sessionStorage)."
    : "Kept for this tab only (sessionStorage).";
  form.hidden = false;
  $("api-key").value = "";
  $("api-key").focus();
  state.keyRequest = new Promise((resolve) => {
    form.onsubmit = (event) => {
      event.preventDefault();
      const key = $("api-key").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      form.hidden = true;
      form.onsubmit = null;
      state.keyRequest = null;
      resolve(key);
    };
  });
  return state.keyRequest;
}

// fetch with the Bearer key; on 401 asks for the key and retries. Throws ApiError with the body's message.
async function api(path, body) {
  for (;;) {
    const headers = { "Content-Type": "application/json" };
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    const init = body === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(body) };
    const response = await fetch(path, init);
    if (response.status === 401) {
      await askForKey(Boolean(key));
      continue;
    }
    if (!response.ok) throw new ApiError(errorMessage(response.status, await response.text()));
    return response;
  }
}

// Runs one user action: clears the old error, shows the new one, disables the button meanwhile.
async function action(button, work) {
  clearError();
  button.disabled = true;
  try {
    await work();
  } catch (error) {
    showError(error instanceof ApiError ? error.message : `Error: ${error.message}`);
  } finally {
    button.disabled = false;
  }
}

function requireImage() {
  if (!state.image) throw new ApiError("Add an image first: drop it, paste it, or choose a file.");
  return state.image;
}

// ---- image ----------------------------------------------------------------------------------------

function setImageFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError(`Error: ${file ? file.name : "that"} is not an image.`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;
    $("preview").src = state.image;
    $("preview").hidden = false;
    $("drop-hint").hidden = true;
    $("drop").dataset.loaded = "true";
    clearError();
  };
  reader.readAsDataURL(file);
}

function setUpImageInput() {
  const drop = $("drop");
  $("file").addEventListener("change", () => setImageFile($("file").files[0]));
  drop.addEventListener("click", () => $("file").click());
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("file").click();
    }
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    setImageFile(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const item = [...event.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) setImageFile(item.getAsFile());
  });
}

// ---- audio ----------------------------------------------------------------------------------------

const AUDIO_FORMATS = { wav: "wav", mp3: "mp3", flac: "flac", ogg: "ogg", oga: "ogg" };

function setAudioFile(file) {
  const format = file && AUDIO_FORMATS[file.name.split(".").pop().toLowerCase()];
  if (!format) {
    state.audio = null;
    $("audio-name").hidden = true;
    if (file) showError(`Error: ${file.name} is not a WAV, MP3, FLAC or OGG file.`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    state.audio = { data: reader.result.split(",", 2)[1], format };  // the base64 after "data:...;base64,"
    $("audio-name").textContent = file.name;
    $("audio-name").hidden = false;
    clearError();
  };
  reader.readAsDataURL(file);
}

// ---- models ---------------------------------------------------------------------------------------

async function loadModels() {
  const response = await api("/v1/models");
  const models = (await response.json()).data || [];
  const select = $("model");
  select.replaceChildren(
    ...models.map((m) => {
      const option = document.createElement("option");
      option.value = option.textContent = m.id;
      return option;
    }),
  );
}

// ---- zero-shot classification ----------------------------------------------------------------------

// Pairs of [label, probability] from the response; accepts {labels, probabilities} or a list of rows.
function labelProbabilities(body) {
  if (Array.isArray(body.labels) && !body.labels.every((l) => typeof l === "string")) {
    return body.labels.map((row) => [row.label, row.probability ?? row.score]);
  }
  const probabilities = body.probabilities ?? body.probs ?? body.scores;
  return body.labels.map((label, i) => [label, probabilities[i]]);
}

function drawBars(pairs) {
  const bars = $("bars");
  pairs.sort((a, b) => b[1] - a[1]);
  bars.replaceChildren(
    ...pairs.map(([label, probability]) => {
      const row = document.createElement("div");
      row.className = "bar-row";
      row.dataset.label = label;
      row.dataset.probability = String(probability);
      const name = document.createElement("span");
      name.className = "bar-label";
      name.textContent = label;
      const track = document.createElement("div");
      track.className = "bar-track";
      track.setAttribute("role", "meter");
      track.setAttribute("aria-label", label);
      track.setAttribute("aria-valuemin", "0");
      track.setAttribute("aria-valuemax", "1");
      track.setAttribute("aria-valuenow", String(probability));
      const fill = document.createElement("div");
      fill.className = "bar-fill";
      fill.style.width = `${(100 * probability).toFixed(2)}%`;
      track.append(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = `${(100 * probability).toFixed(1)}%`;
      row.append(name, track, value);
      return row;
    }),
  );
}

async function classify() {
  const image = requireImage();
  const labels = $("labels")
    .value.split(",")
    .map((l) => l.trim())
    .filter(Boolean);
  // An empty label list goes to the server too: its guard says what it expects.
  const response = await api("/v1/classify", { image, labels });
  drawBars(labelProbabilities(await response.json()));
}

// ---- chat, streamed -------------------------------------------------------------------------------

// Reads server-sent events from a fetch body; calls onData with each `data:` payload.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const lines = buffer.split(/\r?\n/);
    buffer = done ? "" : lines.pop();
    for (const line of lines) {
      if (line.startsWith("data:") && onData(line.slice(5).trim()) === false) {
        reader.cancel();
        return;
      }
    }
    if (done) return;
  }
}

async function ask() {
  if (!state.image && !state.audio) throw new ApiError("Add an image (or an audio clip) first.");
  const question = $("question").value.trim() || (state.image ? "Describe the image." : "What is said?");
  const content = [];  // the media first, as LLaVA-style models learn them
  if (state.image) content.push({ type: "image_url", image_url: { url: state.image } });
  if (state.audio) content.push({ type: "input_audio", input_audio: state.audio });
  content.push({ type: "text", text: question });
  const answer = $("answer");
  answer.textContent = "";
  answer.classList.add("streaming");
  const response = await api("/v1/chat/completions", {
    model: $("model").value || "default",
    stream: true,
    max_tokens: Number($("max-tokens").value) || 256,
    temperature: Number($("temperature").value) || 0,  // 0: greedy; the OpenAI default would be 1
    messages: [{ role: "user", content }],
  });
  try {
    await readEvents(response, (data) => {
      if (data === "[DONE]") return false;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(`Error: ${chunk.error.message || JSON.stringify(chunk.error)}`);
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) answer.textContent += delta;
      return true;
    });
  } finally {
    answer.classList.remove("streaming");
  }
}

// ---- search ---------------------------------------------------------------------------------------

// The thumbnail of an indexed image as an object URL: fetched with the API key (an <img src> cannot send it).
async function thumbnailUrl(row) {
  const response = await api(`/v1/search/thumbnail/${encodeURIComponent(row.id)}`);
  return URL.createObjectURL(await response.blob());
}

// Fills the card's <img> once its thumbnail arrives; a vanished file leaves the card with its caption only.
function showThumbnail(img, row) {
  thumbnailUrl(row)
    .then((url) => {
      img.src = url;
      img.hidden = false;
    })
    .catch(() => img.remove());
}

function drawResults(rows) {
  const results = $("results");
  for (const old of results.querySelectorAll("img[src^='blob:']")) URL.revokeObjectURL(old.src);
  if (!rows.length) {
    results.textContent = "No results.";
    return;
  }
  results.replaceChildren(
    ...rows.map((row) => {
      const card = document.createElement("figure");
      card.className = "result";
      if (row.id !== undefined) {
        const img = document.createElement("img");
        img.className = "result-thumbnail";
        img.alt = row.caption || row.path || "search result";
        img.hidden = true;
        card.append(img);
        showThumbnail(img, row);
      }
      const caption = document.createElement("figcaption");
      const text = document.createElement("span");
      text.className = "result-caption";
      text.textContent = row.caption || row.path || row.id || "";
      const score = document.createElement("span");
      score.className = "result-score";
      score.textContent = typeof row.score === "number" ? row.score.toFixed(3) : "";
      caption.append(text, score);
      if (row.path && row.caption) caption.title = row.path;
      card.append(caption);
      return card;
    }),
  );
}

async function search(query) {
  const response = await api("/v1/search", { ...query, k: 8 });
  const body = await response.json();
  drawResults(body.data || body.results || []);
}

// ---- wiring ---------------------------------------------------------------------------------------

function onSubmit(formId, buttonId, work) {
  $(formId).addEventListener("submit", (event) => {
    event.preventDefault();
    action($(buttonId), work);
  });
}

setUpImageInput();
$("audio-file").addEventListener("change", () => setAudioFile($("audio-file").files[0]));
onSubmit("classify-form", "classify", classify);
onSubmit("chat-form", "ask", ask);
onSubmit("search-form", "search", () => search({ text: $("search-text").value.trim() }));
$("search-image").addEventListener("click", () =>
  action($("search-image"), () => search({ image: requireImage() })),
);
$("question").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});
loadModels().catch((error) => showError(error instanceof ApiError ? error.message : `Error: ${error.message}`));
