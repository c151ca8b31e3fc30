"""The authors' PyTorch WCL checkpoints as wcl_tf run folders (no PyTorch needed).

What the authors' code (github.com/mingkai-zheng/WCL) saves, and what it maps to:

    pretraining (wcl.py, the end of its epoch loop): torch.save({"model": state_dict,
        "optimizer": ..., "epoch": N}) of a DistributedDataParallel(WCL) model, so the
        state dict's keys are module.net.* (network/resnet.py: torchvision's ResNet-50
        names, no fc), module.head1.* and module.head2.* (network/head.py ProjectionHead:
        linear1, bn1, linear2, bn2, linear3). Also read: the same without "module.", and
        a bare state dict.
        -> WCLModel: backbone <- net, instance_head <- head1 (the head of their instance
           loss, network/wcl.py lines 52-53), graph_head <- head2 (their graph loss,
           lines 66-67).
    linear evaluation (linear_eval.py lines 164-171): {"model": DDP(LinearHead) state
        dict, ...}: module.net.* + module.fc.* (1000-way nn.Linear, network/head.py).
        -> the backbone, and a classifier (backbone + Dense) in classifier.keras. The
           WCLModel's heads are not in such a file: they are initialised at random (the
           provenance record says so).

The two architectures are the same network, layer for layer: wcl_tf's ResNet-50
(wcl_tf/models/backbones.py) is torchvision's v1.5 with its names ("." -> "_"), and its
heads (wcl_tf/models/heads.py) are Linear(bias) -> BN -> ReLU -> Linear(bias) -> BN ->
ReLU -> Linear(bias), as theirs; their BatchNorm1d on a (N, C, 1, 1) tensor (head.py lines
35-39) normalises each channel over the batch exactly like a BatchNorm on (N, C) (it runs
because wcl.py line 100 converts every BatchNorm to SyncBatchNorm, which takes 4-D input;
a plain BatchNorm1d refuses it). Both
BatchNorms use eps 1e-5 (the backbone's fused kernel raises it to 1.001e-5, see
wcl_tf/models/batch_norm.py). Weight layouts: Conv2d (O, I, kh, kw) -> Keras (kh, kw, I,
O); Linear (out, in) -> Dense kernel (in, out); BN weight, bias, running_mean,
running_var -> gamma, beta, moving_mean, moving_variance (num_batches_tracked is not
used in inference or by Keras: skipped).
"""

import collections
import hashlib
import math

import numpy as np

from wcl_tf import torch_checkpoint

BACKBONE_FEATURES = 2048
PREFIX = "module."
# Keras BN weight order -> torch names.
_BN_WEIGHTS = ("weight", "bias", "running_mean", "running_var")
_SKIPPED_SUFFIX = ".num_batches_tracked"
# wcl_tf head layers -> their ProjectionHead's module names.
_HEAD_LAYERS = {"fc1": "linear1", "bn1": "bn1", "fc2": "linear2", "bn2": "bn2",
                "fc3": "linear3"}
HEADS = {"instance_head": "head1", "graph_head": "head2"}

PRETRAINING, LINEAR, BACKBONE_ONLY = "pretraining", "linear_eval", "backbone"


class ImportError_(ValueError):  # noqa: N801  (not the builtin ImportError)
    """The checkpoint does not fit the network; the message names the first mismatches."""


def sha256(path, chunk=1 << 20):
    """Hex SHA-256 of the file, streamed (never more than `chunk` bytes in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_of(obj):
    """(state dict {key: LazyTensor}, where it was, the other top-level entries) of the
    unpickled checkpoint: obj["model"] or obj["state_dict"] when present, else obj."""
    if not isinstance(obj, dict):
        raise ImportError_(f"the checkpoint holds a {type(obj).__name__}, not a dict: "
                           "expected a state dict or {'model': state_dict, ...}.")
    for name in ("model", "state_dict"):
        if isinstance(obj.get(name), dict):
            others = sorted(str(k) for k in obj if k != name)
            return obj[name], f"[{name!r}]", others
    return obj, "the top level (a bare state dict)", []


def strip_prefix(state):
    """(state without "module.", whether it was there): DistributedDataParallel's prefix."""
    keys = list(state)
    if keys and all(str(k).startswith(PREFIX) for k in keys):
        return collections.OrderedDict((k[len(PREFIX):], v) for k, v in state.items()), True
    return state, False


