"""Box arithmetic of each transform, checked against hand-computed numbers."""

import numpy as np
import pytest
import torch

from ltdet.data import Compose, RandomHorizontalFlip, ResizeShortestEdge, ToTensor, build_transforms


def _sample(h=40, w=60):
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :10] = 255  # a white stripe on the left edge, to see the flip
    target = {
        "boxes": torch.tensor([[0.0, 0.0, 10.0, 20.0], [15.5, 5.0, 60.0, 40.0]]),
        "labels": torch.tensor([1, 2]),
        "image_id": 7,
        "orig_size": (h, w),
        "scale": 1.0,
        "flipped": False,
    }
    return image, target


def test_resize_shortest_edge_scale():
    image, target = _sample()  # h=40, w=60
    out, t = ResizeShortestEdge((80,), 1000)(image, target)
    assert out.shape == (80, 120, 3)
    assert t["scale"] == 2.0
    assert torch.equal(
        t["boxes"], torch.tensor([[0.0, 0.0, 20.0, 40.0], [31.0, 10.0, 120.0, 80.0]])
    )
    assert torch.equal(t["labels"], target["labels"]) and t["orig_size"] == (40, 60)
    assert target["scale"] == 1.0  # input target untouched


def test_resize_max_size_cap():
    image, target = _sample()  # shorter 40 -> 100 would make longer 150 > 120: cap at 120
    out, t = ResizeShortestEdge(100, 120)(image, target)
    assert t["scale"] == 2.0 and out.shape == (80, 120, 3)
    image, target = _sample(h=30, w=70)  # 30 -> 50 gives 116.67 <= 120: no cap
    out, t = ResizeShortestEdge(50, 120)(image, target)
    scale = 50 / 30
    assert t["scale"] == pytest.approx(scale)
    assert out.shape == (50, int(70 * scale + 0.5), 3)
    image, target = _sample(h=30, w=70)  # 30 -> 60 gives 140 > 120: scale = 120 / 70
    out, t = ResizeShortestEdge(60, 120)(image, target)
    assert t["scale"] == pytest.approx(120 / 70) and out.shape == (int(30 * 120 / 70 + 0.5), 120, 3)
    expected = torch.tensor([[0.0, 0.0, 10.0, 20.0], [15.5, 5.0, 60.0, 40.0]]) * (120 / 70)
    expected[:, 1::2] = expected[:, 1::2].clamp(max=out.shape[0])
    assert torch.allclose(t["boxes"], expected)


def test_resize_multiscale_draws_every_size_and_scale_composes():
    torch.manual_seed(0)
    resize = ResizeShortestEdge((20, 40, 80), 1000)
    heights = {resize(*_sample())[0].shape[0] for _ in range(60)}
    assert heights == {20, 40, 80}
    image, target = _sample()
    image, target = ResizeShortestEdge(80, 1000)(image, target)
    image, target = ResizeShortestEdge(20, 1000)(image, target)
    assert target["scale"] == 0.5 and image.shape[:2] == (20, 30)


def test_flip_boxes_and_pixels():
    image, target = _sample()  # w = 60
    out, t = RandomHorizontalFlip(1.0)(image, target)
    assert torch.equal(t["boxes"], torch.tensor([[50.0, 0.0, 60.0, 20.0], [0.0, 5.0, 44.5, 40.0]]))
    assert t["flipped"] is True and target["flipped"] is False
    assert out[:, 50:].min() == 255 and out[:, :50].max() == 0
    twice, t2 = RandomHorizontalFlip(1.0)(out, t)
    assert torch.equal(t2["boxes"], target["boxes"]) and t2["flipped"] is False
    assert np.array_equal(twice, image)
    same, t0 = RandomHorizontalFlip(0.0)(image, target)
    assert same is image and t0 is target


def test_flip_probability():
    torch.manual_seed(0)
    flip = RandomHorizontalFlip(0.3)
    n = 2000
    flips = sum(flip(*_sample())[1]["flipped"] for _ in range(n))
    std = (n * 0.3 * 0.7) ** 0.5
    assert abs(flips - n * 0.3) < 4 * std


def test_empty_boxes_and_to_tensor():
    image, target = _sample()
    target["boxes"] = torch.zeros((0, 4))
    target["labels"] = torch.zeros((0,), dtype=torch.int64)
    tf = Compose([ResizeShortestEdge(20, 100), RandomHorizontalFlip(1.0), ToTensor()])
    img, t = tf(image, target)
    assert t["boxes"].shape == (0, 4)
    assert img.shape == (3, 20, 30) and img.dtype == torch.float32
    assert img.max() == 1.0 and img.min() == 0.0


def test_build_transforms_from_config():
    cfg = {"min_size": [32, 48], "max_size": 100, "test_min_size": 24, "hflip_prob": 0.5}
    train = build_transforms(cfg, train=True)
    assert isinstance(train.transforms[0], ResizeShortestEdge)
    assert train.transforms[0].min_sizes == (32, 48) and train.transforms[0].max_size == 100
    assert isinstance(train.transforms[1], RandomHorizontalFlip) and train.transforms[1].p == 0.5
    test = build_transforms(cfg, train=False)
    assert [type(t) for t in test.transforms] == [ResizeShortestEdge, ToTensor]
    assert test.transforms[0].min_sizes == (24,)
    img, t = test(*_sample())
    assert img.shape == (3, 24, 36) and t["scale"] == 0.6


def test_bad_transform_arguments():
    with pytest.raises(ValueError, match="min_sizes"):
        ResizeShortestEdge((), 100)
    with pytest.raises(ValueError, match="max_size"):
        ResizeShortestEdge(10, 0)
    with pytest.raises(ValueError, match="p must be"):
        RandomHorizontalFlip(1.5)
