"""AlexNet in PyTorch, built from the same layer specs as model.py: the reference that weight
conversion is tested against and that benchmarks/compare_pytorch.py times, and `to_torch`, our
parameters as its state dict. Needs torch (`pip install -e ".[torch]"`).

`build("owt")` has torchvision's module structure and state-dict keys (`features.0.weight` ...
`classifier.6.bias`), so torchvision's own `.pth` files load into it; `build("paper")` is the
2012 model: two towers as grouped convolutions, the paper's LRN within each tower, dropout after
fc6 and fc7.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from alexnet_jax import convert_torchvision
from alexnet_jax.model import FC_FEATURES, OWT_CONVS, PAPER_CONVS, VARIANTS
from alexnet_jax.ops import LRN_ALPHA, LRN_BETA, LRN_K, LRN_N


class TowerLRN(nn.Module):
    """Paper section 3.3 summed over the channels of each tower (ops.lrn).
    torch divides alpha by the window size, the paper does not: hence alpha * n."""

    def __init__(self, towers: int):
        super().__init__()
        self.towers = towers
        self.lrn = nn.LocalResponseNorm(LRN_N, alpha=LRN_ALPHA * LRN_N, beta=LRN_BETA, k=LRN_K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.lrn(t) for t in x.chunk(self.towers, dim=1)], dim=1)


class AlexNet(nn.Module):
    """torchvision's layout: `features`, `avgpool` (the identity at the model's input size),
    `classifier`; NCHW float input, logits out."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build(variant: str = "owt", num_classes: int = 1000, dropout: float = 0.5) -> AlexNet:
    """The full-width model of `variant` ('paper': 2 towers, LRN; 'owt': torchvision's)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; use one of {VARIANTS}.")
    paper = variant == "paper"
    towers = 2 if paper else 1
    layers: list[nn.Module] = []
    channels = 3
    for spec in PAPER_CONVS if paper else OWT_CONVS:
        groups = towers if spec.grouped else 1
        layers += [
            nn.Conv2d(
                channels, spec.features, spec.kernel, spec.stride, spec.padding, groups=groups
            ),
            nn.ReLU(inplace=True),
        ]
        if spec.lrn and paper:
            layers.append(TowerLRN(towers))
        if spec.pool:
            layers.append(nn.MaxPool2d(3, 2))
        channels = spec.features
    fc = [
        nn.Linear(channels * 36, FC_FEATURES),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(FC_FEATURES, FC_FEATURES),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(FC_FEATURES, num_classes),
    ]
    if not paper:  # torchvision's order: dropout before fc6 and fc7 (model.py's owt variant)
        fc = [fc[2], fc[0], fc[1], fc[5], fc[3], fc[4], fc[6]]
    return AlexNet(nn.Sequential(*layers), nn.Sequential(*fc))


def to_torch(params: Mapping[str, Any], keys: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The inverse of convert_torchvision.from_torch, under the torch names `keys`
    (convert_torchvision.layer_keys)."""
    out = {}
    conv5_channels = np.shape(params["conv5"]["kernel"])[-1]
    for name in convert_torchvision.CONVS + convert_torchvision.DENSES:
        k = np.asarray(params[name]["kernel"], np.float32)
        if name == "fc6":
            k = convert_torchvision.fc6_rows(k, conv5_channels, "hwc", "chw")
        out[keys[name] + ".weight"] = k.transpose(3, 2, 0, 1) if k.ndim == 4 else k.T
        out[keys[name] + ".bias"] = np.asarray(params[name]["bias"], np.float32)
    return {k: np.array(v, np.float32, order="C") for k, v in out.items()}  # writable copies
