"""plot.py --x-axis updates: the stall rule on hand-made series, the per-update reading of run directories and of
OpenAI's progress CSV, the stall table and the figure. Expected values are worked out by hand in the comments."""

import bisect
import dataclasses
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

import plot
from helpers import ROOT

REFERENCE_HEADER = ("game,run,eplenmean,eprewmean,loss/approxkl,loss/clipfrac,loss/policy_entropy,loss/value_loss,"
                    "misc/explained_variance,misc/nupdates,misc/total_timesteps")


def updates(n, first=1):
    return np.arange(first, first + n)


# ---------------------------------------------------------------------------------------------
# The stall rule
# ---------------------------------------------------------------------------------------------


def test_stall_is_the_first_update_where_both_8_update_means_cross():
    # Updates 1-10: value loss 1.0, entropy 2.3; updates 11-20: value loss 0.1, entropy 2.62.
    # With k = u - 10 of the new values in the window (u = 11..18):
    #   value loss mean = (1.0 (8 - k) + 0.1 k) / 8 = 1 - 0.1125 k: u = 14 gives 0.55, u = 15 gives 0.4375 (< 0.5)
    #   entropy mean = (2.3 (8 - k) + 2.62 k) / 8 = 2.3 + 0.04 k: u = 13 gives 2.42, u = 14 gives 2.46 (> 2.45)
    # The entropy's mean was 2.3 (< 2.45) at updates 8-10: the first update meeting both is 15.
    value_loss = [1.0] * 10 + [0.1] * 10
    entropy = [2.3] * 10 + [2.62] * 10
    assert plot.stall_update(updates(20), value_loss, entropy) == 15


def test_the_initial_high_entropy_does_not_count():
    # Value loss 0.1 throughout; entropy 2.7 (updates 1-10), 2.3 (11-20), 2.7 (21-30).
    # Without the rule's earlier fall, update 8 (first window: means 0.1 and 2.7) would count.
    # The entropy mean is 2.7 - 0.05 k with k values of 2.3 in the window: below 2.45 for k >= 6 (from update 16),
    # back above it for k <= 4; after update 20, k = 28 - u, so k = 4 at update 24 (mean 2.5).
    value_loss = [0.1] * 30
    entropy = [2.7] * 10 + [2.3] * 10 + [2.7] * 10
    assert plot.stall_update(updates(30), value_loss, entropy) == 24
    # a policy that never fell below 2.45 has not stalled, however low its value loss
    assert plot.stall_update(updates(30), value_loss, [2.7] * 30) is None


def test_no_stall_while_the_value_loss_stays_high_or_the_entropy_stays_low():
    entropy = [2.7] * 10 + [2.3] * 10 + [2.7] * 10
    assert plot.stall_update(updates(30), [1.0] * 30, entropy) is None  # value loss mean never below 0.5
    assert plot.stall_update(updates(30), [0.1] * 30, [2.7] * 10 + [2.3] * 20) is None  # entropy never back above


def test_the_thresholds_are_strict():
    # Means exactly at a threshold do not cross it (8 equal floats average to themselves exactly).
    # A value loss mean of 0.5 is not below 0.5:
    assert plot.stall_update(updates(20), [1.0] * 10 + [0.5] * 10, [2.3] * 10 + [2.62] * 10) is None
    # an entropy mean of 2.45 is not a fall below 2.45, so its later rise is no stall:
    assert plot.stall_update(updates(20), [0.1] * 20, [2.45] * 10 + [2.62] * 10) is None
    # and an entropy mean of 2.45 after a fall is not above it:
    assert plot.stall_update(updates(30), [0.1] * 30, [2.3] * 10 + [2.45] * 20) is None


def test_a_series_shorter_than_one_window_has_no_stall():
    assert plot.stall_update(updates(7), [0.1] * 7, [2.3] * 3 + [2.7] * 4) is None
    assert plot.stall_update([], [], []) is None


