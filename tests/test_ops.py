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


def test_fast_ops_auto_is_a_choice_per_backend():
    assert ops.plain_for("auto", "cpu") == ()  # both measured faster on XLA:CPU
    assert ops.plain_for("auto", "gpu") == ops.plain_for("auto", "tpu") == ()
    assert ops.plain_for("none", "gpu") == ("lrn", "pool")
    assert ops.plain_for("pool", "tpu") == ("lrn",)
    assert ops.plain_for("all", "cpu") == ()
