"""Projection heads g (instance head) and phi (graph head) of WCL (docs/method.md section 1).

    Dense(H) -> BN -> ReLU -> Dense(H) -> BN -> ReLU -> Dense(D)

Dense layers have biases, BatchNorm uses PyTorch defaults (Keras momentum 0.9, eps 1e-5),
no BatchNorm on the output and no L2 normalisation inside: the caller normalises.

Dense kernels and biases are initialised like PyTorch's `nn.Linear` (the authors' code):
uniform in +-1/sqrt(fan_in).
"""

import math

import keras

from wcl_tf.models.backbones import BN_EPSILON, BN_MOMENTUM


def _torch_linear(units, fan_in, name):
    bound = 1.0 / math.sqrt(fan_in)
    return keras.layers.Dense(
        units,
        use_bias=True,
        # kaiming_uniform_(a=sqrt(5)): limit sqrt(3 * (1/3) / fan_in) = 1/sqrt(fan_in).
        kernel_initializer=keras.initializers.VarianceScaling(
            scale=1.0 / 3.0, mode="fan_in", distribution="uniform"),
        bias_initializer=keras.initializers.RandomUniform(-bound, bound),
        name=name)


def build_projection_head(input_dim, hidden_dim, output_dim, sync_bn=False,
                          name="instance_head"):
    """Builds a 3-layer MLP projection head.

    Args:
      input_dim: C, size of the backbone features.
      hidden_dim: H (paper 2048, authors' code 4096).
      output_dim: D (paper 128, authors' code 256).
      sync_bn: synchronized BatchNormalization (global-batch statistics).
      name: model name; also the prefix of every layer name ("instance_head_fc1", ...),
        so the variables of the two heads have distinct paths.
    Returns:
      A functional keras.Model: (b, input_dim) -> (b, output_dim), not normalised.
    """
    def bn(layer_name):
        return keras.layers.BatchNormalization(
            momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=sync_bn,
            name=layer_name)

    features = keras.Input(shape=(input_dim,), dtype="float32", name=f"{name}_input")
    x = _torch_linear(hidden_dim, input_dim, f"{name}_fc1")(features)
    x = bn(f"{name}_bn1")(x)
    x = keras.layers.ReLU(name=f"{name}_relu1")(x)
    x = _torch_linear(hidden_dim, hidden_dim, f"{name}_fc2")(x)
    x = bn(f"{name}_bn2")(x)
    x = keras.layers.ReLU(name=f"{name}_relu2")(x)
    outputs = _torch_linear(output_dim, hidden_dim, f"{name}_fc3")(x)
    return keras.Model(features, outputs, name=name)
