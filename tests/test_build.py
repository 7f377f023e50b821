"""The compiled extension's build: private build directories, one atomic publish, a lock
the OS releases when its holder dies, a bounded wait, and a wheel that ships the source.

The build tests compile a one-function module (seconds) instead of the time loops: what
they test is the machinery around the compiler, which is the same for both.
"""

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from whiteboard.backends.compiled import build as native

TINY_SOURCE = """
#include <pybind11/pybind11.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", [] { return 42; }); }
"""

# Builds the tiny module through whiteboard.backends.compiled.build's own _build; prints where it came from.
BUILD_SCRIPT = """
import sys
from pathlib import Path
from whiteboard.backends.compiled import build as native
native._source = lambda: Path(sys.argv[1])
try:
    module = native._build(native.openmp_flags(), False)
except native.BuildWaitTimeout as exc:
    print("timeout", exc)
else:
    print(module.answer(), "built" if "/.build-" in module.__file__ else "imported")
"""


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    cache = tmp_path / "cache"
    monkeypatch.setenv("WHITEBOARD_CACHE", str(cache))
    monkeypatch.setattr(native, "_source", lambda: source)
    key = native.build_key()
    return source, cache / "extensions", key


def _start(source: Path, wait: float = 120) -> subprocess.Popen:
    env = {**os.environ, "WHITEBOARD_BUILD_WAIT": str(wait)}
    return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(source)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_two_processes_building_at_once_build_once_and_both_load_it(tiny):
    source, root, key = tiny
    first, second = _start(source), _start(source)
    results = [p.communicate(timeout=300) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], results
    outcomes = sorted(out.split() for out, _ in results)
    assert outcomes == [["42", "built"], ["42", "imported"]]  # exactly one compiled it
    assert native.published_path(key).exists()
    assert not list(root.glob(".build-*"))  # the private build directory is gone


def test_a_build_killed_midway_leaves_no_lock_that_stops_the_next_process(tiny):
    source, root, key = tiny
    doomed = _start(source)
    deadline = time.time() + 120
    while not list(root.glob(f".build-{key}-*")) and time.time() < deadline:
        time.sleep(0.02)
    assert list(root.glob(f".build-{key}-*")), "the build never started"
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate(timeout=60)
    assert not native.published_path(key).exists()  # nothing half-published
    started = time.monotonic()
    after = _start(source, wait=30)
    out, err = after.communicate(timeout=300)
    assert after.returncode == 0 and out.split() == ["42", "built"], err
    assert "waiting" not in err  # the dead builder's lock was released by the OS
    assert time.monotonic() - started < 120
    assert not list(root.glob(".build-*"))  # the killed build's directory was cleaned


def test_a_process_waits_for_a_live_builder_with_one_line_and_gives_up_in_bounded_time(tiny):
    source, root, key = tiny
    root.mkdir(parents=True)
    holder = os.open(root / f"{key}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a live process building
    try:
        started = time.monotonic()
        waiting = _start(source, wait=1)
        out, err = waiting.communicate(timeout=60)
    finally:
        os.close(holder)
    assert out.startswith("timeout"), (out, err)
    assert err.count("another process is building the compiled time loops") == 1
    assert time.monotonic() - started < 30


def test_load_falls_back_to_the_torch_loop_when_the_wait_runs_out(monkeypatch):
    def build(openmp, verbose):
        raise native.BuildWaitTimeout("another process has been building for over 600 s")

    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setattr(native, "_build", build)
    with pytest.warns(RuntimeWarning, match="could not be built.*BuildWaitTimeout") as caught:
        assert native.load() is None
    assert len(caught) == 1  # no second try without OpenMP: that would wait again


def test_the_build_key_covers_every_part_the_source_includes(tmp_path, monkeypatch):
    source = tmp_path / "main.cpp"
    source.write_text('#include "part.h"\n')
    part = tmp_path / "part.h"
    part.write_text("int x = 1;\n")
    monkeypatch.setattr(native, "_source", lambda: source)
    key = native.build_key()
    part.write_text("int x = 2;\n")
    assert native.build_key() != key
    (tmp_path / "another.h").write_text("\n")
    assert native.build_key() not in (key,)


def test_the_real_source_is_split_into_parts_and_all_of_them_are_included():
    source = native._source()
    parts = sorted(p.name for p in source.parent.glob("*.h"))
    included = [line.split('"')[1] for line in source.read_text().splitlines() if line.startswith('#include "')]
    assert len(parts) >= 5 and sorted(included) == parts


def test_the_build_key_separates_python_abis(monkeypatch):
    key = native.build_key()
    real = native.sysconfig.get_config_var
    monkeypatch.setattr(native.sysconfig, "get_config_var",
                        lambda name: ".cpython-399-x86_64-linux-gnu.so" if name == "EXT_SUFFIX" else real(name))
    assert native.build_key() != key


@pytest.mark.slow
def test_a_wheel_ships_the_source_and_its_install_runs_the_compiled_loops(tmp_path):
    """pip wheel, then the wheel's files alone (not the editable checkout) on sys.path."""
    checkout = Path(__file__).resolve().parent.parent
    project = tmp_path / "project"  # a copy: building writes build/ and egg-info beside the sources
    shutil.copytree(checkout / "src", project / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(checkout / name, project / name)
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(wheels), str(project)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("whiteboard-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sources = {str(p.relative_to(checkout / "src")) for p in (checkout / "src").rglob("csrc/*")}
    assert sources and sources <= set(names)
    assert any(n.startswith("whiteboard/lm/presets/") for n in names)
    target = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(target)
    check = ("import whiteboard, whiteboard.backends.compiled.build as n, torch; "
             "assert whiteboard.__file__.startswith(%r), whiteboard.__file__; "
             "layer = whiteboard.LSTM(4, 8); "
             "call = whiteboard.backends.call_of(layer, torch.randn(3, 2, 4)); "
             "print(n.load() is not None and whiteboard.backends.choose(call).name == 'compiled')") % str(target)
    env = {**os.environ, "PYTHONPATH": str(target)}
    ran = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=600, env=env)
    assert ran.returncode == 0 and ran.stdout.strip() == "True", ran.stderr
