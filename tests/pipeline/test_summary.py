import math

from lowbit.pipeline.report import LayerReport, summarize


def row(name, err):
    return LayerReport(name, "rtn", [4, 4], 4.5, err, 0.1, 0, 0, None)


def test_unmeasured_output_errors_are_not_reported_as_zero():
    text = summarize([row("a", math.nan), row("b", math.nan)])
    assert "not measured" in text and "error 0" not in text


def test_the_mean_is_over_measured_rows_only():
    assert "mean relative output error 0.3" in summarize([row("a", 0.2), row("b", 0.4), row("c", math.nan)])
