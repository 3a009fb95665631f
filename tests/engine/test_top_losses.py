"""evaluate(top=n): the n images of highest loss over all batches, as a direct sort finds them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reslab.data.transforms import InputSpec
from reslab.engine.evaluate import evaluate, logits
from reslab.engine.plots import top_losses_figure

SPEC = InputSpec(size=4, source_size=4, channels=1, mean=(0.5,), std=(0.25,), stem="cifar")


def test_the_top_losses_are_the_highest_over_all_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    images = torch.randint(0, 256, (23, 1, 4, 4), dtype=torch.uint8)
    labels = torch.randint(0, 3, (23,))
    batches = [(images[i : i + 5], labels[i : i + 5]) for i in range(0, 23, 5)]
    found = evaluate(model, batches, SPEC, 3, top=6)
    out = logits(model, images, SPEC)
    losses = F.cross_entropy(out, labels, reduction="none")
    order = losses.argsort(descending=True)[:6]
    top = found.top_losses
    assert torch.equal(top.images, images[order]) and torch.equal(top.labels, labels[order])
    assert torch.allclose(top.loss, losses[order])
    assert torch.equal(top.predicted, out[order].argmax(1))
    assert torch.allclose(top.probability, out[order].softmax(1).amax(1))
    # the evaluation's own numbers are those without top
    plain = evaluate(model, batches, SPEC, 3)
    assert plain.top_losses is None and plain.loss == found.loss
    assert torch.equal(plain.confusion, found.confusion)
    fig = top_losses_figure(top, ["a", "b", "c"], columns=4)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(fig.axes) == 8 and len(titles) == 6
    first = top.predicted[0]
    assert titles[0].startswith(f"predicted {'abc'[first]} ")