def test_a_missing_update_leaves_out_the_windows_that_hold_it():
    # The first test's series without update 13: the windows of updates 13-20 hold it and are left out, so the stall
    # at 15 cannot be seen; update 21's window (14-21) holds value loss 0.1 and entropy 2.62 only: the stall is 21.
    kept = [u for u in range(1, 21) if u != 13] + [21]
    value_loss = [1.0 if u <= 10 else 0.1 for u in kept]
    entropy = [2.3 if u <= 10 else 2.62 for u in kept]
    assert plot.stall_update(kept, value_loss, entropy) == 21
    assert sorted(plot.trailing_means(kept, value_loss, 8)) == [8, 9, 10, 11, 12, 21]


def test_trailing_means_over_the_update_and_the_ones_before_it():
    means = plot.trailing_means([1, 2, 3, 4], [1.0, 2.0, 4.0, 8.0], 2)
    assert means == {2: 1.5, 3: 3.0, 4: 6.0}


# ---------------------------------------------------------------------------------------------
# Our runs per update
# ---------------------------------------------------------------------------------------------


def write_losses(event_dir, value_loss, entropy, samples, episodes=(), train_return=None):
    """The scalars ppo.py logs at the last step of each update (update u at u x samples), and episodes (step, return,
    length) at the steps where they ended."""
    writer = SummaryWriter(event_dir)
    for u, (loss, ent) in enumerate(zip(value_loss, entropy), start=1):
        for tag, value in (("losses/value_loss", loss), ("losses/entropy", ent), ("losses/approx_kl", 0.01),
                           ("losses/clipfrac", 0.1), ("losses/explained_variance", 0.5)):
            writer.add_scalar(tag, value, u * samples)
    for step, episode_return, length in episodes:
        writer.add_scalar("charts/episodic_return", episode_return, step)
        writer.add_scalar("charts/episodic_length", length, step)
    for u, value in (train_return or {}).items():
        writer.add_scalar("eval/train_return", value, u * samples)
        writer.add_scalar("eval/test_return", value, u * samples)
    writer.close()


def write_update_run(root, script, game, seed, value_loss, entropy, num_envs=2, num_steps=4, **kw):
    """A run directory with per-update losses: one stream for PPO, agent1/ and agent2/ for MDPO (the second agent
    logs value loss + 1, which never stalls)."""
    run_dir = os.path.join(root, f"{game}__{script}__{seed}")
    os.makedirs(run_dir)
    args = {"env_id": game, "exp_name": script, "seed": seed, "num_envs": num_envs, "num_steps": num_steps,
            "distribution_mode": "hard", "num_levels": 500, "start_level": 0}
    if script == "mdpo":
        args["num_agents"] = 2
    json.dump({"script": script, "args": args}, open(os.path.join(run_dir, "config.json"), "w"))
    samples = num_envs * num_steps
    evals = {len(value_loss): 1.0}  # one evaluation, as the loaders need to name a run
    if script == "ppo":
        write_losses(run_dir, value_loss, entropy, samples, train_return=evals, **kw)
    else:
        write_losses(os.path.join(run_dir, "agent1"), value_loss, entropy, samples, train_return=evals, **kw)
        write_losses(os.path.join(run_dir, "agent2"), [v + 1 for v in value_loss], entropy, samples, train_return=evals)
    return run_dir


def loaded_run(run_dir):
    return plot.named_runs([plot.load_run(run_dir)])[0]


