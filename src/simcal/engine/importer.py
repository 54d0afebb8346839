"""``simcal import``: a detector trained in another framework becomes a simcal run directory.

The checkpoint is read safely (:func:`simcal.modeling.importers.read_checkpoint`), converted by
its framework's rules (:mod:`simcal.modeling.importers`), checked against the detector the
resulting config builds (every tensor present, none extra, every shape), and written as the run
``simcal train`` would leave: ``config.yaml``, ``label_map.json``, ``model_final.pth`` and the
provenance ``import.json`` (source file, its sha256, framework, config file, the settings read).
Every later command (calibrate, predict, analyze, compare, report, torchrun) takes it as it is.

Nothing is written until everything is checked, and the run appears at once: the files go to a
temporary folder beside ``--out`` that is renamed into place (``--out`` must not exist or be empty).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from simcal import __version__, choices
from simcal.config import Config, apply_overrides, classifier_of, config_from_dict, save_config
from simcal.data.annotations import load_dataset
from simcal.data.label_map import LabelMap
from simcal.errors import InputError
from simcal.io import LOCK_NAME, file_sha256, run_lock, save_checkpoint, write_json
from simcal.modeling.importers import Imported, model_weights, read_checkpoint
from simcal.run import Run

#: the format field of ``import.json``
PROVENANCE_FORMAT = "simcal.import"


def _converters() -> dict[str, tuple[Callable[..., Imported], Callable[[str, dict[str, str]], str], tuple[str, ...]]]:
    """framework -> (convert, name of a simcal key in the framework, where its weights sit in the file)."""
    from simcal.modeling.importers import detectron2, mmdet, simcal_v1

    return {
        "detectron2": (detectron2.convert, detectron2.source_key, ("model",)),
        "mmdet": (mmdet.convert, mmdet.source_key, ("state_dict",)),
        "simcal-v1": (simcal_v1.convert, simcal_v1.source_key, ("state_dict",)),
    }


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(out, "--out", "is a file: the run directory to write must be a new folder")
    if out.is_dir() and any(out.iterdir()):
        held = "a run" if Run(out).config.exists() else "files"
        raise InputError(out, "--out", f"already holds {held}: import into a new (or empty) folder")


def import_checkpoint(
    framework: str,
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    framework_config: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    verbose: bool = True,
) -> Path:
    """Convert ``checkpoint`` of ``framework`` (:data:`simcal.choices.IMPORT_FRAMEWORKS`) into the
    run directory ``out`` and return it.

    ``framework_config``: the framework's config file of that model (detectron2 YAML); without
    it the framework's model-zoo settings are assumed and printed. ``overrides``:
    ``section.key=value`` for what the checkpoint cannot say; the class order needs a json
    (``data.train_json``, which calibration needs anyway, else ``data.val_json``): its categories
    in increasing id order are the classes 1..C, as detectron2 and mmdetection order LVIS and COCO.
    """
    if framework not in choices.IMPORT_FRAMEWORKS:
        raise InputError("--from", "framework", f"expected one of {', '.join(choices.IMPORT_FRAMEWORKS)}")
    out = Path(out)
    # the run does not exist yet: the lock is a file beside it, removed as the import ends (a second
    # import that opened it before then may go on, and finds --out taken at its final rename)
    with run_lock(out, lock_file=out.parent / f".{out.name}{LOCK_NAME}", remove=True):
        return _import(framework, checkpoint, out, framework_config, overrides, verbose)


def _import(
    framework: str,
    checkpoint: str | os.PathLike[str],
    out: Path,
    framework_config: str | os.PathLike[str] | None,
    overrides: Sequence[str],
    verbose: bool,
) -> Path:
    _check_out(out)
    source = str(checkpoint)
    convert, source_key, nested = _converters()[framework]
    if framework_config is not None and not os.path.isfile(framework_config):
        raise InputError(framework_config, "--framework-config", "no such file")
    obj = read_checkpoint(checkpoint)
    weights, notes = model_weights(obj, source, nested)
    meta = obj.get("meta") if isinstance(obj, dict) else None  # mmdetection's: its config and class names
    imported = convert(weights, source, None if framework_config is None else str(framework_config), meta)
    notes = notes + imported.notes

    base = Config().to_dict()
    # NCHW convolutions, as the home frameworks run them: NHWC rounds differently (on the detectron2
    # reference, final boxes 0.98e-3 px off against 0.67e-3 in NCHW); model.channels_last=true for speed
    base["model"].update(channels_last=False, **imported.model)
    cfg = config_from_dict(base, f"<{framework} import of {source}>", stored=False)
    if overrides:
        cfg = apply_overrides(cfg, list(overrides), f"<{framework} import of {source}>")
    label_map, categories_from = _label_map(cfg, imported, source)
    state = _checked_state(cfg, imported, source, source_key)

    provenance = {
        "format": PROVENANCE_FORMAT,
        "framework": framework,
        "source": os.path.abspath(source),
        "sha256": file_sha256(source),
        "framework_config": None if framework_config is None else os.path.abspath(framework_config),
        "framework_config_sha256": None if framework_config is None else file_sha256(framework_config),
        "categories_from": categories_from,
        "num_classes": imported.num_classes,
        "settings": [{"setting": k, "value": v, "from": f} for k, v, f in imported.settings],
        "notes": notes,
        "simcal_version": __version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    try:
        run = Run(tmp)
        save_config(cfg, run.config)
        label_map.save(run.label_map)
        write_json(run.provenance, provenance, indent=1)
        save_checkpoint(
            run.model_final,
            {
                "model": state,
                "iteration": 0,
                "num_classes": label_map.num_classes,
                "config": cfg.to_dict(),
                "imported": provenance,
            },
        )
        os.chmod(tmp, 0o777 & ~_umask())
        os.replace(tmp, out)  # the whole run at once (an empty --out is replaced)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        _summary(framework, source, provenance, cfg, out, notes)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _label_map(cfg: Config, imported: Imported, source: str) -> tuple[LabelMap, str]:
    """The class order: the categories of ``data.train_json`` (else ``data.val_json``) by id."""
    path = cfg.data.train_json or cfg.data.val_json
    if not path:
        raise InputError(
            "simcal import",
            "data.train_json",
            "needed to map the checkpoint's classes to category ids (and by calibration): "
            "add data.train_json=... (and data.train_images, data.val_json, data.val_images)",
        )
    field = "data.train_json" if cfg.data.train_json else "data.val_json"
    label_map = LabelMap.from_dataset(load_dataset(path))
    if label_map.num_classes != imported.num_classes:
        raise InputError(
            path,
            "categories",
            f"{label_map.num_classes} categories, but the checkpoint {source} classifies {imported.num_classes} "
            f"classes ({field}: the json its classes come from)",
        )
    return label_map, os.path.abspath(path)


def _checked_state(
    cfg: Config, imported: Imported, source: str, source_key: Callable[..., str]
) -> dict[str, torch.Tensor]:
    """The converted weights in the order of the detector ``cfg`` builds, checked against it: every
    tensor there, none extra, every shape. The detector is built on the ``meta`` device (shapes
    only, no memory, no initialisation)."""
    from simcal.modeling.detector import build_detector

    try:
        with torch.device("meta"):
            model = build_detector(cfg.model, imported.num_classes, classifier=classifier_of(cfg), pretrained=False)
    except ValueError as e:
        raise InputError(source, "(architecture)", str(e)) from None
    own = model.state_dict()
    own = {k: v for k, v in own.items() if ".cls_loss." not in k}
    missing = [k for k in own if k not in imported.state]
    if missing:
        name = source_key(missing[0], imported.source_keys)
        raise InputError(
            source,
            name,
            f"missing ({len(missing)} tensors the architecture the checkpoint describes needs are missing)",
        )
    extra = [k for k in imported.state if k not in own]
    if extra:
        raise InputError(
            source,
            imported.source_keys.get(extra[0], extra[0]),
            f"a tensor the architecture has no place for ({len(extra)} extra; built: model.arch={cfg.model.arch}, "
            f"model.roi_heads={cfg.model.roi_heads})",
        )
    for key, tensor in own.items():
        got = imported.state[key]
        if tuple(got.shape) != tuple(tensor.shape):
            raise InputError(
                source,
                imported.source_keys.get(key, key),
                f"shape {list(got.shape)} (as simcal's {key}) contradicts the other tensors: "
                f"the architecture they describe needs {list(tensor.shape)}",
            )
    return {key: imported.state[key] for key in own}


def _summary(framework: str, source: str, provenance: dict[str, Any], cfg: Config, out: Path, notes: list[str]) -> None:
    print(f"imported {framework} checkpoint {source} (sha256 {provenance['sha256'][:16]}...)")
    m = cfg.model
    print(
        f"  model: {m.arch}, roi_heads={m.roi_heads}, {provenance['num_classes']} classes, classifier="
        f"{classifier_of(cfg)}, class_agnostic={m.class_agnostic}"
    )
    for s in provenance["settings"]:
        print(f"  {s['setting']} = {s['value']}  [{s['from']}]")
    for note in notes:
        print(f"  note: {note}")
    print(f"run: {out} (next: simcal calibrate --run {out})")
