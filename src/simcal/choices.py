"""The names of every choice simcal offers, in one torch-free place.

Config validation (:mod:`simcal.config`), the command line's ``choices=`` (:mod:`simcal.cli`)
and the builders that turn a name into an object (:mod:`simcal.modeling.losses`,
:mod:`simcal.modeling.calibration`, :mod:`simcal.modeling.combine`, :mod:`simcal.modeling.scoring`,
:mod:`simcal.modeling.detector`) all read this module; a test
checks that every name listed here has an implementation and every implementation a name.
Adding a loss, a calibrated-head kind, a combiner or a post-hoc method means one entry here
plus its code (``docs/extending.md``).

Importing this module imports nothing but the standard library, so ``simcal --help`` stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Range:
    """A numeric range for a keyword argument: ``lo <= x <= hi`` (``<`` where ``open_lo``/``open_hi``)."""

    lo: float = -math.inf
    hi: float = math.inf
    open_lo: bool = False
    open_hi: bool = False

    def contains(self, x: float) -> bool:
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
            return False
        above = x > self.lo if self.open_lo else x >= self.lo
        below = x < self.hi if self.open_hi else x <= self.hi
        return above and below

    def describe(self) -> str:
        lo = None if self.lo == -math.inf else f"{'>' if self.open_lo else '>='} {self.lo:g}"
        hi = None if self.hi == math.inf else f"{'<' if self.open_hi else '<='} {self.hi:g}"
        return " and ".join(p for p in (lo, hi) if p) or "a finite number"


POSITIVE = Range(0.0, open_lo=True)
NON_NEGATIVE = Range(0.0)

# --------------------------------------------------------------------------- model
#: ``model.arch``: the backbone body of the Mask R-CNN (:func:`simcal.modeling.detector.build_detector`).
ARCHS = (
    "resnet50_fpn",
    "small",
    "resnext101_64x4d_fpn",
    "resnet101_fpn",
    "resnet152_fpn",
    "resnext50_32x4d_fpn",
    "resnext101_32x8d_fpn",
)
#: ``model.roi_heads``: one box stage (Mask R-CNN), Cascade Mask R-CNN's three (IoU 0.5 / 0.6 / 0.7),
#: or Hybrid Task Cascade's (the cascade's box stages, a mask head per stage, interleaved, mask flow)
ROI_HEADS = ("standard", "cascade", "htc")
#: ``model.norm``: the backbone's normalisation layer.
NORMS = ("frozen_bn", "bn", "gn")
#: the home frameworks' math (:mod:`simcal.modeling.conventions`, docs/import.md); the first of each is torchvision's
#: ``model.pixel_format``: the channel order the first conv expects (detectron2's MSRA weights: bgr)
PIXEL_FORMATS = ("rgb", "bgr")
#: ``model.resize``: torchvision (floored size, float interpolation) | detectron2 (rounded size, the uint8
#: image resized by PIL, detections clipped to the original image) | mmdet (rounded size, the uint8 image
#: resized by OpenCV's bilinear, mmcv's ``imrescale``) | mmdet_v1 (the same, boxes mapped back by its one scale factor)
RESIZES = ("torchvision", "detectron2", "mmdet", "mmdet_v1")
#: ``model.mask_head``: the mask head's last 1x1 conv, plain or normalised (mmdetection's "normed mask")
MASK_HEADS = ("standard", "normed")
#: ``model.anchors``: torchvision (rounded cells, strides from the padded size) | exact (detectron2, mmdetection 2+)
#: | mmdet_v1 (cells centred at (stride - 1) / 2, corners -+ (w - 1) / 2, rounded)
ANCHORS = ("torchvision", "exact", "mmdet_v1")
#: ``model.proposals``: the RPN's filtering: NMS on sigmoid scores, sides >= 1e-3 (torchvision); on logits, non-empty
#: boxes (detectron2); on sorted sigmoid scores, non-empty boxes (mmdetection); per level with +1 widths (mmdet_v1)
PROPOSAL_RULES = ("torchvision", "detectron2", "mmdet", "mmdet_v1")
#: ``model.roi_align``: torchvision's MultiScaleRoIAlign (not aligned, 2 samples per bin) | aligned with an adaptive
#: sampling ratio and detectron2's or mmdetection's level mapping
ROI_ALIGNS = ("torchvision", "detectron2", "mmdet", "mmdet_v1")

#: ``simcal import --from``: frameworks whose checkpoints become simcal runs (:mod:`simcal.modeling.importers`)
IMPORT_FRAMEWORKS = ("detectron2", "mmdet", "simcal-v1")

# --------------------------------------------------------------------------- training
OPTIMIZERS = ("sgd", "adamw")
#: ``train.sampler``: image-level samplers of normal training.
TRAIN_SAMPLERS = ("random", "repeat_factor")
REPEAT_ROUNDING = ("stochastic", "ceil")


@dataclass(frozen=True)
class LossSpec:
    """Everything simcal derives from a classification loss's name (one row of :data:`LOSSES`).

    ``kwargs``: its keyword arguments (``train.loss_kwargs``, ``calibration.loss_kwargs``) and the
    values each accepts; ``classifier``: the classifier it trains (:data:`CLASSIFIERS`; what
    ``model.classifier: auto`` becomes, and a decoupled calibration's own classifier);
    ``prior_prob``: ``model.cls_prior_prob`` unset, the starting class probability of its reference
    code (None: the layer's own init); ``calibration_layers``: the
    ``calibration.layers`` its authors trained decoupled (None: any); ``title``: its name in tables
    (the leaderboard's rows; empty: not on the leaderboard); ``end_to_end``: the overrides the
    leaderboard adds when it trains the loss end to end.
    """

    kwargs: dict[str, Range] = field(default_factory=dict)
    classifier: str = "softmax"
    prior_prob: float | None = None
    calibration_layers: str | None = None
    title: str = ""
    end_to_end: tuple[str, ...] = ()


#: Classification losses of the box head, one row each (METHOD.md, Baselines). Config validation,
#: the command line's choices, the builders (:data:`simcal.modeling.losses.LOSS_CLASSES`), the
#: leaderboard's recipes and the tests' parametrisations all derive from this table.
#: ``ce`` is the classifier's own cross-entropy (softmax cross-entropy for the softmax classifier).
LOSSES: dict[str, LossSpec] = {
    "ce": LossSpec(),
    "lr": LossSpec({"n": POSITIVE, "lo": POSITIVE, "hi": POSITIVE}),
    "focal": LossSpec({"gamma": NON_NEGATIVE, "alpha": POSITIVE}),
    "cm": LossSpec({"c": NON_NEGATIVE}),
    # beyond the paper (METHOD.md): each trains its own classifier
    "seesaw": LossSpec(
        {"p": NON_NEGATIVE, "q": NON_NEGATIVE, "eps": POSITIVE}, "seesaw", title="Seesaw",
        end_to_end=("model.cls_head=normed",),
    ),
    "eqlv2": LossSpec({"gamma": POSITIVE, "mu": NON_NEGATIVE, "alpha": NON_NEGATIVE}, "sigmoid", title="EQLv2"),
    # the federated loss: CenterNet2 / Detic's PRIOR_PROB
    "fed": LossSpec(
        {"num_classes": Range(1.0), "power": NON_NEGATIVE}, "sigmoid", prior_prob=0.01, title="federated loss",
    ),
    "bags": LossSpec({"beta": POSITIVE}, "group_softmax", calibration_layers="last1", title="BAGS"),
}  # fmt: skip
#: ``model.classifier``: ``auto`` takes train.loss's (its ``LOSSES`` row's ``classifier``)
CLASSIFIERS = ("auto", "softmax", "sigmoid", "seesaw", "group_softmax")
#: ``model.cls_head``: the class-score layer: plain linear, or normalised (cosine, temperature 20)
CLS_HEADS = ("linear", "normed")

# --------------------------------------------------------------------------- calibration
#: ``calibration.head``: calibrated-head kinds (Table 10; :mod:`simcal.modeling.calibration`).
CALIBRATED_HEADS = ("3fc_ft", "2fc_rand", "3fc_rand", "ncm")
#: ``calibration.layers``: which layers of the calibrated head train (Table 10).
LAYERS = ("all3", "last2", "last1")
#: ``calibration.sampler``: SimCal's bi-level sampler, or image-centric ones (decoupled baselines).
CALIBRATION_SAMPLERS = ("bilevel", "random", "repeat_factor")
#: ``calibration.stages``: on a cascade, a calibrated head for every stage, or for the last one only
CALIBRATION_STAGES = ("all", "last")

# --------------------------------------------------------------------------- inference
#: ``inference.combine``: how the dual head merges the original and calibrated scores
#: (supplement J). ``det`` merges the two heads' detections after NMS instead of their scores.
COMBINERS = ("sel", "avg", "cal-only", "orig", "sel-thr", "sel-scale", "sel-norm", "det")
#: Zero-training post-hoc calibrations of the original head (parameter ``inference.param``).
POSTHOC = ("norcal", "logit-adj")
#: ``simcal predict --head``: the ways of scoring the shared RoI features
#: (:mod:`simcal.modeling.scoring`). ``oracle`` is the analysis "props-gt" and needs ground truth.
SCORERS = ("orig", "cal", "dual", "oracle", *POSTHOC)

# --------------------------------------------------------------------------- evaluation, tools
IOU_TYPES = ("bbox", "segm")
#: ``simcal evaluate --iou``: also boundary IoU for masks (Cheng et al. 2021; the LVIS 2021 challenge's)
EVAL_IOU_TYPES = (*IOU_TYPES, "boundary")
#: boundary IoU's band: this fraction of the image diagonal (``--dilation``)
BOUNDARY_DILATION = 0.02
#: evaluation protocols: LVIS's 300 per image; AP-fixed (no per-image cap, top K per class over the
#: dataset); AP-pool (AP-fixed's detections, precision and recall pooled over each group's classes)
PROTOCOLS = ("lvis", "fixed", "pool")
FIXED_DETS_PER_CLASS = 10000
ANALYSES = ("recall", "oracle", "sweep-T", "dynamics", "confusion", "errors")
MASK_FORMATS = ("polygon", "rle")
IMAGE_FORMATS = ("png", "jpg")
DEMO_BUDGETS = ("quick", "full", "leaderboard")

#: upper bounds of every number a user gives (flags and config fields): what the machine's types and
#: memory can hold, far beyond any real run. Seeds: numpy's generators take 32-bit seeds.
MAX_SEED = 2**32 - 1
MAX_COUNT = 10**9  # a count (iterations, detections, images) without a tighter bound of its own
MAX_STEPS = 10**6  # calibration steps (~80 times the paper's 12,000); the schedule is drawn a window ahead
MAX_IMAGES = 10**7  # images of a synthetic set or a run (LVIS: 100k)
MAX_CLASSES = 100_000
MAX_BATCH = 65_536  # images in one batch
MAX_IMAGE_SIDE = 16_384  # pixels (model.min_size / max_size, synth --size)
MAX_THREADS = 1024
MAX_WORKERS = 256
MAX_FLOAT = 1e15  # a real-valued setting (learning rates stay finite when squared in float32: < 1.8e19)

#: ``simcal synth`` defaults (here so that ``simcal --help`` needs no image library).
SYNTH_CLASSES = 80
SYNTH_TRAIN_IMAGES = 3000
SYNTH_VAL_IMAGES = 600
SYNTH_SIZE = 128
#: ``simcal synth --like``: real datasets whose per-class training statistics a synthetic set can follow
SYNTH_LIKE = ("lvis_v1",)


def check_loss_kwargs(loss: str, kwargs: dict[str, object]) -> tuple[str, str] | None:
    """``None`` when ``kwargs`` suit ``loss``, else ``(key, what is wrong)`` for the error message."""
    allowed = LOSSES[loss].kwargs
    for key, value in kwargs.items():
        if key not in allowed:
            known = ", ".join(allowed) or "none"
            return str(key), f"loss {loss!r} takes no {key!r} (accepted: {known})"
        if not allowed[key].contains(value):  # type: ignore[arg-type]
            return str(key), f"must be {allowed[key].describe()}, got {value!r}"
    if loss == "lr" and kwargs.get("lo", 0.1) > kwargs.get("hi", 10.0):  # the clamp range of the weights
        return "lo", f"must be <= hi ({kwargs.get('hi', 10.0)!r}), got {kwargs.get('lo', 0.1)!r}"
    return None
