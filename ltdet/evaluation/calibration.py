"""Detection calibration by frequency group: D-ECE / MCE, reliability diagrams, calibrators.

D-ECE (Kueppers et al., "Multivariate Confidence Calibration for Object Detection", CVPR-W 2020),
confidence-only form: the detections are binned by score, and

    D-ECE = sum_m |B_m| / N * |precision(B_m) - confidence(B_m)|,   MCE = max_m |...|

over the non-empty bins, precision = the fraction of true positives at one IoU threshold
(default 0.5). A detection's TP / FP status is the evaluator's own (``lvis_eval``): the top
``max_dets`` per image, LVIS's federated filter (a detection of a class neither annotated nor in
the image's ``neg_category_ids`` is dropped), the greedy matching, and the ignore rules (matched to
an ignored gt, or unmatched on a class in the image's ``not_exhaustive_category_ids``): such a
detection counts for nothing, neither TP nor FP. The IoU threshold is one of the evaluator's
(0.50:0.05:0.95), area range "all". Groups: all detections, each LVIS frequency group r / c / f
of the detection's class, and each COCO-LT bin (training instances [1, 20), [20, 400),
[400, 8000), >= 8000) when instance counts are known. A group without detections has D-ECE -1
(undefined, like an AP of -1).

Bins: ``"uniform"``: M equal-width bins, bin m holds ``edges[m] < s <= edges[m+1]`` (a score of 0
in bin 0). ``"equal_mass"``: per group, the detections sorted by score split into M bins of equal
count by rank (``bin = first_rank * M // N``); equal scores always share the bin of their first
rank, so a bin is a score interval.

Calibrators (fitted on detections with known TP / FP status, e.g. of a held-out split of the
training set; applied to any detections, keyed by json category id):
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

from ltdet.frequency import COCO_LT_BIN_NAMES, FREQ_GROUPS, coco_lt_bins

# The evaluator's own pipeline pieces: cap + federated filter, matching order, gt tensors, matching.
from .ground_truth import GroundTruth, class_groups, load_ground_truth
from .iou import check_iou_type, detection_geometry, gt_geometry
from .matching import match
from .params import AREA_RNGS, IOU_THRS
from .prepare import gt_tensors, select_detections, sort_detections
from .results_io import DetColumns, load_detections

__all__ = [
    "BINNINGS",
    "CALIBRATORS",
    "REPORT_KEYS",
    "PlattScaling",
    "TemperatureScaling",
    "apply_calibrator",
    "build_calibrator",
    "calibration_error",
    "calibration_metrics",
    "calibrator_from_state",
    "columns_to_results",
    "dece_metrics",
    "detection_outcomes",
    "evaluate_calibration",
    "fit_calibrator",
    "load_calibrator",
    "plot_reliability",
    "save_calibrator",
]

BINNINGS = ("uniform", "equal_mass")
#: Detection status from :func:`detection_outcomes`.
FP, TP, IGNORED = 0, 1, -1
_LOGIT_EPS = 1e-12


# ---------------------------------------------------------------------------------------------
# TP / FP status from the evaluator's matching


def detection_outcomes(
    gt, dets, iou_thr: float = 0.5, max_dets: int = 300, device=None, iou_type: str = "bbox"
) -> dict:
    """Status of every detection the evaluator keeps, at one IoU threshold, area range "all".

    Args: ``gt`` an LVIS / COCO json path or dict, or a loaded :class:`GroundTruth`; ``dets`` any
    input ``evaluate_lvis`` accepts (json path, result dicts, per-image tensor dicts) or
    :class:`DetColumns`.

    Returns dict of numpy arrays over the kept detections (input order): ``index`` (position in
    the input), ``score`` float64, ``category`` (index into ``gt.cat_ids``), ``status`` int8
    (1 TP, 0 FP, -1 ignored), and ``gt`` (the :class:`GroundTruth`). Detections the federated
    filter or the per-image cap drops are not in it.
    """
    t = _iou_index(iou_thr)
    check_iou_type(iou_type)
    device = torch.device(device or "cpu")
    gtd = gt if isinstance(gt, GroundTruth) else load_ground_truth(gt)
    cols = load_detections(dets)
    dt_geom, gt_geom = detection_geometry(iou_type, cols), gt_geometry(iou_type, gtd)
    det = sort_detections(select_detections(gtd, cols, max_dets, iou_type, dt_geom, device))
    gt_t, _ = gt_tensors(gtd, device)
    matched, matched_ig = match(det, gt_t, iou_type, dt_geom, gt_geom, device)
    m, mig = matched[t, 0], matched_ig[t, 0]
    # As the evaluator's accumulation: ignored = matched to an ignored gt, or unmatched and out of
    # the area range / of a not-exhaustive class.
    a_lo, a_hi = AREA_RNGS[0]
    unmatched_ignored = (det["area"] < a_lo) | (det["area"] > a_hi) | det["nel"]
    ignored = mig | (~m & unmatched_ignored)
    status = torch.where(
        ignored, torch.full_like(det["cat"], IGNORED), (m & ~mig).to(det["cat"].dtype)
    )
    back = torch.argsort(det["orig"])  # back to input order
    return dict(
        index=det["orig"][back].cpu().numpy(),
        score=det["score"][back].cpu().numpy(),
        category=det["cat"][back].cpu().numpy(),
        status=status[back].cpu().numpy().astype(np.int8),
        gt=gtd,
    )


def _iou_index(iou_thr: float) -> int:
    hit = np.flatnonzero(np.isclose(IOU_THRS, iou_thr))
    if hit.size != 1:
        raise ValueError(
            f"iou_thr must be one of the evaluator's thresholds "
            f"{np.round(IOU_THRS, 2).tolist()}, got {iou_thr!r}"
        )
    return int(hit[0])


def _groups(gtd: GroundTruth, train=None) -> tuple[list, np.ndarray | None]:
    """(r / c / f per class, training instance counts or None when not all known), from the
    evaluator's :func:`class_groups`."""
    cg = class_groups(gtd, train)
    inst = cg.instance_count
    if inst is not None and (np.asarray(inst) < 0).any():
        inst = None
    return cg.frequency, None if inst is None else np.asarray(inst)


