"""WCLModel: backbone + instance head + graph head, with WCL's train step.

`call` returns the backbone's pooled features (what you embed and evaluate with).
`train_step` runs inside `strategy.run` on each replica (WCL_SPEC sections 1-2):

    backbone on each view (separate calls) -> both heads -> L2 normalise
    -> gather z, v over replicas (full or local gradient)
    -> weak labels from the global v1, v2 (identical on every replica)
    -> per-anchor instance and graph losses for the local rows
    -> this replica's share of the global mean -> summed replica gradients
    -> optimizer

Metrics report global, unscaled values.
"""

import keras
import tensorflow as tf

from wcl_tf import distributed
from wcl_tf import losses
from wcl_tf import weak_labels as weak_labels_lib


def _views(data):
    """(view_1, view_2) from a {"view_1", "view_2"} dict or a 2-tuple."""
    if isinstance(data, dict):
        return data["view_1"], data["view_2"]
    if isinstance(data, (tuple, list)) and len(data) == 1:  # (x,) from Keras
        return _views(data[0])
    x1, x2 = data[:2]
    return x1, x2


@keras.saving.register_keras_serializable(package="wcl_tf")
class WCLModel(keras.Model):
    """Weakly Supervised Contrastive Learning model.

    Args:
      backbone: keras.Model mapping images (float32 in [0, 1]) to features (b, C).
      instance_head: keras.Model (b, C) -> (b, D), the SimCLR head g.
      graph_head: keras.Model (b, C) -> (b, D), the weak-label head phi.
      temperature: tau of both losses.
      graph_loss_weight: lambda; 0 trains plain SimCLR (the graph head is unused).
      gather_grad: "full" or "local" gradient through the cross-replica gather.
    """

    def __init__(self, backbone, instance_head, graph_head, temperature=0.1,
                 graph_loss_weight=1.0, gather_grad="full", **kwargs):
        super().__init__(**kwargs)
        if gather_grad not in ("full", "local"):
            raise ValueError(f"gather_grad must be 'full' or 'local', got {gather_grad!r}")
        self.backbone = backbone
        self.instance_head = instance_head
        self.graph_head = graph_head
        self.temperature = float(temperature)
        self.graph_loss_weight = float(graph_loss_weight)
        self.gather_grad = gather_grad
        self._trackers = {
            name: keras.metrics.Mean(name=name)
            for name in ("loss", "instance_loss", "graph_loss", "instance_acc",
                         "num_components")
        }

    @property
    def metrics(self):
        return list(self._trackers.values())

    def call(self, images, training=False):
        return self.backbone(images, training=training)

    def embed(self, images, training=False):
        """L2-normalised (instance, graph) head outputs, each (b, D)."""
        features = self.backbone(images, training=training)
        z = tf.math.l2_normalize(self.instance_head(features, training=training), axis=1)
        v = tf.math.l2_normalize(self.graph_head(features, training=training), axis=1)
        return z, v

    def compute_objective(self, data, training):
        """This replica's loss share and the global, unscaled statistics."""
        x1, x2 = _views(data)
        z1, v1 = self.embed(x1, training=training)  # (b, D) each
        z2, v2 = self.embed(x2, training=training)
        z1_all, offset = distributed.gather(z1, self.gather_grad)  # (n, D)
        z2_all, _ = distributed.gather(z2, self.gather_grad)
        v1_all, _ = distributed.gather(v1, self.gather_grad)
        v2_all, _ = distributed.gather(v2, self.gather_grad)
        # Built from the global batch, the same on every replica, no gradient.
        labels1 = weak_labels_lib.weak_labels(v1_all)  # (n,)
        labels2 = weak_labels_lib.weak_labels(v2_all)

        tau = self.temperature
        instance, correct = losses.instance_loss_per_anchor(
            z1, z2, z1_all, z2_all, offset, tau)  # (2b,)
        graph = losses.graph_loss_per_anchor(
            v1, v2, v1_all, v2_all, labels1, labels2, offset, tau)  # (2b,)
        global_anchors = tf.cast(2 * tf.shape(z1_all)[0], tf.float32)
        instance_share = tf.reduce_sum(instance) / global_anchors
        graph_share = tf.reduce_sum(graph) / global_anchors
        loss_share = instance_share + self.graph_loss_weight * graph_share

        stats = tf.stop_gradient(distributed.global_sum(tf.stack([
            instance_share, graph_share, loss_share,
            tf.reduce_sum(correct) / global_anchors])))
        components = 0.5 * tf.cast(
            weak_labels_lib.num_components(labels1) + weak_labels_lib.num_components(labels2),
            tf.float32)
        logs = {
            "instance_loss": stats[0],
            "graph_loss": stats[1],
            "loss": stats[2],
            "instance_acc": stats[3],
            "num_components": components,
        }
        return loss_share, logs

    def _update_metrics(self, logs):
        for name, value in logs.items():
            self._trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self._trackers.items()}

    def train_step(self, data):
        with tf.GradientTape() as tape:
            loss_share, logs = self.compute_objective(data, training=True)
            scaled = self.optimizer.scale_loss(loss_share)
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)
        return self._update_metrics(logs)

    def test_step(self, data):
        _, logs = self.compute_objective(data, training=False)
        return self._update_metrics(logs)

    def get_config(self):
        config = super().get_config()
        config.update({
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "instance_head": keras.saving.serialize_keras_object(self.instance_head),
            "graph_head": keras.saving.serialize_keras_object(self.graph_head),
            "temperature": self.temperature,
            "graph_loss_weight": self.graph_loss_weight,
            "gather_grad": self.gather_grad,
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("backbone", "instance_head", "graph_head"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


def build_wcl_model(backbone="small_cnn", head_hidden_dim=2048, head_output_dim=128,
                    sync_bn=False, width=64, temperature=0.1, graph_loss_weight=1.0,
                    gather_grad="full", image_size=None):
    """A WCLModel with a named backbone and two 3-layer projection heads.

    Call inside `strategy.scope()` when training distributed.
    """
    from wcl_tf.models import backbones, heads

    net = backbones.build_backbone(backbone, sync_bn=sync_bn, width=width)
    feature_dim = net.output_shape[-1]
    model = WCLModel(
        backbone=net,
        instance_head=heads.build_projection_head(
            feature_dim, head_hidden_dim, head_output_dim, sync_bn=sync_bn,
            name="instance_head"),
        graph_head=heads.build_projection_head(
            feature_dim, head_hidden_dim, head_output_dim, sync_bn=sync_bn,
            name="graph_head"),
        temperature=temperature,
        graph_loss_weight=graph_loss_weight,
        gather_grad=gather_grad,
        name="wcl_model",
    )
    if image_size:
        model(tf.zeros([1, image_size, image_size, 3]))
    return model
