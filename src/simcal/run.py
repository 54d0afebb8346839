"""The run directory: every file of a run named in one place (torch-free).

A run directory is what ``simcal train`` writes and every later command reads and extends::

    RUN/
      config.yaml                 the resolved config (all sections)
      label_map.json              category id <-> contiguous label (background 0)
      checkpoint_last.pth         written every train.checkpoint_period iterations (resume)
      model_final.pth             the trained detector (or the imported one: simcal import)
      import.json                 an imported detector's provenance (source file, sha256, framework)
      train_log.jsonl  tb/        training log (and TensorBoard scalars when installed)
      calibration/<name>/         one SimCal calibration: head.pth, checkpoint.pth (resume),
                                  calibration_log.jsonl, summary.json, snapshots/head_<step>.pth
      predictions/<split>/<head>/ results.json (LVIS results), metrics_bbox.json, metrics_segm.json,
                                  made_by.json (the detector and calibrated heads that made them)
      predictions/<split>-first<N>/  the same for the first N images only (predict --max-images)
      predictions/<split>-topk<K>/   the K best detections of each class over the split, no per-image
                                  cap (predict --topk-per-class): metrics_<iou>_fixed.json, _pool.json
      analysis/<tool>.json        recall, oracle, sweep_T, dynamics, confusion, errors, compare (numbers only)
      analysis/<tool>/<head>/     the predictions an analysis evaluated (oracle, sweep_T, dynamics)
      report/                     index.html, report.json and its PNGs (the analyses' figures drawn from their json)

No other module spells a path inside a run; they ask :class:`Run`. Loading the run's config and
resolving a split (its annotations and images) or a calibration by name live here too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from simcal.errors import InputError

if TYPE_CHECKING:
    from simcal.config import CalibrationConfig, Config

#: the calibration SimCal's defaults write, and the one predict/analyze/report use by default
DEFAULT_CALIBRATION = "3fc_ft"


RESULTS = "results.json"
#: the suffix of a split name whose predictions cover only its first N images: ``val-first50``
PARTIAL = "-first"
#: the suffix of a split name whose predictions keep the K best of each class: ``val-topk10000``
TOPK = "-topk"


@dataclass(frozen=True)
class HeadTag:
    """The name of one head's predictions (its folder under ``predictions/<split>/``), built and read
    here only.

    ``base``: the scorer and its settings: ``orig``, ``cal``, ``dual``, ``dual_<combine>_T<T>``,
    ``<posthoc>_<param>`` (``norcal_1``, ``logit-adj_1``), ``oracle``; ``calibration``: the
    calibrated head a ``cal`` / ``dual`` head used when it is not the default one (``""``).
    Formatted ``base`` or ``base@calibration``: ``dual@cb_rfs``.
    """

    base: str
    calibration: str = ""

    def __str__(self) -> str:
        return f"{self.base}@{self.calibration}" if self.calibration else self.base

    def format(self) -> str:
        """The folder name: ``base`` or ``base@calibration``."""
        return str(self)

    @classmethod
    def parse(cls, tag: str) -> HeadTag:
        """The inverse of :meth:`format`: ``"dual@cb_rfs"`` -> ``HeadTag("dual", "cb_rfs")``."""
        base, _, calibration = tag.partition("@")
        return cls(base, calibration)

    @property
    def kind(self) -> str:
        """The scorer (:data:`simcal.choices.SCORERS`): ``dual`` of ``dual_avg_T100@x``, ``norcal`` of ``norcal_1``."""
        return self.base.split("_", 1)[0]

    @property
    def param(self) -> str:
        """What follows the kind in ``base`` (``avg_T100``, ``1``), ``""`` when nothing does."""
        return self.base.partition("_")[2]


def _metrics_name(iou: str, protocol: str = "lvis") -> str:
    return f"metrics_{iou}.json" if protocol == "lvis" else f"metrics_{iou}_{protocol}.json"


@dataclass(frozen=True)
class HeadFiles:
    """The files of one head's predictions on one split."""

    root: Path

    @property
    def results(self) -> Path:
        return self.root / RESULTS

    @property
    def provenance(self) -> Path:
        """``made_by.json``: the detector (checkpoint, sha256, iteration) and calibrated heads that made
        :attr:`results`."""
        return self.root / "made_by.json"

    def check_made_by(self, run: str | os.PathLike[str]) -> None:
        """Refuse these predictions when the detector or a calibrated head that made them has changed
        since (the file :attr:`provenance` names holds other bytes now: the run trained on, a head
        calibrated again): an :class:`InputError` saying to predict again. Predictions from before the
        record, or whose files are gone (made with another ``--checkpoint``, say), are taken as they are."""
        from simcal.io import file_sha256, read_json

        if not self.provenance.exists():
            return
        made_by = read_json(self.provenance) or {}
        records = [("detector", made_by.get("model"))]
        records += [(f"calibrated head {n}", h) for n, h in (made_by.get("calibrated_heads") or {}).items()]
        for what, rec in records:
            if not isinstance(rec, dict):
                continue
            file = rec.get("checkpoint") or rec.get("file")
            if file and os.path.exists(file) and file_sha256(file) != rec.get("sha256"):
                raise InputError(
                    self.root,
                    "(predictions)",
                    f"made by a {what} that has changed since ({file} holds other weights now): "
                    f"predict again (simcal predict --run {run} ...)",
                )

    def part(self, rank: int) -> Path:
        """Process ``rank``'s share of the results under torchrun (one detection per line),
        merged into :attr:`results` by rank 0 and removed."""
        return self.root / f".results.rank{rank}.jsonl"

    def metrics(self, iou: str, protocol: str = "lvis") -> Path:
        """``metrics_bbox.json`` or ``metrics_segm.json``; ``metrics_<iou>_<protocol>.json`` for the
        other protocols (:data:`simcal.choices.PROTOCOLS`)."""
        return self.root / _metrics_name(iou, protocol)


