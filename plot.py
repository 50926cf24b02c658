"""Figures and tables from the TensorBoard logs of ppo.py and mdpo.py runs.

    python plot.py --runs sweeps/demo/runs --label "CPU, 2 cores"
    python plot.py --runs sweeps/demo/runs --label "H100" --x-axis total --finished-only

writes under --out (default Fig/):
  test_return.png/.pdf      one panel per game: eval/test_return against steps, mean +- sample std over seeds
  aggregate.png/.pdf        min-max normalised test return (Procgen hard-mode constants): IQM, mean and
                            median with 95% stratified-bootstrap intervals (rliable)
  improvement.png/.pdf      rliable's probability that MDPO beats each other method on a game, 95% intervals
  profiles.png/.pdf         performance profiles: the fraction of runs above each normalised score
  generalization_gap.png/.pdf  train minus test return per game and method
  representation_cka.png/.pdf  eval/debiased_cka of the runs that log it (MDPO, MDPO alpha=0), per game: raw,
                            and its change from the run's own untrained level (logged at step 0)
  final_test_returns.md     test returns, mean +- sample std, and Welch's t-test of MDPO against each method
  plot_summary.json         every number drawn above
and, with --reference results/reference/openai_ppo_hard500.csv (OpenAI's published PPO, hard, 500 levels):
  reference.png/.pdf        one panel per game: our test curves over the band of OpenAI's three PPO runs
  reference_check.md        per game and method: where our curve lies against that band at equal steps,
                            and how many evaluations of each method and seed lie below/within/above it
and, with --window FIRST LAST (steps on the x axis):
  window_returns.md         each run's mean test and training-level return over its evaluations in that range,
                            and each method's mean +- sample std over its runs that reach LAST
Every number is taken at one step that every included run reached (the title says which), a run's
score is the mean of its agents (any K), and each figure names its budget, seeds, games and --label.

    python plot.py --runs results --x-axis updates --out Fig/updates \
        --updates-reference results/reference/openai_ppo_hard500_updates.csv --label "H100"

writes instead, per update (one update = num_envs x num_steps samples per agent, from each run's config.json):
  updates_GAME.png/.pdf     one figure per game: value loss, entropy, approx KL, clip fraction, explained variance,
                            episode length and return on the training levels of every run and agent, beside OpenAI's
                            training logs (its update: 4 workers x 16,384 samples), each run's stall marked
  stall.md                  each run's (each agent's) stall update, or "none by N", and OpenAI's runs' (stall_update)
"""

import contextlib
import json
import os
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from run_data import (CKA, METHOD_COLOURS, OTHER_COLOURS, TEST, TRAIN, UsageError, at_own_steps,  # noqa: E402
                      damaged_event_files, display_name, find_runs, last_per_step, load_run, read_events,
                      refuse_one_seed_twice, run_tool, split_by_settings)

MDPO = "MDPO"
# (R_min, R_max) of each game in hard mode, from the Procgen paper (Cobbe et al. 2020).
HARD_MODE_RANGES = {
    "bigfish": (0, 40), "bossfight": (0.5, 13), "caveflyer": (2, 13.4), "chaser": (0.5, 14.2),
    "climber": (1, 12.6), "coinrun": (5, 10), "dodgeball": (1.5, 19), "fruitbot": (-0.5, 27.2),
    "heist": (2, 10), "jumper": (1, 10), "leaper": (1.5, 10), "maze": (4, 10), "miner": (1.5, 20),
    "ninja": (2, 10), "plunder": (3, 30), "starpilot": (1.5, 35),
}
STD_NOTE = "bands: mean ± sample std (ddof=1) over seeds"
AGENT_NOTE = ("multi-agent methods: each seed's score is the mean of its K agents, which narrows the band for a "
              "reason other than the method; dotted: mean ± sample std over the individual agents")


@dataclass
class PlotArgs:
    runs: List[str] = field(default_factory=lambda: ["sweeps/default/runs"])
    """directories searched (recursively) for run directories"""
    out: str = "Fig"
    """where the figures and the table go"""
    label: str = ""
    """what ran them, e.g. "CPU, 2 cores" or "H100"; added to every title with steps and seeds"""
    x_axis: Literal["agent", "total", "updates"] = "agent"
    """"agent": steps per agent (the paper's axis); "total": environment steps of all of a run's agents;
    "updates": the training scalars per update, beside --updates-reference, and the stall table"""
    finished_only: bool = False
    """leave out runs whose status.json does not say finished"""
    methods: Optional[List[str]] = None
    """only these methods (as sweep.py names them, e.g. ppo mdpo mdpo_alpha0, or a control as the figures name
    it, e.g. "PPO (num_envs=256)"); default: every method found"""
    bootstrap_reps: int = 2000
    """bootstrap resamples for the confidence intervals"""
    bootstrap_seed: int = 0
    """seed of the bootstrap, so that the intervals are the same on every call"""
    figures: bool = True
    """draw the figures (else write only the table and plot_summary.json)"""
    reference: Optional[str] = None
    """a CSV of published test curves (results/reference/openai_ppo_hard500.csv): draw our runs over its band"""
    updates_reference: Optional[str] = None
    """with --x-axis updates: a CSV of published training scalars per update
    (results/reference/openai_ppo_hard500_updates.csv), drawn beside ours and given stall updates too"""
    window: Optional[Tuple[int, int]] = None
    """FIRST LAST (steps on the x axis): also write window_returns.md, each run's mean test and training-level
    return over its evaluations from FIRST to LAST, and each method's mean over its runs that reach LAST"""


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------


def named_runs(runs: List[dict]) -> List[dict]:
    """The runs that were evaluated, a run of a method trained with other settings named as a method of its
    own (split_by_settings: "PPO (num_envs=256)" beside "PPO"). A corrupt event file is named: the reader stops
    at the damage without a word, so the run's curves end there."""
    evaluated = []
    for run in runs:
        damaged = [damage for directory in stream_dirs(run) for damage in damaged_event_files(directory)]
        for path, what, offset in damaged:
            if what == "corrupt":
                print(f"warning: {path} is corrupt from byte {offset:,} on (no TensorBoard record there): "
                      "its scalars after that are not read", file=sys.stderr)
        if TEST in run["curves"]:
            evaluated.append(run)
        else:
            print(f"skipping {run['dir']}: {why_not_evaluated(run, damaged)}", file=sys.stderr)
    return split_by_settings(evaluated)


def stream_dirs(run: dict) -> List[str]:
    """The run's event directories: its own and, with K agents, agent1/ ... agentK/."""
    return list(dict.fromkeys([run["dir"]] + [event_dir for _, event_dir in agent_event_dirs(run)]))


def why_not_evaluated(run: dict, damaged: List[tuple]) -> str:
    """Why a run has no test curve: an agent's stream is missing, an event file is corrupt or ends in a record
    cut short (damaged_event_files: the records before are read), or it has not evaluated yet."""
    missing = [os.path.basename(event_dir) for _, event_dir in agent_event_dirs(run) if not os.path.isdir(event_dir)]
    if missing:
        return (f"the event stream of its {' and '.join(missing)} is missing (no directory), so its agents have no "
                f"mean {TEST}")
    if damaged:
        path, what, offset = damaged[0]
        where = (f"{path} is corrupt from byte {offset:,} on" if what == "corrupt" else
                 f"{path} ends in a record cut short (being written now, or the writer was killed or the file truncated)")
        return f"no {TEST} in the complete records of its event files; {where}"
    return f"no {TEST} logged yet"


def group(runs: List[dict]) -> Dict[str, Dict[str, List[dict]]]:
    """game -> method -> runs (the seeds, in seed order), of runs as named_runs leaves them."""
    grouped = defaultdict(lambda: defaultdict(list))
    for run in sorted(runs, key=lambda run: run["seed"]):
        grouped[run["game"]][run["method"]].append(run)
    return grouped


def all_runs(grouped) -> List[dict]:
    return [run for by_method in grouped.values() for runs in by_method.values() for run in runs]


