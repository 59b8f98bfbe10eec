// The search page: plain modern JavaScript over the service's JSON API (no build step, no library).
// Every request goes through api(): a deadline, the API's one-line {"detail"} as the message, and
// the X-API-Key header from this tab's session storage when writing (never in a URL).

const KEY_STORAGE = "ssl-retrieval.api-key";
const REQUEST_TIMEOUT_MS = 60000;
const WAIT_FOR_THUMBNAILS = 12; // the round trip ends when the first row(s) of thumbnails show
// The search answers with the thumbnails of the first results inline (one batched read on the
// server, no request per result): as many as are loaded eagerly (see renderResults).
const INLINE_THUMBNAILS = 48;
const VOTERS_SHOWN = 24;
const STALE_AFTER_MS = 300; // results shown longer than this after a new query was sent are dimmed
const PREVIEW_AFTER_MS = 150; // the query's preview waits for its search at most this long

const $ = (id) => document.getElementById(id);
const state = {
  config: { max_upload_bytes: 20 * 1024 * 1024, max_files_per_request: 64,
            max_request_bytes: 256 * 1024 * 1024, search_max_k: 1000,
            classify_k: 200, search_expand: 5, max_expand: 100, writes_need_key: false,
            reads_need_key: false },
  query: null, // {kind: "file", file, name} | {kind: "id", id}
  classified: null, // the query the classify panel shows
  querySeq: 0,
  queryAbort: null,
  rerunWhenReady: false,
  ready: null,
  statusTimer: 0,
  polling: false,
  browse: { cursors: [null], page: 0, next: null, label: "", tag: "", loaded: false },
  record: null,
  inlineThumbnails: new Map(), // id -> data: URL, from the result set shown
  pendingWrite: null,
  knownLabels: new Set(),
};

// ---------------------------------------------------------------- API access

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.detail = detail;
    this.status = status; // 0: no answer (unreachable or timed out)
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

async function api(path, { method = "GET", json, form, blob, write = false, as = "json", signal,
                            timeoutMs = REQUEST_TIMEOUT_MS } = {}) {
  const headers = {};
  const key = apiKey();
  if (key && (write || state.config.reads_need_key)) headers["X-API-Key"] = key;
  let body = form;
  if (blob !== undefined) { // a file sent as it is, typed by its own media type
    headers["Content-Type"] = blob.type;
    body = blob;
  }
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  const onAbort = () => controller.abort();
  signal?.addEventListener("abort", onAbort);
  let response;
  let payload;
  try {
    response = await fetch(path, { method, headers, body, signal: controller.signal });
    payload = as === "blob" && response.ok ? await response.blob() : await response.text();
  } catch (error) {
    if (signal?.aborted) throw error; // superseded by a newer request: the caller ignores it
    noteUnreachable();
    if (controller.signal.aborted) {
      throw new ApiError(0, `no answer from the service within ${timeoutMs / 1000} s; try again`);
    }
    throw new ApiError(0, "cannot reach the service (is it running?); the page retries by itself");
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener("abort", onAbort);
  }
  if (response.ok) return as === "json" ? (payload ? JSON.parse(payload) : null) : payload;
  let detail = payload;
  try {
    const parsed = JSON.parse(payload);
    detail = typeof parsed.detail === "string" ? parsed.detail : JSON.stringify(parsed.detail ?? parsed);
  } catch {
    detail = (payload || "").trim().slice(0, 300) || response.statusText;
  }
  if (response.status === 503) noteUnreachable();
  throw new ApiError(response.status, detail || `HTTP ${response.status}`);
}

/** Images are plain <img src> unless reads need the key: then they come through fetch + blob
 * (a data: URL, an inlined thumbnail, needs neither). */
function showImage(img, url) {
  if (!state.config.reads_need_key || url.startsWith("data:")) {
    img.src = url;
    return;
  }
  api(url, { as: "blob" }).then((blob) => {
    const objectUrl = URL.createObjectURL(blob);
    img.addEventListener("load", () => URL.revokeObjectURL(objectUrl), { once: true });
    img.src = objectUrl;
  }, () => img.classList.add("broken"));
}

/** Resolves when `img` can be painted without a further decode, or has failed: decode() once its
 * source is set, else (fetched with the API key) its load. */
function imageReady(img) {
  return img.getAttribute("src") ? img.decode().catch(() => {}) : imageLoaded(img);
}

