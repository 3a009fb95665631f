"""The C4 Faster R-CNN: shapes through the C4 path, named losses, learning, weights, AP."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from reslab.engine.coco_eval import coco_evaluate
from reslab.engine.detect_infer import prepare_detector_for_inference, quantize_detector_head
from reslab.engine.detection import LOSS_NAMES
from reslab.errors import ReslabError
from reslab.fast import fold_batchnorm_
from reslab.models.detection import (
    DeferredRoIAlign,
    DetectorConfig,
    RoIHeadsConfig,
    RPNConfig,
    build_detector,
    detect_averaged,
    load_backbone_weights,
)
from reslab.quantize import Int8Stage


def tiny(**overrides) -> DetectorConfig:
    """A quarter-width ResNet-18 C4 on 64-pixel images, with few proposals and RoIs: the res5
    head runs once per RoI, so RoI counts set the cost of a step."""
    config = dict(
        backbone="resnet18",
        width=0.25,
        num_classes=3,
        min_size=64,
        max_size=64,
        rpn=RPNConfig(
            pre_nms_top_n_train=300,
            post_nms_top_n_train=100,
            pre_nms_top_n_test=300,
            post_nms_top_n_test=100,
        ),
        roi_heads=RoIHeadsConfig(batch_size_per_image=16),
    )
    return DetectorConfig(**{**config, **overrides})


def scene_batch(n: int = 2, size: int = 64, seed: int = 0):
    """Images with bright rectangles of two kinds (wide: class 1, tall: class 2)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        image = torch.rand(3, size, size, generator=g) * 0.1
        boxes, labels = [], []
        for label, (w, h) in ((1, (24, 12)), (2, (12, 24))):
            x, y = (int(v) for v in torch.randint(0, size - 24, (2,), generator=g))
            image[:, y : y + h, x : x + w] = 0.9 if label == 1 else 0.6
            boxes.append([x, y, x + w, y + h])
            labels.append(label)
        images.append(image)
        targets.append(
            {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}
        )
    return images, targets


def test_resnet101_c4_shapes_on_meta():
    with torch.device("meta"):
        model = build_detector(DetectorConfig())
        features = model.backbone(torch.empty(1, 3, 512, 768))
        pooled = torch.empty(5, 1024, 14, 14)
        res5 = model.roi_heads.box_head.layer4(pooled)
        vector = model.roi_heads.box_head(pooled)
        scores, deltas = model.roi_heads.box_predictor(vector)
    assert model.backbone.out_channels == 1024
    assert features.shape == (1, 1024, 512 // 16, 768 // 16)  # stride 16
    assert res5.shape == (5, 2048, 7, 7)  # conv5_x's first block has stride 2
    assert vector.shape == (5, 2048)
    assert scores.shape == (5, 91) and deltas.shape == (5, 91 * 4)
    assert model.roi_heads.box_roi_pool.output_size == (14, 14)


def test_roi_pooling_gives_14x14_from_the_one_map():
    model = build_detector(tiny())
    features = {"0": torch.randn(1, model.backbone.out_channels, 8, 8)}
    proposals = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [10.0, 20.0, 60.0, 50.0]])]
    pooled = model.roi_heads.box_roi_pool(features, proposals, [(128, 128)])
    assert pooled.shape == (2, model.backbone.out_channels, 14, 14)


def test_deferred_roi_pooling_runs_res5_a_chunk_at_a_time_with_the_same_result():
    """Two images of different sizes in one padded batch (the pooler infers the map's scale
    from all of them), one with no boxes: the same head vectors as pooling all RoIs at once,
    in the same order, and res5 never sees more than a chunk."""
    torch.manual_seed(0)
    model = skewed_batch_norms(build_detector(tiny())).eval()
    heads = model.roi_heads
    features = {"0": torch.randn(3, model.backbone.out_channels, 4, 4)}
    sizes = [(64, 64), (40, 48), (64, 56)]
    boxes = [
        torch.tensor([[0.0, 0.0, 32.0, 32.0], [10.0, 20.0, 60.0, 50.0], [5.0, 5.0, 20.0, 40.0]]),
        torch.zeros(0, 4),
        torch.tensor([[1.0, 2.0, 30.0, 40.0], [8.0, 8.0, 50.0, 60.0]] * 2),
    ]
    seen = []
    heads.box_head.layer4.register_forward_pre_hook(lambda m, inputs: seen.append(len(inputs[0])))
    deferred = DeferredRoIAlign(heads.box_roi_pool, chunk=2)
    with torch.no_grad():
        expected = heads.box_head(heads.box_roi_pool(features, boxes, sizes))
        seen.clear()
        got = heads.box_head(deferred(features, boxes, sizes))
        assert seen == [2, 1, 2, 2]
        none = heads.box_head(deferred(features, [b[:0] for b in boxes], sizes))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert none.shape == (0, heads.box_head.out_channels)