def ordered_methods(grouped) -> List[str]:
    present = {method for by_method in grouped.values() for method in by_method}
    return [m for m in METHOD_COLOURS if m in present] + sorted(present - set(METHOD_COLOURS))


def colour_of(method: str, methods: List[str]) -> str:
    others = [m for m in methods if m not in METHOD_COLOURS]
    return METHOD_COLOURS.get(method) or OTHER_COLOURS[others.index(method) % len(OTHER_COLOURS)]


# ---------------------------------------------------------------------------------------------
# Which runs, at which step
# ---------------------------------------------------------------------------------------------


def select_runs(runs: List[dict], args: PlotArgs) -> List[dict]:
    """The runs the figures are drawn from: one distribution mode, the chosen methods, finished if asked."""
    modes = sorted({run["mode"] for run in runs})
    if len(modes) > 1:
        counts = ", ".join(f"{mode}: {sum(run['mode'] == mode for run in runs)} runs" for mode in modes)
        raise UsageError(f"the runs mix distribution modes ({counts}); plot one mode at a time")
    if args.methods:
        wanted = {display_name(m) for m in args.methods}
        unknown = sorted(wanted - {run["method"] for run in runs})
        if unknown:
            raise UsageError(f"no runs of {', '.join(unknown)}; the runs hold: "
                             f"{', '.join(sorted({run['method'] for run in runs}))}")
        runs = [run for run in runs if run["method"] in wanted]
    if args.finished_only:
        runs = [run for run in runs if run["finished"]]
    return runs


def game_step(grouped, game) -> int:
    """The last step every run of the game reached: games of different GPU slices have different budgets."""
    return int(min(run["curves"][TEST][0][-1] for runs in grouped[game].values() for run in runs))


def comparison_step(grouped) -> int:
    """The last step every included run reached: the one step at which they are compared."""
    return min(game_step(grouped, game) for game in grouped)


def value_at(run: dict, tag: str, step: int, where: str = "where the runs are compared") -> float:
    """The run's evaluation at `step`, or its last one before it when it evaluated elsewhere."""
    steps, values = run["curves"][tag]
    index = np.searchsorted(steps, step, side="right") - 1
    if index < 0:  # it evaluated first after the step the others stopped at (another --eval-interval)
        raise UsageError(f"{run['dir']} has no {tag} at or before step {step:,}, {where} (its first is at "
                         f"{int(steps[0]):,}); plot it apart from the runs that stop earlier")
    return float(values[index])


def short_runs(grouped, step: int) -> List[str]:
    longest = max(run["curves"][TEST][0][-1] for run in all_runs(grouped))
    return [run["dir"] for run in all_runs(grouped) if run["curves"][TEST][0][-1] < longest] if step < longest else []


def covered_games(grouped, methods: List[str]) -> List[str]:
    """The games that have runs of every method: the ones an aggregate over methods can use."""
    games = [game for game in sorted(grouped) if all(m in grouped[game] for m in methods)]
    if not games:
        held = "; ".join(f"{game}: {', '.join(grouped[game])}" for game in sorted(grouped))
        raise UsageError(f"no game has runs of every method ({held}); choose methods with --methods")
    return games


def unit(x_axis: str) -> str:
    return "steps per agent" if x_axis == "agent" else "environment steps of all agents"


def seeds_text(counts) -> str:
    counts = sorted(set(counts))
    text = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{text} seed{'s' if counts[-1] > 1 else ''}"


def title_of(grouped, step: int, args: PlotArgs) -> str:
    """What was compared: the step, which runs, how many seeds, on what."""
    which = "finished runs" if args.finished_only else "the last step all runs reached"
    seeds = seeds_text(len(runs) for by_method in grouped.values() for runs in by_method.values())
    return (f"at {step:,} {unit(args.x_axis)} ({which}), {seeds}, {args.label or 'hardware not stated (--label)'}"
            + "".join(f"; {note}" for note in axis_notes(grouped)))


