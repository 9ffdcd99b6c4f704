"""What `hashsearch duplicates` shows of Index.duplicates's answer: the groups as JSON-ready dicts, one line
of text a group, and a static HTML contact sheet whose thumbnails are data: URIs made from the items' own
images (encoders.item_images, as the service's thumbnails are made), so the sheet needs nothing beside it."""
from __future__ import annotations

import base64
import html

import numpy as np

from .config import DuplicatesConfig

# Thumbnails of a contact sheet: small enough that a sheet of thousands of items stays a few MB.
THUMBNAIL_SIDE = 96


def describe_groups(coll, found, config: DuplicatesConfig) -> dict:
    """The report of `found` (engine.duplicates.CollectionDuplicates) for `coll`: its groups, largest first,
    each item with its id, path and distance to the group's centre, the centre first."""
    groups = found.groups(config.min_group, config.limit_groups)
    ids = coll.ids()
    named = iter(coll.paths(np.concatenate([rows for rows, _ in groups])) if groups else [])   # one read
    out = []
    for rows, dist in groups:
        out.append({"items": [{"id": int(ids[r]), "path": next(named), "distance": round(float(d), 4)}
                              for r, d in zip(rows.tolist(), dist.tolist())]})
    return {"collection": str(coll.root), "source": coll.manifest.get("source_spec"),
            "generation": found.generation, "items": len(found.rows),
            "max_distance": config.max_distance, "radius": config.radius, "since": config.since,
            "distance_unit": found.found.scale, "pairs": len(found.found.pairs),
            "candidates": found.found.candidates, "groups": out}


def format_group(group: dict, readable=str) -> str:
    """One line: each item as id:path (distance to the centre), the centre first."""
    return "  ".join(f"{item['id']}:{readable(item['path'])}" + ("" if k == 0 else f" ({item['distance']:.3f})")
                     for k, item in enumerate(group["items"]))


def thumbnail_uri(path: str, images) -> str | None:
    """A data: URI of a small JPEG of the item at `path` (read by `images`, an ItemImages), or None where its
    image cannot be read."""
    from .encoders.images import ImageRejected
    try:
        data = images.jpeg_thumbnail(path, THUMBNAIL_SIDE, quality=80)
    except ImageRejected:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


_STYLE = """body{font-family:sans-serif;margin:1em}section{border-top:1px solid #ccc;padding:.5em 0}
figure{display:inline-block;margin:.3em;width:%dpx;vertical-align:top;font-size:11px;word-break:break-all}
figure img,.missing{width:%dpx;height:%dpx;object-fit:contain;background:#eee;display:block}
.missing{display:flex;align-items:center;justify-content:center;color:#888}
figure.centre img{outline:3px solid #36c}""" % ((THUMBNAIL_SIDE,) * 3)


def html_contact_sheet(report: dict) -> str:
    """A static page of the report's groups: each item's thumbnail, id, path and distance to its centre
    (outlined); a placeholder where an item's image cannot be read."""
    from .encoders.item_images import ItemImages
    esc = html.escape
    images = ItemImages(report.get("source"))
    parts = ["<!doctype html><meta charset='utf-8'>",
             f"<title>Near-duplicates of {esc(report['collection'])}</title><style>{_STYLE}</style>",
             f"<h1>{len(report['groups'])} near-duplicate group(s)</h1>",
             f"<p>{esc(report['collection'])}, generation {report['generation']}, {report['items']} items; "
             f"pairs within {report['max_distance']} (L2 on F7, in units of the median F7 length).</p>"]
    for g, group in enumerate(report["groups"], 1):
        parts.append(f"<section><h2>Group {g}: {len(group['items'])} items</h2>")
        for k, item in enumerate(group["items"]):
            uri = thumbnail_uri(item["path"], images)
            picture = f"<img src='{uri}' alt=''>" if uri else "<div class='missing'>no image</div>"
            distance = "centre" if k == 0 else f"{item['distance']:.3f}"
            parts.append(f"<figure class='{'centre' if k == 0 else ''}'>{picture}<figcaption>id {item['id']} "
                         f"({distance})<br>{esc(item['path'])}</figcaption></figure>")
        parts.append("</section>")
    return "\n".join(parts) + "\n"