@dataclass(frozen=True)
class PredictionFiles:
    """A folder of per-head predictions: ``<root>/<head tag>/results.json`` and metrics."""

    root: Path

    def head(self, tag: str | HeadTag) -> HeadFiles:
        return HeadFiles(self.root / str(tag))

    def partial(self, first: int) -> PredictionFiles:
        """Where predictions on only the first ``first`` images go (``predict --max-images``):
        ``<root>-first<N>``, beside the whole split's, which they never replace."""
        return PredictionFiles(self.root.with_name(f"{self.root.name}{PARTIAL}{first}"))

    def topk(self, k: int) -> PredictionFiles:
        """Where per-class top-``k`` predictions go (``predict --topk-per-class``): ``<root>-topk<K>``,
        beside the per-image-capped ones, which they never replace."""
        return PredictionFiles(self.root.with_name(f"{self.root.name}{TOPK}{k}"))

    def topks(self) -> list[tuple[int, PredictionFiles]]:
        """The per-class top-k predictions beside these (:meth:`topk`), ``(K, files)`` by K."""
        found = []
        for p in self.root.parent.glob(f"{self.root.name}{TOPK}*"):
            split = parse_split(p.name)
            if p.is_dir() and split.topk and p.name == f"{self.root.name}{TOPK}{split.topk}":
                found.append((split.topk, PredictionFiles(p)))
        return sorted(found, key=lambda kv: kv[0])

    def heads(self, evaluated: str | None = None, protocol: str = "lvis") -> list[str]:
        """Tags of the heads with results (``evaluated``: with metrics of that IoU type and
        protocol), sorted."""
        if not self.root.is_dir():
            return []
        name = _metrics_name(evaluated, protocol) if evaluated else RESULTS
        return sorted(p.parent.name for p in self.root.glob(f"*/{name}"))


