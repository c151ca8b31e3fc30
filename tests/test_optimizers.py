"""LARS and WarmupCosine against NumPy references (docs/method.md section 4.3)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from wcl_tf.config import Config
from wcl_tf.optimizers import LARS, WarmupCosine, build_optimizer

# Large enough that the trust ratio, weight decay and momentum all move the result
# far beyond the tolerance.
MOMENTUM = 0.9
WD = 0.05
ETA = 0.1


def reference_warmup_cosine(step, peak, warmup, total):
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= total:
        return 0.0
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def reference_lars(weights, grads_per_step, lrs, adapted, momentum=MOMENTUM, wd=WD,
                   eta=ETA):
    """float64 NumPy LARS (the PyTorch SimCLR/BYOL rule); returns final weights."""
    w = [np.array(x, np.float64) for x in weights]
    m = [np.zeros_like(x) for x in w]
    for grads, lr in zip(grads_per_step, lrs):
        for i, g in enumerate(grads):
            g = np.array(g, np.float64)
            if adapted[i]:
                g = g + wd * w[i]
                w_norm, g_norm = np.linalg.norm(w[i]), np.linalg.norm(g)
                trust = eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
                g = trust * g
            m[i] = momentum * m[i] + g
            w[i] = w[i] - lr * m[i]
    return w


def assert_close(actual, expected, rtol=1e-6):
    """Max abs error within rtol of the variable's scale (elementwise rtol is
    meaningless for entries that an update brings near 0)."""
    for a, e in zip(actual, expected):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape
        assert np.all(np.isfinite(a))
        scale = max(np.abs(e).max(), 1e-30)
        assert np.abs(a - e).max() <= rtol * scale, (a, e)


def relative_difference(a_list, b_list):
    """Largest max-abs difference relative to the variable's scale (0-valued skipped)."""
    out = 0.0
    for a, b in zip(a_list, b_list):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if np.abs(b).max() > 0:
            out = max(out, np.abs(a - b).max() / np.abs(b).max())
    return out


def make_problem(rng):
    """Names, initial values, 2 steps of gradients, and which ones LARS adapts."""
    names = ["kernel", "bias", "gamma", "zero_kernel", "zero_init_kernel", "still_kernel"]
    init = [
        rng.normal(size=(3, 4)),
        rng.normal(size=(4,)),
        1.0 + 0.1 * rng.normal(size=(4,)),
        np.zeros((2, 3)),  # ||w|| = 0 and ||g|| = 0: trust 1, stays 0, no NaN.
        np.zeros((2, 2)),  # ||w|| = 0 at step 0: trust 1, plain momentum SGD.
        rng.normal(size=(3, 2)),  # zero gradient: ||g|| = 0 when wd = 0.
    ]
    init = [x.astype(np.float32) for x in init]

    def grads():
        return [
            rng.normal(size=(3, 4)),
            rng.normal(size=(4,)),
            rng.normal(size=(4,)),
            np.zeros((2, 3)),
            rng.normal(size=(2, 2)),
            np.zeros((3, 2)),
        ]

    steps = [[g.astype(np.float32) for g in grads()] for _ in range(2)]
    adapted = [True, False, False, True, True, True]
    return names, init, steps, adapted


def run_lars(opt, names, init, steps, mode):
    variables = [keras.Variable(x, name=n) for n, x in zip(names, init)]
    if mode == "eager":
        for grads in steps:
            opt.apply([tf.constant(g) for g in grads], variables)
    else:
        opt.build(variables)

        @tf.function
        def step(grads):
            opt.apply(grads, variables)

        for grads in steps:
            step([tf.constant(g) for g in grads])
    return [v.numpy() for v in variables]


@pytest.mark.parametrize("weight_decay", [0.0, WD])
@pytest.mark.parametrize("mode", ["eager", "tf_function"])
def test_lars_matches_numpy_reference(rng, mode, weight_decay):
    names, init, steps, adapted = make_problem(rng)
    schedule = WarmupCosine(peak_lr=0.8, warmup_steps=2, total_steps=4)
    opt = LARS(schedule, momentum=MOMENTUM, weight_decay=weight_decay,
               trust_coefficient=ETA)
    got = run_lars(opt, names, init, steps, mode)

    lrs = [reference_warmup_cosine(s, 0.8, 2, 4) for s in range(2)]  # 0.4, 0.8
    expected = reference_lars(init, steps, lrs, adapted, wd=weight_decay)
    assert_close(got, expected)
    assert int(opt.iterations.numpy()) == 2
    # Keras' decoupled weight decay stays off; ours is coupled.
    assert opt.weight_decay is None and opt.lars_weight_decay == weight_decay
    np.testing.assert_array_equal(got[3], 0.0)
    # The test can fail: a constant LR or no trust ratio changes the answer.
    assert relative_difference(
        got, reference_lars(init, steps, [0.8, 0.8], adapted, wd=weight_decay)) > 1e-2
    assert relative_difference(
        got, reference_lars(init, steps, lrs, adapted, wd=weight_decay, eta=1.0)) > 1e-2


