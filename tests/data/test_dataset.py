from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from simcal.data.annotations import validate_dataset
from simcal.data.dataset import DetectionDataset, LabelMap, collate
from simcal.errors import InputError

# pycocotools' Cython decode trips numpy 2's copy-keyword deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

W, H = 40, 30
RED, GREEN = (255, 0, 0), (0, 255, 0)


def _rect(x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    """(H, W) uint8 mask of the half-open pixel rectangle [x1, x2) x [y1, y2)."""
    m = np.zeros((H, W), dtype=np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths of the column-major pixels, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": [H, W], "counts": [int(c) for c in counts]}


def _compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def make_dataset(root: Path) -> dict[str, Any]:
    """Four 40x30 images on disk and a COCO dict with non-contiguous category ids 3, 7, 10.

    * image 11 (a.png, RGB): red polygon box (cat 3), green compressed-RLE box (cat 7),
      a crowd region and a degenerate (0.5 px wide) box, both to be dropped;
    * image 12 (grey.png, mode L): one uncompressed-RLE box (cat 10);
    * image 13 (empty.png, RGBA): no annotations;
    * image 14 (LVIS v1: only coco_url -> val2017/000000000014.jpg): a polygon (cat 7) running
      off the right border, clipped to the image.
    """
    a = np.zeros((H, W, 3), dtype=np.uint8)
    a[4:14, 5:15] = RED
    a[10:25, 20:32] = GREEN
    Image.fromarray(a).save(root / "a.png")
    grey = np.full((H, W), 40, dtype=np.uint8)
    grey[3:9, 2:12] = 200
    Image.fromarray(grey, mode="L").save(root / "grey.png")
    Image.new("RGBA", (W, H), (10, 20, 30, 128)).save(root / "empty.png")
    (root / "val2017").mkdir()
    Image.new("RGB", (W, H), (0, 0, 255)).save(root / "val2017" / "000000000014.jpg")

    data = {
        "images": [
            {"id": 11, "width": W, "height": H, "file_name": "a.png"},
            {"id": 12, "width": W, "height": H, "file_name": "grey.png"},
            {"id": 13, "width": W, "height": H, "file_name": "empty.png"},
            {"id": 14, "width": W, "height": H, "coco_url": "http://images.cocodataset.org/val2017/000000000014.jpg"},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 11,
                "category_id": 3,
                "bbox": [5, 4, 10, 10],
                "segmentation": [[5, 4, 15, 4, 15, 14, 5, 14]],
            },
            {
                "id": 2,
                "image_id": 11,
                "category_id": 10,
                "bbox": [0, 0, 6, 6],
                "iscrowd": 1,
                "segmentation": _uncompressed_rle(_rect(0, 0, 6, 6)),
            },
            {
                "id": 3,
                "image_id": 11,
                "category_id": 7,
                "bbox": [20, 10, 12, 15],
                "segmentation": _compressed_rle(_rect(20, 10, 32, 25)),
            },
            {
                "id": 4,
                "image_id": 11,
                "category_id": 3,
                "bbox": [30, 2, 0.5, 10],
                "segmentation": [[30, 2, 30.5, 2, 30.5, 12, 30, 12]],
            },
            {
                "id": 5,
                "image_id": 12,
                "category_id": 10,
                "bbox": [2, 3, 10, 6],
                "segmentation": _uncompressed_rle(_rect(2, 3, 12, 9)),
            },
            {
                "id": 6,
                "image_id": 14,
                "category_id": 7,
                "bbox": [30, 20, 15, 5],
                "segmentation": [[30, 20, 45, 20, 45, 25, 30, 25]],
            },
        ],
        "categories": [
            {"id": 10, "name": "ten"},
            {"id": 3, "name": "three"},
            {"id": 7, "name": "seven"},
        ],
    }
    return validate_dataset(data, "tiny.json")


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Any]:
    return make_dataset(tmp_path)


@pytest.fixture
def ds(data: dict[str, Any], tmp_path: Path) -> DetectionDataset:
    return DetectionDataset(data, tmp_path, source="tiny.json")