function imageLoaded(img) {
  if (img.complete && img.naturalWidth) return Promise.resolve();
  return new Promise((resolve) => {
    img.addEventListener("load", resolve, { once: true });
    img.addEventListener("error", resolve, { once: true });
  });
}

/** Mark `element` busy (aria-busy) and, only if that lasts past STALE_AFTER_MS, dim it as stale
 * (and run `onStale`). Nothing visible changes before that: a fast answer replaces the content in
 * one paint, where showing "busy" first repaints the panels twice (with the classify panel dimmed
 * and "searching…" at once, a one-CPU browser showed results 14 ms later, of ~50). A timer rather
 * than a delayed CSS transition: a pending transition keeps the browser producing frames.
 * Returns the function that ends it. */
const staleTimers = new Map(); // element -> the timer of its latest markBusy
function markBusy(element, onStale = () => {}) {
  clearTimeout(staleTimers.get(element)); // a superseded request's timer must not dim the new one
  element.setAttribute("aria-busy", "true");
  const timer = setTimeout(() => {
    element.classList.add("stale");
    onStale();
  }, STALE_AFTER_MS);
  staleTimers.set(element, timer);
  return () => {
    clearTimeout(timer);
    element.classList.remove("stale");
    element.setAttribute("aria-busy", "false");
  };
}

// ---------------------------------------------------------------- messages

