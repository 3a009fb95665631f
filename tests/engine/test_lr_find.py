import json
import math

import pytest
import torch
from test_train import quiet, tiny

from reslab.cli import main
from reslab.engine.loop import Loop
from reslab.engine.lr_find import Record, lr_find, suggestions
from reslab.errors import ReslabError


def test_the_rate_rises_on_a_log_scale_until_the_loss_diverges(fake_fmnist, tmp_path):
    config = tiny(fake_fmnist, tmp_path / "find", augment=False)
    test, run_dir = lr_find(config, steps=100, start=1e-2, end=1e6, console=quiet())
    ratios = [b / a for a, b in zip(test.rates, test.rates[1:], strict=False)]
    assert ratios == pytest.approx([(1e6 / 1e-2) ** (1 / 99)] * len(ratios))
    assert test.rates[0] == pytest.approx(1e-2)
    assert 10 < len(test.losses) < 100  # stopped by the divergence, not the step count
    assert not math.isfinite(test.losses[-1]) or test.smoothed[-1] > 4 * min(test.smoothed)
    assert test.rates[0] < test.suggested < test.rates[-1]
    saved = json.loads((run_dir / "lr_find.json").read_text())
    assert saved["suggested"] == test.suggested
    assert (run_dir / "lr_find.png").stat().st_size > 1000


def test_suggestions_on_a_known_curve():
    rates = [10 ** (-4 + i / 10) for i in range(41)]  # 1e-4 .. 1
    # flat, then falling fastest at 1e-2, lowest at 1e-1, then rising
    losses = [2 - math.tanh(3 * (math.log10(r) + 2)) + max(0, math.log10(r) + 1) * 5 for r in rates]
    suggested, steepest = suggestions(rates, losses)
    assert suggested == pytest.approx(rates[30] / 10)
    assert steepest == pytest.approx(1e-2, rel=0.3)


def test_too_short_a_test_and_bad_ranges_are_one_line_errors(fake_fmnist, tmp_path, capsys):
    with pytest.raises(ReslabError, match="ended after 2"):
        suggestions([1e-3, 1e-2], [1.0, 0.5])
    args = ["lr-find", "--data-dir", str(fake_fmnist), "--no-verify", "--out", str(tmp_path / "x")]
    assert main([*args, "--start-lr", "1", "--end-lr", "0.1"]) == 2
    assert "0 < --start-lr < --end-lr" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_test_stops_when_the_smoothed_loss_passes_four_times_its_lowest():
    record = Record(None, steps=1000)
    loop = Loop()
    losses = [1.0] * 20 + [1.5**k for k in range(1, 40)]  # finite, growing
    for loss in losses:
        loop.losses, loop.step = {"loss": torch.tensor(loss)}, loop.step + 1
        record.after_step(loop)
        if loop.stop:
            break
    assert loop.stop and math.isfinite(record.losses[-1])
    assert record.smoothed[-1] > 4 * min(record.smoothed) >= record.smoothed[-2]
