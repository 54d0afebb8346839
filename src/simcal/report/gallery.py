"""Detection gallery (the paper's Fig. 5): ground truth, original head and dual head side by side.

Images are chosen from the ground truth alone, never from the results: rare classes evenly spread
over their training counts, and for each the first evaluation image that holds it, so the
gallery is not picked to flatter either head.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFilter, ImageFont
from pycocotools import mask as mask_utils

from simcal.data.annotations import image_path
from simcal.errors import InputError
from simcal.io import atomic_open

GOOD, BAD, TRUTH = (40, 200, 60), (230, 40, 40), (250, 250, 250)


def by_image(gt: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """The ground-truth annotations of each image id."""
    anns: dict[int, list[dict[str, Any]]] = {}
    for a in gt["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    return anns


def matches(det: dict[str, Any], truth: list[dict[str, Any]]) -> bool:
    """Whether a detection (xywh ``bbox``) matches a ground-truth object of its class at IoU >= 0.5."""
    boxes = [g["bbox"] for g in truth if g["category_id"] == det["category_id"]]
    return bool(boxes) and float(mask_utils.iou([det["bbox"]], boxes, [0] * len(boxes)).max()) >= 0.5


def pick_images(gt: dict[str, Any], rare_ids: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """``(image id, category id)`` pairs: per rare class in the given order, its first image (by id)
    not already chosen, at most ``limit`` pairs."""
    by_cat: dict[int, list[int]] = {}
    for a in gt["annotations"]:
        by_cat.setdefault(a["category_id"], []).append(a["image_id"])
    chosen: list[tuple[int, int]] = []
    used: set[int] = set()
    for c in rare_ids:
        for img in sorted(set(by_cat.get(c, []))):
            if img not in used:
                chosen.append((img, c))
                used.add(img)
                break
        if len(chosen) >= limit:
            break
    return chosen


def spread(ids: Sequence[int], n: int) -> list[int]:
    """``n`` of ``ids`` at evenly spaced positions (all of them when there are at most ``n``)."""
    if len(ids) <= n:
        return list(ids)
    step = (len(ids) - 1) / max(1, n - 1)
    return [ids[round(i * step)] for i in range(n)]


def shown_detections(dets: list[dict[str, Any]], n_objects: int, score_thresh: float | None, max_dets: int):
    """What a panel shows: the top ``n_objects`` by score, or those >= ``score_thresh`` (at most ``max_dets``)."""
    dets = sorted(dets, key=lambda r: -r["score"])
    if score_thresh is None:
        return dets[:n_objects]
    return [d for d in dets if d["score"] >= score_thresh][:max_dets]


def found(shown: list[dict[str, Any]], truth: list[dict[str, Any]], cat: int) -> bool:
    """Whether a shown detection of class ``cat`` matches a ground-truth ``cat`` object at IoU >= 0.5."""
    return any(d["category_id"] == cat and matches(d, truth) for d in shown)


def rare_hits(
    gt: dict[str, Any],
    results: dict[str, dict[int, list[dict[str, Any]]]],
    rare_ids: Sequence[int],
    score_thresh: float | None = None,
    max_dets: int = 6,
) -> dict[str, tuple[int, int]]:
    """Per head ``(found, total)`` over every (image, rare class) pair of the ground truth, with
    the gallery's rule for what is shown."""
    rare = set(rare_ids)
    anns = by_image(gt)
    pairs = sorted({(a["image_id"], a["category_id"]) for a in gt["annotations"] if a["category_id"] in rare})
    out = {}
    for head, per_image in results.items():
        hits = sum(
            found(shown_detections(per_image.get(i, []), len(anns[i]), score_thresh, max_dets), anns[i], c)
            for i, c in pairs
        )
        out[head] = (hits, len(pairs))
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_panel(
    image: Image.Image,
    objects: list[dict[str, Any]],
    names: dict[int, str],
    gt: list[dict[str, Any]] | None,
    title: str,
    size: int,
) -> Image.Image:
    """One panel, ``size`` pixels square below a title line: the image scaled to fit, with boxes,
    mask outlines and ``name score`` labels.

    ``objects`` are LVIS annotations (ground truth, ``gt=None``) or results; a result is green when
    it matches a ground-truth object of its class at IoU >= 0.5, else red.
    """
    w, h = image.size
    scale = size / max(w, h)
    base = image.convert("RGB").resize((round(w * scale), round(h * scale)), Image.NEAREST)
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    od = ImageDraw.Draw(overlay)
    font = _font(13)
    labels = []
    for obj in objects:
        colour = TRUTH if gt is None else GOOD if matches(obj, gt) else BAD
        seg = obj.get("segmentation")
        if isinstance(seg, dict):  # outline, not fill: a fill would change the colour the classes differ by
            m = Image.fromarray(mask_utils.decode(seg) * 255).resize(base.size, Image.NEAREST)
            edge = m.filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v else 0)
            overlay.paste(Image.new("RGBA", base.size, (*colour, 230)), (0, 0), edge)
        x, y, bw, bh = (v * scale for v in obj["bbox"])
        od.rectangle([x, y, x + bw, y + bh], outline=(*colour, 255), width=2)
        text = names.get(obj["category_id"], str(obj["category_id"]))
        if "score" in obj:
            text += f" {obj['score']:.2f}"
        labels.append((x, y, text, colour))
    for x, y, text, colour in labels:  # labels last, kept inside the panel
        width = od.textlength(text, font=font)
        pos = (max(0.0, min(x + 2, base.width - width - 2)), max(0.0, min(y + 1, base.height - 16)))
        od.rectangle(od.textbbox(pos, text, font=font), fill=(0, 0, 0, 170))
        od.text(pos, text, fill=(*colour, 255), font=font)
    panel = Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")
    canvas = Image.new("RGB", (size, size + 22), (255, 255, 255))
    canvas.paste(panel, (0, 22))
    ImageDraw.Draw(canvas).text((4, 3), title, fill=(0, 0, 0), font=_font(14))
    return canvas


