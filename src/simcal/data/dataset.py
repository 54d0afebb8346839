"""COCO / LVIS images and annotations as torchvision detection inputs.

:class:`DetectionDataset` turns a validated dataset dict (see
:func:`simcal.data.annotations.load_dataset`) into the ``(image, target)`` pairs torchvision's
Mask R-CNN trains on:

* ``image``: ``float32`` tensor ``(3, H, W)`` in ``[0, 1]``;
* ``target["boxes"]``: ``float32`` ``(N, 4)`` ``[x1, y1, x2, y2]`` in pixels;
* ``target["labels"]``: ``int64`` ``(N,)``, contiguous labels ``1..C`` (0 is background);
* ``target["masks"]``: ``uint8`` ``(N, H, W)`` binary masks.

Category ids (arbitrary, non-contiguous in LVIS and COCO) map to contiguous labels through a
:class:`LabelMap`, which the trainer stores in the run directory so that inference maps the
predicted labels back to the same ids.

Random horizontal flips are decided by the samplers, not here: an item is addressed by
``index`` or ``(index, flip)``, so a run is deterministic and resumable whatever the number of
data-loader workers.
"""

from __future__ import annotations

import operator
import signal
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import Tensor

from simcal.data.annotations import image_path
from simcal.data.label_map import LabelMap
from simcal.errors import InputError, SimcalError

__all__ = ["DetectionDataset", "LabelMap", "collate", "data_loader"]


def _rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB (alpha dropped, palette expanded, greyscale replicated; 16-bit
    greyscale by its high byte, where ``convert`` would clip every value above 255 to white)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img.convert("RGB")


