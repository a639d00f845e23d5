"""format_table: one precision per numeric column."""
from lowbit.table import format_table


def test_a_column_mixing_ints_and_floats_prints_one_number_of_decimals():
    text = format_table(["name", "ppl", "bits", "n", "note"],
                        [["a", 10, 16, 3, "-"], ["b", 5.551, 3.125, 12, "x"], ["c", "-", 4.5, 7, ""]])
    assert text.splitlines() == [
        "name     ppl    bits   n  note",
        "----  ------  ------  --  ----",
        "a     10.000  16.000   3     -",
        "b      5.551   3.125  12     x",
        "c          -   4.500   7      ",
    ]


def test_decimals_are_capped_and_tiny_or_huge_columns_go_scientific():
    text = format_table(["k", "kl", "share", "tok/s"],
                        [["a", 0.0, 0.123456, 1234.56], ["b", 0.0004, 0.5, 87.25], ["c", float("nan"), True, 12]])
    assert text.splitlines()[2:] == [
        "a  0.000e+00  0.1235  1,234.56",
        "b  4.000e-04  0.5000     87.25",
        "c        nan    True     12.00",
    ]


def test_markdown_uses_the_same_cells():
    assert format_table(["m", "x"], [["a", 1], ["b", 2.5]], markdown=True).splitlines() == [
        "| m |   x |", "|---|-----|", "| a | 1.0 |", "| b | 2.5 |"]
