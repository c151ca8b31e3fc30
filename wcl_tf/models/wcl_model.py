"""WCLModel: backbone + instance head + graph head, with WCL's train step.

`call` returns the backbone's pooled features (what you embed and evaluate with).
`train_step` runs inside `strategy.run` on each replica (docs/method.md sections 2-3):

    backbone on each view (separate calls) -> both heads -> L2 normalise
    -> gather z, v over replicas (full or local gradient)
    -> weak labels from the global v1, v2 (identical on every replica)
    -> per-anchor instance and graph losses for the local rows (graph loss: gradient
       through its anchors only, as in the authors' code, unless graph_key_grad)
    -> this replica's share of the global mean -> summed replica gradients
    -> optimizer

Metrics report global, unscaled values.
"""

import keras
import tensorflow as tf

from wcl_tf import distributed
from wcl_tf.config import GATHER_GRAD
from wcl_tf import losses
from wcl_tf import optimizers  # noqa: F401  (registers LARS: compiled .keras files name it)
from wcl_tf import weak_labels as weak_labels_lib
from wcl_tf.data import augment_layers  # noqa: F401  (registers ViewAugmentation)


def _views(data):
    """(view_1, view_2, local or None) from a {"view_1", "view_2"[, "local"]} dict or a
    2- or 3-tuple."""
    if isinstance(data, dict):
        return data["view_1"], data["view_2"], data.get("local")
    if isinstance(data, (tuple, list)) and len(data) == 1:  # (x,) from Keras
        return _views(data[0])
    return data[0], data[1], (data[2] if len(data) > 2 else None)


# Logged when multi-crop is on: the kept crops' losses, the mean graph-head similarity
# of kept and dropped crops to their image, and the fraction of kept crops whose image
# sits in a component larger than its mutual nearest-neighbour pair (so the crop gets
# positives beyond one neighbour).
_LOCAL_METRICS = ("local_instance_loss", "local_graph_loss", "local_kept_sim",
                  "local_dropped_sim", "local_multi_member")


def _multi_worker_logs(logs):
    """Keras 3.15 reduces step logs over replicas with reduce("MEAN", v, axis=0) under
    MultiWorkerMirroredStrategy, which fails on scalars (tensorflow/tensorflow#72388).
    Our logs are global values, equal on every replica: give them a length-1 axis there,
    whose mean over replicas is the value again."""
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs


def _in_large_component(labels, rows):
    """1.0 where the component of image `rows` has more than 2 members, else 0.0."""
    sizes = weak_labels_lib.component_sizes(labels)  # (n,)
    return tf.cast(tf.gather(sizes, tf.gather(labels, rows)) > 2, tf.float32)