function formatBytes(n) {
  if (n >= 1024 * 1024) return `${(n / 1024 / 1024).toFixed(1)} MB`;
  if (n >= 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${n} bytes`;
}

/** The API's message, with what to do for the statuses a person can act on. */
function describe(error) {
  if (!(error instanceof ApiError)) return `unexpected error: ${error.message || error}`;
  switch (error.status) {
    case 401: return `This service needs an API key (401: ${error.detail}). Enter it and the action is retried.`;
    case 403: return `The API key was refused (403: ${error.detail}). Enter the right key.`;
    case 413: return `Too large (413): ${error.detail}`;
    case 503: return `The service is not ready (503): ${error.detail}`;
    case 0: return error.detail;
    default: return error.detail;
  }
}

function setError(element, error) {
  element.textContent = error ? (typeof error === "string" ? error : describe(error)) : "";
}

/** A 422 whose detail starts with a control's name ("k: ...") is shown next to that control. */
function showFieldErrors(error, fields) {
  if (!(error instanceof ApiError) || error.status !== 422) return false;
  let shown = false;
  for (const part of error.detail.split("; ")) {
    const name = part.split(":")[0].split(".")[0].trim();
    if (fields.includes(name)) {
      $(`${name}-error`).textContent = part.slice(part.indexOf(":") + 1).trim();
      shown = true;
    }
  }
  return shown;
}

function clearFieldErrors() {
  for (const el of document.querySelectorAll(".field-error")) el.textContent = "";
}

function rememberLabels(labels) {
  let added = false;
  for (const label of labels) {
    if (label && !state.knownLabels.has(label)) {
      state.knownLabels.add(label);
      added = true;
    }
  }
  if (!added) return;
  const list = $("known-labels");
  list.replaceChildren(...[...state.knownLabels].sort().map((label) => new Option(label)));
}

// ---------------------------------------------------------------- status

/** A request found the service down or not ready: check the status now rather than at the next tick. */
function noteUnreachable() {
  if (state.polling) return;
  clearTimeout(state.statusTimer);
  state.statusTimer = setTimeout(pollStatus, 500);
}

function setStatus(kind, text, versions = "") {
  $("status").dataset.state = kind;
  $("status-text").textContent = text;
  $("status-versions").textContent = versions;
  const banner = $("banner");
  if (kind === "ready") {
    banner.hidden = true;
  } else {
    banner.hidden = false;
    banner.textContent = kind === "unreachable"
      ? "The service cannot be reached. This page keeps checking and carries on when it is back."
      : `The service is not ready yet: ${text.replace(/^not ready: /, "")}. This page checks every 2 s and carries on when it is ready.`;
  }
}

async function pollStatus() {
  clearTimeout(state.statusTimer);
  state.polling = true;
  let nextMs = 5000;
  try {
    const ready = await api("/health/ready", { timeoutMs: 8000 });
    const size = Number(ready.index_size).toLocaleString("en");
    setStatus("ready", "ready", `model ${ready.model_version} · index ${ready.index_version} · ${size} images`);
    const recovered = state.ready === false;
    state.ready = true;
    if (recovered && state.rerunWhenReady) runQuery();
  } catch (error) {
    state.ready = false;
    nextMs = 2000;
    if (error.status === 0) setStatus("unreachable", "unreachable");
    else setStatus("not-ready", error.detail);
  } finally {
    state.polling = false;
  }
  clearTimeout(state.statusTimer);
  state.statusTimer = setTimeout(pollStatus, document.hidden ? Math.max(nextMs, 15000) : nextMs);
}

async function loadConfig() {
  try {
    Object.assign(state.config, await api("/ui/config", { timeoutMs: 8000 }));
    $("k").max = state.config.search_max_k;
    $("expand").max = state.config.max_expand;
    $("expand").placeholder = String(state.config.search_expand); // what an empty field gets
  } catch {
    // The defaults above stand in; the service's own checks still apply.
  }
}

// ---------------------------------------------------------------- tabs

function selectTab(tab) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  if (tab.id === "tab-catalogue" && !state.browse.loaded) loadBrowsePage(0);
  history.replaceState(null, "", tab.id === "tab-catalogue" ? "#catalogue" : location.pathname);
}

function setUpTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step) return;
      const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
      next.focus();
      selectTab(next);
    });
  }
  if (location.hash === "#catalogue") selectTab($("tab-catalogue"));
}

// ---------------------------------------------------------------- search and classify

function readFilters() {
  clearFieldErrors();
  const filters = {};
  let valid = true;
  const kText = $("k").value.trim();
  const k = Number(kText || 10);
  if (!Number.isInteger(k) || k < 1 || k > state.config.search_max_k) {
    $("k-error").textContent = `a whole number from 1 to ${state.config.search_max_k}`;
    valid = false;
  }
  filters.k = k;
  const minScore = $("min-score").value.trim();
  if (minScore) {
    const value = Number(minScore);
    if (!Number.isFinite(value) || value < -1 || value > 1) {
      $("min_score-error").textContent = "a number from -1 to 1";
      valid = false;
    }
    filters.min_score = value;
  }
  const expandText = $("expand").value.trim();
  if (expandText) {
    const expand = Number(expandText);
    if (!Number.isInteger(expand) || expand < 0 || expand > state.config.max_expand) {
      $("expand-error").textContent = `a whole number from 0 to ${state.config.max_expand}`;
      valid = false;
    }
    filters.expand = expand;
  }
  const label = $("label").value.trim();
  if (label) filters.label = label;
  const tags = $("tags").value.split(",").map((t) => t.trim()).filter(Boolean);
  if (tags.length) filters.tags = tags;
  return valid ? filters : null;
}

function setQueryFromFile(file) {
  if (!file) return;
  if (file.size > state.config.max_upload_bytes) {
    setError($("search-error"), `${file.name || "the image"} is ${formatBytes(file.size)}, over the service's limit of ${formatBytes(state.config.max_upload_bytes)}`);
    return;
  }
  state.query = { kind: "file", file, name: file.name || "pasted image" };
  const caption = `${state.query.name} · ${formatBytes(file.size)}`;
  previewAfterSearch(() => {
    const img = $("query-image");
    const url = URL.createObjectURL(file);
    img.classList.remove("broken");
    img.onload = () => {
      URL.revokeObjectURL(url);
      img.classList.toggle("pixelated", img.naturalWidth < 96);
    };
    img.onerror = () => { URL.revokeObjectURL(url); img.classList.add("broken"); };
    img.src = url;
    $("query-caption").textContent = caption;
  });
  runQuery();
}

function setQueryFromId(id, caption) {
  state.query = { kind: "id", id };
  selectTab($("tab-search"));
  previewAfterSearch(() => {
    const img = $("query-image");
    img.classList.remove("broken");
    img.onload = () => img.classList.toggle("pixelated", img.naturalWidth < 96);
    img.onerror = () => img.classList.add("broken");
    showImage(img, `/images/${id}/content`);
    $("query-caption").textContent = caption || `catalogue image #${id}`;
  });
  runQuery();
  $("results-heading").scrollIntoView({ block: "nearest" });
}

/** Sets the query's preview once its search has answered (or failed), or after PREVIEW_AFTER_MS if
 * that is sooner: loading and painting it while the request was in flight delayed the results by
 * 1.2-1.4 ms of ~25 on a one-CPU browser (A/B in bench/RESULTS.md, "Search page"), and a person
 * looks for the results first. */
const preview = { timer: 0, show: null };
function previewAfterSearch(show) {
  clearTimeout(preview.timer); // a newer query's preview replaces one not yet shown
  preview.show = show;
  preview.timer = setTimeout(showPreview, PREVIEW_AFTER_MS);
}

