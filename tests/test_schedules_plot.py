"""plot() writes a PNG of a plan or schedule; matplotlib stays optional and out of the import."""

import subprocess
import sys

import pytest
import torch

import resfast.schedules as S

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "make",
    [
        lambda: S.Plan(
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1),
            S.Warmup(S.Cosine(0.1, 10_000), 1000),
            S.StepBatch(32, 3000, max_size=256),
            lr_scaling="sqrt",
        ),
        lambda: S.OneCycle(0.1, 10_000),
        lambda: S.LinearBatch(8, 64, 5000),
    ],
    ids=["plan", "lr", "batch"],
)
def test_plot_writes_a_png(tmp_path, make):
    pytest.importorskip("matplotlib")
    path = tmp_path / "schedule.png"
    assert S.plot(make(), 12_000, path, points=50) == str(path)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"needs matplotlib: pip install matplotlib"):
        S.plot(S.Constant(0.1), 100, tmp_path / "x.png")


def test_plot_bad_input(tmp_path):
    with pytest.raises(TypeError, match=r"needs a Plan, an LRSchedule or a BatchSchedule, got 0.1"):
        S.plot(0.1, 100, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"total \(samples\) must be > 0, got 0"):
        S.plot(S.Constant(0.1), 0, tmp_path / "x.png")


def test_import_loads_nothing_heavier_than_torch():
    code = (
        "import sys, torch; before = set(sys.modules); import resfast.schedules; "
        "new = sorted(m for m in set(sys.modules) - before if not m.startswith('resfast')); "
        "assert not new, new; assert 'matplotlib' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