def layout(state):
    """PRETRAINING (net + head1 + head2), LINEAR (net + fc) or BACKBONE_ONLY (net.* or a
    bare torchvision ResNet)."""
    keys = set(state)
    if any(k.startswith("head1.") for k in keys):
        return PRETRAINING
    if any(k.startswith("fc.") for k in keys) and any(k.startswith("net.") for k in keys):
        return LINEAR
    return BACKBONE_ONLY


def head_sizes(state):
    """(H, D) of head1 from its weight shapes (linear1: (H, C), linear3: (D, H))."""
    try:
        hidden = state["head1.linear1.weight"].shape[0]
        output = state["head1.linear3.weight"].shape[0]
    except KeyError as err:
        raise ImportError_(f"the checkpoint has head1 weights but not {err.args[0]!r}: "
                           "not the authors' ProjectionHead.") from None
    return int(hidden), int(output)


def _conv(array):
    return np.transpose(array, (2, 3, 1, 0))  # (O, I, kh, kw) -> (kh, kw, I, O)


def _dense(array):
    return np.transpose(array)  # (out, in) -> (in, out)


def _layer_targets(layer, torch_prefix):
    """[(torch key, expected torch shape, convert, Keras variable)] of one Keras layer."""
    import keras  # pylint: disable=import-outside-toplevel

    if isinstance(layer, keras.layers.Conv2D):
        kernel = layer.kernel
        kh, kw, cin, cout = kernel.shape
        return [(f"{torch_prefix}.weight", (cout, cin, kh, kw), _conv, kernel)]
    if isinstance(layer, keras.layers.Dense):
        kernel = layer.kernel
        cin, cout = kernel.shape
        return [(f"{torch_prefix}.weight", (cout, cin), _dense, kernel),
                (f"{torch_prefix}.bias", (cout,), None, layer.bias)]
    if isinstance(layer, keras.layers.BatchNormalization):
        variables = (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)
        return [(f"{torch_prefix}.{name}", tuple(v.shape), None, v)
                for name, v in zip(_BN_WEIGHTS, variables)]
    return []


def targets(model, classifier=None, with_heads=True, net_prefix="net."):
    """The mapping, in order: [(torch key, torch shape, convert, Keras variable)] for the
    WCLModel's backbone (and heads), and the classifier's Dense when given."""
    out = []
    for layer in model.backbone.layers:  # "layer1_0_downsample_0" -> "layer1.0.downsample.0"
        out += _layer_targets(layer, net_prefix + layer.name.replace("_", "."))
    if with_heads:
        for keras_head, torch_head in HEADS.items():
            head = getattr(model, keras_head)
            for suffix, torch_name in _HEAD_LAYERS.items():
                out += _layer_targets(head.get_layer(f"{keras_head}_{suffix}"),
                                      f"{torch_head}.{torch_name}")
    if classifier is not None:
        out += _layer_targets(classifier.get_layer("fc"), "fc")
    return out


def _shape_text(shape):
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_keys(state, expected, skipped_keys, limit=5):
    """Raises ImportError_ naming the first missing, unexpected or misshapen entries."""
    expected_shapes = {key: shape for key, shape, _, _ in expected}
    # Wrong shapes first, then entries the network does not have, then missing ones.
    problems = [f"{key} has shape {_shape_text(state[key].shape)}, the network needs "
                f"{_shape_text(shape)}" for key, shape in expected_shapes.items()
                if key in state and tuple(state[key].shape) != shape]
    problems += [f"unexpected {k} {_shape_text(state[k].shape)}" for k in state
                 if k not in expected_shapes and k not in skipped_keys]
    problems += [f"missing {key} {_shape_text(shape)}"
                 for key, shape in expected_shapes.items() if key not in state]
    if problems:
        more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
        raise ImportError_(
            f"the checkpoint does not fit wcl_tf's ResNet-50 + heads: {len(problems)} "
            f"mismatch(es): {'; '.join(problems[:limit])}{more}. Is it a checkpoint of the "
            "authors' WCL (torchvision ResNet-50 + ProjectionHead)?")