class DetectionDataset(torch.utils.data.Dataset):
    """Images and instance annotations of a COCO/LVIS dict, in torchvision's detection format.

    ``dataset[i]`` or ``dataset[(i, flip)]`` returns ``(image, target)``:

    * ``image``: ``float32`` ``(3, H, W)`` in ``[0, 1]``, RGB;
    * ``target["boxes"]``: ``float32`` ``(N, 4)`` ``x1, y1, x2, y2`` pixels, clipped to the image;
    * ``target["labels"]``: ``int64`` ``(N,)`` in ``1..C``;
    * ``target["masks"]``: ``uint8`` ``(N, H, W)`` of 0/1 (only when ``with_masks``);
    * ``target["image_id"]``: ``int64`` scalar, the COCO image id;
    * ``target["area"]``: ``float32`` ``(N,)``, the annotations' ``area``;
    * ``target["iscrowd"]``: ``int64`` ``(N,)``, all 0 (crowd regions are dropped);
    * ``target["flipped"]``: Python ``bool``, whether the item was mirrored horizontally.

    ``H, W`` are the image's ``height`` and ``width`` from the json. Crowd annotations and boxes
    narrower or shorter than 1 px (after clipping to the image) are left out, in json order
    otherwise. ``N`` may be 0.
    """

    def __init__(
        self,
        dataset: dict[str, Any],
        image_root: str | Path,
        *,
        label_map: LabelMap | None = None,
        with_masks: bool = True,
        source: str = "<annotations>",
    ) -> None:
        """
        Args:
            dataset: a dict validated by :func:`simcal.data.annotations.validate_dataset`.
            image_root: folder the images' ``file_name`` (or ``coco_url`` tail) is relative to.
            label_map: the map to use (e.g. the training set's for a validation set); by
                default :meth:`LabelMap.from_dataset`.
            with_masks: decode instance masks; ``False`` for box-only training (faster).
            source: the annotation file's name, used in error messages.

        Raises:
            InputError: an annotation's category is missing from ``label_map``.
        """
        self.image_root = Path(image_root)
        self.label_map = label_map if label_map is not None else LabelMap.from_dataset(dataset)
        self.with_masks = with_masks
        self.source = str(source)
        self._images: list[dict[str, Any]] = list(dataset["images"])
        by_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in self._images}
        for i, ann in enumerate(dataset["annotations"]):
            if ann.get("iscrowd", 0):
                continue
            if ann["category_id"] not in self.label_map:
                raise InputError(
                    self.source,
                    f"annotations[{i}].category_id",
                    f"category id {ann['category_id']} is not in the run's label map: label_map.json and these "
                    "annotations are from different datasets",
                )
            if ann["image_id"] in by_image:
                by_image[ann["image_id"]].append(ann)
        self._anns: list[list[dict[str, Any]]] = [by_image[img["id"]] for img in self._images]

    def __len__(self) -> int:
        return len(self._images)

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids, in the order of ``dataset["images"]`` (the order of the indices)."""
        return [img["id"] for img in self._images]

    def image_info(self, index: int) -> dict[str, Any]:
        """The json ``images`` entry of item ``index``."""
        return self._images[index]

    def _parse_key(self, key: int | tuple[int, bool]) -> tuple[int, bool]:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise TypeError(f"expected index or (index, flip), got {key!r}")
            index, flip = operator.index(key[0]), bool(key[1])
        else:
            index, flip = operator.index(key), False
        n = len(self._images)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        return index, flip

    def load_image(self, index: int) -> Tensor:
        """Image ``index`` as ``float32`` ``(3, H, W)`` in ``[0, 1]``, not flipped.

        Raises:
            InputError: the file is missing or unreadable, or its size differs from the json's.
        """
        info = self._images[index]
        path = image_path(info, self.image_root)
        key = "file_name" if info.get("file_name") else "coco_url"
        field = f"images[id={info['id']}].{key}"
        try:
            with Image.open(path) as img:
                size = img.size
                if size != (info["width"], info["height"]):
                    raise InputError(
                        path,
                        f"images[id={info['id']}]",
                        f"image is {size[0]}x{size[1]} (width x height) but the json says "
                        f"{info['width']}x{info['height']}",
                    )
                array = np.array(_rgb(img), dtype=np.uint8)
        except FileNotFoundError:
            raise InputError(path, field, "cannot read image: no such file") from None
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            reason = str(e) or type(e).__name__
            raise InputError(path, field, f"cannot read image: {reason}") from None
        return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div_(255.0)

    def _mask(self, ann: dict[str, Any], index: int, h: int, w: int) -> np.ndarray:
        """Binary ``uint8`` ``(h, w)`` mask of one annotation (its box when it has no mask)."""
        seg = ann.get("segmentation")
        if not seg:
            x, y, bw, bh = ann["bbox"]
            mask = np.zeros((h, w), dtype=np.uint8)
            x1, y1 = max(int(np.floor(x)), 0), max(int(np.floor(y)), 0)
            x2, y2 = min(int(np.ceil(x + bw)), w), min(int(np.ceil(y + bh)), h)
            mask[y1:y2, x1:x2] = 1
            return mask
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        else:
            if list(seg["size"]) != [h, w]:
                raise InputError(
                    self.source,
                    f"annotations[id={ann.get('id')}].segmentation.size",
                    f"RLE size {list(seg['size'])} differs from image "
                    f"{self._images[index]['id']}'s [height, width] [{h}, {w}]",
                )
            rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
        try:
            return mask_utils.decode(rle).astype(np.uint8, copy=False)
        except ValueError:  # pycocotools: "Invalid RLE mask representation"
            raise InputError(
                self.source,
                f"annotations[id={ann.get('id')}].segmentation.counts",
                f"not a valid RLE of image {self._images[index]['id']}'s {h}x{w} pixels (height x width)",
            ) from None

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[Tensor, dict[str, Any]]:
        """``(image (3, H, W) float32, target)`` of ``key``: ``index`` or ``(index, flip)``."""
        index, flip = self._parse_key(key)
        info = self._images[index]
        h, w = info["height"], info["width"]
        image = self.load_image(index)

        boxes: list[list[float]] = []
        labels: list[int] = []
        areas: list[float] = []
        kept: list[dict[str, Any]] = []
        for ann in self._anns[index]:
            x, y, bw, bh = ann["bbox"]
            x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
            x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
            if x2 - x1 < 1 or y2 - y1 < 1:
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self.label_map.to_label(ann["category_id"]))
            areas.append(float(ann.get("area", bw * bh)))
            kept.append(ann)

        n = len(kept)
        boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(n, 4)
        target: dict[str, Any] = {
            "boxes": boxes_t,
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": torch.tensor(info["id"], dtype=torch.int64),
            "area": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.zeros(n, dtype=torch.int64),
            "flipped": flip,
        }
        if self.with_masks:
            if n:
                masks = np.stack([self._mask(ann, index, h, w) for ann in kept])
            else:
                masks = np.zeros((0, h, w), dtype=np.uint8)
            target["masks"] = torch.from_numpy(masks)

        if flip:
            image = image.flip(-1)
            if n:
                target["boxes"] = torch.stack(
                    [w - boxes_t[:, 2], boxes_t[:, 1], w - boxes_t[:, 0], boxes_t[:, 3]], dim=1
                )
            if self.with_masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def collate(
    batch: Iterable[tuple[Tensor, dict[str, Any]]],
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """DataLoader ``collate_fn``: ``[(image, target), ...]`` -> ``([image, ...], [target, ...])``.

    Images keep their own sizes ``(3, H_i, W_i)``; torchvision's detection models batch them.
    """
    images: list[Tensor] = []
    targets: list[dict[str, Any]] = []
    for image, target in batch:
        images.append(image)
        targets.append(target)
    return images, targets


class _Failed:
    """A :class:`~simcal.errors.SimcalError` raised while loading an item, carried as a value.

    torch re-raises an exception from a worker process as a new exception holding the worker's
    traceback as text; carried as a value instead, the original error (file, field, message)
    reaches the main process as itself.
    """

    def __init__(self, error: SimcalError) -> None:
        self.error = error


class _Guarded(torch.utils.data.Dataset):
    """``dataset`` whose items are :class:`_Failed` where loading raised a :class:`SimcalError`."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        try:
            return self.dataset[key]
        except SimcalError as e:
            return _Failed(e)