def test_one_dimensional_variables_get_no_decay_or_trust(rng):
    names, init, steps, adapted = make_problem(rng)
    opt = LARS(0.5, momentum=MOMENTUM, weight_decay=WD, trust_coefficient=ETA)
    got = run_lars(opt, names, init, steps, "eager")
    lrs = [0.5, 0.5]
    expected = reference_lars(init, steps, lrs, adapted)
    all_adapted = reference_lars(init, steps, lrs, [True] * len(init))
    for i in (1, 2):  # bias, gamma
        assert not opt.is_adapted(opt._trainable_variables[i])
        assert_close([got[i]], [expected[i]])
        assert relative_difference([got[i]], [all_adapted[i]]) > 1e-2
        # Plain heavy-ball momentum SGD.
        g0, g1 = steps[0][i], steps[1][i]
        sgd = init[i] - 0.5 * g0 - 0.5 * (MOMENTUM * g0 + g1)
        assert_close([got[i]], [sgd])
    assert opt.is_adapted(opt._trainable_variables[0])


def test_exclude_from_adaptation_name_substrings(rng):
    backbone = keras.layers.Dense(3, name="backbone")
    head = keras.layers.Dense(2, name="graph_head")
    backbone.build((None, 4))
    head.build((None, 3))
    variables = backbone.trainable_variables + head.trainable_variables
    assert [v.path for v in variables] == [
        "backbone/kernel", "backbone/bias", "graph_head/kernel", "graph_head/bias"]
    init = [v.numpy() for v in variables]
    grads = [rng.normal(size=v.shape).astype(np.float32) for v in variables]

    opt = LARS(0.5, momentum=MOMENTUM, weight_decay=WD, trust_coefficient=ETA,
               exclude_from_adaptation=["graph_head"])
    opt.apply([tf.constant(g) for g in grads], variables)
    assert [opt.is_adapted(v) for v in variables] == [True, False, False, False]

    adapted = [True, False, False, False]
    expected = reference_lars(init, [grads], [0.5], adapted)
    assert_close([v.numpy() for v in variables], expected)
    # Without the substring the head kernel would have been adapted.
    default = reference_lars(init, [grads], [0.5], [True, False, True, False])
    assert relative_difference([variables[2].numpy()], [default[2]]) > 1e-2


