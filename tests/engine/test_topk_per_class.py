"""Top-k-per-class inference (`test.topk_per_class`): the K best detections of each class over the
whole set, in bounded memory, equal to a brute-force top-k; and the RLE masks that go with them."""

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from ltdet.engine.outputs import encode_rle, masks_to_rle
from ltdet.engine.topk import TopKPerClass, topk_per_class_indices
from ltdet.engine.validation import _image_detections, to_lvis_results


def _brute_force(labels, scores, k):
    """Per class, the k best by score, ties to the earlier entry: a Python reference."""
    keep = []
    for c in sorted(set(labels.tolist())):
        idx = [i for i in range(len(labels)) if labels[i] == c]
        idx.sort(key=lambda i: (-float(scores[i]), i))
        keep.extend(idx[:k])
    return keep


def _stream(seed, num_classes, images, max_per_image, ties):
    g = torch.Generator().manual_seed(seed)
    for i in range(images):
        n = int(torch.randint(0, max_per_image + 1, (1,), generator=g))
        labels = torch.randint(1, num_classes + 1, (n,), generator=g)
        scores = (
            torch.randint(0, 8, (n,), generator=g).float() / 8
            if ties
            else torch.rand(n, generator=g)
        )
        yield i, labels, scores, torch.rand(n, 4, generator=g) * 100


@pytest.mark.parametrize("merge_every", [1, 7, 50, None])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_equals_brute_force_with_bounded_memory(merge_every, ties):
    C, K, max_per_image = 9, 6, 25
    pool = TopKPerClass(C, K, merge_every=merge_every)
    every = []
    for i, labels, scores, boxes in _stream(3, C, 60, max_per_image, ties):
        pool.add(labels, scores, torch.full((len(labels),), i), boxes)
        every.append((labels, scores, torch.full((len(labels),), i), boxes))
    labels, scores, ids, boxes = (torch.cat(x) for x in zip(*every))
    ref = _brute_force(labels, scores, K)
    state = pool.state()
    got = sorted(
        zip(state["labels"].tolist(), (-state["scores"]).tolist(), state["image_ids"].tolist())
    )
    want = sorted(zip(labels[ref].tolist(), (-scores[ref]).tolist(), ids[ref].tolist()))
    assert got == want
    # same entries with their boxes, in (label, score descending) order
    order = torch.tensor(ref)
    assert torch.equal(state["labels"], labels[topk_per_class_indices(labels, scores, K)])
    assert torch.equal(state["boxes"], boxes[topk_per_class_indices(labels, scores, K)])
    assert len(order) == len(state["labels"])
    assert pool.seen == len(labels)
    bound = C * K + pool.merge_every + max_per_image
    assert pool.peak_size <= bound


