// The page at /: pick, paste or upload a dialogue, stream its summary from POST /summarize?stream=true.
// Events (see finetuneflow/serve/routes.py): start, part (one per finished window), delta (the next piece of
// the summary as its tokens are generated), summary (the whole text and its faithfulness checks), done, error.
// A summary's flagged spans (ftf checks: character offsets into it) are highlighted, with a tooltip.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { samples: [], controller: null };

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const token = $("token").value.trim() || sessionStorage.getItem("ftf-token") || "";
  if (token) { h["Authorization"] = "Bearer " + token; sessionStorage.setItem("ftf-token", token); }
  return h;
}

async function getJSON(path) {
  const response = await fetch(path, { headers: headers(false) });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((body.error && body.error.message) || response.statusText);
  return body;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
  if (message) setStatus("error");
}

function setStatus(text) { $("status").textContent = text; }

function describe(settings) {
  return Object.entries(settings || {}).filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => `${k}=${v}`).join(", ");
}

async function loadInfo() {
  try {
    const info = await getJSON("/info");
    $("model").textContent = `model ${info.id} (${info.family}, ${info.backend} on ${info.device}, ${info.dtype}); ` +
      `input up to ${info.max_input_length} tokens, longer dialogues: ${info.long_input}`;
    $("settings").textContent = "decoding as evaluated: " + describe(info.effective_defaults) +
      (info.instruction ? ` · instruction: "${info.instruction}"` : "");
  } catch (err) {
    $("model").textContent = "model details unavailable: " + err.message + " (an API token may be needed)";
  }
  try {
    state.samples = (await getJSON("/samples")).samples || [];
    for (const [i, s] of state.samples.entries()) {
      const option = document.createElement("option");
      option.value = String(i);
      option.textContent = `${s.id} (${s.dialogue.length} characters)`;
      $("sample").appendChild(option);
    }
  } catch (err) { /* no samples: the page still works */ }
}

function countChars() { $("chars").textContent = `${$("dialogue").value.length} characters`; }

function resetOutput() {
  $("summary").textContent = "";
  $("checks").textContent = "";
  $("checks").hidden = true;
  $("stats").textContent = "";
  $("parts").innerHTML = "";
  $("parts-box").hidden = true;
  $("progress").hidden = true;
  showError("");
}

function onEvent(type, data, clock) {
  const seconds = ((performance.now() - clock) / 1000).toFixed(2);
  if (type === "start") {
    const windows = (data.windows || [1])[0];
    setStatus("generating");
    $("settings").textContent = "decoding: " + describe(data.generation);
    if (windows > 1) {
      $("progress").hidden = false;
      $("bar").max = windows;
      $("bar").value = 0;
      $("progress-text").textContent = `long dialogue: about ${windows} parts`;
      $("parts-box").hidden = false;
      $("parts-box").open = true;
    }
  } else if (type === "part") {
    const item = document.createElement("li");
    const where = data.level > 0 ? `combining ${data.part}/${data.parts}` : `part ${data.part}/${data.parts}`;
    item.textContent = `${where}: ${data.summary}`;
    $("parts").appendChild(item);
    if (data.level === 0) {
      $("bar").max = data.parts;
      $("bar").value = $("parts").querySelectorAll("li").length;
      $("progress-text").textContent = `${where} done after ${seconds} s`;
    }
    if (!$("summary").textContent) $("summary").textContent = "…";
  } else if (type === "delta") {
    if (data.dialogue === 0) {
      if ($("summary").textContent === "…") $("summary").textContent = "";
      $("summary").textContent += data.text;
    }
  } else if (type === "summary") {
    showSummary(data.summary, data.checks);
    if (!$("progress").hidden) { $("bar").value = $("bar").max; $("progress-text").textContent = "combined"; }
  } else if (type === "done") {
    const usage = data.usage || {};
    $("stats").textContent = `${data.seconds.toFixed(2)} s · ${usage.prompt_tokens} input tokens · ` +
      `${usage.completion_tokens} generated tokens · ${data.tokens_per_s} tokens/s`;
    setStatus("done");
  } else if (type === "error") {
    showError(data.error ? data.error.message : "the server stopped the request");
  }
}

// The spans to mark: every unsupported mention, then other flagged spans that overlap none of them.
function pickSpans(spans) {
  const chosen = spans.filter((s) => s.check === "unsupported_mentions");
  for (const s of spans) {
    if (s.check !== "unsupported_mentions" && !chosen.some((c) => s.start < c.end && c.start < s.end)) chosen.push(s);
  }
  return chosen.sort((a, b) => a.start - b.start);
}

function showSummary(text, checks) {
  const box = $("summary");
  box.textContent = "";
  if (!text) { box.textContent = "(the model returned an empty summary)"; return; }
  let at = 0;
  for (const span of pickSpans((checks && checks.spans) || [])) {
    if (span.start < at) continue;
    box.appendChild(document.createTextNode(text.slice(at, span.start)));
    const mark = document.createElement("mark");
    mark.className = "flag " + span.check;
    mark.textContent = text.slice(span.start, span.end);
    mark.title = `${span.label}: ${span.why} (${span.check})`;
    box.appendChild(mark);
    at = span.end;
  }
  box.appendChild(document.createTextNode(text.slice(at)));
  showChecks(checks);
}

function showChecks(checks) {
  const line = $("checks");
  if (!checks) { line.hidden = true; return; }
  const spans = checks.spans || [];
  if (checks.error) line.textContent = `faithfulness checks failed: ${checks.error}`;
  else if (checks.skipped) line.textContent = `no faithfulness flags: ${checks.skipped}`;
  else if (spans.length) line.textContent = `${spans.length} flagged: ` +
    spans.map((s) => `“${s.text}” ${s.label}`).join("; ") + " (hover a marked part for why)";
  else line.textContent = `faithfulness checks (${checks.checked.join(", ")}): nothing flagged`;
  line.hidden = false;
}

async function readEvents(response, clock) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) type = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) onEvent(type, JSON.parse(data), clock);
    }
  }
}

async function summarize(event) {
  event.preventDefault();
  const dialogue = $("dialogue").value;
  resetOutput();
  if (!dialogue.trim()) { showError("type, paste, upload or pick a dialogue first"); return; }
  const body = { dialogue };
  const limit = parseInt($("max_new_tokens").value, 10);
  if (limit > 0) body.generation = { max_new_tokens: limit };
  if (state.controller) state.controller.abort();
  state.controller = new AbortController();
  $("go").disabled = true;
  setStatus("waiting");
  const clock = performance.now();
  try {
    const response = await fetch("/summarize?stream=true", {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal: state.controller.signal });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      showError((error.error && error.error.message) || `HTTP ${response.status}`);
      return;
    }
    await readEvents(response, clock);
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message);
  } finally {
    $("go").disabled = false;
  }
}

$("form").addEventListener("submit", summarize);
$("dialogue").addEventListener("input", countChars);
$("sample").addEventListener("change", () => {
  const sample = state.samples[Number($("sample").value)];
  if (sample) { $("dialogue").value = sample.dialogue; countChars(); }
});
$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => { $("dialogue").value = String(reader.result); countChars(); };
  reader.onerror = () => showError("cannot read that file");
  reader.readAsText(file);
});
loadInfo();
