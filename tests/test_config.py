"""Config validation: every rule gives one line naming the source and the field; every preset loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from simcal import choices
from simcal.cli import main
from simcal.config import COMMAND_LINE, Config, _checks, apply_overrides, load_config
from simcal.errors import InputError

REPO = Path(__file__).resolve().parents[1]

# (overrides, field named in the error, part of the message); every rule of config.py appears here
RANGE_CASES = [
    (["data.num_workers=-1"], "data.num_workers", "must be >= 0"),
    (["model.trainable_backbone_layers=6"], "model.trainable_backbone_layers", "0..5"),
    (["model.min_size=0"], "model.min_size", "must be > 0"),
    (["model.max_size=100"], "model.max_size", "must be >= model.min_size (800), got 100"),
    (["model.rpn_pre_nms_top_n_train=0"], "model.rpn_pre_nms_top_n_train", "must be > 0"),
    (["model.rpn_post_nms_top_n_train=0"], "model.rpn_post_nms_top_n_train", "must be > 0"),
    (["model.rpn_pre_nms_top_n_test=0"], "model.rpn_pre_nms_top_n_test", "must be > 0"),
    (["model.rpn_post_nms_top_n_test=0"], "model.rpn_post_nms_top_n_test", "must be > 0"),
    (["model.rpn_batch_size_per_image=0"], "model.rpn_batch_size_per_image", "must be > 0"),
    (["model.box_batch_size_per_image=0"], "model.box_batch_size_per_image", "must be > 0"),
    (["model.box_positive_fraction=0"], "model.box_positive_fraction", "must lie in (0, 1]"),
    (["model.box_positive_fraction=1.5"], "model.box_positive_fraction", "must lie in (0, 1]"),
    (["model.score_thresh=-0.1"], "model.score_thresh", "must lie in [0, 1]"),
    (["model.nms_thresh=2"], "model.nms_thresh", "must lie in [0, 1]"),
    (["model.detections_per_img=0"], "model.detections_per_img", "must be > 0"),
    (["model.pixel_mean=[1, 2]"], "model.pixel_mean", "must be 3 numbers"),
    (["model.pixel_std=[1, 0, 1]"], "model.pixel_std", "must be 3 numbers > 0"),
    (["model.min_box_size=-1"], "model.min_box_size", "must be >= 0"),
    (["model.cascade_box_weights=[[10, 10, 5, 5]]"], "model.cascade_box_weights", "3 stages"),
    (["model.cascade_box_weights=[[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]"], "model.cascade_box_weights", "> 0"),
    (["train.batch_size=0"], "train.batch_size", "must be > 0"),
    (["train.base_lr=0"], "train.base_lr", "must be > 0"),
    (["train.reference_batch_size=0"], "train.reference_batch_size", "must be > 0"),
    (["train.momentum=-0.1"], "train.momentum", "must be >= 0"),
    (["train.momentum=1.5"], "train.momentum", "must be <= 1"),
    (["train.weight_decay=-1"], "train.weight_decay", "must be >= 0"),
    (["train.warmup_iters=-1"], "train.warmup_iters", "must be >= 0"),
    (["train.warmup_factor=0"], "train.warmup_factor", "must lie in (0, 1]"),
    (["train.max_iter=0"], "train.max_iter", "must be > 0"),
    (["train.epochs=0", "train.steps=[]"], "train.epochs", "must be > 0"),
    (["train.steps=[8, 8]"], "train.steps", "must be strictly increasing"),
    (["train.steps=[8, 13]"], "train.steps", "inside the schedule, 0 < step < 12 (train.epochs)"),
    (["train.max_iter=100", "train.steps=[50, 100]"], "train.steps", "0 < step < 100 (train.max_iter)"),
    (["train.gamma=0"], "train.gamma", "must lie in (0, 1]"),
    (["train.repeat_threshold=0"], "train.repeat_threshold", "must lie in (0, 1]"),
    (["train.flip_prob=7"], "train.flip_prob", "must lie in [0, 1], got 7.0"),
    (["train.checkpoint_period=0"], "train.checkpoint_period", "must be > 0"),
    (["train.log_period=0"], "train.log_period", "must be > 0"),
    (["train.seed=-1"], "train.seed", "must be >= 0"),
    (["train.threads=-1"], "train.threads", "must be >= 0"),
    (["calibration.steps=0"], "calibration.steps", "must be > 0"),
    (["calibration.decay=[0.9, 0.5]"], "calibration.decay", "must be strictly increasing"),
    (["calibration.decay=[3, 7]"], "calibration.decay", "fractions of calibration.steps, each in (0, 1)"),
    (["calibration.classes_per_batch=0"], "calibration.classes_per_batch", "must be > 0"),
    (["calibration.lr=0"], "calibration.lr", "must be > 0"),
    (["calibration.momentum=-1"], "calibration.momentum", "must be >= 0"),
    (["calibration.momentum=2"], "calibration.momentum", "must be <= 1"),
    (["calibration.weight_decay=-1"], "calibration.weight_decay", "must be >= 0"),
    (["calibration.flip_prob=-0.5"], "calibration.flip_prob", "must lie in [0, 1]"),
    (["calibration.cache_mb=-1"], "calibration.cache_mb", "must be >= 0"),
    (["calibration.miss_batch=0"], "calibration.miss_batch", "must be > 0"),
    (["calibration.checkpoint_period=0"], "calibration.checkpoint_period", "must be > 0"),
    (["calibration.log_period=0"], "calibration.log_period", "must be > 0"),
    (["calibration.seed=-1"], "calibration.seed", "must be >= 0"),
    (["inference.T=-5"], "inference.T", "must be >= 0"),
    (["inference.param=-1"], "inference.param", "must be >= 0"),
    (["data.train_scales=[80, 40]"], "data.train_scales", "must be [lo, hi]"),
    (["data.train_scales=[40]"], "data.train_scales", "must be [lo, hi]"),
    (["data.train_scales=[40.5, 80]"], "data.train_scales", "whole pixels"),
    (["data.train_max_size=0"], "data.train_max_size", "must be > 0"),
    (["train.loss=seesaw", "model.classifier=softmax"], "model.classifier", "trains a seesaw classifier"),
    (["train.loss=focal", "model.classifier=sigmoid"], "model.classifier", "trains a softmax classifier"),
    (["train.loss=fed", "model.cls_prior_prob=1"], "model.cls_prior_prob", "must lie in [0, 1)"),
    (["model.cls_prior_prob=0.01"], "model.cls_prior_prob", "needs train.loss=eqlv2|fed"),
    (["calibration.loss=bags", "calibration.layers=all3"], "calibration.loss", "trains calibration.layers=last1 only"),
]

CHOICE_CASES = [
    ("model.arch", "r101", choices.ARCHS),
    ("model.norm", "ln", choices.NORMS),
    ("train.optimizer", "adam", choices.OPTIMIZERS),
    ("train.loss", "hinge", tuple(choices.LOSSES)),
    ("train.sampler", "bilevel", choices.TRAIN_SAMPLERS),
    ("train.repeat_rounding", "floor", choices.REPEAT_ROUNDING),
    ("calibration.head", "4fc", choices.CALIBRATED_HEADS),
    ("calibration.layers", "last3", choices.LAYERS),
    ("calibration.loss", "hinge", tuple(choices.LOSSES)),
    ("calibration.sampler", "balanced", choices.CALIBRATION_SAMPLERS),
    ("inference.combine", "nope", choices.COMBINERS),
    ("model.roi_heads", "htc2", choices.ROI_HEADS),
    ("calibration.stages", "first", choices.CALIBRATION_STAGES),
    ("model.classifier", "tanh", choices.CLASSIFIERS),
    ("model.cls_head", "cosine", choices.CLS_HEADS),
    ("model.pixel_format", "rgba", choices.PIXEL_FORMATS),
    ("model.resize", "cv2", choices.RESIZES),
    ("model.anchors", "rounded", choices.ANCHORS),
    ("model.proposals", "mmdet1", choices.PROPOSAL_RULES),
    ("model.roi_align", "legacy", choices.ROI_ALIGNS),
]

TYPE_CASES = [
    (["train.steps=[a, b]"], "train.steps", "expected a list of numbers, got ['a', 'b']"),
    (["train.max_iter=1.5"], "train.max_iter", "expected an integer, got 1.5"),
    (["train.base_lr=abc"], "train.base_lr", "expected a finite number, got 'abc'"),
    (["train.base_lr=.inf"], "train.base_lr", "expected a finite number"),
    (["model.class_agnostic=3"], "model.class_agnostic", "expected true or false, got 3"),
    (["train.loss=3"], "train.loss", "expected a string, got 3"),
    (["train.loss_kwargs=[1]"], "train.loss_kwargs", "expected a mapping of names to values"),
    (["train.lr=3"], "train.lr", "unknown key (known: "),
    (["optim.lr=3"], "optim", "unknown key (known: calibration, data, inference, model, train)"),
    (["model.min_size=null"], "model.min_size", "may not be null"),
    (["model.cascade_box_weights=[1, 2]"], "model.cascade_box_weights", "expected a list of lists of numbers"),
]

LOSS_KWARG_CASES = [
    (["train.loss_kwargs={gamma: -1}"], "train.loss_kwargs.gamma", "loss 'ce' takes no 'gamma' (accepted: none)"),
    (["train.loss=focal", "train.loss_kwargs={gamma: -1}"], "train.loss_kwargs.gamma", "must be >= 0, got -1"),
    (["train.loss=focal", "train.loss_kwargs={alpha: 0}"], "train.loss_kwargs.alpha", "must be > 0, got 0"),
    (["train.loss=lr", "train.loss_kwargs={n: 100, m: 2}"], "train.loss_kwargs.m", "accepted: n, lo, hi"),
    (["train.loss=cm", "train.loss_kwargs={c: -6}"], "train.loss_kwargs.c", "must be >= 0"),
    (["calibration.loss=lr", "calibration.loss_kwargs={n: 0}"], "calibration.loss_kwargs.n", "must be > 0"),
    (["calibration.loss=focal", "calibration.loss_kwargs={gamma: x}"], "calibration.loss_kwargs.gamma", "got 'x'"),
    (["train.loss=seesaw", "train.loss_kwargs={p: -1}"], "train.loss_kwargs.p", "must be >= 0"),
    (["train.loss=fed", "train.loss_kwargs={num_classes: 0}"], "train.loss_kwargs.num_classes", "must be >= 1"),
    (["train.loss=bags", "train.loss_kwargs={beta: 0}"], "train.loss_kwargs.beta", "must be > 0"),
]


def _error(overrides: list[str], path: Path | None = None) -> str:
    with pytest.raises(InputError) as e:
        load_config(path, overrides)
    return str(e.value)


@pytest.mark.parametrize("overrides, field, message", RANGE_CASES + TYPE_CASES + LOSS_KWARG_CASES)
def test_each_rule_is_one_line_naming_the_command_line_and_field(overrides, field, message):
    err = _error(overrides)
    assert err.startswith(f"{COMMAND_LINE}: {field}: "), err
    assert message in err and "\n" not in err


@pytest.mark.parametrize("field, bad, allowed", CHOICE_CASES)
def test_every_choice_comes_from_simcal_choices(field, bad, allowed):
    assert _error([f"{field}={bad}"]) == f"{COMMAND_LINE}: {field}: expected one of {', '.join(allowed)}, got {bad!r}"
    for good in allowed:  # every listed name is accepted
        extra = ["train.steps=[]"] if field == "train.sampler" else []
        load_config(None, [f"{field}={good}", *extra])


def test_every_rule_has_a_case():
    """A new rule in config.py without a case above fails here."""
    covered = {field for _, field, _ in RANGE_CASES}
    assert {field for field, _, _ in _checks(Config())} <= covered


@pytest.mark.parametrize("loss", sorted(choices.LOSSES))
def test_loss_kwargs_accept_their_documented_keys(loss):
    kwargs = {key: 2.0 for key in choices.LOSSES[loss].kwargs}
    flow = "{" + ", ".join(f"{k}: {v}" for k, v in kwargs.items()) + "}"
    cfg = load_config(None, [f"train.loss={loss}", f"train.loss_kwargs={flow}", f"calibration.loss={loss}"])
    assert cfg.train.loss_kwargs == kwargs


def test_a_loss_that_implies_its_layers_sets_them_and_says_so(capsys):
    """--loss bags implies the last layer (its LOSSES row): set by default with a line saying so;
    layers the user gave are kept, and refused when they cannot work (RANGE_CASES)."""
    from simcal.config import apply_overrides

    cfg = load_config(None, ["calibration.loss=bags"])
    assert cfg.calibration.layers == "last1"
    assert "calibration.loss=bags trains calibration.layers=last1" in capsys.readouterr().out
    again = apply_overrides(Config(), ["calibration.loss=bags"], "run/config.yaml")
    assert again.calibration.layers == "last1"
    assert load_config(None, ["calibration.loss=bags", "calibration.layers=last1"]).calibration.layers == "last1"
    assert load_config(None, ["calibration.loss=focal"]).calibration.layers == Config().calibration.layers


def test_values_parse_as_yaml_with_exponents_as_numbers():
    cfg = load_config(None, ["train.base_lr=1e-3", "train.steps=[4, 8]", "train.max_iter=10", "train.amp=false"])
    assert cfg.train.base_lr == 0.001 and cfg.train.steps == [4.0, 8.0] and cfg.train.amp is False
    cfg = load_config(None, ["calibration.loss=focal", "calibration.loss_kwargs={gamma: 2, alpha: 0.25}"])
    assert cfg.calibration.loss_kwargs == {"gamma": 2, "alpha": 0.25}


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.max_iter", "overrides look like section.key=value"),
        ("max_iter=3", "overrides look like section.key=value"),
        ("train..max_iter=3", "overrides look like section.key=value"),
    ],
)
def test_malformed_overrides(item, message):
    assert message in _error([item])


def test_an_override_given_twice_with_two_values_is_refused():
    assert "given twice, as 3 and 4" in _error(["train.max_iter=3", "train.max_iter=4"])
    assert load_config(None, ["train.max_iter=3", "train.max_iter=3", "train.steps=[]"]).train.max_iter == 3


def test_errors_name_the_file_that_set_the_value(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"train": {"flip_prob": 2.0}, "model": {"min_size": 64, "max_size": 64}}))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"_base_": "base.yaml", "train": {"base_lr": -1.0}}))
    # the child's own value first
    assert _error([], child) == f"{child}: train.base_lr: must be > 0, got -1.0"
    # a value inherited from the base names the base
    assert _error(["train.base_lr=0.1"], child) == f"{base}: train.flip_prob: must lie in [0, 1], got 2.0"
    # a value from the command line names the command line
    assert _error(["train.base_lr=0.1", "train.flip_prob=0.5", "model.max_size=32"], child).startswith(
        f"{COMMAND_LINE}: model.max_size: must be >= model.min_size (64)"
    )
    # a rule about a value nobody set (a default) names the file being loaded
    child.write_text(yaml.safe_dump({"_base_": "base.yaml", "train": {"flip_prob": 0.5, "max_iter": 5}}))
    assert _error([], child).startswith(f"{child}: train.steps: must lie inside the schedule")


def test_bad_yaml_and_structure_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    assert _error([], bad).startswith(f"{bad}: (yaml): ")
    bad.write_text("- 1\n")
    assert _error([], bad) == f"{bad}: (top level): expected a mapping"
    bad.write_text("train: 3\n")
    assert _error([], bad) == f"{bad}: train: expected a mapping, got 3"
    bad.write_text("_base_: missing.yaml\n")
    assert "missing.yaml: (file): no such config file" in _error([], bad)


def test_scoped_overrides_for_calibrate_and_predict():
    cfg = load_config(None, ["train.steps=[]", "train.max_iter=5"])
    out = apply_overrides(cfg, ["calibration.steps=7"], "run/config.yaml", ("calibration.",))
    assert out.calibration.steps == 7 and cfg.calibration.steps == 12000  # a copy
    with pytest.raises(InputError, match=r"\(command line\): train.max_iter: cannot be overridden here"):
        apply_overrides(cfg, ["train.max_iter=3"], "run/config.yaml", ("calibration.",))
    with pytest.raises(InputError, match=r"\(command line\): calibration.steps: must be > 0"):
        apply_overrides(cfg, ["calibration.steps=0"], "run/config.yaml", ("calibration.",))


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_preset_loads(preset):
    cfg = load_config(REPO / "configs" / preset)
    assert cfg.model.arch in choices.ARCHS
    for key in ("train_json", "val_json", "train_images", "val_images"):
        value = getattr(cfg.data, key)
        assert Path(value).is_absolute(), (key, value)  # relative paths resolve against the preset


def test_presets_inherit_what_they_do_not_set():
    v05 = load_config(REPO / "configs" / "lvis_v0.5_r50_fpn.yaml")
    v1 = load_config(REPO / "configs" / "lvis_v1_r50_fpn.yaml")
    assert v1.train.steps == v05.train.steps == [8.0, 11.0] and v1.train.epochs == 12
    assert v1.data.train_json.endswith("lvis_v1_train.json") and v05.model.detections_per_img == 300


def test_cli_config_error_is_one_line(tmp_path, capsys):
    assert main(["train", "--config", str(REPO / "configs" / "synthetic_cpu.yaml"), "--out", str(tmp_path / "r"),
                 "train.flip_prob=7"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err == "simcal: error: (command line): train.flip_prob: must lie in [0, 1], got 7.0\n"
    assert not (tmp_path / "r").exists()


def test_a_stored_run_config_is_not_held_to_the_new_run_rules():
    """A run trained before steps had to lie inside the schedule keeps loading (predict, calibrate,
    resume with the schedule it started with); every other rule still holds for it."""
    from simcal.config import config_from_dict

    raw = Config().to_dict()
    raw["train"].update(max_iter=100, steps=[450.0, 550.0])
    assert config_from_dict(raw, "run/config.yaml").train.steps == [450.0, 550.0]
    with pytest.raises(InputError, match="run/config.yaml: train.steps: must lie inside the schedule"):
        config_from_dict(raw, "run/config.yaml", stored=False)
    raw["train"]["flip_prob"] = 7.0
    with pytest.raises(InputError, match="run/config.yaml: train.flip_prob: must lie in"):
        config_from_dict(raw, "run/config.yaml")


def test_the_htc_preset_is_the_papers_table_6_setting():
    cfg = load_config(REPO / "configs" / "lvis_v0.5_htc_x101.yaml")
    assert (cfg.model.arch, cfg.model.roi_heads, cfg.model.weights_backbone) == (
        "resnext101_64x4d_fpn",
        "htc",
        "IMAGENET1K_V1",
    )
    assert cfg.train.epochs == 20 and cfg.train.steps == [16.0, 19.0] and cfg.train.base_lr == 0.01
    assert cfg.data.train_scales == [400, 1400] and cfg.data.train_max_size == 1600
    assert (cfg.model.min_size, cfg.model.max_size) == (800, 1333)
    assert cfg.data.train_json.endswith("lvis_v0.5_train.json")


BOUND_CASES = [
    ("train.seed=4294967296", "train.seed", "must be <= 4294967295"),
    ("calibration.seed=18446744073709551616", "calibration.seed", "must be <= 4294967295"),
    ("calibration.steps=1000000000000", "calibration.steps", "must be <= 1000000"),
    ("train.base_lr=1e300", "train.base_lr", "must be <= 1000000"),
    ("calibration.lr=1e300", "calibration.lr", "must be <= 1000000"),
    ("train.batch_size=1000000000", "train.batch_size", "must be <= 65536"),
    ("model.min_size=100000", "model.min_size", "must be <= 16384"),
    ("train.threads=100000", "train.threads", "must be <= 1024"),
    ("data.num_workers=100000", "data.num_workers", "must be <= 256"),
    ("train.max_iter=10000000000", "train.max_iter", "must be <= 1000000000"),
    ("inference.T=1e300", "inference.T", "must be <= 1e+15"),
    ("train.loss=focal;train.loss_kwargs={gamma: 1.0e+300}", "train.loss_kwargs", "must be <= 1e+15"),
    ("data.train_scales=[100, 100000]", "data.train_scales", "must be <= 16384"),
]


@pytest.mark.parametrize("overrides, field, message", BOUND_CASES)
def test_every_number_has_an_upper_bound_the_machine_holds(overrides, field, message):
    err = _error(overrides.split(";"))
    assert err.startswith(f"{COMMAND_LINE}: {field}: {message} (what memory and the machine's numbers hold)"), err