# ---------------------------------------------------------------------------------------------
# D-ECE


def calibration_error(conf, correct, num_bins: int = 10, binning: str = "uniform") -> dict:
    """D-ECE / MCE of confidences ``conf`` [N] against 0/1 ``correct`` [N] (tensors or arrays).

    Returns ``{"D-ECE", "MCE", "count" [M], "confidence" [M], "precision" [M], "lo" [M],
    "hi" [M], "edges" [M+1] (uniform only)}`` (lists; the per-bin means of an empty bin are
    None; D-ECE and MCE are -1 without detections)."""
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    conf = torch.as_tensor(conf, dtype=torch.float64).reshape(-1)
    correct = torch.as_tensor(correct).reshape(-1).to(torch.float64)
    n, M = conf.shape[0], num_bins
    edges = torch.linspace(0.0, 1.0, M + 1, dtype=torch.float64)
    if binning == "uniform":
        b = torch.searchsorted(edges[1:-1].contiguous(), conf, right=False)
    else:
        srt = torch.sort(conf).values
        first = torch.searchsorted(srt, conf, right=False)  # first rank of an equal score
        b = (first * M) // max(n, 1)
    count = torch.bincount(b, minlength=M).to(torch.float64)
    s_conf = torch.zeros(M, dtype=torch.float64).index_add_(0, b, conf)
    s_corr = torch.zeros(M, dtype=torch.float64).index_add_(0, b, correct)
    lo = torch.full((M,), float("inf"), dtype=torch.float64).scatter_reduce(0, b, conf, "amin")
    hi = torch.full((M,), -float("inf"), dtype=torch.float64).scatter_reduce(0, b, conf, "amax")
    nz = count > 0
    mean_conf = torch.where(nz, s_conf / count.clamp(min=1), torch.zeros_like(s_conf))
    prec = torch.where(nz, s_corr / count.clamp(min=1), torch.zeros_like(s_corr))
    gap = (prec - mean_conf).abs()
    dece = float((count / max(n, 1) * gap).sum()) if n else -1.0
    mce = float(gap[nz].max()) if n else -1.0

    def per_bin(x):
        return [float(v) if ok else None for v, ok in zip(x.tolist(), nz.tolist())]

    out = {
        "D-ECE": dece,
        "MCE": mce,
        "count": count.long().tolist(),
        "confidence": per_bin(mean_conf),
        "precision": per_bin(prec),
        "lo": per_bin(lo),
        "hi": per_bin(hi),
    }
    if binning == "uniform":
        out["edges"] = edges.tolist()
    return out


