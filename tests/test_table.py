"""slimops._table: the one table formatter (plain text with a dashed rule, Markdown), and
the printers that use it keep their layout."""

import pytest

from slimops._table import markdown_table, text_table


def test_text_table_right_aligns_under_a_dashed_rule():
    text = text_table(["width", "median ms", "p90 ms"],
                      [["0.35x", "2.63", "2.75"], ["1x", "15.37", "-"]])
    assert text.split("\n") == [
        "width  median ms  p90 ms",
        "-----  ---------  ------",
        "0.35x       2.63    2.75",
        "   1x      15.37       -",
    ]


def test_text_table_column_as_wide_as_its_widest_cell_and_left_alignment():
    text = text_table(["a", "b"], [["long cell", "x"], ["y", "1,234,567"]], align="lr")
    assert text.split("\n") == [
        "a                  b",
        "---------  ---------",
        "long cell          x",
        "y          1,234,567",
    ]


def test_text_table_without_rows():
    assert text_table(["width", "ms"], []) == "width  ms\n-----  --"


def test_markdown_table():
    text = markdown_table(["cell", "ms", ""], [["a", "1.00", "SLOWER"], ["b", "2.00", ""]],
                          align="lrl")
    assert text.split("\n") == [
        "| cell | ms |  |",
        "|---|---:|---|",
        "| a | 1.00 | SLOWER |",
        "| b | 2.00 |  |",
    ]
    assert markdown_table(["x", "y"], [["1", "2"]]).split("\n")[1] == "|---:|---:|"


@pytest.mark.parametrize("table", [text_table, markdown_table])
def test_refuses_ragged_rows_and_bad_alignment(table):
    with pytest.raises(ValueError, match="row 1 has 1 cells for 2 columns"):
        table(["a", "b"], [["1", "2"], ["3"]])
    with pytest.raises(ValueError, match="align"):
        table(["a", "b"], [["1", "2"]], align="r")
    with pytest.raises(ValueError, match="align"):
        table(["a", "b"], [["1", "2"]], align="rc")


def test_readme_profile_table_layout():
    # README's `python -m slimops profile` example, rebuilt from its cells
    from slimops.profile import WidthProfile, format_table

    rows = [WidthProfile(0.25, (1, 1000), 464_600, 5_472, 41_040_000),
            WidthProfile(1.0, (1, 1000), 4_210_088, 21_888, 568_790_000)]
    assert format_table(rows, {"paper MACs": ["41.00M", "569.00M"]}).split("\n") == [
        "width  output     params  BN params     MACs  paper MACs",
        "-----  ------  ---------  ---------  -------  ----------",
        "0.25x  1x1000    464,600      5,472   41.04M      41.00M",
        "   1x  1x1000  4,210,088     21,888  568.79M     569.00M",
    ]


def test_readme_latency_table_layout():
    from slimops.deploy import LatencyEntry, LatencyTable

    t = LatencyTable([LatencyEntry(0.35, 2.63, 2.75), LatencyEntry(0.5, 3.12, 3.24),
                      LatencyEntry(0.75, 4.53, 4.61), LatencyEntry(1.0, 5.37, 5.48)])
    assert t.format(budget_ms=4).split("\n") == [
        "width  median ms  p90 ms  fits",
        "-----  ---------  ------  ----",
        "0.35x       2.63    2.75   yes",
        " 0.5x       3.12    3.24   yes",
        "0.75x       4.53    4.61    no",
        "   1x       5.37    5.48    no",
    ]
