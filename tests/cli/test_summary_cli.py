import pytest

from reslab.cli import main


def test_summary_prints_the_paper_comparison(capsys):
    assert main(["summary", "resnet50"]) == 0
    out = capsys.readouterr().out
    assert "25,557,032" in out
    assert "paper (Table 1): 3.8 G" in out


def test_summary_compare_blocks(capsys):
    assert main(["summary", "--compare", "basic,bottleneck"]) == 0
    out = capsys.readouterr().out
    assert "69,632" in out and "1,179,648" in out and "16.9x" in out


def test_unknown_model_is_one_line_and_exit_2(capsys):
    assert main(["summary", "resnet9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "did you mean" in err and "Traceback" not in err


def test_bad_input_shape_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", "resnet18", "--input", "3,224"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--input" in err and "C,H,W" in err and "Traceback" not in err


def test_models_lists_the_zoo(capsys):
    assert main(["models", "--filter", "resnet20"]) == 0
    out = capsys.readouterr().out
    assert "plain_resnet20" in out and "preact_resnet20" in out