function showPreview() {
  clearTimeout(preview.timer);
  const show = preview.show;
  preview.show = null;
  show?.();
}

function searchRequest(filters, signal) {
  const query = state.query;
  const options = { ...filters, thumbnails: Math.min(filters.k, INLINE_THUMBNAILS) };
  if (query.kind === "id") {
    return api("/search", { method: "POST", json: { id: query.id, ...options }, signal });
  }
  const fields = Object.entries(options).map(([name, value]) => [name, Array.isArray(value) ? value.join(",") : String(value)]);
  if (query.file.type.startsWith("image/")) {
    // The image itself as the body, options in the query string: nothing to build or parse.
    return api(`/search?${new URLSearchParams(fields)}`, { method: "POST", blob: query.file, signal });
  }
  const form = new FormData(); // a file the browser could not type: the service sniffs the bytes
  form.append("file", query.file, query.name);
  for (const [name, value] of fields) form.append(name, value);
  return api("/search", { method: "POST", form, signal });
}

async function classifyRequest(signal) {
  const query = state.query;
  const file = query.kind === "id"
    ? await api(`/images/${query.id}/content`, { as: "blob", signal })
    : query.file;
  const neighbours = String(Math.min(state.config.classify_k, 1000)); // all voters, to count them
  if (file.type.startsWith("image/")) {
    return api(`/classify?neighbours=${neighbours}`, { method: "POST", blob: file, signal });
  }
  const form = new FormData();
  form.append("file", file, query.kind === "id" ? `catalogue-${query.id}` : query.name);
  form.append("neighbours", neighbours);
  return api("/classify", { method: "POST", form, signal });
}

/** Search first, then classify the same query: the search is what a person waits for, and the
 * classify vote (k=200 neighbours' labels) must not slow it down. */
async function runQuery() {
  if (!state.query) return;
  const filters = readFilters();
  if (!filters) return;
  state.lastFilters = JSON.stringify(filters);
  state.queryAbort?.abort();
  const abort = new AbortController();
  state.queryAbort = abort;
  const seq = ++state.querySeq;
  state.rerunWhenReady = false;
  $("query-preview").hidden = false;
  $("drop-zone").classList.add("has-query");
  $("search-again").disabled = false;
  setError($("search-error"), "");
  setError($("classify-error"), "");
  const idle = markBusy($("results"), () => { $("timing").textContent = "searching…"; });
  const classifyIdle = markBusy($("classify"));
  const started = performance.now();
  let searched = false;
  try {
    const data = await searchRequest(filters, abort.signal);
    if (seq !== state.querySeq) return;
    const answered = performance.now();
    const { cards, images, later } = buildResultCards(data.results);
    // The first rows' thumbnails are decoded before the cards go in, so that cards and images
    // reach the screen in one frame (not the cards first and their images frames later); the
    // other rows' images start loading after that frame.
    await Promise.all(images.map(imageReady));
    if (seq !== state.querySeq) return;
    renderResults(data.results, cards);
    requestAnimationFrame(() => setTimeout(() => {
      if (seq === state.querySeq) later.forEach(([img, url]) => showImage(img, url));
    }));
    const shown = performance.now() - started;
    showTiming(data, { answered: answered - started, rendered: shown, shown }, seq);
    searched = true;
  } catch (error) {
    if (seq !== state.querySeq) return;
    if (error.status === 0 || error.status === 503) state.rerunWhenReady = true;
    $("timing").textContent = "";
    if (!showFieldErrors(error, ["k", "label", "tags", "min_score", "expand"])) {
      const name = state.query.kind === "file" ? `${state.query.name}: ` : "";
      setError($("search-error"), name + describe(error));
    }
    $("results").replaceChildren();
    $("results-empty").hidden = false;
    $("results-empty").textContent = "No results: see the message by the query.";
    askForKey(error, runQuery); // reads need the key when the service protects them
  } finally {
    if (seq === state.querySeq) {
      idle();
      showPreview();
    }
  }
  if (searched) {
    await runClassify(seq, abort.signal, classifyIdle);
  } else {
    state.classified = null;
    $("classify-result").hidden = true;
    $("classify-empty").hidden = false;
    classifyIdle();
  }
}

function renderResults(results, cards) {
  $("results-empty").hidden = results.length > 0;
  $("results-empty").textContent = "No catalogue image passes these filters.";
  rememberLabels(results.map((r) => r.label));
  state.inlineThumbnails = new Map(results.filter((r) => r.thumbnail_data_url)
    .map((r) => [r.id, r.thumbnail_data_url]));
  $("results").replaceChildren(...cards);
}

