"""Pretrained weights for reslab's ResNets, and the preprocessing that travels with them.

Sources (:func:`read_weights`):

* ``imagenet``, ``IMAGENET1K_V1``, ``IMAGENET1K_V2``: torchvision's weight enums for resnet18 ..
  resnet152, through torchvision's own loader, so the file is downloaded into
  ``$TORCH_HOME/hub/checkpoints`` once and read from there after (torch.hub checks its hash only
  when it downloads it);
* a torchvision-style state dict (``.pth``, ``.pt``) or a ``.safetensors`` file;
* a timm ResNet checkpoint: timm's ``resnet*`` models name their parameters as torchvision does
  (``conv1``, ``bn1``, ``layer1``.., ``downsample.0/1``, ``fc``) and reslab keeps those names,
  so what differs is the wrapping: a training checkpoint nests the weights under
  ``state_dict`` (or ``model``), keys saved from DataParallel or torch.compile begin with
  ``module.`` or ``_orig_mod.``, and a head-less export has no ``fc``;
* a reslab checkpoint or run folder, or a ``.safetensors`` file reslab exported.

:func:`fit_weights` puts them into a model: a classifier head of another size (or for other
classes) is replaced by the model's new one, a first convolution for another number of input
channels is adapted as timm's ``adapt_input_conv`` does, and any other difference is a one-line
error naming the first tensors that differ.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch
import torchvision
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from reslab.data.folders import IMAGENET_MEAN, IMAGENET_STD
from reslab.engine.checkpoint import FORMAT, checkpoint_file, read_torch_file, require_classifier
from reslab.errors import ReslabError
from reslab.models import IMAGENET_DEPTHS
from reslab.models import create_model as build_model

# the names --weights takes besides a path; "imagenet" is torchvision's DEFAULT for the model
NAMES = ("imagenet", "IMAGENET1K_V1", "IMAGENET1K_V2")
TORCHVISION_MODELS = tuple(f"resnet{depth}" for depth in IMAGENET_DEPTHS)
# what a state dict without metadata is taken to expect: torchvision's ImageNet evaluation
# transform for its ResNets (resize the shorter side to 256, centre crop 224)
IMAGENET_SIZE, IMAGENET_RESIZE = 224, 256
# where training checkpoints of timm (state_dict) and torchvision's references (model) keep
# the weights
CONTAINERS = ("state_dict", "model")
# prefixes of keys saved from DataParallel / DistributedDataParallel and from torch.compile
PREFIXES = ("module.", "_orig_mod.")
HEAD = ("fc.weight", "fc.bias")
FIRST_CONV = "conv1.weight"

Say = Callable[[str], None]


@dataclass
class WeightsInfo:
    """Where weights came from and how images must be prepared for them."""

    source: str  # what was loaded, in words: torchvision's enum and file, or the file's path
    size: int  # side of the square the network saw (the centre crop at evaluation)
    resize: int  # evaluation: shorter side resized to this, then centre crop; 0 = squash
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    channels: int  # input channels of the weights' first convolution
    classes: tuple[str, ...] | None = None  # the weights' own class names, when known
    model: dict | None = None  # {"name", "kwargs"} when the file records its architecture
    notes: list[str] = field(default_factory=list)  # what fitting changed: head, first conv

    def to_dict(self) -> dict:
        """For checkpoints and exports: everything but the weights' class names (their own
        head's, 1000 for ImageNet; the model's classes are stored beside it)."""
        values = asdict(self)
        values.pop("classes")
        return {**values, "mean": list(self.mean), "std": list(self.std)}


StateDict = dict[str, torch.Tensor]


def is_name(source: str) -> bool:
    return source.lower() == "imagenet" or source.upper() in NAMES


def read_weights(
    source: str | Path, model_name: str, tensors: bool = True
) -> tuple[StateDict | None, WeightsInfo]:
    """The weights named by ``source`` for a ``model_name`` network, and their
    :class:`WeightsInfo`; with ``tensors=False`` the info alone, downloading nothing."""
    text = str(source)
    if is_name(text):
        return torchvision_weights(text, model_name, tensors)
    path = Path(source)
    if not path.exists():
        raise ReslabError(
            f"--weights {text}: no such file or folder, and not a weights name "
            f"({', '.join(NAMES)}); give a .pth/.pt/.safetensors file, a reslab checkpoint "
            "or run folder, or one of those names"
        )
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    path = checkpoint_file(path)
    payload = read_torch_file(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return from_checkpoint(payload, path)
    state, arch = unwrap(payload, path)
    info = imagenet_info(f"{path} (state dict)", state)
    if arch in TORCHVISION_MODELS:  # timm's checkpoints name their architecture
        info.model = {"name": arch, "kwargs": {}}
    return state, info


def torchvision_weights(
    name: str, model_name: str, tensors: bool
) -> tuple[StateDict | None, WeightsInfo]:
    """torchvision's weights for ``model_name`` through its enum: downloaded into TORCH_HOME
    when not there yet, read from there when they are."""
    if model_name not in TORCHVISION_MODELS:
        raise ReslabError(
            f"--weights {name}: torchvision has ImageNet weights for "
            f"{', '.join(TORCHVISION_MODELS)}, not {model_name}; choose one with --model"
        )
    enum = torchvision.models.get_model_weights(model_name)
    key = "DEFAULT" if name.lower() == "imagenet" else name.upper()
    if key not in enum.__members__:
        kinds = ", ".join(w.name for w in enum)
        raise ReslabError(
            f"--weights {name}: torchvision has {kinds} for {model_name} "
            f"(imagenet = {enum.DEFAULT.name})"
        )
    weights = enum[key]
    transform = weights.transforms()
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    info = WeightsInfo(
        source=f"torchvision {type(weights).__name__}.{weights.name} ({file.name})",
        size=transform.crop_size[0],
        resize=transform.resize_size[0],
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        channels=3,
        classes=tuple(weights.meta["categories"]),
        model={"name": model_name, "kwargs": {}},
    )
    if not tensors:
        return None, info
    try:
        state = weights.get_state_dict(
            progress=False, check_hash=True, map_location="cpu", weights_only=True
        )
    except (URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error.strerror or type(error).__name__
        raise ReslabError(
            f"cannot download {weights.url} ({reason}); place the file {file.name} in "
            f"{file.parent} ($TORCH_HOME/hub/checkpoints) and run again"
        ) from None
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise ReslabError(
            f"{file} is truncated or not a PyTorch state dict ({type(error).__name__}); "
            "delete it to download it again, or put a good copy there"
        ) from None
    return dict(state), info


def imagenet_info(source: str, state: Mapping[str, torch.Tensor]) -> WeightsInfo:
    """A state dict without metadata: ImageNet's preprocessing, as torchvision's and timm's
    ResNet weights expect."""
    conv = state.get(FIRST_CONV)
    channels = conv.shape[1] if conv is not None and conv.ndim == 4 else 3
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if channels != 3:
        mean, std = (sum(mean) / 3,) * channels, (sum(std) / 3,) * channels
    return WeightsInfo(source, IMAGENET_SIZE, IMAGENET_RESIZE, mean, std, channels)


def unwrap(payload, path: Path) -> tuple[StateDict, str | None]:
    """The tensors of a state dict, or of a timm or torchvision training checkpoint around
    one, keys without DataParallel's or torch.compile's prefixes; and the architecture the
    checkpoint names (timm's ``arch``), if any."""
    if not isinstance(payload, Mapping):
        raise ReslabError(f"{path} holds a {type(payload).__name__}, not a state dict")
    # timm names the model it trained, possibly with a pretrained tag: "resnet50.a1_in1k"
    arch = payload["arch"].split(".")[0] if isinstance(payload.get("arch"), str) else None
    for key in CONTAINERS:
        if isinstance(payload.get(key), Mapping):
            payload = payload[key]
            break
    state = {}
    for key, value in payload.items():
        if isinstance(value, torch.Tensor):
            for prefix in PREFIXES:
                key = key.removeprefix(prefix)
            state[key] = value
    if not state:
        raise ReslabError(f"{path} holds no tensors; give a state dict or a checkpoint")
    return state, arch


def from_checkpoint(payload: dict, path: Path) -> tuple[StateDict, WeightsInfo]:
    """A reslab checkpoint: its (averaged) weights, architecture, input and classes."""
    require_classifier(payload, "give a classifier's checkpoint as --weights")
    spec = payload["model"]
    state = dict(payload["state_dict"])
    source = f"{path} (reslab checkpoint of {spec['name']})"
    info = info_from_input(source, payload.get("input"), state)
    info.classes = tuple(payload["classes"]) if "classes" in payload else None
    info.model = {"name": spec["name"], "kwargs": dict(spec["kwargs"])}
    return state, info


def info_from_input(source: str, spec: dict | None, state: StateDict) -> WeightsInfo:
    """The preprocessing a reslab checkpoint or export records, else ImageNet's."""
    if not spec:
        return imagenet_info(source, state)
    return WeightsInfo(
        source,
        spec["size"],
        spec.get("resize", 0),
        tuple(spec["mean"]),
        tuple(spec["std"]),
        spec["channels"],
    )


def read_safetensors(path: Path) -> tuple[StateDict, WeightsInfo]:
    """A .safetensors file: reslab's export (with its model, input and classes in the
    metadata) or any ResNet state dict (timm's hub files among them)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ReslabError(f"{path} is truncated or not a safetensors file ({error})") from None
    if metadata.get("folded") == "true":
        raise ReslabError(
            f"{path} has batch norm folded into its convolutions and cannot be trained on; "
            "export the checkpoint again without --fold-bn"
        )
    state, _ = unwrap(state, path)
    if metadata.get("format") != "reslab-safetensors":
        return state, imagenet_info(f"{path} (safetensors)", state)
    source = f"{path} (reslab safetensors of {metadata['name']})"
    info = info_from_input(source, json.loads(metadata.get("input", "null")), state)
    info.model = {"name": metadata["name"], "kwargs": json.loads(metadata["kwargs"])}
    if "classes" in metadata:
        info.classes = tuple(json.loads(metadata["classes"]))
    return state, info


def adapt_first_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A first convolution's (O, I, k, k) filters for ``channels`` inputs, as timm's
    ``adapt_input_conv`` does: summed over the input channels for one channel (a grey image
    then gives what its RGB copy gave), else repeated over the new channels and scaled by
    I / channels, so that an input whose channels are alike gives what it gave before."""
    if channels == 1:
        return weight.sum(1, keepdim=True)
    have = weight.shape[1]
    repeats = math.ceil(channels / have)
    return weight.repeat(1, repeats, 1, 1)[:, :channels] * (have / channels)


def fit_weights(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    info: WeightsInfo,
    say: Say | None = None,
    classes: Sequence[str] | None = None,
) -> None:
    """Load ``state`` into ``model``: a head for another number of classes (or other
    ``classes``) is replaced by the model's own, a first convolution for another number of
    channels is adapted (one line to ``say`` for each); anything else that differs is a
    one-line error naming the first tensors that differ."""
    target = model.state_dict()
    state = dict(state)
    for key, value in target.items():
        # batch norms saved before PyTorch 0.4.1 (torchvision's V1 files) lack the counter
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    conv = state.get(FIRST_CONV)
    want = target.get(FIRST_CONV)
    if conv is not None and want is not None and conv.shape[1] != want.shape[1]:
        if conv.shape[0] == want.shape[0] and conv.shape[2:] == want.shape[2:]:
            state[FIRST_CONV] = adapt_first_conv(conv, want.shape[1]).to(conv.dtype)
            how = "summed over" if want.shape[1] == 1 else "repeated over"
            info.notes.append(
                f"the first convolution takes {conv.shape[1]} channel(s) in the weights and "
                f"{want.shape[1]} here: its filters are {how} the input channels"
            )
    _fit_head(state, target, info, classes)
    _check_fit(model, state, target, info)
    model.load_state_dict(state, strict=True)
    for note in info.notes:
        (say or print)(note)


def _fit_head(state: StateDict, target: StateDict, info: WeightsInfo, classes) -> None:
    """Use the model's own (new) classifier when the weights' is missing, of another size,
    or for other classes."""
    if not all(key in target for key in HEAD):
        return
    wanted = target[HEAD[0]].shape[0]
    have = state.get(HEAD[0])
    if have is None:
        reason = "the weights have no classifier head"
    elif have.shape != target[HEAD[0]].shape:
        reason = f"the weights' head has {have.shape[0]} classes"
    elif classes is not None and info.classes is not None and tuple(classes) != info.classes:
        reason = "the weights' head is for other classes"
    else:
        return
    for key in HEAD:
        state[key] = target[key]
    info.notes.append(f"{reason}; a new one for {wanted} classes starts from random weights")


def _check_fit(model: nn.Module, state: StateDict, target: StateDict, info: WeightsInfo) -> None:
    """One line naming the first tensors that differ, in the model's order."""
    shapes = [k for k in target if k in state and state[k].shape != target[k].shape]
    missing = [k for k in target if k not in state]
    extra = [k for k in state if k not in target]
    if not (shapes or missing or extra):
        return
    parts = [
        f"{k} is {tuple(state[k].shape)} in the weights and {tuple(target[k].shape)} here"
        for k in shapes[:2]
    ]
    if missing:
        parts.append(f"the weights lack {', '.join(missing[:2])}")
    if extra:
        parts.append(f"the model has no {', '.join(extra[:2])}")
    count = len(shapes) + len(missing) + len(extra)
    spec = getattr(model, "spec", {"name": type(model).__name__, "kwargs": {}})
    raise ReslabError(
        f"{info.source} does not fit {spec['name']} {spec['kwargs']}: {'; '.join(parts)}"
        f" ({count} tensor(s) differ in all)"
    )


def load_weights(
    model_or_name: nn.Module | str,
    source: str | Path,
    num_classes: int | None = None,
    in_channels: int | None = None,
    say: Say | None = None,
    classes: Sequence[str] | None = None,
    **kwargs,
) -> tuple[nn.Module, WeightsInfo]:
    """A model with the weights of ``source`` (a name in :data:`NAMES` or a file), and their
    :class:`WeightsInfo`.

    Given a registry name, the model is built with the architecture the weights record (a
    reslab checkpoint's constructor arguments), ``kwargs`` over them, and by default the
    weights' own number of classes and input channels; given a model, the weights are fitted
    to it as it is. The model carries the info as ``model.weights_info``.
    """
    name = model_or_name if isinstance(model_or_name, str) else model_or_name.spec["name"]
    state, info = read_weights(source, name)
    if isinstance(model_or_name, str):
        recorded = info.model["kwargs"] if info.model and info.model["name"] == name else {}
        args = {**recorded, **kwargs}
        head = state.get(HEAD[0])
        args["num_classes"] = num_classes or (
            head.shape[0] if head is not None else args.get("num_classes", 1000)
        )
        args["in_channels"] = in_channels or info.channels
        model = build_model(name, **args)
    else:
        model = model_or_name
    fit_weights(model, state, info, say, classes)
    model.weights_info = info
    return model, info


def create_model(name: str, weights: str | Path | None = None, **kwargs) -> nn.Module:
    """:func:`reslab.models.create_model`, with ``weights`` (see :func:`load_weights`) loaded
    when given: ``create_model("resnet50", weights="imagenet", num_classes=10)``."""
    if weights is None:
        return build_model(name, **kwargs)
    say = kwargs.pop("say", None)
    return load_weights(name, weights, say=say, **kwargs)[0]
