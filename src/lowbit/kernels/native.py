"""The compiled CPU kernels (kernels/csrc): built on first use with the machine's C++ compiler, loaded with ctypes.

Why this way: the kernels are plain C++ with no torch headers, so a build takes seconds (a torch C++
extension takes minutes to compile and, built by `pip install`, risks pip's build isolation pulling a
CUDA torch). Nothing is ever required: without a compiler, on a CPU that is not x86-64, or with
LOWBIT_KERNELS=0, `library()` returns None and every module keeps its Python path (which is also the
kernels' test oracle).

The shared library goes to a cache folder ($LOWBIT_KERNEL_CACHE, else $XDG_CACHE_HOME/lowbit/kernels, else
~/.cache/lowbit/kernels) under a name that hashes the sources, flags and compiler, so an edited source
or another compiler builds anew. Concurrent first uses wait on a file lock; the library is written to a
temporary name and renamed, so a half-built file is never loaded. `make` builds it up front
(`python -m lowbit.kernels.native`).

Instruction sets are chosen at run time by the library (AVX-512 F/BW/VL/DQ, else AVX2+FMA+F16C, else the
baseline copy); LOWBIT_ISA=avx512|avx2|scalar or `set_isa()` picks one (the tests run all three).
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
COMMON_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-fno-math-errno"]
ISA_FLAGS = {0: [], 1: ["-mavx2", "-mfma", "-mf16c"],
             2: ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]}
ABI_VERSION = 1

_state: dict = {}


class KernelBuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    if os.environ.get("LOWBIT_KERNEL_CACHE"):
        return Path(os.environ["LOWBIT_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lowbit" / "kernels"


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler_id(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60, check=False)
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else cxx


def library_path(cxx: str) -> Path:
    """Where the library built from the current sources with `cxx` lives."""
    h = hashlib.sha256()
    for f in sorted(CSRC.iterdir()):
        if f.suffix in (".h", ".cpp"):
            h.update(f.name.encode() + f.read_bytes())
    h.update(repr((COMMON_FLAGS, ISA_FLAGS, _compiler_id(cxx), platform.machine())).encode())
    return cache_dir() / f"liblowbit_kernels-{h.hexdigest()[:16]}.so"


def _run(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _compile(cxx: str, target: Path) -> None:
    """Three copies of isa.cpp (one per instruction set), api.cpp and ggml_search.cpp, compiled in parallel,
    then linked."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects, jobs = [], []
        for isa, flags in ISA_FLAGS.items():
            obj = os.path.join(tmp, f"isa{isa}.o")
            jobs.append(_run([cxx, *COMMON_FLAGS, *flags, f"-DLB_ISA={isa}", "-c", str(CSRC / "isa.cpp"), "-o", obj]))
            objects.append(obj)
        for name in ("api", "ggml_search"):   # baseline flags: the dispatcher, the quantiser searches
            objects.append(os.path.join(tmp, f"{name}.o"))
            jobs.append(_run([cxx, *COMMON_FLAGS, "-fopenmp", "-c", str(CSRC / f"{name}.cpp"), "-o", objects[-1]]))
        for job in jobs:
            out, _ = job.communicate()
            if job.returncode:
                raise KernelBuildError(f"{' '.join(job.args[:3])} ... failed:\n{out[-2000:]}")
        partial = os.path.join(tmp, target.name)
        link = subprocess.run([cxx, "-shared", "-fopenmp", *objects, "-o", partial],
                              capture_output=True, text=True, check=False)
        if link.returncode:
            raise KernelBuildError(f"linking failed:\n{(link.stdout + link.stderr)[-2000:]}")
        os.replace(partial, target)


def build(quiet: bool = False) -> Path:
    """The library for the current sources, compiled now if it is not in the cache (under a file lock)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelBuildError(f"the kernels are written for x86-64, this is {platform.machine()}")
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (set CXX, or install g++)")
    target = library_path(cxx)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            if not quiet:
                print(f"lowbit: compiling the CPU kernels (once, about half a minute) into {target}", file=sys.stderr,
                      flush=True)
            _compile(cxx, target)
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sig = {"lb_abi_version": (i32, []), "lb_isa_supported": (i32, [i32]), "lb_get_isa": (i32, []),
           "lb_set_isa": (i32, [i32]), "lb_prep_stride": (i64, [i32, vp]),
           "lb_prepare": (None, [i32, vp, vp, i64, vp]), "lb_order": (None, [i32, vp, vp]),
           "lb_matmul": (i32, [i32, vp, vp, i64, vp, vp, i32]), "lb_decode": (None, [i32, vp, i64, i64, vp, i32])}
    for name, (restype, argtypes) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _load() -> ctypes.CDLL:
    import torch  # noqa: F401  (torch's libgomp first: the library then shares its OpenMP runtime)

    lib = _declare(ctypes.CDLL(str(build())))
    if lib.lb_abi_version() != ABI_VERSION:
        raise KernelBuildError(f"library ABI {lib.lb_abi_version()} != {ABI_VERSION}")
    wanted = os.environ.get("LOWBIT_ISA")
    if wanted:
        set_isa(wanted, lib)
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (with one warning saying why) when they cannot be had."""
    if "lib" not in _state:
        if os.environ.get("LOWBIT_KERNELS", "1").lower() in ("0", "off", "false", "no"):
            _state["lib"], _state["why"] = None, "disabled by LOWBIT_KERNELS"
        else:
            try:
                _state["lib"], _state["why"] = _load(), None
            except (KernelBuildError, OSError, subprocess.SubprocessError) as e:
                _state["lib"], _state["why"] = None, str(e)
                warnings.warn(f"lowbit: CPU kernels unavailable, using the Python path ({e})", stacklevel=2)
    return _state["lib"]


def unavailable_reason() -> str | None:
    library()
    return _state.get("why")


def set_isa(name: str, lib: ctypes.CDLL | None = None) -> str:
    """Run the kernels with `name` (avx512, avx2, scalar; 'auto' = the best this CPU has). Returns the one
    in use, which is the best available when `name` is not supported here."""
    lib = lib or library()
    if lib is None:
        raise KernelBuildError(unavailable_reason() or "kernels unavailable")
    if name != "auto" and name not in ISAS:
        raise ValueError(f"unknown instruction set {name!r}; known: auto, {', '.join(ISAS)}")
    got = lib.lb_set_isa(-1 if name == "auto" else ISAS[name])
    return {v: k for k, v in ISAS.items()}[got]


def isa() -> str | None:
    lib = library()
    return None if lib is None else {v: k for k, v in ISAS.items()}[lib.lb_get_isa()]


def supported_isas() -> list[str]:
    lib = library()
    return [] if lib is None else [name for name, code in ISAS.items() if lib.lb_isa_supported(code)]


def main() -> int:
    """`python -m lowbit.kernels.native`: build now and say what runs (never fails the caller)."""
    try:
        path = build()
        print(f"lowbit kernels: {path} ({isa()}; this CPU runs {', '.join(supported_isas())})")
    except (KernelBuildError, OSError, subprocess.SubprocessError) as e:
        print(f"lowbit kernels not built, the Python path will run: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
