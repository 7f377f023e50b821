"""The inspect report in a real browser: headless Chromium opens it from file://, the
page's script draws every heatmap cell without errors, and a screenshot is not blank."""

import re
import shutil
import subprocess

import pytest
import torch

from whiteboard.lm import config as cfg
from whiteboard.inspect.traces import build_report
from whiteboard.lm.model import LanguageModel
from whiteboard.lm.vocab import Vocabulary

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _find_browser():
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


@pytest.fixture(scope="module")
def browser():
    """The system's Chromium, which `make test` installs where it can (see the Makefile)."""
    found = _find_browser()
    if not found:
        pytest.skip("no Chromium on this machine (`make install` installs it with apt-get as root)")
    return found


def _run(browser, *args, timeout=120):
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _body_attributes(dom: str) -> dict:
    body = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    torch.manual_seed(0)
    text = "the cat sat on the mat and the dog ran to the park"
    vocab = Vocabulary.build(text + "\n", "word")
    config = cfg.resolve(sets=["model.embedding_size=8", "model.hidden_size=10", "model.num_layers=2"])
    model = LanguageModel(len(vocab), config.model).eval()
    out = tmp_path_factory.mktemp("browser") / "report.html"
    build_report(model, vocab, text, out, unit_count=6)
    expected_cells = 2 * 4 * 6 * len(text.split())  # layers x (3 gates + cell) x units x tokens
    return out, expected_cells


def test_report_renders_every_heatmap_cell_without_errors(browser, report):
    path, expected_cells = report
    done = _run(browser, "--dump-dom", path.as_uri())
    assert done.returncode == 0, done.stderr[-500:]
    attrs = _body_attributes(done.stdout)
    assert attrs.get("rendered") == "yes", "the page's script did not finish"
    assert int(attrs["heatmap-cells"]) == expected_cells
    assert attrs["errors"] == "0"
    assert done.stdout.count('class="hm-cell"') == expected_cells
    console_errors = [line for line in done.stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
    assert console_errors == []


def test_a_broken_page_is_caught_by_the_same_check(browser, report, tmp_path):
    """The harness can fail: a page whose data is broken reports an error."""
    path, _ = report
    broken = tmp_path / "broken.html"
    broken.write_text(path.read_text().replace('"heatmaps": [', '"heatmaps": [{"id": "missing", "units": [0], "values": [[1]]}, ', 1))
    done = _run(browser, "--dump-dom", broken.as_uri())
    attrs = _body_attributes(done.stdout)
    assert attrs.get("rendered") != "yes" or attrs.get("errors") != "0"


def test_screenshot_is_written_and_not_blank(browser, report, tmp_path):
    import matplotlib.image

    path, _ = report
    shot = tmp_path / "shot.png"
    done = _run(browser, "--hide-scrollbars", "--window-size=1200,1400", f"--screenshot={shot}", path.as_uri())
    assert shot.exists(), done.stderr[-500:]
    pixels = matplotlib.image.imread(str(shot))[..., :3]
    assert pixels.std() > 0.05
    distinct = torch.unique(torch.from_numpy((pixels * 255).astype("uint8")).reshape(-1, 3), dim=0)
    assert len(distinct) > 50  # text, heatmap colours: far from a blank page
