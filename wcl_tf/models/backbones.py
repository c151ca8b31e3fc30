"""Backbones f for WCL: torchvision-compatible ResNets and a tiny test CNN.

`build_backbone(name, ...)` returns a functional `keras.Model` named "backbone" that takes
float32 images in [0, 1] of any size, shape (b, h, w, 3), normalises them with the fixed
ImageNet per-channel mean/std and returns globally average-pooled features (b, C).

The ResNets follow torchvision (docs/method.md section 9: `keras.applications.ResNet50` does not):

- ResNet-50 v1.5: the stride of a downsampling bottleneck sits on its 3x3 conv, not its
  first 1x1 conv; every convolution has no bias; torchvision's symmetric padding is
  reproduced with explicit `ZeroPadding2D` + "valid" conv/pool wherever the stride is 2,
  so feature-map sizes equal torchvision's for odd and even inputs.
- BatchNorm with PyTorch defaults (momentum 0.1 / eps 1e-5 = Keras momentum 0.9 / eps 1e-5),
  `synchronized=sync_bn` (global-batch statistics under a tf.distribute strategy), run by
  TensorFlow's fused kernel (`FusedBatchNormalization`, numerically Keras' BN; the moving
  variance is the biased one, PyTorch's is unbiased).
- Conv kernels initialised like torchvision: normal, std sqrt(2 / fan_out).

Layer names mirror torchvision's parameter names with "." replaced by "_" ("conv1", "bn1",
"layer1_0_conv1", "layer1_0_downsample_0", ...), so checkpoints and LARS exclusions can rely
on them and torchvision weights can be mapped by name.

Trainable parameter counts (= torchvision's `numel` over parameters, fc removed):
resnet50 23,508,032; resnet18_cifar 11,168,832. Keras `count_params()` is larger because it
also counts the BatchNorm moving statistics and the normalisation constants.
"""

import keras
import numpy as np

from wcl_tf.config import BACKBONES as BACKBONE_NAMES  # the one list (config has no TF)
from wcl_tf.models.batch_norm import FusedBatchNormalization

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PyTorch BatchNorm2d defaults expressed in Keras terms.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv_kernel_initializer():
    """A fresh torchvision-style initializer: kaiming_normal_(mode="fan_out", relu).

    A new instance per layer: a Keras 3 initializer instance draws its seed once, so one
    instance shared by several same-shape layers would give them identical kernels.
    """
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal")


class _Namer:
    """Joins an optional prefix to layer names: prefix "ema" -> "ema_conv1"."""

    def __init__(self, prefix):
        self.prefix = prefix

    def __call__(self, name):
        return f"{self.prefix}_{name}" if self.prefix else name


def _batch_norm(name, sync_bn):
    # TensorFlow's fused kernel on feature maps (a quarter of the ResNet-50 step was
    # unfused Keras BN on CPU); Keras' own path with synchronized statistics.
    return FusedBatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=sync_bn, name=name)


def _conv(x, filters, kernel_size, strides, name):
    """Conv2D without bias, torchvision padding (kernel_size // 2 on every side)."""
    pad = kernel_size // 2
    if pad and strides > 1:
        # Keras "same" pads bottom/right only at stride 2; torchvision pads symmetrically.
        x = keras.layers.ZeroPadding2D(pad, name=name + "_pad")(x)
        padding = "valid"
    else:
        padding = "same"  # Symmetric at stride 1 for odd kernels.
    return keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding=padding, use_bias=False,
        kernel_initializer=conv_kernel_initializer(), name=name)(x)


def _residual_out(x, y, filters, strides, sync_bn, n):
    """ReLU(y + shortcut(x)); the shortcut projects (1x1 conv + BN) when the shape changes."""
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(x, filters, 1, strides, n("downsample_0"))
        shortcut = _batch_norm(n("downsample_1"), sync_bn)(shortcut)
    y = keras.layers.Add(name=n("add"))([y, shortcut])
    return keras.layers.ReLU(name=n("out"))(y)


def _basic_block(x, filters, strides, sync_bn, n):
    """torchvision BasicBlock (expansion 1). `n` maps a local name to a layer name."""
    y = _conv(x, filters, 3, strides, n("conv1"))
    y = _batch_norm(n("bn1"), sync_bn)(y)
    y = keras.layers.ReLU(name=n("relu1"))(y)
    y = _conv(y, filters, 3, 1, n("conv2"))
    y = _batch_norm(n("bn2"), sync_bn)(y)
    return _residual_out(x, y, filters, strides, sync_bn, n)