def test_warmup_cosine_closed_forms():
    peak, warmup, total = 4.8, 10, 30
    schedule = WarmupCosine(peak, warmup, total)

    def lr(step):
        return float(schedule(tf.constant(step, tf.int64)))

    assert lr(0) == pytest.approx(peak / warmup, rel=1e-6)  # not 0: no wasted step
    assert lr(4) == pytest.approx(peak / 2, rel=1e-6)  # mid warm-up
    assert lr(warmup - 1) == pytest.approx(peak, rel=1e-6)  # end of warm-up
    assert lr(warmup) == pytest.approx(peak, rel=1e-6)  # start of cosine
    assert lr(warmup + (total - warmup) // 2) == pytest.approx(peak / 2, rel=1e-6)
    assert lr(total) == 0.0
    assert lr(total + 50) == 0.0
    for s in range(total + 3):
        assert lr(s) == pytest.approx(
            reference_warmup_cosine(s, peak, warmup, total), rel=1e-6, abs=1e-6)
    # As the optimizer calls it: with its int64 iterations variable.
    step_var = keras.Variable(15, dtype="int64")
    assert float(schedule(step_var)) == pytest.approx(
        reference_warmup_cosine(15, peak, warmup, total), rel=1e-6)
    # No warm-up: cosine from the peak at step 0.
    assert float(WarmupCosine(1.0, 0, 4)(0)) == pytest.approx(1.0)
    assert float(WarmupCosine(1.0, 0, 4)(2)) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        WarmupCosine(1.0, 5, 4)


def test_learning_rate_scaling_rules():
    assert Config(global_batch_size=4096).learning_rate() == pytest.approx(4.8)
    assert Config(global_batch_size=512).learning_rate() == pytest.approx(
        0.075 * math.sqrt(512))
    assert Config(global_batch_size=512, lr_scaling="linear").learning_rate() == (
        pytest.approx(0.6))
    assert Config(global_batch_size=512, base_lr=0.1).learning_rate() == 0.1


def test_build_optimizer_from_config():
    cfg = Config(global_batch_size=4096, epochs=20, warmup_epochs=2.5, momentum=0.8,
                 weight_decay=1e-5, trust_coefficient=2e-3)
    opt = build_optimizer(cfg, steps_per_epoch=3)
    assert isinstance(opt, LARS)
    schedule = opt._learning_rate
    assert isinstance(schedule, WarmupCosine)
    assert schedule.get_config() == {
        "peak_lr": pytest.approx(4.8), "warmup_steps": round(2.5 * 3), "total_steps": 60}
    assert (opt.momentum, opt.lars_weight_decay, opt.trust_coefficient) == (
        0.8, 1e-5, 2e-3)
    assert float(opt.learning_rate) == pytest.approx(4.8 / 8)  # step 0
    with pytest.raises(ValueError):
        build_optimizer(cfg, steps_per_epoch=0)


def test_serialization_round_trip(rng):
    schedule = WarmupCosine(2.0, 3, 10)
    restored = WarmupCosine.from_config(schedule.get_config())
    assert restored.get_config() == schedule.get_config()
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(schedule))
    assert isinstance(restored, WarmupCosine)
    assert restored.get_config() == schedule.get_config()

    opt = LARS(schedule, momentum=0.8, weight_decay=1e-2, trust_coefficient=0.2,
               exclude_from_adaptation=["head"], clipnorm=10.0, name="lars_x")
    config = opt.get_config()
    assert config["weight_decay"] == 1e-2
    assert config["exclude_from_adaptation"] == ["head"]
    from_config = LARS.from_config(dict(config))
    assert from_config.get_config() == config
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(opt))
    assert isinstance(restored, LARS)
    assert isinstance(restored._learning_rate, WarmupCosine)
    assert restored.get_config() == config

    # Same hyper-parameters, same updates.
    names, init, steps, _ = make_problem(rng)
    names = [n if i else "head_kernel" for i, n in enumerate(names)]
    original = run_lars(opt, names, init, steps, "eager")
    assert_close(run_lars(restored, names, init, steps, "eager"), original)
    assert_close(run_lars(from_config, names, init, steps, "eager"), original)


def test_mirrored_strategy_sums_replica_gradients(two_replica_strategy):
    """Keras 3 (TF backend) all-reduces replica gradients with SUM before
    update_step: a 2-replica step equals a 1-device step on the summed gradient."""
    strategy = two_replica_strategy
    assert strategy.num_replicas_in_sync == 2
    rng = np.random.default_rng(1)
    kernel0 = rng.normal(size=(3, 2)).astype(np.float32)
    bias0 = rng.normal(size=(2,)).astype(np.float32)
    xs = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(2)]
    # Different replica inputs: the replica gradients differ.
    xs[1] = 3.0 * xs[1] + 1.0

    def loss_fn(kernel, bias, x):
        return tf.reduce_sum(tf.square(tf.matmul(x, kernel) + bias)) / 8.0

    def new_optimizer():
        return LARS(0.5, momentum=MOMENTUM, weight_decay=WD, trust_coefficient=ETA)

    with strategy.scope():
        variables = [keras.Variable(kernel0, name="kernel"),
                     keras.Variable(bias0, name="bias")]
        opt = new_optimizer()
        opt.build(variables)
    inputs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(xs[ctx.replica_id_in_sync_group]))

    @tf.function
    def distributed_step(x):
        def replica_step(x):
            with tf.GradientTape() as tape:
                loss = loss_fn(variables[0], variables[1], x)
            opt.apply(tape.gradient(loss, variables), variables)

        strategy.run(replica_step, args=(x,))

    for _ in range(2):
        distributed_step(inputs)

    def one_device(reduce):
        local = [keras.Variable(kernel0, name="kernel"), keras.Variable(bias0, name="bias")]
        local_opt = new_optimizer()
        for _ in range(2):
            per_replica = []
            for x in xs:
                with tf.GradientTape() as tape:
                    loss = loss_fn(local[0], local[1], tf.constant(x))
                per_replica.append(tape.gradient(loss, local))
            local_opt.apply([reduce(a, b) for a, b in zip(*per_replica)], local)
        return [v.numpy() for v in local]

    summed = one_device(lambda a, b: a + b)
    averaged = one_device(lambda a, b: (a + b) / 2.0)
    for v, s in zip(variables, summed):
        replicas = strategy.experimental_local_results(v.value)
        assert len(replicas) == 2
        for r in replicas:  # both mirrors updated identically
            assert_close([r.numpy()], [s], rtol=1e-5)
    got = [v.numpy() for v in variables]
    assert relative_difference(got, averaged) > 1e-2