def _group_masks(category: np.ndarray, freq: Sequence, instance_count) -> dict:
    freq_arr = np.array([f or "" for f in freq])
    masks = {"all": np.ones(category.shape[0], bool)}
    for g in FREQ_GROUPS:
        masks[g] = freq_arr[category] == g if category.size else np.zeros(0, bool)
    if instance_count is not None:
        bins = coco_lt_bins(instance_count)
        for i, name in enumerate(COCO_LT_BIN_NAMES):
            masks[name[2:]] = bins[category] == i if category.size else np.zeros(0, bool)
    return masks


def _key(metric: str, group: str) -> str:
    return metric if group == "all" else f"{metric}_{group}"


def evaluate_calibration(
    gt,
    dets,
    iou_thr: float = 0.5,
    num_bins: int = 10,
    binning: str = "uniform",
    max_dets: int = 300,
    device=None,
    train=None,
    min_score: float = 0.0,
    iou_type: str = "bbox",
) -> dict:
    """D-ECE and MCE overall, per r / c / f group and per COCO-LT bin, with reliability data.

    Args: as ``evaluate_lvis`` (``gt`` json path or dict; ``dets`` a result json path, result
    dicts or per-image tensor dicts; ``max_dets`` per image; ``train`` training json for the
    class groups of COCO-format gt), plus ``iou_thr`` (TP threshold, one of 0.50:0.05:0.95),
    ``num_bins`` and ``binning`` (``"uniform"`` or ``"equal_mass"``), ``min_score``: only
    detections scoring above it are binned (Kueppers et al. use 0.3; Dave et al.'s ``min_score``;
    default 0: every detection the evaluator counts). Matching still sees every detection, so a
    detection's status does not depend on ``min_score``.

    Returns: ``D-ECE``, ``MCE``, ``D-ECE_r`` / ``_c`` / ``_f``, ``MCE_r`` ..., ``D-ECE_1`` ..
    ``D-ECE_4`` (COCO-LT bins, when training instance counts are known); ``num_dets`` /
    ``num_tp`` per group (``{group: n}``, detections counted, ignored ones excluded),
    ``num_ignored``, ``reliability`` ``{group: calibration_error(...) per-bin data}`` and the
    settings ``iou_thr``, ``num_bins``, ``binning``. -1 = undefined (no detection in the group).
    """
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    if (
        device is None
        and isinstance(dets, (list, tuple))
        and dets
        and isinstance(dets[0], dict)
        and isinstance(dets[0].get("boxes"), torch.Tensor)
    ):
        device = dets[0]["boxes"].device
    out = detection_outcomes(
        gt, dets, iou_thr=iou_thr, max_dets=max_dets, device=device, iou_type=iou_type
    )
    freq, instance_count = _groups(out["gt"], train)
    counted = out["status"] != IGNORED
    if min_score > 0:  # with the default every score counts, 0 included
        counted &= out["score"] > min_score
    score, cat, tp = out["score"][counted], out["category"][counted], out["status"][counted] == TP
    res: dict[str, Any] = {}
    reliability, num_dets, num_tp = {}, {}, {}
    for g, mask in _group_masks(cat, freq, instance_count).items():
        ce = calibration_error(score[mask], tp[mask], num_bins, binning)
        res[_key("D-ECE", g)] = ce["D-ECE"]
        res[_key("MCE", g)] = ce["MCE"]
        reliability[g] = ce
        num_dets[g], num_tp[g] = int(mask.sum()), int(tp[mask].sum())
    res.update(
        num_dets=num_dets,
        num_tp=num_tp,
        num_ignored=int((out["status"] == IGNORED).sum()),
        reliability=reliability,
        iou_thr=float(iou_thr),
        num_bins=num_bins,
        binning=binning,
        min_score=float(min_score),
    )
    return res


