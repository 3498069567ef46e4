"""Image-level mixup for detection: images, boxes, labels and per-box weights."""

import numpy as np
import pytest
import torch

from ltdet.imbalance.mixup import mixup_detection


def _batch():
    images = [torch.rand(3, 4, 5), torch.rand(3, 6, 3)]
    targets = [
        {
            "boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 4.0, 3.0]]),
            "labels": torch.tensor([1, 2]),
            "image_id": 10,
            "scale": 1.0,
        },
        {
            "boxes": torch.tensor([[0.5, 0.5, 2.5, 5.0]]),
            "labels": torch.tensor([3]),
            "image_id": 11,
            "scale": 2.0,
        },
    ]
    return images, targets


def _pad(im, h, w):
    out = torch.zeros(3, h, w)
    out[:, : im.shape[1], : im.shape[2]] = im
    return out


def test_pair_mixing_images_boxes_weights():
    images, targets = _batch()
    orig = [im.clone() for im in images]
    g = torch.Generator().manual_seed(0)
    out_im, out_t = mixup_detection(images, targets, alpha=1.5, prob=1.0, generator=g)
    # Inputs are not modified.
    assert all(torch.equal(a, b) for a, b in zip(images, orig))
    assert targets[0]["boxes"].shape == (2, 4) and "weights" not in targets[0]
    for i, j in ((0, 1), (1, 0)):  # with two images the partner is always the other one
        lam = out_t[i]["weights"][0].item()
        assert 0.0 < lam < 1.0
        ki, kj = len(targets[i]["labels"]), len(targets[j]["labels"])
        expected_w = torch.tensor([lam] * ki + [1 - lam] * kj)
        torch.testing.assert_close(out_t[i]["weights"], expected_w)
        assert torch.equal(out_t[i]["boxes"], torch.cat([targets[i]["boxes"], targets[j]["boxes"]]))
        assert torch.equal(
            out_t[i]["labels"], torch.cat([targets[i]["labels"], targets[j]["labels"]])
        )
        assert out_t[i]["image_id"] == targets[i]["image_id"]
        assert out_t[i]["scale"] == targets[i]["scale"]
        assert out_im[i].shape == (3, 6, 5)
        expected = lam * _pad(orig[i], 6, 5) + (1 - lam) * _pad(orig[j], 6, 5)
        torch.testing.assert_close(out_im[i], expected)
    # Independent lambda per mixed image.
    assert out_t[0]["weights"][0] != out_t[1]["weights"][0]


def test_deterministic_given_generator():
    images, targets = _batch()
    a = mixup_detection(images, targets, prob=1.0, generator=torch.Generator().manual_seed(3))
    b = mixup_detection(images, targets, prob=1.0, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert all(torch.equal(x["weights"], y["weights"]) for x, y in zip(a[1], b[1]))


def test_no_mixing_cases_add_unit_weights():
    images, targets = _batch()
    for kwargs, ims, tgts in (
        ({"prob": 0.0}, images, targets),
        ({"prob": 1.0}, images[:1], targets[:1]),
    ):
        out_im, out_t = mixup_detection(
            ims, tgts, generator=torch.Generator().manual_seed(0), **kwargs
        )
        assert all(o is i for o, i in zip(out_im, ims))
        for o, t in zip(out_t, tgts):
            assert torch.equal(o["boxes"], t["boxes"])
            assert torch.equal(o["weights"], torch.ones(len(t["labels"])))
    assert mixup_detection([], []) == ([], [])


def test_existing_weights_multiply_and_empty_boxes():
    images = [torch.rand(3, 4, 4), torch.rand(3, 4, 4)]
    targets = [
        {
            "boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
            "labels": torch.tensor([1]),
            "weights": torch.tensor([0.5]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    _, out_t = mixup_detection(
        images, targets, prob=1.0, generator=torch.Generator().manual_seed(0)
    )
    lam0 = out_t[0]["weights"][0].item() / 0.5
    assert 0 < lam0 < 1 and out_t[0]["boxes"].shape == (1, 4)
    # Image 1 (no boxes) receives image 0's box with weight (1 - lambda_1) * 0.5.
    assert out_t[1]["boxes"].shape == (1, 4) and out_t[1]["labels"].tolist() == [1]
    assert 0 < out_t[1]["weights"][0].item() < 0.5


def test_lambda_distribution_and_mixing_probability():
    alpha, n = 1.5, 4000
    images = [torch.zeros(1, 1, 1) for _ in range(n)]
    targets = [
        {"boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.long)} for _ in range(n)
    ]
    _, out_t = mixup_detection(
        images, targets, alpha=alpha, prob=0.5, generator=torch.Generator().manual_seed(0)
    )
    mixed = np.array([len(t["labels"]) == 2 for t in out_t])
    # Binomial(n, 0.5): mean 2000, sd ~31.6.
    assert abs(mixed.sum() - n * 0.5) < 4 * np.sqrt(n * 0.25)
    lam = np.array([t["weights"][0].item() for t in out_t])[mixed]
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
    var = 1.0 / (4 * (2 * alpha + 1))
    assert abs(lam.mean() - 0.5) < 4 * np.sqrt(var / len(lam))
    assert lam.var() == pytest.approx(var, rel=0.1)


def test_bad_input():
    images, targets = _batch()
    with pytest.raises(ValueError, match="alpha"):
        mixup_detection(images, targets, alpha=0.0)
    with pytest.raises(ValueError, match="prob"):
        mixup_detection(images, targets, prob=1.5)
    with pytest.raises(ValueError, match="2 images but 1 targets"):
        mixup_detection(images, targets[:1])
    # masks are mixed (tests/test_mask_data.py); keypoints are not, and the error names the image
    targets[1]["keypoints"] = torch.zeros(1, 17, 3)
    with pytest.raises(ValueError, match="image_id 11"):
        mixup_detection(images, targets)
    del targets[1]["keypoints"]
    targets[1]["masks"] = torch.zeros(1, 6, 3)  # masks on one image of the batch only
    with pytest.raises(ValueError, match="no 'masks' while others have"):
        mixup_detection(images, targets)
