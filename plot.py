"""Figures and tables from the TensorBoard logs of ppo.py and mdpo.py runs.

    python plot.py --runs sweeps/demo/runs --label "CPU, 2 cores"

writes under --out (default Fig/):
  test_return.png/.pdf      one panel per game: eval/test_return against steps, mean +- std over seeds
  aggregate.png/.pdf        min-max normalised final test return (Procgen hard-mode constants): IQM,
                            mean and median with 95% stratified-bootstrap intervals (rliable)
  generalization_gap.png/.pdf  final train minus test return per game and method
  final_test_returns.md     markdown table of final test returns, mean +- std over seeds
An MDPO run's score is the mean of its two agents. Each figure names its budget: steps, seeds, --label.
"""

import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

METHOD_NAMES = {"ppo": "PPO", "ppo_l2": "PPO + L2", "ppo_dropout": "PPO + dropout", "mdpo": "MDPO"}
METHOD_COLOURS = {"PPO": "#17becf", "PPO + L2": "#f5a700", "PPO + dropout": "#1565d8", "MDPO": "#e8323c"}
# (R_min, R_max) of each game in hard mode, from the Procgen paper (Cobbe et al. 2020).
HARD_MODE_RANGES = {
    "bigfish": (0, 40), "bossfight": (0.5, 13), "caveflyer": (2, 13.4), "chaser": (0.5, 14.2),
    "climber": (1, 12.6), "coinrun": (5, 10), "dodgeball": (1.5, 19), "fruitbot": (-0.5, 27.2),
    "heist": (2, 10), "jumper": (1, 10), "leaper": (1.5, 10), "maze": (4, 10), "miner": (1.5, 20),
    "ninja": (2, 10), "plunder": (3, 30), "starpilot": (1.5, 35),
}


@dataclass
class PlotArgs:
    runs: List[str] = field(default_factory=lambda: ["sweeps/default/runs"])
    """directories searched (recursively) for run directories"""
    out: str = "Fig"
    """where the figures and the table go"""
    label: str = ""
    """what ran them, e.g. "CPU, 2 cores" or "H100"; added to every title with steps and seeds"""
    bootstrap_reps: int = 2000
    """bootstrap resamples for the aggregate's confidence intervals"""


def find_runs(roots: List[str]) -> List[str]:
    """Every directory below the roots whose config.json was written by ppo.py or mdpo.py."""
    found = []
    for root in roots:
        for directory, _, files in os.walk(root):
            if "config.json" in files and is_run(directory):
                found.append(directory)
    return sorted(found)


def is_run(directory: str) -> bool:
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        print(f"skipping {directory}: its config.json is unreadable ({type(error).__name__})", file=sys.stderr)
        return False
    return isinstance(config, dict) and config.get("script") in ("ppo", "mdpo") and isinstance(config.get("args"), dict)


def read_scalars(event_dir: str, tags) -> Dict[str, tuple]:
    accumulator = EventAccumulator(event_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    series = {}
    for tag in tags:
        if tag in accumulator.Tags()["scalars"]:
            events = accumulator.Scalars(tag)
            series[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events]))
    return series


def load_run(run_dir: str) -> dict:
    """A run's game, method, seed and evaluation curves; an MDPO run's curve is its agents' mean."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    args = config["args"]
    event_dirs = [run_dir] if config["script"] == "ppo" else [os.path.join(run_dir, "agent1"), os.path.join(run_dir, "agent2")]
    curves = {}
    for tag in ("eval/test_return", "eval/train_return"):
        per_agent = [read_scalars(d, [tag]).get(tag) for d in event_dirs]
        if any(c is None for c in per_agent):
            continue
        steps = per_agent[0][0]
        curves[tag] = (steps, np.mean([np.interp(steps, s, v) for s, v in per_agent], axis=0))
    return {"game": args["env_id"], "method": METHOD_NAMES.get(args["exp_name"], args["exp_name"]),
            "seed": args["seed"], "curves": curves, "dir": run_dir}


def group(runs: List[dict]) -> Dict[str, Dict[str, List[dict]]]:
    """game -> method -> runs (the seeds), keeping only runs that were evaluated."""
    grouped = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if "eval/test_return" in run["curves"]:
            grouped[run["game"]][run["method"]].append(run)
    return grouped


def ordered_methods(grouped) -> List[str]:
    present = {method for by_method in grouped.values() for method in by_method}
    return [m for m in METHOD_COLOURS if m in present] + sorted(present - set(METHOD_COLOURS))


def mean_std_curve(runs: List[dict], tag: str):
    """Seeds on a common step grid: the first run's steps up to where the shortest run ends."""
    end = min(run["curves"][tag][0][-1] for run in runs)
    steps = runs[0]["curves"][tag][0]
    steps = steps[steps <= end]
    values = np.array([np.interp(steps, *run["curves"][tag]) for run in runs])
    return steps, values.mean(0), values.std(0)


def final(run: dict, tag: str) -> float:
    return float(run["curves"][tag][1][-1])


def budget(grouped) -> str:
    """What the runs really were: steps per agent and seeds per curve."""
    runs = [run for by_method in grouped.values() for rs in by_method.values() for run in rs]
    steps = max(run["curves"]["eval/test_return"][0][-1] for run in runs)
    seeds = sorted({len(rs) for by_method in grouped.values() for rs in by_method.values()})
    seed_text = "-".join(str(s) for s in (seeds if len(seeds) == 1 else (seeds[0], seeds[-1])))
    return f"{steps:,} steps per agent, {seed_text} seed{'s' if seeds[-1] > 1 else ''}"


