"""Checkpoints across patched and unpatched models.

Loss state (EQLv2's gradient sums, Seesaw's cumulative counts, GHM's `density.acc_sum`) is
training state: torchvision weights load into a patched model with `strict=True` (the loss state
starts fresh, one log record per loss), `ltdet.torchvision_state_dict` turns a patched model's
state dict into one plain torchvision loads with `strict=True`, and a patched model's own state
dict round-trips with its loss state.

Seesaw is the one loss whose classifier has another width (`cls_channels = C + 2`: C classes and
a 2-way objectness, the authors' design): `ltdet.patch` re-creates the `C + 1` torchvision
`cls_score` with `C + 2` outputs, so a torchvision state dict loads into a seesaw model except
those two entries (a size mismatch for `load_state_dict`; `load_detector_state_dict` skips them,
tests/losses/test_seesaw_objectness.py), and a seesaw model's state dict loads into the torchvision
architecture with a `C + 2` `cls_score`. The seesaw cases below check exactly that.
"""

import logging

import pytest
import torch
from torch import nn

import ltdet
from ltdet.losses import build_loss
from ltdet.models.build import build_torchvision_detector
from ltdet.models.weights import (
    LTDET_STATE_PREFIXES,
    load_detector_state_dict,
    torchvision_state_dict,
)

STATEFUL = [{"type": "eqlv2"}, {"type": "seesaw"}, {"type": "ghmc", "momentum": 0.75}]
LOSS_CFGS = STATEFUL + [{"type": "ce"}]
IDS = ["eqlv2", "seesaw", "ghmc-momentum", "ce"]
LOSS_LOGGER = "ltdet.losses.base"
#: the entries whose shape differs between torchvision (C + 1) and a seesaw model (C + 2)
CLS_SCORE = ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias")


def _fitting(cfg, state):
    """torchvision's state dict as far as it fits a model patched with `cfg`: all of it, except
    for seesaw, whose re-created C+2 `cls_score` cannot take torchvision's C+1 one."""
    if cfg["type"] != "seesaw":
        return state
    return {k: v for k, v in state.items() if k not in CLS_SCORE}


def _loss_records(caplog):
    return [r for r in caplog.records if r.name == LOSS_LOGGER]


def _loss_state(model, prefix="roi_heads.cls_loss."):
    return {
        k[len(prefix) :]: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)
    }


@pytest.fixture
def run_train_steps(detection_batch):
    """`run_train_steps(model, steps, seed=0)`: training forwards on `detection_batch()`."""

    def _train_steps(model, steps, seed=0):
        """Training forwards (the loss state updates in forward); returns the last losses."""
        model.train()
        torch.manual_seed(seed)
        images, targets = detection_batch()  # random images: drawn after seeding
        losses = None
        for step in range(steps):
            torch.manual_seed(seed + step)
            losses = model(images, targets)
            sum(losses.values()).backward()
        return {k: v.detach() for k, v in losses.items()}

    return _train_steps


def _fresh_state(cfg, num_classes):
    return build_loss(cfg, num_classes=num_classes).state_dict()


@pytest.mark.parametrize("cfg", LOSS_CFGS, ids=IDS)
def test_torchvision_weights_load_strictly_into_a_patched_model(
    cfg, caplog, run_train_steps, tiny_detector, tiny_num_classes
):
    plain = tiny_detector()
    patched = ltdet.patch(tiny_detector(), cls_loss=cfg)
    run_train_steps(patched, 1)  # the state to be kept is the loss's current (here: trained) one
    before = _loss_state(patched)
    seesaw = cfg["type"] == "seesaw"
    if seesaw:  # C+2 against torchvision's C+1: those two entries cannot load
        with pytest.raises(
            RuntimeError, match="size mismatch for roi_heads.box_predictor.cls_score"
        ):
            patched.load_state_dict(plain.state_dict(), strict=True)
    state = _fitting(cfg, plain.state_dict())
    caplog.clear()  # the refused load above may have logged too (when ltdet logs at INFO)
    with caplog.at_level(logging.INFO, logger=LOSS_LOGGER):
        # seesaw: strict except for the two re-created cls_score entries, reported missing
        result = patched.load_state_dict(state, strict=not seesaw)
    assert sorted(result.missing_keys) == (sorted(CLS_SCORE) if seesaw else [])
    assert not result.unexpected_keys
    own = patched.state_dict()
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    state = _loss_state(patched)
    assert state.keys() == before.keys() == _fresh_state(cfg, tiny_num_classes).keys()
    assert all(torch.equal(state[k], before[k]) for k in state)
    records = _loss_records(caplog)
    if cfg in STATEFUL:
        assert len(records) == 1  # once per loss, not once per buffer or submodule
        assert "roi_heads.cls_loss" in records[0].getMessage()
        assert all(k in records[0].getMessage() for k in state)
    else:
        assert state == {} and records == []