class _GuardedCollate:
    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, batch: list[Any]) -> Any:
        failed = next((item for item in batch if isinstance(item, _Failed)), None)
        return failed if failed is not None else self.collate_fn(batch)


class _Loader:
    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if isinstance(batch, _Failed):
                raise batch.error
            yield batch


class _WorkerInit:
    """A loader worker's start: SIGTERM back to its default (the worker ends at once, silently),
    then the caller's ``worker_init_fn``. A forked worker inherits the command's SIGTERM handler
    (:func:`simcal.errors.handle_sigterm`), which would print a traceback from the worker when
    the loader, shutting down after the command stopped, terminates a worker slow to join."""

    def __init__(self, then: Callable[[int], None] | None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self.then is not None:
            self.then(worker_id)


def data_loader(dataset: Any, *, collate_fn: Callable[[list[Any]], Any] = collate, **kwargs: Any) -> Iterable[Any]:
    """A torch ``DataLoader`` over ``dataset`` (``kwargs`` as DataLoader's) whose errors stay ours.

    A bad image or annotation raises its :class:`~simcal.errors.InputError` (file, field, what is
    wrong) from the loop in the main process, with any number of workers, where torch's own loader
    would raise a worker traceback. Batches are ``collate_fn``'s (default :func:`collate`). Workers
    end silently on SIGTERM (:class:`_WorkerInit`).
    """
    kwargs["worker_init_fn"] = _WorkerInit(kwargs.get("worker_init_fn"))
    return _Loader(torch.utils.data.DataLoader(_Guarded(dataset), collate_fn=_GuardedCollate(collate_fn), **kwargs))