def axis_notes(grouped) -> List[str]:
    """Which methods the x-axis draws at a fraction of their steps (ppo_2x on the per-agent axis), and why."""
    scaled = {run["method"]: run["steps_per_x"] for run in all_runs(grouped) if run["steps_per_x"] > 1}
    return [f"{method} drawn at 1/{per} of its own steps ({per}x PPO's samples per iteration: at every x it has "
            f"made as many updates as each method)" for method, per in sorted(scaled.items())]


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def sample_std(values) -> float:
    """The sample standard deviation (ddof=1); nan for a single seed, where there is none."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def mean_std_curve(curves: List[tuple]):
    """Curves on a common step grid: the first one's steps where every curve has begun and none has ended
    (np.interp would repeat a curve's first or last value outside its own steps)."""
    start, end = max(steps[0] for steps, _ in curves), min(steps[-1] for steps, _ in curves)
    steps = curves[0][0]
    steps = steps[(steps >= start) & (steps <= end)]
    values = np.array([np.interp(steps, s, v) for s, v in curves])
    std = values.std(0, ddof=1) if len(values) > 1 else np.full(len(steps), np.nan)
    return steps, values.mean(0), std


def normalised_scores(grouped, methods, games, step) -> Dict[str, np.ndarray]:
    """method -> [seeds x games] min-max normalised test returns at `step`; each method keeps its
    lowest-numbered seeds, as many as it has on every game (rliable needs as many on each)."""
    scores = {}
    for method in methods:
        seeds = min(len(grouped[g][method]) for g in games)
        columns = []
        for game in games:
            low, high = HARD_MODE_RANGES[game]
            columns.append([(value_at(run, TEST, step) - low) / (high - low) for run in grouped[game][method][:seeds]])
        scores[method] = np.array(columns).T
    return scores


@contextlib.contextmanager
def seeded_numpy(seed: int):
    """rliable resamples with numpy's global generator (its random_state argument does not reach the
    resampling in rliable 1.2), so seed that generator for the call and restore it afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def aggregate_estimates(scores: Dict[str, np.ndarray], reps: int, seed: int):
    """method -> [IQM, mean, median] and their 95% stratified-bootstrap intervals ([2 x 3])."""
    from rliable import library as rly
    from rliable import metrics

    def aggregate(x):
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x), metrics.aggregate_median(x)])

    with seeded_numpy(seed):
        return rly.get_interval_estimates(scores, aggregate, reps=reps)


def improvement_estimates(scores: Dict[str, np.ndarray], reps: int, seed: int):
    """other method -> P(MDPO > other) averaged over games, with its 95% stratified-bootstrap interval."""
    from rliable import library as rly
    from rliable import metrics

    pairs = {method: (scores[MDPO], scores[method]) for method in scores if method != MDPO}
    with seeded_numpy(seed):
        return rly.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=reps)


def performance_profiles(scores: Dict[str, np.ndarray], taus: np.ndarray, reps: int, seed: int):
    """method -> fraction of runs (all games) with a normalised score above each tau, and its intervals."""
    from rliable import library as rly

    with seeded_numpy(seed):
        return rly.create_performance_profile(scores, taus, reps=reps)


def welch_p(values_a, values_b) -> float:
    """Welch's t-test p-value (unequal variances); nan below two seeds on a side or without variance."""
    from scipy import stats

    if len(values_a) < 2 or len(values_b) < 2 or np.var(values_a) + np.var(values_b) == 0:
        return float("nan")
    return float(stats.ttest_ind(values_a, values_b, equal_var=False).pvalue)


def returns_at(grouped, game, method, tag, step) -> List[float]:
    return [value_at(run, tag, step) for run in grouped[game].get(method, [])]


def gaps_at(grouped, game, method, step) -> List[float]:
    """Train minus test return of each seed at `step`: positive when the agent does better on its training levels."""
    return [value_at(run, TRAIN, step) - value_at(run, TEST, step) for run in grouped[game].get(method, [])
            if TRAIN in run["curves"]]


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def style(ax):
    ax.grid(color="#dddddd")
    ax.spines[["top", "right"]].set_visible(False)


def save(fig, out: str, name: str, dpi: int = 150) -> None:
    os.makedirs(out, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(os.path.join(out, f"{name}.{ext}"), dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def panels(count: int):
    cols = min(4, count)
    rows = -(-count // cols)
    size = (5.5, 4.2) if count == 1 else (4 * cols, 3.2 * rows + 0.6)  # one game: a panel large enough to read
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, axes.flat


def millions_axis(ax, label: str) -> None:
    """Steps in millions: raw step counts as tick labels (1000012000) run into each other."""
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1e6:g}"))
    ax.set_xlabel(f"{label} (millions)")


def wrapped(text: str, fig, chars_per_inch: float) -> str:
    """`text` broken into lines no wider than the figure (one game's figure is one panel wide)."""
    width = max(40, int(fig.get_size_inches()[0] * chars_per_inch))
    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


def draw_band(ax, curves, colour, label):
    steps, mean, std = mean_std_curve(curves)
    ax.plot(steps, mean, color=colour, label=label)
    ax.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.25, linewidth=0)


def draw_agent_band(ax, agent_curves, colour):
    """The band of the individual agents (every seed's every agent), dotted, for multi-agent runs."""
    steps, mean, std = mean_std_curve(agent_curves)
    for edge in (mean - std, mean + std):
        ax.plot(steps, edge, color=colour, linestyle=":", linewidth=1)


def finish_curve_figure(fig, suptitle, notes, out, name, dpi: int = 150):
    """The legend to the right of the panels and the notes below them, where neither covers the other."""
    by_label = {}  # every panel's entries, once each: a method may be missing from the first panel
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            by_label.setdefault(label, handle)
    handles, labels = list(by_label.values()), list(by_label)
    fig.suptitle(wrapped(suptitle, fig, 9))
    fig.tight_layout()
    fig.legend(handles, labels, loc="center left", frameon=False, bbox_to_anchor=(1.0, 0.5))
    fig.text(0.5, -0.01, wrapped("\n".join(notes), fig, 15), ha="center", va="top", fontsize=8)
    save(fig, out, name, dpi)


def plot_curves(grouped, methods, step, title, x_axis, out) -> None:
    games = sorted(grouped)
    fig, axes = panels(len(games))
    for ax, game in zip(axes, games):
        for method in methods:
            runs = grouped[game].get(method)
            if not runs:
                continue
            colour = colour_of(method, methods)
            draw_band(ax, [run["curves"][TEST] for run in runs], colour, method)
            if runs[0]["num_agents"] > 1:
                draw_agent_band(ax, [c for run in runs for c in run["agent_curves"][TEST]], colour)
        ax.axvline(step, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(game)
        millions_axis(ax, unit(x_axis).capitalize())
        ax.set_ylabel("Average test return")
        style(ax)
    notes = [f"{STD_NOTE}; dashed: the step every number is compared at", AGENT_NOTE]
    finish_curve_figure(fig, f"Test return on unseen levels; compared {title}", notes, out,
                        "test_return")


def plot_cka(grouped, x_axis, label, out) -> bool:
    """eval/debiased_cka over training, one column per game with a run that logged it: the raw value on top,
    below its change from the run's own value at step 0 (the untrained agents'), for the runs that logged one."""
    logged = defaultdict(dict)
    for game, by_method in grouped.items():
        for method, runs in by_method.items():
            if any(CKA in run["curves"] for run in runs):
                logged[game][method] = [run for run in runs if CKA in run["curves"]]
    if not logged:
        return False
    methods = ordered_methods(logged)
    games = sorted(logged)
    fig, axes = plt.subplots(2, len(games), figsize=(5.5 if len(games) == 1 else 4 * len(games), 7.4), squeeze=False)
    for column, game in enumerate(games):
        for method in methods:
            curves = [run["curves"][CKA] for run in logged[game].get(method, [])]
            if curves:
                draw_band(axes[0][column], curves, colour_of(method, methods), method)
            started = [(steps, values - values[0]) for steps, values in curves if steps[0] == 0]
            if started:
                draw_band(axes[1][column], started, colour_of(method, methods), method)
        axes[0][column].set_title(game)
        for ax, what in zip(axes[:, column], ("Debiased CKA between agents", "Change from step 0 (untrained)")):
            millions_axis(ax, unit(x_axis).capitalize())
            ax.set_ylabel(what)
            ax.axhline(0, color="grey", linewidth=0.8, linestyle=":")
            style(ax)
    runs = all_runs(logged)
    end = max(run["curves"][CKA][0][-1] for run in runs)
    seeds = seeds_text(len(rs) for by_method in logged.values() for rs in by_method.values())
    notes = [f"{STD_NOTE}; debiased linear CKA (Nguyen et al. 2021) of the agents' 256-d features on the run's "
             "probe frames (2,048 test-level frames made from its seed), mean over agent pairs; untrained agents "
             "already agree on shared frames, so read a value against its run's start (lower row, runs that "
             "logged step 0); agreement.py compares independent PPO runs on the same frames"]
    finish_curve_figure(fig, f"Representation similarity of the agents (up to {end:,} "
                        f"{unit(x_axis)}, {seeds}, {label or 'hardware not stated (--label)'})", notes, out,
                        "representation_cka")
    return True


def interval_rows(ax, names, estimates, intervals, colours):
    for row, name in enumerate(names):
        low, high = intervals[row]
        ax.barh(row, high - low, left=low, height=0.6, color=colours[row], alpha=0.7)
        ax.vlines(estimates[row], row - 0.3, row + 0.3, color="black")
    ax.margins(x=0.15)
    style(ax)


def plot_aggregate(estimates, intervals, methods, title, note, out) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(11, 0.6 * len(methods) + 1.6))
    colours = [colour_of(m, methods) for m in methods]
    for k, (ax, name) in enumerate(zip(axes, ("IQM", "Mean", "Median"))):
        interval_rows(ax, methods, [estimates[m][k] for m in methods], [intervals[m][:, k] for m in methods], colours)
        ax.set_yticks(range(len(methods)), methods if k == 0 else [""] * len(methods))
        ax.set_title(name)
        ax.set_xlabel("Min-max normalised score")
    fig.suptitle(f"Aggregate test score, 95% CIs; {title}")
    fig.text(0.5, -0.06, note, ha="center", fontsize=8)
    fig.tight_layout()
    save(fig, out, "aggregate")


def plot_improvement(estimates, intervals, methods, title, note, out) -> None:
    others = [m for m in methods if m != MDPO]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(others) + 1.8))
    interval_rows(ax, others, [float(estimates[m]) for m in others], [np.ravel(intervals[m]) for m in others],
                  [colour_of(m, methods) for m in others])
    ax.axvline(0.5, color="black", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(others)), [f"MDPO > {m}" for m in others])
    ax.set_xlabel("P(MDPO's score on a game > the other's), 95% CI")
    ax.set_title(f"Probability of improvement; {title}", fontsize=9)
    fig.text(0.5, -0.08, note, ha="center", fontsize=8)
    fig.tight_layout()
    save(fig, out, "improvement")


def plot_profiles(taus, profiles, profile_cis, methods, title, note, out) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in methods:
        colour = colour_of(method, methods)
        ax.plot(taus, profiles[method], color=colour, label=method)
        ax.fill_between(taus, profile_cis[method][0], profile_cis[method][1], color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("Min-max normalised score τ")
    ax.set_ylabel("Fraction of runs with score > τ")
    ax.legend(frameon=False)
    style(ax)
    ax.set_title(f"Performance profiles; {title}", fontsize=9)
    fig.text(0.5, -0.06, note, ha="center", fontsize=8)
    fig.tight_layout()
    save(fig, out, "profiles")


def plot_gap(gaps, methods, title, out) -> None:
    games = sorted(gaps)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(9, 1.3 * len(games) * len(methods) / 2), 3.8))
    for k, method in enumerate(methods):
        values = [gaps[g].get(method, []) for g in games]
        ax.bar(np.arange(len(games)) + (k - (len(methods) - 1) / 2) * width,
               [np.mean(v) if v else np.nan for v in values], width, yerr=[sample_std(v) for v in values],
               color=colour_of(method, methods), label=method, capsize=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(games)), games)
    ax.set_ylabel("Train - test return")
    ax.legend(frameon=False)
    style(ax)
    ax.set_title(f"Generalisation gap {title}", fontsize=9)
    fig.text(0.5, -0.04, "error bars: sample std (ddof=1) over seeds; none with one seed", ha="center", fontsize=8)
    fig.tight_layout()
    save(fig, out, "generalization_gap")


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def mean_std_cell(values) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f} (1)"
    return f"{np.mean(values):.2f} ± {sample_std(values):.2f} ({len(values)})"