def test_candidates_below_a_full_class_are_refused_at_once():
    pool = TopKPerClass(2, 2, merge_every=1)
    pool.add(
        torch.tensor([1, 1, 2]), torch.tensor([0.9, 0.8, 0.5]), torch.zeros(3), torch.zeros(3, 4)
    )
    assert pool.admits(torch.tensor([1, 1, 2]), torch.tensor([0.8, 0.85, 0.1])).tolist() == [
        False,
        True,
        True,
    ]
    with pytest.raises(ValueError, match="labels must be in 1..2"):
        pool.admits(torch.tensor([3]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="positive"):
        TopKPerClass(3, 0)


def test_rank_pools_merge_to_the_single_process_result():
    C, K = 5, 4
    single = TopKPerClass(C, K, merge_every=10)
    ranks = [TopKPerClass(C, K, merge_every=3) for _ in range(3)]
    for i, labels, scores, boxes in _stream(1, C, 30, 12, False):
        ids = torch.full((len(labels),), i)
        single.add(labels, scores, ids, boxes)
        ranks[i % 3].add(labels, scores, ids, boxes)
    main = ranks[0]
    for other in ranks[1:]:
        main.add_pool(other.state())
    a, b = single.state(), main.state()
    for key in ("labels", "scores", "image_ids", "boxes"):
        assert torch.equal(a[key], b[key]), key


def test_masks_travel_with_their_detections_and_group_by_image():
    pool = TopKPerClass(3, 2, merge_every=2)
    rng = np.random.default_rng(0)
    lut = torch.tensor([-1, 10, 20, 30])
    for i in range(6):
        labels = torch.tensor([1, 2, 3, 1])
        scores = torch.from_numpy(rng.random(4)).float()
        segm = [{"size": [1, 1], "counts": f"{i}-{j}"} for j in range(4)]
        pool.add(labels, scores, torch.full((4,), 100 + i), torch.rand(4, 4), segm)
    state = pool.state()
    for lab, img, seg in zip(state["labels"].tolist(), state["image_ids"].tolist(), state["segm"]):
        i, j = map(int, seg["counts"].split("-"))
        assert img == 100 + i and [1, 2, 3, 1][j] == lab
    per_image = pool.per_image(lut)
    assert [d["image_id"] for d in per_image] == sorted({d["image_id"] for d in per_image})
    assert sum(len(d["scores"]) for d in per_image) == 6
    for d in per_image:
        assert set(d["category_ids"].tolist()) <= {10, 20, 30}
        assert len(d["segmentation"]) == len(d["scores"])
    results = to_lvis_results(per_image)
    assert all("segmentation" in r for r in results) and len(results) == 6
    with pytest.raises(ValueError, match="masks"):
        pool.add(torch.tensor([1]), torch.tensor([1.0]), torch.zeros(1), torch.zeros(1, 4))


def test_encode_rle_matches_pycocotools():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 13, 17, generator=g) > 0.6
    ours = encode_rle(masks)
    for m, r in zip(masks, ours):
        ref = mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
        assert r["size"] == [13, 17] and r["counts"] == ref["counts"].decode()
        assert np.array_equal(
            mask_utils.decode({"size": r["size"], "counts": r["counts"]}),
            m.numpy().astype(np.uint8),
        )
    assert encode_rle(torch.zeros(0, 4, 4, dtype=torch.bool)) == []


def test_masks_to_rle_pastes_at_the_original_size_like_torchvision():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    g = torch.Generator().manual_seed(1)
    probs = torch.rand(70, 1, 28, 28, generator=g)  # more than one chunk
    xy = torch.rand(70, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + 5 + torch.rand(70, 2, generator=g) * 30], 1)
    ours = masks_to_rle(probs, boxes, (60, 80))
    ref = paste_masks_in_image(probs, boxes, (60, 80))[:, 0] > 0.5
    assert ours == encode_rle(ref)
    pasted = masks_to_rle(ref[:, None].float(), boxes, (60, 80), pasted=True)
    assert pasted == ours


def test_image_detections_caps_the_list_and_encodes_each_mask_once():
    g = torch.Generator().manual_seed(2)
    n = 12
    out = {
        "labels": torch.randint(1, 4, (n,), generator=g),
        "scores": torch.rand(n, generator=g),
        "boxes": torch.tensor([[2.0, 2.0, 20.0, 24.0]]).repeat(n, 1),
        "masks": torch.rand(n, 1, 28, 28, generator=g),
    }
    tgt = {"image_id": 7, "scale": 2.0, "orig_size": (20, 16)}
    lut = torch.tensor([-1, 5, 6, 8])
    pool = TopKPerClass(3, 100)
    entry = _image_detections(out, tgt, lut, pasted=False, max_dets=5, topk=pool)
    assert len(entry["scores"]) == 5 and len(entry["segmentation"]) == 5
    assert torch.equal(entry["scores"], out["scores"].sort(descending=True).values[:5])
    assert torch.allclose(entry["boxes"][0], torch.tensor([1.0, 1.0, 10.0, 12.0]))
    state = pool.state()
    assert len(state["labels"]) == n  # the pool saw every candidate, not the capped list
    # an entry's mask is the same in the per-image list and in the pool
    by_score = {round(float(s), 6): m["counts"] for s, m in zip(state["scores"], state["segm"])}
    for s, m in zip(entry["scores"].tolist(), entry["segmentation"]):
        assert by_score[round(s, 6)] == m["counts"] and m["size"] == [20, 16]
    plain = _image_detections(
        {k: v for k, v in out.items() if k != "masks"},
        tgt,
        lut,
        pasted=False,
        max_dets=None,
        topk=None,
    )
    assert len(plain["scores"]) == n and "segmentation" not in plain