def _bottleneck_block(x, width, strides, sync_bn, n, expansion=4):
    """torchvision Bottleneck (v1.5): the stride is on the 3x3 conv."""
    filters = width * expansion
    y = _conv(x, width, 1, 1, n("conv1"))
    y = _batch_norm(n("bn1"), sync_bn)(y)
    y = keras.layers.ReLU(name=n("relu1"))(y)
    y = _conv(y, width, 3, strides, n("conv2"))
    y = _batch_norm(n("bn2"), sync_bn)(y)
    y = keras.layers.ReLU(name=n("relu2"))(y)
    y = _conv(y, filters, 1, 1, n("conv3"))
    y = _batch_norm(n("bn3"), sync_bn)(y)
    return _residual_out(x, y, filters, strides, sync_bn, n)


def _resnet_stages(x, block_fn, blocks_per_stage, widths, sync_bn, namer):
    for stage, (num_blocks, width) in enumerate(zip(blocks_per_stage, widths), start=1):
        for i in range(num_blocks):
            strides = 2 if (stage > 1 and i == 0) else 1
            prefix = f"layer{stage}_{i}_"
            x = block_fn(x, width, strides, sync_bn, lambda s, p=prefix: namer(p + s))
    return x


def _resnet50(x, sync_bn, namer):
    x = keras.layers.ZeroPadding2D(3, name=namer("conv1_pad"))(x)
    x = keras.layers.Conv2D(
        64, 7, strides=2, padding="valid", use_bias=False,
        kernel_initializer=conv_kernel_initializer(), name=namer("conv1"))(x)
    x = _batch_norm(namer("bn1"), sync_bn)(x)
    x = keras.layers.ReLU(name=namer("relu"))(x)
    # Zero padding equals torchvision's -inf padding here: the inputs are >= 0 after ReLU.
    x = keras.layers.ZeroPadding2D(1, name=namer("maxpool_pad"))(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="valid", name=namer("maxpool"))(x)
    return _resnet_stages(x, _bottleneck_block, (3, 4, 6, 3), (64, 128, 256, 512),
                          sync_bn, namer)


def _resnet18_cifar(x, sync_bn, namer):
    x = _conv(x, 64, 3, 1, namer("conv1"))
    x = _batch_norm(namer("bn1"), sync_bn)(x)
    x = keras.layers.ReLU(name=namer("relu"))(x)
    return _resnet_stages(x, _basic_block, (2, 2, 2, 2), (64, 128, 256, 512),
                          sync_bn, namer)


def _small_cnn(x, sync_bn, namer, width):
    for stage, (mult, strides) in enumerate(zip((1, 2, 4, 8), (1, 2, 2, 2)), start=1):
        x = _conv(x, mult * width, 3, strides, namer(f"stage{stage}_conv"))
        x = _batch_norm(namer(f"stage{stage}_bn"), sync_bn)(x)
        x = keras.layers.ReLU(name=namer(f"stage{stage}_relu"))(x)
    return x


def build_backbone(name, sync_bn=False, width=64, name_prefix=None):
    """Builds the encoder f: images in [0, 1] -> pooled features.

    Args:
      name: "resnet50" (torchvision ResNet-50 v1.5, 2048 features), "resnet18_cifar"
        (ResNet-18 with a 3x3 stride-1 stem and no max-pool, 512 features) or "small_cnn"
        (4 conv3x3-BN-ReLU stages of width, 2, 4, 8 x width channels, stride 2 on stages
        2-4, 8 * width features).
      sync_bn: build every BatchNormalization with `synchronized=True` (statistics over
        the global batch under a tf.distribute strategy).
      width: base channel count of "small_cnn"; ignored by the ResNets.
      name_prefix: optional string joined with "_" in front of every layer name and of
        the model name, for two backbones inside one model. None: names "backbone",
        "conv1", ...
    Returns:
      A functional keras.Model: float32 (b, h, w, 3) in [0, 1], any h, w -> (b, C).
    Raises:
      ValueError: unknown `name`.
    """
    if name not in BACKBONE_NAMES:
        raise ValueError(
            f"Unknown backbone {name!r}; valid names: {', '.join(BACKBONE_NAMES)}.")
    namer = _Namer(name_prefix)
    images = keras.Input(shape=(None, None, 3), dtype="float32", name=namer("images"))
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    x = keras.layers.Normalization(
        axis=-1, mean=list(IMAGENET_MEAN), variance=(std ** 2).tolist(),
        name=namer("normalize"))(images)
    if name == "resnet50":
        x = _resnet50(x, sync_bn, namer)
    elif name == "resnet18_cifar":
        x = _resnet18_cifar(x, sync_bn, namer)
    else:
        x = _small_cnn(x, sync_bn, namer, width)
    features = keras.layers.GlobalAveragePooling2D(name=namer("avgpool"))(x)
    return keras.Model(images, features, name=namer("backbone"))


def backbone_output_dim(model):
    """Feature size C of a backbone built by `build_backbone`."""
    return int(model.output_shape[-1])