@keras.saving.register_keras_serializable(package="wcl_tf")
class WCLModel(keras.Model):
    """Weakly Supervised Contrastive Learning model.

    Args:
      backbone: keras.Model mapping images (float32 in [0, 1]) to features (b, C).
      instance_head: keras.Model (b, C) -> (b, D), the SimCLR head g.
      graph_head: keras.Model (b, C) -> (b, D), the weak-label head phi.
      temperature: tau of both losses.
      graph_loss_weight: lambda; 0 trains plain SimCLR (the graph head is unused).
      gather_grad: "local" (default, the authors' code) or "full" gradient through the
        cross-replica gather of the instance loss's keys (and of the graph loss's keys
        when graph_key_grad); see wcl_tf.distributed.gather.
      graph_key_grad: False (the authors' code): the graph loss's keys are constants and
        only its anchors carry gradient (docs/method.md section 3.1); True: the keys too.
      knn_crops: K, multi-crop local crops kept per image (docs/method.md section 6); 0 keeps
        none and the step is exactly the two-view step. Batches then carry "local":
        (b, M, L, L, 3) with M >= K.
      local_loss_weight: mu, weight of the kept crops' losses.
      view_augmentation: None (batches hold augmented float views), or a
        wcl_tf.data.augment_layers.ViewAugmentation: batches hold the views' uint8 crops
        (augment_on="device") and each replica augments its own at the start of the step,
        seeded by (its seed, optimizer step, replica id). Needs steps_per_epoch.
    """

    def __init__(self, backbone, instance_head, graph_head, temperature=0.1,
                 graph_loss_weight=1.0, gather_grad="local", knn_crops=0,
                 local_loss_weight=1.0, graph_key_grad=False, view_augmentation=None,
                 **kwargs):
        super().__init__(**kwargs)
        if gather_grad not in GATHER_GRAD:
            raise ValueError(f"gather_grad must be one of {GATHER_GRAD}, got {gather_grad!r}")
        self.backbone = backbone
        self.instance_head = instance_head
        self.graph_head = graph_head
        self.temperature = float(temperature)
        self.graph_loss_weight = float(graph_loss_weight)
        self.gather_grad = gather_grad
        self.graph_key_grad = bool(graph_key_grad)
        self.knn_crops = int(knn_crops)
        self.local_loss_weight = float(local_loss_weight)
        self.view_augmentation = view_augmentation
        names = ["loss", "instance_loss", "graph_loss", "instance_acc", "num_components"]
        if self.knn_crops:
            names += list(_LOCAL_METRICS)
        self._trackers = {name: keras.metrics.Mean(name=name) for name in names}
        # Steps of this epoch whose loss or gradients were not finite (never applied).
        self._trackers["nonfinite_steps"] = keras.metrics.Sum(name="nonfinite_steps")
        # Epoch length the LR schedule was built for (wcl_tf.build_model sets it): fit()
        # uses it when no steps_per_epoch is given, so the pipeline's endless dataset, the
        # schedule and the weak-to-strong switch agree without repeating it.
        self.steps_per_epoch = None

    @property
    def metrics(self):
        return list(self._trackers.values())

    def call(self, images, training=False):
        return self.backbone(images, training=training)

    def embed(self, images, training=False):
        """L2-normalised (instance, graph) head outputs, each float32 (b, D)."""
        features = self.backbone(images, training=training)
        # Similarities, exp and log-sum-exp run in float32 under mixed precision.
        z = tf.cast(self.instance_head(features, training=training), tf.float32)
        v = tf.cast(self.graph_head(features, training=training), tf.float32)
        return tf.math.l2_normalize(z, axis=1), tf.math.l2_normalize(v, axis=1)

    def compute_objective(self, data, training):
        """This replica's loss share and the global, unscaled statistics."""
        x1, x2, local = _views(data)
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
            v1, v2, v1_all, v2_all, labels1, labels2, offset, tau,
            key_grad=self.graph_key_grad)  # (2b,)
        global_anchors = tf.cast(2 * tf.shape(z1_all)[0], tf.float32)
        instance_share = tf.reduce_sum(instance) / global_anchors
        graph_share = tf.reduce_sum(graph) / global_anchors
        loss_share = instance_share + self.graph_loss_weight * graph_share

        stats = [instance_share, graph_share, loss_share,
                 tf.reduce_sum(correct) / global_anchors]
        multi_crop = bool(self.knn_crops) and local is not None
        if multi_crop:
            local_stats = self._local_crop_losses(
                local, v1, v2, z1_all, z2_all, v1_all, v2_all, labels1, labels2, offset,
                training)
            local_instance, local_graph = local_stats[:2]
            loss_share += self.local_loss_weight * (
                local_instance + self.graph_loss_weight * local_graph)
            stats[2] = loss_share
            stats += local_stats
        stats = tf.stop_gradient(distributed.global_sum(tf.stack(stats)))
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
        if multi_crop:
            for i, name in enumerate(_LOCAL_METRICS):
                logs[name] = stats[4 + i]
        return loss_share, logs

    def _local_crop_losses(self, local, v1, v2, z1_all, z2_all, v1_all, v2_all, labels1,
                           labels2, offset, training):
        """This replica's shares of the kept crops' losses and selection statistics.

        One backbone call for all local crops (one resolution), both heads, then the K
        crops per image most similar to the image's global graph embedding.
        """
        b, m = tf.shape(local)[0], local.shape[1]
        k = self.knn_crops
        if m is not None and k > m:
            raise ValueError(f"knn_crops={k} but batches carry only {m} local crops")
        crops = tf.reshape(local, tf.concat([[-1], tf.shape(local)[2:]], axis=0))
        z_loc, v_loc = self.embed(crops, training=training)  # (b*M, D)
        depth = tf.shape(z_loc)[-1]
        z_loc = tf.reshape(z_loc, [b, -1, depth])  # (b, M, D)
        v_loc = tf.reshape(v_loc, [b, -1, depth])
        sim, kept = losses.select_local_crops(v_loc, v1, v2, k)  # (b, M), (b, K)
        z_kept = tf.reshape(tf.gather(z_loc, kept, batch_dims=1), [-1, depth])  # (b*K, D)
        v_kept = tf.reshape(tf.gather(v_loc, kept, batch_dims=1), [-1, depth])
        rows = offset + tf.repeat(tf.range(b), k)  # (b*K,) source image, global row
        tau = self.temperature
        instance = losses.local_instance_loss_per_anchor(z_kept, z1_all, z2_all, rows, tau)
        graph = losses.local_graph_loss_per_anchor(
            v_kept, v1_all, v2_all, labels1, labels2, rows, tau,
            key_grad=self.graph_key_grad)
        n = tf.cast(tf.shape(z1_all)[0], tf.float32)
        global_anchors = n * k
        kept_mask = tf.reduce_sum(tf.one_hot(kept, tf.shape(sim)[1]), axis=1)  # (b, M)
        num_dropped = tf.cast(tf.shape(sim)[1] - k, tf.float32) * n
        return [
            tf.reduce_sum(instance) / global_anchors,
            tf.reduce_sum(graph) / global_anchors,
            tf.reduce_sum(sim * kept_mask) / global_anchors,
            # Mean over dropped crops (0 when K = M).
            tf.reduce_sum(sim * (1.0 - kept_mask)) / tf.maximum(num_dropped, 1.0),
            tf.reduce_sum(0.5 * (_in_large_component(labels1, rows)
                                 + _in_large_component(labels2, rows))) / global_anchors,
        ]

    def _update_metrics(self, logs, finite=True):
        """Epoch means of the logs over finite steps; nonfinite_steps counts the others."""
        finite = tf.convert_to_tensor(finite)
        weight = tf.cast(finite, tf.float32)
        for name, value in logs.items():
            self._trackers[name].update_state(tf.where(finite, value, 0.0),
                                              sample_weight=weight)
        # Keras sums a Sum metric's replica copies: each replica adds its 1/R share.
        _, replicas, _ = distributed.replica_info()
        self._trackers["nonfinite_steps"].update_state((1.0 - weight) / replicas)
        return {name: tracker.result() for name, tracker in self._trackers.items()}

    def _step_is_finite(self, loss, grads):
        """(loss_ok, grads_ok): scalar bools, the same on every replica. loss_ok: the
        global loss is finite; grads_ok: every gradient of every replica is finite."""
        loss_ok = tf.math.is_finite(loss)
        # A NaN or Inf anywhere makes the sum non-finite: one pass over the gradients.
        local_ok = tf.math.is_finite(tf.add_n(
            [tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads if g is not None]))
        # Replicas hold different gradients before the all-reduce: agree on the flag.
        bad_replicas = distributed.global_sum(1.0 - tf.cast(local_ok, tf.float32))
        return loss_ok, bad_replicas == 0.0

    def _apply_if_finite(self, finite, grads, variables):
        """optimizer.apply(grads) when `finite` (equal on all replicas), else only count
        the step, so that the schedule and the data stay aligned.

        Dynamic loss scaling (LossScaleOptimizer) is driven by the same global flag:
        Keras 3.15's LossScaleOptimizer checks the gradients per replica before they are
        summed and acts on replica 0's answer, so an Inf in replica 1's gradient reached
        the weights. Here its inner optimizer applies the unscaled gradients when every
        replica's are finite; otherwise nothing is applied and the scale is halved and
        its counter reset, on all replicas alike (Keras' own rule, done here because its
        apply() cannot be handed a global flag).

        MirroredStrategy's optimizer update calls merge_call, which may not sit inside a
        tf.cond in replica context: there the cond runs in cross-replica context (as
        Keras' LossScaleOptimizer does).
        """
        scaler = self.optimizer
        scaled = isinstance(scaler, keras.optimizers.LossScaleOptimizer)

        def apply_grads(grads, variables):
            if not scaled:
                self.optimizer.apply(grads, variables)
                return
            scale = scaler.dynamic_scale
            scaler.inner_optimizer.apply(
                [None if g is None else g / tf.cast(scale, g.dtype) for g in grads], variables)

        def grow_scale():
            if not scaled:
                return

            def upscale():
                scaler.step_counter.assign(0)
                scaler.dynamic_scale.assign(scaler.dynamic_scale * 2.0)
                return tf.constant(True)

            def increment():
                scaler.step_counter.assign_add(1)
                return tf.constant(True)

            tf.cond(tf.equal(scaler.step_counter, scaler.dynamic_growth_steps - 1),
                    upscale, increment)

        def skip():
            self.optimizer.iterations.assign_add(1)
            if scaled:
                scaler.step_counter.assign(0)
                scaler.dynamic_scale.assign(scaler.dynamic_scale * 0.5)
            return tf.constant(False)

        if scaled and not scaler.built:
            scaler.build(variables)
        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            def apply():
                apply_grads(grads, variables)
                grow_scale()
                return tf.constant(True)

            tf.cond(finite, apply, skip)
            return

        def cross_replica(strategy, finite, grads, variables):
            finite = strategy.experimental_local_results(finite)[0]

            def apply():
                strategy.extended.call_for_each_replica(apply_grads, args=(grads, variables))
                grow_scale()
                return tf.constant(True)

            tf.cond(finite, apply, skip)

        tf.distribute.get_replica_context().merge_call(cross_replica,
                                                       args=(finite, grads, variables))

    def fit(self, *args, **kwargs):
        if kwargs.get("steps_per_epoch") is None and self.steps_per_epoch:
            kwargs["steps_per_epoch"] = self.steps_per_epoch
        return super().fit(*args, **kwargs)

    def make_train_function(self, force=False):
        """Keras' train function, except with steps_per_execution > 1 on several replicas.

        There Keras 3.15.1 runs each step of an execution inside a tf.cond (is there a
        next batch?) in a tf.while_loop, and under MirroredStrategy with 2 or more replicas
        that graph fails at its first call ("You must feed a value for placeholder
        tensor 'while/body/.../while/cond/Placeholder'", keras-team/keras#19246: the
        optimizer's merge_call inside a cond); a plain Dense model fails the same way.
        Here an execution is a tf.while_loop over its steps with no cond, each step
        strategy.run(train_step) reduced as Keras reduces it. The step, its logs and the
        callbacks are Keras' own; the one difference: the data must hold whole executions
        (the training data is endless), else the execution ends with the data's end
        (OutOfRangeError, which fit treats as the end of the data).
        """
        strategy = self.distribute_strategy
        steps = int(self.steps_per_execution or 1)
        if ((self.train_function is not None and not force) or steps == 1
                or self.run_eagerly or strategy.num_replicas_in_sync == 1):
            return super().make_train_function(force)
        from keras.src.backend.tensorflow.trainer import (  # pylint: disable=import-outside-toplevel
            reduce_per_replica)

        def one_step(data):
            outputs = strategy.run(self.train_step, args=(data,))
            return reduce_per_replica(outputs, strategy, reduction="auto")

        one_step = tf.function(one_step, reduce_retracing=True, jit_compile=self.jit_compile)

        def execution(iterator):
            first = one_step(iterator.get_next())
            _, outputs = tf.while_loop(
                lambda i, _: i < steps - 1,
                lambda i, _: (i + 1, one_step(iterator.get_next())),
                (tf.constant(0), first))
            return outputs

        self.train_function = tf.function(execution, reduce_retracing=True)
        return self.train_function

    def augment_views(self, data):
        """The step's batch with the device-side augmentation applied (view_augmentation;
        the batch unchanged without it): each replica draws from (seed, optimizer step,
        replica_id_in_sync_group), so replicas never share views and a resumed run
        continues the sequence. Static shapes under XLA (jit_compile) and on TPUs."""
        if self.view_augmentation is None:
            return data
        if not self.steps_per_epoch:
            raise ValueError(
                "augment_on='device' needs the model's steps_per_epoch (the weak-to-strong "
                "switch counts epochs): build the model with wcl_tf.build_model(cfg) or set "
                "model.steps_per_epoch.")
        x1, x2, local = _views(data)
        views = {"view_1": x1, "view_2": x2}
        if local is not None:
            views["local"] = local
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        static = bool(getattr(self, "jit_compile", False)) or isinstance(
            tf.distribute.get_strategy(), tf.distribute.TPUStrategy)
        return self.view_augmentation(views, step=self.optimizer.iterations,
                                      steps_per_epoch=self.steps_per_epoch,
                                      replica_id=replica, static_shapes=static)

    def train_step(self, data):
        data = self.augment_views(data)
        with tf.GradientTape() as tape:
            loss_share, logs = self.compute_objective(data, training=True)
            scaled = self.optimizer.scale_loss(loss_share)
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        loss_ok, grads_ok = self._step_is_finite(logs["loss"], grads)
        self._apply_if_finite(tf.logical_and(loss_ok, grads_ok), grads, variables)
        # Under dynamic loss scaling an overflow with a finite loss is routine (the scale
        # halves); only a non-finite loss counts as a bad step there.
        counted_ok = (loss_ok if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
                      else tf.logical_and(loss_ok, grads_ok))
        return _multi_worker_logs(self._update_metrics(logs, counted_ok))

    def test_step(self, data):
        _, logs = self.compute_objective(self.augment_views(data), training=False)
        return _multi_worker_logs(self._update_metrics(logs))

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3.15 learns the batch shapes at the start of fit / evaluate by drawing the
        # first batch from an extra iterator of the data (one more start of the whole
        # input pipeline, thrown away) and reducing it with strategy.reduce, which fails
        # on a nest under MultiWorkerMirroredStrategy. Only shapes matter: hand Keras
        # zeros shaped like one replica's batch, from the dataset's element_spec, so no
        # data is drawn and fit's step 0 trains on the pipeline's batch 0 in every
        # strategy (wcl_tf.data.pipeline counts batches from there).
        dataset = getattr(iterator, "_distributed_dataset", None)
        if iterator is not None and data_batch is None and dataset is not None:
            def zeros(spec):
                spec = getattr(spec, "_value_specs", (spec,))[0]  # PerReplicaSpec
                if not isinstance(spec, tf.TensorSpec):
                    raise TypeError(spec)
                return tf.zeros([1 if d is None else d for d in spec.shape], spec.dtype)

            try:
                data_batch = tf.nest.map_structure(zeros, dataset.element_spec)
                iterator = None
            except (TypeError, ValueError):  # Not plain tensors: let Keras draw a batch.
                data_batch = None
        strategy = self._distribute_strategy
        if (iterator is not None and data_batch is None
                and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)):
            # The batch only serves shapes: this worker's first replica's rows.
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0], next(it))
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def get_config(self):
        config = super().get_config()
        config.update({
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "instance_head": keras.saving.serialize_keras_object(self.instance_head),
            "graph_head": keras.saving.serialize_keras_object(self.graph_head),
            "temperature": self.temperature,
            "graph_loss_weight": self.graph_loss_weight,
            "gather_grad": self.gather_grad,
            "knn_crops": self.knn_crops,
            "local_loss_weight": self.local_loss_weight,
            "graph_key_grad": self.graph_key_grad,
            "view_augmentation": (None if self.view_augmentation is None else
                                  keras.saving.serialize_keras_object(self.view_augmentation)),
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("backbone", "instance_head", "graph_head"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        if config.get("view_augmentation") is not None:
            config["view_augmentation"] = keras.saving.deserialize_keras_object(
                config["view_augmentation"])
        return cls(**config)


def build_wcl_model(backbone="small_cnn", head_hidden_dim=2048, head_output_dim=128,
                    sync_bn=False, width=64, temperature=0.1, graph_loss_weight=1.0,
                    gather_grad="local", image_size=None, knn_crops=0, local_loss_weight=1.0,
                    graph_key_grad=False, view_augmentation=None):
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
        knn_crops=knn_crops,
        local_loss_weight=local_loss_weight,
        graph_key_grad=graph_key_grad,
        view_augmentation=view_augmentation,
        name="wcl_model",
    )
    if image_size:
        model(tf.zeros([1, image_size, image_size, 3]))
    return model
