"""``simcal report --run RUN``: one self-contained HTML page (PNGs embedded) about a run.

Sections, each from files the other commands wrote (a missing one is replaced by the command that
makes it): the class-frequency histogram with the instance-count bins; AP per bin for each
predicted head (box and mask); the T sweep (``simcal analyze sweep-T``); calibration dynamics
(``simcal calibrate --snapshot-every K`` then ``simcal analyze dynamics``); per-class AP against
training instances; a gallery of low-shot detections, original against dual head (Fig. 5).
The PNGs are also written beside the page, under ``RUN/report/``.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simcal.config import Config
from simcal.data.annotations import load_dataset
from simcal.data.stats import BIN_PRESETS, category_stats
from simcal.errors import InputError
from simcal.evaluation.diagnostics import ERROR_TYPES, comparison_rows
from simcal.formatting import pct
from simcal.io import atomic_open, iter_json_blocks, read_json, read_log, write_json, writes_run
from simcal.report import figures, plots
from simcal.report.gallery import gallery, pick_images, rare_hits, spread
from simcal.report.tables import html_table, img
from simcal.run import DEFAULT_CALIBRATION, HeadTag, PredictionFiles, ReportFiles, Run, resolve_split

HEAD_ORDER = ("orig", "cal", "dual")
HEAD_NAMES = {"orig": "original", "cal": "calibrated only", "dual": "dual head (SimCal)"}
IOU_NAMES = {"bbox": "box", "segm": "mask"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:24px auto;
padding:0 16px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:0}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-top:4px}
table{border-collapse:collapse;margin:8px 0;font-size:0.92em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,td:nth-child(2),th:first-child{text-align:left}
table.kv th{text-align:left;font-weight:600}table.kv td{text-align:left}
img{max-width:100%;border:1px solid #eee}.row{display:flex;gap:12px;flex-wrap:wrap}.row img{max-width:540px}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px}
code{background:#f4f4f4;padding:1px 4px;border-radius:3px}
"""


def _head_name(tag: HeadTag) -> str:
    """A head's name in the report's tables: ``dual head (cb_rfs)`` for ``dual@cb_rfs``, else the tag."""
    return f"dual head ({tag.calibration})" if tag.base == "dual" and tag.calibration else str(tag)


def read_results(path: Path, image_ids: Iterable[int]) -> dict[int, list[dict[str, Any]]]:
    """The detections of ``image_ids`` in an LVIS results file, per image id.

    The file is read a part at a time (:func:`simcal.io.iter_json_blocks`: bounded memory on
    LVIS-size files); a malformed one is an :class:`InputError` naming it.
    """
    wanted = set(image_ids)
    out: dict[int, list[dict[str, Any]]] = {i: [] for i in wanted}
    start = 0
    for block in iter_json_blocks(path, "results must be a list of detections"):
        for i, r in enumerate(block, start):
            if not isinstance(r, dict) or "image_id" not in r:
                raise InputError(path, f"[{i}]", "expected a detection with an image_id")
            if r["image_id"] in wanted:
                out[r["image_id"]].append(r)
        start += len(block)
    return out