/** The result cards (not yet in the page), the thumbnail images of the first WAIT_FOR_THUMBNAILS
 * (loading), and [image, url] for the rest (not loading yet). */
function buildResultCards(results) {
  const images = [];
  const later = [];
  const cards = results.map((result, rank) => {
    const card = document.createElement("li");
    card.className = "card";
    card.dataset.id = result.id;
    card.dataset.label = result.label ?? "";
    const more = document.createElement("button");
    more.type = "button";
    more.className = "thumb";
    more.title = "More like this";
    more.setAttribute("aria-label", `More like #${result.id}${result.label ? ` (${result.label})` : ""}, score ${result.score.toFixed(3)}`);
    const img = document.createElement("img");
    img.alt = "";
    img.width = 112;
    img.height = 112;
    img.decoding = "async";
    if (rank >= 48) img.loading = "lazy";
    const url = result.thumbnail_data_url ?? result.thumbnail_url;
    if (rank < WAIT_FOR_THUMBNAILS) {
      img.setAttribute("elementtiming", "thumbnail"); // when it was painted (bench/page_bench.py)
      showImage(img, url);
      images.push(img);
    } else {
      later.push([img, url]);
    }
    more.append(img);
    more.addEventListener("click", () => setQueryFromId(result.id));
    const full = document.createElement("a");
    full.className = "full";
    full.href = result.content_url;
    full.target = "_blank";
    full.rel = "noopener";
    full.textContent = "↗";
    full.title = "Open the original in full size";
    full.setAttribute("aria-label", `Image #${result.id} in full size (opens a new tab)`);
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = result.score.toFixed(3);
    score.title = "cosine similarity to the query";
    score.style.setProperty("--score", Math.max(0, result.score).toFixed(3));
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = result.label ?? "unlabelled";
    label.title = label.textContent;
    meta.append(score, label);
    card.append(more, full, meta);
    if (result.tags.length) {
      const tags = document.createElement("ul");
      tags.className = "tags";
      tags.setAttribute("aria-label", "tags");
      tags.title = result.tags.join(", ");
      tags.append(...result.tags.map((tag) => Object.assign(document.createElement("li"), { textContent: tag })));
      card.append(tags);
    }
    return card;
  });
  return { cards, images, later };
}

/** times: ms from the request's start to the JSON answered, the cards in the DOM, the first
 * thumbnails loaded. */
function showTiming(data, times, seq) {
  const t = data.timing_ms || {};
  const server = Object.values(t).reduce((a, b) => a + b, 0);
  const parts = ["decode", "embed", "search", "metadata", "thumbnails"].filter((k) => k in t).map((k) => `${k} ${t[k].toFixed(0)}`);
  const ranking = data.expand ? `expanded over the top ${data.expand}` : "plain nearest neighbours";
  $("timing").textContent = `${data.results.length} results, ${ranking} · shown in ${times.shown.toFixed(0)} ms · server ${server.toFixed(0)} ms (${parts.join(" · ")} ms)`;
  $("timing").title = `model ${data.model_version}, index ${data.index_version}`;
  // For measurements (the browser test reads these): request to JSON, and to thumbnails shown.
  const list = $("results");
  list.dataset.seq = String(seq);
  list.dataset.answeredMs = times.answered.toFixed(1);
  list.dataset.renderedMs = times.rendered.toFixed(1);
  list.dataset.shownMs = times.shown.toFixed(1);
  list.dataset.serverMs = server.toFixed(1);
}

async function runClassify(seq, signal, idle) {
  const query = state.query;
  if (state.classified === query) { // new filters, same image: the vote has not changed
    idle();
    return;
  }
  try {
    const data = await classifyRequest(signal);
    if (seq !== state.querySeq) return;
    renderClassify(data);
    state.classified = query;
  } catch (error) {
    if (seq !== state.querySeq) return;
    $("classify-result").hidden = true;
    setError($("classify-error"), error);
  } finally {
    if (seq === state.querySeq) idle();
  }
}

