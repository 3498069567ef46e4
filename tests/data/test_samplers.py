"""Image samplers: repeat factors vs an independent loop, RFS statistics, seeding, sharding,
class-aware uniformity, aspect-ratio grouping, inference shards, the config builder."""

import json
import math
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ltdet.data import (
    ClassAwareSampler,
    GroupedBatchSampler,
    InferenceSampler,
    LVISDetection,
    RepeatFactorSampler,
    build_train_sampler,
    repeat_factors,
)


def _random_json(n_images=300, n_classes=20, seed=0, empty_every=7):
    """Zipf-ish LVIS-style dict; every `empty_every`-th image has no annotation."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_classes + 1) ** 1.5
    p /= p.sum()
    images, anns, k = [], [], 1
    for i in range(1, n_images + 1):
        w, h = (64, 48) if i % 3 else (40, 72)
        images.append({"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"})
        if i % empty_every == 0:
            continue
        for c in rng.choice(n_classes, rng.integers(1, 5), p=p):
            anns.append(
                {
                    "id": k,
                    "image_id": i,
                    "category_id": int(c) * 2 + 1,
                    "bbox": [1.0, 1.0, 5.0, 6.0],
                    "area": 30.0,
                    "iscrowd": 0,
                }
            )
            k += 1
    cats = [{"id": c * 2 + 1, "name": f"c{c}"} for c in range(n_classes)]
    return {"images": images, "annotations": anns, "categories": cats}


def _reference_repeat_factors(data, t):
    """max over the image's classes of max(1, sqrt(t / f_c)); images sorted by id; loops.
    f_c's denominator counts the annotated images only (detectron2 filters empty images)."""
    image_ids = sorted(im["id"] for im in data["images"])
    classes_on = {i: set() for i in image_ids}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0):
            classes_on[a["image_id"]].add(a["category_id"])
    n_img_with = {}
    for cats in classes_on.values():
        for c in cats:
            n_img_with[c] = n_img_with.get(c, 0) + 1
    num_annotated = sum(1 for cats in classes_on.values() if cats)
    out = []
    for i in image_ids:
        r = 1.0
        for c in classes_on[i]:
            r = max(r, max(1.0, math.sqrt(t / (n_img_with[c] / num_annotated))))
        out.append(r)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("t", [1e-3, 0.05, 0.3])
def test_repeat_factors_match_reference(t):
    data = _random_json()
    got = repeat_factors(data, threshold=t)
    want = _reference_repeat_factors(data, t)
    assert got.shape == (300,) and got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    if t == 0.3:
        assert (got > 1).sum() > 100  # the test exercises non-trivial factors
    assert torch.all(got[6::7] == 1.0)  # images 7, 14, ... have no annotation


def test_repeat_factors_from_path_dataset_and_label_lists(tmp_path):
    data = _random_json(n_images=50)
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    ds = LVISDetection(str(path), str(tmp_path))
    want = _reference_repeat_factors(data, 0.2)
    assert torch.allclose(repeat_factors(str(path), 0.2), want)
    assert torch.allclose(repeat_factors(ds, 0.2), want)
    labels = [ds.image_labels(i) for i in range(len(ds))]
    assert torch.allclose(repeat_factors(labels, 0.2), want)


def test_repeat_factors_use_loaded_annotations(tmp_path):
    # Image 1's only box of class 5 is degenerate: dropped with skip_invalid, so class 5 no
    # longer exists and image 1 gets factor 1 (images 2-4 carry class 1 only). Image 1 then has
    # no annotation and leaves f_c's denominator (detectron2): f_1 = 3 / 3.
    data = {
        "images": [{"id": i, "width": 10, "height": 10, "file_name": "x"} for i in range(1, 5)],
        "categories": [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 0, 3]}]
        + [
            {"id": 1 + i, "image_id": i, "category_id": 1, "bbox": [0, 0, 2, 3]}
            for i in range(2, 5)
        ],
    }
    ds = LVISDetection(data, str(tmp_path), skip_invalid=True)
    rf = repeat_factors(ds, threshold=2.0)
    r = math.sqrt(2.0 / (3 / 3))  # class 1 is on 3 of the 3 annotated images
    assert torch.allclose(rf, torch.tensor([1.0, r, r, r], dtype=torch.float64))
    with pytest.raises(ValueError, match="threshold"):
        repeat_factors(data, threshold=0.0)