def _kv_table(rows: list[list[str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{body}</table>"


def _missing(what: str, command: str) -> str:
    return f'<p class="note">No {html.escape(what)} yet: run <code>{html.escape(command)}</code>.</p>'


def _heads(pred: PredictionFiles) -> list[str]:
    found = pred.heads(evaluated="bbox")
    return [h for h in HEAD_ORDER if h in found] + [h for h in found if h not in HEAD_ORDER]


def not_comparable(metrics: dict[str, dict[str, dict[str, Any]]]) -> str:
    """``""`` when every head's metrics cover the same images, else a sentence saying which differ.

    ``metrics``: ``{head: {iou: metrics json}}``; a head's images are its ``num_images`` and the
    ``gt`` file it was evaluated on (when recorded).
    """
    seen = {h: (m.get("num_images"), m.get("gt")) for h, by_iou in metrics.items() for m in list(by_iou.values())[:1]}
    if len(set(seen.values())) <= 1:
        return ""
    parts = ", ".join(f"{h} {n} images" + (f" of {gt}" if gt else "") for h, (n, gt) in seen.items())
    return f"the heads were evaluated on different images ({parts}): compare a row only with rows of the same images"


#: the protocols of the AP-fixed / AP-pool table: (protocol, name, predictions)
PROTOCOL_ROWS = (("lvis", "AP (per-image cap)", "capped"), ("fixed", "AP-fixed", "topk"), ("pool", "AP-pool", "topk"))
PROTOCOL_KEYS = ("APr", "APc", "APf", "AP")


def protocol_rows(
    capped: PredictionFiles, topk: PredictionFiles, heads: list[str], names: dict[str, str]
) -> list[list[str]]:
    """Rows ``[head, protocol, box APr..AP, mask APr..AP]`` (in %) of each head under LVIS's
    per-image cap (``capped``'s metrics) and AP-fixed / AP-pool (``topk``'s, ``predict
    --topk-per-class``); a head or protocol without metrics is left out."""
    rows = []
    for h in heads:
        for protocol, name, where in PROTOCOL_ROWS:
            files = (capped if where == "capped" else topk).head(h)
            got = [files.metrics(iou, protocol) for iou in IOU_NAMES]
            if not any(p.exists() for p in got):
                continue
            cells = [read_json(p) if p.exists() else {} for p in got]
            rows.append([names.get(h, h), name, *(pct(m.get(k)) for m in cells for k in PROTOCOL_KEYS)])
    return rows


def protocol_header() -> list[str]:
    return ["head", "protocol", *(f"{IOU_NAMES[iou]} {k}" for iou in IOU_NAMES for k in PROTOCOL_KEYS)]


@dataclass
class _Page:
    """What every section of a report reads: the run, its predictions and metrics, the names of the
    heads, the training statistics; and where the figures go (``figures``: key -> file name)."""

    r: Run
    cfg: Config
    split: str
    pred: PredictionFiles
    heads: list[str]
    metrics: dict[str, dict[str, dict[str, Any]]]
    files: ReportFiles
    ious: list[str]
    edges: list[float]
    bins: list[str]
    names: dict[str, str]
    show: list[str]
    train_json: dict[str, Any]
    stats: list[Any]
    figures: dict[str, str] = field(default_factory=dict)

    @property
    def run(self) -> Path:
        return self.r.root

    @property
    def first(self) -> dict[str, Any]:
        """The original head's metrics of the first IoU type (what the page's captions quote)."""
        return self.metrics["orig"][self.ious[0]]

    def figure(self, key: str) -> Path:
        """Where the figure ``key`` goes beside the page (recorded in ``report.json``)."""
        path = self.files.figure(key)
        self.figures[key] = path.name
        return path

    def analysis(self, tool: str) -> dict[str, Any] | None:
        """``RUN/analysis/<tool>.json``, or None when that analysis has not been run."""
        path = self.r.analysis(tool).json
        return read_json(path) if path.exists() else None

    def draw(self, tool: str, data: dict[str, Any], key: str, alt: str) -> list[str]:
        """The analysis' figures drawn from its json, embedded (``<img>`` each); a second figure
        beside the first (errors' reliability diagram) is recorded under its file's name."""
        written = figures.draw(tool, data, self.figure(key))
        for path in written[1:]:
            self.figures[path.stem] = path.name
        return [img(p, alt) for p in written]


def _open_page(run: Path, split: str, out: str | Path | None) -> _Page:
    r = Run(run)
    cfg = r.load_config()
    pred = r.predictions(split)
    heads = _heads(pred)
    if "orig" not in heads:
        raise InputError(pred.root, "(predictions)", f"none: run simcal predict --run {run} --head orig,cal,dual first")
    for h in heads:
        pred.head(h).check_made_by(run)
    files = ReportFiles(Path(out)) if out else r.report
    files.root.mkdir(parents=True, exist_ok=True)
    metrics = {
        h: {iou: read_json(pred.head(h).metrics(iou)) for iou in IOU_NAMES if pred.head(h).metrics(iou).exists()}
        for h in heads
    }
    ious = [iou for iou in IOU_NAMES if iou in metrics["orig"]]
    edges = metrics["orig"][ious[0]].get("bin_edges") or list(BIN_PRESETS["lvis"])
    train_json = load_dataset(cfg.data.train_json)
    return _Page(
        r=r,
        cfg=cfg,
        split=split,
        pred=pred,
        heads=heads,
        metrics=metrics,
        files=files,
        ious=ious,
        edges=edges,
        bins=[f"AP{i + 1}" for i in range(len(edges) + 1)],
        names={h: HEAD_NAMES.get(h, _head_name(HeadTag.parse(h))) for h in heads},
        show=[h for h in heads if h in HEAD_ORDER],  # plotted heads; the tables list the others too
        train_json=train_json,
        stats=category_stats(train_json, edges),
    )


def _calibration_summaries(page: _Page) -> dict[str, dict[str, Any]]:
    paths = [page.r.calibration(n).summary for n in page.r.calibrations()]
    return {p.parent.name: read_json(p) for p in paths if p.exists()}


def _run_section(page: _Page) -> str:
    cfg, stats = page.cfg, page.stats
    groups = {g: sum(s.frequency == g for s in stats) for g in "rcf"}
    log = page.r.train_log
    train_info = ""
    records = read_log(log) if log.exists() else []
    if records:
        last = records[-1]
        train_info = (
            f"{last['iteration']} iterations, batch {cfg.train.batch_size}, "
            f"{last['iteration'] * last.get('sec_per_iter', 0) / 60:.1f} min"
        )
    summaries = _calibration_summaries(page)
    cal_info = "; ".join(f"{n}: {s['steps']} steps, {s['seconds']:.0f} s" for n, s in summaries.items()) or "none"
    m0 = page.first
    return "<h2>Run</h2>" + _kv_table(
        [
            ["run", str(page.run)],
            ["model", f"{cfg.model.arch}, {cfg.model.min_size}-{cfg.model.max_size} px"],
            [
                "training data",
                f"{cfg.data.train_json}: {len(stats)} classes (rare {groups['r']}, common "
                f"{groups['c']}, frequent {groups['f']}), {len(page.train_json['images'])} images",
            ],
            ["evaluated on", f"{page.split}: {m0['num_images']} images ({m0['mode'].upper()} rules)"],
            ["training", train_info or "-"],
            ["calibration", cal_info],
            ["dual head", f"{cfg.inference.combine}, T = {cfg.inference.T:g} training instances"],
        ],
    )


def _results_section(page: _Page) -> str:
    keys = [*page.bins, "APr", "APc", "APf", "AP", "AP50", "AP75"]
    rows = []
    for iou in page.ious:
        for h in page.heads:
            m = page.metrics[h].get(iou)
            if m is not None:
                rows.append(
                    [page.names[h], IOU_NAMES[iou], str(m.get("num_images", "?")), *(pct(m.get(k)) for k in keys)]
                )
    legend = ", ".join(f"AP{i + 1} {b}" for i, b in enumerate(page.first.get("bins", [])))
    mixed = not_comparable(page.metrics)
    warning = ""
    if mixed:
        print(f"report: warning: {mixed}")
        warning = f"<p class='note'><b>Not comparable:</b> {html.escape(mixed)}</p>"
    return (
        "<h2>Results (AP in %, the paper's Table 3)</h2>"
        + warning
        + html_table(["head", "AP on", "images", *keys], rows)
        + f"<p class='sub'>Bins on training instances: {html.escape(legend)}. APr/APc/APf: rare/common/frequent.</p>"
    )


def _protocols_section(page: _Page) -> str:
    topks = page.pred.topks()
    if not topks:
        return "<h2>AP-fixed and AP-pool</h2>" + _missing(
            "per-class top-k predictions",
            f"simcal predict --run {page.run} --head {','.join(page.heads)} --topk-per-class 10000",
        )
    k, topk = topks[-1]
    return (
        f"<h2>AP-fixed and AP-pool (AP in %, {k} detections per class over {page.split})</h2>"
        "<p>AP-fixed (Dave et al. 2021): no per-image cap, each class's best detections over the split. "
        "AP-pool: AP-fixed's detections, each group's classes pooled as one class, so it rewards scores "
        "that are comparable across classes (what calibration changes).</p>"
        + html_table(protocol_header(), protocol_rows(page.pred, topk, page.heads, page.names))
    )


def _class_frequency_section(page: _Page) -> str:
    stats = page.stats
    p = page.figure("class_frequency")
    like = (page.train_json.get("info") or {}).get("like")  # a synth --like set: its groups are the real set's
    plots.class_histogram(
        p,
        [s.instance_count for s in stats],
        [s.frequency for s in stats],
        page.edges,
        title=f"training instances per class ({len(stats)} classes)",
        **({"group_names": [f"{g} (as in {like})" for g in ("rare", "common", "frequent")]} if like else {}),
    )
    return "<h2>Class frequency</h2>" + img(p, "class frequency histogram")


def _bins_section(page: _Page) -> str:
    imgs = []
    groups_k = [*page.bins, "APr", "APc", "APf", "AP"]
    for iou in page.ious:
        p = page.figure(f"bins_{iou}")
        series = {
            page.names[h]: [
                None if page.metrics[h][iou].get(k) is None else 100 * page.metrics[h][iou][k] for k in groups_k
            ]
            for h in page.show
            if iou in page.metrics[h]
        }
        plots.grouped_bars(p, groups_k, series, title=f"{IOU_NAMES[iou]} AP per bin and group ({page.split})")
        imgs.append(img(p, f"{iou} AP per bin"))
    return "<h2>AP per bin, each head</h2><div class='row'>" + "".join(imgs) + "</div>"


def _proposals_section(page: _Page) -> str:
    """The RPN's recall and the props-gt oracle (Fig. 1b, 1c), when those analyses were run."""
    imgs = []
    recall = page.analysis("recall")
    if recall is not None:
        imgs += page.draw("recall", recall, "recall", "RPN recall")
    oracle = page.analysis("oracle")
    if oracle is not None:
        imgs += page.draw("oracle", oracle, "oracle", "props-gt oracle")
    if not imgs:
        return ""
    return (
        "<h2>Proposals and the classification ceiling</h2><p>The RPN's recall against the IoU threshold, and "
        "what a perfect classifier of the same RoIs would reach (props-gt: every RoI matching a ground truth "
        "takes its class).</p><div class='row'>" + "".join(imgs) + "</div>"
    )


def _sweep_section(page: _Page) -> str:
    data = page.analysis("sweep-T")
    if data is None:
        return "<h2>Threshold T of the dual head</h2>" + _missing("T sweep", f"simcal analyze sweep-T --run {page.run}")
    return (
        "<h2>Threshold T of the dual head</h2><p>Classes with at most T training instances take the "
        "calibrated head's scores, the others the original head's (Fig. 4c).</p>"
        + "".join(page.draw("sweep-T", data, "sweep_T", "T sweep"))
    )


def _confusion_section(page: _Page) -> str:
    conf = page.analysis("confusion")
    if conf is None:
        return ""
    counts = "; ".join(
        f"{h}: {sum(r['dets_on_other_objects']['f'][g] for g in 'rc')}" for h, r in conf["heads"].items()
    )
    return (
        "<h2>Where the classification errors land</h2><p>AP of the frequent classes (APf) and of the "
        "top bin (AP4) as is, without the detections that sit on rare or common objects, and without "
        "any on objects of another class "
        f"({html.escape(conf['split'])}, {conf['iou']}). Frequent-class detections scoring at least "
        f"{conf['score']:g} on rare or common objects: {html.escape(counts)}. A val with few tail "
        "objects (LVIS's) hardly counts those; there the middle bars are what the head classes see.</p>"
        + "".join(page.draw("confusion", conf, "confusion", "false-positive sources"))
    )


def _errors_section(page: _Page) -> str:
    data = page.analysis("errors")
    if data is None:
        return "<h2>Errors and score calibration</h2>" + _missing(
            "error breakdown", f"simcal analyze errors --run {page.run}"
        )
    rows = [
        [h, str(e["num_images"])]
        + [pct(e["tide"]["delta_ap"][k]) for k in ERROR_TYPES]
        + [pct(e["calibration"]["ece"])]
        for h, e in data["heads"].items()
    ]
    return (
        "<h2>Errors and score calibration</h2><p>AP50 points each kind of error costs (TIDE: fixing "
        f"it would gain them; {html.escape(data['split'])}, {data['iou']}), and the expected calibration "
        "error of the scores (ECE, %: how far a detection's score is from the chance it is right).</p>"
        + html_table(["head", "images", *ERROR_TYPES, "ECE"], rows)
        + "<div class='row'>"
        + "".join(page.draw("errors", data, "errors", "TIDE errors and reliability"))
        + "</div>"
    )


def _compare_section(page: _Page) -> str:
    data = page.analysis("compare")
    if data is None:
        return "<h2>Dual head against original</h2>" + _missing("comparison", f"simcal compare --run {page.run}")
    a, b = data["heads"]
    return (
        f"<h2>{html.escape(b)} against {html.escape(a)}: is the gain more than noise?</h2>"
        f"<p>{html.escape(b)} - {html.escape(a)} in AP points on {data['num_images']} images of "
        f"{html.escape(data['split'])} ({data['iou']}), with {100 * data['confidence']:g}% bootstrap intervals "
        f"over images ({data['n_bootstrap']} samples).</p>"
        + html_table(["metric", a, b, "delta", "interval", "P(delta > 0)"], comparison_rows(data))
    )


def _dynamics_section(page: _Page) -> str:
    summaries = _calibration_summaries(page)
    cal_name = DEFAULT_CALIBRATION if DEFAULT_CALIBRATION in summaries else next(iter(summaries), None)
    dyn = page.analysis("dynamics")
    imgs = page.draw("dynamics", dyn, "dynamics", "calibration dynamics") if dyn is not None else []
    calib_log = page.r.calibration(cal_name).log if cal_name else None
    if calib_log is not None and calib_log.exists():
        recs = [rec for rec in read_log(calib_log) if "loss" in rec]
        if recs:
            p = page.figure("calibration_loss")
            plots.line_plot(
                p,
                [rec["step"] for rec in recs],
                {"loss": [rec["loss"] for rec in recs]},
                title=f"calibration loss ({cal_name})",
                xlabel="calibration step",
                ylabel="cross-entropy",
            )
            imgs.append(img(p, "calibration loss"))
    body = "<div class='row'>" + "".join(imgs) + "</div>" if imgs else ""
    if dyn is None:
        body += _missing(
            "calibration dynamics",
            f"simcal calibrate --run {page.run} --snapshot-every 50 (then) simcal analyze dynamics --run {page.run}",
        )
    return "<h2>Calibration dynamics</h2>" + body


def _per_class_section(page: _Page) -> str:
    imgs = []
    ids = [s.id for s in page.stats]
    for iou in page.ious:
        per = {h: {c["id"]: c for c in page.metrics[h][iou]["per_class"]} for h in page.show}
        p = page.figure(f"per_class_{iou}")
        plots.per_class_scatter(
            p,
            [s.instance_count for s in page.stats],
            {
                page.names[h]: [None if per[h].get(i, {}).get("AP") is None else 100 * per[h][i]["AP"] for i in ids]
                for h in page.show
            },
            page.edges,
            title=f"per-class {IOU_NAMES[iou]} AP against training instances",
        )
        imgs.append(img(p, f"per-class {iou} AP"))
    return "<h2>Per-class AP</h2><div class='row'>" + "".join(imgs) + "</div>"


def _gallery_section(
    page: _Page, gallery_images: int, score_thresh: float | None
) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """The low-shot gallery (Fig. 5): ``(html, what each tile shows, rare-class hit counts)``."""
    if "dual" not in page.heads or gallery_images <= 0:
        return "", [], {}
    try:
        gt_json, gt_images = resolve_split(page.cfg, page.split, None, None)
    except InputError:  # a split predicted from --gt: its annotations are not in the config
        return "", [], {}
    split = page.split
    gt = load_dataset(gt_json)
    by_count = sorted(page.stats, key=lambda s: (s.instance_count, s.id))
    # the rare classes; without any, the rarest ones
    rare = [s.id for s in by_count if s.frequency == "r"] or [s.id for s in by_count][:gallery_images]
    picks = pick_images(gt, spread(rare, gallery_images), gallery_images)
    rare_set = set(rare)
    ids = sorted({a["image_id"] for a in gt["annotations"] if a["category_id"] in rare_set})
    res = {
        "original head": read_results(page.pred.head("orig").results, ids),
        "dual head (SimCal)": read_results(page.pred.head("dual").results, ids),
    }
    hits = rare_hits(gt, res, rare, score_thresh)
    counts = {t: {"found": f, "pairs": n} for t, (f, n) in hits.items()}
    p = page.files.figure("gallery")
    info = gallery(p, gt, gt_images, res, picks, score_thresh=score_thresh)
    if not info:
        return "", info, counts
    page.figures["gallery"] = p.name
    section = (
        "<h2>Low-shot detections: original against dual head</h2>"
        "<p>Rare classes spread evenly over their training counts, for each the first "
        f"{split} image holding it; "
        + (
            "each head's top detections, as many as the image has objects"
            if score_thresh is None
            else f"detections with score &ge; {score_thresh:g}, at most 6"
        )
        + ". Green: matches a ground-truth object "
        "of its class at IoU &ge; 0.5; red: does not. Both heads use the original box and mask "
        "regressors, so a rare class's box can be off even when its score is right (its "
        "class-specific regressor saw few examples; the class-agnostic r50-ag variant avoids that). "
        "Over all "
        + str(next(iter(hits.values()))[1])
        + f" (image, rare class) pairs of {split}, the rare object is among the shown detections for "
        + ", ".join(f"{f}/{n} ({100 * f / max(n, 1):.0f} %) with the {html.escape(t)}" for t, (f, n) in hits.items())
        + ".</p>"
        + img(p, "gallery")
    )
    return section, info, counts


@writes_run
def build_report(
    run: str | Path,
    *,
    split: str = "val",
    out: str | Path | None = None,
    gallery_images: int = 8,
    score_thresh: float | None = None,
    extra_html: str = "",
) -> Path:
    """Write ``out/index.html`` (default ``RUN/report``) and its PNGs; returns the page's path.

    Each section is one function of the page's shared state (:class:`_Page`); the analyses'
    figures are drawn here from their json (:mod:`simcal.report.figures`). ``extra_html`` is
    placed after the summary (the demo adds its multi-seed and baseline tables).
    """
    run = Path(run)
    page = _open_page(run, split, out)
    sections = [_run_section(page), _results_section(page), _protocols_section(page), extra_html]
    for section in (
        _class_frequency_section,
        _bins_section,
        _proposals_section,
        _sweep_section,
        _confusion_section,
        _errors_section,
        _compare_section,
        _dynamics_section,
        _per_class_section,
    ):
        sections.append(section(page))
    shown, gallery_info, rare_hit_counts = _gallery_section(page, gallery_images, score_thresh)
    sections.append(shown)
    files, heads, figures_written = page.files, page.heads, page.figures
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>simcal report: {html.escape(run.name)}</title><style>{CSS}</style></head><body>"
        f"<h1>simcal report: {html.escape(str(run))}</h1>"
        f"<p class='sub'>Long-tail instance segmentation with SimCal calibration and dual-head inference. "
        f"Written {time.strftime('%Y-%m-%d %H:%M')}.</p>" + "".join(sections) + "</body></html>\n"
    )
    with atomic_open(files.index, "w") as f:
        f.write(page)
    write_json(
        files.meta,
        {"heads": heads, "figures": figures_written, "gallery": gallery_info, "rare_hits": rare_hit_counts},
        indent=1,
    )
    return files.index
