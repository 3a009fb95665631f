import pytest

from reslab import ReslabError
from reslab.analysis.summary import (
    PAPER_GMACS,
    block_arithmetic,
    paper_comparison,
    summarize_name,
)


@pytest.mark.parametrize("depth", sorted(PAPER_GMACS))
def test_v1_multiply_adds_within_5_percent_of_the_paper(depth):
    c = paper_comparison(depth)
    assert abs(c["v1_vs_paper"]) < 0.05


def test_v1_5_costs_more_for_bottlenecks_only():
    assert paper_comparison(18)["v1_5_cost"] == 0
    c = paper_comparison(50)
    assert 4.0e9 < c["v1_5_macs"] < 4.2e9  # torchvision's ResNet-50: about 4.1 G
    assert c["v1_5_cost"] > 0


def test_bottleneck_against_basic_block_weights():
    basic = block_arithmetic("basic", 256)
    bottleneck = block_arithmetic("bottleneck", 256)
    assert bottleneck["conv_weights"] == 69_632
    assert basic["conv_weights"] == 1_179_648
    assert round(basic["conv_weights"] / bottleneck["conv_weights"], 1) == 16.9
    # every weight is used once per output position
    assert basic["macs"] == basic["conv_weights"] * 56 * 56


def test_stage_table_shapes_and_totals():
    s = summarize_name("resnet50")
    assert [r.name for r in s.rows] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert [r.output_shape for r in s.rows[:5]] == [
        (64, 56, 56),
        (256, 56, 56),
        (512, 28, 28),
        (1024, 14, 14),
        (2048, 7, 7),
    ]
    assert [r.blocks for r in s.rows[1:5]] == [3, 4, 6, 3]
    assert s.params == 25_557_032
    assert s.to_dict()["macs"] == s.macs


def test_bad_inputs_are_user_errors():
    with pytest.raises(ReslabError, match="multiple of 4"):
        block_arithmetic("bottleneck", 30)
    with pytest.raises(ReslabError, match="block kind"):
        block_arithmetic("triple", 256)
    with pytest.raises(ReslabError, match="depths"):
        paper_comparison(20)