def p_cell(p: Optional[float], n_mdpo: int, n_other: int) -> str:
    if n_mdpo == 0 or n_other == 0:
        return ""
    seeds = f"{n_mdpo} vs {n_other} seeds"
    return f"{p:.3f} ({seeds})" if p is not None else f"n/a ({seeds})"


def final_table(grouped, methods, step, title) -> Tuple[str, dict]:
    """The markdown of test returns at `step` and of Welch's t-test of MDPO against each method."""
    lines = [f"Test return {title}: mean ± sample std (ddof=1) over seeds (number of seeds)", "",
             "| game | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for game in sorted(grouped):
        lines.append(f"| {game} | " + " | ".join(mean_std_cell(returns_at(grouped, game, m, TEST, step))
                                                for m in methods) + " |")
    welch = {}
    others = [m for m in methods if m != MDPO]
    if MDPO in methods and others:
        lines += ["", "Welch's t-test p-value (two-sided, unequal variances) of MDPO's test return against each "
                      "method's on each game, and the seeds it rests on", "",
                  "| game | " + " | ".join(f"MDPO vs {m}" for m in others) + " |", "|---|" + "---|" * len(others)]
        for game in sorted(grouped):
            mdpo_values = returns_at(grouped, game, MDPO, TEST, step)
            welch[game] = {}
            for other in others:
                other_values = returns_at(grouped, game, other, TEST, step)
                p = welch_p(mdpo_values, other_values)
                welch[game][other] = {"p": p if np.isfinite(p) else None, "seeds_mdpo": len(mdpo_values),
                                      "seeds_other": len(other_values)}
            lines.append(f"| {game} | " + " | ".join(
                p_cell(welch[game][o]["p"], len(mdpo_values), welch[game][o]["seeds_other"]) for o in others) + " |")
    return "\n".join(lines) + "\n", welch


def window_means(grouped, first: int, last: int) -> dict:
    """game -> method -> {"runs": per run its seed, its evaluations from `first` to `last` and their mean test
    and training-level return (an MDPO run's: its agents' mean), or where it ends if before `last`; "test",
    "train": the values of the runs that reach `last`}."""
    table = {}
    for game in sorted(grouped):
        table[game] = {}
        for method, runs in grouped[game].items():
            rows, means = [], {TEST: [], TRAIN: []}
            for run in runs:
                steps, _ = run["curves"][TEST]
                row = {"run": os.path.basename(run["dir"]), "seed": run["seed"]}
                if steps[-1] < last:
                    rows.append({**row, "ends_at": int(steps[-1])})
                    continue
                for tag in (TEST, TRAIN):
                    if tag in run["curves"]:
                        tag_steps, values = run["curves"][tag]
                        inside = values[(tag_steps >= first) & (tag_steps <= last)]
                        row[tag] = float(inside.mean()) if len(inside) else None
                        if tag == TEST:
                            row["evaluations"] = int(len(inside))
                        if len(inside):
                            means[tag].append(row[tag])
                rows.append(row)
            table[game][method] = {"runs": rows, "test": means[TEST], "train": means[TRAIN]}
    return table


def checked_window(grouped, first: int, last: int, x_unit: str) -> dict:
    """window_means, refused in one line, before anything is written, where no run that reaches `last` has an
    evaluation from `first` to `last`: every cell of the table would be blank."""
    table = window_means(grouped, first, last)
    if not any(row["test"] for by_method in table.values() for row in by_method.values()):
        steps = np.concatenate([run["curves"][TEST][0] for run in all_runs(grouped)])
        raise UsageError(f"--window {first} {last} holds no evaluation of a run that reaches {last:,} {x_unit} (the "
                         f"runs evaluate from {int(steps.min()):,} to {int(steps.max()):,}); give a window inside that")
    return table


def window_table(table: dict, first: int, last: int, x_unit: str, label: str) -> str:
    def cell(value):
        return "" if value is None else f"{value:.2f}"

    lines = [f"Mean return over the evaluations from {first:,} to {last:,} {x_unit}, {label}", "",
             "Each run: the mean of its evaluations in that range (an MDPO run's: the mean of its agents'); "
             "test: the full level distribution, train: the training levels. A run that ends before the range does "
             "is named, and left out of its method's mean.", "",
             "| game | method | run | seed | evaluations | test | train |", "|---|---|---|---|---|---|---|"]
    for game, by_method in table.items():
        for method, entry in by_method.items():
            for row in entry["runs"]:
                if "ends_at" in row:
                    lines.append(f"| {game} | {method} | {row['run']} | {row['seed']} | ends at {row['ends_at']:,} | | |")
                else:
                    lines.append(f"| {game} | {method} | {row['run']} | {row['seed']} | {row.get('evaluations', 0)} | "
                                 f"{cell(row.get(TEST))} | {cell(row.get(TRAIN))} |")
    lines += ["", "Each method: mean ± sample std (ddof=1) over its runs (number of runs)", "",
              "| game | method | test | train |", "|---|---|---|---|"]
    for game, by_method in table.items():
        for method, entry in by_method.items():
            lines.append(f"| {game} | {method} | {mean_std_cell(entry['test'])} | {mean_std_cell(entry['train'])} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# A published anchor: OpenAI's PPO on Procgen (hard, 500 levels), drawn under our curves
# ---------------------------------------------------------------------------------------------

# What the reference runs were: our runs must share the task; other differences are named in the figure.
REFERENCE_TASK = {"distribution_mode": "hard", "num_levels": 500, "start_level": 0}
REFERENCE_HYPERPARAMETERS = {"num_envs": 64, "num_steps": 256, "num_minibatches": 8, "update_epochs": 3,
                             "learning_rate": 5e-4, "gamma": 0.999, "gae_lambda": 0.95}
REFERENCE_NOTES = [
    "grey: OpenAI's PPO (train-procgen, hard, 500 levels), min-max (shaded) and mean (solid) of its 3 runs, "
    "test split",
    "its return is the mean of the last 100 episodes of a worker on the full level distribution (it lags); "
    "ours is one episode per evaluation env, sampled from the current policy",
    "OpenAI's update: 4 training workers x 64 envs x 256 steps (65,536 samples); gradients averaged over "
    "the workers; its step axis counts all 4 workers' steps"]


def read_reference(path: str) -> Dict[str, List[tuple]]:
    """game -> [(steps, returns)] of each published run, test split; lines starting with # are its header."""
    import csv

    try:
        with open(path) as f:
            rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    except OSError as error:
        raise UsageError(f"cannot read the reference {path}: {error.strerror}")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a reference CSV: it is not UTF-8 text") from None
    if not rows or not {"game", "split", "run", "steps", "return"} <= set(rows[0]):
        raise UsageError(f"{path} is not a reference CSV: it needs the columns game,split,run,steps,return")
    runs = defaultdict(list)
    try:
        for row in rows:
            if row["split"] == "test":
                steps, value = int(row["steps"]), float(row["return"])
                if not np.isfinite(value):  # it would break the band silently, not show in it
                    raise UsageError(f"{path}: {row['game']} run {row['run']} has return {row['return']} at {steps:,}")
                runs[(row["game"], row["run"])].append((steps, value))
    except (ValueError, TypeError) as error:  # TypeError: a short row, whose missing fields are None
        raise UsageError(f"{path}: a row that is not game,split,run,steps,return ({error})")
    reference = defaultdict(list)
    for (game, _), points in sorted(runs.items()):
        points.sort()
        reference[game].append((np.array([p[0] for p in points]), np.array([p[1] for p in points])))
    return dict(reference)


def reference_band(curves: List[tuple], steps):
    """(min, mean, max) over the published runs at `steps`, each run linearly interpolated between its
    rows; nan outside the steps every run covers."""
    steps = np.asarray(steps, dtype=np.float64)
    values = np.array([np.interp(steps, s, v) for s, v in curves])
    first = max(s[0] for s, _ in curves)
    last = min(s[-1] for s, _ in curves)
    outside = (steps < first) | (steps > last)
    low, mean, high = values.min(0), values.mean(0), values.max(0)
    for band in (low, mean, high):
        band[outside] = np.nan
    return low, mean, high


def reference_mismatches(runs: List[dict]) -> List[str]:
    """One line per setting in which some run differs from the reference (task settings are refused)."""
    lines = []
    for run in runs:
        args = run["args"]
        task = {key: args.get(key, value) for key, value in REFERENCE_TASK.items()}
        if task != REFERENCE_TASK:
            raise UsageError(f"{run['dir']} ran {task}; the reference is {REFERENCE_TASK}: plot it without --reference")
        for key, value in REFERENCE_HYPERPARAMETERS.items():
            if key in args and args[key] != value:
                lines.append(f"{key} {args[key]} (reference {value})")
    return sorted(set(lines))


def where_in_band(value: float, low: float, high: float) -> str:
    if not np.isfinite(low):
        return "no reference"
    if not np.isfinite(value):
        return "not finite"
    return "below" if value < low else "above" if value > high else "within"


def reference_check(grouped, methods, reference) -> dict:
    """game -> method -> our mean test return at the game's step (game_step) against the band there, at how many of our evaluations up to it (mean over seeds) the curve is below, within,
    above the band, and the same counts over the whole run (whole_run_counts)."""
    check = {}
    for game in sorted(grouped):
        if game not in reference:
            continue
        check[game] = {}
        step = game_step(grouped, game)
        for method in methods:
            runs = grouped[game].get(method)
            if not runs:
                continue
            at_step = [value_at(run, TEST, step, "where the reference is read (each run's own steps)") for run in runs]
            ours = float(np.mean(at_step))
            low, mean, high = (float(b[0]) for b in reference_band(reference[game], [step]))
            row = {"step": step, "seeds": len(runs), "ours": ours,
                   "band": [v if np.isfinite(v) else None for v in (low, mean, high)],
                   "where": where_in_band(ours, low, high)}
            steps, mean, _ = mean_std_curve([run["curves"][TEST] for run in runs])
            keep = steps <= step
            row["evaluations"] = band_counts(steps[keep], mean[keep], reference[game])
            row["whole_run"] = whole_run_counts(runs, (steps, mean), reference[game])
            check[game][method] = row
    return check


def band_counts(steps, values, curves) -> dict:
    """How many of (steps, values) lie below, within, above the band of the published `curves` (each at
    its own step; "no reference" where the band does not reach)."""
    low, _, high = reference_band(curves, steps)
    counts = defaultdict(int)
    for value, lo, hi in zip(values, low, high):
        counts[where_in_band(value, lo, hi)] += 1
    row = {k: counts[k] for k in ("below", "within", "above", "no reference")}
    if counts["not finite"]:
        row["not finite"] = counts["not finite"]
    return row


def whole_run_counts(runs: List[dict], mean_curve: tuple, curves) -> dict:
    """Every evaluation, not only those up to the game's compared step: of the seeds' mean curve (steps,
    values, from mean_std_curve: up to the last step all the seeds reached) and of each seed (up to its own
    last step), against the band. per_seed is a list in the runs' order (two slices of one game may hold
    the same seed)."""
    def counted(steps, values):
        return {"step": int(steps[-1]), **band_counts(steps, values, curves)}

    return {"mean": counted(*mean_curve),
            "per_seed": [{"seed": run["seed"], **counted(*run["curves"][TEST])} for run in runs]}


def band_cell(row: dict) -> str:
    low, mean, high = row["band"]
    return "none at this step" if low is None else f"{row['where']} ({low:.2f} / {mean:.2f} / {high:.2f})"


def reference_table(check: dict, label: str) -> str:
    lines = [f"Our test return against OpenAI's PPO (hard, 500 levels, 3 runs), {label}", "",
             "step: the last one all of the game's runs reached; ours: mean over seeds there; band: min / mean / "
             "max of OpenAI's runs at the same step; evaluations: how many of ours up to that step lie below / "
             "within / above the band (none before its first row)", "",
             "| game | step | method | seeds | ours | band | evaluations below / within / above |",
             "|---|---|---|---|---|---|---|"]
    for game, by_method in check.items():
        for method, row in by_method.items():
            counts = row["evaluations"]
            lines.append(f"| {game} | {row['step']:,} | {method} | {row['seeds']} | {row['ours']:.2f} | "
                         f"{band_cell(row)} | {counts['below']} / {counts['within']} / {counts['above']} |")
    return "\n".join(lines + whole_run_table(check)) + "\n"


def whole_run_table(check: dict) -> List[str]:
    """The second table: each method over all of its evaluations, not only those up to the compared step."""
    def cell(counts):
        return f"{counts['below']} / {counts['within']} / {counts['above']}"

    lines = ["", "Over each run's whole length (a faster method's runs go past the compared step in the same "
             "wall-clock budget): how many evaluations lie below / within / above the band; evaluations before the "
             "band's first row or after its last are not counted. The mean over seeds runs to the last step all of "
             "the method's seeds reached, each seed to its own last step", "",
             "| game | method | curve | up to step | below / within / above |", "|---|---|---|---|---|"]
    for game, by_method in check.items():
        for method, row in by_method.items():
            whole = row["whole_run"]
            seeds = [(f"seed {counts['seed']}", counts) for counts in whole["per_seed"]]
            curves = [(f"mean of {row['seeds']} seeds", whole["mean"])] + seeds if len(seeds) > 1 else seeds
            for name, counts in curves:
                lines.append(f"| {game} | {method} | {name} | {counts['step']:,} | {cell(counts)} |")
    return lines


def plot_reference(grouped, methods, reference, label, x_axis, notes, out) -> None:
    games = [game for game in sorted(grouped) if game in reference]
    fig, axes = panels(len(games))
    for ax, game in zip(axes, games):
        end = max(run["curves"][TEST][0][-1] for runs in grouped[game].values() for run in runs)
        published = np.unique(np.concatenate([s for s, _ in reference[game]]))
        grid = np.union1d(published[published <= end], [end])  # the reference's rows, up to our last step
        low, mean, high = reference_band(reference[game], grid)
        ax.fill_between(grid, low, high, color="#bbbbbb", alpha=0.6, linewidth=0, label="OpenAI PPO (min-max)")
        ax.plot(grid, mean, color="#555555", label="OpenAI PPO (mean)")
        for method in methods:
            if grouped[game].get(method):
                draw_band(ax, [run["curves"][TEST] for run in grouped[game][method]], colour_of(method, methods),
                          method)
        step = game_step(grouped, game)
        ax.axvline(step, color="black", linestyle=":", linewidth=0.8)
        ax.set_title(f"{game} (compared at {step:,})")
        millions_axis(ax, unit(x_axis).capitalize())
        ax.set_ylabel("Average test return")
        style(ax)
    notes = [f"{STD_NOTE}; dotted: the last step all of the game's runs reached"] + REFERENCE_NOTES + notes
    seeds = seeds_text(len(runs) for by_method in grouped.values() for runs in by_method.values())
    finish_curve_figure(fig, f"Test return against OpenAI's published PPO; {seeds}, {label}", notes, out,
                        "reference")


def checked_reference(grouped, path: str) -> tuple:
    """The reference's curves, the games it lacks and our hyperparameter differences from it; refused in
    one line, before anything is written, where it cannot be read or compared with these runs."""
    reference = read_reference(path)
    missing = sorted(set(grouped) - set(reference))
    if len(missing) == len(grouped):
        raise UsageError(f"{path} has none of these games ({', '.join(missing)})")
    return reference, missing, reference_mismatches(all_runs(grouped))


def compare_with_reference(grouped, methods, checked: tuple, args) -> dict:
    """reference_check.md, the figure, and the numbers for plot_summary.json."""
    # OpenAI's band counts samples: every run at its own steps
    grouped = {game: {method: [at_own_steps(run) for run in runs] for method, runs in by_method.items()}
               for game, by_method in grouped.items()}
    reference, missing, mismatches = checked
    notes = ["our runs differ from its hyperparameters: " + ", ".join(mismatches)] if mismatches else []
    label = args.label or "hardware not stated (--label)"
    check = reference_check(grouped, methods, reference)
    table = reference_table(check, label)
    with open(os.path.join(args.out, "reference_check.md"), "w") as f:
        f.write(table + "".join(f"\nNote: {note}\n" for note in notes + REFERENCE_NOTES[1:]))
    print(table)
    if missing:
        print(f"note: the reference has no curves for {', '.join(missing)}", file=sys.stderr)
    if args.figures:
        plot_reference(grouped, methods, reference, label, args.x_axis, notes, args.out)
    return {"reference": args.reference, "games": check, "hyperparameter_differences": mismatches}


# ---------------------------------------------------------------------------------------------
# Per update: our training scalars beside OpenAI's training logs, and the stall
# ---------------------------------------------------------------------------------------------

# key -> (our TensorBoard tag, the column of OpenAI's progress files, panel title)
UPDATE_SCALARS = {
    "value_loss": ("losses/value_loss", "loss/value_loss", "Value loss"),
    "entropy": ("losses/entropy", "loss/policy_entropy", "Policy entropy"),
    "approx_kl": ("losses/approx_kl", "loss/approxkl", "Approx. KL"),
    "clipfrac": ("losses/clipfrac", "loss/clipfrac", "Clip fraction"),
    "explained_variance": ("losses/explained_variance", "misc/explained_variance", "Explained variance"),
    "episode_length": ("charts/episodic_length", "eplenmean", "Episode length, training levels"),
    "episode_return": ("charts/episodic_return", "eprewmean", "Return, training levels"),
}
EPISODE_SCALARS = ("episode_length", "episode_return")  # logged once per episode, not once per update
LAST_EPISODES = 100  # OpenAI's eplenmean and eprewmean average each worker's last 100 episodes
# The stall: the value loss falls while the policy's entropy climbs back, both as 8-update means.
STALL_WINDOW, STALL_VALUE_LOSS, STALL_ENTROPY = 8, 0.5, 2.45
OPENAI = "OpenAI PPO"
OPENAI_SAMPLES_PER_UPDATE = 4 * 64 * 256  # its 4 training workers (results/reference/README.md says why 4)
STALL_RULE = (f"stall: the first update at which the {STALL_WINDOW}-update means (that update and the "
              f"{STALL_WINDOW - 1} before it) of the value loss and of the policy's entropy are below "
              f"{STALL_VALUE_LOSS} and above {STALL_ENTROPY}, after the entropy's mean has been below {STALL_ENTROPY} "
              f"at an earlier update (a fresh policy starts near ln 15 = 2.708)")


def trailing_means(updates, values, window: int) -> Dict[int, float]:
    """update -> mean of the values at that update and the `window` - 1 updates before it, for each update
    whose whole window was logged: a missing update leaves out the windows holding it, it does not shorten them."""
    by_update = dict(zip(np.asarray(updates).tolist(), np.asarray(values, dtype=np.float64).tolist()))
    means = {}
    for update in sorted(by_update):
        window_updates = range(update - window + 1, update + 1)
        if all(u in by_update for u in window_updates):
            means[update] = float(np.mean([by_update[u] for u in window_updates]))
    return means


def stall_update(updates, value_loss, entropy, window: int = STALL_WINDOW, value_loss_below: float = STALL_VALUE_LOSS,
                 entropy_above: float = STALL_ENTROPY) -> Optional[int]:
    """The update at which a run stalls: the first at which the `window`-update means (that update and the
    window - 1 before it) of the value loss and of the policy's entropy are below `value_loss_below` and
    above `entropy_above`, after the entropy's mean has been below `entropy_above` at an earlier update.
    That earlier fall is required because a fresh policy's entropy starts near ln 15 = 2.708, above 2.45:
    without it, a run would 'stall' at its first window where the value loss is low, untrained or not.
    None if no update qualifies (among them a series shorter than one window). `updates` number both series."""
    loss_means = trailing_means(updates, value_loss, window)
    entropy_means = trailing_means(updates, entropy, window)
    fell = False
    for update in sorted(entropy_means):
        if fell and loss_means[update] < value_loss_below and entropy_means[update] > entropy_above:
            return update
        fell = fell or entropy_means[update] < entropy_above
    return None


def read_updates_reference(path: str) -> Dict[str, List[dict]]:
    """game -> a curve (as update_curves makes them) per published run, from a CSV with the columns game,
    run, misc/nupdates and OpenAI's columns of UPDATE_SCALARS; lines starting with # are its header."""
    import csv

    columns = {"game", "run", "misc/nupdates"} | {column for _, column, _ in UPDATE_SCALARS.values()}
    try:
        with open(path) as f:
            rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    except OSError as error:
        raise UsageError(f"cannot read the updates reference {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not an updates reference CSV: it is not UTF-8 text") from None
    if not rows or not columns <= set(rows[0]):
        raise UsageError(f"{path} is not an updates reference CSV: it needs the columns {', '.join(sorted(columns))}")
    runs = defaultdict(dict)  # (game, run) -> update -> key -> value
    for row in rows:
        try:
            update = int(row["misc/nupdates"])
            values = {key: float(row[column]) for key, (_, column, _) in UPDATE_SCALARS.items()}
        except (ValueError, TypeError) as error:  # TypeError: a short row, whose missing fields are None
            raise UsageError(f"{path}: a row with a field that is not a number ({error})") from None
        where = f"{path}: {row['game']} run {row['run']} update {update}"
        if not all(np.isfinite(value) for value in values.values()):
            raise UsageError(f"{where} holds a value that is not finite")
        if update in runs[(row["game"], row["run"])]:
            raise UsageError(f"{where} appears twice")
        runs[(row["game"], row["run"])][update] = values
    reference = defaultdict(list)
    for (game, run), by_update in sorted(runs.items()):
        updates = np.array(sorted(by_update))
        series = {key: (updates, np.array([by_update[u][key] for u in updates.tolist()])) for key in UPDATE_SCALARS}
        reference[game].append({"game": game, "method": OPENAI, "name": f"hard-500-run{run}",
                                "samples": OPENAI_SAMPLES_PER_UPDATE, "series": series, "train_return": None})
    return dict(reference)


def samples_per_update(run: dict) -> int:
    """The samples one agent takes per update (iteration): num_envs x num_steps of its config."""
    try:
        return int(run["args"]["num_envs"]) * int(run["args"]["num_steps"])
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"{run['dir']}: its config.json lacks num_envs or num_steps, which number its updates") from None


def per_update(steps, values, samples: int, where: str) -> tuple:
    """(updates, values) of a scalar logged once per update, at the update's last step (update u at u x samples)."""
    if np.any(steps % samples):
        raise UsageError(f"{where} is logged at steps that are not multiples of {samples:,}, its config's "
                         f"num_envs x num_steps: its updates cannot be numbered")
    return steps // samples, values


def last_episodes_mean(steps, values, updates, samples: int, count: int = LAST_EPISODES) -> np.ndarray:
    """At each update, the mean of the last `count` episodes ended by its last step (all of them while fewer
    have ended; nan before the first), as OpenAI's eplenmean and eprewmean average each worker's last 100.
    A resumed run's episodes re-logged after its checkpoint would be counted twice."""
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    ends = np.searchsorted(steps, np.asarray(updates) * samples, side="right")
    return np.array([values[max(0, end - count):end].mean() if end else np.nan for end in ends])


def agent_event_dirs(run: dict) -> List[Tuple[str, str]]:
    """(name, event directory) of each agent of the run: the run directory itself, or agentK/ for K agents."""
    name = os.path.basename(os.path.normpath(run["dir"]))
    if run["num_agents"] == 1:
        return [(name, run["dir"])]
    return [(f"{name} agent {i}", os.path.join(run["dir"], f"agent{i}")) for i in range(1, run["num_agents"] + 1)]


def update_curves(run: dict) -> List[dict]:
    """A curve per agent of the run: {"game", "method", "name", "samples" per update, "series": key ->
    (updates, values) of the UPDATE_SCALARS it logged, "train_return": (updates, eval/train_return) or None}.
    Episode length and return are the mean of the last 100 episodes by each update (see last_episodes_mean)."""
    samples = samples_per_update(run)
    tags = {tag for tag, _, _ in UPDATE_SCALARS.values()} | {TRAIN}
    curves = []
    for name, event_dir in agent_event_dirs(run):
        events = read_events(event_dir, tags.__contains__) if os.path.isdir(event_dir) else {}
        missing = [UPDATE_SCALARS[key][0] for key in ("value_loss", "entropy")
                   if UPDATE_SCALARS[key][0] not in events or not len(events[UPDATE_SCALARS[key][0]][0])]
        if missing:  # the stall needs both
            print(f"skipping {event_dir}: no {' or '.join(missing)} logged", file=sys.stderr)
            continue
        series = {}
        for key, (tag, _, _) in UPDATE_SCALARS.items():
            if tag in events and key not in EPISODE_SCALARS:
                series[key] = per_update(*last_per_step(*events[tag]), samples, f"{event_dir}: {tag}")
        updates = series["value_loss"][0]
        for key in EPISODE_SCALARS:
            tag = UPDATE_SCALARS[key][0]
            if tag in events and len(events[tag][0]):
                series[key] = (updates, last_episodes_mean(*events[tag], updates, samples))
        train = per_update(*last_per_step(*events[TRAIN]), samples, f"{event_dir}: {TRAIN}") if TRAIN in events else None
        curves.append({"game": run["game"], "method": run["method"], "name": name, "samples": samples,
                       "series": series, "train_return": train})
    return curves


def stall_row(curve: dict) -> dict:
    """The curve's stall update (None: none by its last update), the samples per agent by then and the
    8-update means there."""
    (updates, loss), (_, entropy) = curve["series"]["value_loss"], curve["series"]["entropy"]
    stall = stall_update(updates, loss, entropy)
    row = {"game": curve["game"], "name": curve["name"], "method": curve["method"], "stall": stall,
           "last": int(updates[-1])}
    if stall is not None:
        row.update(samples=stall * curve["samples"],
                   value_loss=trailing_means(updates, loss, STALL_WINDOW)[stall],
                   entropy=trailing_means(updates, entropy, STALL_WINDOW)[stall])
    return row


def stall_table(rows: List[dict], label: str) -> str:
    lines = [f"Stall updates, {label}", "", STALL_RULE + "; samples by then: per agent for ours, all 4 workers' for "
             "OpenAI's (65,536 per update); none by N: no stall up to the run's last logged update N", "",
             "| game | run | method | stall update | samples by then | value loss / entropy there (8-update means) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if row["stall"] is None:
            lines.append(f"| {row['game']} | {row['name']} | {row['method']} | none by {row['last']} | | |")
        else:
            lines.append(f"| {row['game']} | {row['name']} | {row['method']} | {row['stall']} | {row['samples']:,} | "
                         f"{row['value_loss']:.3f} / {row['entropy']:.3f} |")
    return "\n".join(lines) + "\n"


def smoothed(series: tuple) -> tuple:
    """(updates, STALL_WINDOW-update trailing means) of (updates, values): what the stall rule reads."""
    means = trailing_means(*series, STALL_WINDOW)
    updates = np.array(sorted(means), dtype=np.int64)
    return updates, np.array([means[u] for u in updates.tolist()])


def draw_reference_updates(ax, curves: List[dict], key: str) -> None:
    """OpenAI's runs as a band: min-max (shaded) and mean of their smoothed series, over the updates all share."""
    series = [smoothed(curve["series"][key]) for curve in curves]
    shared = series[0][0]
    for updates, _ in series[1:]:
        shared = np.intersect1d(shared, updates)
    values = np.array([v[np.searchsorted(u, shared)] for u, v in series])
    ax.fill_between(shared, values.min(0), values.max(0), color="#bbbbbb", alpha=0.6, linewidth=0,
                    label=f"{OPENAI} (min-max of {len(curves)} runs)")
    ax.plot(shared, values.mean(0), color="#555555", linewidth=1, label=f"{OPENAI} (mean)")


def draw_update_panel(ax, key: str, curves: List[dict], reference: List[dict], stalls: Dict[tuple, Optional[int]],
                      methods: List[str]) -> None:
    """One scalar: OpenAI's band, our curves, every run's stall update and, where there is one, the rule's threshold."""
    if reference:
        draw_reference_updates(ax, reference, key)
    for curve in curves:
        colour = colour_of(curve["method"], methods)
        if key in curve["series"]:
            ax.plot(*smoothed(curve["series"][key]), color=colour, linewidth=1, label=curve["method"])
        elif key == "episode_return" and curve["train_return"] is not None:
            ax.plot(*curve["train_return"], color=colour, linewidth=1, linestyle=":", marker=".",
                    label=f"{curve['method']}: {TRAIN} (evaluations)")
    for curve in reference + curves:
        stall = stalls[(curve["game"], curve["name"])]
        if stall is not None:
            colour = "#555555" if curve["method"] == OPENAI else colour_of(curve["method"], methods)
            ax.axvline(stall, color=colour, linestyle="--", linewidth=0.8)
    threshold = {"value_loss": STALL_VALUE_LOSS, "entropy": STALL_ENTROPY}.get(key)
    if threshold is not None:
        ax.axhline(threshold, color="black", linestyle=":", linewidth=0.8)
    ax.set_title(UPDATE_SCALARS[key][2])
    ax.set_xlabel("Update")
    style(ax)


def updates_notes(curves: List[dict], reference: List[dict], mismatches: List[str]) -> List[str]:
    """What the per-update figure draws, how an update differs between us and OpenAI, and what is missing."""
    samples = sorted({(curve["method"], curve["samples"]) for curve in curves})
    notes = [f"every solid line: {STALL_WINDOW}-update trailing means (what the stall rule reads), ours one per run and "
             f"agent; dashed verticals: each run's stall, dotted horizontals: the rule's thresholds",
             STALL_RULE,
             "samples per update: " + ", ".join(f"{method} {count:,} per agent" for method, count in samples)
             + (f"; {OPENAI} {OPENAI_SAMPLES_PER_UPDATE:,} (4 workers x 64 envs x 256 steps, gradients averaged over "
                "the workers)" if reference else ""),
             "approx KL: ours mean((r - 1) - log r), OpenAI's 0.5 mean((log r)^2), r the probability ratio; episode "
             "length and return: ours the last 100 episodes ended by each update, OpenAI's each worker's last 100, "
             "averaged over its workers"]
    without = sorted({curve["method"] for curve in curves if "episode_return" not in curve["series"]})
    if without:
        notes.append(f"{', '.join(without)}: no per-episode records kept in these runs (exported "
                     f"with --no-episodes, or before export.py kept them), so no episode length; their return panel shows {TRAIN}, dotted: one episode "
                     f"per evaluation env on the training levels")
    if reference:
        last = min(int(curve["series"]["value_loss"][0][-1]) for curve in reference)
        notes.append(f"{OPENAI}: train-procgen's hard-500 runs, training workers' logs, copied up to update {last}")
    if mismatches:
        notes.append("our runs differ from its hyperparameters: " + ", ".join(mismatches))
    return notes


def plot_updates(game: str, curves: List[dict], reference: List[dict], stalls: Dict[tuple, Optional[int]],
                 methods: List[str], title: str, notes: List[str], out: str) -> None:
    fig, axes = panels(len(UPDATE_SCALARS))
    for ax, key in zip(axes, UPDATE_SCALARS):
        draw_update_panel(ax, key, curves, reference, stalls, methods)
    finish_curve_figure(fig, title, notes, out, f"updates_{game}", dpi=100)  # 7 panels: 150 dpi makes a 0.5 MB PNG


def check_updates_args(args: PlotArgs) -> None:
    if args.updates_reference and args.x_axis != "updates":
        raise UsageError("--updates-reference is drawn per update: give --x-axis updates with it")
    if args.x_axis == "updates" and args.reference:
        raise UsageError("--reference is the band per step; per update (--x-axis updates) give --updates-reference")


def main_updates(args: PlotArgs) -> dict:
    """--x-axis updates: per game, our runs' training scalars per update beside the published ones
    (updates_GAME.png/.pdf), and every run's stall update (stall.md)."""
    grouped = group(select_runs(named_runs([load_run(d) for d in find_runs(args.runs)]), args))
    if not grouped:
        raise UsageError(f"no evaluated runs under {', '.join(args.runs)}"
                         + (" (only finished runs were asked for)" if args.finished_only else ""))
    reference = read_updates_reference(args.updates_reference) if args.updates_reference else {}
    mismatches = reference_mismatches(all_runs(grouped)) if reference else []
    methods = ordered_methods(grouped)
    label = args.label or "hardware not stated (--label)"
    curves = {game: [curve for method in methods for run in grouped[game].get(method, []) for curve in update_curves(run)]
              for game in sorted(grouped)}
    rows = [stall_row(curve) for game in curves for curve in curves[game] + reference.get(game, [])]
    table = stall_table(rows, label)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "stall.md"), "w") as f:
        f.write(table)
    print(table)
    missing = [game for game in curves if game not in reference]
    if reference and missing:
        print(f"note: {args.updates_reference} has no updates for {', '.join(missing)}", file=sys.stderr)
    if args.figures:
        stalls = {(row["game"], row["name"]): row["stall"] for row in rows}
        for game, game_curves in curves.items():
            seeds = seeds_text(len(runs) for runs in grouped[game].values())
            title = f"{game}: training scalars per update" + (f", ours beside {OPENAI}" if game in reference else "") \
                + f"; {seeds}, {label}"
            notes = updates_notes(game_curves, reference.get(game, []), mismatches)
            plot_updates(game, game_curves, reference.get(game, []), stalls, methods, title, notes, args.out)
    print(f"{sum(len(c) for c in curves.values())} agents' curves; written to {args.out}/")
    return {"stalls": rows}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def check(args: PlotArgs) -> None:
    if args.bootstrap_reps < 1:
        raise UsageError(f"--bootstrap-reps must be positive, got {args.bootstrap_reps}")
    if args.window and not 0 <= args.window[0] <= args.window[1]:
        raise UsageError(f"--window FIRST LAST needs 0 <= FIRST <= LAST, got {args.window[0]} {args.window[1]}")
    if args.window and args.x_axis == "updates":
        raise UsageError("--window reads the evaluations on a step axis: use it with --x-axis agent or total")
    check_updates_args(args)


