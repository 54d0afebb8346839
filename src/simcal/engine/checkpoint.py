"""A run's detector and calibrated heads, loaded for inference: the model built from the run's
config and label map with its final (or another) checkpoint, what identifies those weights
(provenance), and a calibrated head checked against the detector it was calibrated on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from simcal.config import Config, classifier_of
from simcal.data.annotations import load_dataset
from simcal.data.dataset import LabelMap
from simcal.data.stats import class_instance_counts
from simcal.errors import InputError
from simcal.io import file_sha256, load_checkpoint
from simcal.modeling.calibration import load_head
from simcal.modeling.detector import LongTailMaskRCNN, build_detector, load_detector_weights
from simcal.run import Run


def load_model(run: str | os.PathLike[str], checkpoint: str | None = None, cfg: Config | None = None):
    """``(model, label_map, cfg)``: a run's trained detector in eval mode (final weights unless
    ``checkpoint``), built from ``cfg`` (default: the run's config)."""
    r = Run(run)
    cfg = cfg or r.load_config()
    label_map = LabelMap.load(r.label_map)
    classifier = classifier_of(cfg)
    weights = Path(checkpoint) if checkpoint else r.model_final
    state = load_checkpoint(weights)
    saved = state.get("classifier") if isinstance(state, dict) else None
    groups = saved.get("groups") if isinstance(saved, dict) and saved.get("name") == classifier else None
    counts = None
    if classifier == "group_softmax" and groups is None:  # a checkpoint from before the groups were saved
        if not cfg.data.train_json or not os.path.exists(cfg.data.train_json):
            raise InputError(
                r.config, "data.train_json", "the group softmax classifier needs the training annotations (its groups)"
            )
        counts = class_instance_counts(load_dataset(cfg.data.train_json), label_map.category_ids, cfg.data.train_json)
    model = build_detector(
        cfg.model,
        label_map.num_classes,
        classifier=classifier,
        instance_counts=counts,
        classifier_groups=groups,
        pretrained=False,
    )  # its weights come from the run: model.weights / weights_backbone are not read again
    state = load_detector_weights(model, weights, r.label_map, state=state)
    model.provenance = detector_provenance(weights, state)
    return model.eval(), label_map, cfg


def detector_provenance(path: str | os.PathLike[str], state: dict[str, Any]) -> dict[str, Any]:
    """What identifies a detector's weights: the file, its sha256 and the training iteration it holds."""
    iteration = state.get("iteration") if isinstance(state, dict) else None
    return {"checkpoint": str(path), "sha256": file_sha256(path), "iteration": iteration}


def load_calibrated_head(run: str | os.PathLike[str], name: str | None, model: LongTailMaskRCNN) -> nn.Module:
    """The calibrated head ``name`` of a run (default: :meth:`simcal.run.Run.resolve_calibration`).

    A head records the detector it was calibrated on (:func:`detector_provenance`); a head whose
    detector is not ``model``'s (the run trained on since, or another ``--checkpoint``) is an
    :class:`InputError` saying how to recalibrate. Heads from before the record are taken as they are.
    """
    r = Run(run)
    path = r.calibration(r.resolve_calibration(name)).head
    head, meta = load_head(path, model.roi_heads)
    calibrated_on, now = meta.get("detector"), getattr(model, "provenance", None)
    if isinstance(calibrated_on, dict) and now is not None and calibrated_on.get("sha256") != now["sha256"]:
        raise InputError(
            path,
            "meta.detector",
            f"calibrated on another detector ({Path(str(calibrated_on.get('checkpoint'))).name} at iteration "
            f"{calibrated_on.get('iteration')}, sha256 {str(calibrated_on.get('sha256'))[:12]}) than "
            f"{Path(now['checkpoint']).name} now (iteration {now['iteration']}, sha256 {now['sha256'][:12]}): "
            f"calibrate again (simcal calibrate --run {run} --name NEW_NAME), or predict with the detector it "
            "was calibrated on (--checkpoint)",
        )
    head.provenance = {
        "name": path.parent.name,
        "file": str(path),
        "sha256": file_sha256(path),
        "detector": calibrated_on,
    }
    return head.eval()
