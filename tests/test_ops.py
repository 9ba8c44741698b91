"""ops.lrn and ops.max_pool against their plain definitions: the same values and the same
gradients as `jax.grad` of the plain ones, ties in pooling windows included."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import ops

plain_lrn = ops.plain_lrn  # its values: tests/test_model.py's test of the paper's formula


def plain_pool(x, window, stride):
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("towers", [1, 2])
def test_lrn_values_and_gradient_equal_the_plain_definition(towers):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x = 60.0 * jax.random.normal(k1, (2, 5, 5, 16))  # where the sum is far from k
    g = jax.random.normal(k2, x.shape)
    y = ops.lrn(x, towers)
    assert _rel(y, x) > 0.1  # it normalises at this scale
    assert _rel(y, plain_lrn(x, towers)) < 1e-6
    grad = jax.grad(lambda x: jnp.sum(ops.lrn(x, towers) * g))(x)
    want = jax.grad(lambda x: jnp.sum(plain_lrn(x, towers) * g))(x)
    diag = g * (ops.LRN_K + 0.0) ** -ops.LRN_BETA  # the gradient if the sum were constant
    assert _rel(want, diag) > 0.05  # the cross-channel terms matter here
    assert _rel(grad, want) < 1e-5
    other = jax.grad(lambda x: jnp.sum(plain_lrn(x, 3 - towers) * g))(x)
    assert _rel(grad, other) > 1e-3  # the towers' split shows in the gradient


@pytest.mark.parametrize(
    "window, shape", [(3, (2, 13, 13, 4)), (3, (1, 12, 11, 3)), (2, (2, 8, 9, 3))]
)
def test_max_pool_values_and_gradient_equal_the_plain_definition(window, shape):
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(k1, shape)
    y = ops.max_pool(x, window, 2)
    np.testing.assert_array_equal(y, plain_pool(x, window, 2))
    g = jax.random.normal(k2, y.shape)
    grad = jax.grad(lambda x: jnp.sum(ops.max_pool(x, window, 2) * g))(x)
    want = jax.grad(lambda x: jnp.sum(plain_pool(x, window, 2) * g))(x)
    assert jnp.count_nonzero(want) > 0
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-6)


def test_max_pool_ties_go_where_xla_sends_them():
    """Inputs of few distinct values (ReLU zeros, repeated maxima), so most windows tie; and a
    window that is all one value. Each output's gradient goes to one input only."""
    x = jax.random.randint(jax.random.PRNGKey(2), (2, 13, 13, 3), 0, 3).astype(jnp.float32)
    x = x.at[0, :3, :3, 0].set(1.0)
    y = ops.max_pool(x, 3, 2)
    g = jax.random.uniform(jax.random.PRNGKey(3), y.shape, minval=1.0, maxval=2.0)
    grad = jax.grad(lambda x: jnp.sum(ops.max_pool(x, 3, 2) * g))(x)
    want = jax.grad(lambda x: jnp.sum(plain_pool(x, 3, 2) * g))(x)
    np.testing.assert_allclose(grad, want, rtol=1e-6)
    assert float(jnp.sum(grad)) == pytest.approx(float(jnp.sum(g)), rel=1e-5)
    # A rule that split ties between the maxima, or gave them to the last one, differs here.
    last = jax.grad(lambda x: jnp.sum(plain_pool(x[:, ::-1, ::-1], 3, 2)[:, ::-1, ::-1] * g))(x)
    assert not np.allclose(last, want)


def test_bfloat16_pooling_gradient():
    x = jax.random.normal(jax.random.PRNGKey(4), (1, 9, 9, 2)).astype(jnp.bfloat16)
    g = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
    grad = jax.grad(lambda x: jnp.sum(ops.max_pool(x, 3, 2) * g).astype(jnp.float32))(x)
    want = jax.grad(lambda x: jnp.sum(plain_pool(x, 3, 2) * g).astype(jnp.float32))(x)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(grad, want)


def test_the_model_traces_the_plain_definitions_it_is_given_only():
    from alexnet_jax.model import AlexNet

    x = jax.random.normal(jax.random.PRNGKey(5), (1, 67, 67, 3))

    def grad_jaxpr(**fields):
        model = AlexNet(num_classes=4, width=0.125, **fields)
        params = model.init(jax.random.PRNGKey(0), x)["params"]
        loss = lambda x: jnp.sum(model.apply({"params": params}, x))
        return str(jax.make_jaxpr(jax.grad(loss))(x))

    fast, plain_pool = grad_jaxpr(), grad_jaxpr(plain_ops=("pool",))
    assert "select_and_scatter" not in fast
    assert "select_and_scatter" in plain_pool
    assert "dot_general" not in plain_pool.split("conv_general_dilated")[1]  # LRN stays fast
    assert "select_and_scatter" not in grad_jaxpr(plain_ops=("lrn",))
    np.testing.assert_array_equal(ops.pool(x, 3, 2, plain=True), ops.max_pool(x, 3, 2))
    with pytest.raises(ValueError, match="unknown ops \\['lrm'\\]"):
        AlexNet(plain_ops=("lrm",))
    # model.fast_ops by name (the default, 'auto', is `fast` above: the CPU's choice, both).
    none = grad_jaxpr(fast_ops="none")
    assert "select_and_scatter" in none and "dot_general" in none.split("conv_general_dilated")[1]
    assert grad_jaxpr(fast_ops="lrn") == plain_pool
    with pytest.raises(ValueError, match="model.fast_ops='some' is unknown"):
        AlexNet(fast_ops="some")