function renderClassify(data) {
  $("classify-empty").hidden = true;
  $("classify-result").hidden = false;
  $("classify-label").textContent = data.label;
  const top = data.probabilities[0]?.probability ?? 0;
  $("classify-summary").textContent = `${(top * 100).toFixed(1)}% · k=${data.k}, τ=${data.tau}`;
  rememberLabels(data.probabilities.map((p) => p.label));
  $("classify-bars").replaceChildren(...data.probabilities.map((p) => {
    const item = document.createElement("li");
    const name = Object.assign(document.createElement("span"), { className: "bar-label", textContent: p.label });
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.setProperty("--p", p.probability.toFixed(4));
    const value = Object.assign(document.createElement("span"), {
      className: "bar-value", textContent: `${(p.probability * 100).toFixed(1)}%` });
    item.append(name, bar, value);
    return item;
  }));
  const counts = new Map();
  for (const n of data.neighbours) counts.set(n.label, (counts.get(n.label) || 0) + 1);
  const summary = [...counts].sort((a, b) => b[1] - a[1]).slice(0, 3)
    .map(([label, count]) => `${count} ${label ?? "unlabelled"}`).join(", ");
  const counted = data.neighbours.length < data.k ? ` (nearest ${data.neighbours.length})` : "";
  $("classify-voters-summary").textContent = `${data.k} neighbours voted${counted}: ${summary}`;
  const shown = Math.min(VOTERS_SHOWN, data.neighbours.length);
  $("classify-voters-note").textContent = `The nearest ${shown}, best first; green: labelled ${data.label}. Click one for more like it.`;
  $("classify-voters").replaceChildren(...data.neighbours.slice(0, VOTERS_SHOWN).map((n) => {
    const item = document.createElement("li");
    item.className = n.label === data.label ? "agrees" : "disagrees";
    const button = document.createElement("button");
    button.type = "button";
    button.className = "thumb";
    button.title = `#${n.id} ${n.label ?? ""} · ${n.score.toFixed(3)}`;
    button.setAttribute("aria-label", `More like #${n.id} (${n.label ?? "unlabelled"}, score ${n.score.toFixed(3)})`);
    const img = document.createElement("img");
    img.alt = "";
    img.loading = "lazy";
    img.width = 48;
    img.height = 48;
    showImage(img, state.inlineThumbnails.get(n.id) ?? `/images/${n.id}/thumbnail`);
    button.append(img);
    button.addEventListener("click", () => setQueryFromId(n.id));
    item.append(button);
    return item;
  }));
}

function setUpSearch() {
  $("query-file").addEventListener("change", (event) => {
    setQueryFromFile(event.target.files[0]);
    event.target.value = ""; // choosing the same file again searches again
  });
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    runQuery();
  });
  // A changed number searches again at once (text filters wait for Enter or the button).
  for (const id of ["k", "min-score", "expand"]) {
    $(id).addEventListener("change", () => {
      if (JSON.stringify(readFilters()) !== state.lastFilters) runQuery();
    });
  }
  makeDropTarget($("drop-zone"), (files) => setQueryFromFile(files[0]));
  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (!file) return;
    event.preventDefault();
    selectTab($("tab-search"));
    setQueryFromFile(file);
  });
}

function makeDropTarget(zone, onFiles) {
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (event.dataTransfer.files.length) onFiles([...event.dataTransfer.files]);
  });
}

// ---------------------------------------------------------------- catalogue

async function loadBrowsePage(page) {
  const browse = state.browse;
  browse.loaded = true;
  const params = new URLSearchParams({ limit: "48" });
  if (browse.label) params.set("label", browse.label);
  if (browse.tag) params.set("tag", browse.tag);
  const cursor = browse.cursors[page];
  if (cursor != null) params.set("cursor", String(cursor));
  const grid = $("browse-grid");
  const idle = markBusy(grid);
  setError($("browse-error"), "");
  try {
    const data = await api(`/images?${params}`);
    browse.page = page;
    browse.next = data.next_cursor;
    browse.cursors[page + 1] = data.next_cursor;
    rememberLabels(data.items.map((item) => item.label));
    grid.replaceChildren(...data.items.map(browseCard));
    $("browse-empty").hidden = data.items.length > 0;
    $("page-info").textContent = data.items.length ? `page ${page + 1} · ${data.items.length} images` : "";
  } catch (error) {
    setError($("browse-error"), error);
    askForKey(error, () => loadBrowsePage(page));
  } finally {
    idle();
    $("page-first").disabled = browse.page === 0;
    $("page-prev").disabled = browse.page === 0;
    $("page-next").disabled = browse.next == null;
  }
}

