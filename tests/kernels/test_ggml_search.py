"""The compiled ggml scale searches against the torch ones they replace (weights/ggml/search.py): the same
fits up to the order of each sub-block's sums, so nearly every byte equal and the same error."""
import pytest
import torch

from lowbit.kernels.ggml_search import searches
from lowbit.weights.ggml import dequantize_ggml, quantize_ggml
from tests.kernels.helpers import kernels_or_skip
from tests.weights.ggml_helpers import awkward_weights, importance

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_1", "Q5_1", "Q4_0", "Q5_0"]


def weighted_error(w, data, type_name, imp) -> float:
    d = dequantize_ggml(torch.from_numpy(data), type_name, w.shape[1])
    return float((((w - d) ** 2) * (1 if imp is None else imp)).sum())


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("search", [False, True], ids=["ref", "search"])
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_native_searches_fit_as_the_torch_ones(type_name, search, with_imatrix):
    kernels_or_skip()
    w = awkward_weights(rows=24, cols=512)
    imp = importance(512) if with_imatrix else None
    reference = quantize_ggml(w, type_name, imatrix=imp, search=search)
    with searches():
        native = quantize_ggml(w, type_name, imatrix=imp, search=search)
    assert (native == reference).mean() > 0.99
    ref_err, nat_err = weighted_error(w, reference, type_name, imp), weighted_error(w, native, type_name, imp)
    # a near-tie between two candidate scales can go the other way in another summation order, and on 24 rows
    # one such sub-block moves the total by ~0.2% (0.00448 native against 0.00449 torch on one machine, Q4_K
    # with the imatrix; within 0.1% on another): the native fit is as good, or better, up to that
    assert nat_err <= ref_err * 1.003