def _open_image(info: dict[str, Any], root: str | os.PathLike[str]) -> Image.Image:
    """Image ``info`` of the split, read whole; one that is missing or unreadable is an
    :class:`InputError` naming the file and its json entry, as in training and predict."""
    path = image_path(info, root)
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        reason = "no such file"
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e) or type(e).__name__
    raise InputError(path, f"images[id={info.get('id')}].file_name", f"cannot read image: {reason}")


def gallery(
    path: str | os.PathLike[str],
    gt: dict[str, Any],
    images_root: str | os.PathLike[str],
    results: dict[str, dict[int, list[dict[str, Any]]]],
    picks: list[tuple[int, int]],
    *,
    score_thresh: float | None = None,
    max_dets: int = 6,
    size: int = 384,
) -> list[dict[str, Any]]:
    """Write one PNG (a row per picked image: ground truth, then each head of ``results``).

    ``results`` maps a head's title to its detections per image id (LVIS results). A head shows its
    best detections: as many as the image has ground-truth objects (rank-based, so heads whose
    scores are scaled differently are compared fairly), or, with ``score_thresh``, those scoring at
    least that, at most ``max_dets``. Returns per row what was drawn (image, rare class, and per
    head the shown detections and whether the rare object was found).
    """
    names = {c["id"]: c["name"] for c in gt["categories"]}
    images = {im["id"]: im for im in gt["images"]}
    anns = by_image(gt)
    rows, info = [], []
    for image_id, cat in picks:
        im = _open_image(images[image_id], images_root)
        truth = anns.get(image_id, [])
        panels = [draw_panel(im, truth, names, None, f"ground truth ({names[cat]} is rare)", size)]
        row_info: dict[str, Any] = {"image_id": image_id, "rare_class": names[cat], "heads": {}}
        for title, per_image in results.items():
            shown = shown_detections(per_image.get(image_id, []), len(truth), score_thresh, max_dets)
            panels.append(draw_panel(im, shown, names, truth, title, size))
            row_info["heads"][title] = {"shown": len(shown), "rare_found": found(shown, truth, cat)}
        rows.append(panels)
        info.append(row_info)
    if not rows:
        return info
    gap = 8
    pw, ph = rows[0][0].size
    sheet = Image.new("RGB", (len(rows[0]) * (pw + gap) - gap, len(rows) * (ph + gap) - gap), (255, 255, 255))
    for r, panels in enumerate(rows):
        for c, p in enumerate(panels):
            sheet.paste(p, (c * (pw + gap), r * (ph + gap)))
    with atomic_open(path, "wb") as f:
        sheet.save(f, format="PNG")
    return info