function browseCard(item) {
  const card = document.createElement("li");
  card.className = "card";
  card.dataset.id = item.id;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "thumb";
  button.setAttribute("aria-label", `Open #${item.id}${item.label ? ` (${item.label})` : ""}`);
  const img = document.createElement("img");
  img.alt = "";
  img.loading = "lazy";
  img.width = 80;
  img.height = 80;
  showImage(img, item.thumbnail_url);
  button.append(img);
  button.addEventListener("click", () => openRecord(item.id));
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.append(
    Object.assign(document.createElement("span"), { className: "id", textContent: `#${item.id}` }),
    Object.assign(document.createElement("span"), { className: "label", textContent: item.label ?? "—" }),
  );
  card.append(button, meta);
  return card;
}

function setUpBrowse() {
  $("browse-form").addEventListener("submit", (event) => {
    event.preventDefault();
    Object.assign(state.browse, {
      label: $("browse-label").value.trim(), tag: $("browse-tag").value.trim(), cursors: [null], next: null });
    loadBrowsePage(0);
  });
  $("page-first").addEventListener("click", () => loadBrowsePage(0));
  $("page-prev").addEventListener("click", () => loadBrowsePage(Math.max(0, state.browse.page - 1)));
  $("page-next").addEventListener("click", () => loadBrowsePage(state.browse.page + 1));
}

const RECORD_FIELDS = [
  ["label", "Label"], ["tags", "Tags"], ["filename", "File"], ["media_type", "Type"],
  ["width", "Width"], ["height", "Height"], ["size", "Bytes"], ["source", "Source"],
  ["status", "Status"], ["model_version", "Model version"], ["index_version", "Index version"],
  ["created_at", "Added"], ["sha256", "SHA-256"],
];

async function openRecord(id) {
  const dialog = $("record-dialog");
  setError($("record-error"), "");
  $("record-title").textContent = `Image #${id}`;
  $("record-fields").replaceChildren();
  $("record-image").removeAttribute("src");
  state.record = id;
  if (!dialog.open) dialog.showModal();
  try {
    const record = await api(`/images/${id}`);
    if (state.record !== id) return;
    const rows = [];
    for (const [key, name] of RECORD_FIELDS) {
      let value = record[key];
      if (Array.isArray(value)) value = value.join(", ");
      if (value === null || value === undefined || value === "") value = "—";
      else if (key === "created_at") value = new Date(value).toLocaleString();
      rows.push(Object.assign(document.createElement("dt"), { textContent: name }),
                Object.assign(document.createElement("dd"), { textContent: String(value) }));
    }
    $("record-fields").replaceChildren(...rows);
    const img = $("record-image");
    img.onload = () => img.classList.toggle("pixelated", img.naturalWidth < 96);
    img.alt = `image #${id}${record.label ? `, ${record.label}` : ""}`;
    showImage(img, record.content_url);
    $("record-link").href = record.content_url;
    $("record-original").href = record.content_url;
  } catch (error) {
    setError($("record-error"), error);
  }
}

function setUpRecord() {
  $("record-similar").addEventListener("click", () => {
    const id = state.record;
    $("record-dialog").close();
    setQueryFromId(id);
  });
  $("record-delete").addEventListener("click", () => {
    const id = state.record;
    if (!confirm(`Delete image #${id}? Its record, bytes and index entry are removed.`)) return;
    deleteRecord(id);
  });
}

async function deleteRecord(id) {
  setError($("record-error"), "");
  try {
    await api(`/images/${id}`, { method: "DELETE", write: true });
    $("record-dialog").close();
    document.querySelector(`#browse-grid [data-id="${id}"]`)?.remove();
    document.querySelector(`#results [data-id="${id}"]`)?.remove();
    $("page-info").textContent = `image #${id} deleted`;
    pollStatus();
  } catch (error) {
    setError($("record-error"), error);
    askForKey(error, () => deleteRecord(id));
  }
}

// ---------------------------------------------------------------- upload

function chosenUploads() {
  return state.uploadFiles || [];
}

function setUploads(files) {
  state.uploadFiles = files;
  $("upload-chosen").textContent = files.length
    ? `${files.length} file${files.length > 1 ? "s" : ""} chosen (${formatBytes(files.reduce((a, f) => a + f.size, 0))})`
    : "";
  setError($("upload-error"), "");
  $("upload-result").textContent = "";
}

/** Files grouped so that no request is over the service's file count or body size. */
function requestChunks(files) {
  const budget = state.config.max_request_bytes - 1024 * 1024; // room for the multipart envelope
  const chunks = [];
  let chunk = [];
  let bytes = 0;
  for (const file of files) {
    const size = file.size + 1024;
    if (chunk.length && (chunk.length >= state.config.max_files_per_request || bytes + size > budget)) {
      chunks.push(chunk);
      chunk = [];
      bytes = 0;
    }
    chunk.push(file);
    bytes += size;
  }
  if (chunk.length) chunks.push(chunk);
  return chunks;
}