@pytest.mark.parametrize("cfg", STATEFUL, ids=IDS[:3])
def test_a_new_patched_model_starts_with_fresh_loss_state(cfg, tiny_detector, tiny_num_classes):
    patched = ltdet.patch(tiny_detector(), cls_loss=cfg)
    patched.load_state_dict(
        _fitting(cfg, tiny_detector().state_dict()), strict=cfg["type"] != "seesaw"
    )
    fresh = _fresh_state(cfg, tiny_num_classes)
    state = _loss_state(patched)
    assert all(torch.equal(state[k], fresh[k]) for k in fresh)


@pytest.mark.parametrize("cfg", LOSS_CFGS, ids=IDS)
def test_patched_state_dict_loads_into_plain_torchvision(
    cfg, detection_batch, run_train_steps, tiny_detector, tiny_num_classes
):
    patched = ltdet.patch(tiny_detector(), cls_loss=cfg, sampler={"type": "ohem"})
    run_train_steps(patched, 2)
    own = patched.state_dict()
    plain = tiny_detector()
    if cfg["type"] == "seesaw":
        # torchvision's C+1 classifier cannot take seesaw's C+2 one; the same torchvision
        # architecture with a C+2 cls_score (plain nn.Linear, no ltdet code) takes the rest
        with pytest.raises(
            RuntimeError, match="size mismatch for roi_heads.box_predictor.cls_score"
        ):
            plain.load_state_dict(torchvision_state_dict(patched), strict=True)
        cls_score = plain.roi_heads.box_predictor.cls_score
        plain.roi_heads.box_predictor.cls_score = nn.Linear(
            cls_score.in_features, tiny_num_classes + 2
        )
    if cfg in STATEFUL:
        with pytest.raises(RuntimeError, match="Unexpected key"):
            plain.load_state_dict(own, strict=True)  # why the public call exists
    converted = torchvision_state_dict(patched)
    assert list(converted) == [k for k in own if not k.startswith(LTDET_STATE_PREFIXES)]
    result = plain.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert plain.state_dict().keys() == converted.keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, own[key]), key
    # a state dict (e.g. torch.load of a checkpoint) converts the same as the model
    from_dict = ltdet.torchvision_state_dict(own)
    assert from_dict.keys() == converted.keys()
    assert all(from_dict[k] is own[k] for k in from_dict)  # no copies
    if cfg == {"type": "ce"}:
        # torchvision's own loss and scoring: the unpatched model detects exactly the same
        images = [img for img in detection_batch()[0]]
        patched.eval()
        plain.eval()
        with torch.no_grad():
            for a, b in zip(patched(images), plain(images)):
                for key in a:
                    assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("cfg", LOSS_CFGS, ids=IDS)
