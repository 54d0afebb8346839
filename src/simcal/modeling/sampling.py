"""Anchor / RoI sub-sampling that is a pure function of a per-image seed.

torchvision's :class:`BalancedPositiveNegativeSampler` draws from the global RNG, so which RoIs
an image trains on depends on the other images in the process's batch. With per-image seeds
(derived by the trainer from the run seed, the iteration and the image's place in the GLOBAL
batch, :mod:`simcal.seeds`) the draw is the same whether the batch runs in one process or is
split over N DDP processes, which is what makes multi-process training match single-process
training.

The seeds of a forward pass are set with :func:`sampling_seeds`, a context manager that puts
the samplers back as they were when the block ends, error or not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from simcal import seeds as streams


class SeededBalancedSampler(BalancedPositiveNegativeSampler):
    """Fixed positive fraction per image, drawn with ``seeds[i]`` for image i when seeds are set.

    Without seeds it behaves exactly like torchvision's sampler (global RNG).
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        super().__init__(batch_size_per_image, positive_fraction)
        self.seeds: list[int] | None = None

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if self.seeds is None:
            return super().__call__(matched_idxs)
        return self.sample(matched_idxs, self.seeds)

    def sample(self, matched_idxs: list[Tensor], seeds: Sequence[int]) -> tuple[list[Tensor], list[Tensor]]:
        """Positive and negative masks per image (uint8, like torchvision's), image i drawn from ``seeds[i]``.

        Args:
            matched_idxs: per image ``(N_i,)``: ``>= 1`` positive, ``0`` negative, ``-1`` ignored.
        """
        if len(seeds) != len(matched_idxs):
            raise RuntimeError(f"{len(seeds)} sampling seeds for {len(matched_idxs)} images")
        pos_idx, neg_idx = [], []
        for seed, matched in zip(seeds, matched_idxs):
            g = torch.Generator().manual_seed(seed)
            positive = torch.where(matched >= 1)[0]
            negative = torch.where(matched == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            perm1 = torch.randperm(positive.numel(), generator=g)[:num_pos].to(positive.device)
            perm2 = torch.randperm(negative.numel(), generator=g)[:num_neg].to(negative.device)
            pos_mask = torch.zeros_like(matched, dtype=torch.uint8)
            neg_mask = torch.zeros_like(matched, dtype=torch.uint8)
            pos_mask[positive[perm1]] = 1
            neg_mask[negative[perm2]] = 1
            pos_idx.append(pos_mask)
            neg_idx.append(neg_mask)
        return pos_idx, neg_idx


def install_seeded_samplers(model: nn.Module) -> None:
    """Swap the RPN's and the RoI heads' samplers for :class:`SeededBalancedSampler` (same settings)."""
    for owner in (model.rpn, model.roi_heads):
        old = owner.fg_bg_sampler
        owner.fg_bg_sampler = SeededBalancedSampler(old.batch_size_per_image, old.positive_fraction)


@contextmanager
def sampling_seeds(model: nn.Module, image_seeds: Sequence[int]) -> Iterator[None]:
    """Within the block, training forwards sample each image's anchors and RoIs from its seed.

    ``image_seeds``: one per image of the forward (:func:`simcal.seeds.slot_seed`); the RPN and the
    RoI heads draw from two streams of it (:func:`simcal.seeds.sampler_seed`). The samplers'
    previous seeds come back when the block ends, also on an error.
    """
    owners = ((model.rpn, streams.RPN_SAMPLING), (model.roi_heads, streams.ROI_SAMPLING))
    samplers = [(owner.fg_bg_sampler, stage) for owner, stage in owners]
    if not all(isinstance(s, SeededBalancedSampler) for s, _ in samplers):
        raise TypeError("the model's samplers are not seeded: build it with simcal.modeling.detector")
    before = [s.seeds for s, _ in samplers]
    try:
        for sampler, stage in samplers:
            sampler.seeds = [streams.sampler_seed(s, stage) for s in image_seeds]
        yield
    finally:
        for (sampler, _), old in zip(samplers, before):
            sampler.seeds = old