def test_rfs_counts_per_epoch_and_mean():
    rf = torch.tensor([1.0, 1.5, 2.3, 3.75, 0.4, 5.0, 1.05], dtype=torch.float64)
    s = RepeatFactorSampler(rf, seed=3)
    epochs = 3000
    counts = torch.zeros(epochs, rf.numel())
    for e in range(epochs):
        s.set_epoch(e)
        idx = torch.tensor(list(s))
        assert len(s) == idx.numel()
        counts[e] = torch.bincount(idx, minlength=rf.numel()).float()
    assert torch.all(counts >= torch.floor(rf)) and torch.all(counts <= torch.ceil(rf))
    frac = rf - torch.floor(rf)
    tol = 5 * torch.sqrt(frac * (1 - frac) / epochs) + 1e-12
    assert torch.all((counts.mean(0).double() - rf).abs() <= tol)
    # integral factors are exact every epoch
    assert torch.all(counts[:, 0] == 1) and torch.all(counts[:, 5] == 5)


def test_rfs_seeding():
    rf = torch.rand(200, dtype=torch.float64) * 3 + 1
    a, b = RepeatFactorSampler(rf, seed=5), RepeatFactorSampler(rf, seed=5)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    assert list(a) == list(a)  # re-iterating an epoch gives the same order
    order4 = list(a)
    a.set_epoch(5)
    assert list(a) != order4
    c = RepeatFactorSampler(rf, seed=6)
    c.set_epoch(4)
    assert list(c) != order4
    unshuffled = RepeatFactorSampler(rf, seed=5, shuffle=False)
    unshuffled.set_epoch(4)
    assert list(unshuffled) == sorted(order4)