def _tensor_state(state, where):
    for key, value in state.items():
        if not isinstance(value, torch_checkpoint.LazyTensor):
            raise ImportError_(f"entry {key!r} of the state dict in {where} is a "
                               f"{type(value).__name__}, not a tensor.")


def assign(expected, state, on_tensor=None):
    """Reads each tensor (one at a time) and assigns it, converted to float32, to its
    Keras variable."""
    for key, _, convert, variable in expected:
        array = state[key].numpy().astype(np.float32, copy=False)
        if convert is not None:
            array = convert(array)
        variable.assign(array)
        if on_tensor is not None:
            on_tensor(key)
        del array


def describe(path, ckpt_obj):
    """What the file holds, before anything is built: a dict with the state dict, its
    layout, head sizes, and the record fields."""
    state, where, others = state_dict_of(ckpt_obj)
    _tensor_state(state, where)
    state, had_prefix = strip_prefix(state)
    kind = layout(state)
    if kind == BACKBONE_ONLY and not any(k.startswith("net.") for k in state):
        # A bare torchvision ResNet state dict: treat its keys as net.*.
        state = collections.OrderedDict(
            (f"net.{k}", v) for k, v in state.items() if not k.startswith("fc."))
    info = {
        "state": state,
        "layout": kind,
        "state_dict_at": where,
        "module_prefix": had_prefix,
        "other_entries": others,
        "epoch": ckpt_obj.get("epoch") if isinstance(ckpt_obj, dict) else None,
    }
    if kind == PRETRAINING:
        info["head_hidden_dim"], info["head_output_dim"] = head_sizes(state)
        hidden2 = state.get("head2.linear1.weight")
        output2 = state.get("head2.linear3.weight")
        if hidden2 is not None and output2 is not None and (
                hidden2.shape[0], output2.shape[0]) != (info["head_hidden_dim"],
                                                        info["head_output_dim"]):
            raise ImportError_(
                f"head1 is {info['head_hidden_dim']}/{info['head_output_dim']} but head2 is "
                f"{hidden2.shape[0]}/{output2.shape[0]} (hidden/output): wcl_tf's two heads "
                "have one size.")
    if kind == LINEAR:
        fc = state.get("fc.weight")
        info["num_classes"] = int(fc.shape[0]) if fc is not None else 0
    info["float_dtypes"] = sorted({str(v.dtype) for v in state.values()})
    info["params"] = int(sum(v.size for v in state.values()))
    info["sha256"] = None
    info["path"] = path
    return info


def skipped_keys(state):
    return [k for k in state if k.endswith(_SKIPPED_SUFFIX)]


def build_models(info, default_head=(4096, 256)):
    """(WCLModel, classifier or None) with fresh variables, shaped for `info`."""
    import keras  # pylint: disable=import-outside-toplevel

    from wcl_tf.models.wcl_model import build_wcl_model  # pylint: disable=import-outside-toplevel

    hidden = info.get("head_hidden_dim", default_head[0])
    output = info.get("head_output_dim", default_head[1])
    model = build_wcl_model("resnet50", head_hidden_dim=hidden, head_output_dim=output,
                            image_size=32)
    classifier = None
    if info["layout"] == LINEAR:
        images = keras.Input(shape=(None, None, 3), dtype="float32", name="images")
        logits = keras.layers.Dense(info["num_classes"], name="fc")(model.backbone(images))
        classifier = keras.Model(images, logits, name="linear_classifier")
    return model, classifier, (hidden, output)


def mapping_record(expected):
    """{torch key: Keras variable path} for the provenance record."""
    return {key: variable.path for key, _, _, variable in expected}


def round_up_mib(nbytes):
    return math.ceil(nbytes / 2**20)
