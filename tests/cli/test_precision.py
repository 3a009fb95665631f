"""--precision on every command that computes with a classifier (reslab/cli)."""

import pytest

from reslab.cli import build_parser

COMMANDS = {
    "train": ["train"],
    "eval": ["eval", "run"],
    "predict": ["predict", "run", "image.png"],
    "bench": ["bench"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("value", ["auto", "fp32", "bf16"])
def test_each_command_takes_precision(command, value):
    args = build_parser().parse_args([*COMMANDS[command], "--precision", value])
    assert args.precision == value


@pytest.mark.parametrize("command", ["eval", "predict", "bench"])
def test_auto_is_the_default(command):
    assert build_parser().parse_args(COMMANDS[command]).precision == "auto"


def test_train_leaves_precision_to_the_preset():
    assert "precision" not in vars(build_parser().parse_args(["train"]))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_other_precisions_are_refused(command, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([*COMMANDS[command], "--precision", "fp16"])
    assert stop.value.code == 2
    assert "--precision: invalid choice: 'fp16'" in capsys.readouterr().err
