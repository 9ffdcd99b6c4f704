// The near-duplicate groups of the collection, a page of groups at a time, largest first; each item can be
// deleted with the server's token (asked once, kept for this tab only).
"use strict";

const PAGE = 10;
const $ = (id) => document.getElementById(id);
let offset = Number(new URLSearchParams(location.search).get("offset")) || 0;

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message;
}

function card(item, centre) {
  const figure = document.createElement("figure");
  figure.className = centre ? "hit centre" : "hit";
  figure.dataset.id = item.id;
  const img = thumbnailImage(item.id, item.thumbnail);
  const caption = document.createElement("figcaption");
  caption.textContent = `#${item.id}` + (centre ? " · centre" : ` · ${item.distance.toFixed(3)}`);
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "delete";
  remove.addEventListener("click", () => deleteItem(item.id));
  figure.append(img, caption, remove);
  return figure;
}

async function deleteItem(id) {
  let token = sessionStorage.getItem("hashsearch-token");
  if (!token) {
    token = prompt("The server's token, to delete items:");
    if (!token) return;
    sessionStorage.setItem("hashsearch-token", token);
  }
  const response = await fetch(`/items/${id}`, { method: "DELETE", headers: { Authorization: `Bearer ${token}` } });
  if (response.status === 401) sessionStorage.removeItem("hashsearch-token");
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    return showError(body.error || `the server answered ${response.status}`);
  }
  load();
}

async function load() {
  showError("");
  const response = await fetch(`/duplicates?offset=${offset}&limit=${PAGE}`);
  const body = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
  if (!response.ok) return showError(body.error || `the server answered ${response.status}`);
  const groups = $("groups");
  groups.replaceChildren();
  body.groups.forEach((group, g) => {
    const section = document.createElement("section");
    section.className = "group";
    const title = document.createElement("h2");
    const more = group.size > group.items.length ? ` (the first ${group.items.length} shown)` : "";
    title.textContent = `group ${offset + g + 1}: ${group.size} items${more}`;
    const grid = document.createElement("div");
    grid.className = "grid";
    group.items.forEach((item, k) => grid.append(card(item, k === 0)));
    section.append(title, grid);
    groups.append(section);
  });
  const last = Math.min(offset + body.groups.length, body.groups_total);
  $("status").textContent = `groups ${body.groups_total ? offset + 1 : 0}–${last} of ${body.groups_total} · generation ${body.generation}`;
  $("previous").disabled = offset === 0;
  $("next").disabled = last >= body.groups_total;
}

$("previous").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); history.replaceState(null, "", `?offset=${offset}`); load(); });
$("next").addEventListener("click", () => { offset += PAGE; history.replaceState(null, "", `?offset=${offset}`); load(); });
load();