def test_basic_block_backbones_use_256_and_512_channels():
    model = build_detector(DetectorConfig(backbone="resnet18", num_classes=2))
    assert model.backbone.out_channels == 256
    assert model.roi_heads.box_predictor.cls_score.in_features == 512


def test_training_returns_four_finite_named_losses():
    torch.manual_seed(0)
    model = build_detector(tiny())
    model.train()
    losses = model(*scene_batch())
    assert set(losses) == set(LOSS_NAMES)
    assert all(torch.isfinite(value) and value.ndim == 0 for value in losses.values())


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_detector(tiny())
    model.train()
    images, targets = scene_batch(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(10):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-3:]) / 3 < 0.75 * history[0], history


def test_eval_returns_boxes_scores_labels():
    model = build_detector(tiny())
    model.eval()
    with torch.no_grad():
        (output,) = model([torch.rand(3, 64, 64)])
    assert set(output) == {"boxes", "scores", "labels"}
    assert output["boxes"].shape[1:] == (4,)


def test_torchvision_state_dict_loads_with_only_fc_left_over(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    model = build_detector(
        DetectorConfig(backbone="resnet50", num_classes=2, frozen_bn=True, freeze_at=2)
    )
    state = torch.load(path, weights_only=True)
    assert sorted(load_backbone_weights(model, state)) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.backbone.layer3[5].bn3.running_var, state["layer3.5.bn3.running_var"])
    assert torch.equal(
        model.roi_heads.box_head.layer4[2].conv3.weight, state["layer4.2.conv3.weight"]
    )


@pytest.mark.parametrize(
    "part, values, message",
    [
        ("roi_heads", {"positive_fraction": 0.0}, "RoI positive fraction must be in (0, 1]"),
        ("rpn", {"positive_fraction": 1.2}, "RPN positive fraction must be in (0, 1]"),
        ("roi_heads", {"batch_size_per_image": 0}, "RoI samples per image must be a whole"),
        ("rpn", {"pre_nms_top_n_train": 0}, "RPN pre-NMS boxes in training must be a whole"),
        ("rpn", {"post_nms_top_n_test": 2.5}, "RPN proposals at test must be a whole"),
    ],
)
def test_bad_sampling_is_refused_before_building(part, values, message):
    base = tiny()
    config = replace(base, **{part: replace(getattr(base, part), **values)})
    with pytest.raises(ReslabError, match=re.escape(message)):
        build_detector(config)


def test_training_proposal_counts_cap_what_the_rpn_returns():
    images, targets = scene_batch()
    counts = {}
    for pre, post in ((300, 100), (40, 7)):
        model = build_detector(
            tiny(rpn=replace(tiny().rpn, pre_nms_top_n_train=pre, post_nms_top_n_train=post))
        ).train()
        torch.manual_seed(0)
        image_list, targets_t = model.transform(images, targets)
        features = {"0": model.backbone(image_list.tensors)}
        proposals, _ = model.rpn(image_list, features, targets_t)
        counts[post] = [len(p) for p in proposals]
    assert all(7 < n <= 100 for n in counts[100])  # NMS leaves more than 7 of the 300
    assert counts[7] == [7, 7]


def test_mismatched_state_dict_is_a_one_line_error():
    model = build_detector(DetectorConfig(backbone="resnet18", num_classes=2))
    with pytest.raises(ReslabError, match="do not fit") as error:
        load_backbone_weights(model, torchvision.models.resnet34().state_dict())
    assert "\n" not in str(error.value)


def test_pretrained_setup_freezes_bn_stem_and_layer1():
    model = build_detector(tiny(frozen_bn=True, freeze_at=2))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.backbone.bn1, FrozenBatchNorm2d)
    assert not model.backbone.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())
    assert all(p.requires_grad for p in model.backbone.layer2.parameters())


