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
    scripts = {row[0]: row for row in rows if row[0] in ("PPO", "MDPO per agent") and len(row) == 9}
    costs = [row for row in rows if len(row) == 6][1:]  # after its header
    assert [row[0] for row in costs] == ["PPO", "MDPO, K = 2"]
    assert len(networks) == 1 and len(overlap) == 1 and set(scripts) == {"PPO", "MDPO per agent"}
    assert all(number(cell) > 0 for cell in networks[0][1:] + overlap[0][1:])
    for row in scripts.values():
        assert all(number(cell) > 0 for cell in row[2:8])
        assert row[1] == "float32" and row[-1] == "1.00x"  # float32 against itself


def test_bench_cost_table_counts_samples_and_passes_per_iteration(capsys):
    # By hand, batch 100 and 3 epochs: PPO 100 samples, 100 inference and 300 fwd+bwd samples; MDPO with
    # K agents K x 100 samples and inferences, and K agents x K minibatches x 3 epochs x 100 fwd+bwd samples.
    bench.print_cost_table({"iteration": 1.0}, {2: {"iteration": 4.0}, 3: {"iteration": 10.0}}, batch=100, epochs=3)
    rows = markdown_rows(capsys.readouterr().out)
    assert rows[-3] == ["PPO", "100", "100", "300", "1.00", "0.25x"]
    assert rows[-2] == ["MDPO, K = 2", "200", "200", "1,200", "4.00", "1.00x"]
    assert rows[-1] == ["MDPO, K = 3", "300", "300", "2,700", "10.00", "2.50x"]


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
