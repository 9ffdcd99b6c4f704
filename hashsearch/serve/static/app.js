// The search page: query state lives in the URL (?id=ID&k=&mode=), so a search can be shared and Back works.
"use strict";
const $ = (id) => document.getElementById(id);

function params() {
  const url = new URLSearchParams(location.search);
  return { id: url.get("id"), k: url.get("k") || $("k").value, mode: url.get("mode") || $("mode").value };
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
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
    const img = document.createElement("img");
    img.src = hit.thumbnail;
    img.alt = `item ${hit.id}`;
    const text = document.createElement("figcaption");
    const distance = hit.distance === null ? "" : ` · L2 ${hit.distance.toFixed(3)}`;
    text.innerHTML = `<span class="label"></span><br>#${hit.id} · Hamming ${hit.hamming}${distance}`;
    text.querySelector(".label").textContent = hit.label;
    card.append(img, text);
    card.addEventListener("click", () => searchById(hit.id, true));
    grid.append(card);
  }
  $("status").textContent = `${result.results.length} results · generation ${result.generation}`;
}

function query(p) {
  return `k=${encodeURIComponent(p.k)}&mode=${encodeURIComponent(p.mode)}`;
}

async function searchById(id, push) {
  const p = { ...params(), id };
  if (push) history.pushState(null, "", `?id=${id}&${query(p)}`);
  showError("");
  try {
    const result = await answer(await fetch(`/search?${query(p)}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ id: Number(id) }) }));
    $("preview").src = `/items/${id}/thumbnail`;
    $("preview").hidden = false;
    render(result);
  } catch (e) { showError(e.message); }
}

async function searchByFile(file) {
  showError("");
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  const form = new FormData();
  form.append("image", file, file.name || "pasted.png");
  try {
    render(await answer(await fetch(`/search?${query(params())}`, { method: "POST", body: form })));
    history.pushState(null, "", `?${query(params())}`);
  } catch (e) {
    $("results").replaceChildren();
    showError(e.message);
  }
}

$("file").addEventListener("change", (e) => e.target.files[0] && searchByFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) searchByFile(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
  if (item) searchByFile(item.getAsFile());
});
function fromUrl() {
  const url = new URLSearchParams(location.search);
  if (url.get("k")) $("k").value = url.get("k");
  if (url.get("mode")) $("mode").value = url.get("mode");
  if (url.get("id") !== null) searchById(url.get("id"), false);
}
window.addEventListener("popstate", fromUrl);
fromUrl();