def test_our_updates_are_steps_over_num_envs_x_num_steps_and_episodes_the_last_100(tmp_path):
    # 2 envs x 4 steps = 8 samples per update; episodes end at steps 3, 8, 9 and 20 with returns 1, 2, 4, 6:
    # by update 1 (step 8) the mean of 1 and 2 = 1.5, by update 2 (step 16) of 1, 2, 4 = 7/3, by update 3 of all four.
    episodes = [(3, 1.0, 10), (8, 2.0, 20), (9, 4.0, 30), (20, 6.0, 40)]
    run_dir = write_update_run(tmp_path / "runs", "ppo", "coinrun", 1, [0.9, 0.8, 0.7], [2.7, 2.6, 2.5],
                               episodes=episodes)
    [curve] = plot.update_curves(loaded_run(run_dir))
    assert curve["name"] == "coinrun__ppo__1" and curve["samples"] == 8
    np.testing.assert_array_equal(curve["series"]["value_loss"][0], [1, 2, 3])
    np.testing.assert_allclose(curve["series"]["value_loss"][1], [0.9, 0.8, 0.7], rtol=1e-6)
    np.testing.assert_allclose(curve["series"]["episode_return"][1], [1.5, 7 / 3, 3.25], rtol=1e-6)
    np.testing.assert_allclose(curve["series"]["episode_length"][1], [15, 20, 25], rtol=1e-6)
    # each panel reads its own tag (write_losses logs 0.01, 0.1 and 0.5 for these three)
    for key, logged in (("approx_kl", 0.01), ("clipfrac", 0.1), ("explained_variance", 0.5), ("entropy", None)):
        expected = [2.7, 2.6, 2.5] if logged is None else [logged] * 3
        np.testing.assert_allclose(curve["series"][key][1], expected, rtol=1e-6, err_msg=key)
    # with the last 2 episodes only: (1 + 2) / 2, (2 + 4) / 2, (4 + 6) / 2
    steps, values = np.array([3, 8, 9, 20]), np.array([1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(plot.last_episodes_mean(steps, values, [1, 2, 3], 8, count=2), [1.5, 3.0, 5.0])
    assert np.isnan(plot.last_episodes_mean(steps, values, [0], 8)[0])  # before the first episode ended


def test_the_episode_panels_average_the_last_100_of_every_episode_logged(tmp_path):
    # 12,000 episodes, more than TensorBoard's default of 10,000 kept per tag, three at each step (episodes of
    # different envs end on the same vector step); returns 0, 1, 2, ... so that each mean says which were counted.
    # By hand: update u ends at step 8u; the episodes ended by then are those at steps 1 ... 8u.
    episodes = [(1 + i // 3, float(i), 1 + i % 7) for i in range(12_000)]
    run_dir = write_update_run(tmp_path / "runs", "ppo", "coinrun", 1, [0.9] * 500, [2.7] * 500, episodes=episodes)
    [curve] = plot.update_curves(loaded_run(run_dir))
    ended_steps = [step for step, _, _ in episodes]
    for u in (1, 2, 13, 250, 500):
        ended = bisect.bisect_right(ended_steps, 8 * u)
        last = episodes[max(0, ended - 100):ended]
        assert curve["series"]["episode_return"][1][u - 1] == pytest.approx(statistics.mean(r for _, r, _ in last))
        assert curve["series"]["episode_length"][1][u - 1] == pytest.approx(statistics.mean(n for _, _, n in last))


def test_the_reference_band_is_the_mean_and_range_of_openais_runs(tmp_path):
    # Three runs with value losses 0.1, 0.2 and 0.6 throughout: the line at their mean 0.3 (the median would be 0.2),
    # the band from 0.1 to 0.6, from update 8 (the first full 8-update window) to 12.
    rows = [("coinrun", run, u, loss, 2.5) for run, loss in enumerate((0.1, 0.2, 0.6)) for u in range(1, 13)]
    reference = plot.read_updates_reference(write_reference(tmp_path / "ref.csv", rows))["coinrun"]
    fig, ax = plot.plt.subplots()
    plot.draw_reference_updates(ax, reference, "value_loss")
    [mean] = [line for line in ax.get_lines() if line.get_label() == "OpenAI PPO (mean)"]
    np.testing.assert_array_equal(mean.get_xdata(), np.arange(8, 13))
    np.testing.assert_allclose(mean.get_ydata(), [0.3] * 5)
    [band] = ax.collections
    vertices = band.get_paths()[0].vertices
    assert vertices[:, 0].min() == 8 and vertices[:, 0].max() == 12
    assert vertices[:, 1].min() == pytest.approx(0.1) and vertices[:, 1].max() == pytest.approx(0.6)
    plot.plt.close(fig)


def test_the_reference_band_leaves_out_updates_a_run_lacks(tmp_path):
    # Run 1 lacks update 10, so its 8-update means exist at 8, 9 and 18-20 only: the band keeps those and
    # borrows no later value for the updates between. Losses 0.01 u (run 0) and 0.5 + 0.01 u (run 1): the
    # 8-update mean at u is 0.01 (u - 3.5) and 0.5 + 0.01 (u - 3.5), their mean 0.25 + 0.01 (u - 3.5).
    rows = [("coinrun", 0, u, 0.01 * u, 2.5) for u in range(1, 21)]
    rows += [("coinrun", 1, u, 0.5 + 0.01 * u, 2.5) for u in range(1, 21) if u != 10]
    reference = plot.read_updates_reference(write_reference(tmp_path / "ref.csv", rows))["coinrun"]
    fig, ax = plot.plt.subplots()
    plot.draw_reference_updates(ax, reference, "value_loss")
    [mean] = [line for line in ax.get_lines() if line.get_label() == "OpenAI PPO (mean)"]
    np.testing.assert_array_equal(mean.get_xdata(), [8, 9, 18, 19, 20])
    np.testing.assert_allclose(mean.get_ydata(), [0.295, 0.305, 0.395, 0.405, 0.415])
    plot.plt.close(fig)


def test_no_stall_is_reported_by_the_last_logged_update_not_by_the_count(tmp_path):
    # Updates 1-10 and 12 (11 never logged): "none by 12", not "none by 11".
    logged = list(range(1, 11)) + [12]
    curve = {"game": "coinrun", "name": "run", "method": "PPO", "samples": 8,
             "series": {"value_loss": (np.array(logged), np.ones(11)), "entropy": (np.array(logged), np.full(11, 2.3))}}
    assert plot.stall_row(curve) == {"game": "coinrun", "name": "run", "method": "PPO", "stall": None, "last": 12}


def test_an_mdpo_run_gives_one_curve_per_agent(tmp_path):
    run_dir = write_update_run(tmp_path / "runs", "mdpo", "coinrun", 1, [0.9, 0.8], [2.7, 2.6])
    curves = plot.update_curves(loaded_run(run_dir))
    assert [c["name"] for c in curves] == ["coinrun__mdpo__1 agent 1", "coinrun__mdpo__1 agent 2"]
    np.testing.assert_allclose(curves[1]["series"]["value_loss"][1], [1.9, 1.8], rtol=1e-6)
    assert "episode_return" not in curves[0]["series"]  # no episodes logged: none made up
    np.testing.assert_array_equal(curves[0]["train_return"][0], [2])  # evaluated at step 16: update 2


def test_steps_that_are_not_whole_updates_are_refused(tmp_path):
    run_dir = write_update_run(tmp_path / "runs", "ppo", "coinrun", 1, [0.9, 0.8], [2.7, 2.6], num_envs=3)
    run = loaded_run(run_dir)
    run["args"]["num_envs"] = 5  # logged every 12 samples, numbered as if every 20
    with pytest.raises(plot.UsageError, match="not multiples of 20"):
        plot.update_curves(run)


# ---------------------------------------------------------------------------------------------
# OpenAI's progress CSV
# ---------------------------------------------------------------------------------------------


def write_reference(path, rows, header=REFERENCE_HEADER):
    """rows: (game, run, update, value loss, entropy), the other columns fixed."""
    with open(path, "w") as f:
        f.write("# a header line\n" + header + "\n")
        for game, run, update, value_loss, entropy in rows:
            f.write(f"{game},{run},100.0,5.0,0.004,0.05,{entropy},{value_loss},0.9,{update},{update * 16384}\n")
    return str(path)


def stalling_rows(game, run, n=30):
    """The second stall test's series (stall at update 24) as reference rows."""
    entropy = [2.7] * 10 + [2.3] * 10 + [2.7] * 10
    return [(game, run, u, 0.1, entropy[u - 1]) for u in range(1, n + 1)]


def test_the_updates_reference_is_read_per_game_and_run(tmp_path):
    path = write_reference(tmp_path / "ref.csv", stalling_rows("coinrun", 0) + stalling_rows("coinrun", 1, 12))
    reference = plot.read_updates_reference(path)
    assert [c["name"] for c in reference["coinrun"]] == ["hard-500-run0", "hard-500-run1"]
    curve = reference["coinrun"][0]
    assert curve["samples"] == 65536 and curve["method"] == plot.OPENAI
    np.testing.assert_array_equal(curve["series"]["entropy"][0], np.arange(1, 31))
    # each panel reads its own column of OpenAI's progress file (write_reference's fixed values)
    first_row = {"episode_length": 100.0, "episode_return": 5.0, "approx_kl": 0.004, "clipfrac": 0.05,
                 "explained_variance": 0.9, "value_loss": 0.1, "entropy": 2.7}  # eplenmean, eprewmean, loss/approxkl, ...
    assert {key: values[0] for key, (_, values) in curve["series"].items()} == first_row
    assert plot.stall_row(curve)["stall"] == 24
    assert plot.stall_row(reference["coinrun"][1]) == {"game": "coinrun", "name": "hard-500-run1",
                                                       "method": plot.OPENAI, "stall": None, "last": 12}


@pytest.mark.parametrize("content, message", [
    ("game,run\ncoinrun,0\n", "needs the columns"),
    (REFERENCE_HEADER + "\ncoinrun,0,100,5,0.004,0.05,2.5,0.4,0.9,x,16384\n", "not a number"),
    (REFERENCE_HEADER + "\ncoinrun,0,100,5,0.004,0.05,2.5,nan,0.9,1,16384\n", "not finite"),
    (REFERENCE_HEADER + "\ncoinrun,0,100,5,0.004,0.05,2.5,0.4,0.9,1,16384\ncoinrun,0,100,5,0.004,0.05,2.5,0.4,0.9,1,"
     "16384\n", "appears twice"),
    (REFERENCE_HEADER + "\ncoinrun,0,100,5\n", "not a number"),
])
def test_a_bad_updates_reference_is_refused_saying_why(tmp_path, content, message):
    path = tmp_path / "ref.csv"
    path.write_text(content)
    with pytest.raises(plot.UsageError, match=message):
        plot.read_updates_reference(str(path))


# ---------------------------------------------------------------------------------------------
# plot.py --x-axis updates
# ---------------------------------------------------------------------------------------------


def updates_args(tmp_path, **kw):
    kw.setdefault("figures", False)
    return plot.PlotArgs(runs=[str(tmp_path / "runs")], out=str(tmp_path / "fig"), label="synthetic",
                         x_axis="updates", **kw)


def test_the_stall_table_gives_each_run_and_agent_its_stall_or_none_by_its_last_update(tmp_path):
    # PPO: the first stall test's series (stall at 15) with 8 samples per update, so 120 samples by then;
    # MDPO agent 1: the second test's series (24; 192 samples); agent 2 logs value loss + 1: none by 30.
    runs = tmp_path / "runs"
    write_update_run(runs, "ppo", "coinrun", 1, [1.0] * 10 + [0.1] * 10, [2.3] * 10 + [2.62] * 10)
    write_update_run(runs, "mdpo", "coinrun", 1, [0.1] * 30, [2.7] * 10 + [2.3] * 10 + [2.7] * 10)
    path = write_reference(tmp_path / "ref.csv", stalling_rows("coinrun", 0) + stalling_rows("bigfish", 0))
    rows = plot.main(updates_args(tmp_path, updates_reference=path))["stalls"]
    assert [(r["name"], r["stall"], r.get("samples")) for r in rows] == [
        ("coinrun__ppo__1", 15, 120), ("coinrun__mdpo__1 agent 1", 24, 192), ("coinrun__mdpo__1 agent 2", None, None),
        ("hard-500-run0", 24, 24 * 65536)]  # the reference's bigfish: no run of ours there, not in the table
    assert rows[0]["value_loss"] == pytest.approx(0.4375) and rows[0]["entropy"] == pytest.approx(2.5)
    table = (tmp_path / "fig" / "stall.md").read_text()
    assert "| coinrun | coinrun__mdpo__1 agent 2 | MDPO | none by 30 | | |" in table
    assert "| coinrun | coinrun__ppo__1 | PPO | 15 | 120 | 0.438 / 2.500 |" in table
    assert "| coinrun | hard-500-run0 | OpenAI PPO | 24 | 1,572,864 | 0.100 / 2.500 |" in table


def test_the_updates_figure_draws_every_scalar_with_the_reference_and_the_stalls(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_update_run(runs, "ppo", "coinrun", 1, [1.0] * 10 + [0.1] * 10, [2.3] * 10 + [2.62] * 10,
                     episodes=[(8 * u, float(u), 10 * u) for u in range(1, 21)])
    path = write_reference(tmp_path / "ref.csv", stalling_rows("coinrun", 0))
    drawn = {}
    monkeypatch.setattr(plot, "finish_curve_figure", lambda fig, title, notes, out, name, dpi: drawn.update(
        fig=fig, title=title, notes=notes, name=name))
    plot.main(updates_args(tmp_path, updates_reference=path, figures=True))
    assert drawn["name"] == "updates_coinrun"
    axes = [ax for ax in drawn["fig"].axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [title for _, _, title in plot.UPDATE_SCALARS.values()]
    value_loss = axes[0]
    # the stalls, ours at 15 and OpenAI's at 24, as vertical lines; the rule's 0.5 as a horizontal one
    verticals = sorted(line.get_xdata()[0] for line in value_loss.get_lines() if line.get_xdata()[0] == line.get_xdata()[1]
                       and line.get_ydata()[0] != line.get_ydata()[1])
    assert verticals == [15, 24]
    [ours] = [line for line in value_loss.get_lines() if line.get_label() == "PPO"]
    np.testing.assert_array_equal(ours.get_xdata(), np.arange(8, 21))  # 8-update means from the first full window
    assert ours.get_ydata()[-1] == pytest.approx(0.1)
    assert any(line.get_label() == "OpenAI PPO (mean)" for line in value_loss.get_lines())
    assert "coinrun" in drawn["title"] and any("65,536" in note for note in drawn["notes"])
    plot.plt.close(drawn["fig"])


@pytest.mark.parametrize("flags, message", [
    (["--updates-reference", "ref.csv"], "error: --updates-reference is drawn per update: give --x-axis updates with it"),
    (["--x-axis", "updates", "--reference", "ref.csv"],
     "error: --reference is the band per step; per update (--x-axis updates) give --updates-reference"),
])
def test_the_updates_flags_are_refused_in_one_line_where_they_do_not_fit(tmp_path, flags, message):
    result = subprocess.run([sys.executable, "plot.py", "--runs", str(tmp_path), "--out", str(tmp_path / "fig"), *flags],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == message


def test_an_unreadable_updates_reference_is_one_line(tmp_path):
    write_update_run(tmp_path / "runs", "ppo", "coinrun", 1, [0.9], [2.7])
    result = subprocess.run([sys.executable, "plot.py", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "fig"),
                             "--x-axis", "updates", "--updates-reference", str(tmp_path / "missing.csv")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: cannot read the updates reference {tmp_path / 'missing.csv'}: No such file or directory"


def test_a_copy_of_a_seed_is_drawn_per_update_where_nothing_is_pooled(tmp_path):
    for root in ("runs", "export"):  # a run and its export: one seed, refused where seeds are pooled
        write_update_run(tmp_path / root, "ppo", "coinrun", 1, [0.9, 0.8], [2.7, 2.6])
    args = plot.PlotArgs(runs=[str(tmp_path / "runs"), str(tmp_path / "export")], out=str(tmp_path / "fig"),
                         figures=False)
    with pytest.raises(plot.UsageError, match="are both seed 1 of PPO on coinrun"):
        plot.main(args)
    stalls = plot.main(dataclasses.replace(args, x_axis="updates"))["stalls"]
    assert sorted(row["name"] for row in stalls) == ["coinrun__ppo__1"] * 2
