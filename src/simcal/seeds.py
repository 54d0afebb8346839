"""Every random stream of simcal, named in one place.

Each draw is a pure function of the run seed and of where it happens (iteration or step, the
image's position in the GLOBAL batch), never of the process, the number of processes or the
data-loader workers: that is what makes a resumed run, or a run over N processes, give the same
numbers as one uninterrupted process. The stream ids below are part of that contract: changing
one changes every trained weight, so they are constants, not settings.

The data order (:mod:`simcal.data.samplers`) draws from :func:`data_order`, keyed by two numbers;
the flips from keys of three, so no two streams share a key.
"""

from __future__ import annotations

import numpy as np

#: stream id of the horizontal flips of normal training: ``default_rng([seed, iteration, 1])``
TRAIN_FLIP = 1
#: stream id of the horizontal flips of calibration: ``default_rng([seed, step, 3])``
CALIBRATION_FLIP = 3
#: the "position" whose slot seed picks the background RoIs a calibration step keeps (1:1)
CALIBRATION_BACKGROUND = 10**6
#: per image, the RPN's anchor sampling and the RoI heads' RoI sampling draw from two streams of
#: the image's slot seed: ``2 * seed + stage``
RPN_SAMPLING, ROI_SAMPLING = 0, 1
#: stream id of HTC's per-stage re-sampling: ``SeedSequence([roi_seed, stage, 5])``
HTC_RESAMPLING = 5
#: stream ids of the losses' own draws (the federated class subset, BAGS's "others"), keyed by the
#: loss's call counter: ``SeedSequence([stream, call])``
FED_CLASSES, BAGS_OTHERS = 11, 12


def data_order(seed: int, index: int) -> np.random.Generator:
    """The generator of the data order of epoch (or calibration step) ``index``: ``default_rng([seed, index])``."""
    return np.random.default_rng([seed, index])


def slot_seed(seed: int, step: int, position: int) -> int:
    """The seed of the image at ``position`` of the global batch of ``step`` (a uint32)."""
    return int(np.random.SeedSequence([seed, step, position]).generate_state(1)[0])


def flips(seed: int, step: int, stream: int, n: int, prob: float) -> list[bool]:
    """``n`` horizontal flips of ``step`` (each with probability ``prob``) from ``stream``."""
    return [bool(f) for f in np.random.default_rng([seed, step, stream]).random(n) < prob]


def sampler_seed(image_seed: int, stage: int) -> int:
    """The seed the RPN (``stage = RPN_SAMPLING``) or the RoI heads (``ROI_SAMPLING``) sample with."""
    return image_seed * 2 + stage


def stage_resampling_seed(roi_seed: int, stage: int) -> int:
    """The seed with which HTC re-samples an image's RoIs at box ``stage`` (0-based) for
    that stage's mask head, from the image's RoI-sampling seed (:func:`sampler_seed`)."""
    return int(np.random.SeedSequence([roi_seed, stage, HTC_RESAMPLING]).generate_state(1)[0])


def loss_draw_seed(stream: int, call: int) -> int:
    """The seed of a loss's ``call``-th random draw from ``stream`` (:data:`FED_CLASSES`, :data:`BAGS_OTHERS`)."""
    return int(np.random.SeedSequence([stream, call]).generate_state(1)[0])