async function upload() {
  const files = chosenUploads();
  setError($("upload-error"), "");
  $("upload-result").textContent = "";
  if (!files.length) {
    setError($("upload-error"), "choose one or more image files first");
    return;
  }
  const tooLarge = files.find((f) => f.size > state.config.max_upload_bytes);
  if (tooLarge) {
    setError($("upload-error"), `${tooLarge.name} is ${formatBytes(tooLarge.size)}, over the service's limit of ${formatBytes(state.config.max_upload_bytes)}; nothing was uploaded`);
    return;
  }
  const label = $("upload-label").value.trim();
  const tags = $("upload-tags").value.trim();
  const button = $("upload-submit");
  button.disabled = true;
  button.textContent = "Uploading…";
  const stored = [];
  try {
    for (const chunk of requestChunks(files)) {
      const form = new FormData();
      for (const file of chunk) form.append("files", file, file.name);
      if (label) form.append("label", label);
      if (tags) form.append("tags", tags);
      const reply = await api("/images", { method: "POST", form, write: true });
      stored.push(...reply.items);
    }
    setUploads([]);
    const created = stored.filter((item) => item.created);
    const present = stored.filter((item) => !item.created);
    const ids = (items) => items.slice(0, 8).map((i) => `#${i.id}`).join(", ") + (items.length > 8 ? ", …" : "");
    $("upload-result").textContent = [
      created.length ? `Added ${created.length} (${ids(created)})` : "",
      present.length ? `${present.length} already in the catalogue (${ids(present)})` : "",
      present.some((i) => i.updated?.length) ? "their label/tags were updated" : "",
    ].filter(Boolean).join("; ") + ".";
    if (label) rememberLabels([label]);
    loadBrowsePage(state.browse.page);
    pollStatus();
  } catch (error) {
    const partly = stored.length ? ` (${stored.length} of ${files.length} were stored before this)` : "";
    setError($("upload-error"), describe(error) + partly);
    askForKey(error, upload);
  } finally {
    button.disabled = false;
    button.textContent = "Upload";
  }
}

function setUpUpload() {
  $("upload-files").addEventListener("change", (event) => {
    setUploads([...event.target.files]);
    event.target.value = "";
  });
  makeDropTarget($("upload-drop"), setUploads);
  $("upload-form").addEventListener("submit", (event) => {
    event.preventDefault();
    upload();
  });
}

// ---------------------------------------------------------------- API key

function askForKey(error, retry) {
  if (!(error instanceof ApiError) || (error.status !== 401 && error.status !== 403)) return;
  state.pendingWrite = retry;
  $("key-reason").textContent = `${describe(error)} The key is kept in this tab only (session storage) and sent as the X-API-Key header, never in a URL.`;
  openKeyDialog();
}

function openKeyDialog() {
  $("api-key").value = apiKey();
  $("key-forget").disabled = !apiKey();
  $("key-dialog").showModal();
  $("api-key").focus();
}

function setUpKey() {
  $("key-button").addEventListener("click", () => {
    state.pendingWrite = null;
    const needs = state.config.reads_need_key ? "reads and writes" : "writes";
    $("key-reason").textContent = state.config.writes_need_key
      ? `This service needs an API key for ${needs}. It is kept in this tab only (session storage) and sent as the X-API-Key header, never in a URL.`
      : "This service accepts writes without a key.";
    openKeyDialog();
  });
  $("key-form").addEventListener("submit", (event) => {
    const key = $("api-key").value.trim();
    if (!key) {
      event.preventDefault();
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    updateKeyButton();
    const retry = state.pendingWrite;
    state.pendingWrite = null;
    if (retry) retry();
  });
  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    updateKeyButton();
    $("key-dialog").close();
  });
  $("key-cancel").addEventListener("click", () => {
    state.pendingWrite = null;
    $("key-dialog").close();
  });
  updateKeyButton();
}

function updateKeyButton() {
  $("key-button").textContent = apiKey() ? "API key ✓" : "API key";
}

// ---------------------------------------------------------------- start

// A file dropped outside a drop zone must not navigate away from the page.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

setUpTabs();
setUpSearch();
setUpBrowse();
setUpRecord();
setUpUpload();
setUpKey();
loadConfig().then(() => {
  document.body.dataset.configLoaded = "true";
});
pollStatus();
