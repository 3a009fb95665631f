"""Faster R-CNN (Ren et al. 2015) with a ResNet C4 backbone, on torchvision's detection framework.

The C4 layout is that of He et al. 2015 (section A, "Object Detection Baselines") and detectron2's
``Base-RCNN-C4``: conv1..conv4_x compute one stride-16 map shared by the RPN and RoI pooling;
each RoI is pooled to 14x14, conv5_x runs on it (its first block has stride 2, so 7x7), and
global average pooling gives the vector that two linear layers turn into class scores and box
deltas. torchvision supplies anchors, the RPN, RoIAlign, NMS, box coding and the losses; this
module supplies the trunk, the per-RoI head and the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops
from torchvision.ops.misc import FrozenBatchNorm2d

from reslab.errors import ReslabError
from reslab.models.resnet import IMAGENET_DEPTHS, ResNet, create_model

BACKBONES = tuple(f"resnet{depth}" for depth in IMAGENET_DEPTHS)
SPEC_NAME = "fasterrcnn_c4"


@dataclass
class RPNConfig:
    """Region proposal network; defaults from detectron2 ``Base-RCNN-C4`` / Ren et al. 2015."""

    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # all on the one stride-16 map
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    pre_nms_top_n_train: int = 12000
    post_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 6000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256  # anchors sampled per image for the loss, half positive
    positive_fraction: float = 0.5
    score_thresh: float = 0.0


@dataclass
class RoIHeadsConfig:
    """RoI pooling and the box head; defaults from detectron2 ``Base-RCNN-C4``."""

    pooled_size: int = 14  # conv5_x's first stride 2 then gives 7x7, as on ImageNet
    sampling_ratio: int = 0  # adaptive, as detectron2's ROIAlignV2
    batch_size_per_image: int = 512  # RoIs sampled per image for the loss, a quarter positive
    positive_fraction: float = 0.25
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100


@dataclass
class DetectorConfig:
    """Everything needed to rebuild a detector; stored in its checkpoints."""

    backbone: str = "resnet101"
    num_classes: int = 91  # including background (label 0), torchvision's convention
    width: float = 1.0  # channel multiplier for the ResNet (1.0 = the paper's network)
    # From ImageNet weights, detectron2 freezes batch norm and the stem plus res2 (FREEZE_AT=2);
    # from scratch, batch norm must learn its statistics and nothing is frozen.
    frozen_bn: bool = False
    freeze_at: int = 0  # 0: train all; 1: freeze the stem; 2: stem and layer1
    min_size: int = 800  # the shorter image side after resizing (detectron2 default)
    max_size: int = 1333
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)

    @classmethod
    def from_dict(cls, data: Mapping) -> DetectorConfig:
        data = dict(data)
        rpn = RPNConfig(**_tuples(data.pop("rpn", {})))
        roi_heads = RoIHeadsConfig(**data.pop("roi_heads", {}))
        return cls(**data, rpn=rpn, roi_heads=roi_heads)


def _tuples(data: Mapping) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


class C4Trunk(nn.Module):
    """conv1..conv4_x of a ResNet: one map at stride 16 shared by the RPN and RoI pooling."""

    def __init__(self, resnet: ResNet):
        super().__init__()
        # torchvision's names, so an ImageNet state dict maps onto these modules unchanged
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"):
            setattr(self, name, getattr(resnet, name))
        self.out_channels = resnet.layer4[0].conv1.in_channels  # 1024 (bottleneck) / 256 (basic)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))  # (N, 1024, H/16, W/16)


# RoIs per chunk of the deferred pooling: 32 RoIs pooled to 14x14x1024 take 26 MB in fp32, little
# enough to stay in the allocator's reused heap and largely in cache through res5
ROI_CHUNK = 32


@dataclass
class PendingRoIs:
    """RoIs that :class:`DeferredRoIAlign` has not pooled yet; :class:`Res5Head` pools them and
    runs res5 on them a chunk at a time, so that the (R, 1024, 14, 14) tensor of all of them
    (800 MB in fp32 for 1000 RoIs) is never made."""

    pooler: MultiScaleRoIAlign
    features: dict[str, torch.Tensor]
    boxes: list[torch.Tensor]  # per image, (n_i, 4) xyxy
    image_sizes: list[tuple[int, int]]
    chunk: int

    def __len__(self) -> int:
        return sum(len(b) for b in self.boxes)

    def chunks(self):
        """Pooled (<= chunk, C, 14, 14) tensors, in the order the pooler would stack them.

        The pooler sees the whole batch's features and image sizes on every call, as it would
        in one call (it infers the map's scale from them); the other images get no boxes."""
        empty = [b[:0] for b in self.boxes]
        for i, boxes in enumerate(self.boxes):
            for part in boxes.split(self.chunk) if len(boxes) else ():  # split gives one empty
                yield self.pooler(
                    self.features, [*empty[:i], part, *empty[i + 1 :]], self.image_sizes
                )


class DeferredRoIAlign(nn.Module):
    """In place of the box head's RoIAlign at inference: hands the head its inputs unpooled.

    Pooling all 1000 RoIs of an image at once and then running res5 on them streams 800 MB
    through memory several times; pooled and run 32 at a time they stay in cache
    (``benchmarks/detection.py infer`` times both). The results are the same, up to float
    rounding.
    """

    def __init__(self, pooler: MultiScaleRoIAlign, chunk: int = ROI_CHUNK):
        super().__init__()
        self.pooler = pooler
        self.chunk = chunk

    def forward(
        self,
        features: dict[str, torch.Tensor],
        boxes: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> PendingRoIs:
        # roi_align reads NCHW: convert a channels_last map once here, not once per chunk
        features = {name: value.contiguous() for name, value in features.items()}
        return PendingRoIs(self.pooler, features, boxes, image_sizes, self.chunk)


class Res5Head(nn.Module):
    """conv5_x run on each pooled RoI, then global average pooling (detectron2 Res5ROIHeads)."""

    def __init__(self, resnet: ResNet):
        super().__init__()
        self.layer4 = resnet.layer4
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_channels = resnet.num_features

    def forward(self, x: torch.Tensor | PendingRoIs) -> torch.Tensor:  # (R, 1024, 14, 14)
        if isinstance(x, PendingRoIs):
            parts = [self.forward(pooled) for pooled in x.chunks()]
            if parts:
                return torch.cat(parts)
            x = x.pooler(x.features, x.boxes, x.image_sizes)  # no RoIs: (0, C, 14, 14)
        x = self.layer4(x)  # (R, 2048, 7, 7)
        return torch.flatten(self.avgpool(x), 1)  # (R, 2048)


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d holding the same statistics and affine.

    Detection batches are a few images, too few for batch statistics; detectron2 and torchvision
    freeze batch norm when fine-tuning from ImageNet weights.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)
    return module


def check_positive_fraction(name: str, value: float) -> None:
    """A sampler's positive share must be in (0, 1]; ``name`` is what the user set."""
    if not 0 < value <= 1:
        raise ReslabError(f"{name} must be in (0, 1], got {value}")


def _check_sampling(config: DetectorConfig) -> None:
    """What torchvision's samplers would fail on deep in the first step, as one-line errors."""
    rpn, roi = config.rpn, config.roi_heads
    counts = (
        ("RPN samples per image", rpn.batch_size_per_image),
        ("RoI samples per image", roi.batch_size_per_image),
        ("RPN pre-NMS boxes in training", rpn.pre_nms_top_n_train),
        ("RPN proposals in training", rpn.post_nms_top_n_train),
        ("RPN pre-NMS boxes at test", rpn.pre_nms_top_n_test),
        ("RPN proposals at test", rpn.post_nms_top_n_test),
    )
    for name, value in counts:
        if not (isinstance(value, int) and value >= 1):
            raise ReslabError(f"{name} must be a whole number >= 1, got {value}")
    check_positive_fraction("RPN positive fraction", rpn.positive_fraction)
    check_positive_fraction("RoI positive fraction", roi.positive_fraction)


def build_detector(config: DetectorConfig) -> FasterRCNN:
    """A C4 Faster R-CNN; ``model.spec`` holds the config, so checkpoints can rebuild it."""
    if config.backbone not in BACKBONES:
        raise ReslabError(
            f"unknown detection backbone {config.backbone!r}; expected one of {BACKBONES}"
        )
    if config.num_classes < 2:
        raise ReslabError(
            f"num_classes counts the background, so at least 2, got {config.num_classes}"
        )
    _check_sampling(config)
    resnet = create_model(config.backbone, width=config.width)
    if config.frozen_bn:
        freeze_batch_norm(resnet)
    trunk, head = C4Trunk(resnet), Res5Head(resnet)
    for stage in (nn.ModuleList([trunk.conv1, trunk.bn1]), trunk.layer1)[: config.freeze_at]:
        stage.requires_grad_(False)

    rpn, roi = config.rpn, config.roi_heads
    anchors = AnchorGenerator(
        sizes=(tuple(rpn.anchor_sizes),), aspect_ratios=(tuple(rpn.aspect_ratios),)
    )
    model = FasterRCNN(
        trunk,
        min_size=config.min_size,
        max_size=config.max_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=rpn.pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn.pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn.post_nms_top_n_train,
        rpn_post_nms_top_n_test=rpn.post_nms_top_n_test,
        rpn_nms_thresh=rpn.nms_thresh,
        rpn_fg_iou_thresh=rpn.fg_iou_thresh,
        rpn_bg_iou_thresh=rpn.bg_iou_thresh,
        rpn_batch_size_per_image=rpn.batch_size_per_image,
        rpn_positive_fraction=rpn.positive_fraction,
        rpn_score_thresh=rpn.score_thresh,
        box_roi_pool=MultiScaleRoIAlign(["0"], roi.pooled_size, roi.sampling_ratio),
        box_head=head,
        box_predictor=FastRCNNPredictor(head.out_channels, config.num_classes),
        box_score_thresh=roi.score_thresh,
        box_nms_thresh=roi.nms_thresh,
        box_detections_per_img=roi.detections_per_img,
        box_fg_iou_thresh=roi.fg_iou_thresh,
        box_bg_iou_thresh=roi.bg_iou_thresh,
        box_batch_size_per_image=roi.batch_size_per_image,
        box_positive_fraction=roi.positive_fraction,
    )
    model.spec = {"name": SPEC_NAME, "kwargs": asdict(config)}
    return model


def detector_config(model: FasterRCNN) -> DetectorConfig:
    return DetectorConfig.from_dict(model.spec["kwargs"])


def _resnet_view(model: FasterRCNN) -> nn.Module:
    """A module whose parameter names are those of a torchvision ResNet, sharing the detector's."""
    view = nn.Module()
    for name, child in model.backbone.named_children():
        view.add_module(name, child)
    view.add_module("layer4", model.roi_heads.box_head.layer4)
    return view


def load_backbone_weights(model: FasterRCNN, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load an ImageNet-style torchvision ResNet state dict into the trunk and the res5 head.

    Returns the keys of ``state_dict`` that were not used (the classifier ``fc``); any missing
    weight, any other leftover key or a shape mismatch is a ``ReslabError``.
    """
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    try:
        result = _resnet_view(model).load_state_dict(state_dict, strict=False)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ReslabError(
            "the backbone weights do not fit this network: " + " ".join(lines[1:3])[:300]
        ) from None
    unexpected = [k for k in result.unexpected_keys if not k.startswith("fc.")]
    if result.missing_keys or unexpected:
        raise ReslabError(
            f"the backbone weights do not fit {model.spec['kwargs']['backbone']}: "
            f"missing {result.missing_keys[:4]}, unexpected {unexpected[:4]}"
        )
    return list(result.unexpected_keys)


def mirror_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """xyxy boxes of an image ``width`` pixels wide, in its left-right mirror image."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


@torch.no_grad()
def detect_averaged(
    model: FasterRCNN,
    images: list[torch.Tensor],
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    refine: bool = False,
) -> list[dict]:
    """Detections with the box head's outputs averaged over views of each image: the image
    resized by each factor of ``scales`` and, with ``flip``, the mirror image of each.

    The RPN proposes once, on the image as the model resizes it; each proposal is pooled from
    the trunk's map of every view at the matching box (scaled, or mirrored), the head's class
    probabilities are averaged and so are its box deltas (relative to the proposal's size, so
    alike at every scale; a mirrored view's x shift negated), then torchvision's usual per-class
    NMS picks the boxes. The flip and multi-scale test-time averaging of image classifiers,
    applied per RoI: the trunk and the head run once per view. Eval mode only.

    ``refine``: each proposal moves to its box for the most probable object class and the head
    runs again there, over the same views; its class probabilities are averaged with the first
    pass's and its box shifts, from the moved box, give the boxes. Iterative box regression at
    test time, with the stages' class scores averaged as Cascade R-CNN does (Cai and Vasconcelos
    2018), from one head: the head runs twice per view.
    """
    if model.training:
        raise ReslabError("view-averaged detection needs the model in eval mode")
    if not scales or any(not 0 < scale <= 4 for scale in scales):
        raise ReslabError(f"test scales must be factors in (0, 4], got {list(scales)}")
    original_sizes = [tuple(image.shape[-2:]) for image in images]
    batch, _ = model.transform(images)
    features = {"0": model.backbone(batch.tensors)}
    proposals, _ = model.rpn(batch, features)
    heads = model.roi_heads
    views = _views(model, batch, features, scales, flip)
    probs, deltas = _averaged_head(heads, views, proposals)
    if refine:
        counts = [len(p) for p in proposals]
        moved = heads.box_coder.decode(deltas, proposals)  # (R, C, 4)
        best = probs[:, 1:].argmax(1) + 1  # the most probable class that is not background
        moved = moved[torch.arange(len(best)), best].split(counts)
        proposals = [
            box_ops.clip_boxes_to_image(b, s) for b, s in zip(moved, batch.image_sizes, strict=True)
        ]
        again, deltas = _averaged_head(heads, views, proposals)
        probs = (probs + again) / 2
    logits = probs.clamp_min(1e-12).log()  # softmax gives the average back
    boxes, scores, labels = heads.postprocess_detections(
        logits, deltas, proposals, batch.image_sizes
    )
    detections = [
        {"boxes": b, "scores": s, "labels": label}
        for b, s, label in zip(boxes, scores, labels, strict=True)
    ]
    return model.transform.postprocess(detections, batch.image_sizes, original_sizes)


@dataclass
class _View:
    """One view of a padded batch: the trunk's maps of it, its side, each image's size in it,
    and whether it is the mirror image."""

    maps: dict[str, torch.Tensor]
    size: tuple[int, int]
    sizes: list[tuple[int, int]]
    mirrored: bool
    scale: tuple[float, float]  # (y, x) from the batch's pixels to the view's


def _views(model: FasterRCNN, batch, features, scales: Sequence[float], flip: bool) -> list:
    height, width = batch.tensors.shape[-2:]
    views = []
    for scale in scales:
        tensors, maps = batch.tensors, features
        size = (round(height * scale), round(width * scale))
        if size != (height, width):
            tensors = nn.functional.interpolate(
                tensors, size=size, mode="bilinear", align_corners=False
            )
            maps = {"0": model.backbone(tensors)}
        sizes = [
            (round(h * size[0] / height), round(w * size[1] / width)) for h, w in batch.image_sizes
        ]
        ratio = (size[0] / height, size[1] / width)
        views.append(_View(maps, size, sizes, False, ratio))
        if flip:  # the padded batch is mirrored whole
            views.append(_View({"0": model.backbone(tensors.flip(-1))}, size, sizes, True, ratio))
    return views


def _averaged_head(
    heads, views: list[_View], boxes_per_image: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (R, C) and box deltas (R, 4C), averaged over the views."""
    probs, deltas = 0.0, 0.0
    for view in views:
        y, x = view.scale
        boxes = [p * p.new_tensor([x, y, x, y]) for p in boxes_per_image]
        if view.mirrored:
            boxes = [mirror_boxes(b, view.size[1]) for b in boxes]
        logits, shifts = heads.box_predictor(
            heads.box_head(heads.box_roi_pool(view.maps, boxes, view.sizes))
        )
        shifts = shifts.float().view(len(shifts), -1, 4)
        if view.mirrored:
            shifts[:, :, 0].neg_()  # a shift right in the mirror is a shift left here
        probs = probs + logits.float().softmax(-1)
        deltas = deltas + shifts.flatten(1)
    return probs / len(views), deltas / len(views)
