"""AlexNet: parameter counts, feature maps, LRN, tower convs, init, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import UsageError
from alexnet_jax.model import AlexNet, param_count
from alexnet_jax.ops import lrn as local_response_norm
from configs import alexnet, digits, owt


def init_params(model: AlexNet, image_size: int, seed: int = 0) -> dict:
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.jit(lambda key: model.init(key, x, train=False)["params"])(jax.random.PRNGKey(seed))


PAPER_MAPS = {
    "conv1": (55, 55, 96),
    "conv1_pool": (27, 27, 96),
    "conv2": (27, 27, 256),
    "conv2_pool": (13, 13, 256),
    "conv3": (13, 13, 384),
    "conv4": (13, 13, 384),
    "conv5": (13, 13, 256),
    "conv5_pool": (6, 6, 256),
}


@pytest.mark.parametrize(
    "kwargs, image_size, expected",
    [
        ({}, 227, 60_965_224),  # the paper's two-tower model
        ({"variant": "owt"}, 224, 61_100_840),  # torchvision's alexnet
        ({"towers": 1}, 227, 62_378_344),  # ungrouped paper widths: the "62.3 million"
        # The paper's one-GPU comparison net: conv1-conv4 halved, conv5 and the fully connected
        # layers whole ("approximately the same number of parameters", section 3.2).
        ({"variant": "one_gpu", "towers": 1}, 227, 59_798_312),
    ],
)
def test_parameter_counts(kwargs, image_size, expected):
    shapes = jax.eval_shape(lambda: init_params(AlexNet(**kwargs), image_size))
    assert param_count(shapes) == expected


def test_parameter_tree_layout():
    p = jax.eval_shape(lambda: init_params(AlexNet(), 227))
    assert list(p) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    assert all(set(layer) == {"kernel", "bias"} for layer in p.values())
    assert p["conv2"]["kernel"].shape == (5, 5, 48, 256)
    assert p["conv4"]["kernel"].shape == (3, 3, 192, 384)
    assert p["conv5"]["kernel"].shape == (3, 3, 192, 256)
    assert p["conv3"]["kernel"].shape == (3, 3, 256, 384)
    assert p["fc6"]["kernel"].shape == (9216, 4096)


def test_feature_maps_of_the_traced_model():
    model = AlexNet()
    x = jax.ShapeDtypeStruct((2, 227, 227, 3), jnp.float32)

    def run(x):
        params = init_params(model, 227)
        return model.apply({"params": params}, x, mutable="intermediates")

    logits, state = jax.eval_shape(run, x)
    maps = {k.removesuffix("_map"): v[0].shape[1:] for k, v in state["intermediates"].items()}
    assert maps == PAPER_MAPS
    assert logits.shape == (2, 1000)
    assert dict(model.feature_shapes(227)) == PAPER_MAPS


def test_smallest_input():
    assert AlexNet().min_image_size() == 67
    assert AlexNet().feature_shapes(67)[-1][1][:2] == (1, 1)
    assert AlexNet().feature_shapes(66)[-1][1][0] < 1


def test_plain_pooling_keeps_the_paper_shapes():
    # Section 3.4 compares s=2, z=3 with s=2, z=2 "which produces output of equivalent dimensions".
    assert dict(AlexNet(overlap_pool=False).feature_shapes(227)) == PAPER_MAPS


def test_width_rounds_each_tower_to_even_channels():
    shapes = AlexNet(width=0.3).feature_shapes(227)
    assert dict(shapes)["conv1"][2] == 2 * 14  # 96 * 0.3 / 2 = 14.4 -> 14 per tower
    assert all(c % 4 == 0 for _, (_, _, c) in shapes)


@pytest.mark.parametrize(
    "config, image_size, expected",
    [(alexnet, 227, 60_965_224), (owt, 224, 61_100_840), (digits, 99, None)],
)
def test_a_configs_model_section_is_the_module(config, image_size, expected):
    fields = config.get_config().model
    model = AlexNet.from_config(fields)
    for key, value in fields.items():  # every key is a field of the module, taken as it is
        assert getattr(model, key) == value, key
    if expected is not None:
        shapes = jax.eval_shape(lambda: init_params(model, image_size))
        assert param_count(shapes) == expected


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"variant": "vgg"}, "model.variant='vgg' is unknown"),
        ({"towers": 3}, "model.towers=3 must be 1 or 2"),
        ({"variant": "owt", "towers": 2}, "model.variant='owt' has no towers"),
        ({"width": 0.0}, "model.width=0.0 must be positive"),
        ({"num_classes": 0}, "model.num_classes=0 must be positive"),
        ({"activation": "gelu"}, "model.activation='gelu' is unknown"),
        ({"dtype": "float16"}, "model.dtype='float16' is unknown"),
        ({"dtype": "no-such-type"}, "model.dtype='no-such-type' is unknown"),
        ({"weight_init": "xavier"}, "model.weight_init='xavier' is unknown"),
        ({"dropout_rate": 1.0}, r"model.dropout_rate=1.0 must be in \[0, 1\)"),
    ],
)
def test_each_field_is_checked_when_the_module_is_built(fields, message):
    with pytest.raises(UsageError, match=message):
        AlexNet(**fields)


def _lrn_reference(a: np.ndarray, towers: int) -> np.ndarray:
    """Paper section 3.3, literally, with the sum over adjacent channels of the same tower:
    k = 2, n = 5, alpha = 1e-4, beta = 0.75 (written here, not taken from the module)."""
    c = a.shape[-1]
    per = c // towers
    out = np.empty_like(a)
    for i in range(c):
        t = i // per
        lo, hi = max(t * per, i - 5 // 2), min((t + 1) * per - 1, i + 5 // 2)
        s = sum(a[..., j] ** 2 for j in range(lo, hi + 1))
        out[..., i] = a[..., i] / (2.0 + 1e-4 * s) ** 0.75
    return out


@pytest.mark.parametrize("towers", [1, 2])
def test_lrn_matches_the_papers_formula(towers):
    a = np.random.default_rng(0).normal(0, 30, (2, 3, 3, 16)).astype(np.float32)
    got = np.asarray(local_response_norm(jnp.asarray(a), towers))
    want = _lrn_reference(a.astype(np.float64), towers)
    assert np.abs(got - a).max() > 1.0  # the normalisation does something at this scale
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_lrn_does_not_mix_towers():
    a = np.zeros((1, 1, 1, 8), np.float32)
    a[..., 4] = 100.0  # first channel of tower 1
    b = np.asarray(local_response_norm(jnp.asarray(a + 1.0), towers=2))
    c = np.asarray(local_response_norm(jnp.asarray(np.ones_like(a)), towers=2))
    np.testing.assert_array_equal(b[..., :4], c[..., :4])  # tower 0 unaffected
    assert b[..., 5] < c[..., 5]  # its own neighbour is


def test_tower_convs_equal_a_grouped_convolution():
    model = AlexNet(num_classes=10, width=0.25, dropout_rate=0.0)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 67, 67, 3))
    params = init_params(model, 67, seed=2)
    _, state = model.apply({"params": params}, x, mutable="intermediates")
    inter = {k.removesuffix("_map"): v[0] for k, v in state["intermediates"].items()}

    def grouped(name, inp):
        pad = 2 if name == "conv2" else 1
        y = jax.lax.conv_general_dilated(
            inp,
            params[name]["kernel"],
            (1, 1),
            [(pad, pad)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=2,
            precision="highest",
        )
        return jax.nn.relu(y + params[name]["bias"][None, None, None, :])

    # conv2, conv4 and conv5 see only their own tower: a feature_group_count=2 conv.
    for name, prev in (("conv2", "conv1_pool"), ("conv4", "conv3"), ("conv5", "conv4")):
        want = grouped(name, inter[prev])
        if name == "conv2":  # conv2 is followed by LRN before it is recorded
            want = local_response_norm(want, 2)
        a = inter[prev]
        swapped = jnp.concatenate(jnp.split(a, 2, -1)[::-1], -1)
        assert not np.allclose(grouped(name, swapped), want)  # the grouping matters
        np.testing.assert_allclose(inter[name], want, rtol=1e-5, atol=1e-5)


def test_paper_init():
    params = init_params(AlexNet(num_classes=10, width=0.25), 67, seed=0)
    for name in ("conv1", "conv3", "fc8"):
        assert np.all(params[name]["bias"] == 0.0)
    for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        assert np.all(params[name]["bias"] == 1.0)
    k = np.asarray(params["fc6"]["kernel"])
    assert abs(k.std() - 0.01) < 5e-4 and abs(k.mean()) < 5e-4


def test_he_init():
    params = init_params(AlexNet(num_classes=10, width=0.25, weight_init="he"), 67, seed=0)
    assert all(np.all(layer["bias"] == 0.0) for layer in params.values())
    k = np.asarray(params["conv3"]["kernel"])  # fan_in = 3 * 3 * 24 channels
    assert abs(k.std() - np.sqrt(2.0 / (9 * k.shape[2]))) < 0.1 * np.sqrt(2.0 / (9 * k.shape[2]))


def test_dropout_sits_after_fc6_and_fc7_in_the_paper_and_before_in_owt():
    for variant, towers, expected in (("paper", 2, (64, 64)), ("owt", 1, (16, 64))):
        model = AlexNet(variant=variant, towers=towers, num_classes=10, width=1 / 64)
        assert model.dropout_features(67 if variant == "paper" else 95) == expected
    model = AlexNet(num_classes=10, width=1 / 64, weight_init="he")  # inputs matter
    params = init_params(model, 67)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 67, 67, 3))
    keep = (jnp.ones((4, 64), bool), jnp.ones((4, 64), bool))
    drop = (jnp.zeros((4, 64), bool), jnp.ones((4, 64), bool))
    apply = jax.jit(lambda m: model.apply({"params": params}, x, train=True, dropout_masks=m))
    full, zeroed = apply(keep), apply(drop)
    # fc6's output all dropped: fc7 sees zeros, so every example gets the same logits.
    np.testing.assert_allclose(zeroed, jnp.broadcast_to(zeroed[:1], zeroed.shape), rtol=1e-6)
    assert not np.allclose(full, jnp.broadcast_to(full[:1], full.shape))


def _head_reference(variant, features, params, masks, rate):
    """fc6-fc8 in NumPy from the flattened conv5 pool: the paper drops fc6's and fc7's outputs
    (section 4.2), torchvision's owt drops their inputs."""
    p = {k: {n: np.asarray(v, np.float64) for n, v in layer.items()} for k, layer in params.items()}
    relu = lambda z: np.maximum(z, 0.0)
    dense = lambda name, z: z @ p[name]["kernel"] + p[name]["bias"]
    drop = lambda z, m: z * np.asarray(m) / (1.0 - rate)
    x = np.asarray(features, np.float64).reshape(features.shape[0], -1)  # H, W, C order
    if variant == "paper":
        h = drop(relu(dense("fc6", x)), masks[0])
        h = drop(relu(dense("fc7", h)), masks[1])
    else:
        h = relu(dense("fc6", drop(x, masks[0])))
        h = relu(dense("fc7", drop(h, masks[1])))
    return dense("fc8", h)


