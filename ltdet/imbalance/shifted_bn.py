"""BatchNorm modes for decoupled (stage-2) training: frozen and shifted.

- :func:`freeze_batchnorm` replaces every ``BatchNorm2d`` / ``SyncBatchNorm`` in a module by
  torchvision's ``FrozenBatchNorm2d`` carrying the same affine parameters, running statistics and
  eps. A frozen BN is therefore locked in inference behaviour whatever ``model.train()`` does,
  and its values are bit-identical to stage 1's (they become buffers).
- :func:`shift_batchnorm` is MiSLAS's shifted batch normalisation (Zhong et al., "Improving
  Calibration for Long-Tailed Recognition", CVPR 2021, Sec. 3.3): in stage 2 the BN layers keep
  updating their running mean / variance on the re-balanced data, while their affine parameters
  (gamma, beta) stay frozen. The layers stay ordinary ``nn.BatchNorm*`` modules in train mode;
  only ``requires_grad`` of their affine parameters is switched off.

Both work on any ``nn.Module`` (feature maps ``[N, C, H, W]`` for the frozen variant).
"""

from __future__ import annotations

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ltdet.compat import BatchNormBase

__all__ = ["freeze_batchnorm", "shift_batchnorm"]


def _frozen_copy(bn: BatchNormBase, name: str) -> FrozenBatchNorm2d:
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"freeze_batchnorm: BatchNorm {name!r} has no running statistics "
            "(track_running_stats=False); it cannot be frozen into inference mode"
        )
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    frozen.running_mean.copy_(bn.running_mean.detach())
    frozen.running_var.copy_(bn.running_var.detach())
    if bn.affine:
        frozen.weight.copy_(bn.weight.detach())
        frozen.bias.copy_(bn.bias.detach())
    return frozen.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)


def freeze_batchnorm(module: nn.Module, *, name: str = "") -> nn.Module:
    """Replace the BatchNorm2d / SyncBatchNorm layers in ``module`` by ``FrozenBatchNorm2d``.

    Returns ``module`` (changed in place), or the frozen replacement when ``module`` itself is a
    BatchNorm layer. BatchNorm1d/3d (absent from torchvision detectors) raise a ``TypeError``.
    """
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return _frozen_copy(module, name or type(module).__name__)
    if isinstance(module, BatchNormBase):
        raise TypeError(
            f"freeze_batchnorm: {name or 'module'} is {type(module).__name__}; "
            "only BatchNorm2d and SyncBatchNorm (the layers of torchvision detectors) can be frozen"
        )
    for child_name, child in list(module.named_children()):
        full = f"{name}.{child_name}" if name else child_name
        frozen = freeze_batchnorm(child, name=full)
        if frozen is not child:
            setattr(module, child_name, frozen)
    return module


def shift_batchnorm(module: nn.Module) -> list[str]:
    """Put the BatchNorm layers of ``module`` in shifted-BN mode; returns their names.

    Affine parameters get ``requires_grad=False``; running statistics keep updating whenever the
    module is in train mode (momentum as configured on each layer). An empty list means
    ``module`` has no BatchNorm (e.g. the default ``TwoMLPHead`` box head): the caller should
    tell the user that shifted BN has no effect.
    """
    names = []
    for name, m in module.named_modules():
        if isinstance(m, BatchNormBase):
            if not m.track_running_stats:
                raise ValueError(
                    f"shift_batchnorm: BatchNorm {name!r} has track_running_stats=False; "
                    "shifted BN needs running statistics to shift"
                )
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            names.append(name)
    return names
