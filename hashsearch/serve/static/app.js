// The search page: query state lives in the URL (?id=ID&k=&mode=), so a search can be shared and Back works.
// A search by an uploaded image has no id to put in the URL: its history entry keeps the results instead.
"use strict";
const $ = (id) => document.getElementById(id);
let latest = 0;       // the newest search; answers to older ones are dropped
let lastFile = null;  // the image of the current search by image, to search again when k or mode change

function params() {
  return { k: $("k").value, mode: $("mode").value };
}

function query(p) {
  return `k=${encodeURIComponent(p.k)}&mode=${encodeURIComponent(p.mode)}`;
}

function currentId() {
  return new URLSearchParams(location.search).get("id");
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function showPreview(src) {
  $("preview").hidden = !src;
  if (src) $("preview").src = src;
  else $("preview").removeAttribute("src");
}

function clear(message) {
  $("results").replaceChildren();
  $("status").textContent = "";
  showPreview(null);
  showError(message || "");
}

async function answer(response) {
  const body = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `the server answered ${response.status}`);
  return body;
}

function render(result) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of result.results) {
    const card = document.createElement("figure");
    card.className = "hit";
    card.dataset.id = hit.id;
    card.tabIndex = 0;
    const img = thumbnailImage(hit.id, hit.thumbnail);
    const text = document.createElement("figcaption");
    const distance = hit.distance === null ? "" : ` · <span>L2 ${hit.distance.toFixed(3)}</span>`;
    text.innerHTML = `<span class="label"></span> <span class="id">#${hit.id}</span><br>`
      + `<span>Hamming ${hit.hamming}</span>${distance}`;
    text.querySelector(".label").textContent = hit.label;
    card.append(img, text);
    card.addEventListener("click", () => searchById(hit.id, "push"));
    card.addEventListener("keydown", (e) => { if (e.key === "Enter") searchById(hit.id, "push"); });
    grid.append(card);
  }
  $("status").textContent = `${result.results.length} results · generation ${result.generation}`;
}

// how: "push" a new history entry, "replace" the current one, or null (the URL already says it)
async function searchById(id, how) {
  const mine = ++latest;
  lastFile = null;
  const url = `?id=${encodeURIComponent(id)}&${query(params())}`;
  if (how === "push") history.pushState(null, "", url);
  else if (how === "replace") history.replaceState(null, "", url);
  if (!/^\d+$/.test(String(id))) return clear(`"${id}" is not an item id: ids are whole numbers`);
  showError("");
  try {
    const result = await answer(await fetch(`/search?${query(params())}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ id: Number(id) }) }));
    if (mine !== latest) return;
    showPreview(`/items/${id}/thumbnail`);
    render(result);
  } catch (e) {
    if (mine === latest) clear(e.message);
  }
}

async function searchByFile(file, how = "push") {
  const mine = ++latest;
  lastFile = file;
  showError("");
  const preview = URL.createObjectURL(file);
  const form = new FormData();
  form.append("image", file, file.name || "pasted.png");
  try {
    const result = await answer(await fetch(`/search?${query(params())}`, { method: "POST", body: form }));
    if (mine !== latest) return;
    showPreview(preview);
    render(result);
    const state = { upload: { result, preview } };
    if (how === "push") history.pushState(state, "", `?${query(params())}`);
    else history.replaceState(state, "", `?${query(params())}`);
  } catch (e) {
    URL.revokeObjectURL(preview);
    if (mine === latest) clear(e.message);
  }
}

$("preview").addEventListener("error", () => showPreview(null));  // e.g. an upload's preview after a reload
$("file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  e.target.value = "";  // so choosing the same file again searches again
  if (file) searchByFile(file);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) searchByFile(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  const item = [...(e.clipboardData ? e.clipboardData.items : [])]
    .find((i) => i.kind === "file" && i.type.startsWith("image/"));
  if (item) searchByFile(item.getAsFile());
});

// k and mode apply to the search on screen at once; Enter in k must not reload the page
function again() {
  if (currentId() !== null) searchById(currentId(), "replace");
  else if (lastFile) searchByFile(lastFile, "replace");
}
$("controls").addEventListener("submit", (e) => { e.preventDefault(); again(); });
$("controls").addEventListener("change", again);

function fromUrl() {
  const url = new URLSearchParams(location.search);
  if (url.get("k")) $("k").value = url.get("k");
  if (url.get("mode")) $("mode").value = url.get("mode");
  const upload = history.state && history.state.upload;
  if (url.get("id") !== null) searchById(url.get("id"), null);
  else if (upload) {
    ++latest;
    lastFile = null;
    showError("");
    showPreview(upload.preview);
    render(upload.result);
  } else {
    ++latest;
    lastFile = null;
    clear();
  }
}
window.addEventListener("popstate", fromUrl);
fromUrl();
