"""Building, loading and falling back: the kernels are never required, and a module's plan never outlives
the buffers it points into."""
import copy
import os
import subprocess
import sys

import torch

from lowbit.core import QuantSpec, quantize
from lowbit.kernels import native
from lowbit.nn import QuantLinear
from tests.kernels.helpers import kernels_or_skip


def small_layer(seed=0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    return QuantLinear.from_quantized(quantize(torch.randn(16, 256, generator=g), QuantSpec("int4", "group", 64)),
                                      torch.randn(16, generator=g))


def test_without_kernels_every_module_runs_its_python_path(monkeypatch):
    monkeypatch.setitem(native._state, "lib", None)
    monkeypatch.setitem(native._state, "why", "switched off by the test")
    m = small_layer()
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(m(x), m.python_forward(x))
    assert m._plan is False


def test_lowbit_kernels_0_disables_them_in_a_fresh_process():
    code = ("import torch; from lowbit.kernels import native; from tests.kernels.test_native import small_layer; "
            "m = small_layer(); x = torch.randn(2, 256); "
            "assert native.library() is None and 'LOWBIT_KERNELS' in native.unavailable_reason(); "
            "assert torch.equal(m(x), m.python_forward(x))")
    env = dict(os.environ, LOWBIT_KERNELS="0", PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.path.dirname(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__)))))


def test_a_broken_compiler_means_a_warning_and_the_python_path(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "compiler", lambda: "/bin/false")
    monkeypatch.setattr(native, "_compiler_id", lambda cxx: "false")
    monkeypatch.setattr(native, "_state", {})
    import pytest

    with pytest.warns(UserWarning, match="CPU kernels unavailable"):
        assert native.library() is None
    assert "failed" in native.unavailable_reason()
    assert not list(tmp_path.glob("*.so"))


def test_the_cached_library_is_named_by_its_sources():
    kernels_or_skip()
    cxx = native.compiler()
    path = native.library_path(cxx)
    assert path.exists() and path.parent == native.cache_dir()
    assert path.name.startswith("liblowbit_kernels-") and path.suffix == ".so"


def test_isa_choice_falls_back_to_what_the_cpu_runs():
    kernels_or_skip()
    assert "scalar" in native.supported_isas()
    try:
        assert native.set_isa("scalar") == "scalar" and native.isa() == "scalar"
    finally:
        best = native.set_isa("auto")
    assert best == native.supported_isas()[-1]


def test_the_plan_is_rebuilt_when_buffers_may_change():
    kernels_or_skip()
    m = small_layer()
    x = torch.randn(1, 256)
    with torch.no_grad():
        y = m(x)
        assert m._plan
        twin = copy.deepcopy(m)                                 # a copy describes its own tensors
        assert twin._plan is None and torch.equal(twin(x), y)
        other = small_layer(seed=1)
        m.load_state_dict(other.state_dict())                   # in place: plan dropped, new values used
        assert m._plan is None and torch.equal(m(x), other(x))
        m.float()
        assert m._plan is None


def test_autograd_through_the_input_takes_the_python_path():
    kernels_or_skip()
    m = small_layer()
    x = torch.randn(2, 256, requires_grad=True)
    m(x).sum().backward()
    assert torch.allclose(x.grad, m.dequantized_weight().sum(0).expand(2, -1), atol=1e-5)
