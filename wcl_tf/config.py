"""Every setting of a WCL run, as one frozen dataclass.

Library code takes a `Config` (or plain arguments); only `wcl_tf.train` reads
absl flags and turns them into a `Config`. A notebook builds one directly:

    cfg = Config(dataset="embedded_mnist", backbone="small_cnn", epochs=2)
"""

import dataclasses
import math
from typing import Optional

BACKBONES = ("resnet50", "resnet18_cifar", "small_cnn")
STRATEGIES = ("one_device", "mirrored", "multi_worker", "tpu")
GATHER_GRAD = ("full", "local")
LR_SCALING = ("sqrt", "linear")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
ON_BAD_IMAGE = ("skip", "fail")
# Where the photometric augmentation runs (wcl_tf.data.view_assembly.augment_on_device).
AUGMENT_ON = ("auto", "host", "device")


class ConfigError(ValueError):
    """A setting is out of range; the message names the fix."""


def _attempt(default):
    """A field that may change between attempts at one run (a resumed run accepts a new
    value): where data and checkpoints live, how many replicas share the unchanged global
    batch, logging, and the non-finite step budget (the NaN message advises raising it).
    Every other field defines the run: model, objective, data, batch, schedule, seed."""
    return dataclasses.field(default=default, metadata={"may_change_on_resume": True})


def run_defining_fields():
    """Names of the Config fields that a resumed run must keep unchanged."""
    return tuple(f.name for f in dataclasses.fields(Config)
                 if not f.metadata.get("may_change_on_resume"))