def style(ax):
    ax.grid(color="#dddddd")
    ax.spines[["top", "right"]].set_visible(False)


def save(fig, out: str, name: str) -> None:
    os.makedirs(out, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(os.path.join(out, f"{name}.{ext}"), dpi=150, bbox_inches="tight")
    plt.close(fig)


def plot_curves(grouped, methods, title: str, out: str) -> None:
    games = sorted(grouped)
    cols = min(4, len(games))
    rows = -(-len(games) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, game in zip(axes.flat, games):
        for method in methods:
            if method in grouped[game]:
                steps, mean, std = mean_std_curve(grouped[game][method], "eval/test_return")
                colour = METHOD_COLOURS.get(method)
                ax.plot(steps, mean, color=colour, label=method)
                ax.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.25, linewidth=0)
        ax.set_title(game)
        ax.set_xlabel("Timesteps")
        ax.set_ylabel("Average test return")
        style(ax)
    for ax in axes.flat[len(games):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), frameon=False, bbox_to_anchor=(0.5, -0.04))
    fig.suptitle(f"Test return on unseen levels ({title})")
    fig.tight_layout()
    save(fig, out, "test_return")


def normalised_scores(grouped, methods) -> Dict[str, np.ndarray]:
    """method -> [seeds x games] min-max normalised final test returns (seeds cut to the fewest)."""
    games = [g for g in sorted(grouped) if all(m in grouped[g] for m in methods)]
    seeds = min(len(grouped[g][m]) for g in games for m in methods)
    scores = {}
    for method in methods:
        columns = []
        for game in games:
            low, high = HARD_MODE_RANGES[game]
            runs = sorted(grouped[game][method], key=lambda run: run["seed"])[:seeds]
            columns.append([(final(run, "eval/test_return") - low) / (high - low) for run in runs])
        scores[method] = np.array(columns).T
    return scores


def plot_aggregate(grouped, methods, title: str, out: str, reps: int) -> None:
    from rliable import library as rly
    from rliable import metrics

    scores = normalised_scores(grouped, methods)
    aggregate = lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x), metrics.aggregate_median(x)])  # noqa: E731
    estimates, intervals = rly.get_interval_estimates(scores, aggregate, reps=reps)
    fig, axes = plt.subplots(1, 3, figsize=(11, 0.6 * len(methods) + 1.4))
    for k, (ax, name) in enumerate(zip(axes, ("IQM", "Mean", "Median"))):
        for row, method in enumerate(methods):
            low, high = intervals[method][:, k]
            ax.barh(row, high - low, left=low, height=0.6, color=METHOD_COLOURS.get(method), alpha=0.7)
            ax.vlines(estimates[method][k], row - 0.3, row + 0.3, color="black")
        ax.set_yticks(range(len(methods)), methods if k == 0 else [""] * len(methods))
        ax.set_title(name)
        ax.set_xlabel("Min-max normalised score")
        ax.margins(x=0.15)
        style(ax)
    fig.suptitle(f"Aggregate final test score, 95% bootstrap CIs ({title})")
    fig.tight_layout()
    save(fig, out, "aggregate")


def plot_gap(grouped, methods, title: str, out: str) -> None:
    games = sorted(grouped)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(9, 1.3 * len(games) * len(methods) / 2), 3.5))
    for k, method in enumerate(methods):
        gaps = [[final(r, "eval/train_return") - final(r, "eval/test_return") for r in grouped[g].get(method, [])]
                for g in games]
        ax.bar(np.arange(len(games)) + (k - (len(methods) - 1) / 2) * width,
               [np.mean(g) if g else np.nan for g in gaps], width, yerr=[np.std(g) if g else 0 for g in gaps],
               color=METHOD_COLOURS.get(method), label=method, capsize=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(games)), games)
    ax.set_ylabel("Train - test return")
    ax.legend(frameon=False)
    style(ax)
    ax.set_title(f"Generalisation gap at the end of training ({title})")
    fig.tight_layout()
    save(fig, out, "generalization_gap")


def final_table(grouped, methods, title: str) -> str:
    lines = [f"Final test return, mean ± std over seeds ({title})", "",
             "| game | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for game in sorted(grouped):
        cells = []
        for method in methods:
            values = [final(run, "eval/test_return") for run in grouped[game].get(method, [])]
            cells.append(f"{np.mean(values):.2f} ± {np.std(values):.2f} ({len(values)})" if values else "")
        lines.append(f"| {game} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args: PlotArgs) -> None:
    if args.bootstrap_reps < 1:
        raise SystemExit(f"error: --bootstrap-reps must be positive, got {args.bootstrap_reps}")
    run_dirs = find_runs(args.runs)
    grouped = group([load_run(d) for d in run_dirs])
    if not grouped:
        raise SystemExit(f"error: no evaluated runs under {', '.join(args.runs)}")
    methods = ordered_methods(grouped)
    title = ", ".join(t for t in (budget(grouped), args.label) if t)
    plot_curves(grouped, methods, title, args.out)
    plot_aggregate(grouped, methods, title, args.out, args.bootstrap_reps)
    plot_gap(grouped, methods, title, args.out)
    table = final_table(grouped, methods, title)
    with open(os.path.join(args.out, "final_test_returns.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"figures from {len(run_dirs)} runs written to {args.out}/")


if __name__ == "__main__":
    main(tyro.cli(PlotArgs))
