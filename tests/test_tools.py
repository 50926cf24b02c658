"""bench.py on tiny settings (plot.py and tsne.py: test_plot.py and test_tsne.py)."""

import subprocess
import sys

import pytest

import bench
import ppo
from helpers import ROOT


# ---------------------------------------------------------------------------------------------
# bench.py
# ---------------------------------------------------------------------------------------------


def markdown_rows(text):
    """Every data row of every markdown table in text, as lists of cell strings."""
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("|---")]


def number(cell):
    return float(cell.replace(",", "").rstrip("x"))


def test_bench_prints_every_table_with_consistent_numbers(capsys):
    bench.main(bench.BenchArgs(num_envs=4, num_steps=16, num_minibatches=2, update_epochs=1, iterations=1,
                               floor_seconds=0.2, bf16=False, cuda=False))
    out = capsys.readouterr().out
    assert "### CPU" in out and "Procgen stepping (random actions, 4 envs)" in out
    rows = markdown_rows(out)
    networks = [row for row in rows if row[0] == "float32" and len(row) == 4 and not row[3].endswith("x")]
    overlap = [row for row in rows if row[0] == "float32" and len(row) == 4 and row[3].endswith("x")]
    scripts = {row[0]: row for row in rows if row[0] in ("PPO", "MDPO per agent")}
    assert len(networks) == 1 and len(overlap) == 1 and set(scripts) == {"PPO", "MDPO per agent"}
    assert all(number(cell) > 0 for cell in networks[0][1:])
    in_turn, overlapped, speedup = (number(cell) for cell in overlap[0][1:])
    assert speedup == pytest.approx(in_turn / overlapped, abs=0.01)
    for row in scripts.values():
        floor, end_to_end, ratio = (number(cell) for cell in row[2:5])
        assert floor > 0 and end_to_end > 0 and ratio == pytest.approx(end_to_end / floor, abs=0.01)
        assert row[1] == "float32" and row[-1] == "1.00x"


@pytest.mark.parametrize("settings, message", [
    ({"iterations": 0}, "--iterations must be at least 1"),
    ({"floor_seconds": 0.0}, "--floor-seconds must be positive"),
    ({"num_envs": 0}, "--num-envs must be positive"),  # not the default 16
    ({"num_envs": 3, "num_steps": 5}, "does not divide"),
    ({"env_id": "pong"}, "unknown game 'pong'"),
])
def test_bench_rejects_bad_settings_before_measuring(settings, message, capsys):
    with pytest.raises(ppo.UsageError, match=message):
        bench.main(bench.BenchArgs(cuda=False, **settings))
    assert capsys.readouterr().err == ""  # nothing was measured


def test_bench_reports_bad_settings_in_one_line():
    result = subprocess.run([sys.executable, "bench.py", "--iterations", "0"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --iterations must be at least 1, got 0"