def rliable_statistics(grouped, methods, step, args) -> dict:
    """Aggregates, probability of improvement and performance profiles over the games every method has."""
    games = covered_games(grouped, methods)
    scores = normalised_scores(grouped, methods, games, step)
    stats = {"games_covered": games, "seeds": {m: len(s) for m, s in scores.items()},
             "note": f"games: {', '.join(games)}; {seeds_text(len(s) for s in scores.values())} per method per game "
                     f"(the lowest-numbered); 95% stratified-bootstrap intervals over runs (rliable), "
                     f"{args.bootstrap_reps} resamples, seed {args.bootstrap_seed}"}
    stats["aggregate"] = aggregate_estimates(scores, args.bootstrap_reps, args.bootstrap_seed)
    if MDPO in methods and len(methods) > 1:
        stats["improvement"] = improvement_estimates(scores, args.bootstrap_reps, args.bootstrap_seed)
    everything = np.concatenate([s.ravel() for s in scores.values()])
    stats["taus"] = np.linspace(min(0.0, everything.min()), max(1.0, everything.max()), 101)
    stats["profiles"] = performance_profiles(scores, stats["taus"], args.bootstrap_reps, args.bootstrap_seed)
    return stats


def summarise(stats: dict, methods) -> dict:
    """The rliable numbers as plain JSON: [estimate, low, high] each."""
    estimates, intervals = stats["aggregate"]
    summary = {"games_covered": stats["games_covered"], "seeds": stats["seeds"], "aggregate": {
        m: {name: [float(estimates[m][k]), *map(float, intervals[m][:, k])]
            for k, name in enumerate(("IQM", "mean", "median"))} for m in methods}}
    if "improvement" in stats:
        estimates, intervals = stats["improvement"]
        summary["probability_of_improvement"] = {m: [float(estimates[m]), *map(float, np.ravel(intervals[m]))]
                                                 for m in estimates}
    return summary