def skewed_batch_norms(model: nn.Module) -> nn.Module:
    """Batch-norm statistics far from identity (a fresh model folds trivially)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d | FrozenBatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def detections_before_and_after(frozen_bn: bool, prepare) -> tuple[dict, dict, nn.Module, bool]:
    """A tiny detector whose batch norms are far from identity (a fresh one folds trivially),
    its detections on one image, then ``prepare(model)`` from train mode and its detections;
    last, whether ``prepare`` left the model in train mode."""
    torch.manual_seed(0)
    model = skewed_batch_norms(build_detector(tiny(frozen_bn=frozen_bn)))
    model.eval()
    model.roi_heads.score_thresh = 0.0
    image = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        before = model(image)[0]
        model.train()
        model = prepare(model) or model
        left_training = model.training
        model.eval()
        after = model(image)[0]
    return before, after, model, left_training


def test_folding_batch_norm_keeps_the_detections():
    before, after, model, _ = detections_before_and_after(True, fold_batchnorm_)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    torch.testing.assert_close(after["scores"], before["scores"], atol=1e-4, rtol=1e-4)


def test_detector_inference_path_keeps_the_detections():
    """Folded and channels_last (the path `reslab detect eval|predict` take), from a
    train-mode model with trainable batch norm: the same boxes and scores."""
    before, after, model, left_training = detections_before_and_after(
        False, prepare_detector_for_inference
    )
    assert not left_training
    assert not any(isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d) for m in model.modules())
    conv = model.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert isinstance(model.roi_heads.box_roi_pool, DeferredRoIAlign)  # 100 RoIs, 4 chunks
    torch.testing.assert_close(after["boxes"], before["boxes"], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(after["scores"], before["scores"], atol=1e-4, rtol=1e-4)


def test_int8_head_keeps_the_head_features():
    torch.manual_seed(0)
    model = prepare_detector_for_inference(skewed_batch_norms(build_detector(tiny())))
    head = model.roi_heads.box_head
    g = torch.Generator().manual_seed(1)
    pooled = torch.rand(8, head.layer4[0].conv1.in_channels, 14, 14, generator=g)
    with torch.inference_mode():
        expected = head(pooled)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    rois = quantize_detector_head(model, images)
    assert 0 < rois <= 200  # at most 100 test proposals per image survive NMS
    assert isinstance(head.layer4, Int8Stage)
    with torch.inference_mode():
        got = head(pooled)
        detections = model([torch.rand(3, 64, 64, generator=g)])[0]
    assert got.shape == expected.shape == (8, 128)
    assert F.cosine_similarity(got, expected).min() > 0.98
    assert set(detections) == {"boxes", "scores", "labels"}
    assert torch.isfinite(detections["boxes"]).all()


def coco_ground_truth():
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in range(3)]
    boxes = [
        (0, [10, 10, 30, 40], 1),
        (0, [50, 50, 20, 20], 2),
        (1, [5, 60, 40, 30], 1),
        (2, [20, 20, 50, 50], 2),
    ]
    annotations = [
        {"id": k + 1, "image_id": i, "bbox": b, "category_id": c, "area": b[2] * b[3], "iscrowd": 0}
        for k, (i, b, c) in enumerate(boxes)
    ]
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def perfect_detections(gt: dict) -> list[dict]:
    """Every ground-truth box as a detection of its own class, score 0.9."""
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.9,
        }
        for a in gt["annotations"]
    ]


def test_coco_eval_perfect_predictions_give_ap_one_and_shifted_less():
    gt = coco_ground_truth()
    perfect = perfect_detections(gt)
    metrics = coco_evaluate(gt, perfect)
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["mAP50"] == pytest.approx(1.0)
    assert metrics["per_class"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    shifted = [{**d, "bbox": [d["bbox"][0] + 0.3 * d["bbox"][2], *d["bbox"][1:]]} for d in perfect]
    worse = coco_evaluate(gt, shifted)
    assert worse["mAP"] < 0.5
    assert 0 < worse["mAP50"] <= 1.0
    assert coco_evaluate(gt, [])["mAP"] == 0.0


def test_error_breakdown_separates_finding_from_naming():
    gt = coco_ground_truth()
    perfect = perfect_detections(gt)
    metrics = coco_evaluate(gt, perfect)
    assert metrics["class_agnostic_mAP50"] == pytest.approx(1.0)
    assert (metrics["found"], metrics["objects"], metrics["label_accuracy"]) == (4, 4, 1.0)
    assert metrics["confusion"] == {}

    # every box right, every label wrong: found, not named
    swapped = [{**d, "category_id": 3 - d["category_id"]} for d in perfect]
    metrics = coco_evaluate(gt, swapped)
    assert metrics["mAP50"] == pytest.approx(0.0)
    assert metrics["class_agnostic_mAP50"] == pytest.approx(1.0)
    assert metrics["label_accuracy"] == 0.0
    assert metrics["confusion"] == {"a": {"b": 2}, "b": {"a": 2}}

    # a lower-scored second label on the same box is a duplicate, not a new find; the
    # higher-scored label is the one judged; an object left out is not found
    doubled = [*perfect[1:], *({**d, "score": 0.5} for d in swapped[1:])]
    metrics = coco_evaluate(gt, doubled)
    # 3 of 4 objects at precision 1: COCO's 101 recall points 0, 0.01, ..., 0.75 score 1
    assert metrics["class_agnostic_mAP50"] == pytest.approx(76 / 101)
    assert (metrics["found"], metrics["label_accuracy"], metrics["confusion"]) == (3, 1.0, {})
    assert coco_evaluate(gt, [])["found"] == 0


def mirror(boxes: torch.Tensor, width: int) -> torch.Tensor:
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


def test_flip_averaged_detection_is_the_same_on_the_mirror_image(monkeypatch):
    """Averaging over an image and its mirror is symmetric: on the mirror image, with the
    mirrored proposals, it gives the mirrored boxes with the same labels and scores. A wrong
    sign of the mirrored x shift or a proposal mirrored wrong breaks this."""
    torch.manual_seed(0)
    model = build_detector(tiny()).eval()
    image = scene_batch(1)[0][0]
    g = torch.Generator().manual_seed(1)
    corner = torch.rand(30, 2, generator=g) * 40
    proposals = torch.cat([corner, corner + 8 + torch.rand(30, 2, generator=g) * 16], 1)
    given = [proposals]
    monkeypatch.setattr(model.rpn, "forward", lambda images, features, targets=None: (given, {}))
    averaged = detect_averaged(model, [image])[0]
    with torch.no_grad():
        one_view = model([image])[0]
    given[0] = mirror(proposals, 64)
    on_mirror = detect_averaged(model, [image.flip(-1)])[0]

    assert len(averaged["scores"]) > 0
    assert len(on_mirror["scores"]) == len(averaged["scores"])
    back = mirror(on_mirror["boxes"], 64)
    for box, score, label in zip(*averaged.values(), strict=True):
        same = (on_mirror["labels"] == label) & ((on_mirror["scores"] - score).abs() < 1e-4)
        assert same.any() and (back[same] - box).abs().amax(1).min() < 1e-3
    # and the mirror view changed what the one-view detector gives
    plain, both = one_view["scores"], averaged["scores"]
    assert plain.shape != both.shape or not torch.allclose(plain, both)
    with pytest.raises(ReslabError, match="eval mode"):
        detect_averaged(model.train(), [image])


def test_view_averaging_of_one_view_is_the_plain_detector_and_scales_move_the_boxes(monkeypatch):
    """One view at scale 1 (or the same view twice) is what the model gives by itself; a view
    at scale 2 pools the map of the doubled image at the doubled proposals, and its boxes come
    back in the image's own pixels."""
    torch.manual_seed(0)
    model = build_detector(tiny()).eval()
    images = [scene_batch(1)[0][0], scene_batch(1, seed=1)[0][0]]
    with torch.no_grad():
        plain = model(images)
    for scales in ((1.0,), (1.0, 1.0)):
        averaged = detect_averaged(model, images, scales, flip=False)
        for one, other in zip(plain, averaged, strict=True):
            assert len(one["scores"]) > 0 and one["labels"].tolist() == other["labels"].tolist()
            assert torch.allclose(one["boxes"], other["boxes"], atol=1e-4)
            assert torch.allclose(one["scores"], other["scores"], atol=1e-5)

    proposals = []
    seen = []
    rpn = model.rpn.forward
    pool = model.roi_heads.box_roi_pool.forward

    def propose(batch, features, targets=None):
        boxes, losses = rpn(batch, features, targets)
        proposals.extend(boxes)
        return boxes, losses

    def pooled(features, boxes, image_sizes):
        seen.append((features["0"].shape[-1], [b.clone() for b in boxes], list(image_sizes)))
        return pool(features, boxes, image_sizes)

    monkeypatch.setattr(model.rpn, "forward", propose)
    monkeypatch.setattr(model.roi_heads.box_roi_pool, "forward", pooled)
    doubled = detect_averaged(model, images, (2.0,), flip=False)
    ((side, boxes, sizes),) = seen
    assert side == 2 * plain_side(model, images) and sizes == [(128, 128), (128, 128)]
    for given, used in zip(proposals, boxes, strict=True):
        assert len(given) > 0 and torch.allclose(used, given * 2)
    for output in doubled:
        assert len(output["boxes"]) > 0
        assert 0 <= output["boxes"].min() and output["boxes"].max() <= 64
    with pytest.raises(ReslabError, match="factors in"):
        detect_averaged(model, images, (0.0,))