@dataclass(frozen=True)
class CalibrationFiles:
    """The files of one calibration, ``RUN/calibration/<name>/``."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def head(self) -> Path:
        """The calibrated head (written when the calibration finished)."""
        return self.root / "head.pth"

    @property
    def checkpoint(self) -> Path:
        """The state to resume an interrupted calibration from."""
        return self.root / "checkpoint.pth"

    @property
    def log(self) -> Path:
        return self.root / "calibration_log.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def snapshot_dir(self) -> Path:
        return self.root / "snapshots"

    def snapshot(self, step: int) -> Path:
        """The head saved at ``step`` by ``--snapshot-every``."""
        return self.snapshot_dir / f"head_{step:06d}.pth"

    def snapshots(self) -> list[Path]:
        """Every saved snapshot, by step."""
        return sorted(self.snapshot_dir.glob("head_*.pth"))


@dataclass(frozen=True)
class AnalysisFiles:
    """What one analysis tool writes: ``analysis/<tool>.json`` (numbers only: the report draws the
    figures) and the predictions it evaluated."""

    root: Path
    tool: str

    @property
    def json(self) -> Path:
        return self.root / f"{self.tool}.json"

    @property
    def predictions(self) -> PredictionFiles:
        return PredictionFiles(self.root / self.tool)

    def part(self, rank: int) -> Path:
        """Process ``rank``'s share of the tool's detector pass under torchrun (``.npy``), joined
        by rank 0 and removed."""
        return self.root / f".{self.tool}.rank{rank}.npy"


@dataclass(frozen=True)
class ReportFiles:
    """The report's folder (``RUN/report`` unless ``simcal report --out``): the page, its record, PNGs."""

    root: Path

    @property
    def index(self) -> Path:
        return self.root / "index.html"

    @property
    def meta(self) -> Path:
        """``report.json``: the heads, figures and gallery the page shows."""
        return self.root / "report.json"

    def figure(self, name: str) -> Path:
        return self.root / f"{name}.png"


def _folder_name(name: str, flag: str, field: str) -> str:
    """``name`` when it names one folder inside the run (a calibration, a split), else an
    :class:`InputError`: ``..`` or a ``/`` would put files outside the run or between its folders."""
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise InputError(flag, field, f"{name!r} is not a plain folder name (no '/', not '.' or '..')")
    return name


class Run:
    """A run directory. Paths only: nothing is read or created until asked."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    # ------------------------------------------------------------------ training
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def label_map(self) -> Path:
        return self.root / "label_map.json"

    @property
    def checkpoint_last(self) -> Path:
        return self.root / "checkpoint_last.pth"

    @property
    def model_final(self) -> Path:
        return self.root / "model_final.pth"

    @property
    def provenance(self) -> Path:
        """``import.json``: where an imported detector came from (``simcal import``: the source file,
        its sha256, the framework, its config file and the settings read)."""
        return self.root / "import.json"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    def has_training(self) -> bool:
        """Whether training started here (a checkpoint or final weights exist)."""
        return self.checkpoint_last.exists() or self.model_final.exists()

    # ------------------------------------------------------------------ calibration
    def calibration(self, name: str, flag: str = "--name") -> CalibrationFiles:
        """The files of calibration ``name`` (``flag``: the option that named it, for an error)."""
        return CalibrationFiles(self.root / "calibration" / _folder_name(name, flag, "calibration"))

    def calibrations(self) -> list[str]:
        """Names of the finished calibrations (those with a head), sorted."""
        root = self.root / "calibration"
        return sorted(p.parent.name for p in root.glob("*/head.pth")) if root.is_dir() else []

    def resolve_calibration(self, name: str | None) -> str:
        """``name``, or when None the default calibration: ``3fc_ft``, else the only one there is."""
        found = self.calibrations()
        root = self.root / "calibration"
        if name is not None:
            if name not in found:
                there = f"there are: {', '.join(found)}" if found else "there is none: run simcal calibrate first"
                raise InputError(root / name, "(calibration)", f"no finished calibration {name!r}; {there}")
            return name
        if not found:
            raise InputError(root, "(calibration)", "no calibrated head: run simcal calibrate first")
        if DEFAULT_CALIBRATION in found:
            return DEFAULT_CALIBRATION
        if len(found) == 1:
            return found[0]
        raise InputError(root, "(calibration)", f"several calibrated heads ({', '.join(found)}): pass --calibration")

    # ------------------------------------------------------------------ predictions, analyses, report
    def predictions(self, split: str) -> PredictionFiles:
        return PredictionFiles(self.root / "predictions" / _folder_name(split, "--split", "split"))

    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    def analysis(self, tool: str) -> AnalysisFiles:
        """The files of an analysis tool (``sweep-T`` is stored as ``sweep_T``)."""
        return AnalysisFiles(self.analysis_dir, tool.replace("-", "_"))

    @property
    def report(self) -> ReportFiles:
        return ReportFiles(self.root / "report")

    # ------------------------------------------------------------------ reading
    def load_config(self) -> Config:
        """The run's resolved ``config.yaml``; a clear error when this is not a run directory."""
        from simcal.config import config_from_dict, read_yaml

        raw = read_yaml(self.config, "not a simcal run directory (no config.yaml)")
        if not isinstance(raw, dict):
            raise InputError(self.config, "(top level)", "expected a mapping")
        return config_from_dict(raw, str(self.config))