def draw_rliable(stats, methods, title, out) -> None:
    plot_aggregate(*stats["aggregate"], methods, title, stats["note"], out)
    if "improvement" in stats:
        plot_improvement(*stats["improvement"], methods, title, stats["note"], out)
    else:
        print("note: no MDPO runs beside another method: the probability-of-improvement figure is skipped")
    plot_profiles(stats["taus"], *stats["profiles"], methods, title, stats["note"], out)


def main(args: PlotArgs) -> dict:
    check(args)
    if args.x_axis == "updates":
        return main_updates(args)
    # --methods picks among the names a control's settings give it, so select after naming
    runs = select_runs(named_runs([load_run(d, args.x_axis) for d in find_runs(args.runs)]), args)
    refuse_one_seed_twice(runs, "dir")  # pooled as seeds below; the updates axis draws each run on its own
    grouped = group(runs)
    if not grouped:
        raise UsageError(f"no evaluated runs under {', '.join(args.runs)}"
                         + (" (only finished runs were asked for)" if args.finished_only else ""))
    methods = ordered_methods(grouped)
    reference = checked_reference(grouped, args.reference) if args.reference else None
    window = checked_window(grouped, *args.window, unit(args.x_axis)) if args.window else None
    step = comparison_step(grouped)
    short = short_runs(grouped, step)
    if short:
        print(f"note: compared at {step:,} {unit(args.x_axis)}, where {len(short)} run(s) stop: "
              f"{', '.join(short)}; --finished-only leaves unfinished runs out", file=sys.stderr)
    title = title_of(grouped, step, args)
    mode = all_runs(grouped)[0]["mode"]
    stats = rliable_statistics(grouped, methods, step, args) if mode == "hard" else None
    gaps = {game: {m: gaps_at(grouped, game, m, step) for m in methods} for game in grouped}
    table, welch = final_table(grouped, methods, step, title)
    summary = {"compared_at": step, "x_axis": unit(args.x_axis), "label": args.label, "methods": methods,
               "bootstrap": {"reps": args.bootstrap_reps, "seed": args.bootstrap_seed},
               **(summarise(stats, methods) if stats else {}), "generalization_gap": gaps, "welch": welch}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "final_test_returns.md"), "w") as f:
        f.write(table)
    print(table)
    if args.reference:
        summary["reference"] = compare_with_reference(grouped, methods, reference, args)
    if window is not None:
        summary["window"] = window
        with open(os.path.join(args.out, "window_returns.md"), "w") as f:
            f.write(window_table(summary["window"], *args.window, unit(args.x_axis),
                                 args.label or "hardware not stated (--label)"))
    with open(os.path.join(args.out, "plot_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if stats is None:
        print(f"note: no normalisation constants for {mode} mode: aggregate, improvement and profiles skipped")
    if args.figures:
        draw_all(grouped, methods, step, title, stats, gaps, args)
    print(f"{len(all_runs(grouped))} runs; written to {args.out}/")
    return summary


def draw_all(grouped, methods, step, title, stats, gaps, args) -> None:
    plot_curves(grouped, methods, step, title, args.x_axis, args.out)
    if stats:
        draw_rliable(stats, methods, title, args.out)
    plot_gap(gaps, methods, title, args.out)
    if not plot_cka(grouped, args.x_axis, args.label, args.out):
        print(f"note: no run logged {CKA}: the representation_cka figure is skipped")


if __name__ == "__main__":
    run_tool(PlotArgs, main)
