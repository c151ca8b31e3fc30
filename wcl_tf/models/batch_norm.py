"""BatchNormalization that runs TensorFlow's fused kernel on 4-D feature maps.

Keras 3's BatchNormalization computes the batch moments and the normalisation as
separate ops (mean, squared difference, mean, rsqrt, mul, add, and as many again in the
backward pass). On this project's 2-core CPU that was a quarter of the ResNet-50 step's op
time (`python tools/benchmark.py profile --backbone=resnet50 ...`, docs/performance.md).
TensorFlow's FusedBatchNormV3 (oneDNN on CPU, cuDNN on GPU) does the forward pass in one
op and the backward pass in one more.

Same variables, same config, and within float32 rounding the same forward output,
gradients and moving statistics as keras.layers.BatchNormalization
(tests/test_backbones.py compares them), so it can stand in anywhere, one device or many.
The moving variance keeps Keras' biased batch variance (the kernel returns the unbiased
one, which is rescaled); PyTorch's BatchNorm2d would use the unbiased one.

epsilon is raised to 1.001e-5 when smaller (PyTorch's default 1e-5 rounds below cuDNN's
minimum in float32; Keras 2 did the same); the outputs move by about 1e-8 relative.

Falls back to the Keras implementation when the fused kernel does not apply: another
backend, synchronized (cross-replica) statistics, inputs that are not 4-D, an axis other
than the last, masks, renorm, or no scale/center.
"""

import keras
from keras import ops

# cuDNN rejects epsilon < 1e-5, and float32(1e-5) is just below it.
_MIN_FUSED_EPSILON = 1.001e-5


@keras.saving.register_keras_serializable(package="wcl_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization with TensorFlow's fused kernel for NHWC maps."""

    def _fused_applies(self, inputs, mask):
        return (keras.backend.backend() == "tensorflow" and mask is None
                and not self.synchronized and not self.renorm and self.scale
                and self.center and len(inputs.shape) == 4
                and self.axis in (-1, 3))

    def call(self, inputs, training=None, mask=None):
        if not self._fused_applies(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        # The kernel takes float16/bfloat16/float32 maps with float32 statistics.
        x = inputs if inputs.dtype in (tf.float16, tf.bfloat16) else tf.cast(
            inputs, tf.float32)
        gamma = tf.cast(self.gamma, tf.float32)
        beta = tf.cast(self.beta, tf.float32)
        epsilon = max(self.epsilon, _MIN_FUSED_EPSILON)
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=epsilon, is_training=True,
                data_format="NHWC")
            # The kernel's variance is Bessel-corrected; Keras averages the biased one.
            count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float32)
            variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
            self.moving_mean.assign(
                self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32),
                epsilon=epsilon, is_training=False, data_format="NHWC")
        return ops.cast(outputs, self.compute_dtype)
