import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from reslab.cli import build_parser
from reslab.cli.train import config_from_args
from reslab.engine.plan import plan_for_data


def planned(argv: list[str], train_size: int):
    config, _, _ = config_from_args(build_parser().parse_args(["train", *argv]))
    out = io.StringIO()
    plan_for_data(config, SimpleNamespace(train_size=train_size), Console(file=out, width=300))
    return config, out.getvalue()


def test_a_small_folder_gets_a_smaller_batch_a_scaled_rate_and_more_epochs():
    config, said = planned(["--data", "photos"], 3000)
    assert (config.batch_size, config.epochs) == (64, 40)  # 46 steps an epoch
    assert config.lr == pytest.approx(0.2 * 64 / 256)
    assert "3,000 training images: batch 64, lr 0.05, 40 epochs of 46 steps" in said
    config, said = planned(["--data", "photos"], 300)
    assert (config.batch_size, config.epochs) == (16, 56)  # 18 steps an epoch, 1,008 steps
    assert "300 training images: batch 16, lr 0.0125, 56 epochs of 18 steps" in said


def test_a_folder_the_size_of_fashion_mnist_keeps_the_recipe():
    config, _ = planned(["--data", "photos"], 60_000)
    assert (config.batch_size, config.lr, config.epochs) == (256, 0.2, 40)


def test_values_given_are_kept_and_the_rest_planned():
    config, said = planned(["--data", "photos", "--epochs", "4", "--lr", "0.01"], 3000)
    assert (config.batch_size, config.lr, config.epochs) == (64, 0.01, 4)
    assert "give --batch-size or a --preset" in said
    config, _ = planned(["--data", "photos", "--batch-size", "8"], 300)
    assert config.batch_size == 8 and config.lr == pytest.approx(0.2 * 8 / 256)


@pytest.mark.parametrize("argv", [["--preset", "default", "--data", "x"], []])
def test_a_named_preset_or_fashion_mnist_plans_nothing(argv):
    config, said = planned(argv, 300)
    assert config.plan_data == [] and said == ""
    assert (config.batch_size, config.epochs) == (256, 40)