def dece_metrics(cal: dict) -> dict:
    """The scalar D-ECE / MCE entries of an :func:`evaluate_calibration` result."""
    return {k: v for k, v in cal.items() if k.startswith(("D-ECE", "MCE"))}


#: The calibration entries of a run's metrics.json (with D-ECE_1 .. _4 where AP1 .. AP4 are).
REPORT_KEYS = ("D-ECE", "D-ECE_r", "D-ECE_c", "D-ECE_f", "MCE")


def calibration_metrics(cal: dict, coco_lt_bins: bool = False) -> dict:
    """The entries of a result that go into metrics.json and the metric table: D-ECE overall
    and per r / c / f, MCE, and D-ECE per COCO-LT bin when ``coco_lt_bins``."""
    keys = list(REPORT_KEYS) + (
        [f"D-ECE_{n[2:]}" for n in COCO_LT_BIN_NAMES] if coco_lt_bins else []
    )
    return {k: float(cal[k]) for k in keys if k in cal}


# ---------------------------------------------------------------------------------------------
# Calibrators


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
    from ltdet.fileio import atomic_write

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


# ---------------------------------------------------------------------------------------------
# Reliability diagram

_PANEL_NAMES = {"all": "all classes", "r": "rare", "c": "common", "f": "frequent"}


def plot_reliability(
    cal: dict, path, groups: Sequence[str] = ("r", "c", "f"), title: str | None = None
) -> None:
    """Reliability diagram PNG: one column per group (r / c / f), precision per confidence bin
    against the diagonal (top) and the confidence histogram (bottom)."""
    # Figure + Agg canvas directly: no pyplot, so no global backend switch in library code.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6 * len(groups), 6.0), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(
        2, len(groups), squeeze=False, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for j, g in enumerate(groups):
        top, bottom = axes[0, j], axes[1, j]
        rel = cal["reliability"].get(g)
        top.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--")
        if rel is not None:
            M = len(rel["count"])
            if "edges" in rel:
                left = np.asarray(rel["edges"][:-1])
                width = np.diff(rel["edges"])
            else:  # equal mass: bars span each bin's score range
                left = np.array([v if v is not None else np.nan for v in rel["lo"]])
                width = np.array([v if v is not None else np.nan for v in rel["hi"]]) - left
                width = np.maximum(np.nan_to_num(width), 0.005)
            prec = np.array([v if v is not None else 0.0 for v in rel["precision"]])
            conf = np.array([v if v is not None else np.nan for v in rel["confidence"]])
            count = np.asarray(rel["count"], np.float64)
            top.bar(
                left,
                prec,
                width=width,
                align="edge",
                color="tab:blue",
                alpha=0.75,
                edgecolor="k",
                lw=0.4,
                label="precision",
            )
            # The red mark is the bin's mean confidence: its distance to the bar top is the gap.
            top.scatter(
                left + width / 2,
                conf,
                s=12,
                marker="_",
                color="tab:red",
                zorder=3,
                linewidths=2,
                label="mean confidence",
            )
            bottom.bar(
                left, count, width=width, align="edge", color="tab:gray", edgecolor="k", lw=0.4
            )
            if count.sum() > 0:
                bottom.set_yscale("log")  # most detections sit in the lowest bin
            d = cal.get(_key("D-ECE", g), -1)
            n = cal.get("num_dets", {}).get(g, int(count.sum()))
            label = f"D-ECE {d:.3f}" if d != -1 else "no detections"
            top.set_title(f"{_PANEL_NAMES.get(g, g)}: {label} (n={n}, {M} bins)", fontsize=9)
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("precision (TP fraction)")
        bottom.set_xlabel("confidence")
        bottom.set_ylabel("detections (log)")
        if j == 0:
            top.legend(loc="upper left", fontsize=7)
    fig.suptitle(
        title
        or f"Reliability at IoU {cal.get('iou_thr', 0.5):g} ({cal.get('binning', 'uniform')} bins)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(os.fspath(path))
