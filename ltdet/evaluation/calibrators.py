"""Post-hoc detection calibrators: temperature scaling and per-class Platt scaling.

Fitted on detections with known TP / FP status (:func:`.calibration.detection_outcomes`, e.g. of
a held-out split of the training set); applied to any detections, keyed by json category id:
- :class:`TemperatureScaling`: ``s' = sigmoid(logit(s) / T)``, one T, or one per r / c / f
  group (``per_group=True``). With one T the ranking is unchanged, so AP is too.
- :class:`PlattScaling`: per class ``s' = sigmoid(a_c logit(s) + b_c)``, as the per-class
  "LogisticCalibration" of Dave et al. ("Evaluating Large-Vocabulary Object Detectors: The Devil
  is in the Details", 2021, their ``train_calibration.py``, grouping per-class): a class with no
  detections in the fit set, or only false positives, gets score 0 (their ``MISSING_SCORE`` /
  ``NO_TP_SCORE: zero``; ``missing="keep"`` leaves such a class unchanged). Departure: a weak L2
  pull (``l2=1e-3``) towards the identity (a = 1, b = 0) keeps a perfectly separated class finite.
Both minimise the binary cross-entropy of the calibrated score against the TP label (L-BFGS,
float64, all groups / classes at once: their losses are separable).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ltdet.fileio import atomic_write
from ltdet.frequency import FREQ_GROUPS

from .calibration import IGNORED, TP, _groups, detection_outcomes
from .results_io import DetColumns, load_detections

__all__ = [
    "CALIBRATORS",
    "PlattScaling",
    "TemperatureScaling",
    "apply_calibrator",
    "build_calibrator",
    "calibrator_from_state",
    "columns_to_results",
    "fit_calibrator",
    "load_calibrator",
    "save_calibrator",
]

_LOGIT_EPS = 1e-12


def _logit(s: torch.Tensor) -> torch.Tensor:
    s = s.clamp(_LOGIT_EPS, 1 - _LOGIT_EPS)
    return torch.log(s) - torch.log1p(-s)


def _lbfgs(params: torch.Tensor, loss_fn, max_iter: int = 200) -> torch.Tensor:
    params = params.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [params],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss

    opt.step(closure)
    return params.detach()


def _bce_logits(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")


class TemperatureScaling:
    """``s' = sigmoid(logit(s) / T)``; one temperature, or one per frequency group.

    ``temperature``: ``{"all": T}`` or ``{"r": T_r, "c": T_c, "f": T_f}``; ``groups`` maps a json
    category id to its group (needed with ``per_group``; a class of no known group keeps T = 1).
    """

    type = "temperature"

    def __init__(
        self,
        per_group: bool = False,
        temperature: Mapping[str, float] | None = None,
        groups: Mapping[int, str] | None = None,
    ):
        self.per_group = bool(per_group)
        self.temperature = dict(temperature or {})
        self.groups = {int(k): v for k, v in (groups or {}).items()}

    def _group_index(self, category_id: np.ndarray) -> tuple[np.ndarray, list]:
        names = list(FREQ_GROUPS) if self.per_group else ["all"]
        if not self.per_group:
            return np.zeros(category_id.shape[0], np.int64), names
        lut = {g: i for i, g in enumerate(names)}
        ids = np.asarray(category_id, np.int64)
        uniq, inv = np.unique(ids, return_inverse=True)
        gi = np.array([lut.get(self.groups.get(int(c), "?"), -1) for c in uniq], np.int64)
        return gi[inv].reshape(-1), names

    def fit(self, scores, category_id, correct) -> TemperatureScaling:
        """Fit on detection scores, their json category ids and 0/1 TP labels."""
        gi, names = self._group_index(np.asarray(category_id))
        z = _logit(torch.as_tensor(scores, dtype=torch.float64).reshape(-1))
        y = torch.as_tensor(correct).reshape(-1).to(torch.float64)
        ok = torch.from_numpy(gi >= 0)
        z, y, g = z[ok], y[ok], torch.from_numpy(gi)[ok]
        G = len(names)
        n_g = torch.bincount(g, minlength=G).to(torch.float64)

        def loss(log_t):  # sum over groups of each group's mean BCE: separable
            per = _bce_logits(z * torch.exp(-log_t[g]), y)
            return (
                torch.zeros(G, dtype=torch.float64).index_add(0, g, per) / n_g.clamp(min=1)
            ).sum()

        log_t = (
            _lbfgs(torch.zeros(G, dtype=torch.float64), loss)
            if z.numel()
            else torch.zeros(G, dtype=torch.float64)
        )
        # A group without fit data keeps T = 1.
        self.temperature = {
            name: (float(torch.exp(log_t[i])) if n_g[i] > 0 else 1.0)
            for i, name in enumerate(names)
        }
        return self

    def transform(self, scores, category_id) -> torch.Tensor:
        gi, names = self._group_index(np.asarray(category_id))
        t = torch.tensor([self.temperature.get(n, 1.0) for n in names] + [1.0], dtype=torch.float64)
        z = _logit(torch.as_tensor(scores, dtype=torch.float64).reshape(-1))
        return torch.sigmoid(z / t[torch.from_numpy(np.where(gi >= 0, gi, len(names)))])

    def state_dict(self) -> dict:
        return {
            "type": self.type,
            "per_group": self.per_group,
            "temperature": dict(self.temperature),
            "groups": {str(k): v for k, v in self.groups.items()},
        }


class PlattScaling:
    """Per-class ``s' = sigmoid(a_c logit(s) + b_c)`` (Dave et al. 2021, per-class logistic
    calibration). ``params``: ``{category_id: (a, b)}``; ``zero``: category ids whose scores
    become 0 (no detection, or no true positive, in the fit set; ``missing="zero"``)."""

    type = "platt"

    def __init__(
        self,
        missing: str = "zero",
        l2: float = 1e-3,
        params: Mapping[int, Sequence[float]] | None = None,
        zero: Sequence[int] = (),
        category_ids: Sequence[int] = (),
    ):
        if missing not in ("zero", "keep"):
            raise ValueError(f"missing must be 'zero' or 'keep', got {missing!r}")
        self.missing, self.l2 = missing, float(l2)
        self.params = {int(k): (float(v[0]), float(v[1])) for k, v in (params or {}).items()}
        self.zero = sorted(int(c) for c in zero)
        self.category_ids = [int(c) for c in category_ids]

    def fit(
        self, scores, category_id, correct, category_ids: Sequence[int] | None = None
    ) -> PlattScaling:
        """Fit one (a, b) per class; ``category_ids``: every class of the data set (those absent
        from the fit data get the ``missing`` rule)."""
        cid = np.asarray(category_id, np.int64).reshape(-1)
        uniq, inv = np.unique(cid, return_inverse=True)
        K = uniq.shape[0]
        z = _logit(torch.as_tensor(scores, dtype=torch.float64).reshape(-1))
        y = torch.as_tensor(correct).reshape(-1).to(torch.float64)
        c = torch.from_numpy(inv.reshape(-1))
        n_c = torch.bincount(c, minlength=K).to(torch.float64)
        tp_c = torch.zeros(K, dtype=torch.float64).index_add(0, c, y) if K else n_c

        def loss(p):
            a, b = p[:K], p[K:]
            per = _bce_logits(a[c] * z + b[c], y)
            nll = torch.zeros(K, dtype=torch.float64).index_add(0, c, per) / n_c.clamp(min=1)
            return (nll + self.l2 * ((a - 1) ** 2 + b**2)).sum()

        init = torch.cat([torch.ones(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)])
        p = _lbfgs(init, loss) if K else init
        has_tp = (tp_c > 0).tolist()
        self.params = {
            int(u): (float(p[i]), float(p[K + i])) for i, u in enumerate(uniq.tolist()) if has_tp[i]
        }
        self.category_ids = sorted(set(int(x) for x in (category_ids or [])) | set(uniq.tolist()))
        if self.missing == "zero":
            self.zero = [u for u in self.category_ids if u not in self.params]
        else:
            self.zero = []
        return self

    def transform(self, scores, category_id) -> torch.Tensor:
        cid = np.asarray(category_id, np.int64).reshape(-1)
        uniq, inv = np.unique(cid, return_inverse=True)
        zero = set(self.zero)
        a = torch.tensor(
            [self.params.get(int(u), (1.0, 0.0))[0] for u in uniq], dtype=torch.float64
        )
        b = torch.tensor(
            [self.params.get(int(u), (1.0, 0.0))[1] for u in uniq], dtype=torch.float64
        )
        zmask = torch.tensor([int(u) in zero for u in uniq], dtype=torch.bool)
        c = torch.from_numpy(inv.reshape(-1))
        z = _logit(torch.as_tensor(scores, dtype=torch.float64).reshape(-1))
        out = torch.sigmoid(a[c] * z + b[c]) if cid.size else z
        return torch.where(zmask[c], torch.zeros_like(out), out) if cid.size else out

    def state_dict(self) -> dict:
        return {
            "type": self.type,
            "missing": self.missing,
            "l2": self.l2,
            "params": {str(k): list(v) for k, v in self.params.items()},
            "zero": list(self.zero),
            "category_ids": list(self.category_ids),
        }


CALIBRATORS = {"temperature": TemperatureScaling, "platt": PlattScaling}


def build_calibrator(method: str, groups: Mapping[int, str] | None = None):
    """``"temperature"`` (one T), ``"temperature_group"`` (one T per r / c / f) or ``"platt"``
    (per class)."""
    if method == "temperature":
        return TemperatureScaling()
    if method == "temperature_group":
        return TemperatureScaling(per_group=True, groups=groups)
    if method == "platt":
        return PlattScaling()
    raise ValueError(
        f"calibration method must be 'temperature', 'temperature_group' or 'platt', got {method!r}"
    )


def calibrator_from_state(state: Mapping[str, Any]):
    """Rebuild a calibrator from its ``state_dict()``."""
    kind = state.get("type")
    if kind == "temperature":
        return TemperatureScaling(
            per_group=state["per_group"],
            temperature=state["temperature"],
            groups={int(k): v for k, v in state.get("groups", {}).items()},
        )
    if kind == "platt":
        return PlattScaling(
            missing=state["missing"],
            l2=state["l2"],
            params={int(k): v for k, v in state["params"].items()},
            zero=state["zero"],
            category_ids=state.get("category_ids", ()),
        )
    raise ValueError(f"unknown calibrator type {kind!r}; expected one of {sorted(CALIBRATORS)}")


def save_calibrator(calibrator, path, **extra) -> None:
    """Write the calibrator (and ``extra`` json-able facts: fit data, checkpoint) as json."""
    doc = dict(extra, calibrator=calibrator.state_dict())
    atomic_write(path, lambda f: f.write(json.dumps(doc, indent=2).encode()))


def load_calibrator(path):
    with open(os.fspath(path)) as f:
        return calibrator_from_state(json.load(f)["calibrator"])


def fit_calibrator(method: str, gt, dets, iou_thr: float = 0.5, max_dets: int = 300, train=None):
    """Fit ``method`` on ``dets`` of the images of ``gt`` (e.g. a held-out split of the training
    set), on the detections the evaluator counts (ignored ones left out)."""
    out = detection_outcomes(gt, dets, iou_thr=iou_thr, max_dets=max_dets)
    gtd = out["gt"]
    freq, _ = _groups(gtd, train)
    groups = {int(c): f for c, f in zip(gtd.cat_ids.tolist(), freq)}
    counted = out["status"] != IGNORED
    cal = build_calibrator(method, groups)
    cat_id = gtd.cat_ids[out["category"][counted]]
    args = (out["score"][counted], cat_id, out["status"][counted] == TP)
    if isinstance(cal, PlattScaling):
        cal.fit(*args, category_ids=gtd.cat_ids.tolist())
    else:
        cal.fit(*args)
    return cal


def apply_calibrator(calibrator, dets) -> DetColumns:
    """Detections (any accepted input) with calibrated scores, as :class:`DetColumns`."""
    cols = load_detections(dets)
    score = calibrator.transform(cols.score, cols.category_id).numpy()
    return DetColumns(cols.image_id, cols.category_id, cols.bbox, score, cols.source)


def columns_to_results(cols: DetColumns) -> list:
    """:class:`DetColumns` -> LVIS result dicts (for writing a calibrated result json)."""
    return [
        {
            "image_id": int(i),
            "category_id": int(c),
            "bbox": [float(v) for v in b],
            "score": float(s),
        }
        for i, c, b, s in zip(
            cols.image_id.tolist(),
            cols.category_id.tolist(),
            cols.bbox.tolist(),
            cols.score.tolist(),
        )
    ]
