"""Object-detection building blocks: the YOLO model, loss and decoding, the shapes dataset, readers and
checks, box-aware augmentation and COCO-style mAP. Pure PyTorch/numpy, no Ray."""

from __future__ import annotations

import json
import math
import pickle
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from ptm_ray.datasets.shapes import CLASSES, make_shapes
from ptm_ray.detection_data import augment, check_records, letterbox, read_coco, read_yolo, unletterbox
from ptm_ray.detection_metrics import MeanAP
from ptm_ray.freeze import block_of_parameters, freeze
from ptm_ray.models.yolo import STRIDES, YOLO, YOLOLoss, postprocess, replace_head, yolo_blocks

TINY = {"width": 0.125, "depth": 0.33}  # channels 8..128, one bottleneck per C2f: fast on 2 cores


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convs gain nothing from a second thread, and on a busy 2-core machine OpenMP threads waiting
    for each other make a step 10-20x slower; one thread keeps the overfit test at ~50 ms a step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- model --------------------------------------------------------------------------------------------------


def test_forward_gives_one_map_per_stride_and_config_rebuilds_it():
    model = YOLO(3, **TINY)
    outputs = model(torch.zeros(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outputs] == [(2, 4 * 16 + 3, 64 // s, 96 // s) for s in STRIDES]
    widths = [m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and "pred" not in n]
    assert all(w % 8 == 0 and w >= 8 for w in widths)
    rebuilt = YOLO(**model.config)
    rebuilt.load_state_dict(model.state_dict())  # strict: same names and shapes
    assert YOLO(3, width=0.01).stem[0].out_channels == 8


def test_blocks_cover_every_non_head_parameter_once_in_order():
    model = YOLO(3, **TINY)
    blocks = yolo_blocks(model)
    assert [b.name for b in blocks] == ["stem", "stage1", "stage2", "stage3", "stage4", "neck", "head_shared"]
    owner = block_of_parameters(model, blocks)  # raises if a parameter is in two blocks
    head = sorted(n for n, i in owner.items() if i < 0)
    assert head == sorted(n for n, _ in model.named_parameters() if n.startswith("head.cls_pred."))
    assert len(head) == 2 * len(STRIDES)  # weight and bias per stride
    indices = [i for i in owner.values() if i >= 0]
    assert indices == sorted(indices) and set(indices) == set(range(len(blocks)))
    assert any(n.startswith("stage4.2.") for n, i in owner.items() if i == 4)  # SPPF sits in stage4
    freeze(model, blocks, len(blocks))
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == head


def test_replace_head_changes_only_the_class_convs():
    model = YOLO(3, **TINY)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    replace_head(model, 5)
    after = dict(model.named_parameters())
    for name, value in before.items():
        if name.startswith("head.cls_pred."):
            assert after[name].shape[0] == 5
        else:
            assert torch.equal(after[name], value), name
    for conv, stride in zip(model.head.cls_pred, STRIDES):
        assert torch.allclose(conv.bias, torch.full((5,), math.log(5 / 5 / (640 / stride) ** 2)))
    assert model.config["num_classes"] == 5 and model(torch.zeros(2, 3, 64, 64))[0].shape[1] == 64 + 5
    YOLO(**model.config).load_state_dict(model.state_dict())


def _square_batch() -> tuple[torch.Tensor, list[dict]]:
    """Four 64x64 images, each with one bright square; class 0 squares are red, class 1 green."""
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.3
    targets = []
    for i in range(4):
        x, y, side, cls = 8 + 4 * i, 10 + 3 * i, 20 + 3 * i, i % 2
        images[i, cls, y : y + side, x : x + side] = 1.0
        targets.append({"boxes": torch.tensor([[x, y, x + side, y + side]], dtype=torch.float), "labels": torch.tensor([cls])})
    return images, targets


def test_overfits_a_batch_and_postprocess_finds_the_boxes():
    torch.manual_seed(0)
    model, loss_fn = YOLO(2, **TINY), YOLOLoss(2)
    images, targets = _square_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses, start = [], time.perf_counter()
    for _ in range(150):
        loss, parts = loss_fn(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"overfit: loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f} in 150 steps, {time.perf_counter() - start:.1f} s")
    assert set(parts) == {"box", "cls", "dfl"}
    assert np.mean(losses[-10:]) < 0.1 * losses[0]
    # eval mode needs BatchNorm statistics of the final weights: re-estimate them on the batch
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model(images)
    model.eval()
    for detections, target in zip(postprocess(model(images)), targets):
        assert len(detections["boxes"]) >= 1
        assert box_iou(detections["boxes"][:1], target["boxes"]).item() > 0.5
        assert detections["labels"][0] == target["labels"][0]


def test_loss_on_images_without_objects_trains_only_the_classes():
    model = YOLO(2, **TINY)
    outputs = model(torch.rand(2, 3, 32, 32))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    loss, parts = YOLOLoss(2)(outputs, [empty, empty])
    loss.backward()
    assert parts["box"] == parts["dfl"] == 0.0 and 0 < parts["cls"] < 1  # the class prior is already low
    assert model.head.cls_pred[0].weight.grad.abs().sum() > 0
    one = {"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([1])}
    _, parts = YOLOLoss(2)(model(torch.rand(2, 3, 32, 32)), [empty, one])
    assert parts["box"] > 0 and parts["dfl"] > 0


def _raw_maps(height: int, width: int, num_classes: int) -> list[torch.Tensor]:
    """Raw outputs with every class logit at -10 and every side's DFL bins peaked at distance 0."""
    maps = []
    for stride in STRIDES:
        x = torch.full((1, 64 + num_classes, height // stride, width // stride), -10.0)
        x[:, 0:64:16] = 20.0  # bin 0 of each side
        maps.append(x)
    return maps


def _set_box(maps, level: int, row: int, col: int, ltrb: tuple[int, int, int, int], cls: int, logit: float) -> None:
    x = maps[level]
    x[0, :64, row, col] = -10.0
    for side, distance in enumerate(ltrb):
        x[0, side * 16 + distance, row, col] = 20.0
    x[0, 64 + cls, row, col] = logit


def test_postprocess_decodes_thresholds_and_suppresses():
    maps = _raw_maps(64, 64, 3)
    _set_box(maps, 0, 3, 2, (1, 2, 3, 1), cls=1, logit=3.0)  # stride 8 cell centre (20, 28)
    _set_box(maps, 0, 3, 3, (2, 2, 2, 2), cls=1, logit=1.0)  # IoU .75 with the first, same class, lower score
    _set_box(maps, 1, 1, 1, (1, 1, 1, 1), cls=2, logit=2.0)  # stride 16 centre (24, 24), another class
    _set_box(maps, 2, 1, 1, (3, 3, 3, 3), cls=0, logit=-2.0)  # below the threshold
    _set_box(maps, 2, 0, 0, (1, 1, 15, 15), cls=0, logit=0.0)  # stride 32 centre (16, 16), clipped
    (found,) = postprocess(maps, score_threshold=0.25)
    expected = torch.tensor([[12.0, 12.0, 44.0, 36.0], [8.0, 8.0, 40.0, 40.0], [0.0, 0.0, 64.0, 64.0]])
    assert torch.allclose(found["boxes"], expected, atol=1e-3)
    assert found["labels"].tolist() == [1, 2, 0]
    assert torch.allclose(found["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 0.0])))
    (capped,) = postprocess(maps, score_threshold=0.25, max_boxes=1)
    assert capped["labels"].tolist() == [1]
    (kept,) = postprocess(maps, score_threshold=0.25, iou_threshold=0.95)  # the lower box survives now
    assert len(kept["boxes"]) == 4


# --- shapes dataset and readers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    coco = make_shapes(root / "coco", num_train=6, num_val=3, image_size=64, seed=1)
    yolo = make_shapes(root / "yolo", num_train=6, num_val=3, image_size=64, seed=1, fmt="yolo")
    return coco, yolo


def test_shapes_writes_deterministic_files(shapes, tmp_path):
    coco, yolo = shapes
    assert sorted(p.name for p in (coco["root"] / "images" / "train").iterdir()) == [f"img_{i:04d}.png" for i in range(6)]
    assert (yolo["root"] / "labels" / "val" / "img_0002.txt").is_file() and yolo["data_yaml"].is_file()
    train = json.loads(coco["train"].read_text())
    assert [c["name"] for c in train["categories"]] == list(CLASSES)
    assert {k for a in train["annotations"] for k in a} == {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}
    again = make_shapes(tmp_path / "again", num_train=6, num_val=3, image_size=64, seed=1)
    for name in ("train.json", "val.json", "images/train/img_0005.png", "images/val/img_0000.png"):
        assert (again["root"] / name).read_bytes() == (coco["root"] / name).read_bytes()
    other = make_shapes(tmp_path / "other", num_train=6, num_val=3, image_size=64, seed=2)
    assert other["train"].read_text() != coco["train"].read_text()


def test_shapes_boxes_frame_the_drawn_pixels():
    from ptm_ray.datasets.shapes import _draw_objects

    rng = np.random.default_rng(0)
    for _ in range(10):
        image = Image.new("RGB", (96, 96), (0, 0, 0))
        objects = _draw_objects(image, rng, 3)
        pixels = np.asarray(image)
        for cls, (x1, y1, x2, y2), colour in objects:
            assert 12 <= max(x2 - x1, y2 - y1) <= 48
            ys, xs = np.nonzero((pixels == colour).all(-1)[y1:y2, x1:x2])
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, x2 - x1, y2 - y1), CLASSES[cls]
            outside = (pixels == colour).all(-1)  # nothing of this colour outside the box
            outside[y1:y2, x1:x2] = False
            assert not outside.any()


def test_coco_and_yolo_readers_agree(shapes):
    coco, yolo = shapes
    for split in ("train", "val"):
        from_coco, coco_names = read_coco(coco[split])
        from_yolo, yolo_names = read_yolo(yolo["root"], split)
        assert coco_names == yolo_names == list(CLASSES)
        assert len(from_coco) == len(from_yolo) == {"train": 6, "val": 3}[split]
        for a, b in zip(from_coco, from_yolo):
            assert a["path"].replace(str(coco["root"]), "") == b["path"].replace(str(yolo["root"]), "")
            assert (a["width"], a["height"], a["labels"]) == (b["width"], b["height"], b["labels"])
            assert np.allclose(a["boxes"], b["boxes"], atol=1e-3) and 1 <= len(a["boxes"]) <= 3
        good, skipped = check_records(from_coco, coco_names, "data.train")
        assert skipped == 0 and [r["boxes"] for r in good] == [r["boxes"] for r in from_coco]


def _edit_coco(root, edit):
    """A copy of the generated train.json with ``edit(coco)`` applied; returns its path."""
    coco = json.loads((root / "train.json").read_text())
    edit(coco)
    path = root / "edited.json"
    path.write_text(json.dumps(coco))
    return path


def _set_bbox(value):
    def edit(coco):
        coco["annotations"][2]["bbox"] = value
    return edit


@pytest.mark.parametrize("edit, problem", [
    (_set_bbox([10, 5, 0, 8]), "bbox [10, 5, 0, 8] has non-positive width"),
    (_set_bbox([10, 5, 8, -1]), "bbox [10, 5, 8, -1] has non-positive height"),
    (_set_bbox([50, 5, 20, 8]), "bbox [50, 5, 20, 8] lies outside the 64x64 image"),
    (_set_bbox([10, 5, "x", 8]), "is not four finite numbers"),
    (lambda coco: coco["annotations"][2].update(category_id=7), "has category '7', which is not one of"),
])
def test_bad_boxes_name_key_file_annotation_and_image(shapes, edit, problem):
    root = shapes[0]["root"]
    path = _edit_coco(root, edit)
    records, categories = read_coco(path)
    annotation = json.loads(path.read_text())["annotations"][2]
    image = f"img_{annotation['image_id'] - 1:04d}.png"
    with pytest.raises(ValueError) as error:
        check_records(records, categories, "data.train")
    assert str(error.value).startswith(f"data.train: edited.json annotation {annotation['id']} (image {image}): ")
    assert problem in str(error.value)
    good, skipped = check_records(records, categories, "data.train", on_bad="skip")
    assert skipped == 1 and len(good) == len(records) - 1


def test_bad_images_are_named_and_skippable(shapes, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(shapes[0]["root"], root)
    (root / "images" / "train" / "img_0001.png").unlink()
    (root / "images" / "train" / "img_0002.png").write_bytes(b"not a png")
    Image.new("RGB", (32, 64)).save(root / "images" / "train" / "img_0003.png")
    records, categories = read_coco(root / "train.json")
    problems = {1: "does not exist", 2: "does not decode", 3: "image is 32x64 but declared 64x64"}
    for index, problem in problems.items():
        with pytest.raises(ValueError, match=f"^data.val: train.json image id {index + 1} \\(image img_000{index}.png\\): .*{problem}"):
            check_records([records[index]], categories, "data.val")
    good, skipped = check_records(records, categories, "data.val", on_bad="skip")
    assert skipped == 3 and [r["path"][-12:] for r in good] == ["img_0000.png", "img_0004.png", "img_0005.png"]


def test_yolo_label_problems_name_the_line_and_small_overhang_is_clipped(shapes, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(shapes[1]["root"], root)
    label = root / "labels" / "train" / "img_0000.txt"
    label.write_text("0 0.5 0.5 0.25 0.25\n1 0.5 0.5 0 0.1\n")
    records, names = read_yolo(root, "train")
    with pytest.raises(ValueError, match=r"^data.train: img_0000.txt line 2 \(image img_0000.png\): box '1 0.5 0.5 0 0.1' has non-positive width"):
        check_records(records, names, "data.train")
    label.write_text("2 0.5 0.5 1.02 0.5\n")  # 0.64 px over each side: within the 1 px tolerance
    good, _ = check_records(*read_yolo(root, "train"), "data.train")
    assert good[0]["boxes"] == [[0.0, 16.0, 64.0, 48.0]] and good[0]["labels"] == ["triangle"]
    label.write_text("2 0.5 0.5 0.5\n")
    with pytest.raises(ValueError, match="img_0000.txt line 1: '2 0.5 0.5 0.5' is not 'class cx cy w h'"):
        read_yolo(root, "train")
    (root / "data.yaml").write_text("names: {0: a, 1: b, 2: c}\n")
    label.write_text("")
    assert read_yolo(root, "train")[1] == ["a", "b", "c"] and read_yolo(root, "train")[0][0]["boxes"] == []


# --- augmentation and letterbox ---------------------------------------------------------------------------


def _red_bbox(image) -> list[float]:
    pixels = np.asarray(image).astype(int)
    ys, xs = np.nonzero((pixels[..., 0] > 180) & (pixels[..., 1] < 80))
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_augment_moves_boxes_with_the_pixels():
    image = Image.new("RGB", (80, 60), (90, 90, 90))
    image.paste((255, 0, 0), (10, 20, 30, 35))  # pixels x 10..29, y 20..34
    boxes, labels = torch.tensor([[10.0, 20.0, 30.0, 35.0]]), torch.tensor([4])
    flipped, flipped_boxes, kept = augment(image, boxes, labels, np.random.default_rng(0), hflip=1.0, scale=(1.0, 1.0))
    assert flipped_boxes.tolist() == [[50.0, 20.0, 70.0, 35.0]] == [_red_bbox(flipped)] and kept.tolist() == [4]
    rng, dropped = np.random.default_rng(1), 0
    for _ in range(30):
        out, out_boxes, out_labels = augment(image, boxes, labels, rng, scale=(0.5, 2.0))
        assert out.size == image.size
        if len(out_boxes) == 0:
            dropped += 1
            continue
        assert np.allclose(out_boxes[0].tolist(), _red_bbox(out), atol=1.5)
    assert 0 < dropped < 30  # some zooms push the square off the canvas, most keep it


def test_letterbox_and_unletterbox_round_trip():
    image = Image.new("RGB", (100, 50), (90, 90, 90))
    image.paste((255, 0, 0), (20, 10, 60, 40))
    pixels, scale, pad = letterbox(image, 64)
    assert pixels.shape == (3, 64, 64) and scale == 0.64 and pad == (0, 16)
    assert torch.allclose(pixels[:, 0, 0], torch.full((3,), 114 / 255))  # padding
    box = torch.tensor([[20.0, 10.0, 60.0, 40.0]])
    inside = box * scale + torch.tensor([*pad, *pad])
    red = Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    assert np.allclose(inside[0].tolist(), _red_bbox(red), atol=1.0)
    assert torch.allclose(unletterbox(inside, scale, pad, 100, 50), box)
    assert unletterbox(torch.tensor([[-5.0, 0.0, 70.0, 70.0]]), scale, pad, 100, 50).tolist() == [[0.0, 0.0, 100.0, 50.0]]


# --- mAP ------------------------------------------------------------------------------------------------------


def _pred(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.long)}


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.long)}


TWO = _target([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])


def _map(metric: MeanAP) -> dict[str, float]:
    """mAP@[.5:.95] and AP50 of ``metric``."""
    result = metric.compute()
    return {"map": result["map"], "map_50": result["map_50"]}


@pytest.mark.parametrize("prediction, expected", [
    (_pred([[20, 20, 30, 30], [0, 0, 10, 10]], [0.9, 0.8], [0, 0]), (1.0, 1.0)),       # perfect
    (_pred([], [], []), (0.0, 0.0)),                                                    # nothing found
    (_pred([[0, 0, 10, 10]], [0.9], [0]), (51 / 101, 51 / 101)),                       # one of two
    (_pred([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8], [0, 0]), (51 / 101, 51 / 101)),  # then a miss
    (_pred([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [0, 0]), (0.5 * 51 / 101,) * 2),  # miss first
    (_pred([[0, 0, 10, 16], [20, 20, 30, 36]], [0.9, 0.8], [0, 0]), (0.3, 1.0)),       # IoU .625: .50-.60 only
    (_pred([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [1, 1]), (0.0, 0.0)),       # right boxes, wrong class
])
def test_mean_ap_hand_computed_cases(prediction, expected):
    metric = MeanAP()
    metric.update([prediction], [TWO])
    result = metric.compute()
    assert result["map"] == pytest.approx(expected[0]) and result["map_50"] == pytest.approx(expected[1])


def test_mean_ap_ignores_crowd_truth_as_cocoeval_does():
    # a normal box found (0.9), and a higher-scored detection on a crowd region (IoU 900/1600 = .5625)
    detections = _pred([[0, 0, 10, 10], [55, 55, 85, 85]], [0.9, 0.95], [0, 0])
    truth = [[0, 0, 10, 10], [50, 50, 90, 90]]
    crowd = MeanAP()
    crowd.update([detections], [_target(truth, [0, 0]) | {"iscrowd": torch.tensor([0, 1])}])
    assert crowd.compute()["map"] == pytest.approx(1.0)  # the crowd is neither missed nor a false positive's cause
    ordinary = MeanAP()  # the same boxes counted as ordinary truth: AP 1 at .50 and .55, then recall 1/2 after a miss
    ordinary.update([detections], [_target(truth, [0, 0])])
    assert ordinary.compute()["map"] == pytest.approx((2 * 1.0 + 8 * 0.5 * 51 / 101) / 10)


def test_mean_ap_reports_ap75_and_the_area_buckets():
    found = MeanAP()
    found.update([_pred([[0, 0, 10, 16], [20, 20, 30, 36]], [0.9, 0.8], [0, 0])], [TWO])  # IoU .625 each
    result = found.compute()
    assert (result["map_50"], result["map_75"]) == (1.0, 0.0)
    # small (10x10 < 32²) found, medium (50x50 < 96²) missed, large (100x100) found
    sizes = MeanAP()
    truth = _target([[0, 0, 10, 10], [100, 100, 150, 150], [200, 200, 300, 300]], [0, 0, 0])
    sizes.update([_pred([[0, 0, 10, 10], [200, 200, 300, 300]], [0.9, 0.8], [0, 0])], [truth])
    result = sizes.compute()
    assert (result["map_small"], result["map_medium"], result["map_large"]) == (1.0, 0.0, 1.0)
    assert result["map"] == pytest.approx(67 / 101)  # 2 of 3 found at every threshold, both first
    only_small = MeanAP()  # a bucket without ground truth is undefined: -1, COCO's convention
    only_small.update([_pred([[0, 0, 10, 10]], [0.9], [0])], [_target([[0, 0, 10, 10]], [0])])
    assert (only_small.compute()["map_medium"], only_small.compute()["map_large"]) == (-1.0, -1.0)
    assert "map_75" not in MeanAP(iou_thresholds=(0.5,)).compute()
    wide = MeanAP()  # 100x20: area 2000 is medium (bug guarded: an area of height² = 400 would call it small)
    wide.update([_pred([[0, 0, 100, 20]], [0.9], [0])], [_target([[0, 0, 100, 20]], [0])])
    assert (wide.compute()["map_small"], wide.compute()["map_medium"]) == (-1.0, 1.0)


def test_mean_ap_merges_states_across_workers_and_averages_classes():
    images = [
        (_pred([[0, 0, 10, 10]], [0.9], [0]), _target([[0, 0, 10, 10]], [0])),            # class 0 found
        (_pred([[0, 0, 10, 10]], [0.7], [0]), _target([[0, 0, 10, 10]], [1])),            # class 1 missed
        (_pred([[5, 5, 9, 9]], [0.6], [2]), _target([], [])),                              # class 2: no truth
        (_pred([[0, 0, 10, 10]], [0.8], [0]), _target([[0, 0, 10, 10], [40, 40, 50, 50]], [0, 0])),
    ]
    whole = MeanAP()
    whole.update([p for p, _ in images], [t for _, t in images])
    workers = [MeanAP(), MeanAP()]
    for i, (p, t) in enumerate(images):
        workers[i % 2].update([p], [t])
    merged = MeanAP()
    for worker in workers:
        merged.merge(pickle.loads(pickle.dumps(worker.state())))  # as all_gather_object would
    assert merged.compute() == whole.compute()
    # class 0: 3 boxes, two found first -> recall 2/3 at precision 1; class 1: 0; class 2 left out
    assert whole.compute()["map"] == pytest.approx((67 / 101 + 0.0) / 2)
    assert set(MeanAP().compute().values()) == {-1.0} and len(MeanAP().compute()) == 6


def test_mean_ap_threshold_edges():
    gt = _target([[0, 0, 10, 10]], [0])
    metric = MeanAP()
    metric.update([_pred([[0, 0, 10, 19]], [0.9], [0])], [gt])  # IoU 100/190 = .526: a hit at .50 only
    assert _map(metric) == pytest.approx({"map": 0.1, "map_50": 1.0})
    metric.reset()  # a reset metric starts over
    metric.update([_pred([[0, 0, 10, 20]], [0.9], [0])], [gt])  # IoU exactly .5 counts at .5 (COCO: >=)
    assert _map(metric) == pytest.approx({"map": 0.1, "map_50": 1.0})
    only_50 = MeanAP(iou_thresholds=(0.5,))
    only_50.update([_pred([[0, 0, 10, 19]], [0.9], [0])], [gt])
    assert _map(only_50) == {"map": 1.0, "map_50": 1.0}
    # a threshold of 1.0 accepts an IoU within float error of 1 (COCO caps it at 1 - 1e-10)
    exact = MeanAP(iou_thresholds=(0.5, 1.0))
    off_by_float_error = np.array([[0, 0, 10, 10 + 1e-12]])  # float64: in float32 the box would be exact
    exact.update([{"boxes": off_by_float_error, "scores": np.array([0.9]), "labels": np.array([0])}], [gt])
    assert _map(exact) == {"map": 1.0, "map_50": 1.0}
    with pytest.raises(ValueError, match=r"^iou_thresholds=\[0.75\]: the first must be 0.5 \(for map_50\)$"):
        MeanAP(iou_thresholds=(0.75,))
    with pytest.raises(ValueError, match="^2 predictions but 1 targets: one of each per image$"):
        metric.update([_pred([], [], []), _pred([], [], [])], [gt])


def test_mean_ap_greedy_matching_in_score_order():
    # two detections of one box: the higher score takes it (IoU .6), the lower one (IoU 1.0) is a false positive;
    # matched the other way round, AP would be 0.5 at .50
    metric = MeanAP(iou_thresholds=(0.5,))
    metric.update([_pred([[0, 0, 10, 10], [0, 0, 10, 6]], [0.3, 0.9], [0, 0])], [_target([[0, 0, 10, 10]], [0])])
    assert metric.compute()["map_50"] == 1.0
    # a box is matched once: a duplicate is a false positive, so AP = (51 * 1 + 50 * 2/3) / 101
    metric = MeanAP(iou_thresholds=(0.5,))
    metric.update([_pred([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [0, 0, 0])], [TWO])
    assert metric.compute()["map_50"] == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_mean_ap_counts_the_top_100_detections_per_image_and_class():
    # 100 confident misses, then the hit: it is the 101st and does not count; 99 misses leave it in
    def image(misses: int):
        boxes = [[50, 50, 60, 60]] * misses + [[0, 0, 10, 10]]
        return _pred(boxes, [0.9] * misses + [0.1], [0] * (misses + 1)), _target([[0, 0, 10, 10]], [0])

    for misses, expected in [(100, 0.0), (99, 0.01)]:
        metric = MeanAP(iou_thresholds=(0.5,))
        metric.update(*[[x] for x in image(misses)])
        assert metric.compute()["map_50"] == pytest.approx(expected)


def test_mean_ap_keeps_the_order_of_tied_scores():
    # 20 hits at 0.9, then at 0.5 ten hits followed by ten misses (input order): sorted stably the hits come
    # first and AP is 1; an unstable sort would interleave the tied misses with the hits
    hits = [[x, 0, x + 8, 8] for x in range(0, 300, 10)]  # 30 disjoint boxes, all ground truth
    boxes, scores = [], []
    for i in range(20):
        boxes += [hits[20 + i] if i < 10 else [500 + 10 * i, 500, 508 + 10 * i, 508], hits[i]]
        scores += [0.5, 0.9]
    metric = MeanAP(iou_thresholds=(0.5,))
    metric.update([_pred(boxes, scores, [0] * 40)], [_target(hits, [0] * 30)])
    assert metric.compute()["map_50"] == 1.0
    # the same across images: 20 images, each a hit at 0.9 and one at 0.5 (the first 10) or a miss at 0.5 (the
    # last 10); merged in image order the tied 0.5s keep it, so the hits still come first
    across = MeanAP(iou_thresholds=(0.5,))
    for i in range(20):
        targets = [[0, 0, 8, 8]] + ([[20, 20, 28, 28]] if i < 10 else [])
        second = [20, 20, 28, 28] if i < 10 else [50, 50, 58, 58]
        across.update([_pred([[0, 0, 8, 8], second], [0.9, 0.5], [0, 0])], [_target(targets, [0] * len(targets))])
    assert across.compute()["map_50"] == 1.0


def test_mean_ap_takes_single_detections_and_integer_boxes():
    # one detection or one object may come as a [4] box with a 0-d score and label
    single = {"boxes": torch.tensor([0.0, 0.0, 200.0, 190.0]), "scores": torch.tensor(0.9), "labels": torch.tensor(0)}
    single_gt = {"boxes": torch.tensor([0.0, 0.0, 200.0, 200.0]), "labels": torch.tensor(0)}
    # integer boxes: 200 * 190 overflows int16, so areas must be computed in float (a wrapped, negative area makes
    # a tiny overlap look like a huge IoU)
    big16 = torch.tensor([[0, 0, 200, 190]], dtype=torch.int16)
    small = torch.tensor([[0.0, 0.0, 60.0, 60.0]])  # IoU with big16: 3600 / 38000, a miss
    cases = [
        ({"boxes": single["boxes"], "scores": single["scores"], "labels": single["labels"]}, single_gt, 1.0),
        (_pred(big16.tolist(), [0.9], [0]) | {"boxes": big16}, _target([[0, 0, 200, 200]], [0]), 1.0),  # IoU .95
        (_pred(big16.tolist(), [0.9], [0]) | {"boxes": big16}, _target(small.tolist(), [0]), 0.0),
        (_pred(small.tolist(), [0.9], [0]), {"boxes": big16, "labels": torch.tensor([0])}, 0.0),
    ]
    for prediction, target, expected in cases:
        metric = MeanAP()
        metric.update([prediction], [target])
        assert _map(metric) == pytest.approx({"map": expected, "map_50": expected})


def test_crowd_regions_are_not_trained_on_and_are_ignored_by_map(shapes):
    from ptm_ray.tasks.detection import _target_json, _targets

    def crowd_first(coco):
        first = coco["annotations"][0]
        first["iscrowd"] = 1
        return first["image_id"]

    path = _edit_coco(shapes[0]["root"], crowd_first)
    crowd_image = json.loads(path.read_text())["annotations"][0]["image_id"]
    records, categories = read_coco(path)
    good, _ = check_records(records, categories, "data.train")
    record = good[crowd_image - 1]
    assert record["crowd"][0] is True and not any(record["crowd"][1:])
    assert not any(any(r["crowd"]) for r in good if r is not record)
    text = _target_json(record)
    train, = _targets([text], categories)
    scored, = _targets([text], categories, crowd=True)
    assert len(train["boxes"]) == len(record["boxes"]) - 1  # the crowd region is not a training target
    assert torch.equal(train["boxes"], torch.tensor(record["boxes"][1:], dtype=torch.float).reshape(-1, 4))
    assert scored["iscrowd"].tolist() == [True] + [False] * (len(record["boxes"]) - 1)
    assert "iscrowd" not in json.loads(_target_json(good[crowd_image % len(good)]))  # only images with a crowd say so
