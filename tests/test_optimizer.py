"""The paper's update rule and LARS with the rate set by name, the schedules, the checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax import UsageError
from alexnet_jax.optimizer import Optimizer, make_optimizer, make_schedule, set_learning_rate


def test_the_update_rule_is_the_papers():
    tx = make_optimizer(learning_rate=0.01, momentum=0.9, weight_decay=5e-4, decay_biases=False)
    w = {"fc6": {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])}}
    state = tx.init(w)
    v = jax.tree.map(jnp.zeros_like, w)
    lr_by_step = [0.01, 0.01, 0.001]  # a cut: the rate inside the velocity matters here
    for i, lr in enumerate(lr_by_step):
        g = jax.tree.map(lambda p, i=i: jnp.full_like(p, 0.3 * (i + 1)), w)
        state = set_learning_rate(state, jnp.float32(lr))
        updates, state = tx.update(g, state, w)
        # v <- 0.9 v - wd * lr * w - lr * grad (no decay on biases); w <- w + v
        v = {
            "fc6": {
                "kernel": 0.9 * v["fc6"]["kernel"]
                - 5e-4 * lr * w["fc6"]["kernel"]
                - lr * g["fc6"]["kernel"],
                "bias": 0.9 * v["fc6"]["bias"] - lr * g["fc6"]["bias"],
            }
        }
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, v)
        w = optax.apply_updates(w, updates)


def test_decay_biases_decays_the_biases_too():
    tx = make_optimizer(learning_rate=0.1, momentum=0.9, weight_decay=0.5, decay_biases=True)
    w = {"fc8": {"kernel": jnp.array([2.0]), "bias": jnp.array([4.0])}}
    zero = jax.tree.map(jnp.zeros_like, w)
    updates, _ = tx.update(zero, tx.init(w), w)
    np.testing.assert_allclose(updates["fc8"]["bias"], [-0.1 * 0.5 * 4.0], rtol=1e-6)
    np.testing.assert_allclose(updates["fc8"]["kernel"], [-0.1 * 0.5 * 2.0], rtol=1e-6)


def test_the_learning_rate_is_set_by_name_and_nothing_else_changes():
    tx = make_optimizer(learning_rate=0.01, momentum=0.9, weight_decay=5e-4, decay_biases=False)
    state = tx.init({"w": jnp.ones(3)})
    assert set(state.hyperparams) == {"learning_rate"}
    moved = set_learning_rate(state, jnp.float32(0.25))
    assert float(moved.hyperparams["learning_rate"]) == 0.25
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.01)  # not mutated
    same = jax.tree.map(np.array_equal, moved.inner_state, state.inner_state)
    assert all(jax.tree.leaves(same))


def test_schedules():
    s = make_schedule("step", learning_rate=0.01, step_every_steps=10, step_factor=0.1)
    np.testing.assert_allclose([s(0), s(9), s(10), s(25)], [0.01, 0.01, 0.001, 0.0001], rtol=1e-5)
    c = make_schedule("constant", learning_rate=0.01, step_every_steps=10, step_factor=0.1)
    np.testing.assert_allclose([c(0), c(10_000)], [0.01, 0.01], rtol=1e-6)
    w = make_schedule("step", 0.01, step_every_steps=10, step_factor=0.1, warmup_steps=4)
    np.testing.assert_allclose(
        [w(0), w(1), w(3), w(9), w(10)], [0.0025, 0.005, 0.01, 0.01, 0.001], rtol=1e-5
    )


def test_the_rate_scales_linearly_with_the_global_batch():
    from configs import alexnet

    o = alexnet.get_config().optimizer
    assert o.base_batch_size == 128 and o.warmup_steps == 0  # the paper, unchanged
    rate = lambda batch: float(Optimizer.from_config(o, batch).schedule(0))
    assert rate(128) == pytest.approx(0.01)
    assert rate(1024) == pytest.approx(0.08)
    o.warmup_steps = 100
    assert rate(1024) == pytest.approx(0.08 / 100)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("schedule", "linear", "optimizer.schedule='linear' is unknown"),
        ("name", "adam", "optimizer.name='adam' is unknown"),
        ("learning_rate", 0.0, "optimizer.learning_rate=0.0 must be positive"),
        ("base_batch_size", 0, "optimizer.base_batch_size=0 must be positive"),
        ("warmup_steps", -1, "optimizer.warmup_steps=-1 must be 0"),
        ("momentum", 1.0, r"optimizer.momentum=1.0 cannot train: it must lie in \[0, 1\)"),
        ("weight_decay", -1e-4, r"weight_decay=-0.0001 .* \[0, infinity\)"),
        ("step_factor", 1.5, r"optimizer.step_factor=1.5 .* \(0, 1\]"),
        ("step_every_steps", 0, r"optimizer.step_every_steps=0 .* \[1, infinity\)"),
        ("plateau_factor", 1.0, r"optimizer.plateau_factor=1.0 .* \(0, 1\)"),
        ("plateau_patience", -1, r"optimizer.plateau_patience=-1 .* \[0, infinity\)"),
        ("plateau_min_scale", 0.0, r"optimizer.plateau_min_scale=0.0 .* \(0, 1\]"),
        ("trust_coefficient", 0.0, "optimizer.trust_coefficient=0.0 cannot train"),
    ],
)
def test_each_field_is_checked_when_the_optimizer_is_built(key, value, message):
    from configs import alexnet

    o = alexnet.get_config().optimizer
    Optimizer.from_config(o, 128)  # the paper's settings are fine
    o[key] = value
    with pytest.raises(UsageError, match=message):
        Optimizer.from_config(o, 128)


def test_lars_is_one_update_of_you_et_al_computed_in_numpy():
    wd, eta, mu = 5e-4, 0.001, 0.9
    tx = make_optimizer(0.5, mu, wd, decay_biases=False, name="lars", trust_coefficient=eta)
    rng = np.random.default_rng(0)
    w = {
        "conv1": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=4)},
        "fc8": {"kernel": 0.01 * rng.normal(size=(5, 3)), "bias": rng.normal(size=3)},
    }
    w = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), w)
    state, v = tx.init(w), jax.tree.map(np.zeros_like, w)
    for lr in [0.5, 0.5, 0.05]:  # a cut: the rate inside the velocity
        g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), w)
        state = set_learning_rate(state, jnp.float32(lr))
        updates, state = tx.update(g, state, w)
        for layer in w:
            k, gk = np.asarray(w[layer]["kernel"], np.float64), np.asarray(g[layer]["kernel"])
            d = gk + wd * k  # decayed gradient, then the layer's trust ratio
            local = eta * np.linalg.norm(k) / np.linalg.norm(d)
            v[layer]["kernel"] = mu * v[layer]["kernel"] + lr * local * d
            v[layer]["bias"] = mu * v[layer]["bias"] + lr * np.asarray(g[layer]["bias"])
            for name in ("kernel", "bias"):  # optax's updates are the negated velocity
                np.testing.assert_allclose(updates[layer][name], -v[layer][name], rtol=2e-5)
        # The two layers' ratios differ by orders of magnitude: the layer-wise rate matters.
        assert not np.allclose(updates["conv1"]["kernel"].std(), updates["fc8"]["kernel"].std())
        w = optax.apply_updates(w, updates)
    assert set(state.hyperparams) == {"learning_rate"}


def test_lars_refuses_what_it_cannot_do():
    with pytest.raises(UsageError, match="trust_coefficient=0 must be positive"):
        make_optimizer(0.1, 0.9, 5e-4, False, name="lars", trust_coefficient=0)
    with pytest.raises(UsageError, match="LARS leaves biases out"):
        make_optimizer(0.1, 0.9, 5e-4, True, name="lars")


def test_poly_and_cosine_fall_to_zero_at_the_last_step_after_the_warm_up():
    p = make_schedule("poly", 0.4, 10, 0.1, warmup_steps=0, total_steps=100)
    np.testing.assert_allclose([p(0), p(50), p(100)], [0.4, 0.1, 0.0], atol=1e-7)
    c = make_schedule("cosine", 0.4, 10, 0.1, warmup_steps=10, total_steps=100)
    np.testing.assert_allclose(
        [c(0), c(9), c(50), c(100)],
        [0.04, 0.4 * (1 + np.cos(np.pi * 9 / 100)) / 2, 0.2, 0.0],
        rtol=1e-5,
        atol=1e-7,
    )


def test_the_edges_of_each_range_that_can_train_are_accepted():
    from configs import alexnet

    for key, value in (
        ("momentum", 0.0),
        ("weight_decay", 0.0),
        ("step_factor", 1.0),
        ("step_every_steps", 1),
        ("plateau_patience", 0),
        ("plateau_min_scale", 1.0),
    ):
        o = alexnet.get_config().optimizer
        o[key] = value
        Optimizer.from_config(o, 128)


def test_a_warm_up_as_long_as_the_run_is_named_with_both(caplog):
    from configs import accelerator

    o = accelerator.get_config().optimizer
    o.warmup_steps, o.warmup_epochs = 0, 5.0
    with caplog.at_level("WARNING"):
        Optimizer.from_config(o, 1024, total_steps=1000, steps_per_epoch=300.0)
    assert "the warm-up (1500 steps) is at least as long as the run (1000 steps)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        Optimizer.from_config(o, 1024, total_steps=1501, steps_per_epoch=300.0)
    assert "warm-up" not in caplog.text