@dataclasses.dataclass(frozen=True)
class Config:
    # Data.
    dataset: str = "embedded_mnist"
    data_dir: Optional[str] = _attempt(None)
    download: bool = _attempt(False)
    train_split: str = "train"
    eval_split: str = "test"
    image_size: int = 32
    # Limit on training images (0: all); handy for CPU-sized runs.
    max_train_examples: int = 0
    # Labelled images used by the end-of-run kNN evaluation (0: all).
    max_eval_examples: int = 0
    # dataset="folder:...": "skip" undecodable files (counted and named in the log) or
    # "fail" before training with their list.
    on_bad_image: str = "skip"

    # Model.
    backbone: str = "resnet18_cifar"
    width: int = 64  # small_cnn only: channels of its first block
    head_hidden_dim: int = 2048
    head_output_dim: int = 128
    # None: synchronized BN exactly when more than one replica trains.
    sync_bn: Optional[bool] = None
    # A run folder (its final.keras) or .keras file whose backbone and heads start this
    # run; the optimizer and schedule start afresh (wcl_tf/warm_start.py).
    init_from: Optional[str] = None

    # Objective (docs/method.md sections 2 and 3).
    temperature: float = 0.1
    graph_loss_weight: float = 1.0  # lambda; 0 gives SimCLR
    # Instance-loss keys from other replicas: "local" (constants, as in the authors' code:
    # concat_other_gather under no_grad, DDP averages the replicas' gradients) or "full"
    # (carry gradient back to their replica; an R-replica step equals the 1-replica step).
    # The two are the same at one replica.
    gather_grad: str = "local"
    # Graph-loss keys carry gradient. False is the authors' code (their keys come from a
    # no_grad gather): only the anchors get the graph loss's gradient.
    graph_key_grad: bool = False

    # Optimization (docs/method.md section 4).
    global_batch_size: int = 256
    epochs: int = 100
    warmup_epochs: float = 10.0
    lr_scaling: str = "sqrt"
    base_lr: Optional[float] = None  # overrides lr_scaling when set
    weight_decay: float = 1e-6
    momentum: float = 0.9
    trust_coefficient: float = 1e-3
    # 0: one epoch is floor(train examples / global batch) steps.
    steps_per_epoch: int = 0

    # Augmentation.
    weak_aug_epochs: int = 10
    blur: bool = False
    # "host": the whole recipe in tf.data; "device": crops on the host, the rest in
    # train_step (wcl_tf.data.augment_layers); "auto": device when a GPU/TPU is present.
    augment_on: str = "auto"

    # KNN multi-crop (docs/method.md section 6): M local crops of L px per image, the K most
    # similar to the image's global embedding are kept; mu weighs their losses.
    num_local_crops: int = 0
    local_crop_size: int = 16
    local_crop_scale: tuple = (0.05, 0.14)
    global_crop_scale: tuple = (0.14, 1.0)
    knn_crops: int = 0
    local_loss_weight: float = 1.0

    # Run.
    model_dir: str = _attempt("runs/default")
    # Epoch checkpoints kept on disk, newest first (0: all of them).
    keep_checkpoints: int = _attempt(3)
    strategy: str = _attempt("one_device")
    # Compute dtype; similarity logits, exp and log-sum-exp stay float32 regardless.
    precision: str = "float32"
    tpu: str = _attempt("")
    seed: int = 0
    knn_k: int = 200
    knn_temperature: float = 0.1
    # kNN top-1 and weak-label diagnostics every N epochs (0: only at the end).
    eval_every_epochs: int = _attempt(0)
    # A step whose loss or gradients are not finite is never applied. 0: the first one
    # stops the run (the last epoch checkpoint is kept); N: up to N such steps are
    # skipped (logged), the N+1-th stops the run.
    skip_nonfinite_steps: int = _attempt(0)
    # Train steps per call into the device (Keras steps_per_execution): logs, callbacks
    # and the non-finite guard read the host side once per execution, not every step.
    steps_per_execution: int = _attempt(1)
    verbose: int = _attempt(1)

    def validate(self):
        """Raises ConfigError naming the offending setting and the fix."""
        def need(ok, message):
            if not ok:
                raise ConfigError(message)

        need(self.backbone in BACKBONES,
             f"unknown backbone {self.backbone!r}: use one of {', '.join(BACKBONES)}.")
        need(self.strategy in STRATEGIES,
             f"unknown strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}.")
        need(self.precision in PRECISIONS,
             f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        need(self.gather_grad in GATHER_GRAD,
             f"gather_grad must be 'full' or 'local' (one of {GATHER_GRAD}), got "
             f"{self.gather_grad!r}.")
        need(self.lr_scaling in LR_SCALING,
             f"lr_scaling must be 'sqrt' or 'linear', got {self.lr_scaling!r}.")
        need(self.temperature > 0,
             f"temperature must be > 0 (the paper uses 0.1), got {self.temperature}.")
        need(self.graph_loss_weight >= 0,
             f"graph_loss_weight (lambda) must be >= 0, got {self.graph_loss_weight}.")
        need(self.global_batch_size >= 4,
             f"global_batch_size must be >= 4 (contrastive losses need negatives), "
             f"got {self.global_batch_size}.")
        need(self.image_size >= 8,
             f"image_size must be >= 8 pixels, got {self.image_size}.")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}.")
        need(self.steps_per_execution >= 1,
             f"steps_per_execution must be >= 1 (1: the host reads the logs after every "
             f"step), got {self.steps_per_execution}.")
        need(0 <= self.warmup_epochs <= self.epochs,
             f"warmup_epochs must be between 0 and epochs ({self.epochs}), "
             f"got {self.warmup_epochs}.")
        need(self.weak_aug_epochs >= 0,
             f"weak_aug_epochs must be >= 0, got {self.weak_aug_epochs}.")
        need(self.head_hidden_dim >= 1 and self.head_output_dim >= 1,
             "head_hidden_dim and head_output_dim must be >= 1.")
        need(self.base_lr is None or self.base_lr > 0,
             f"base_lr must be > 0 when set, got {self.base_lr}.")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}.")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}.")
        need(self.knn_k >= 1, f"knn_k must be >= 1, got {self.knn_k}.")
        need(self.knn_temperature > 0, f"knn_temperature must be > 0, got {self.knn_temperature}.")
        need(self.eval_every_epochs >= 0,
             f"eval_every_epochs must be >= 0, got {self.eval_every_epochs}.")
        need(self.num_local_crops >= 0,
             f"num_local_crops must be >= 0, got {self.num_local_crops}.")
        need(0 <= self.knn_crops <= self.num_local_crops,
             f"knn_crops (K={self.knn_crops}) must be between 0 and num_local_crops "
             f"(M={self.num_local_crops}).")
        need(4 <= self.local_crop_size <= self.image_size,
             f"local_crop_size must be between 4 and image_size ({self.image_size}), "
             f"got {self.local_crop_size}.")
        for name in ("local_crop_scale", "global_crop_scale"):
            low_high = tuple(getattr(self, name))
            need(len(low_high) == 2 and 0 < low_high[0] <= low_high[1] <= 1,
                 f"{name} must be two numbers 0 < low <= high <= 1, got {low_high}.")
        need(self.local_loss_weight >= 0,
             f"local_loss_weight (mu) must be >= 0, got {self.local_loss_weight}.")
        need(self.steps_per_epoch >= 0, f"steps_per_epoch must be >= 0, got {self.steps_per_epoch}.")
        need(self.keep_checkpoints >= 0,
             f"keep_checkpoints must be >= 0 (0: keep all), got {self.keep_checkpoints}.")
        need(self.on_bad_image in ON_BAD_IMAGE,
             f"on_bad_image must be 'skip' or 'fail', got {self.on_bad_image!r}.")
        need(self.augment_on in AUGMENT_ON,
             f"augment_on must be one of {AUGMENT_ON}, got {self.augment_on!r}.")
        need(self.skip_nonfinite_steps >= 0,
             f"skip_nonfinite_steps must be >= 0 (0: stop at the first non-finite loss), "
             f"got {self.skip_nonfinite_steps}.")
        need(self.max_train_examples >= 0,
             f"max_train_examples must be >= 0 (0: all), got {self.max_train_examples}.")
        need(self.max_eval_examples >= 0,
             f"max_eval_examples must be >= 0 (0: all), got {self.max_eval_examples}.")
        need(self.trust_coefficient > 0,
             f"trust_coefficient (LARS eta) must be > 0 (the recipe uses 0.001), got "
             f"{self.trust_coefficient}.")
        need(self.width >= 1, f"width must be >= 1, got {self.width}.")
        need(bool(self.dataset), "dataset is empty: use 'embedded_mnist', a TFDS name or "
             "'folder:/path/to/images'.")
        return self

    def learning_rate(self):
        """Peak learning rate: base_lr, or the authors' scaling rule."""
        if self.base_lr is not None:
            return self.base_lr
        if self.lr_scaling == "sqrt":
            return 0.075 * math.sqrt(self.global_batch_size)
        return 0.3 * self.global_batch_size / 256

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        """JSON-ready settings (tuples as lists, as they come back from config.json)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}
