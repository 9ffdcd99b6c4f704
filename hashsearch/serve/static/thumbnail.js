// A thumbnail of item `id`: its <img>, which an item whose file has gone (the server answers its thumbnail
// 404) replaces by a marked placeholder, so that its card keeps its place.  Used by every page.
"use strict";

function thumbnailImage(id, src) {
  const img = document.createElement("img");
  img.alt = `item ${id}`;
  img.addEventListener("error", () => {
    const missing = document.createElement("div");
    missing.className = "placeholder";
    missing.textContent = "no image";
    missing.title = `item ${id}: its image file is gone`;
    img.replaceWith(missing);
  }, { once: true });
  img.src = src;
  return img;
}
