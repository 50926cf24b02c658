"""plot.py on tiny hand-written run directories: every number against a hand computation."""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

import plot
import run_data
from helpers import ROOT

STEP = 1000  # evaluations at 1000, 2000, ...


def write_run(root, script, game, seed, test, train=None, num_agents=2, cka=None, finished=None, name=None,
              step=STEP, **args):
    """A run directory as ppo.py / mdpo.py leave it. An MDPO run's agents log test +- offsets that cancel
    (their mean is `test`); `cka` goes to the run directory's own stream, as mdpo.py logs it."""
    method = name or args.get("exp_name", script)
    run_dir = os.path.join(root, f"{game}__{method}__{seed}")
    os.makedirs(run_dir)
    config_args = {"env_id": game, "exp_name": method, "seed": seed, **args}
    if script == "mdpo":
        config_args.setdefault("num_agents", num_agents)
    json.dump({"script": script, "args": config_args}, open(os.path.join(run_dir, "config.json"), "w"))
    k = config_args["num_agents"] if script == "mdpo" else 1
    offsets = [0.0] if k == 1 else np.linspace(-1, 1, k)
    event_dirs = [run_dir] if k == 1 else [os.path.join(run_dir, f"agent{i}") for i in range(1, k + 1)]
    for offset, event_dir in zip(offsets, event_dirs):
        writer = SummaryWriter(event_dir)
        for i, value in enumerate(test):
            writer.add_scalar("eval/test_return", value + offset, (i + 1) * step)
            if train is not None:
                writer.add_scalar("eval/train_return", train[i] + offset, (i + 1) * step)
        writer.close()
    if cka is not None:
        writer = SummaryWriter(run_dir)
        for i, value in enumerate(cka):
            writer.add_scalar("eval/debiased_cka", value, (i + 1) * STEP)
        writer.close()
    if finished is not None:
        json.dump({"global_step": len(test) * step, "iteration": len(test), "finished": finished},
                  open(os.path.join(run_dir, "status.json"), "w"))
    return run_dir


def plot_args(tmp_path, **kw):
    kw.setdefault("bootstrap_reps", 50)
    kw.setdefault("figures", False)  # drawing is slow; the figures are checked where they are the point
    return plot.PlotArgs(runs=[str(tmp_path / "runs")], out=str(tmp_path / "fig"), label="synthetic", **kw)


def loaded(runs):
    return plot.group(plot.named_runs([plot.load_run(d) for d in run_data.find_runs([str(runs)])]))


def drawn_figure(monkeypatch):
    drawn = {}
    monkeypatch.setattr(plot, "finish_curve_figure", lambda fig, *rest: drawn.update(fig=fig))
    return drawn