def test_patched_state_dict_round_trips_with_the_loss_state(
    cfg, caplog, run_train_steps, tiny_detector, tiny_num_classes
):
    box_cfg = {"type": "ghmr", "momentum": 0.7} if cfg["type"] == "ghmc" else None
    trained = ltdet.patch(tiny_detector(), cls_loss=cfg, box_loss=box_cfg)
    run_train_steps(trained, 3)
    state = trained.state_dict()
    restored = ltdet.patch(tiny_detector(), cls_loss=cfg, box_loss=box_cfg)
    with caplog.at_level(logging.INFO, logger=LOSS_LOGGER):
        restored.load_state_dict(state, strict=True)
    assert _loss_records(caplog) == []  # nothing absent, nothing logged
    for key, value in restored.state_dict().items():
        assert torch.equal(value, state[key]), key
    loss_state = _loss_state(trained)
    if cfg in STATEFUL:
        fresh = _fresh_state(cfg, tiny_num_classes)
        assert any(not torch.equal(loss_state[k], fresh[k]) for k in fresh)  # trained, not fresh
    # resuming: the next step is the same step in both models
    next_trained = run_train_steps(trained, 1, seed=10)
    next_restored = run_train_steps(restored, 1, seed=10)
    assert next_trained.keys() == next_restored.keys()
    assert all(torch.equal(next_trained[k], next_restored[k]) for k in next_trained)
    for prefix in ("roi_heads.cls_loss.", "roi_heads.box_loss."):
        a, b = _loss_state(trained, prefix), _loss_state(restored, prefix)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ghm_density_state_of_both_losses_is_handled_per_loss(caplog, tiny_detector):
    patched = ltdet.patch(
        tiny_detector(),
        cls_loss={"type": "ghmc", "momentum": 0.75},
        box_loss={"type": "ghmr", "momentum": 0.7},
    )
    with caplog.at_level(logging.INFO, logger=LOSS_LOGGER):
        patched.load_state_dict(tiny_detector().state_dict(), strict=True)
    messages = sorted(r.getMessage() for r in _loss_records(caplog))
    assert len(messages) == 2
    assert messages[0].startswith("roi_heads.box_loss (GHMRLoss)")
    assert messages[1].startswith("roi_heads.cls_loss (GHMCLoss)")
    assert all("density.acc_sum" in m for m in messages)


def test_partial_loss_state_loads_what_is_there(tiny_num_classes):
    loss = build_loss({"type": "eqlv2"}, num_classes=tiny_num_classes)
    saved = {"pos_grad": torch.arange(tiny_num_classes, dtype=torch.float32)}
    loss.load_state_dict(saved, strict=True)
    assert torch.equal(loss.pos_grad, saved["pos_grad"])
    assert torch.equal(loss.neg_grad, torch.zeros(tiny_num_classes))
    with pytest.raises(RuntimeError, match="Unexpected key"):  # foreign entries still fail
        loss.load_state_dict({"not_a_buffer": torch.zeros(1)}, strict=True)


def _tiny_retinanet(num_classes):
    return build_torchvision_detector(
        {"model": {"arch": "retinanet", "backbone": "resnet18", "norm": "bn"}}, num_classes
    )


def test_retinanet_checkpoints_both_ways(caplog, tiny_num_classes):
    plain = _tiny_retinanet(tiny_num_classes)
    patched = ltdet.patch(
        _tiny_retinanet(tiny_num_classes),
        cls_loss={"type": "eqlv2"},
        box_loss={"type": "ghmr", "momentum": 0.7},
    )
    with caplog.at_level(logging.INFO, logger=LOSS_LOGGER):
        patched.load_state_dict(plain.state_dict(), strict=True)
    assert len(_loss_records(caplog)) == 2  # classification and regression losses
    back = _tiny_retinanet(tiny_num_classes)
    back.load_state_dict(torchvision_state_dict(patched), strict=True)
    for key, value in back.state_dict().items():
        assert torch.equal(value, plain.state_dict()[key]), key


def test_ddp_prefixed_state_dict_keeps_its_prefix(tiny_detector):
    patched = ltdet.patch(tiny_detector(), cls_loss={"type": "eqlv2"})
    prefixed = {f"module.{k}": v for k, v in patched.state_dict().items()}
    converted = torchvision_state_dict(prefixed)
    assert all(k.startswith("module.") for k in converted)
    assert not any(".cls_loss." in k for k in converted)
    assert len(converted) == len(tiny_detector().state_dict())


def test_load_detector_state_dict_across_losses(tiny_detector):
    # torchvision weights into a patched model, then an EQLv2-trained state into a CE model
    eqlv2 = ltdet.patch(tiny_detector(), cls_loss={"type": "eqlv2"})
    load_detector_state_dict(eqlv2, tiny_detector().state_dict(), "torchvision")
    ce = ltdet.patch(tiny_detector(), cls_loss={"type": "ce"})
    load_detector_state_dict(ce, eqlv2.state_dict(), "eqlv2 checkpoint")
    for key, value in torchvision_state_dict(eqlv2).items():
        assert torch.equal(ce.state_dict()[key], value), key
