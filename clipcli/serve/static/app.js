// The search page of `clipcli serve`: a query box, query by image, a grid of results that grows on
// scroll, and a viewer. Plain DOM code; every text from the server goes in through textContent.
"use strict";

function main() {
  const PAGE = 48;             // results asked for per request (k)
  const TOKEN_KEY = "clipcli.token";

  const $ = (id) => document.getElementById(id);
  const form = $("search-form");
  const input = $("q");
  const fileInput = $("image-input");
  const grid = $("results");
  const statusLine = $("status");
  const info = $("info");
  const sentinel = $("sentinel");
  const more = $("more");
  const dropzone = $("dropzone");
  const queryImage = $("query-image");
  const viewer = $("viewer");
  const viewerImg = $("viewer-img");

  const state = {
    query: "",                 // the text of the search shown
    image: null,               // the File of the search shown, if any
    imageUrl: "",              // its object URL for the preview
    results: [],               // {rank, image, score, score_kind, prob?, id}
    offset: 0,                 // of the next page
    done: true,                // no further page
    loading: false,
    seq: 0,                    // the search shown; answers to older ones are dropped
    controller: null,
    model: "",
    scoreKind: "",
    health: null,
    viewing: -1,               // index of the result in the viewer, -1 when closed
    returnFocus: null,
  };

  // ---- The token and requests -------------------------------------------------------------

  function token() {
    let value = window.CLIPCLI_TOKEN || "";
    if (!value) {
      try { value = sessionStorage.getItem(TOKEN_KEY) || ""; } catch (err) { value = ""; }
    }
    return value;
  }

  function withToken(url) {
    const value = token();
    if (!value) return url;
    return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(value);
  }

  class ServerError extends Error {
    constructor(message, status, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  // One line of text at most, however the server (or a proxy) answered.
  function oneLine(text) {
    const line = String(text).split("\n").map((s) => s.trim()).find((s) => s) || "";
    return line.length > 300 ? line.slice(0, 297) + "…" : line;
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const value = token();
    if (value) headers.set("Authorization", "Bearer " + value);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ServerError("cannot reach the server (is clipcli serve still running?)", 0, null);
    }
    let body = null;
    if ((response.headers.get("content-type") || "").includes("json")) {
      try { body = await response.json(); } catch (err) { body = null; }
    }
    if (!response.ok) {
      let message = `the server answered HTTP ${response.status}`;
      if (body && typeof body.error === "string" && body.error.trim()) {
        message = oneLine(body.error);
      }
      throw new ServerError(message, response.status, body);
    }
    if (body === null) throw new ServerError("the server sent an answer that is not JSON", response.status, null);
    return body;
  }

  // ---- Small helpers ----------------------------------------------------------------------

  function fileName(path) {
    const parts = String(path).split(/[\\/]/);
    return parts[parts.length - 1] || String(path);
  }

  // A model given as a file shows as its file name (the whole path is in the tooltip);
  // registry names such as ViT-B/32 or hf-hub:org/name stay as they are.
  function modelName(model) {
    const text = String(model || "");
    return /^([/~.]|[A-Za-z]:\\)/.test(text) ? fileName(text) : text;
  }

  function formatScore(result) {
    let text = Number(result.score).toFixed(3);
    if (result.score_kind === "sigmoid" && typeof result.prob === "number") {
      text += " · " + formatPercent(result.prob);
    }
    return text;
  }

  function formatPercent(p) {
    const percent = p * 100;
    if (percent > 0 && percent < 0.1) return "<0.1%";
    return percent.toFixed(percent >= 10 ? 0 : 1) + "%";
  }

  function plural(n, word) {
    return `${n.toLocaleString()} ${word}${n === 1 ? "" : "s"}`;
  }

  function setStatus(text, isError = false) {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", isError);
  }

  function readyText() {
    const h = state.health;
    if (!h) return "Connecting…";
    if (!h.images) return `No images indexed with ${modelName(h.model)} yet: add some with clipcli index FOLDER`;
    return `${plural(h.images, "image")} · ${modelName(h.model)} · type a description, or drop an image`;
  }

  // ---- Health: wait for the model -----------------------------------------------------------

  let healthDone;
  const ready = new Promise((resolve) => { healthDone = resolve; });

  async function pollHealth() {
    let delay = 250;
    for (;;) {
      try {
        const h = await api("health");
        state.health = h;
        info.textContent = `${modelName(h.model)} · ${plural(Number(h.images) || 0, "image")}`;
        info.title = `model: ${h.model}\nscore: ${h.score}`;
        if (!state.query && !state.image) setStatus(readyText());
        healthDone();
        return;
      } catch (err) {
        if (err.status === 503 && err.body && err.body.status === "loading") {
          setStatus("loading model…");
        } else if ((err.status === 503 && !(err.body && err.body.status === "error")) || err.status === 0) {
          // Busy, or not up yet: ask again.
          setStatus(err.message, true);
        } else {
          // The searches will say what is wrong (a bad token, say) when they run.
          setStatus(err.message, true);
          healthDone();
          return;
        }
      }
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 1.5, 2000);
    }
  }

  // ---- Searching ----------------------------------------------------------------------------

  function requestPage(offset, signal) {
    if (state.image) {
      const body = new FormData();
      if (state.query) body.append("q", state.query);
      body.append("image", state.image, state.image.name || "query-image");
      body.append("k", String(PAGE));
      body.append("offset", String(offset));
      return api("api/search", { method: "POST", body, signal });
    }
    const params = new URLSearchParams({ q: state.query, k: String(PAGE), offset: String(offset) });
    return api("api/search?" + params.toString(), { signal });
  }

  function summary() {
    const n = state.results.length;
    const what = [];
    if (state.image) what.push(`image “${state.image.name || "pasted image"}”`);
    if (state.query) what.push(`“${state.query}”`);
    const head = n ? plural(n, "result") : "No results";
    const parts = [`${head} for ${what.join(" + ")}`];
    if (state.scoreKind) parts.push(state.scoreKind);
    if (state.model) parts.push(modelName(state.model));
    return parts.join(" · ");
  }

  // Start the search of state.query and state.image from its first page.
  async function newSearch() {
    const seq = ++state.seq;
    if (state.controller) state.controller.abort();
    closeViewer(false);
    state.results = [];
    state.offset = 0;
    state.done = true;
    state.loading = false;
    grid.replaceChildren();
    more.hidden = true;
    if (!state.query && !state.image) {
      setStatus(readyText());
      return;
    }
    state.done = false;
    setStatus("searching…");
    await ready;
    if (seq !== state.seq) return;
    await loadPage(seq);
  }

  async function loadPage(seq = state.seq) {
    if (state.loading || state.done || seq !== state.seq) return;
    state.loading = true;
    more.hidden = state.results.length === 0;
    const controller = new AbortController();
    state.controller = controller;
    try {
      const data = await requestPage(state.offset, controller.signal);
      if (seq !== state.seq) return;
      const results = Array.isArray(data.results) ? data.results : [];
      const ids = Array.isArray(data.ids) ? data.ids : [];
      const first = state.results.length;
      results.forEach((r, i) => state.results.push({ ...r, id: ids[i] }));
      state.model = data.model || state.model;
      state.scoreKind = data.score_kind || state.scoreKind;
      state.offset += PAGE;
      if (results.length < PAGE) state.done = true;
      appendTiles(first);
      setStatus(summary());
    } catch (err) {
      if (err.name === "AbortError" || seq !== state.seq) return;
      state.done = true;  // no retry loop on errors: a new search starts over
      setStatus(err.message, true);
    } finally {
      if (seq === state.seq) {
        state.loading = false;
        more.hidden = true;
        // A short page may leave the sentinel in view: the observer only reports changes.
        if (!state.done) { observer.unobserve(sentinel); observer.observe(sentinel); }
      }
    }
  }

  const observer = new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting) && state.results.length) loadPage();
  }, { rootMargin: "0px 0px 800px 0px" });
  observer.observe(sentinel);

  // ---- The grid -----------------------------------------------------------------------------

  function appendTiles(first) {
    const fragment = document.createDocumentFragment();
    for (let i = first; i < state.results.length; i++) fragment.appendChild(makeTile(state.results[i], i));
    grid.appendChild(fragment);
  }

  function makeTile(result, index) {
    const name = fileName(result.image);
    const tile = document.createElement("a");
    tile.className = "tile";
    tile.tabIndex = 0;
    tile.href = withToken("api/image/" + encodeURIComponent(result.id));
    tile.title = String(result.image);
    tile.dataset.rank = String(result.rank);
    tile.dataset.score = String(result.score);
    tile.dataset.index = String(index);
    tile.dataset.path = String(result.image);

    const img = document.createElement("img");
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = name;
    img.src = withToken("api/thumbnail/" + encodeURIComponent(result.id));
    img.addEventListener("error", () => tile.classList.add("broken"), { once: true });

    const caption = document.createElement("span");
    caption.className = "caption";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = formatScore(result);
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    label.title = result.taken ? `${name}\ntaken ${result.taken}` : name;
    caption.append(score, label);

    tile.append(img, caption);
    return tile;
  }

  function tiles() {
    return grid.querySelectorAll(".tile");
  }

  function columns() {
    const all = tiles();
    if (!all.length) return 1;
    const top = all[0].offsetTop;
    let n = 0;
    while (n < all.length && all[n].offsetTop === top) n++;
    return Math.max(1, n);
  }

  function focusTile(index) {
    const all = tiles();
    if (!all.length) return;
    const tile = all[Math.max(0, Math.min(index, all.length - 1))];
    tile.focus();
    tile.scrollIntoView({ block: "nearest" });
  }

  grid.addEventListener("click", (event) => {
    const tile = event.target.closest(".tile");
    if (!tile) return;
    // A middle or modified click opens the full image in a new tab, as links do.
    if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    openViewer(Number(tile.dataset.index), tile);
  });

  grid.addEventListener("keydown", (event) => {
    const tile = event.target.closest(".tile");
    if (!tile || event.altKey || event.ctrlKey || event.metaKey) return;
    const index = Number(tile.dataset.index);
    const count = tiles().length;
    const cols = columns();
    let next = null;
    switch (event.key) {
      case "ArrowLeft": next = index - 1; break;
      case "ArrowRight": next = index + 1; break;
      case "ArrowUp": next = index - cols; break;
      case "ArrowDown":
        next = index + cols;
        // Down from the row above a short last row lands on its last tile.
        if (next >= count && Math.floor((count - 1) / cols) > Math.floor(index / cols)) next = count - 1;
        break;
      case "Home": next = 0; break;
      case "End": next = count - 1; break;
      default: return;
    }
    event.preventDefault();
    if (next >= 0 && next < count && next !== index) focusTile(next);
    if (next >= count - cols) loadPage();
  });

  // ---- The viewer ---------------------------------------------------------------------------

  function setBackgroundInert(inert) {
    for (const el of [document.querySelector("header"), document.querySelector("main")]) el.inert = inert;
  }

  function openViewer(index, from) {
    if (index < 0 || index >= state.results.length) return;
    if (state.viewing < 0) state.returnFocus = from || document.activeElement;
    state.viewing = index;
    const result = state.results[index];
    const note = $("viewer-note");
    viewer.hidden = false;
    setBackgroundInert(true);
    viewer.classList.add("loading");
    note.hidden = true;
    viewerImg.alt = fileName(result.image);
    viewerImg.onload = () => viewer.classList.remove("loading");
    viewerImg.onerror = () => {
      viewer.classList.remove("loading");
      note.textContent = "The image could not be loaded.";
      note.hidden = false;
    };
    viewerImg.src = withToken("api/image/" + encodeURIComponent(result.id));
    $("viewer-rank").textContent = `#${result.rank}`;
    $("viewer-path").textContent = String(result.image);
    $("viewer-score").textContent = `score ${formatScore(result)}` +
      (result.taken ? ` · ${String(result.taken).slice(0, 10)}` : "") +
      (result.width && result.height ? ` · ${result.width}×${result.height}` : "");
    $("viewer-prev").disabled = index === 0;
    $("viewer-next").disabled = index === state.results.length - 1 && state.done;
    // The dialog itself takes the focus: a key released on a button there would press it.
    if (!viewer.contains(document.activeElement)) viewer.focus();
  }

  function closeViewer(restoreFocus = true) {
    if (state.viewing < 0) return;
    const index = state.viewing;
    state.viewing = -1;
    viewer.hidden = true;
    setBackgroundInert(false);
    viewerImg.removeAttribute("src");
    if (!restoreFocus) return;
    // Back to the tile shown last, which arrows in the viewer may have changed.
    const tile = tiles()[index];
    (tile || state.returnFocus || input).focus();
    if (tile) tile.scrollIntoView({ block: "nearest" });
  }

  async function step(delta) {
    let index = state.viewing + delta;
    if (index < 0) return;
    if (index >= state.results.length) {
      await loadPage();
      if (state.viewing < 0 || index >= state.results.length) return;
    }
    openViewer(index);
  }

  $("viewer-close").addEventListener("click", () => closeViewer());
  $("viewer-prev").addEventListener("click", () => step(-1));
  $("viewer-next").addEventListener("click", () => step(1));
  viewer.addEventListener("click", (event) => {
    if (event.target === viewer || event.target.classList.contains("viewer-frame")) closeViewer();
  });

  // Search by the image in the viewer: fetch it and make it the query image.
  $("viewer-similar").addEventListener("click", async () => {
    const result = state.results[state.viewing];
    if (!result) return;
    try {
      const headers = {};
      if (token()) headers.Authorization = "Bearer " + token();
      const response = await fetch("api/image/" + encodeURIComponent(result.id), { headers });
      if (!response.ok) throw new Error(`the server answered HTTP ${response.status}`);
      const blob = await response.blob();
      const file = new File([blob], fileName(result.image), { type: blob.type || "image/jpeg" });
      input.value = "";
      setQueryImage(file);
    } catch (err) {
      setStatus(`could not fetch the image: ${err.message}`, true);
    }
  });

  // ---- Query by image -----------------------------------------------------------------------

  function setQueryImage(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      setStatus(`“${file.name}” is not an image`, true);
      return;
    }
    if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
    state.image = file;
    state.imageUrl = URL.createObjectURL(file);
    $("query-image-preview").src = state.imageUrl;
    $("query-image-preview").alt = `query image ${file.name || ""}`.trim();
    $("query-image-name").textContent = file.name || "pasted image";
    queryImage.hidden = false;
    state.query = input.value.trim();
    newSearch();
  }

  function clearQueryImage() {
    if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
    state.image = null;
    state.imageUrl = "";
    $("query-image-preview").removeAttribute("src");
    queryImage.hidden = true;
  }

  fileInput.addEventListener("change", () => {
    const file = fileInput.files && fileInput.files[0];
    fileInput.value = "";  // the same file chosen again is a change again
    setQueryImage(file);
  });

  $("query-image-clear").addEventListener("click", () => {
    clearQueryImage();
    state.query = input.value.trim();
    input.focus();
    newSearch();
  });

  // Dropping a file anywhere: count enter/leave pairs, since they fire for every child element.
  let dragDepth = 0;
  const carriesFiles = (event) => event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
  window.addEventListener("dragenter", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    dragDepth++;
    dropzone.hidden = false;
  });
  window.addEventListener("dragover", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
  });
  window.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) dropzone.hidden = true;
  });
  window.addEventListener("drop", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    dropzone.hidden = true;
    const files = Array.from(event.dataTransfer.files || []);
    const image = files.find((f) => f.type.startsWith("image/")) || files[0];
    setQueryImage(image);
  });

  // Pasting an image (a screenshot, say) searches by it too.
  window.addEventListener("paste", (event) => {
    const items = Array.from((event.clipboardData && event.clipboardData.items) || []);
    const item = items.find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (!item) return;
    event.preventDefault();
    const blob = item.getAsFile();
    setQueryImage(new File([blob], blob.name || "pasted image", { type: blob.type }));
  });

  // ---- The query box and the address ------------------------------------------------------

  function hashQuery() {
    return new URLSearchParams(location.hash.slice(1)).get("q") || "";
  }

  function hashFor(query) {
    return query ? "#" + new URLSearchParams({ q: query }).toString() : "";
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    state.query = input.value.trim();
    if (!state.image) {
      const hash = hashFor(state.query);
      if (hash !== location.hash) history.pushState(null, "", location.pathname + location.search + hash);
    }
    newSearch();
  });

  // Back and forward repeat the searches that they go back to.
  function fromAddress() {
    const query = hashQuery();
    if (query === state.query && !state.image) return;
    clearQueryImage();
    input.value = query;
    state.query = query;
    newSearch();
  }
  window.addEventListener("popstate", fromAddress);
  window.addEventListener("hashchange", fromAddress);

  $("home").href = location.pathname + location.search;
  $("home").addEventListener("click", (event) => {
    event.preventDefault();
    input.value = "";
    clearQueryImage();
    state.query = "";
    if (location.hash) history.pushState(null, "", location.pathname + location.search);
    newSearch();
    input.focus();
  });

  document.addEventListener("keydown", (event) => {
    if (state.viewing >= 0) {
      if (event.key === "Escape") { event.preventDefault(); closeViewer(); }
      else if (event.key === "ArrowLeft") { event.preventDefault(); step(-1); }
      else if (event.key === "ArrowRight") { event.preventDefault(); step(1); }
      return;
    }
    if (event.key !== "/" || event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName)) return;
    event.preventDefault();
    input.focus();
    input.select();
  });

  // ---- Start --------------------------------------------------------------------------------

  state.query = hashQuery();
  input.value = state.query;
  if (document.activeElement !== input) input.focus();
  pollHealth();
  newSearch();
}

// index.html adds this script from its head (with the token): the body may still be on its way.
if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", main);
else main();
