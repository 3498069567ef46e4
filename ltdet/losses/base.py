"""Base modules shared by the loss families: input checks and the default score activations.

Classification losses take `logits [N, C+1]` (column 0 = background, torchvision's layout) and
`labels int64 [N]` in `[0, C]` (0 = background). Regression losses take `pred [P, 4]` and
`target [P, 4]` (box deltas, or decoded xyxy boxes when `needs_boxes` is True).
"""
import torch
import torch.nn as nn


def classes_from_stats(stats, num_classes=None) -> int:
    """C, the number of foreground classes, of losses built from class statistics; a given
    `num_classes` must agree. The base class's `check_inputs` then checks the logits' width, so
    stats-based losses need no check of their own."""
    stats_c = int(stats.instance_count.numel())
    if num_classes is not None and int(num_classes) != stats_c:
        raise ValueError(f"num_classes={num_classes} but the class statistics have {stats_c} "
                         f"classes; build both from the same training json")
    return stats_c


class ClassificationLoss(nn.Module):
    """Softmax-family base: `activation` is a softmax over all C+1 columns."""

    use_sigmoid = False

    def __init__(self, *, num_classes=None, loss_weight=1.0):
        super().__init__()
        self.num_classes = num_classes
        self.loss_weight = float(loss_weight)

    def check_inputs(self, logits, labels):
        """Shape and label-range checks; one cheap min/max per step."""
        if logits.dim() != 2:
            raise ValueError(f"{type(self).__name__}: logits must be [N, C+1], got shape "
                             f"{list(logits.shape)}")
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(f"{type(self).__name__}: labels must be [N] = [{logits.shape[0]}], "
                             f"got shape {list(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"{type(self).__name__}: labels must be an integer tensor, got {labels.dtype}")
        num_columns = logits.shape[1]
        if self.num_classes is not None and num_columns != self.num_classes + 1:
            raise ValueError(
                f"{type(self).__name__} was built for num_classes={self.num_classes} (C+1 = "
                f"{self.num_classes + 1} logit columns, column 0 = background) but got {num_columns} "
                f"columns; the box predictor and the loss must agree on num_classes")
        if labels.numel():
            low, high = torch.stack(torch.aminmax(labels)).tolist()  # one host sync per step
            if low < 0 or high >= num_columns:
                raise ValueError(
                    f"{type(self).__name__}: labels must lie in [0, {num_columns - 1}] (0 = "
                    f"background, 1..C = classes) but range over [{low}, {high}]")

    def activation(self, logits):
        """Scores `[N, C+1]` for postprocessing: softmax over background and classes."""
        return logits.softmax(dim=-1)


class SigmoidClassificationLoss(ClassificationLoss):
    """Base of losses with one independent sigmoid per foreground class (columns 1..C).

    Column 0 receives no gradient. `activation` returns `sigmoid(z_j)` in columns 1..C and, in
    column 0 (which torchvision's postprocess drops), `1 - max_j sigmoid(z_j)`: the probability
    that the most likely class is absent, a background score consistent with the foreground ones.
    """

    use_sigmoid = True

    def activation(self, logits):
        fg = logits[:, 1:].sigmoid()
        if fg.shape[1] == 0:
            return torch.ones_like(logits)
        return torch.cat([1.0 - fg.max(dim=1, keepdim=True).values, fg], dim=1)


def one_hot_targets(labels, num_columns, dtype):
    """One-hot targets `[N, C+1]` over all columns; column 0 is 1 for background RoIs."""
    target = torch.zeros(labels.shape[0], num_columns, dtype=dtype, device=labels.device)
    target.scatter_(1, labels.view(-1, 1), 1.0)
    return target


def foreground_targets(labels, num_classes, dtype):
    """Sigmoid targets `[N, C]` of the foreground columns 1..C; all zero for background RoIs."""
    target = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    is_fg = (labels > 0).to(dtype).unsqueeze(1)
    # Background rows scatter a 0 into column 0, leaving them all-negative.
    target.scatter_(1, (labels - 1).clamp_min(0).unsqueeze(1), is_fg)
    return target


def pad_background(loss_fg):
    """`[N, C]` foreground-column loss -> `[N, C+1]` with an exact zero in column 0."""
    return torch.nn.functional.pad(loss_fg, (1, 0))


class RegressionLoss(nn.Module):
    """Box regression base: `pred` and `target` are `[P, 4]`."""

    needs_boxes = False

    def __init__(self, *, loss_weight=1.0):
        super().__init__()
        self.loss_weight = float(loss_weight)

    def check_inputs(self, pred, target):
        if pred.shape != target.shape or pred.dim() != 2 or pred.shape[1] != 4:
            raise ValueError(f"{type(self).__name__}: pred and target must both be [P, 4], got "
                             f"{list(pred.shape)} and {list(target.shape)}")
