"""AlexNet (Krizhevsky, Sutskever, Hinton 2012) and the "one weird trick" variant, in Flax linen.

The module computes the towers it is given. On one device it holds every tower; under
`jax.shard_map` (see parallel.py) it is built with `tower_axis` naming the mesh axis the towers are
split over and `tower_shards` its size, and then declares and computes only its own slice of each
layer, gathering over `tower_axis` exactly where the paper's GPUs talked: at conv3, fc6, fc7, fc8.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alexnet_jax import ops
from alexnet_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    name: str
    features: int  # paper width, all towers together
    kernel: int
    stride: int
    padding: int
    grouped: bool  # True: sees only its own tower's input channels
    lrn: bool
    pool: bool


PAPER_CONVS = (
    ConvSpec("conv1", 96, 11, 4, 0, False, True, True),
    ConvSpec("conv2", 256, 5, 1, 2, True, True, True),
    ConvSpec("conv3", 384, 3, 1, 1, False, False, False),
    ConvSpec("conv4", 384, 3, 1, 1, True, False, False),
    ConvSpec("conv5", 256, 3, 1, 1, True, False, True),
)
# The paper's one-GPU comparison net (section 3.2 and its footnote): "half as many kernels in
# each convolutional layer", except conv5, kept whole (as are the fully connected layers) so
# that both nets have about the same number of parameters, on one tower.
ONE_GPU_CONVS = tuple(
    c if c.name == "conv5" else dataclasses.replace(c, features=c.features // 2, grouped=False)
    for c in PAPER_CONVS
)
# Krizhevsky 2014 / torchvision: no LRN, one tower, conv1 padded by 2 for 224 inputs.
OWT_CONVS = (
    ConvSpec("conv1", 64, 11, 4, 2, False, False, True),
    ConvSpec("conv2", 192, 5, 1, 2, False, False, True),
    ConvSpec("conv3", 384, 3, 1, 1, False, False, False),
    ConvSpec("conv4", 256, 3, 1, 1, False, False, False),
    ConvSpec("conv5", 256, 3, 1, 1, False, False, True),
)
FC_FEATURES = 4096
VARIANTS = ("paper", "one_gpu", "owt")
DTYPES = ("float32", "bfloat16")
ACTIVATIONS = ("relu", "tanh")
WEIGHT_INITS = ("paper", "he")


def per_tower(features: int, width: float, towers: int) -> int:
    """Channels of one tower: the paper's count scaled by `width`, rounded to an even number."""
    return max(2, 2 * round(features * width / towers / 2))


def _pool_out(size: int, overlap: bool) -> int:
    window = 3 if overlap else 2
    return (size - window) // 2 + 1


def _dtype_name(dtype: Any) -> str | None:
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        return None


def _kernel_init(init: str) -> Any:
    return nn.initializers.normal(stddev=0.01) if init == "paper" else nn.initializers.he_normal()


class _Weights(nn.Module):
    """One layer's {'kernel', 'bias'}; the layer's computation stays in AlexNet."""

    shape: tuple[int, ...]
    weight_init: str
    bias_value: float

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", _kernel_init(self.weight_init), self.shape, jnp.float32)
        bias_init = nn.initializers.constant(
            self.bias_value if self.weight_init == "paper" else 0.0
        )
        return kernel, self.param("bias", bias_init, (self.shape[-1],), jnp.float32)


