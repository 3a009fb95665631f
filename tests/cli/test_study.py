import json
from datetime import date

from reslab.analysis.summary import block_arithmetic, summarize_name
from reslab.cli import main
from reslab.cli.study import new_run_dir


def only_folder(root):
    (folder,) = root.iterdir()
    return folder


def test_blocks_reproduces_the_bottleneck_arithmetic(tmp_path, capsys):
    assert main(["study", "blocks", "--input", "3,32,32", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "69,632" in out and "1,179,648" in out and "16.9x" in out
    saved = json.loads((only_folder(tmp_path) / "blocks.json").read_text())
    assert saved["blocks"][:2] == [block_arithmetic("basic"), block_arithmetic("bottleneck")]
    assert [n["name"] for n in saved["networks"]] == [f"resnet{d}" for d in (18, 34, 50, 101, 152)]
    resnet50 = summarize_name("resnet50", (3, 32, 32))
    assert saved["networks"][2]["params"] == resnet50.params == 25_557_032
    assert saved["networks"][2]["macs"] == resnet50.macs


def test_blocks_at_another_width(tmp_path, capsys):
    args = ["study", "blocks", "--channels", "64", "--size", "8", "--input", "3,32,32"]
    assert main([*args, "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # two 3x3 convs at 64: 2 * 9 * 64 * 64; bottleneck 64 -> 16 -> 16 -> 64
    assert "73,728" in out and f"{64 * 16 + 9 * 16 * 16 + 16 * 64:,}" in out


def test_degradation_writes_table_json_and_figure(fake_fmnist, tmp_path, capsys):
    args = ["--depths", "20,32", "--epochs", "2", "--train-size", "40", "--test-size", "20"]
    args += ["--batch-size", "20", "--data-dir", str(fake_fmnist), "--no-verify"]
    runs = tmp_path / "runs"
    assert main(["study", "degradation", *args, "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    folder = only_folder(runs)
    assert folder.name == f"{date.today().isoformat()}-study-degradation"
    result = json.loads((folder / "degradation.json").read_text())
    # the default budget: two seeds of each network, the paper's crop and flip
    assert [len(r["history"]) for r in result["runs"]] == [2] * 8
    assert [r["seed"] for r in result["runs"]] == [0, 1] * 4
    assert result["config"]["depths"] == [20, 32]
    assert (result["config"]["seeds"], result["config"]["pad"]) == (2, 2)
    assert result["config"]["precision"] in ("fp32", "bf16")
    assert [c["claim"] for c in result["claims"]] == [
        "plain_deeper_trains_worse",
        "resnet_deeper_trains_better",
        "resnet_deeper_tests_better",
    ]
    assert {"load_average_start", "load_average_end", "cpu_model"} <= set(result["machine"])
    assert (folder / "degradation.png").stat().st_size > 10_000
    assert "after 2 epochs" in out and "plain_resnet32" in out
    for claim in result["claims"]:
        verdict = "holds" if claim["held"] else "DOES NOT HOLD"
        assert f"{claim['text']}: {verdict}" in out


def test_gradients_writes_table_json_and_figure(fake_fmnist, tmp_path, capsys):
    args = ["--models", "resnet20", "--steps", "1", "--batch-size", "8"]
    args += ["--data-dir", str(fake_fmnist), "--no-verify", "--runs", str(tmp_path / "runs")]
    assert main(["study", "gradients", *args]) == 0
    out = capsys.readouterr().out
    folder = only_folder(tmp_path / "runs")
    result = json.loads((folder / "gradients.json").read_text())
    assert [r["name"] for r in result["runs"]] == ["plain_resnet20", "resnet20"]
    assert (folder / "gradients.png").stat().st_size > 10_000
    assert "first/last" in out and "after 1 SGD steps" in out


def test_run_folders_are_never_overwritten(tmp_path):
    first = new_run_dir(tmp_path, "gradients")
    (first / "gradients.json").write_text("{}")
    second = new_run_dir(tmp_path, "gradients")
    third = new_run_dir(tmp_path, "gradients")
    assert second.name == first.name + "-2" and third.name == first.name + "-3"
    assert (first / "gradients.json").read_text() == "{}"


def test_a_time_budget_plans_the_epochs_and_says_so(fake_fmnist, tmp_path, capsys, monkeypatch):
    # one second a step: an epoch of 4 networks x 2 seeds x (2 steps + a third of 1 test
    # batch) is 1.3 * 18.7 = 24.3 s with the margin, so a minute holds 2 epochs
    monkeypatch.setattr("reslab.analysis.degradation.time_step", lambda *a, **k: 1.0)
    args = ["--depths", "20,32", "--minutes", "1", "--train-size", "40", "--test-size", "20"]
    args += ["--batch-size", "20", "--precision", "fp32"]
    args += ["--data-dir", str(fake_fmnist), "--no-verify", "--runs", str(tmp_path / "runs")]
    assert main(["study", "degradation", *args]) == 0
    out = capsys.readouterr().out
    assert "time budget 1 min: an epoch of the 4 networks and 2 seed(s) takes about 24.3s" in out
    assert "so 2 epochs" in out
    result = json.loads((only_folder(tmp_path / "runs") / "degradation.json").read_text())
    assert (result["config"]["epochs"], result["config"]["minutes"]) == (2, 1.0)
    assert [len(r["history"]) for r in result["runs"]] == [2] * 8


def test_bad_depths_are_one_line_errors(tmp_path, capsys):
    args = ["study", "degradation", "--depths", "20", "--runs", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--depths" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # no empty run folder left behind


def test_shortcuts_and_responses_write_table_json_and_figure(fake_fmnist, tmp_path, capsys):
    tiny = ["--depths", "20", "--epochs", "1", "--train-size", "16", "--test-size", "8"]
    tiny += ["--batch-size", "16", "--data-dir", str(fake_fmnist), "--no-verify"]
    out = tmp_path / "copy.json"
    args = ["study", "shortcuts", *tiny, "--runs", str(tmp_path / "s"), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    folder = only_folder(tmp_path / "s")
    result = json.loads((folder / "shortcuts.json").read_text())
    assert json.loads(out.read_text()) == result
    assert len(result["rows"]) == 11 and (folder / "shortcuts.png").stat().st_size > 10_000
    assert "full_preact" in printed and "paper's best (identity) best here" in printed
    assert main(["study", "responses", *tiny, "--runs", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    folder = only_folder(tmp_path / "r")
    result = json.loads((folder / "responses.json").read_text())
    assert [n["name"] for n in result["networks"]] == ["plain_resnet20", "resnet20"]
    assert (folder / "responses.png").stat().st_size > 10_000
    assert "ResNet-20 responses smaller than plain-20" in printed