def table_cell(table, game, column):
    """The cell of `column` in the row of `game` of the markdown table whose header has that column."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| game") and f"| {column} |" in line)
    names = [c.strip() for c in lines[start].strip("|").split("|")]
    row = next(line for line in lines[start:] if line.startswith(f"| {game} "))
    return [c.strip() for c in row.strip("|").split("|")][names.index(column)]


# ---------------------------------------------------------------------------------------------
# The numbers of a whole call, at the step every run reached
# ---------------------------------------------------------------------------------------------


def test_plot_compares_every_run_at_the_step_all_reached_with_sample_std_and_welch(tmp_path):
    runs = tmp_path / "runs"
    ppo = {1: [1.0, 2.0, 4.0, 9.0], 2: [2.0, 3.0, 5.0, 9.0], 3: [0.0, 1.0, 3.0]}  # seed 3 stopped at 3,000
    mdpo = {1: [3.0, 5.0, 8.0, 20.0], 2: [4.0, 6.0, 7.5, 20.0], 3: [3.0, 4.0, 6.0, 20.0]}
    for seed in (1, 2, 3):
        write_run(runs, "ppo", "bigfish", seed, ppo[seed], train=[v + 2 for v in ppo[seed]])
        write_run(runs, "mdpo", "bigfish", seed, mdpo[seed], train=[v + 1 for v in mdpo[seed]])
    summary = plot.main(plot_args(tmp_path, figures=True))
    table = (tmp_path / "fig" / "final_test_returns.md").read_text()

    assert summary["compared_at"] == 3000  # the last step every run reached: the fourth values play no part
    assert "at 3,000 steps per agent (the last step all runs reached), 3 seeds, synthetic" in table
    ppo_at, mdpo_at = [4.0, 5.0, 3.0], [8.0, 7.5, 6.0]
    assert table_cell(table, "bigfish", "PPO") == f"{statistics.mean(ppo_at):.2f} ± {statistics.stdev(ppo_at):.2f} (3)"
    assert table_cell(table, "bigfish", "MDPO") == f"{statistics.mean(mdpo_at):.2f} ± {statistics.stdev(mdpo_at):.2f} (3)"

    # Welch's t-test by hand: t and the Welch-Satterthwaite degrees of freedom, p from Student's t.
    from scipy import stats

    va, vb = statistics.variance(mdpo_at) / 3, statistics.variance(ppo_at) / 3
    t = (statistics.mean(mdpo_at) - statistics.mean(ppo_at)) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    p = 2 * stats.t.sf(abs(t), df)
    assert summary["welch"]["bigfish"]["PPO"]["p"] == pytest.approx(p, rel=1e-9)
    assert table_cell(table, "bigfish", "MDPO vs PPO") == f"{p:.3f} (3 vs 3 seeds)"

    # Train minus test at the same step: PPO's train returns are 2 above its test returns, MDPO's 1.
    assert summary["generalization_gap"]["bigfish"]["PPO"] == pytest.approx([2.0, 2.0, 2.0])
    assert summary["generalization_gap"]["bigfish"]["MDPO"] == pytest.approx([1.0, 1.0, 1.0])
    for name in ("test_return", "aggregate", "improvement", "profiles", "generalization_gap"):
        assert (tmp_path / "fig" / f"{name}.png").stat().st_size > 0
    assert json.load(open(tmp_path / "fig" / "plot_summary.json"))["compared_at"] == 3000


def test_plot_finished_only_leaves_out_unfinished_runs(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "bigfish", 1, [1.0, 2.0, 3.0], finished=True)
    write_run(runs, "ppo", "bigfish", 2, [5.0], finished=False)  # preempted after one evaluation
    write_run(runs, "ppo", "bigfish", 3, [6.0, 7.0])  # no status.json yet: not known to be finished
    args = plot_args(tmp_path, finished_only=True)
    summary = plot.main(args)
    assert summary["compared_at"] == 3000
    assert "(finished runs), 1 seed, synthetic" in (tmp_path / "fig" / "final_test_returns.md").read_text()
    assert summary["aggregate"]["PPO"]["mean"][0] == pytest.approx((3.0 - 0) / 40)  # bigfish range (0, 40)


# ---------------------------------------------------------------------------------------------
# Reading runs: K agents, the x axis, the method from the config, resumed streams
# ---------------------------------------------------------------------------------------------


def test_load_run_averages_k_agents_and_scales_the_total_axis(tmp_path):
    run_dir = write_run(tmp_path, "mdpo", "bigfish", 1, [3.0, 6.0], num_agents=3, cka=[0.5, 0.7])
    # agent i logs test + (-1, 0, 1)[i]: check the streams are as written, then the mean of the three.
    np.testing.assert_allclose(run_data.read_scalars(os.path.join(run_dir, "agent3"), ["eval/test_return"])
                               ["eval/test_return"][1], [4.0, 7.0])
    run = plot.load_run(run_dir)
    steps, values = run["curves"]["eval/test_return"]
    np.testing.assert_array_equal(steps, [1000, 2000])
    np.testing.assert_allclose(values, [3.0, 6.0])
    assert len(run["agent_curves"]["eval/test_return"]) == 3
    np.testing.assert_allclose(run["curves"]["eval/debiased_cka"][1], [0.5, 0.7])
    total = plot.load_run(run_dir, x_axis="total")
    np.testing.assert_array_equal(total["curves"]["eval/test_return"][0], [3000, 6000])  # 3 agents x 1000
    np.testing.assert_array_equal(total["curves"]["eval/debiased_cka"][0], [3000, 6000])
    ppo_dir = write_run(tmp_path, "ppo", "bigfish", 1, [1.0])
    np.testing.assert_array_equal(plot.load_run(ppo_dir, x_axis="total")["curves"]["eval/test_return"][0], [1000])


def test_x_axis_total_compares_mdpo_and_ppo_at_equal_samples(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "bigfish", 1, [4.0, 8.0, 12.0, 16.0])
    write_run(runs, "mdpo", "bigfish", 1, [10.0, 20.0, 30.0, 40.0])
    per_agent = plot.main(plot_args(tmp_path))
    assert per_agent["compared_at"] == 4000 and per_agent["aggregate"]["MDPO"]["mean"][0] == pytest.approx(1.0)
    total = plot.main(plot_args(tmp_path, x_axis="total"))
    # 4,000 samples: PPO's last evaluation, MDPO's at 2,000 steps per agent (two agents).
    assert total["compared_at"] == 4000
    assert total["aggregate"]["MDPO"]["mean"][0] == pytest.approx(20.0 / 40)
    assert total["aggregate"]["PPO"]["mean"][0] == pytest.approx(16.0 / 40)
    assert "environment steps of all agents" in (tmp_path / "fig" / "final_test_returns.md").read_text()


def test_ppo_2x_meets_the_others_at_the_end_of_training_on_the_per_agent_axis(tmp_path):
    # ppo_2x takes twice PPO's samples per iteration: its evaluations at 2,000 ... 8,000 of its steps are the
    # iterations at which PPO and MDPO's agents evaluate at 1,000 ... 4,000 steps each.
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "bigfish", 1, [4.0, 8.0, 12.0, 16.0], train=[5.0, 9.0, 13.0, 17.0])
    write_run(runs, "mdpo", "bigfish", 1, [10.0, 20.0, 30.0, 40.0], train=[11.0, 21.0, 31.0, 41.0])
    write_run(runs, "ppo", "bigfish", 1, [5.0, 10.0, 15.0, 20.0], train=[6.0, 12.0, 18.0, 24.0], name="ppo_2x",
              step=2 * STEP, num_envs=128)
    curves = plot.load_run(str(runs / "bigfish__ppo_2x__1"))["curves"]
    for tag in ("eval/test_return", "eval/train_return"):
        np.testing.assert_array_equal(curves[tag][0], [1000, 2000, 3000, 4000])
    per_agent = plot.main(plot_args(tmp_path))
    assert per_agent["compared_at"] == 4000  # the end of every run: ppo_2x at its 8,000 steps, not half way
    assert per_agent["generalization_gap"]["bigfish"]["PPO 2x samples"] == [pytest.approx(24.0 - 20.0)]
    assert per_agent["aggregate"]["PPO 2x samples"]["mean"][0] == pytest.approx(20.0 / 40)
    assert per_agent["aggregate"]["MDPO"]["mean"][0] == pytest.approx(40.0 / 40)
    table = (tmp_path / "fig" / "final_test_returns.md").read_text()
    assert "PPO 2x samples drawn at 1/2 of its own steps" in table and table_cell(table, "bigfish", "PPO 2x samples") == "20.00 (1)"
    total = plot.main(plot_args(tmp_path, x_axis="total"))
    # the total axis draws its own steps: at 4,000 samples each, PPO's last, MDPO's and ppo_2x's second evaluation
    assert total["compared_at"] == 4000
    assert total["aggregate"]["PPO 2x samples"]["mean"][0] == pytest.approx(10.0 / 40)
    assert total["aggregate"]["MDPO"]["mean"][0] == pytest.approx(20.0 / 40)
    assert "of its own steps" not in (tmp_path / "fig" / "final_test_returns.md").read_text()


def test_runs_are_grouped_by_what_their_config_ran_not_their_name(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "bigfish", 1, [1.0], name="ppo")
    write_run(runs, "ppo", "bigfish", 2, [1.0], name="ppo", l2_coef=1e-4)  # --l2-coef without --exp-name
    write_run(runs, "mdpo", "bigfish", 1, [1.0], name="mdpo", alpha=0.0)
    methods = {os.path.basename(d): plot.load_run(d)["method"] for d in run_data.find_runs([str(runs)])}
    assert methods == {"bigfish__ppo__1": "PPO", "bigfish__ppo__2": "PPO + L2", "bigfish__mdpo__1": "MDPO α=0"}


def test_a_step_logged_twice_keeps_the_later_value(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    for step, value in ((1000, 1.0), (2000, 2.0), (2000, 5.0), (3000, 6.0)):  # 2000 again after a resume
        writer.add_scalar("eval/test_return", value, step)
    writer.close()
    steps, values = run_data.read_scalars(str(tmp_path), ["eval/test_return"])["eval/test_return"]
    np.testing.assert_array_equal(steps, [1000, 2000, 3000])
    np.testing.assert_array_equal(values, [1.0, 5.0, 6.0])


def test_value_at_takes_the_last_evaluation_at_or_before_the_step():
    run = {"dir": "r", "curves": {"eval/test_return": (np.array([1000, 3000, 5000]), np.array([1.0, 3.0, 5.0]))}}
    assert plot.value_at(run, "eval/test_return", 3000) == 3.0
    assert plot.value_at(run, "eval/test_return", 4999) == 3.0
    assert plot.value_at(run, "eval/test_return", 6000) == 5.0


def test_a_run_without_an_evaluation_by_the_compared_step_is_a_one_line_error(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "bigfish", 1, [1.0])  # stopped after its evaluation at 1,000
    write_run(runs, "ppo", "bigfish", 2, [2.0, 3.0], step=2 * STEP)  # evaluates every 2,000
    with pytest.raises(plot.UsageError, match=r"bigfish__ppo__2 has no eval/test_return at or before step 1,000, "
                                              r"where the runs are compared \(its first is at 2,000\)"):
        plot.main(plot_args(tmp_path))


def test_a_ppo_2x_run_without_an_evaluation_where_the_reference_is_read_says_so(tmp_path):
    # Per agent both runs reach 1,000; at their own steps, where the band is read, ppo_2x's first is at 2,000.
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "bigfish", 1, [1.0], **REFERENCE_TASK)
    write_run(runs, "ppo", "bigfish", 1, [2.0], name="ppo_2x", step=2 * STEP, num_envs=128, **REFERENCE_TASK)
    reference = write_reference(tmp_path / "ref.csv", three_runs("bigfish", [0, 4000], [[0, 4]] * 3))
    assert plot.main(plot_args(tmp_path))["compared_at"] == 1000
    with pytest.raises(plot.UsageError, match=r"ppo_2x__1 has no eval/test_return at or before step 1,000, "
                                              r"where the reference is read \(each run's own steps\)"):
        plot.main(plot_args(tmp_path, reference=reference))


def test_seeds_are_taken_in_numeric_order(tmp_path):
    # normalised_scores keeps the lowest-numbered seeds a method has on every game (rliable needs as many on
    # each): seed 2 on bigfish, not seed 10, which sorts first as text.
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "bigfish", 10, [40.0])
    write_run(runs, "ppo", "bigfish", 2, [20.0])
    write_run(runs, "ppo", "starpilot", 2, [1.5])
    grouped = loaded(runs)
    assert [run["seed"] for run in grouped["bigfish"]["PPO"]] == [2, 10]
    np.testing.assert_allclose(plot.normalised_scores(grouped, ["PPO"], ["bigfish", "starpilot"], 1000)["PPO"],
                               [[20 / 40, 0.0]])


def test_agents_mean_averages_every_agent_at_the_steps_all_of_them_logged():
    # K = 3 agents; the second did not log 2,000. At 1,000 they log 0, 0, 3 (mean 1, median 0); at 3,000 0, 0, 6.
    per_agent = [(np.array([1000, 2000, 3000]), np.array([0.0, 2.0, 0.0])),
                 (np.array([1000, 3000]), np.array([0.0, 0.0])),
                 (np.array([1000, 2000, 3000]), np.array([3.0, 9.0, 6.0]))]
    steps, values = run_data.agents_mean(per_agent)
    np.testing.assert_array_equal(steps, [1000, 3000])
    np.testing.assert_allclose(values, [1.0, 2.0])


def test_mean_std_curve_stops_where_the_shortest_curve_ends_and_averages_three_seeds():
    steps, mean, std = plot.mean_std_curve([(np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0])),
                                            (np.array([1, 2]), np.array([3.0, 4.0]))])
    np.testing.assert_array_equal(steps, [1, 2])
    np.testing.assert_allclose(mean, [2.0, 3.0])
    np.testing.assert_allclose(std, [np.sqrt(2), np.sqrt(2)])
    # three seeds at 0, 0, 3: mean 1 (median 0), sample std sqrt(3)
    curves = [(np.array([1, 2]), np.array([v, v])) for v in (0.0, 0.0, 3.0)]
    _, mean, std = plot.mean_std_curve(curves)
    np.testing.assert_allclose(mean, [1.0, 1.0])
    np.testing.assert_allclose(std, [statistics.stdev([0.0, 0.0, 3.0])] * 2)


# ---------------------------------------------------------------------------------------------
# Statistics against hand computations
# ---------------------------------------------------------------------------------------------


def test_iqm_mean_and_median_match_a_hand_computation():
    # 4 seeds x 3 games. Sorted, the 12 scores are 0 0 0 0 .1 .2 .4 .4 .5 .6 .9 2; the IQM drops 3 at each
    # end: (0 + .1 + .2 + .4 + .4 + .5) / 6. Per-game means .3, .875, .1: the median is .3, the mean 5.1 / 12.
    scores = {"X": np.array([[0.0, 0.4, 0.0], [0.1, 0.5, 0.0], [0.2, 0.6, 0.0], [0.9, 2.0, 0.4]])}
    estimates, intervals = plot.aggregate_estimates(scores, reps=200, seed=0)
    np.testing.assert_allclose(estimates["X"], [1.6 / 6, 5.1 / 12, 0.3], rtol=1e-12)
    assert intervals["X"].shape == (2, 3) and np.all(intervals["X"][0] <= intervals["X"][1])


def test_bootstrap_intervals_are_stratified_by_game_percentile_and_seeded():
    # One game, two seeds scoring 0 and 1: a resample's mean is 0, .5 or 1 with chance 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% percentiles are exactly 0 and 1.
    _, intervals = plot.aggregate_estimates({"X": np.array([[0.0], [1.0]])}, reps=2000, seed=0)
    np.testing.assert_array_equal(intervals["X"][:, 1], [0.0, 1.0])
    # Two games, each with equal seeds: resampling seeds within a game cannot move any estimate
    # (resampling runs across games would).
    _, intervals = plot.aggregate_estimates({"X": np.array([[0.0, 1.0], [0.0, 1.0]])}, reps=500, seed=0)
    np.testing.assert_allclose(intervals["X"][:, 1], [0.5, 0.5])
    # The same seed gives the same intervals; numpy's global generator is left as it was.
    scores = {"X": np.random.default_rng(1).uniform(size=(5, 3))}
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = plot.aggregate_estimates(scores, reps=300, seed=7)[1]["X"]
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    np.testing.assert_array_equal(first, plot.aggregate_estimates(scores, reps=300, seed=7)[1]["X"])
    assert not np.array_equal(first, plot.aggregate_estimates(scores, reps=300, seed=8)[1]["X"])


def test_probability_of_improvement_matches_a_hand_count():
    # Game 1: MDPO 3 5 1 against 2 4 0: of the 9 pairs MDPO wins 2 + 3 + 1 = 6.
    # Game 2: MDPO 1 1 1 against 1 2 0: each MDPO run ties one (1/2), loses one, wins one: 4.5 of 9.
    # P(MDPO > other) = (6/9 + 4.5/9) / 2 = 7/12.
    scores = {"MDPO": np.array([[3.0, 1.0], [5.0, 1.0], [1.0, 1.0]]),
              "PPO": np.array([[2.0, 1.0], [4.0, 2.0], [0.0, 0.0]])}
    estimates, intervals = plot.improvement_estimates(scores, reps=200, seed=0)
    assert set(estimates) == {"PPO"}
    assert float(estimates["PPO"]) == pytest.approx(7 / 12, rel=1e-12)
    low, high = np.ravel(intervals["PPO"])
    assert 0 <= low <= 7 / 12 <= high <= 1


def test_performance_profile_counts_the_runs_above_each_threshold():
    scores = {"X": np.array([[0.1, 0.5], [0.3, 0.9]])}
    profiles, _ = plot.performance_profiles(scores, np.array([0.0, 0.2, 0.5, 1.0]), reps=50, seed=0)
    np.testing.assert_allclose(profiles["X"], [1.0, 0.75, 0.25, 0.0])  # strictly above tau


def test_normalised_scores_use_the_hard_mode_range_at_the_compared_step(tmp_path):
    runs = tmp_path / "runs"
    for seed, values in ((1, [10.0, 20.0]), (2, [30.0, 40.0]), (3, [0.0, 4.0])):
        write_run(runs, "ppo", "bigfish", seed, values)
    for seed, values in ((1, [1.5, 35.0]), (2, [18.25, 1.5])):
        write_run(runs, "ppo", "starpilot", seed, values)
    grouped = loaded(runs)
    scores = plot.normalised_scores(grouped, ["PPO"], ["bigfish", "starpilot"], step=1000)
    # bigfish (0, 40), starpilot (1.5, 35); two seeds on every game: the lowest-numbered two.
    np.testing.assert_allclose(scores["PPO"], [[10 / 40, 0.0], [30 / 40, 0.5]])
    scores = plot.normalised_scores(grouped, ["PPO"], ["bigfish", "starpilot"], step=2000)
    np.testing.assert_allclose(scores["PPO"], [[20 / 40, 1.0], [40 / 40, 0.0]])


def test_gap_is_train_minus_test():
    run = {"dir": "r", "curves": {"eval/test_return": (np.array([1000]), np.array([3.0])),
                                  "eval/train_return": (np.array([1000]), np.array([7.5]))}}
    assert plot.gaps_at({"g": {"M": [run]}}, "g", "M", 1000) == [4.5]


def test_sample_std_and_the_table_cells():
    assert plot.sample_std([1.0, 2.0, 4.0]) == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    assert np.isnan(plot.sample_std([1.0]))
    assert plot.mean_std_cell([2.0]) == "2.00 (1)"
    assert plot.p_cell(None, 1, 3) == "n/a (1 vs 3 seeds)"
    assert np.isnan(plot.welch_p([1.0], [2.0, 3.0]))
    assert table_cell(two_vs_three_seeds_table(), "bigfish", "MDPO vs PPO").endswith("(2 vs 3 seeds)")


def evaluated_once(value):
    return {"dir": "r", "curves": {"eval/test_return": (np.array([1000]), np.array([value]))}}


def two_vs_three_seeds_table():
    grouped = {"bigfish": {"PPO": [evaluated_once(v) for v in (1.0, 2.0, 3.0)],
                           "MDPO": [evaluated_once(v) for v in (4.0, 6.0)]}}
    return plot.final_table(grouped, ["PPO", "MDPO"], 1000, "t")[0]


@pytest.mark.filterwarnings("ignore:Precision loss")  # scipy's note on the sample without variance
def test_welch_p_against_scipy_free_arithmetic_and_nan_without_variance():
    # MDPO 1 1 1 (no variance) against 2 3 4 (variance 1): t = (1 - 3) / sqrt(1/3), all degrees of freedom
    # from the second sample: df = (1/3)^2 / ((1/3)^2 / 2) = 2. For 2 df, P(|T| > |t|) = 1 - |t| / sqrt(2 + t^2).
    t = 2 / np.sqrt(1 / 3)
    assert plot.welch_p([1.0, 1.0, 1.0], [2.0, 3.0, 4.0]) == pytest.approx(1 - t / np.sqrt(2 + t * t), rel=1e-9)
    assert np.isnan(plot.welch_p([1.0, 1.0], [2.0, 2.0]))  # no variance on either side: no test (scipy says p = 0)


def test_hard_mode_ranges_are_the_procgen_papers():
    # Cobbe et al. 2020, appendix, normalisation constants (R_min, R_max) for hard mode.
    assert plot.HARD_MODE_RANGES == {
        "bigfish": (0, 40), "bossfight": (0.5, 13), "caveflyer": (2, 13.4), "chaser": (0.5, 14.2),
        "climber": (1, 12.6), "coinrun": (5, 10), "dodgeball": (1.5, 19), "fruitbot": (-0.5, 27.2),
        "heist": (2, 10), "jumper": (1, 10), "leaper": (1.5, 10), "maze": (4, 10), "miner": (1.5, 20),
        "ninja": (2, 10), "plunder": (3, 30), "starpilot": (1.5, 35)}


def test_the_summary_names_each_estimate_and_its_interval():
    # aggregate_estimates returns [IQM, mean, median] and a [2 x 3] interval (order checked by hand above)
    stats = {"games_covered": ["g"], "seeds": {"M": 2},
             "aggregate": ({"M": np.array([0.1, 0.2, 0.3])}, {"M": np.array([[0.0, 0.1, 0.2], [0.5, 0.6, 0.7]])}),
             "improvement": ({"PPO": 0.75}, {"PPO": np.array([[0.5], [1.0]])})}
    summary = plot.summarise(stats, ["M"])
    assert summary["aggregate"]["M"] == {"IQM": [0.1, 0.0, 0.5], "mean": [0.2, 0.1, 0.6], "median": [0.3, 0.2, 0.7]}
    assert summary["probability_of_improvement"] == {"PPO": [0.75, 0.5, 1.0]}


def test_the_profile_thresholds_run_from_0_to_1_and_further_to_take_in_every_score(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "bigfish", 1, [8.0])  # normalised 0.2
    write_run(runs, "ppo", "bigfish", 2, [16.0])  # 0.4
    grouped = loaded(runs)
    taus = plot.rliable_statistics(grouped, ["PPO"], 1000, plot_args(tmp_path))["taus"]
    assert (taus[0], taus[-1], len(taus)) == (0.0, 1.0, 101)  # from 0 to 1 at least
    write_run(runs, "ppo", "bigfish", 3, [-10.0])  # -0.25
    write_run(runs, "ppo", "bigfish", 4, [60.0])  # 1.5
    grouped = loaded(runs)
    taus = plot.rliable_statistics(grouped, ["PPO"], 1000, plot_args(tmp_path))["taus"]
    assert (taus[0], taus[-1]) == (pytest.approx(-0.25), pytest.approx(1.5))  # and every score inside


def test_gap_bars_are_the_mean_over_seeds(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(plot, "save", lambda fig, out, name, *dpi: drawn.update(fig=fig))
    plot.plot_gap({"bigfish": {"PPO": [0.0, 0.0, 3.0]}}, ["PPO"], "t", str(tmp_path))
    [bar] = drawn["fig"].axes[0].patches
    assert bar.get_height() == pytest.approx(1.0)
    plot.plt.close(drawn["fig"])  # save() would have closed it


# ---------------------------------------------------------------------------------------------
# The representation-CKA figure
# ---------------------------------------------------------------------------------------------


def test_cka_figure_from_the_runs_that_log_it_and_a_note_when_none(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "bigfish", 1, [1.0, 2.0])
    write_run(runs, "mdpo", "starpilot", 1, [1.0, 2.0])  # an MDPO run from before the CKA was logged
    grouped = loaded(runs)
    assert not plot.plot_cka(grouped, "agent", "synthetic", str(tmp_path / "fig"))
    assert not (tmp_path / "fig" / "representation_cka.png").exists()

    for seed, cka in ((1, [0.2, 0.6]), (2, [0.4, 0.8])):
        write_run(runs, "mdpo", "bigfish", seed, [1.0, 2.0], cka=cka)
        write_run(runs, "mdpo", "bigfish", seed, [1.0, 2.0], cka=[0.1, 0.2], name="mdpo_alpha0", alpha=0.0)
    grouped = loaded(runs)
    curves = [run["curves"]["eval/debiased_cka"] for run in grouped["bigfish"]["MDPO"]]
    steps, mean, std = plot.mean_std_curve(curves)
    np.testing.assert_allclose(mean, [0.3, 0.7])
    np.testing.assert_allclose(std, [statistics.stdev([0.2, 0.4]), statistics.stdev([0.6, 0.8])])
    assert plot.plot_cka(grouped, "agent", "synthetic", str(tmp_path / "fig"))
    assert (tmp_path / "fig" / "representation_cka.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_plot_refuses_mixed_distribution_modes(tmp_path):
    write_run(tmp_path / "runs", "ppo", "bigfish", 1, [1.0], distribution_mode="hard")
    write_run(tmp_path / "runs", "ppo", "bigfish", 2, [1.0], distribution_mode="easy")
    with pytest.raises(plot.UsageError, match=r"mix distribution modes \(easy: 1 runs, hard: 1 runs\)"):
        plot.main(plot_args(tmp_path))


def test_plot_refuses_when_no_game_has_every_method(tmp_path):
    write_run(tmp_path / "runs", "ppo", "bigfish", 1, [1.0])
    write_run(tmp_path / "runs", "mdpo", "starpilot", 1, [1.0])
    with pytest.raises(plot.UsageError, match="no game has runs of every method"):
        plot.main(plot_args(tmp_path))
    assert not (tmp_path / "fig").exists()  # refused before drawing anything
    summary = plot.main(plot_args(tmp_path, methods=["mdpo"]))
    assert summary["games_covered"] == ["starpilot"]


def test_plot_says_bad_input_in_one_line_with_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "plot.py", "--runs", str(tmp_path), "--out", str(tmp_path / "fig")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no evaluated runs under {tmp_path}"


def test_plot_finds_only_runs_and_says_which_it_skips(tmp_path, capsys):
    write_run(tmp_path / "runs", "ppo", "bigfish", 1, [1.0], train=[2.0])
    (tmp_path / "runs" / "other_tool").mkdir()
    (tmp_path / "runs" / "other_tool" / "config.json").write_text('{"model": "not ours"}')
    (tmp_path / "runs" / "torn").mkdir()
    (tmp_path / "runs" / "torn" / "config.json").write_text('{"script": "pp')
    assert run_data.find_runs([str(tmp_path / "runs")]) == [str(tmp_path / "runs" / "bigfish__ppo__1")]
    assert "skipping " + str(tmp_path / "runs" / "torn") in capsys.readouterr().err
    with pytest.raises(plot.UsageError, match="--bootstrap-reps must be positive"):
        plot.main(plot_args(tmp_path, bootstrap_reps=0))
    with pytest.raises(plot.UsageError, match="no runs of PPO \\+ L2; the runs hold: PPO"):
        plot.main(plot_args(tmp_path, methods=["ppo_l2"]))


def test_a_run_reached_twice_counts_once_and_a_copy_of_a_seed_is_refused_naming_both(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        write_run(runs, "ppo", "bigfish", seed, [1.0 + seed])
        write_run(runs, "mdpo", "bigfish", seed, [3.0 + seed])
    once = run_data.find_runs([str(runs)])
    assert run_data.find_runs([str(runs), str(runs), str(runs / "bigfish__ppo__1")]) == once  # each once
    summary = plot.main(dataclasses.replace(plot_args(tmp_path), runs=[str(runs), str(runs)]))
    assert summary["welch"]["bigfish"]["PPO"]["seeds_mdpo"] == 2 and summary["seeds"] == {"PPO": 2, "MDPO": 2}
    shutil.copytree(runs / "bigfish__ppo__1", tmp_path / "export" / "bigfish__ppo__1")  # as export.py copies it
    copies = f"{tmp_path / 'export' / 'bigfish__ppo__1'} and {runs / 'bigfish__ppo__1'}"  # in path order
    with pytest.raises(plot.UsageError, match=re.escape(copies + " are both seed 1 of PPO on bigfish with the same "
                       "settings (--bf16 and --compile aside): one seed, not two")):
        plot.main(dataclasses.replace(plot_args(tmp_path), runs=[str(runs), str(tmp_path / "export")]))


def test_a_config_without_the_game_or_seed_is_skipped_naming_it(tmp_path, capsys):
    runs = tmp_path / "runs"
    for name, config in (("no_keys", {"script": "ppo", "args": {}}), ("text_seed", {"script": "mdpo", "args": {
            "env_id": "bigfish", "seed": "1"}}), ("a_list", [1, 2])):
        (runs / name).mkdir(parents=True)
        (runs / name / "config.json").write_text(json.dumps(config))
    assert run_data.find_runs([str(runs)]) == []
    err = capsys.readouterr().err.splitlines()
    assert f"skipping {runs / 'no_keys'}: its config.json lacks env_id (str), seed (int) in its args" in err
    assert f"skipping {runs / 'text_seed'}: its config.json lacks seed (int) in its args" in err
    assert f"skipping {runs / 'a_list'}: its config.json is not a JSON object" in err


@pytest.mark.parametrize("status", ["{bad", "[1, 2]", "\xff"])
def test_a_status_json_that_is_not_a_json_object_is_one_line_naming_it(tmp_path, status):
    run_dir = write_run(tmp_path / "runs", "ppo", "bigfish", 1, [1.0], finished=True)
    with open(os.path.join(run_dir, "status.json"), "w", encoding="latin-1") as f:
        f.write(status)
    with pytest.raises(plot.UsageError, match="^" + re.escape(os.path.join(run_dir, "status.json")) + " is not a JSON "
                       "object: resume the run to rewrite it"):
        plot.main(plot_args(tmp_path))
    assert not (tmp_path / "fig").exists()


def events_file(event_dir):
    name, = [name for name in os.listdir(event_dir) if "tfevents" in name]
    return os.path.join(event_dir, name)


def test_event_file_damage_tells_a_record_cut_short_from_bytes_that_are_no_record(tmp_path):
    path = events_file(write_run(tmp_path, "ppo", "bigfish", 1, [1.0, 2.0]))
    data = open(path, "rb").read()
    assert run_data.event_file_damage(path) is None
    for cut in (len(data) - 1, len(data) - 20, 5):  # inside the last record, and inside the first one's header
        open(path, "wb").write(data[:cut])
        assert run_data.event_file_damage(path)[0] == "partial"
    open(path, "wb").write(bytes(range(256)) * 2)
    assert run_data.event_file_damage(path) == ("corrupt", 0)
    open(path, "wb").write(data + b"\x00" * 40)  # zeros after the records, as a crash leaves them: nothing lost
    assert run_data.event_file_damage(path) == ("partial", len(data))
    open(path, "wb").write(data + b"\x00" * 40 + b"\x01")
    assert run_data.event_file_damage(path) == ("corrupt", len(data))


def test_a_corrupt_event_file_is_named_and_read_up_to_the_damage(tmp_path, capsys):
    run_dir = write_run(tmp_path / "runs", "ppo", "bigfish", 1, [1.0, 2.0])
    path = events_file(run_dir)
    data = open(path, "rb").read()
    open(path, "ab").write(np.random.default_rng(0).bytes(500))
    [[run]] = loaded(tmp_path / "runs")["bigfish"].values()
    assert run["curves"][run_data.TEST][1].tolist() == [1.0, 2.0]
    assert (f"warning: {path} is corrupt from byte {len(data):,} on (no TensorBoard record there): its scalars after "
            "that are not read") in capsys.readouterr().err
    open(path, "wb").write(np.random.default_rng(0).bytes(500))  # nothing readable: not "no evaluation logged yet"
    assert loaded(tmp_path / "runs") == {}
    assert (f"skipping {run_dir}: no {run_data.TEST} in the complete records of its event files; {path} is corrupt "
            "from byte 0 on") in capsys.readouterr().err


def test_a_record_cut_short_is_read_up_to_the_cut_and_named_where_nothing_is_left(tmp_path, capsys):
    run_dir = write_run(tmp_path / "runs", "ppo", "bigfish", 1, [1.0, 2.0, 3.0])
    path = events_file(run_dir)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-3])  # the last evaluation's record is being written
    [[run]] = loaded(tmp_path / "runs")["bigfish"].values()
    assert run["curves"][run_data.TEST][1].tolist() == [1.0, 2.0]
    open(path, "wb").write(data[:60])  # cut inside the first evaluation's record
    assert loaded(tmp_path / "runs") == {}
    assert (f"skipping {run_dir}: no {run_data.TEST} in the complete records of its event files; {path} ends in a "
            "record cut short (being written now, or the writer was killed or the file truncated)"
            in capsys.readouterr().err)


def test_an_mdpo_run_without_an_agents_stream_says_so(tmp_path, capsys):
    run_dir = write_run(tmp_path / "runs", "mdpo", "bigfish", 1, [3.0, 6.0])
    shutil.rmtree(os.path.join(run_dir, "agent2"))
    assert loaded(tmp_path / "runs") == {}
    assert (f"skipping {run_dir}: the event stream of its agent2 is missing (no directory), so its agents have no "
            f"mean {run_data.TEST}" in capsys.readouterr().err)
    write_run(tmp_path / "runs", "ppo", "bigfish", 1, [])  # a run that has not evaluated yet keeps its message
    loaded(tmp_path / "runs")
    assert f"skipping {tmp_path / 'runs' / 'bigfish__ppo__1'}: no {run_data.TEST} logged yet" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# --reference: OpenAI's published PPO band under our curves
# ---------------------------------------------------------------------------------------------

REFERENCE_TASK = {"distribution_mode": "hard", "num_levels": 500, "start_level": 0}


def write_reference(path, rows, header=("# a header line, kept as in the published file",)):
    """A reference CSV: rows of (game, split, run, steps, return)."""
    lines = list(header) + ["game,split,run,steps,return"] + [",".join(map(str, row)) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def three_runs(game, steps, returns_by_run, split="test"):
    return [(game, split, run, s, r) for run, returns in enumerate(returns_by_run) for s, r in zip(steps, returns)]


def test_read_reference_keeps_the_test_split_of_each_run_and_skips_the_header(tmp_path):
    rows = three_runs("bigfish", [2000, 1000], [[2.0, 1.0], [4.0, 3.0], [6.0, 5.0]])
    rows += three_runs("bigfish", [1000, 2000], [[9.0, 9.0]] * 3, split="train")
    reference = plot.read_reference(write_reference(tmp_path / "ref.csv", rows))
    assert list(reference) == ["bigfish"] and len(reference["bigfish"]) == 3
    steps, values = reference["bigfish"][1]
    assert steps.tolist() == [1000, 2000] and values.tolist() == [3.0, 4.0]  # sorted by step, train rows left out


def test_read_reference_refuses_what_is_not_one(tmp_path):
    with pytest.raises(plot.UsageError, match="columns"):
        plot.read_reference(write_reference(tmp_path / "a.csv", [], header=()))
    bad = tmp_path / "b.csv"
    bad.write_text("game,split,run,steps,return\nbigfish,test,0,many,1.0\n")
    with pytest.raises(plot.UsageError, match="not game,split,run,steps,return"):
        plot.read_reference(str(bad))
    with pytest.raises(plot.UsageError, match="cannot read"):
        plot.read_reference(str(tmp_path / "missing.csv"))


def test_reference_band_interpolates_each_run_then_takes_min_mean_max():
    curves = [(np.array([100, 300]), np.array([0.0, 2.0])), (np.array([100, 300]), np.array([4.0, 0.0])),
              (np.array([100, 200, 300]), np.array([1.0, 5.0, 1.0]))]
    low, mean, high = plot.reference_band(curves, [50, 200, 300, 400])
    # at 200 the runs are 1.0, 2.0, 5.0; at 300 they are 2.0, 0.0, 1.0; 50 and 400 lie outside every run
    assert np.isnan(low[0]) and np.isnan(high[3]) and np.isnan(mean[3])
    np.testing.assert_allclose([low[1], mean[1], high[1]], [1.0, 8.0 / 3, 5.0])
    np.testing.assert_allclose([low[2], mean[2], high[2]], [0.0, 1.0, 2.0])


def test_reference_check_says_where_our_mean_lies_at_equal_steps(tmp_path):
    runs = tmp_path / "runs"
    # ours: evaluations at 1000..4000; the two seeds' mean is 1, 3, 5, 7
    write_run(runs, "ppo", "bigfish", 1, [0.0, 2.0, 5.0, 8.0], **REFERENCE_TASK)
    write_run(runs, "ppo", "bigfish", 2, [2.0, 4.0, 5.0, 6.0], **REFERENCE_TASK)
    write_run(runs, "mdpo", "bigfish", 1, [9.0, 9.0, 9.0, 9.0], **REFERENCE_TASK)
    # the band from 2000 on: min 2, 4, 6 and max 4, 6, 8 at 2000, 3000, 4000 (mean = the middle run)
    ref = write_reference(tmp_path / "ref.csv", three_runs("bigfish", [2000, 3000, 4000],
                                                           [[2.0, 4.0, 6.0], [3.0, 5.0, 7.0], [4.0, 6.0, 8.0]]))
    summary = plot.main(plot_args(tmp_path, reference=ref))
    ppo, mdpo = summary["reference"]["games"]["bigfish"]["PPO"], summary["reference"]["games"]["bigfish"]["MDPO"]
    assert ppo["ours"] == 7.0 and ppo["band"] == [6.0, 7.0, 8.0] and ppo["where"] == "within"
    # 1000: before the reference; 2000: 3 within [2, 4]; 3000: 5 within [4, 6]; 4000: 7 within [6, 8]
    assert ppo["evaluations"] == {"below": 0, "within": 3, "above": 0, "no reference": 1}
    assert mdpo["where"] == "above" and mdpo["evaluations"]["above"] == 3
    table = (tmp_path / "fig" / "reference_check.md").read_text()
    assert "| bigfish | 4,000 | PPO | 2 | 7.00 | within (6.00 / 7.00 / 8.00) | 0 / 3 / 0 |" in table
    assert summary["reference"]["hyperparameter_differences"] == []


def test_reference_check_counts_each_methods_and_seeds_evaluations_over_the_whole_run(tmp_path):
    # A GPU slice: PPO runs on past the step where MDPO stopped; the README's counts cover all of it.
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "bigfish", 1, [0.0, 5.0, 4.5, 7.0, 9.0], **REFERENCE_TASK)  # 1000 ... 5000
    write_run(runs, "ppo", "bigfish", 2, [0.0, 1.0, 4.5, 5.2], **REFERENCE_TASK)  # 1000 ... 4000
    write_run(runs, "mdpo", "bigfish", 1, [9.0, 9.0], **REFERENCE_TASK)  # 1000, 2000: compared at 2000
    # published rows at 2000 and 6000; the band at s is [s / 1000, s / 1000 + 2], none at 1000 (before the
    # first row)
    ref = write_reference(tmp_path / "ref.csv", three_runs("bigfish", [2000, 6000], [[2.0, 6.0], [3.0, 7.0],
                                                                                       [4.0, 8.0]]))
    games = plot.main(plot_args(tmp_path, reference=ref))["reference"]["games"]["bigfish"]
    ppo, mdpo = games["PPO"]["whole_run"], games["MDPO"]["whole_run"]
    assert games["PPO"]["step"] == 2000 and games["PPO"]["evaluations"]["within"] == 1  # the mean 3 in [2, 4]
    # seed 1: 5 above [2, 4], 4.5 within [3, 5], 7 above [4, 6], 9 above [5, 7]
    assert ppo["per_seed"][0] == {"seed": 1, "step": 5000, "below": 0, "within": 1, "above": 3, "no reference": 1}
    # seed 2: 1 below [2, 4], 4.5 within, 5.2 within [4, 6]
    assert ppo["per_seed"][1] == {"seed": 2, "step": 4000, "below": 1, "within": 2, "above": 0, "no reference": 1}
    # the mean to 4000, where seed 2 ends: 3, 4.5, 6.1: within, within, above [4, 6]
    assert ppo["mean"] == {"step": 4000, "below": 0, "within": 2, "above": 1, "no reference": 1}
    assert mdpo["mean"] == {"step": 2000, "below": 0, "within": 0, "above": 1, "no reference": 1}
    table = (tmp_path / "fig" / "reference_check.md").read_text()
    assert "| bigfish | PPO | mean of 2 seeds | 4,000 | 0 / 2 / 1 |" in table
    assert "| bigfish | PPO | seed 1 | 5,000 | 0 / 1 / 3 |" in table
    assert "| bigfish | PPO | seed 2 | 4,000 | 1 / 2 / 0 |" in table
    assert "| bigfish | MDPO | seed 1 | 2,000 | 0 / 0 / 1 |" in table  # one seed: no mean row
    assert "MDPO | mean of" not in table


def test_reference_compares_each_game_at_the_last_step_its_own_runs_reached(tmp_path):
    runs = tmp_path / "runs"  # two games from two GPU slices of different lengths
    write_run(runs, "ppo", "bigfish", 1, [1.0, 2.0, 3.0, 4.0], **REFERENCE_TASK)
    write_run(runs, "ppo", "starpilot", 1, [5.0, 6.0], **REFERENCE_TASK)
    rows = three_runs("bigfish", [1000, 4000], [[0.0, 3.0]] * 3) + three_runs("starpilot", [1000, 4000],
                                                                                [[0.0, 30.0]] * 3)
    summary = plot.main(plot_args(tmp_path, reference=write_reference(tmp_path / "ref.csv", rows)))
    games = summary["reference"]["games"]
    assert summary["compared_at"] == 2000  # the other figures: one step for every run
    assert games["bigfish"]["PPO"]["step"] == 4000 and games["bigfish"]["PPO"]["where"] == "above"
    assert games["starpilot"]["PPO"]["step"] == 2000 and games["starpilot"]["PPO"]["band"][1] == 10.0


def test_reference_compares_ppo_2x_with_the_band_at_its_own_steps(tmp_path):
    # OpenAI's band counts samples: ppo_2x (drawn at half its steps on the per-agent axis) meets it at its own.
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "starpilot", 1, [1.0, 2.0, 3.0, 4.0])
    write_run(runs, "ppo", "starpilot", 1, [3.0, 5.0, 6.0, 7.0], name="ppo_2x", step=2 * STEP, num_envs=128)
    reference = write_reference(tmp_path / "ref.csv", three_runs("starpilot", [0, 8000], [(0, 8), (0, 8), (0, 8)]))
    summary = plot.main(plot_args(tmp_path, reference=str(reference)))
    assert summary["compared_at"] == 4000  # the others' per-agent axis: ppo_2x's 8,000 steps
    rows = summary["reference"]["games"]["starpilot"]
    assert rows["PPO"]["step"] == rows["PPO 2x samples"]["step"] == 4000  # the last step both reached, own steps
    assert rows["PPO 2x samples"]["ours"] == 5.0  # its evaluation at 4,000 of its own steps, not its last
    assert rows["PPO 2x samples"]["band"] == [4.0, 4.0, 4.0]


def test_reference_names_differing_hyperparameters_and_refuses_another_task(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "bigfish", 1, [1.0, 2.0], num_envs=16, learning_rate=5e-4, **REFERENCE_TASK)
    ref = write_reference(tmp_path / "ref.csv", three_runs("bigfish", [1000, 2000], [[1.0, 2.0]] * 3))
    summary = plot.main(plot_args(tmp_path, reference=ref, figures=True))
    assert summary["reference"]["hyperparameter_differences"] == ["num_envs 16 (reference 64)"]
    assert (tmp_path / "fig" / "reference.png").is_file()
    write_run(runs, "ppo", "bigfish", 2, [1.0, 2.0], distribution_mode="hard", num_levels=200, start_level=0)
    with pytest.raises(plot.UsageError, match="num_levels': 200"):
        plot.main(plot_args(tmp_path, reference=ref))


def test_the_published_reference_is_in_the_project_with_its_header():
    path = os.path.join(ROOT, "results", "reference", "openai_ppo_hard500.csv")
    assert open(path).readline().startswith("# PPO on Procgen, hard mode, 500 training levels")
    reference = plot.read_reference(path)
    assert sorted(reference) == sorted(plot.HARD_MODE_RANGES) and all(len(c) == 3 for c in reference.values())


# sha256 of the data rows (header lines left out) of results/reference/'s two files, as copied from the source.
REFERENCE_ROWS_SHA256 = {
    "openai_ppo_hard500.csv": "c2178b82a2bb65265ebd7b4b7ec9222560805280c2e7b659ae60058e2c759fea",
    "openai_ppo_hard500_updates.csv": "8de2e96e0986cd2b4406281930031285111d10a55e64c2672293fb3a56f4345b",
}


def test_the_published_reference_rows_are_the_copied_ones():
    def rows(path):
        return [line for line in open(path) if not line.startswith("#")]

    for name, digest in REFERENCE_ROWS_SHA256.items():
        ours = rows(os.path.join(ROOT, "results", "reference", name))
        assert hashlib.sha256("".join(ours).encode()).hexdigest() == digest, name
    shared = os.path.join(ROOT, "..", "shared", "reference", "openai_ppo_hard500.csv")
    if os.path.isfile(shared):  # the project's copy of the band, where the checkout sits beside it
        assert rows(os.path.join(ROOT, "results", "reference", "openai_ppo_hard500.csv")) == rows(shared)


def test_reference_band_is_nan_before_every_run_started():
    curves = [(np.array([100, 300]), np.array([0.0, 2.0])), (np.array([200, 300]), np.array([4.0, 0.0]))]
    low, _, _ = plot.reference_band(curves, [150, 200])
    assert np.isnan(low[0]) and low[1] == 1.0  # at 150 the second run has not started


def test_reference_band_ends_where_the_shortest_published_run_ends():
    curves = [(np.array([100, 300]), np.array([0.0, 2.0])), (np.array([100, 200]), np.array([4.0, 0.0]))]
    low, mean, high = plot.reference_band(curves, [200, 250])
    assert np.isfinite(mean[0]) and np.isnan(low[1]) and np.isnan(mean[1]) and np.isnan(high[1])


def test_reference_check_takes_the_mean_over_three_seeds(tmp_path):
    runs = tmp_path / "runs"
    for seed, value in ((1, 0.0), (2, 0.0), (3, 3.0)):  # mean 1, median 0
        write_run(runs, "ppo", "bigfish", seed, [value], **REFERENCE_TASK)
    ref = write_reference(tmp_path / "ref.csv", three_runs("bigfish", [0, 2000], [[0.5, 0.5], [1.0, 1.0], [2, 2]]))
    row = plot.main(plot_args(tmp_path, reference=ref))["reference"]["games"]["bigfish"]["PPO"]
    assert row["ours"] == 1.0 and row["where"] == "within"


def test_the_band_edges_count_as_within():
    assert plot.where_in_band(2.0, 2.0, 4.0) == plot.where_in_band(4.0, 2.0, 4.0) == "within"


def test_reference_game_step_is_the_shortest_run_and_later_evaluations_are_not_counted(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "bigfish", 1, [1.0, 2.0, 3.0, 4.0], **REFERENCE_TASK)
    write_run(runs, "ppo", "bigfish", 2, [1.0, 2.0], **REFERENCE_TASK)
    write_run(runs, "mdpo", "bigfish", 1, [9.0, 9.0, 9.0, 9.0], **REFERENCE_TASK)
    ref = write_reference(tmp_path / "ref.csv", three_runs("bigfish", [1000, 4000], [[0.0, 3.0]] * 3))
    game = plot.main(plot_args(tmp_path, reference=ref))["reference"]["games"]["bigfish"]
    assert game["PPO"]["step"] == game["MDPO"]["step"] == 2000
    assert game["MDPO"]["evaluations"] == {"below": 0, "within": 0, "above": 2, "no reference": 0}


def test_reference_without_any_of_the_games_is_refused(tmp_path):
    write_run(tmp_path / "runs", "ppo", "bigfish", 1, [1.0], **REFERENCE_TASK)
    ref = write_reference(tmp_path / "ref.csv", three_runs("starpilot", [1000], [[1.0]] * 3))
    with pytest.raises(plot.UsageError, match="has none of these games"):
        plot.main(plot_args(tmp_path, reference=ref))


def test_reference_figure_stops_at_our_last_step(tmp_path, monkeypatch):
    run_dir = write_run(tmp_path / "runs", "ppo", "bigfish", 1, [1.0, 2.0], **REFERENCE_TASK)
    ref = write_reference(tmp_path / "ref.csv", three_runs("bigfish", [1000, 2000, 4000], [[0.0, 2.0, 4.0]] * 3))
    grouped = plot.group(plot.named_runs([plot.load_run(run_dir)]))
    drawn = drawn_figure(monkeypatch)
    plot.plot_reference(grouped, plot.ordered_methods(grouped), plot.read_reference(ref), "x", "agent", [], str(tmp_path))
    lines = {line.get_label(): line for line in drawn["fig"].axes[0].get_lines()}
    assert list(lines["OpenAI PPO (mean)"].get_xdata()) == [1000, 2000]
    np.testing.assert_allclose(lines["OpenAI PPO (mean)"].get_ydata(), [0.0, 2.0])


def test_reference_rows_that_are_short_or_not_numbers_are_one_line_errors(tmp_path):
    short = tmp_path / "short.csv"
    short.write_text("game,split,run,steps,return\nbigfish,test,0\n")
    with pytest.raises(plot.UsageError, match="not game,split,run,steps,return"):
        plot.read_reference(str(short))


def test_a_value_that_is_not_finite_is_never_within_the_band():
    assert plot.where_in_band(float("nan"), 1.0, 2.0) == "not finite"
    assert plot.where_in_band(1.5, float("nan"), float("nan")) == "no reference"


# ---------------------------------------------------------------------------------------------
# More on reading runs, the figures' data and --reference
# ---------------------------------------------------------------------------------------------

SQRT2 = np.sqrt(2.0)


# ---------------------------------------------------------------------------------------------
# Finding and loading runs
# ---------------------------------------------------------------------------------------------


def test_find_runs_skips_a_config_that_is_not_an_object_or_whose_args_are_not(tmp_path):
    runs = tmp_path / "runs"
    real = write_run(runs, "ppo", "bigfish", 1, [1.0])
    (runs / "a_list").mkdir()
    (runs / "a_list" / "config.json").write_text("[1, 2]")
    (runs / "string_args").mkdir()
    (runs / "string_args" / "config.json").write_text(json.dumps({"script": "ppo", "args": "env_id=bigfish"}))
    assert run_data.find_runs([str(runs)]) == [real]


def test_the_total_axis_scales_each_agents_curve_by_k_too(tmp_path):
    # K = 2 agents log test -1 and +1 around [3, 6] at 1,000 and 2,000 steps each: 2,000 and 4,000 in all.
    run = plot.load_run(write_run(tmp_path, "mdpo", "bigfish", 1, [3.0, 6.0]), x_axis="total")
    (steps1, values1), (steps2, values2) = run["agent_curves"][run_data.TEST]
    assert steps1.tolist() == steps2.tolist() == [2000, 4000]
    assert values1.tolist() == [2.0, 5.0] and values2.tolist() == [4.0, 7.0]


def test_an_mdpo_run_whose_second_agent_has_not_evaluated_yet_has_no_test_curve(tmp_path):
    run_dir = write_run(tmp_path / "runs", "mdpo", "bigfish", 1, [3.0, 6.0], train=[4.0, 7.0])
    shutil.rmtree(os.path.join(run_dir, "agent2"))  # e.g. stopped before agent 2's first evaluation was written
    run = plot.load_run(run_dir)
    assert run_data.TEST not in run["curves"] and run_data.TRAIN not in run["curves"]
    assert plot.group(plot.named_runs([run])) == {}


def test_a_run_that_logged_a_train_but_no_test_return_is_skipped(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "bigfish__ppo__1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"script": "ppo", "args": {"env_id": "bigfish", "seed": 1}}))
    writer = SummaryWriter(str(run_dir))
    writer.add_scalar(run_data.TRAIN, 5.0, 1000)
    writer.close()
    assert plot.group(plot.named_runs([plot.load_run(str(run_dir))])) == {}
    assert f"skipping {run_dir}: no {run_data.TEST} logged yet" in capsys.readouterr().err


def test_the_note_names_only_the_runs_that_stop_before_the_longest(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "bigfish", 1, [1.0, 2.0, 3.0])
    short = write_run(runs, "ppo", "bigfish", 2, [1.0, 2.0])
    assert plot.main(plot_args(tmp_path))["compared_at"] == 2000
    err = capsys.readouterr().err
    assert f"where 1 run(s) stop: {short};" in err


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


def test_easy_mode_runs_get_no_hard_mode_normalisation(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        write_run(runs, "ppo", "bigfish", seed, [1.0, 2.0], distribution_mode="easy")
    summary = plot.main(plot_args(tmp_path))
    assert "aggregate" not in summary and "games_covered" not in summary
    assert "no normalisation constants for easy mode" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Figures' data
# ---------------------------------------------------------------------------------------------


def band_extent(ax, index=0):
    ys = ax.collections[index].get_paths()[0].vertices[:, 1]
    return ys.min(), ys.max()


def test_test_return_figure_draws_test_means_sample_std_bands_and_agent_bands_only_for_k_agents(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    # PPO seeds test [1, 3] and [3, 7] (train far above): mean [2, 5], sample std [sqrt 2, 2 sqrt 2]
    write_run(runs, "ppo", "bigfish", 1, [1.0, 3.0], train=[50.0, 50.0])
    write_run(runs, "ppo", "bigfish", 2, [3.0, 7.0], train=[60.0, 60.0])
    # MDPO one seed, agents at [4, 8] -+ 1: the agents' band is [4, 8] +- sample std of (v - 1, v + 1) = sqrt 2
    write_run(runs, "mdpo", "bigfish", 1, [4.0, 8.0], train=[70.0, 70.0])
    grouped = loaded(runs)
    drawn = drawn_figure(monkeypatch)
    plot.plot_curves(grouped, plot.ordered_methods(grouped), 2000, "t", "agent", str(tmp_path))
    ax = drawn["fig"].axes[0]
    solid = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines() if line.get_linestyle() == "-"}
    assert solid == {"PPO": [2.0, 5.0], "MDPO": [4.0, 8.0]}
    dotted = sorted(list(line.get_ydata()) for line in ax.get_lines() if line.get_linestyle() == ":")
    np.testing.assert_allclose(dotted, [[4 - SQRT2, 8 - SQRT2], [4 + SQRT2, 8 + SQRT2]])  # MDPO's only
    np.testing.assert_allclose(band_extent(ax, 0), (2 - SQRT2, 5 + 2 * SQRT2))  # PPO's band, drawn first
    plot.plt.close(drawn["fig"])


def test_reference_figure_runs_to_the_longest_run_and_shades_min_to_max(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "bigfish", 1, [1.0, 2.0, 3.0, 4.0], **REFERENCE_TASK)  # to 4,000
    write_run(runs, "ppo", "bigfish", 2, [1.0, 2.0], **REFERENCE_TASK)  # to 2,000
    # three runs, constant 0, 1 and 5 from 1,000 to 5,000: band [0, 5], mean 2
    ref = write_reference(tmp_path / "ref.csv", three_runs("bigfish", [1000, 3000, 5000],
                                                           [[0.0] * 3, [1.0] * 3, [5.0] * 3]))
    grouped = loaded(runs)
    drawn = drawn_figure(monkeypatch)
    plot.plot_reference(grouped, ["PPO"], plot.read_reference(ref), "x", "agent", [], str(tmp_path))
    ax = drawn["fig"].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["OpenAI PPO (mean)"].get_xdata()) == [1000, 3000, 4000]  # rows up to our last step, and it
    np.testing.assert_allclose(lines["OpenAI PPO (mean)"].get_ydata(), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(band_extent(ax, 0), (0.0, 5.0))
    plot.plt.close(drawn["fig"])


def test_cka_figure_draws_each_run_against_its_own_start_where_it_logged_step_0(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for seed, cka in ((1, [0.5, 0.6, 0.9]), (2, [0.7, 0.7, 0.8])):
        run_dir = write_run(runs, "mdpo", "bigfish", seed, [1.0, 2.0])
        writer = SummaryWriter(run_dir)
        for i, value in enumerate(cka):  # from step 0, as mdpo.py logs it before any update
            writer.add_scalar("eval/debiased_cka", value, i * STEP)
        writer.close()
    write_run(runs, "mdpo", "bigfish", 3, [1.0, 2.0], cka=[0.1, 0.2])  # no step 0: raw row only
    drawn = drawn_figure(monkeypatch)
    assert plot.plot_cka(loaded(runs), "agent", "x", str(tmp_path))
    raw, change = drawn["fig"].axes[0], drawn["fig"].axes[1]
    [line] = [line for line in change.get_lines() if line.get_label() == "MDPO"]
    np.testing.assert_allclose(line.get_xdata(), [0, STEP, 2 * STEP])
    np.testing.assert_allclose(line.get_ydata(), [0.0, (0.1 + 0.0) / 2, (0.4 + 0.1) / 2], atol=1e-6)  # seeds 1, 2 only
    [line] = [line for line in raw.get_lines() if line.get_label() == "MDPO"]
    assert line.get_ydata()[-1] == pytest.approx((0.9 + 0.8 + 0.2) / 3)
    plot.plt.close(drawn["fig"])


def test_cka_figure_leaves_out_the_seeds_that_did_not_log_it(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_run(runs, "mdpo", "bigfish", 1, [1.0, 2.0], cka=[0.2, 0.6])
    write_run(runs, "mdpo", "bigfish", 2, [1.0, 2.0])  # from before the CKA was logged
    grouped = loaded(runs)
    drawn = drawn_figure(monkeypatch)
    assert plot.plot_cka(grouped, "agent", "x", str(tmp_path))
    [line] = [line for line in drawn["fig"].axes[0].get_lines() if line.get_label() == "MDPO"]
    np.testing.assert_allclose(line.get_ydata(), [0.2, 0.6])
    plot.plt.close(drawn["fig"])


def test_gap_error_bars_are_the_sample_std(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(plot, "save", lambda fig, out, name, *dpi: drawn.update(fig=fig))
    plot.plot_gap({"bigfish": {"PPO": [0.0, 0.0, 3.0]}}, ["PPO"], "t", str(tmp_path))
    from matplotlib.container import ErrorbarContainer

    [bars] = [c for c in drawn["fig"].axes[0].containers if isinstance(c, ErrorbarContainer)]
    [segment] = bars.lines[2][0].get_segments()
    sd = statistics.stdev([0.0, 0.0, 3.0])  # sqrt 3
    np.testing.assert_allclose(segment[:, 1], [1.0 - sd, 1.0 + sd])
    plot.plt.close(drawn["fig"])


# ---------------------------------------------------------------------------------------------
# --reference
# ---------------------------------------------------------------------------------------------


def test_read_reference_refuses_a_csv_with_rows_but_other_columns(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("game,split,steps,value\nbigfish,test,1000,1.0\n")
    with pytest.raises(plot.UsageError, match="needs the columns game,split,run,steps,return"):
        plot.read_reference(str(path))


def test_read_reference_keeps_only_the_test_split(tmp_path):
    rows = three_runs("bigfish", [1000, 2000], [[1.0, 2.0]] * 3)
    rows += three_runs("bigfish", [1000, 2000], [[9.0, 9.0]] * 3, split="valid")
    reference = plot.read_reference(write_reference(tmp_path / "ref.csv", rows))
    assert len(reference["bigfish"]) == 3
    assert all(values.tolist() == [1.0, 2.0] for _, values in reference["bigfish"])


def test_reference_refuses_runs_on_other_start_levels(tmp_path):
    write_run(tmp_path / "runs", "ppo", "bigfish", 1, [1.0, 2.0], distribution_mode="hard", num_levels=500,
              start_level=1000)
    ref = write_reference(tmp_path / "ref.csv", three_runs("bigfish", [1000, 2000], [[1.0, 2.0]] * 3))
    with pytest.raises(plot.UsageError, match="'start_level': 1000"):
        plot.main(plot_args(tmp_path, reference=ref))


def test_reference_check_skips_games_it_lacks_and_methods_a_game_lacks(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "bigfish", 1, [1.0, 2.0], **REFERENCE_TASK)
    write_run(runs, "mdpo", "bigfish", 1, [3.0, 4.0], **REFERENCE_TASK)
    write_run(runs, "ppo", "starpilot", 1, [5.0, 6.0], **REFERENCE_TASK)  # no MDPO on starpilot
    write_run(runs, "ppo", "coinrun", 1, [7.0, 8.0], **REFERENCE_TASK)  # not in the reference
    rows = three_runs("bigfish", [1000, 2000], [[0.0, 0.0]] * 3) + three_runs("starpilot", [1000, 2000],
                                                                              [[0.0, 0.0]] * 3)
    games = plot.main(plot_args(tmp_path, reference=write_reference(tmp_path / "ref.csv", rows)))["reference"]["games"]
    assert sorted(games) == ["bigfish", "starpilot"]
    assert sorted(games["bigfish"]) == ["MDPO", "PPO"] and list(games["starpilot"]) == ["PPO"]
    assert games["starpilot"]["PPO"]["ours"] == 6.0 and games["bigfish"]["MDPO"]["ours"] == 4.0
    assert "note: the reference has no curves for coinrun" in capsys.readouterr().err


def test_band_counts_counts_a_non_finite_evaluation_apart():
    # runs 0 -> 2, 1 -> 3, 2 -> 4 from 1,000 to 3,000: at 2,000 the band is [1, 3], at 3,000 [2, 4]
    curves = [(np.array([1000, 3000]), np.array([a, a + 2.0])) for a in (0.0, 1.0, 2.0)]
    counts = plot.band_counts([1000, 2000, 3000, 4000], [float("nan"), 2.5, 9.0, 1.0], curves)
    assert counts == {"below": 0, "within": 1, "above": 1, "no reference": 1, "not finite": 1}


def test_the_mean_curve_starts_where_every_seed_has_begun():
    # seed 1 evaluated at 1,000 ... 4,000, seed 2 only from 2,000: before 2,000 its first value would be repeated
    steps, mean, std = plot.mean_std_curve([(np.array([1000, 2000, 3000, 4000]), np.array([1.0, 2.0, 3.0, 4.0])),
                                            (np.array([2000, 3000]), np.array([4.0, 6.0]))])
    assert steps.tolist() == [2000, 3000] and mean.tolist() == [3.0, 4.5]
    np.testing.assert_allclose(std, [statistics.stdev([2.0, 4.0]), statistics.stdev([3.0, 6.0])])


def test_seeds_evaluated_at_other_steps_are_read_on_the_first_seeds_steps():
    # seed 1 at 1,000 ... 4,000; seed 2 at 1,500 and 3,500 only (1.0 and 5.0): the grid is seed 1's steps inside
    # [1,500, 3,500], i.e. 2,000 and 3,000, where seed 2 interpolates to 1 + 4 x 500/2,000 = 2.0 and
    # 1 + 4 x 1,500/2,000 = 4.0; the means are (2 + 2) / 2 = 2.0 and (3 + 4) / 2 = 3.5.
    steps, mean, _ = plot.mean_std_curve([(np.array([1000, 2000, 3000, 4000]), np.array([1.0, 2.0, 3.0, 4.0])),
                                          (np.array([1500, 3500]), np.array([1.0, 5.0]))])
    assert steps.tolist() == [2000, 3000]
    np.testing.assert_allclose(mean, [2.0, 3.5])


def test_read_reference_refuses_a_non_finite_return_and_a_file_that_is_not_text(tmp_path):
    rows = three_runs("bigfish", [1000, 2000], [[1.0, "inf"], [1.0, 2.0], [1.0, 2.0]])
    with pytest.raises(plot.UsageError, match="bigfish run 0 has return inf at 2,000"):
        plot.read_reference(write_reference(tmp_path / "inf.csv", rows))
    rows = three_runs("bigfish", [1000, 2000], [[1.0, "nan"], [1.0, 2.0], [1.0, 2.0]])
    with pytest.raises(plot.UsageError, match="bigfish run 0 has return nan at 2,000"):
        plot.read_reference(write_reference(tmp_path / "nan.csv", rows))
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"game,split,run,steps,return\nbigfish,test,0,1000,\xff\n")
    with pytest.raises(plot.UsageError, match="is not a reference CSV: it is not UTF-8 text"):
        plot.read_reference(str(latin1))


def test_a_refused_reference_leaves_nothing_written(tmp_path):
    write_run(tmp_path / "runs", "ppo", "bigfish", 1, [1.0, 2.0], **REFERENCE_TASK)
    write_run(tmp_path / "runs", "ppo", "starpilot", 1, [1.0, 2.0], num_levels=200)  # another task
    good = write_reference(tmp_path / "ref.csv", three_runs("bigfish", [1000, 2000], [[1.0, 2.0]] * 3))
    for reference, message in [(str(tmp_path / "missing.csv"), "cannot read the reference"),
                               (good, "'num_levels': 200")]:
        with pytest.raises(plot.UsageError, match=message):
            plot.main(plot_args(tmp_path, reference=reference))
        assert not os.path.exists(plot_args(tmp_path).out)  # refused before final_test_returns.md or any figure


def test_a_control_with_other_settings_is_its_own_method_in_every_game_not_another_seed(tmp_path):
    # A control (PPO with 256 envs, seed 1 like the default's seed 1) in coinrun only, beside default PPO seeds
    # 1 2 and MDPO in both games; an unevaluated MDPO control names nothing. Pooled, coinrun's PPO would be 3
    # seeds with mean 4.
    runs = tmp_path / "runs"
    for game in ("bigfish", "coinrun"):
        write_run(runs, "ppo", game, 1, [1.0, 2.0], num_envs=64)
        write_run(runs, "ppo", game, 2, [3.0, 4.0], num_envs=64)
        write_run(runs, "mdpo", game, 1, [7.0, 8.0], num_envs=64)
    write_run(runs, "ppo", "coinrun", 1, [5.0, 6.0], num_envs=256, name="ppo256")
    write_run(runs, "mdpo", "coinrun", 1, [], num_envs=256, name="mdpo256")
    summary = plot.main(plot_args(tmp_path))
    table = (tmp_path / "fig" / "final_test_returns.md").read_text()
    for game in ("bigfish", "coinrun"):
        assert table_cell(table, game, "PPO") == f"3.00 ± {statistics.stdev([2.0, 4.0]):.2f} (2)"
        assert table_cell(table, game, "MDPO") == "8.00 (1)"
    assert table_cell(table, "coinrun", "PPO (num_envs=256)") == "6.00 (1)"
    assert set(summary["welch"]["coinrun"]) == {"PPO", "PPO (num_envs=256)"}


def test_settings_that_differ_only_between_games_split_nothing(tmp_path):
    runs = tmp_path / "runs"
    for game, num_envs in (("bigfish", 64), ("coinrun", 32)):
        for seed in (1, 2):
            write_run(runs, "ppo", game, seed, [1.0, 2.0 * seed], num_envs=num_envs)
            write_run(runs, "mdpo", game, seed, [3.0, 4.0 * seed], num_envs=num_envs)
    assert {game: sorted(methods) for game, methods in loaded(runs).items()} == {
        "bigfish": ["MDPO", "PPO"], "coinrun": ["MDPO", "PPO"]}


def split_names(*runs):
    return [run["method"] for run in run_data.split_by_settings(list(runs))]


def settings_run(method, seed, game="coinrun", **args):
    return {"method": method, "seed": seed, "game": game, "args": {"learning_rate": 5e-4, **args}}


def test_each_learning_setting_splits_runs_and_every_script_defaults_it_alike():
    import drac
    import mdpo
    import ppo

    for name in run_data.LEARNING_SETTINGS:
        default = getattr(ppo.Args, name)
        assert getattr(mdpo.Args, name) == default == getattr(drac.Args, name), name
        other = not default if isinstance(default, bool) else default * 2 + 1
        assert split_names(settings_run("PPO", 1), settings_run("PPO", 2, **{name: other})) == [
            "PPO", f"PPO ({name}={other})"], name


def test_evaluation_checkpoints_the_budget_and_speed_flags_split_nothing():
    other = {"eval_interval": 2, "eval_episodes": 256, "checkpoint_interval": 1,
             "total_timesteps": 1000, "cuda": False, "torch_deterministic": False, "bf16": True, "compile": True}
    assert split_names(settings_run("PPO", 1), settings_run("PPO", 2, **other)) == ["PPO", "PPO"]


def test_the_name_joins_a_methods_own_label_and_names_only_settings_off_their_default():
    runs = [settings_run("MDPO (num_agents=3)", 1), settings_run("MDPO (num_agents=3)", 2, ent_coef=0.02, num_envs=16),
            settings_run("MDPO (num_agents=3)", 3, num_envs=16)]
    assert split_names(*runs) == ["MDPO (num_agents=3)", "MDPO (num_agents=3, num_envs=16, ent_coef=0.02)",
                                  "MDPO (num_agents=3, num_envs=16)"]
    assert runs[1]["method"] == "MDPO (num_agents=3)"  # the runs given are not changed


def test_a_run_made_before_a_setting_existed_ran_at_its_default():
    assert split_names(settings_run("PPO", 1), settings_run("PPO", 2, gae_lambda=0.95)) == ["PPO", "PPO"]


def test_every_field_of_every_script_is_a_learning_setting_a_method_field_or_named_here_as_neither():
    # A field added to Args must be sorted here, so that split_by_settings cannot silently miss it.
    import dataclasses

    import drac
    import mdpo
    import ppo

    neither = {"exp_name", "seed", "torch_deterministic", "cuda", "track", "wandb_project_name", "wandb_entity",
               "capture_video", "run_dir", "resume", "checkpoint_interval",  # the run's identity and bookkeeping
               "env_id", "distribution_mode",  # the task: plot.py groups by game and refuses mixed modes
               "total_timesteps",  # a ceiling: the learning rate is not annealed
               "eval_interval", "eval_episodes",  # how it is measured
               "bf16", "compile",  # speed flags a resume may change
               "batch_size", "minibatch_size", "num_iterations"}  # computed from the settings
    for module in (ppo, drac, mdpo):
        fields = {field.name for field in dataclasses.fields(module.Args)}
        sorted_fields = set(run_data.LEARNING_SETTINGS) | set(run_data.METHOD_FIELDS[module.__name__]) | neither
        assert fields - sorted_fields == set(), module.__name__
        assert set(run_data.LEARNING_SETTINGS) <= fields, module.__name__


def test_methods_selects_a_control_by_its_name_and_a_method_without_its_controls(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "ppo", "coinrun", 1, [1.0, 2.0])
    write_run(runs, "ppo", "coinrun", 1, [5.0, 6.0], num_envs=256, name="ppo256")
    write_run(runs, "mdpo", "coinrun", 1, [7.0, 8.0])
    summary = plot.main(plot_args(tmp_path, methods=["PPO (num_envs=256)", "mdpo"]))
    assert set(summary["welch"]["coinrun"]) == {"PPO (num_envs=256)"}
    summary = plot.main(plot_args(tmp_path, methods=["ppo", "mdpo"]))
    assert set(summary["welch"]["coinrun"]) == {"PPO"}


def test_step_axes_are_in_millions_and_one_game_figures_one_panel_wide(tmp_path, monkeypatch):
    write_run(tmp_path / "runs", "ppo", "bigfish", 1, [1.0, 2.0], step=1_500_000)
    drawn = drawn_figure(monkeypatch)
    grouped = loaded(tmp_path / "runs")
    plot.plot_curves(grouped, ["PPO"], 3_000_000, "title", "agent", str(tmp_path))
    ax = drawn["fig"].axes[0]
    assert ax.get_xlabel() == "Steps per agent (millions)"
    assert ax.xaxis.get_major_formatter()(1_500_000, 0) == "1.5"
    assert drawn["fig"].get_size_inches()[0] < 6  # not four panels' width for one game
    plot.plt.close(drawn["fig"])


def test_long_titles_and_notes_are_wrapped_to_the_figure(tmp_path):
    fig, _ = plot.panels(1)
    text = plot.wrapped("word " * 100, fig, 9)
    assert max(len(line) for line in text.split("\n")) <= int(fig.get_size_inches()[0] * 9)
    plot.plt.close(fig)


def test_a_drac_run_is_found_and_named_by_its_augmentation(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "drac", "bigfish", 1, [1.0, 2.0], augment="crop", drac_coef=0.1, exp_name="ppo_drac_crop")
    write_run(runs, "drac", "bigfish", 2, [1.0, 2.0], augment="flip", drac_coef=0.2, exp_name="mine")
    assert sorted(run["method"] for run in map(plot.load_run, run_data.find_runs([str(runs)]))) == [
        "PPO + DrAC (augment=flip, drac_coef=0.2)", "PPO + DrAC (crop)"]


def test_window_returns_average_each_runs_evaluations_in_the_range_and_each_method_over_runs_that_reach_it(tmp_path):
    runs = tmp_path / "runs"
    # evaluations at 1000 ... 5000; the window [2000, 4000] holds the 2nd to 4th
    write_run(runs, "ppo", "coinrun", 1, [9.0, 1.0, 2.0, 3.0, 9.0], train=[0.0, 4.0, 5.0, 9.0, 0.0])
    write_run(runs, "ppo", "coinrun", 2, [9.0, 3.0, 4.0, 5.0, 9.0], train=[0.0, 6.0, 7.0, 8.0, 0.0])
    write_run(runs, "ppo", "coinrun", 3, [9.0, 9.0, 9.0])  # ends at 3000, before the window does
    write_run(runs, "mdpo", "coinrun", 1, [0.0, 6.0, 6.0, 9.0], train=[0.0, 1.0, 2.0, 3.0])  # agents at mean +- 1
    summary = plot.main(plot_args(tmp_path, window=(2000, 4000)))
    ppo, mdpo = summary["window"]["coinrun"]["PPO"], summary["window"]["coinrun"]["MDPO"]
    assert ppo["test"] == [2.0, 4.0] and ppo["train"] == [6.0, 7.0]
    assert ppo["runs"][2] == {"run": "coinrun__ppo__3", "seed": 3, "ends_at": 3000}
    assert mdpo["test"] == [pytest.approx(7.0)] and mdpo["train"] == [pytest.approx(2.0)]
    table = (tmp_path / "fig" / "window_returns.md").read_text()
    assert "| coinrun | PPO | coinrun__ppo__1 | 1 | 3 | 2.00 | 6.00 |" in table
    assert "| coinrun | PPO | coinrun__ppo__3 | 3 | ends at 3,000 | | |" in table
    assert f"| coinrun | PPO | 3.00 ± {np.sqrt(2):.2f} (2) | 6.50 ± {np.sqrt(0.5):.2f} (2) |" in table
    assert "| coinrun | MDPO | 7.00 (1) | 2.00 (1) |" in table


@pytest.mark.parametrize("window", [(0, 0), (2500, 2900), (9000, 10000)])
def test_a_window_that_holds_no_evaluation_is_refused_before_anything_is_written(tmp_path, window):
    write_run(tmp_path / "runs", "ppo", "coinrun", 1, [1.0, 2.0, 3.0])  # evaluations at 1,000 to 3,000
    with pytest.raises(plot.UsageError, match=f"--window {window[0]} {window[1]} holds no evaluation of a run that "
                       f"reaches {window[1]:,} steps per agent \\(the runs evaluate from 1,000 to 3,000\\)"):
        plot.main(plot_args(tmp_path, window=window))
    assert not (tmp_path / "fig").exists()


@pytest.mark.parametrize("window, x_axis, message", [((5, 4), "agent", "0 <= FIRST <= LAST"),
                                                     ((-1, 4), "agent", "0 <= FIRST <= LAST"),
                                                     ((1, 4), "updates", "a step axis")])
def test_a_window_that_cannot_be_read_is_refused(tmp_path, window, x_axis, message):
    with pytest.raises(plot.UsageError, match=message):
        plot.check(plot_args(tmp_path, window=window, x_axis=x_axis))