class AlexNet(nn.Module):
    """AlexNet on float NHWC inputs that are already normalised; returns float32 logits.

    Parameter layout (whatever the mesh): conv kernels HWIO, grouped convs in the layout of
    `nn.Conv(feature_group_count=towers)`, output channels [0:C/towers] belong to tower 0.

    The fields up to `weight_init` are the config's `model` keys: a new model option is one
    field here (validated in `_check`) and one line in configs/alexnet.py.
    """

    variant: str = "paper"  # 'paper' (2012), 'one_gpu' (its comparison net) or 'owt'
    num_classes: int = 1000
    towers: int | None = None  # None: 2 for 'paper', 1 for the others
    width: float = 1.0  # channel multiplier
    activation: str = "relu"  # 'relu' or 'tanh' (the paper's figure 1 ablation)
    lrn: bool | None = None  # None: off for 'owt', on for the others
    overlap_pool: bool = True  # 3x3 stride 2 windows (the paper) or 2x2 stride 2
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32  # compute dtype or its name; parameters stay float32
    weight_init: str = "paper"  # 'paper': N(0, 0.01) and biases of 1; 'he': He-normal, zero biases
    tower_axis: str | None = None  # mesh axis the towers are split over (set by parallel.py)
    tower_shards: int = 1  # size of tower_axis
    # The ops ('lrn', 'pool') whose custom backward passes (ops.py) run: 'auto' (per backend,
    # ops.AUTO_FAST), 'all', 'none', 'lrn' or 'pool'; the others are traced plainly.
    fast_ops: str = "auto"
    # Ops traced with their plain definitions, which JAX differentiates itself, whatever
    # fast_ops says: an ablation (benchmarks/train_step.py).
    plain_ops: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, fields: Mapping[str, Any], **more: Any) -> AlexNet:
        """The module for a config's `model` section, whose keys are this module's fields
        (`more`: fields that are not config keys, e.g. plain_ops)."""
        return cls(**fields, **more)

    def __post_init__(self) -> None:
        self._check()
        super().__post_init__()

    def _check(self) -> None:
        """Every field's validation, as a UsageError naming the config key and the fix."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UsageError(message)

        need(
            self.variant in VARIANTS,
            f"model.variant={self.variant!r} is unknown; use one of {VARIANTS}.",
        )
        need(self.towers in (None, 1, 2), f"model.towers={self.towers} must be 1 or 2.")
        need(
            self.variant == "paper" or self.num_towers == 1,
            f"model.variant={self.variant!r} has no towers: towers=1.",
        )
        need(self.width > 0, f"model.width={self.width} must be positive.")
        need(self.num_classes > 0, f"model.num_classes={self.num_classes} must be positive.")
        need(
            self.activation in ACTIVATIONS,
            f"model.activation={self.activation!r} is unknown; use one of {ACTIVATIONS}.",
        )
        need(
            _dtype_name(self.dtype) in DTYPES,
            f"model.dtype={self.dtype!r} is unknown; use one of {DTYPES}.",
        )
        need(
            self.weight_init in WEIGHT_INITS,
            f"model.weight_init={self.weight_init!r} is unknown; use one of {WEIGHT_INITS}.",
        )
        need(
            0 <= self.dropout_rate < 1,
            f"model.dropout_rate={self.dropout_rate} must be in [0, 1).",
        )
        need(
            self.fast_ops in ops.FAST_CHOICES,
            f"model.fast_ops={self.fast_ops!r} is unknown; use one of {ops.FAST_CHOICES}.",
        )
        unknown = sorted(set(self.plain_ops) - set(ops.PLAIN_CHOICES))
        need(not unknown, f"unknown ops {unknown}; choose from {ops.PLAIN_CHOICES}")
        need(
            self.tower_shards >= 1 and self.num_towers % self.tower_shards == 0,
            f"{self.num_towers} towers do not split over {self.tower_shards} devices.",
        )

    @property
    def traced_plain(self) -> frozenset[str]:
        """The ops traced with their plain definitions on the backend JAX computes on."""
        return frozenset(self.plain_ops) | set(ops.plain_for(self.fast_ops, jax.default_backend()))

    @property
    def num_towers(self) -> int:
        return self.towers if self.towers is not None else (2 if self.variant == "paper" else 1)

    @property
    def use_lrn(self) -> bool:
        return self.lrn if self.lrn is not None else self.variant != "owt"

    @property
    def convs(self) -> tuple[ConvSpec, ...]:
        return {"paper": PAPER_CONVS, "one_gpu": ONE_GPU_CONVS, "owt": OWT_CONVS}[self.variant]

    @property
    def fc8_shards(self) -> int:
        """fc8 is split over the tower axis when the classes divide evenly, else replicated."""
        return self.tower_shards if self.num_classes % self.tower_shards == 0 else 1

    def fc_features(self) -> int:
        return per_tower(FC_FEATURES, self.width, self.num_towers) * self.num_towers

    def feature_shapes(self, image_size: int) -> list[tuple[str, tuple[int, int, int]]]:
        """(name, (H, W, C)) of every conv and pool output, all towers together, untraced."""
        shapes, size = [], image_size
        for spec in self.convs:
            size = (size + 2 * spec.padding - spec.kernel) // spec.stride + 1
            channels = per_tower(spec.features, self.width, self.num_towers) * self.num_towers
            shapes.append((spec.name, (size, size, channels)))
            if spec.pool:
                size = _pool_out(size, self.overlap_pool)
                shapes.append((f"{spec.name}_pool", (size, size, channels)))
        return shapes

    def min_image_size(self) -> int:
        """The smallest input whose last pooling still has an output (67 for the paper)."""
        size = 1
        while self.feature_shapes(size)[-1][1][0] < 1:
            size += 1
        return size

    def dropout_features(self, image_size: int) -> tuple[int, int]:
        """Global feature sizes of the two dropout masks (paper: fc6, fc7 outputs; owt: inputs)."""
        if self.variant != "owt":
            return (self.fc_features(), self.fc_features())
        h, w, c = self.feature_shapes(image_size)[-1][1]
        return (h * w * c, self.fc_features())

    def _gather(self, x: jax.Array) -> jax.Array:
        """The paper's cross-GPU connection: every tower's channels, tower 0 first."""
        if self.tower_axis is None or self.tower_shards == 1:
            return x
        return jax.lax.all_gather(x, self.tower_axis, axis=x.ndim - 1, tiled=True)

    def _param(self, name: str, shape: Sequence[int], bias_value: float) -> tuple[Any, Any]:
        return _Weights(tuple(shape), self.weight_init, bias_value, name=name)()

    def _act(self, x: jax.Array) -> jax.Array:
        return nn.relu(x) if self.activation == "relu" else jnp.tanh(x)

    def _conv(self, spec: ConvSpec, x: jax.Array, bias_value: float) -> jax.Array:
        towers = self.num_towers
        local_towers = towers // self.tower_shards
        out_local = per_tower(spec.features, self.width, towers) * local_towers
        groups = local_towers if spec.grouped else 1
        in_channels = x.shape[-1] // groups
        kernel, bias = self._param(
            spec.name, (spec.kernel, spec.kernel, in_channels, out_local), bias_value
        )
        pad = [(spec.padding, spec.padding)] * 2
        # Each tower is a dense conv on its own channels: XLA runs that far better than
        # feature_group_count, whose backward pass is several times slower on CPU.
        outs = [
            jax.lax.conv_general_dilated(
                xg.astype(self.dtype),
                kg.astype(self.dtype),
                (spec.stride, spec.stride),
                pad,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            for xg, kg in zip(
                jnp.split(x, groups, axis=-1), jnp.split(kernel, groups, axis=-1), strict=True
            )
        ]
        y = outs[0] if groups == 1 else jnp.concatenate(outs, axis=-1)
        return y + bias.astype(self.dtype)[None, None, None, :]

    def _dense(
        self, name: str, x: jax.Array, features: int, bias_value: float, out_dtype: Any = None
    ) -> jax.Array:
        """x @ kernel + bias in the compute dtype, accumulated and returned in `out_dtype`."""
        kernel, bias = self._param(name, (x.shape[-1], features), bias_value)
        y = jnp.dot(
            x.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=out_dtype
        )
        return y + bias.astype(y.dtype)[None, :]

    def _dropout(self, x: jax.Array, mask: jax.Array | None, train: bool) -> jax.Array:
        if not train or self.dropout_rate == 0.0:
            return x
        keep = 1.0 - self.dropout_rate
        if mask is None:
            if self.tower_shards != 1:
                raise ValueError("Sharded towers need dropout masks drawn for the global batch.")
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
        return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool = False,
        dropout_masks: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        masks = dropout_masks if dropout_masks is not None else (None, None)
        towers, local_towers = self.num_towers, self.num_towers // self.tower_shards
        window = 3 if self.overlap_pool else 2
        paper_bias = {"conv2": 1.0, "conv4": 1.0, "conv5": 1.0}
        for spec in self.convs:
            if spec.name == "conv3":
                x = self._gather(x)
            x = self._act(self._conv(spec, x, paper_bias.get(spec.name, 0.0)))
            if spec.lrn and self.use_lrn:
                plain = "lrn" in self.traced_plain
                x = ops.local_response_norm(x, local_towers, plain).astype(self.dtype)
            self.sow("intermediates", f"{spec.name}_map", x)  # feature maps, for inspection
            if spec.pool:
                x = ops.pool(x, window, 2, "pool" in self.traced_plain)
                self.sow("intermediates", f"{spec.name}_pool", x)

        fc_local = per_tower(FC_FEATURES, self.width, towers) * local_towers
        x = self._gather(x).reshape(x.shape[0], -1)  # H, W, C order
        if self.variant == "owt":  # torchvision's order: dropout before fc6 and fc7
            x = self._dropout(x, masks[0], train)
            x = self._act(self._dense("fc6", x, fc_local, 0.0))
            x = self._dropout(x, masks[1], train)
            x = self._act(self._dense("fc7", self._gather(x), fc_local, 0.0))
        else:  # the paper's: dropout zeroes the outputs of fc6 and fc7 (section 4.2)
            x = self._dropout(self._act(self._dense("fc6", x, fc_local, 1.0)), masks[0], train)
            x = self._dropout(
                self._act(self._dense("fc7", self._gather(x), fc_local, 1.0)), masks[1], train
            )
        # The logits feed a softmax over 1,000 classes: accumulate them in float32 even under
        # bfloat16 compute, where a bfloat16 sum of 4,096 products keeps 8 bits.
        classes = self.num_classes // self.fc8_shards
        return self._dense("fc8", self._gather(x), classes, 0.0, out_dtype=jnp.float32)


def param_count(params: Any) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def layer_table(model: AlexNet, params: Any, image_size: int) -> str:
    """Each layer's output shape and parameter count, for the log of a run's start."""
    shapes = dict(model.feature_shapes(image_size))
    rows = [("layer", "output", "parameters")]
    for name, layer in params.items():
        out = shapes.get(name)
        rows.append(
            (
                name,
                "x".join(map(str, out)) if out else str(layer["kernel"].shape[-1]),
                f"{param_count(layer):,}",
            )
        )
        if f"{name}_pool" in shapes:
            rows.append((f"  {name} pool", "x".join(map(str, shapes[f"{name}_pool"])), ""))
    rows.append(("total", "", f"{param_count(params):,}"))
    return "\n".join(f"{a:<12} {b:>12} {c:>14}" for a, b, c in rows)