@pytest.mark.parametrize("variant, image_size", [("paper", 67), ("owt", 95)])
def test_the_head_with_dropout_equals_the_papers_and_torchvisions_order(variant, image_size):
    model = AlexNet(variant=variant, num_classes=10, width=1 / 16, weight_init="he")
    params = init_params(model, image_size, seed=1)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, image_size, image_size, 3))
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    masks = tuple(
        jax.random.bernoulli(k, 0.5, (4, f))
        for k, f in zip(keys, model.dropout_features(image_size), strict=True)
    )
    apply = jax.jit(
        lambda p, x, m: model.apply(
            {"params": p}, x, train=True, dropout_masks=m, mutable="intermediates"
        )
    )
    logits, inter = apply(params, x, masks)
    features = inter["intermediates"]["conv5_pool"][0]
    want = _head_reference(variant, features, params, masks, 0.5)
    kept = tuple(np.ones(m.shape, bool) for m in masks)
    undropped = _head_reference(variant, features, params, kept, 0.0)
    assert np.linalg.norm(undropped - want) > 0.1 * np.linalg.norm(want)  # the masks matter
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = AlexNet(num_classes=10, width=0.25, dtype=jnp.bfloat16)
    params = init_params(model, 67)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 67, 67, 3))
    out = model.apply({"params": params}, x)
    ref = AlexNet(num_classes=10, width=0.25).apply({"params": params}, x)
    assert out.dtype == jnp.float32
    assert 0 < np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_bfloat16_fc8_accumulates_in_float32():
    model = AlexNet(num_classes=10, width=0.25, dtype=jnp.bfloat16)
    params = init_params(model, 67)
    x = jnp.zeros((2, 67, 67, 3))
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x))(params)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"][-3:]  # fc6-fc8
    assert [e.invars[1].aval.shape[-1] for e in dots] == [1024, 1024, 10]
    assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    assert [e.outvars[0].aval.dtype for e in dots] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]


def test_tanh_activation_changes_the_function():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 67, 67, 3))
    params = init_params(AlexNet(num_classes=10, width=0.25), 67)
    relu = AlexNet(num_classes=10, width=0.25).apply({"params": params}, x)
    tanh = AlexNet(num_classes=10, width=0.25, activation="tanh").apply({"params": params}, x)
    assert not np.allclose(relu, tanh)


def test_the_one_gpu_comparison_net_halves_conv1_to_conv4_only():
    p = jax.eval_shape(lambda: init_params(AlexNet(variant="one_gpu", towers=1), 227))
    kernels = {name: p[name]["kernel"].shape[-1] for name in p}
    assert kernels == {
        "conv1": 48, "conv2": 128, "conv3": 192, "conv4": 192, "conv5": 256,
        "fc6": 4096, "fc7": 4096, "fc8": 1000,
    }  # fmt: skip
    assert p["conv2"]["kernel"].shape == (5, 5, 48, 128)  # one tower: every input channel
    assert AlexNet(variant="one_gpu").use_lrn
    with pytest.raises(UsageError, match="model.variant='one_gpu' has no towers: towers=1"):
        AlexNet(variant="one_gpu", towers=2)