def test_refined_detection_runs_the_head_again_at_the_moved_boxes(monkeypatch):
    """With ``refine`` each proposal moves to its box for its most probable object class, the
    head runs there too, the class probabilities of both passes are averaged and the second
    pass's shifts give the boxes; with no box shifts at all nothing moves and the detections
    are the plain ones."""
    torch.manual_seed(0)
    model = build_detector(tiny()).eval()
    images = [scene_batch(1)[0][0], scene_batch(1, seed=1)[0][0]]
    g = torch.Generator().manual_seed(2)
    corner = torch.rand(2, 30, 2, generator=g) * 40
    given = [torch.cat([c, c + 8 + torch.rand(30, 2, generator=g) * 16], 1) for c in corner]
    monkeypatch.setattr(model.rpn, "forward", lambda images, features, targets=None: (given, {}))
    heads = model.roi_heads

    with torch.no_grad():  # the two passes by hand, from the model's parts
        batch, _ = model.transform(images)
        features = {"0": model.backbone(batch.tensors)}

        def head(boxes):
            logits, deltas = heads.box_predictor(
                heads.box_head(heads.box_roi_pool(features, boxes, batch.image_sizes))
            )
            return logits.softmax(-1), deltas

        first, shifts = head(given)
        boxes = heads.box_coder.decode(shifts, given)
        label = first[:, 1:].argmax(1) + 1
        moved = boxes[torch.arange(len(label)), label].split([30, 30])
        moved = [b.clamp(0, 64) for b in moved]  # both 64-pixel images stay 64 pixels
        second, shifts = head(moved)
        expected = heads.postprocess_detections(
            ((first + second) / 2).log(), shifts, moved, batch.image_sizes
        )
    refined = detect_averaged(model, images, flip=False, refine=True)
    plain = detect_averaged(model, images, flip=False)
    for output, boxes, scores, labels, other in zip(refined, *expected, plain, strict=True):
        assert len(scores) > 0 and output["labels"].tolist() == labels.tolist()
        assert torch.allclose(output["boxes"], boxes, atol=1e-4)
        assert torch.allclose(output["scores"], scores, atol=1e-5)
        same = output["boxes"].shape == other["boxes"].shape
        assert not same or not torch.allclose(output["boxes"], other["boxes"])

    with torch.no_grad():
        heads.box_predictor.bbox_pred.weight.zero_()
        heads.box_predictor.bbox_pred.bias.zero_()
    unmoved = detect_averaged(model, images, flip=False, refine=True)
    plain = detect_averaged(model, images, flip=False)
    for output, other in zip(unmoved, plain, strict=True):
        assert len(other["scores"]) > 0 and output["labels"].tolist() == other["labels"].tolist()
        assert torch.allclose(output["boxes"], other["boxes"])
        assert torch.allclose(output["scores"], other["scores"], atol=1e-6)


def plain_side(model, images) -> int:
    with torch.no_grad():
        batch, _ = model.transform(images)
        return model.backbone(batch.tensors).shape[-1]
