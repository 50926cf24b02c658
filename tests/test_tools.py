"""sweep.py, plot.py, tsne.py and bench.py on tiny jobs, synthetic event files and tiny checkpoints."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import bench
import plot
import ppo
import sweep
import tsne
from helpers import ROOT

TINY_FLAGS = "--total-timesteps 128 --num-envs 4 --num-steps 32 --num-minibatches 2 --eval-episodes 2 --no-cuda"


# ---------------------------------------------------------------------------------------------
# sweep.py
# ---------------------------------------------------------------------------------------------


def sweep_args(root, **kw):
    return sweep.SweepArgs(root=str(root), methods=["ppo", "mdpo"], games=["bigfish"], seeds=[1], flags=TINY_FLAGS, **kw)


def test_sweep_runs_skips_finished_and_resumes_extended_jobs(tmp_path, capsys):
    assert sweep.main(sweep_args(tmp_path, jobs=2)) == 0
    jobs = sweep.make_jobs(sweep_args(tmp_path))
    assert [job.state() for job in jobs] == ["done", "done"]
    for job in jobs:
        assert json.load(open(os.path.join(job.run_dir, "status.json")))["global_step"] == 128

    capsys.readouterr()
    assert sweep.main(sweep_args(tmp_path)) == 0
    assert "2 already finished, 0 to run" in capsys.readouterr().out

    longer = sweep_args(tmp_path)
    longer.flags = TINY_FLAGS.replace("--total-timesteps 128", "--total-timesteps 256")
    assert [job.state() for job in sweep.make_jobs(longer)] == ["resume", "resume"]
    job = sweep.make_jobs(longer)[0]
    assert "--resume" in job.command(job.state())
    assert sweep.main(longer) == 0
    for job in sweep.make_jobs(longer):
        assert json.load(open(os.path.join(job.run_dir, "status.json")))["global_step"] == 256


def test_sweep_through_submitit_local_executor(tmp_path):
    args = sweep_args(tmp_path, launcher="submitit-local")
    args.methods = ["ppo_dropout"]
    assert sweep.main(args) == 0
    job = sweep.make_jobs(args)[0]
    assert job.state() == "done"
    assert json.load(open(os.path.join(job.run_dir, "config.json")))["args"]["dropout"] == 0.1


def test_sweep_restarts_a_job_that_died_before_its_first_checkpoint(tmp_path):
    job = sweep.make_jobs(sweep_args(tmp_path))[0]
    os.makedirs(job.run_dir)
    open(os.path.join(job.run_dir, "config.json"), "w").write("{}")
    assert job.state() == "new"
    assert job() == "trained"
    assert job.state() == "done"


def test_sweep_rejects_unknown_names(tmp_path):
    args = sweep_args(tmp_path)
    args.games = ["pong"]
    with pytest.raises(SystemExit, match="unknown method or game 'pong'"):
        sweep.main(args)


@pytest.mark.parametrize("flags, message", [
    ("--num-envs 0", "--flags for ppo: --num-envs must be positive"),
    ("--num-envs 6 --num-steps 5", "does not divide"),
    ("--distribution-mode memory", "bigfish has no memory mode"),  # checked for each game of the sweep
    ("--seed 5", "must not set --seed"),  # would give every seed's run the same seed
    ("--exp_name=x", "must not set --exp-name"),
    ("--dropout 0.2", "must not set --dropout"),  # would turn plain PPO into PPO + dropout
])
def test_sweep_rejects_bad_flags_before_any_job_starts(tmp_path, flags, message):
    args = sweep_args(tmp_path)
    args.flags = flags
    with pytest.raises(SystemExit, match=message):
        sweep.main(args)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()


def test_sweep_rejects_non_positive_settings(tmp_path):
    with pytest.raises(SystemExit, match="--jobs must be positive, got 0"):
        sweep.main(sweep_args(tmp_path, jobs=0))


def test_sweep_checks_flags_against_each_chosen_method(tmp_path):
    args = sweep_args(tmp_path, dry_run=True)
    args.flags = "--alpha 0.5"  # MDPO's flag: ppo.py does not know it
    with pytest.raises(SystemExit) as error:
        sweep.main(args)
    assert error.value.code == 2
    args.methods = ["mdpo"]
    assert sweep.main(args) == 0


# ---------------------------------------------------------------------------------------------
# plot.py on synthetic event files
# ---------------------------------------------------------------------------------------------


def write_run(root, script, method, game, seed, test, train):
    run_dir = os.path.join(root, f"{game}__{method}__{seed}")
    os.makedirs(run_dir)
    json.dump({"script": script, "args": {"env_id": game, "exp_name": method, "seed": seed}},
              open(os.path.join(run_dir, "config.json"), "w"))
    agents = [run_dir] if script == "ppo" else [os.path.join(run_dir, "agent1"), os.path.join(run_dir, "agent2")]
    for k, event_dir in enumerate(agents):
        writer = SummaryWriter(event_dir)
        for step, (te, tr) in enumerate(zip(test, train)):
            offset = 0 if script == "ppo" else (1 if k == 0 else -1)  # MDPO agents differ; their mean is test
            writer.add_scalar("eval/test_return", te + offset, (step + 1) * 1000)
            writer.add_scalar("eval/train_return", tr, (step + 1) * 1000)
        writer.close()


def test_plot_makes_every_figure_and_a_correct_table(tmp_path):
    rng = np.random.default_rng(0)
    finals = {}
    for game in ("bigfish", "starpilot"):
        for script, method in (("ppo", "ppo"), ("ppo", "ppo_l2"), ("mdpo", "mdpo")):
            for seed in (1, 2, 3):
                test = rng.uniform(0, 20, 5)
                write_run(tmp_path / "runs", script, method, game, seed, test, test + 3)
                finals.setdefault((game, method), []).append(test[-1])
    out = tmp_path / "fig"
    plot.main(plot.PlotArgs(runs=[str(tmp_path / "runs")], out=str(out), label="synthetic", bootstrap_reps=100))
    for name in ("test_return", "aggregate", "generalization_gap"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.pdf").stat().st_size > 0
    table = (out / "final_test_returns.md").read_text()
    assert "5,000 steps per agent, 3 seeds, synthetic" in table
    row = next(line for line in table.splitlines() if line.startswith("| starpilot"))
    expected = finals[("starpilot", "mdpo")]
    assert f"{np.mean(expected):.2f} ± {np.std(expected):.2f} (3)" in row.split("|")[4]

    grouped = plot.group([plot.load_run(d) for d in plot.find_runs([str(tmp_path / "runs")])])
    scores = plot.normalised_scores(grouped, ["PPO", "MDPO"])
    low, high = plot.HARD_MODE_RANGES["bigfish"]
    np.testing.assert_allclose(scores["MDPO"][:, 0], (np.array(finals[("bigfish", "mdpo")]) - low) / (high - low),
                               rtol=1e-5)


def test_plot_finds_only_runs_and_says_which_it_skips(tmp_path, capsys):
    write_run(tmp_path / "runs", "ppo", "ppo", "bigfish", 1, [1.0], [2.0])
    (tmp_path / "runs" / "other_tool").mkdir()
    (tmp_path / "runs" / "other_tool" / "config.json").write_text('{"model": "not ours"}')
    (tmp_path / "runs" / "torn").mkdir()
    (tmp_path / "runs" / "torn" / "config.json").write_text('{"script": "pp')
    assert plot.find_runs([str(tmp_path / "runs")]) == [str(tmp_path / "runs" / "bigfish__ppo__1")]
    assert "skipping " + str(tmp_path / "runs" / "torn") in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--bootstrap-reps must be positive"):
        plot.main(plot.PlotArgs(runs=[str(tmp_path / "runs")], out=str(tmp_path / "fig"), bootstrap_reps=0))


# ---------------------------------------------------------------------------------------------
# tsne.py on tiny checkpoints
# ---------------------------------------------------------------------------------------------


def write_checkpoint(path, script, game="bigfish", uniform_policy=False):
    torch.manual_seed(len(str(path)))
    agents = [ppo.Agent() for _ in range(1 if script == "ppo" else 2)]
    for agent in agents:
        if uniform_policy:
            torch.nn.init.zeros_(agent.actor.weight)
    states = [agent.state_dict() for agent in agents]
    checkpoint = {"script": script, "args": {"env_id": game, "exp_name": script, "dropout": 0.0}}
    checkpoint.update({"agent": states[0]} if script == "ppo" else {"agents": states})
    os.makedirs(path)
    torch.save(checkpoint, os.path.join(path, "checkpoint.pt"))
    return str(path)


def test_random_conv_copies_are_distinct_valid_frames_and_reproducible():
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    copies = tsne.random_conv_copies(frame, 5, seed=3)
    assert copies.shape == (5, 64, 64, 3) and copies.dtype == torch.uint8
    assert not torch.equal(copies[0], copies[1])
    assert torch.equal(copies, tsne.random_conv_copies(frame, 5, seed=3))


def test_robustness_numbers_match_a_direct_computation():
    torch.manual_seed(0)
    agent = ppo.Agent().eval()
    clean = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8)
    perturbed = torch.randint(0, 256, (9, 64, 64, 3), dtype=torch.uint8)
    result = tsne.robustness(agent, clean, perturbed)
    with torch.no_grad():
        h_clean = agent.hidden(clean).double().numpy()
        h = agent.hidden(perturbed).double().numpy()
        scale = np.linalg.norm(h_clean, axis=1).mean()
        spread = np.linalg.norm(h - h.mean(0), axis=1).mean() / scale
        p0 = torch.softmax(agent.actor(agent.hidden(clean[:1])), -1).double().numpy()
        p = torch.softmax(agent.actor(agent.hidden(perturbed)), -1).double().numpy()
    assert result["spread"] == pytest.approx(spread, rel=1e-4)
    assert result["tv_distance"] == pytest.approx(0.5 * np.abs(p - p0).sum(1).mean(), rel=1e-4, abs=1e-7)


def test_tsne_figure_and_numbers_from_ppo_and_mdpo_checkpoints(tmp_path):
    ppo_dir = write_checkpoint(tmp_path / "ppo_run", "ppo")
    mdpo_dir = write_checkpoint(tmp_path / "mdpo_run", "mdpo", uniform_policy=True)
    summary = tsne.main(tsne.TsneArgs(checkpoints=[ppo_dir, mdpo_dir], copies=12, clean_frames=8, warmup_steps=3,
                                      out=str(tmp_path / "fig"), label="tiny"))
    assert [e["label"] for e in summary["encoders"]] == ["PPO", "MDPO"]
    assert summary["encoders"][1]["tv_distance"] == 0.0  # a uniform policy cannot move
    assert all(e["spread"] > 0 for e in summary["encoders"])
    assert (tmp_path / "fig" / "tsne_bigfish.png").stat().st_size > 0
    assert json.load(open(tmp_path / "fig" / "tsne_bigfish.json")) == summary


def test_tsne_refuses_checkpoints_of_different_games(tmp_path):
    a = write_checkpoint(tmp_path / "a", "ppo", game="bigfish")
    b = write_checkpoint(tmp_path / "b", "ppo", game="coinrun")
    with pytest.raises(SystemExit, match="different games"):
        tsne.main(tsne.TsneArgs(checkpoints=[a, b], figure=False, out=str(tmp_path / "fig")))


@pytest.mark.parametrize("settings, message", [
    ({"mdpo_agent": 0}, "--mdpo-agent must be 1 or 2, got 0"),  # would silently pick agent 2
    ({"copies": 2}, "--copies must be at least 3"),
    ({"clean_frames": 0}, "--clean-frames must be positive"),
    ({"labels": ["a", "b"]}, "one --labels entry per checkpoint"),
])
def test_tsne_refuses_bad_settings(tmp_path, settings, message):
    run_dir = write_checkpoint(tmp_path / "run", "mdpo")
    with pytest.raises(SystemExit, match=message):
        tsne.main(tsne.TsneArgs(checkpoints=[run_dir], figure=False, out=str(tmp_path / "fig"), **settings))


def test_tsne_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="unreadable"):
        tsne.main(tsne.TsneArgs(checkpoints=[str(path)], figure=False, out=str(tmp_path / "fig")))


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
