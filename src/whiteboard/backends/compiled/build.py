"""Building the compiled time loops (``csrc/``): at first use, cached on disk.

Why a C++ extension: on CPU the pure-PyTorch torch loop spends most of its time in
per-op Python dispatch (5-15 us per op per step). Moving only the time loops to C++
removes that while the GEMMs still go through ATen, i.e. the BLAS torch ships with (MKL
here) and torch's own thread pool; no second thread pool is ever started. ``torch.compile``
and TorchScript were measured slower than eager here, and a numba loop could only reach
OpenBLAS, whose small sgemm is about 2x slower than MKL's at these sizes.

The build is keyed by a hash of the source, the compiler flags, torch's version, the
Python ABI and the CPU's instruction sets (it is compiled with ``-march=native``), and
cached under ``$WHITEBOARD_CACHE`` (default ``~/.cache/whiteboard``). Set
``WHITEBOARD_NATIVE=0`` to never build or use it. Where it cannot be built (no compiler,
say) whiteboard warns once and uses the torch loop.

Each build runs in a private temporary directory and publishes the finished module with
one atomic rename, under an exclusive ``flock`` per key: a process that finds another one
building says so in one line and waits (at most ``WHITEBOARD_BUILD_WAIT`` seconds, default
600, then it warns and uses the torch loop); the operating system drops the lock of a
builder that dies, so a killed build never leaves a lock that hangs later processes, and
venvs that share the cache never rewrite each other's build files.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from importlib import resources
from pathlib import Path

import torch

from whiteboard.backends.compiled import tuning

# -ffinite-math-only lets gcc vectorise the clamps in the gate math; the Functions send only
# finite inputs to the compiled loops (see recurrent.cpp).
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
          "-ffinite-math-only"]


def openmp_flags() -> list[str]:
    """``-fopenmp`` where torch's intra-op threads are OpenMP's (its Linux and Windows
    builds), else nothing.

    at::parallel_for, which splits the pointwise passes over batch rows, is a header
    template that under torch's OpenMP backend runs its body serially unless this file is
    compiled with -fopenmp: until that flag was added every pass ran on one thread. Linking
    it adds a dependency on libgomp.so.1, which the loader resolves to the copy torch has
    already loaded (same soname), so there is still one OpenMP runtime and one thread pool
    in the process (tests/test_native_runtime.py checks)."""
    return ["-fopenmp"] if "parallel backend: OpenMP" in torch.__config__.parallel_info() else []


_module = None
_failed: str | None = None
build_seconds: float | None = None  # how long the last load took (cold build or warm cache)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    return Path(os.environ.get("WHITEBOARD_CACHE", Path.home() / ".cache" / "whiteboard")) / "extensions"


def _source() -> Path:
    """The one translation unit; it includes the parts beside it (csrc/*.h)."""
    return Path(str(resources.files("whiteboard.backends.compiled") / "csrc" / "recurrent.cpp"))


def build_key(openmp: list[str] | None = None) -> str:
    digest = hashlib.sha256()
    source = _source()
    # The translation unit and the parts it includes (csrc/*.h), in a fixed order.
    for path in [source, *sorted(source.parent.glob("*.h"))]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(CFLAGS + (openmp_flags() if openmp is None else openmp)).encode())
    digest.update(torch.__version__.encode())
    digest.update(str(sysconfig.get_config_var("EXT_SUFFIX")).encode())  # the module is CPython-ABI specific
    digest.update(_cpu_flags().encode())
    return digest.hexdigest()[:16]


def failure() -> str | None:
    """Why the compiled loops could not be built, or None."""
    return _failed


def enabled() -> bool:
    return os.environ.get("WHITEBOARD_NATIVE", "1") != "0"


def load(verbose: bool = False):
    """The compiled module, building it on first use; None where it cannot be had."""
    global _module, _failed, build_seconds
    if _module is not None or _failed is not None or not enabled():
        return _module
    started = time.perf_counter()
    openmp = openmp_flags()
    try:
        try:
            _module = _build(openmp, verbose)
        except BuildWaitTimeout:
            raise  # not the compiler's doing: building again without OpenMP would wait too
        except Exception as exc:
            if not openmp:
                raise
            # A compiler without OpenMP support (clang without libomp, say): the loops still
            # pay, only their pointwise passes run on one thread.
            _module = _build([], verbose)
            warnings.warn(f"whiteboard: built the compiled time loops without OpenMP ({_last_line(exc)}); "
                          "their pointwise passes run on one thread", RuntimeWarning, stacklevel=2)
    except Exception as exc:  # no compiler, no ninja, a broken toolchain: fall back, loudly once
        _failed = _last_line(exc)
        warnings.warn(f"whiteboard: the compiled time loops could not be built ({_failed}); "
                      "using the torch loop", RuntimeWarning, stacklevel=2)
        return None
    build_seconds = time.perf_counter() - started
    _module.set_pool_limits(tuning.POOL_MIN_BYTES, tuning.pool_max_idle_bytes())
    return _module


class BuildWaitTimeout(RuntimeError):
    """Another process held the build lock for longer than ``build_wait_seconds()``."""


def build_wait_seconds() -> float:
    """How long a process waits for another's build: ``WHITEBOARD_BUILD_WAIT`` (default 600)."""
    value = os.environ.get("WHITEBOARD_BUILD_WAIT", "600")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"WHITEBOARD_BUILD_WAIT must be a number of seconds >= 0, got {value!r}")
    return seconds


def published_path(key: str) -> Path:
    """Where the finished module of a build key lives."""
    return cache_dir() / key / f"whiteboard_recurrent_{key}.so"


def _build(openmp: list[str], verbose: bool):
    """The compiled module for these flags: the published one, or built now (see the module
    docstring for the private build directory, the lock and the wait)."""
    key = build_key(openmp)
    published = published_path(key)
    if published.exists():
        return _import(published)
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with _BuildLock(root / f"{key}.lock"):
        if published.exists():  # another process built it while this one waited
            return _import(published)
        return _build_and_publish(key, openmp, published, verbose)


def _build_and_publish(key: str, openmp: list[str], published: Path, verbose: bool):
    from torch.utils.cpp_extension import load as load_extension

    _put_scripts_on_path()
    root = published.parent.parent
    for stale in root.glob(f".build-{key}-*"):  # a killed builder's; this process holds the key's lock
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".build-{key}-"))
    try:
        name = f"whiteboard_recurrent_{key}"
        module = load_extension(name=name, sources=[str(_source())], extra_cflags=CFLAGS + openmp,
                                extra_ldflags=openmp, build_directory=str(staging), verbose=verbose)
        published.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(staging / f"{name}.so", staging / "publish.tmp")
        os.replace(staging / "publish.tmp", published)  # one atomic rename: whole or absent
        return module
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _import(path: Path):
    name = path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


class _BuildLock:
    """An exclusive flock on a file per build key. The OS releases it when its holder exits
    or is killed, so no dead process can leave later ones waiting. Waiting is said once on
    stderr and bounded by build_wait_seconds()."""

    POLL_SECONDS = 0.2

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + build_wait_seconds()
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if time.monotonic() >= deadline:
                os.close(fd)
                raise BuildWaitTimeout(f"another process has been building the compiled time loops for over "
                                       f"{build_wait_seconds():.0f} s (lock {self.path})")
            if not told:
                print("whiteboard: another process is building the compiled time loops; waiting for it "
                      f"(at most {build_wait_seconds():.0f} s)", file=sys.stderr, flush=True)
                told = True
            time.sleep(self.POLL_SECONDS)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _last_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"


def _put_scripts_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the ninja that pip installed beside this
    interpreter is not on it when the environment was never activated (``.venv/bin/python``)."""
    scripts = sysconfig.get_path("scripts")
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
