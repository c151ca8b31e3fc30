"""LARS and the warm-up cosine learning-rate schedule (docs/method.md section 4).

    opt = build_optimizer(cfg, steps_per_epoch)   # LARS + WarmupCosine from a Config

`LARS` follows the PyTorch LARS used by SimCLR / BYOL / WCL code. For a variable `w`
with gradient `g` that is adapted:

    g = g + weight_decay * w
    trust = trust_coefficient * ||w|| / ||g||   if ||w|| > 0 and ||g|| > 0, else 1
    g = trust * g
    m = momentum * m + g
    w = w - lr * m

A variable that is excluded from adaptation (every 1-D or scalar variable, i.e.
BatchNorm gamma/beta and biases, plus any whose path contains one of
`exclude_from_adaptation`) gets neither weight decay nor the trust ratio, only the
last two lines.

Weight decay is coupled (added to the gradient before the trust ratio), so Keras'
own decoupled `weight_decay` is switched off (`self.weight_decay is None`) and the
coefficient lives in `self.lars_weight_decay`; `get_config()` still writes it under
the constructor's name, `weight_decay`.

Under tf.distribute the Keras 3 TensorFlow backend all-reduces the replica
gradients with SUM before `update_step`, so a loss must be divided by the global
batch (`tf.nn.compute_average_loss`) for the summed gradient to be the global one
(pinned down by tests/test_optimizers.py).
"""

import math

import keras
from keras import ops


def _is_excluded(variable, name_substrings):
    if len(variable.shape) <= 1:
        return True
    path = getattr(variable, "path", None) or variable.name
    return any(s in path for s in name_substrings)