# benchmarks/device_checks.py holds a device to the same.
BFLOAT16_ROUNDING = 2.0**-7  # one rounding of bfloat16, relative
POOL_BFLOAT16 = 4 * BFLOAT16_ROUNDING  # up to four overlapping windows' gradients, added


def test_bfloat16_lrn_and_pooling_gradients_within_rounding():
    """In bfloat16 LRN's custom gradient equals the plain one up to one rounding (both compute
    in float32 and round once); pooling's up to four, as an input that is the maximum of up to
    four overlapping windows adds their gradients in another order than XLA."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(6), 3)
    x = (60.0 * jax.random.normal(k1, (2, 9, 9, 16))).astype(jnp.bfloat16)
    g = jax.random.normal(k2, x.shape)
    grad = jax.grad(lambda x: jnp.sum(ops.lrn(x, 2) * g))(x)
    want = jax.grad(lambda x: jnp.sum(plain_lrn(x, 2) * g))(x)
    assert grad.dtype == want.dtype == jnp.bfloat16
    assert _rel(grad.astype(jnp.float32), want.astype(jnp.float32)) < BFLOAT16_ROUNDING
    x = jax.random.randint(k3, (2, 13, 13, 3), 0, 3).astype(jnp.bfloat16)  # ties
    g = jax.random.uniform(k2, (2, 6, 6, 3), minval=1.0, maxval=2.0).astype(jnp.bfloat16)
    grad = jax.grad(lambda x: jnp.sum(ops.max_pool(x, 3, 2) * g).astype(jnp.float32))(x)
    want = jax.grad(lambda x: jnp.sum(plain_pool(x, 3, 2) * g).astype(jnp.float32))(x)
    grad, want = np.asarray(grad, np.float32), np.asarray(want, np.float32)
    assert np.count_nonzero(want) > 0
    assert np.max(np.abs(grad - want) / (1 + np.abs(want))) < POOL_BFLOAT16


def test_fast_ops_auto_reads_the_table_beside_ops():
    import json

    table = json.loads(ops.FAST_OPS_TABLE.read_text())
    assert set(table) == {"cpu", "gpu", "tpu"} and all(row["evidence"] for row in table.values())
    assert ops.AUTO_FAST == ops.read_fast_ops() == {k: tuple(v["fast"]) for k, v in table.items()}


def test_fast_ops_auto_is_a_choice_per_backend(monkeypatch):
    assert ops.plain_for("auto", "cpu") == ()  # both measured faster on XLA:CPU
    assert ops.plain_for("auto", "gpu") == ops.plain_for("auto", "tpu") == ()
    assert ops.plain_for("none", "gpu") == ("lrn", "pool")
    assert ops.plain_for("pool", "tpu") == ("lrn",)
    assert ops.plain_for("all", "cpu") == ()
    monkeypatch.setitem(ops.AUTO_FAST, "gpu", ("lrn",))  # as a measured run may record
    assert ops.plain_for("auto", "gpu") == ("pool",) and ops.plain_for("auto", "cpu") == ()


def test_a_bfloat16_model_differentiates_its_convolutions_in_bfloat16():
    """LRN's gradient takes its input's dtype, so the convolutions behind it stay bfloat16 in
    the backward pass (a float32 gradient from LRN made five of them float32)."""
    from alexnet_jax.model import AlexNet

    x = jnp.ones((2, 67, 67, 3))
    for fast_ops in ("all", "none"):
        model = AlexNet(num_classes=10, width=0.125, dtype="bfloat16", fast_ops=fast_ops)
        params = model.init(jax.random.PRNGKey(0), x)["params"]
        loss = lambda p: jnp.sum(model.apply({"params": p}, x).astype(jnp.float32))  # noqa: B023
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        convs = [line for line in jaxpr.splitlines() if "= conv_general_dilated" in line]
        assert len(convs) > 10  # the forward convolutions and their two gradients
        assert all(":bf16[" in line for line in convs), fast_ops
