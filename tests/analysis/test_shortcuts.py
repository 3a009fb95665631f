import pytest

from reslab.analysis.degradation import DegradationConfig
from reslab.analysis.shortcuts import (
    GROUPS,
    ORDERINGS,
    SHORTCUTS,
    orderings_found,
    shortcut_study,
    variant_rows,
)
from reslab.engine.loop import NonFiniteLoss


def test_tiny_study_has_a_row_per_variant_and_the_papers_numbers(data):
    config = DegradationConfig(depths=(20,), epochs=1, train_size=16, test_size=8, batch_size=16)
    seen = []
    result = shortcut_study(config, data(16, 0), data(8, 1), lambda n, r: seen.append(n))
    variants = list(SHORTCUTS) + list(ORDERINGS)
    assert [r["variant"] for r in result["rows"]] == variants
    # identity and the original ordering are one network, trained once
    assert len(seen) == len(variants) - 1
    identity, original = result["runs"][0], result["runs"][len(SHORTCUTS)]
    assert identity["history"] == original["history"]
    rows = {(r["group"], r["variant"]): r for r in result["rows"]}
    assert rows[("orderings", "full_preact")]["paper_error"] == pytest.approx(0.0637)
    assert rows[("shortcuts", "dropout")]["paper_error"] is None  # the paper's "fail"
    assert rows[("shortcuts", "conv_1x1")]["test_error"] is not None
    # plain parameter counts tell the variants apart: gates and 1x1 shortcuts add weights
    params = {r["variant"]: r["params"] for r in result["runs"]}
    assert params["identity"] == params["scale_0.5"] == params["dropout"]
    assert params["identity"] < params["shortcut_gate"] == params["exclusive_gate"]
    assert params["identity"] < params["conv_1x1"]
    assert {f["group"] for f in result["orderings_found"]} == set(GROUPS)
    assert set(result) >= {"config", "runs", "rows", "orderings_found", "source"}


def made_up_rows(errors: dict[str, float | None]) -> list[dict]:
    return [
        {
            "group": group,
            "variant": v,
            "depth": 20,
            "test_error": errors.get(v),
            "paper_error": None if paper is None else paper / 100,
        }
        for group, variants in GROUPS.items()
        for v, (_, paper) in variants.items()
    ]


def test_ordering_found_ranks_by_error_failed_last_and_judges_the_papers_best():
    errors = {v: 0.1 + i / 100 for i, v in enumerate([*SHORTCUTS, *ORDERINGS])}
    errors["dropout"] = None
    errors["full_preact"] = 0.01
    shortcuts, orderings = orderings_found(made_up_rows(errors))
    assert shortcuts["measured"][0] == "identity" and shortcuts["measured"][-1] == "dropout"
    assert shortcuts["paper"] == [
        "identity",
        "shortcut_gate",
        "exclusive_gate",
        "conv_1x1",
        "scale_0.5",
        "dropout",
    ]
    assert shortcuts["paper_best_holds"] and orderings["paper_best_holds"]
    errors["identity"] = 0.5
    shortcuts, _ = orderings_found(made_up_rows(errors))
    assert not shortcuts["paper_best_holds"] and shortcuts["measured"][0] == "scale_0.5"


def test_a_diverging_variant_is_recorded_as_failed(monkeypatch, data):
    import reslab.analysis.shortcuts as module

    def diverge(name, config, *args, **kwargs):
        if kwargs.get("merge") == "dropout":
            raise NonFiniteLoss("the loss became nan in epoch 1; lower --lr")
        return real(name, config, *args, **kwargs)

    real = module.train_network
    monkeypatch.setattr(module, "train_network", diverge)
    config = DegradationConfig(depths=(20,), epochs=1, train_size=8, test_size=8, batch_size=8)
    result = shortcut_study(config, data(8, 0), data(8, 1))
    rows = {r["variant"]: r for r in variant_rows(result)}
    assert rows["dropout"]["failed"] and rows["dropout"]["test_error"] is None
    assert not rows["identity"]["failed"]
