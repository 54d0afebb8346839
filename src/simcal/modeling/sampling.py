"""Anchor / RoI sub-sampling that is a pure function of a per-image seed.

torchvision's :class:`BalancedPositiveNegativeSampler` draws from the global RNG, so which RoIs
an image trains on depends on the other images in the process's batch. With per-image seeds
(derived by the trainer from the run seed, the iteration and the image's place in the GLOBAL
batch) the draw is the same whether the batch runs in one process or is split over N DDP
processes, which is what makes multi-process training match single-process training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler


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
        if len(self.seeds) != len(matched_idxs):
            raise RuntimeError(f"{len(self.seeds)} sampling seeds for {len(matched_idxs)} images")
        pos_idx, neg_idx = [], []
        for seed, matched in zip(self.seeds, matched_idxs):
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


def set_sampling_seeds(model: nn.Module, seeds: list[int] | None) -> None:
    """Per-image seeds for the next training forward (``None``: back to the global RNG)."""
    for owner in (model.rpn, model.roi_heads):
        sampler = owner.fg_bg_sampler
        if isinstance(sampler, SeededBalancedSampler):
            # the RPN and the RoI heads draw from different streams of the same image seed
            sampler.seeds = None if seeds is None else [s * 2 + (owner is model.roi_heads) for s in seeds]