@pytest.mark.parametrize("world", [2, 3])
def test_rfs_shards_disjoint_equal_and_covering(world):
    rf = torch.rand(101, dtype=torch.float64) * 2 + 1
    for epoch in (0, 1, 7):
        shards = []
        for rank in range(world):
            s = RepeatFactorSampler(rf, seed=1, num_replicas=world, rank=rank)
            s.set_epoch(epoch)
            shards.append(list(s))
        full = RepeatFactorSampler(rf, seed=1, num_replicas=1, rank=0)
        full.set_epoch(epoch)
        epoch_list = list(full)
        lengths = {len(x) for x in shards}
        assert len(lengths) == 1
        n = len(epoch_list)
        assert lengths.pop() == math.ceil(n / world)
        pad = world * len(shards[0]) - n
        assert pad < world
        # interleaving the shards restores the epoch list followed by its first `pad` entries
        merged = [shards[k % world][k // world] for k in range(world * len(shards[0]))]
        assert merged == epoch_list + epoch_list[:pad]
        # disjoint positions: each position of the padded list belongs to exactly one rank
        positions = [set(range(r, world * len(shards[0]), world)) for r in range(world)]
        assert set.intersection(*positions) == set()


def test_default_world_from_torch_distributed(tmp_path):
    assert RepeatFactorSampler(torch.ones(4)).num_replicas == 1
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        s = RepeatFactorSampler(torch.ones(4))
        assert (s.num_replicas, s.rank) == (1, 0)
        assert len(s) == 4
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="rank"):
        RepeatFactorSampler(torch.ones(4), num_replicas=2, rank=2)


def test_rfs_empty_and_bad_input():
    with pytest.raises(ValueError, match="empty"):
        RepeatFactorSampler(torch.zeros(0))
    with pytest.raises(ValueError, match="finite"):
        RepeatFactorSampler(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="all repeat factors are 0"):
        RepeatFactorSampler(torch.zeros(3))
    s = RepeatFactorSampler(torch.tensor([1.0]), num_replicas=4, rank=3)  # padding > epoch
    assert list(s) == [0]


def test_class_aware_uniform_over_classes():
    # 1 image of class 1, 10 of class 2, 100 of class 3: one class per image.
    labels = [{1}] + [{2}] * 10 + [{3}] * 100
    s = ClassAwareSampler(labels, num_samples=30000, seed=0)
    idx = torch.tensor(list(s))
    assert idx.numel() == 30000 == len(s)
    cls = torch.tensor([next(iter(labels[i])) for i in idx.tolist()])
    freq = torch.bincount(cls, minlength=4)[1:].double() / idx.numel()
    std = math.sqrt((1 / 3) * (2 / 3) / idx.numel())
    assert torch.all((freq - 1 / 3).abs() < 5 * std)
    # within class 3, images uniform
    within = torch.bincount(idx[cls == 3] - 11, minlength=100).double()
    expected = within.sum() / 100
    chi2 = ((within - expected) ** 2 / expected).sum()
    assert chi2 < 99 + 5 * math.sqrt(2 * 99)


def test_class_aware_seeding_sharding_and_defaults():
    labels = [{1, 2}, {2}, set(), {3}, {1}]
    a = ClassAwareSampler(labels, seed=2)
    assert len(a) == 5  # default epoch length = number of images
    assert 2 not in set(a)  # the empty image is never drawn
    b = ClassAwareSampler(labels, seed=2)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    r0 = ClassAwareSampler(labels, num_samples=11, seed=2, num_replicas=2, rank=0)
    r1 = ClassAwareSampler(labels, num_samples=11, seed=2, num_replicas=2, rank=1)
    assert len(r0) == len(r1) == 6
    full = ClassAwareSampler(labels, num_samples=12, seed=2)
    assert [x for pair in zip(r0, r1) for x in pair] == list(full)
    with pytest.raises(ValueError, match="no image has an annotation"):
        ClassAwareSampler([set(), set()])


def test_grouped_batches_single_group_and_exactly_once():
    rf = torch.rand(203, dtype=torch.float64) * 2 + 1
    groups = torch.tensor([i % 3 == 0 for i in range(203)]).long()
    sampler = RepeatFactorSampler(rf, seed=0)
    gb = GroupedBatchSampler(sampler, groups, batch_size=4)
    for epoch in (0, 1):
        gb.set_epoch(epoch)
        assert sampler.epoch == epoch
        batches = list(gb)
        assert len(batches) == len(gb) == math.ceil(len(sampler) / 4)
        assert sorted(i for b in batches for i in b) == sorted(sampler)
        mixed = [b for b in batches if len({int(groups[i]) for i in b}) > 1]
        short = [b for b in batches if len(b) < 4]
        assert len(short) <= 1 and (not short or batches[-1] is short[0])
        # only the leftover batches at the end may mix groups: at most one remainder per group
        assert len(mixed) <= 1
        pure_end = len(batches) - len(mixed) - len(short)
        assert all(
            len({int(groups[i]) for i in b}) == 1 and len(b) == 4 for b in batches[:pure_end]
        )


def test_grouped_batches_ddp_equal_lengths():
    groups = [0] * 50 + [1] * 3
    lengths = []
    for rank in range(2):
        s = RepeatFactorSampler(torch.ones(53), seed=0, num_replicas=2, rank=rank)
        lengths.append(len(list(GroupedBatchSampler(s, groups, 4))))
    assert lengths[0] == lengths[1] == math.ceil(27 / 4)


def test_inference_sampler():
    shards = [list(InferenceSampler(10, 3, r)) for r in range(3)]
    assert shards == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [len(InferenceSampler(10, 3, r)) for r in range(3)] == [3, 3, 4]
    assert list(InferenceSampler(0, 2, 1)) == []
    assert list(InferenceSampler(2, 4, 0)) == [] and list(InferenceSampler(2, 4, 3)) == [1]


def test_build_train_sampler(tmp_path, make_lvis):
    path, root, _ = make_lvis(tmp_path, n_images=9, write=False)
    ds = LVISDetection(path, root)
    cfg = {"batch_size": 2, "aspect_ratio_grouping": True, "sampler": {"type": "default"}}
    per_rank = []
    for rank in range(2):
        bs = build_train_sampler(cfg, ds, num_replicas=2, rank=rank, seed=4)
        bs.set_epoch(1)
        batches = list(bs)
        assert len(batches) == len(bs)
        ar = ds.aspect_ratios()
        # two groups: at most one leftover batch (the last) may mix them
        assert len(batches) == 3
        assert all(len({bool(ar[i] < 1) for i in b}) == 1 for b in batches[:-1])
        per_rank.append([i for b in batches for i in b])
    assert len(per_rank[0]) == len(per_rank[1]) == 5
    assert set(per_rank[0]) | set(per_rank[1]) == set(range(9))
    rfs = build_train_sampler(
        {**cfg, "sampler": {"type": "repeat_factor", "threshold": 0.9}}, ds, 1, 0, seed=0
    )
    assert isinstance(rfs.sampler, RepeatFactorSampler)
    assert torch.allclose(rfs.sampler.repeat_factors, repeat_factors(ds, 0.9))
    ca = build_train_sampler(
        {
            **cfg,
            "aspect_ratio_grouping": False,
            "sampler": {"type": "class_aware", "num_samples": 7},
        },
        ds,
        1,
        0,
        0,
    )
    assert isinstance(ca.sampler, ClassAwareSampler) and len(ca.sampler) == 7 and len(ca) == 4
    with pytest.raises(ValueError, match=r"data.sampler.type.*'bogus'"):
        build_train_sampler({**cfg, "sampler": {"type": "bogus"}}, ds, 1, 0, 0)
    with pytest.raises(ValueError, match=r"class_aware.*unknown key.*threshold"):
        build_train_sampler(
            {**cfg, "sampler": {"type": "class_aware", "threshold": 1}}, ds, 1, 0, 0
        )


def _big_json(n_images=100_000, n_boxes=1_270_000, n_classes=1203, seed=0):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_classes + 1) ** 2.0  # LVIS-like tail: last classes on ~1 image
    p /= p.sum()
    img = rng.integers(1, n_images + 1, n_boxes).tolist()
    cat = (rng.choice(n_classes, n_boxes, p=p) + 1).tolist()
    return {
        "images": [
            {"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"}
            for i in range(1, n_images + 1)
        ],
        "categories": [{"id": c, "name": f"c{c}"} for c in range(1, n_classes + 1)],
        "annotations": [
            {
                "id": k + 1,
                "image_id": img[k],
                "category_id": cat[k],
                "bbox": [1.0, 2.0, 30.0, 40.0],
                "iscrowd": 0,
            }
            for k in range(n_boxes)
        ],
    }


@pytest.mark.slow
def test_rfs_speed_lvis_sized():
    """Issue 5: repeat_factors + one RFS epoch on 100k images / 1.27M boxes in under 5 s."""
    data = _big_json()
    # CPU time of this process: the shared 2-core CI box makes wall time depend on neighbours.
    t0, c0 = time.perf_counter(), time.process_time()
    rf = repeat_factors(data, threshold=1e-3)
    s = RepeatFactorSampler(rf, seed=0)
    s.set_epoch(1)
    n = sum(1 for _ in s)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    print(f"repeat_factors + 1 epoch ({n} samples): {cpu:.2f} s CPU, {wall:.2f} s wall")
    assert n >= 100_000 and rf.max() > 3 and cpu < 5.0