def calibration_name(c: CalibrationConfig) -> str:
    """The folder of a calibration: ``3fc_ft`` for SimCal's defaults; variants append what differs
    (``3fc_ft_focal_random``, ``3fc_ft_focal_gamma2_random``)."""
    parts = [c.head] + ([c.layers] if c.layers != "all3" else [])
    parts += [c.loss] if c.loss != "ce" else []
    parts += [f"{k}{v:g}" for k, v in sorted(c.loss_kwargs.items())]
    parts += [c.sampler] if c.sampler != "bilevel" else []
    parts += [f"stages-{c.stages}"] if c.stages != "all" else []
    return "_".join(parts)


class Split(NamedTuple):
    """A split name taken apart: ``val-first50-topk10000`` -> ``Split("val", 50, 10000)``."""

    base: str
    first: int | None = None
    topk: int | None = None


def _suffix(name: str, sep: str) -> tuple[str, int | None]:
    base, found, n = name.rpartition(sep)
    if found and base and n.isdigit() and int(n) > 0:
        return base, int(n)
    return name, None


def parse_split(split: str) -> Split:
    """The split a predictions folder name stands for: ``val-first50`` (the first 50 images of
    val, :meth:`PredictionFiles.partial`), ``val-topk10000`` (:meth:`PredictionFiles.topk`), both
    (``val-first50-topk10000``), or a plain name."""
    rest, topk = _suffix(split, TOPK)
    base, first = _suffix(rest, PARTIAL)
    return Split(base, first, topk)


def split_annotations(cfg: Config, split: str, gt_json: str | None, needs: str = "--gt") -> str:
    """The annotations json of a split: ``gt_json`` when given, else the config's ``val`` / ``train``
    (also for ``val-first50`` and ``val-topk10000``: see :func:`parse_split`)."""
    if gt_json is None:
        gt_json = {"val": cfg.data.val_json, "train": cfg.data.train_json}.get(parse_split(split).base)
        if not gt_json:
            raise InputError("--split", "split", f"no annotations for split {split!r}: pass {needs}")
    return str(gt_json)


def resolve_split(cfg: Config, split: str, gt_json: str | None, images: str | None) -> tuple[str, str]:
    """The annotations and image folder of a split: the config's ``val`` / ``train``, or given."""
    if gt_json is None:
        images = images or {"val": cfg.data.val_images, "train": cfg.data.train_images}.get(parse_split(split).base)
    gt_json = split_annotations(cfg, split, gt_json, needs="--gt and --images")
    if not images:
        raise InputError("--images", "images", "an image folder is needed with --gt")
    return gt_json, str(images)