@keras.saving.register_keras_serializable(package="wcl_tf")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise adaptive rate scaling with coupled weight decay and momentum.

    Args:
        learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`.
        momentum: heavy-ball momentum in [0, 1).
        weight_decay: L2 coefficient added to the gradient (`g + wd * w`) before
            the trust ratio; not applied to excluded variables.
        trust_coefficient: eta in the trust ratio `eta * ||w|| / ||g||`.
        exclude_from_adaptation: optional list of substrings; a variable whose
            path (e.g. `"graph_head/dense/kernel"`) contains one of them is
            excluded from weight decay and the trust ratio, in addition to every
            1-D variable, which is always excluded.
        **kwargs: the keyword arguments of `keras.optimizers.Optimizer` (`name`,
            `clipnorm`, `global_clipnorm`, `loss_scale_factor`, `use_ema`, ...),
            except `weight_decay`, which is this class's own.
    """

    def __init__(
        self,
        learning_rate,
        momentum=0.9,
        weight_decay=1e-6,
        trust_coefficient=1e-3,
        exclude_from_adaptation=None,
        **kwargs,
    ):
        # get_config() of the base class writes its own (None) weight_decay; ours
        # arrives as the named argument above, so nothing else may reach super.
        super().__init__(learning_rate=learning_rate, weight_decay=None, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        if weight_decay is None or weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}.")
        self.momentum = float(momentum)
        self.lars_weight_decay = float(weight_decay)
        self.trust_coefficient = float(trust_coefficient)
        self.exclude_from_adaptation = (
            tuple(exclude_from_adaptation) if exclude_from_adaptation else ())

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self.momentums = [
            self.add_variable_from_reference(v, name="momentum") for v in var_list]
        # Indices (see _get_variable_index) of the variables left unadapted;
        # decided here, on the Keras variables, because update_step may receive
        # the per-replica tf.Variable, which has no Keras path.
        self._excluded_indices = frozenset(
            i for i, v in enumerate(var_list)
            if _is_excluded(v, self.exclude_from_adaptation))

    def is_adapted(self, variable):
        """Whether `variable` (one the optimizer was built on) gets wd and trust."""
        return self._get_variable_index(variable) not in self._excluded_indices

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        g = ops.cast(gradient, dtype)
        if index not in self._excluded_indices:
            g = ops.add(g, ops.multiply(ops.cast(self.lars_weight_decay, dtype), variable))
            w_norm = ops.sqrt(ops.sum(ops.square(variable)))
            g_norm = ops.sqrt(ops.sum(ops.square(g)))
            ok = ops.logical_and(ops.greater(w_norm, 0.0), ops.greater(g_norm, 0.0))
            safe_g_norm = ops.where(ok, g_norm, ops.ones_like(g_norm))
            trust = ops.where(
                ok,
                ops.cast(self.trust_coefficient, dtype) * w_norm / safe_g_norm,
                ops.ones_like(w_norm))
            g = ops.multiply(trust, g)
        m = self.momentums[index]
        self.assign(m, ops.add(ops.multiply(ops.cast(self.momentum, dtype), m), g))
        self.assign_sub(variable, ops.multiply(lr, m))

    def get_config(self):
        config = super().get_config()
        config.update({
            "momentum": self.momentum,
            "weight_decay": self.lars_weight_decay,
            "trust_coefficient": self.trust_coefficient,
            "exclude_from_adaptation": list(self.exclude_from_adaptation) or None,
        })
        return config


@keras.saving.register_keras_serializable(package="wcl_tf")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Per-step linear warm-up to `peak_lr`, then cosine decay to 0.

    With `s` the optimizer step (0 for the first update), `W = warmup_steps`,
    `T = total_steps`:

        lr(s) = peak * (s + 1) / W                                  s < W
        lr(s) = peak * (1 + cos(pi * (s - W) / (T - W))) / 2         W <= s < T
        lr(s) = 0                                                    s >= T

    The first step already moves (`peak / W`, not 0) and the last warm-up step
    reaches `peak`; `warmup_steps=0` gives plain cosine from `peak`.
    """

    def __init__(self, peak_lr, warmup_steps, total_steps):
        if peak_lr < 0:
            raise ValueError(f"peak_lr must be >= 0, got {peak_lr}.")
        if not 0 <= warmup_steps <= total_steps or total_steps < 1:
            raise ValueError(
                "need 0 <= warmup_steps <= total_steps and total_steps >= 1, got "
                f"warmup_steps={warmup_steps}, total_steps={total_steps}.")
        self.peak_lr = float(peak_lr)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        s = ops.cast(step, "float32")
        peak = ops.cast(self.peak_lr, "float32")
        warmup = float(self.warmup_steps)
        decay = float(max(self.total_steps - self.warmup_steps, 1))
        warmup_lr = peak * (s + 1.0) / max(warmup, 1.0)
        progress = ops.clip((s - warmup) / decay, 0.0, 1.0)
        cosine_lr = 0.5 * peak * (1.0 + ops.cos(math.pi * progress))
        lr = ops.where(ops.less(s, warmup), warmup_lr, cosine_lr)
        return ops.where(ops.greater_equal(s, float(self.total_steps)),
                         ops.zeros_like(lr), lr)

    def get_config(self):
        return {
            "peak_lr": self.peak_lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
        }


def build_optimizer(cfg, steps_per_epoch, **kwargs):
    """LARS with the warm-up cosine schedule of a `Config` (docs/method.md section 4).

    Args:
        cfg: `wcl_tf.config.Config`; uses learning_rate(), warmup_epochs, epochs,
            momentum, weight_decay, trust_coefficient.
        steps_per_epoch: optimizer steps per epoch (>= 1).
        **kwargs: passed on to `LARS` (e.g. `exclude_from_adaptation`,
            `loss_scale_factor`, `name`).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}.")
    schedule = WarmupCosine(
        peak_lr=cfg.learning_rate(),
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        total_steps=cfg.epochs * steps_per_epoch)
    return LARS(
        learning_rate=schedule,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        trust_coefficient=cfg.trust_coefficient,
        **kwargs)
