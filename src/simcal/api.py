"""The Python API: what the command line does, callable from a notebook on paths or on objects.

``simcal.evaluate``, ``simcal.train``, ``simcal.calibrate`` and ``simcal.predict`` are these
functions (the CLI's handlers call them too). ``calibrate`` and ``predict`` take either a run
directory (``run=``, as the CLI does) or a detector object (``model=``): a Mask R-CNN built by
simcal or a plain ``torchvision.models.detection.MaskRCNN`` you already hold, whose labels
``1..C`` follow increasing category id (0 is the background). See ``docs/api.md``.

Settings are the config's: ``calibrate(..., steps=300, loss="focal")`` sets
``calibration.steps`` and ``calibration.loss``; ``predict(..., combine="avg", T=100)`` sets
``inference.combine`` and ``inference.T``; ``overrides=["section.key=value", ...]`` works too.
Every value is validated as in a config file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simcal import choices
from simcal.errors import InputError
from simcal.io import writes_run

if TYPE_CHECKING:
    from torch import nn

    from simcal.config import Config
    from simcal.evaluation.result import EvalResult
    from simcal.modeling.calibration import CalibratedHead

PathLike = str | os.PathLike[str]


def _overrides(section: str, settings: dict[str, Any]) -> list[str]:
    """Keyword settings as ``section.key=value`` overrides (values JSON-encoded, which YAML reads)."""
    return [f"{section}.{key}={json.dumps(value)}" for key, value in settings.items()]


def _dataset(value: PathLike | dict[str, Any] | None, what: str) -> tuple[dict[str, Any], str]:
    """An annotations dict and its name for messages: a path is loaded and validated."""
    from simcal.data.annotations import load_dataset, validate_dataset

    if value is None:
        raise InputError(what, what, "needed when calibrating or predicting with model=")
    if isinstance(value, dict):
        return validate_dataset(value, f"<{what}>"), f"<{what}>"
    return load_dataset(value), str(value)


def evaluate(
    gt: PathLike | dict[str, Any],
    results: PathLike | list[dict[str, Any]],
    *,
    iou: str = "segm",
    train: PathLike | dict[str, Any] | None = None,
    bins: str | Sequence[float] = "auto",
    protocol: str = "lvis",
    dets_per_class: int = choices.FIXED_DETS_PER_CLASS,
    dilation: float = choices.BOUNDARY_DILATION,
) -> EvalResult:
    """LVIS (or COCO) AP, APr/APc/APf and instance-bin AP of detections against ground truth.

    ``gt`` / ``train``: annotation files or dicts; ``results``: a results file or list. The
    training counts come from ``train``, else from the gt categories' fields (LVIS val).
    ``bins``: ``"auto"`` (the bins the training json, else the gt, declares in ``info.bins``, as
    ``synth --like`` sets do; else LVIS's), a preset name or inner edges. ``protocol``: ``lvis``
    (300 per image), ``fixed`` (AP-fixed: no per-image cap, the ``dets_per_class`` best per class
    over the dataset) or ``pool`` (AP-pool). ``iou``: ``bbox``, ``segm`` or ``boundary`` (boundary
    IoU of the masks, the band ``dilation`` x the image diagonal wide). A results file is
    streamed into columns (:func:`simcal.data.results.read_results`: boxes, or the masks' RLE
    strings), so LVIS v1 val's 5.9 M detections never sit in memory as dicts; a large file of
    masks under COCO rules is parsed by the engine itself while forked processes check it
    (:func:`simcal.evaluation.engines.file_precision`).
    """
    from simcal.data.stats import declared_bins, parse_bins
    from simcal.evaluation.lvis_eval import check_settings, resolve_category_stats
    from simcal.evaluation.lvis_eval import evaluate as run_evaluation

    check_settings(iou, (protocol,), dets_per_class, dilation)  # before reading anything
    gt_data, gt_name = _dataset(gt, "gt")
    train_data, train_name = _dataset(train, "train") if train is not None else (None, "<train>")
    edges = declared_bins(train_data or gt_data) if bins == "auto" else parse_bins(bins)
    stats = resolve_category_stats(gt_data, gt_name, train_data, train_name, edges)
    return run_evaluation(
        gt_data, results, iou, stats, edges, protocol=protocol, dets_per_class=dets_per_class, dilation=dilation
    )


@writes_run
def train(
    config: PathLike | Config | None,
    out: PathLike,
    *,
    overrides: Sequence[str] = (),
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Train the detector a config (file or :class:`~simcal.config.Config`) describes into run ``out``.

    ``resume`` continues ``out`` with its own ``config.yaml``. A ``config`` or ``overrides`` given
    too may only extend the budget (``train.max_iter``, ``train.epochs``) or change what does not
    shape the iterations already done (:data:`simcal.config.RESUME_SAFE`); those are written into
    the run's config, anything else is refused with the list of differing keys (never silently
    ignored). Returns the final weights' path.
    """
    from simcal.config import Config, apply_overrides, load_config
    from simcal.engine.train import train as run_training
    from simcal.run import Run

    def build(base: Config | None, source: str) -> Config:
        if isinstance(config, Config):
            return apply_overrides(config, list(overrides), "<config>") if overrides else config
        if config is not None:
            return load_config(config, list(overrides))
        return apply_overrides(base, list(overrides), source, stored=True)  # type: ignore[arg-type]

    if resume:
        changed = _resume_settings(Run(out), build, config) if config is not None or overrides else None
        return run_training(changed, out, resume=True, progress=progress)
    if config is None:
        raise InputError("simcal train", "--config", "required for a new run")
    return run_training(build(None, "<config>"), out, progress=progress)


def _resume_settings(run: Any, build: Any, config: Any) -> Config | None:
    """Check a resumed run's new settings: refuse any that would change what was trained; return the
    config with the others (a longer budget, bookkeeping, later stages' settings), which training
    writes into ``RUN/config.yaml`` once the checkpoint has been read (None: nothing changes)."""
    from simcal.config import COMMAND_LINE, Config, resume_conflicts

    stored = run.load_config()
    given = build(stored, str(run.config))
    allowed, refused = resume_conflicts(given, stored)
    if refused:
        source = str(config) if config is not None and not isinstance(config, Config) else COMMAND_LINE
        listed = "; ".join(f"{name} {new!r} (run: {old!r})" for name, new, old in refused)
        raise InputError(
            source,
            refused[0][0],
            f"differs from the resumed run ({run.config}) in {len(refused)} setting(s): {listed}. "
            "A run keeps what shaped its training: start another run with another --out",
        )
    if not allowed:
        return None
    changes = ", ".join(f"{name} {old!r} -> {new!r}" for name, new, old in allowed)
    print(f"resume: {changes} (written to {run.config})")
    return given


def import_detector(
    framework: str,
    checkpoint: PathLike,
    out: PathLike,
    *,
    framework_config: PathLike | None = None,
    overrides: Sequence[str] = (),
    verbose: bool = True,
) -> Path:
    """A detector trained in another framework (``framework``: :data:`simcal.choices.IMPORT_FRAMEWORKS`)
    as the run directory ``out``, which every other function takes as if simcal had trained it
    (as ``simcal import``; :func:`simcal.engine.importer.import_checkpoint`). Returns ``out``."""
    from simcal.engine.importer import import_checkpoint

    return import_checkpoint(framework, checkpoint, out, framework_config, overrides, verbose=verbose)


def _adopt(model: nn.Module, categories: dict[str, Any], source: str) -> tuple[Any, Any]:
    """``(LongTailMaskRCNN, LabelMap)`` for a detector object and the categories it was trained on."""
    from simcal.data.label_map import LabelMap
    from simcal.modeling.detector import LongTailMaskRCNN

    label_map = LabelMap.from_dataset(categories)
    adopted = LongTailMaskRCNN.from_torchvision(model)
    if adopted.roi_heads.num_classes != label_map.num_classes:
        raise InputError(
            source,
            "categories",
            f"{label_map.num_classes} categories, but the model has {adopted.roi_heads.num_classes} classes",
        )
    return adopted, label_map


def calibrate(
    run: PathLike | None = None,
    *,
    model: nn.Module | None = None,
    train: PathLike | dict[str, Any] | None = None,
    images: PathLike | None = None,
    overrides: Sequence[str] = (),
    name: str | None = None,
    out: PathLike | None = None,
    resume: bool = False,
    snapshot_every: int = 0,
    progress: bool = True,
    **settings: Any,
) -> Path | CalibratedHead:
    """SimCal: train a calibrated classification head on the frozen detector.

    With ``run``: calibrates the run's detector into ``RUN/calibration/<name>/`` and returns the
    head's path (as ``simcal calibrate``). With ``model``: calibrates that detector object on the
    training annotations ``train`` (file or dict) and ``images``, and returns the head
    (:class:`~simcal.modeling.calibration.CalibratedHead`); ``out`` also writes its files there
    (resumable). The detector is never changed: it runs frozen, in eval mode, on its own device,
    and is given back with its modes and ``requires_grad`` flags as they were. ``settings``:
    ``calibration`` keys (``steps``, ``head``, ``loss``, ``loss_kwargs``, ``sampler``, ...).
    """
    from simcal.engine import calibrate as engine

    overrides = [*_overrides("calibration", settings), *overrides]
    if run is not None:
        if model is not None:
            raise InputError("simcal.calibrate", "model", "pass run= or model=, not both")
        return engine.calibrate(
            run, overrides, name=name, resume=resume, snapshot_every=snapshot_every, progress=progress
        )
    if model is None:
        raise InputError("simcal.calibrate", "run", "pass run= (a trained run directory) or model=")
    from simcal.config import Config, apply_overrides
    from simcal.data.dataset import DetectionDataset
    from simcal.run import CalibrationFiles

    cfg = apply_overrides(Config(), overrides, "(defaults)", engine.OVERRIDABLE)
    train_json, train_name = _dataset(train, "train")
    if images is None:
        raise InputError("simcal.calibrate", "images", "the training images' folder is needed with model=")
    adopted, label_map = _adopt(model, train_json, train_name)
    dataset = DetectionDataset(train_json, images, label_map=label_map, with_masks=False, source=train_name)
    files = CalibrationFiles(Path(out)) if out is not None else None
    return engine.calibrate_head(
        adopted,
        dataset,
        train_json,
        cfg.calibration,
        files=files,
        options=engine.CalibrateOptions(resume=resume, snapshot_every=snapshot_every, progress=progress),
        device=_device(adopted),
    )


def _device(model: nn.Module) -> Any:
    """Where a model given as an object runs: where its weights are (it is not moved)."""
    return next(model.parameters()).device


def predict(
    run: PathLike | None = None,
    *,
    model: nn.Module | None = None,
    gt: PathLike | None = None,
    images: PathLike | None = None,
    heads: Sequence[str] = ("orig",),
    calibrated: CalibratedHead | PathLike | None = None,
    calibration: str | None = None,
    train: PathLike | None = None,
    split: str = "val",
    overrides: Sequence[str] = (),
    out: PathLike | None = None,
    checkpoint: str | None = None,
    batch_size: int = 8,
    max_images: int | None = None,
    topk_per_class: int | None = None,
    evaluate: bool = True,
    progress: bool = True,
    allow_category_subset: bool = False,
    **settings: Any,
) -> dict[str, dict[str, EvalResult]]:
    """Detect with several heads in one pass per batch, write LVIS results and evaluate them.

    With ``run``: as ``simcal predict`` (``split`` or ``gt``/``images``; ``calibration`` names the
    calibrated head). With ``model``: a detector object on ``gt`` (an annotations file) and
    ``images``; ``calibrated`` is the head for ``cal``/``dual`` (an object or a ``head.pth``),
    ``train`` the training annotations (their counts drive ``dual`` and the post-hoc heads, and
    the evaluation's frequency groups and bins); results go to ``out`` (default: a temporary
    folder). ``heads``: :data:`simcal.choices.SCORERS`. ``settings``: ``inference`` keys
    (``combine``, ``T``, ``param``). With ``max_images`` below the number of images, the files go
    to ``<split>-first<N>`` (``<out>-first<N>``), never over the whole split's. With
    ``topk_per_class`` K: no per-image cap, the K best detections of each class over the images,
    to ``<split>-topk<K>`` (``<out>-topk<K>``), evaluated as AP-fixed (returned) and AP-pool.
    Annotations whose categories differ from the detector's are refused unless
    ``allow_category_subset`` (then the categories both have are evaluated).

    Returns:
        ``{head: {"bbox": EvalResult, "segm": EvalResult}}`` (empty with ``evaluate=False``).
    """
    from simcal.engine import predict as engine

    overrides = [*_overrides("inference", settings), *overrides]
    options = engine.PredictOptions(
        batch_size=batch_size,
        max_images=max_images,
        topk_per_class=topk_per_class,
        evaluate_results=evaluate,
        progress=progress,
        category_subset=allow_category_subset,
    )
    if run is not None:
        if model is not None:
            raise InputError("simcal.predict", "model", "pass run= or model=, not both")
        return engine.predict(
            run,
            heads=list(heads),
            overrides=overrides,
            calibration=calibration,
            split=split,
            gt_json=None if gt is None else str(gt),
            images=None if images is None else str(images),
            checkpoint=checkpoint,
            options=options,
        )
    if model is None:
        raise InputError("simcal.predict", "run", "pass run= (a trained run directory) or model=")
    if gt is None or images is None:
        raise InputError("simcal.predict", "gt", "the annotations (gt=) and images (images=) are needed with model=")
    from simcal.config import Config, apply_overrides
    from simcal.data.annotations import load_dataset
    from simcal.modeling.calibration import load_head
    from simcal.run import PredictionFiles

    cfg = apply_overrides(Config(), overrides, "(defaults)", ("inference.",))
    adopted, label_map = _adopt(model, load_dataset(train if train is not None else gt), str(train or gt))
    cal_heads = {}
    if calibrated is not None:
        cal_heads[""] = (
            load_head(calibrated, adopted.roi_heads)[0] if isinstance(calibrated, (str, os.PathLike)) else calibrated
        )
    specs = engine.parse_heads(list(heads), cfg.inference.combine, cfg.inference.T, cfg.inference.param)
    with tempfile.TemporaryDirectory(prefix="simcal-predict-") as tmp:
        return engine.run_heads(
            adopted,
            label_map,
            specs,
            cal_heads,
            gt_json=str(gt),
            images=str(images),
            train_json=None if train is None else str(train),
            out=PredictionFiles(Path(out) if out is not None else Path(tmp)),
            options=dataclasses.replace(options, verbose=False),
            device=_device(adopted),
        )