def _mask_box(mask: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


# --- LabelMap -------------------------------------------------------------------------------


def test_label_map_contiguous_in_id_order(data):
    lm = LabelMap.from_dataset(data)
    assert lm.num_classes == 3
    assert lm.category_ids == [3, 7, 10]
    assert lm.names == ["three", "seven", "ten"]
    assert [lm.to_label(c) for c in (3, 7, 10)] == [1, 2, 3]
    assert [lm.to_category(label) for label in (1, 2, 3)] == [3, 7, 10]
    assert 7 in lm and 5 not in lm
    for bad in (0, 4):
        with pytest.raises(KeyError):
            lm.to_category(bad)
    with pytest.raises(KeyError):
        lm.to_label(5)
    with pytest.raises(ValueError):
        LabelMap([1, 1])


def test_label_map_save_load_round_trip(data, tmp_path):
    lm = LabelMap.from_dataset(data)
    path = tmp_path / "run" / "label_map.json"
    lm.save(path)
    back = LabelMap.load(path)
    assert back == lm
    assert back.category_ids == [3, 7, 10] and back.names == ["three", "seven", "ten"]
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize(
    "content, field",
    [
        ("{not json", "(json)"),
        ("[1, 2]", "format"),
        ('{"format": "simcal-label-map", "version": 9, "categories": []}', "version"),
        ('{"format": "simcal-label-map", "version": 1, "categories": {}}', "categories"),
        (
            '{"format": "simcal-label-map", "version": 1, "categories": [{"label": 2, "id": 3, "name": "a"}]}',
            "categories[0].label",
        ),
        (
            '{"format": "simcal-label-map", "version": 1, "categories": [{"label": 1, "id": "3", "name": "a"}]}',
            "categories[0].id",
        ),
        (
            '{"format": "simcal-label-map", "version": 1, "categories": '
            '[{"label": 1, "id": 7, "name": "a"}, {"label": 2, "id": 3, "name": "b"}]}',
            "categories[1].id",
        ),
    ],
)
def test_label_map_load_malformed(tmp_path, content, field):
    path = tmp_path / "label_map.json"
    path.write_text(content)
    with pytest.raises(InputError) as err:
        LabelMap.load(path)
    assert err.value.field == field
    assert err.value.source == str(path)


# --- targets --------------------------------------------------------------------------------


def test_image_and_target_types(ds):
    assert len(ds) == 4
    assert ds.image_ids == [11, 12, 13, 14]
    image, target = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert set(target) == {"boxes", "labels", "masks", "image_id", "area", "iscrowd", "flipped"}
    assert target["boxes"].dtype == torch.float32
    assert target["labels"].dtype == torch.int64
    assert target["masks"].dtype == torch.uint8
    assert target["image_id"].dtype == torch.int64 and target["image_id"].shape == ()
    assert int(target["image_id"]) == 11
    assert target["iscrowd"].tolist() == [0, 0]
    assert target["flipped"] is False
    # pixels: red rectangle at [5, 15) x [4, 14)
    assert image[:, 4, 5].tolist() == [1.0, 0.0, 0.0]
    assert image[:, 0, 0].tolist() == [0.0, 0.0, 0.0]


def test_boxes_xyxy_labels_mapped_crowd_and_degenerate_dropped(ds):
    _, target = ds[0]
    # annotations 1 (polygon, cat 3) and 3 (compressed RLE, cat 7); crowd 2 and 0.5 px 4 dropped
    assert target["boxes"].tolist() == [[5, 4, 15, 14], [20, 10, 32, 25]]
    assert target["labels"].tolist() == [1, 2]
    assert target["area"].tolist() == [100.0, 180.0]


def test_masks_equal_painted_rectangles(ds):
    _, target = ds[0]
    masks = target["masks"]
    assert masks.shape == (2, H, W)
    assert torch.equal(masks[0], torch.from_numpy(_rect(5, 4, 15, 14)))  # polygon
    assert torch.equal(masks[1], torch.from_numpy(_rect(20, 10, 32, 25)))  # compressed RLE
    _, target = ds[1]
    assert torch.equal(target["masks"][0], torch.from_numpy(_rect(2, 3, 12, 9)))  # list RLE
    assert target["labels"].tolist() == [3]
    for i, box in enumerate(ds[0][1]["boxes"].tolist()):
        assert _mask_box(ds[0][1]["masks"][i]) == box


def test_greyscale_and_rgba_become_rgb(ds):
    image, _ = ds[1]
    assert image.shape == (3, H, W)
    assert torch.allclose(image[:, 5, 5], torch.full((3,), 200 / 255))
    assert torch.allclose(image[:, 20, 20], torch.full((3,), 40 / 255))
    image, _ = ds[2]
    assert image.shape == (3, H, W)
    assert torch.allclose(image[:, 0, 0], torch.tensor([10, 20, 30]) / 255)


def test_image_without_annotations(ds):
    _, target = ds[2]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["masks"].shape == (0, H, W) and target["masks"].dtype == torch.uint8
    assert target["area"].shape == (0,) and target["iscrowd"].shape == (0,)
    _, flipped = ds[(2, True)]
    assert flipped["boxes"].shape == (0, 4) and flipped["masks"].shape == (0, H, W)


def test_lvis_v1_coco_url_image_and_box_clipped(ds):
    image, target = ds[3]
    assert image.shape == (3, H, W)
    assert int(target["image_id"]) == 14
    assert target["boxes"].tolist() == [[30, 20, W, 25]]
    assert target["labels"].tolist() == [2]
    assert _mask_box(target["masks"][0]) == [30, 20, W, 25]


def test_without_masks(data, tmp_path):
    ds = DetectionDataset(data, tmp_path, with_masks=False)
    _, target = ds[0]
    assert "masks" not in target
    assert target["boxes"].shape == (2, 4)
    _, target = ds[(0, True)]
    assert target["boxes"].tolist() == [[W - 15, 4, W - 5, 14], [W - 32, 10, W - 20, 25]]


# --- flip -----------------------------------------------------------------------------------


def test_flip_mirrors_image_boxes_and_masks(ds):
    image, target = ds[0]
    fimage, ftarget = ds[(0, True)]
    assert ftarget["flipped"] is True
    assert torch.equal(fimage, image.flip(-1))
    assert ftarget["boxes"].tolist() == [[W - 15, 4, W - 5, 14], [W - 32, 10, W - 20, 25]]
    assert torch.equal(ftarget["masks"], target["masks"].flip(-1))
    for mask, box in zip(ftarget["masks"], ftarget["boxes"].tolist(), strict=True):
        assert np.allclose(_mask_box(mask), box, atol=1)
    # the red object's pixels are under its flipped mask
    red = (fimage[0] == 1) & (fimage[1] == 0)
    assert torch.equal(red, ftarget["masks"][0].bool())
    assert torch.equal(ftarget["labels"], target["labels"])
    assert torch.equal(ftarget["area"], target["area"])


def test_index_forms(ds):
    assert int(ds[-1][1]["image_id"]) == 14
    assert ds[(1, False)][1]["flipped"] is False
    assert ds[(np.int64(1), np.bool_(True))][1]["flipped"] is True
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(TypeError):
        ds[(0, True, 1)]


# --- errors ---------------------------------------------------------------------------------


def test_missing_image_names_path_and_field(data, tmp_path):
    (tmp_path / "grey.png").unlink()
    ds = DetectionDataset(data, tmp_path)
    with pytest.raises(InputError) as err:
        ds[1]
    assert err.value.source == str(tmp_path / "grey.png")
    assert err.value.field == "images[id=12].file_name"
    assert "cannot read image" in str(err.value)


def test_unreadable_image(data, tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"images\[id=11\].file_name: cannot read image"):
        DetectionDataset(data, tmp_path)[0]


def test_image_size_differs_from_json(data, tmp_path):
    Image.new("RGB", (W + 1, H)).save(tmp_path / "a.png")
    with pytest.raises(InputError, match="41x30") as err:
        DetectionDataset(data, tmp_path)[0]
    assert err.value.source == str(tmp_path / "a.png")


def test_rle_size_differs_from_image(data, tmp_path):
    bad = copy.deepcopy(data)
    bad["annotations"][2]["segmentation"]["size"] = [H, W + 1]
    with pytest.raises(InputError, match="RLE size"):
        DetectionDataset(bad, tmp_path)[0]


def test_label_map_missing_a_category(data, tmp_path):
    with pytest.raises(InputError, match="not in the run.s label map") as err:
        DetectionDataset(data, tmp_path, label_map=LabelMap([3, 10]), source="val.json")
    assert err.value.source == "val.json"
    assert err.value.field == "annotations[2].category_id"


# --- collate --------------------------------------------------------------------------------


def test_collate_through_dataloader(ds):
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, sampler=[(0, True), (2, False), (1, False)], collate_fn=collate
    )
    batches = list(loader)
    assert len(batches) == 2
    images, targets = batches[0]
    assert isinstance(images, list) and isinstance(targets, list)
    assert [im.shape for im in images] == [(3, H, W), (3, H, W)]
    assert [int(t["image_id"]) for t in targets] == [11, 13]
    assert [t["flipped"] for t in targets] == [True, False]
    assert collate([]) == ([], [])


def test_targets_accepted_by_torchvision_mask_rcnn(ds):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=ds.label_map.num_classes + 1,
        min_size=32,
        max_size=64,
    )
    model.train()
    images, targets = collate([ds[(0, True)], ds[2]])
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_label_map_file_is_json_with_names(data, tmp_path):
    path = tmp_path / "lm.json"
    LabelMap.from_dataset(data).save(path)
    stored = json.loads(path.read_text())
    assert stored["categories"][0] == {"label": 1, "id": 3, "name": "three"}
