"""Robustness under visual perturbations: the paper's Tables 1 and 2, from any of our checkpoints.

For every agent of every run (PPO: its one agent; MDPO: each of its K) and every perturbation:
  return    mean test return under the perturbation: the first complete episode of each of
            --episodes envs on unseen levels (the training's evaluation protocol), the network seeing
            perturbed frames, one random draw per episode; every agent meets the same levels, action
            seeds and draws; `drop` = clean return - this
  TV        mean and max total-variation distance between the policy on --frames test-level frames
            and on --copies perturbed copies of each
  spread    tsne.py's feature spread, over several frames: the mean distance of the copies' 256-d
            features to their centroid, averaged over frames, divided by the spread of the clean
            frames' features (a shared offset of the features then counts for nothing)
  entropy   the policy's mean entropy on the clean frames: a near-uniform policy has a small TV
            whatever its features do
The perturbations are built from drac.py's image functions (the ones DrAC trains with): random
convolution (Lee et al. 2020; strength s blends s of the filtered frame in, 1 is theirs), brightness,
contrast, saturation (a factor from U[1 - s, 1 + s]) and hue (a turn of the colour wheel from U[-s, s]).
A strength is a number or weak / medium / strong (PERTURBATION_STRENGTHS).

    python robustness.py runs/bigfish__ppo__1 runs/bigfish__mdpo__1 --label "CPU, 2 cores"
    python robustness.py RUNS... --perturbations random_conv hue:strong brightness:0.3 --episodes 100

Writes Fig/robustness_{game}.md, .json, .png and .pdf; one line per run on the terminal.
"""

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch
import tyro
from torch.distributions import Categorical

import evaluation
import ppo
from drac import adjust_colour, convolve, random_conv_weights, uniform
from evaluation import interval95, spread, test_frames, tv_distance
from run_data import UsageError, check_seed, load_agents, refuse_one_seed_twice, run_tool, split_by_settings


@dataclass
class RobustnessArgs:
    runs: tyro.conf.Positional[List[str]]
    """run directories (or their checkpoint.pt or export.py's weights.pt) of one game, any method"""
    perturbations: List[str] = field(default_factory=lambda: list(PERTURBATION_STRENGTHS))
    """perturbations as NAME or NAME:STRENGTH (weak, medium, strong or a number), e.g. hue:strong brightness:0.3"""
    episodes: int = 64
    """test episodes per agent and perturbation (evaluation envs, each its first complete episode)"""
    frames: int = 64
    """test-level frames for the TV distance, spread and entropy (at least 2: the spread is relative to theirs)"""
    copies: int = 8
    """perturbed copies of each of those frames (at least 2: one copy has no spread)"""
    warmup_steps: int = 50
    """random-action steps before those frames are taken, so that they are not start screens"""
    seed: int = 0
    """seed of the test levels, the actions, the frames and the perturbations' draws"""
    out: str = "Fig"
    """where the table, JSON and figure go"""
    label: str = ""
    """what made the checkpoints, e.g. "CPU, 2 cores"; added to the title"""
    figure: bool = True
    """draw the figure (else only the table and JSON)"""


# The robustness tests' perturbations and the largest strength each takes.
PERTURBATION_MAX_STRENGTH = {"random_conv": 1.0, "brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.5}
# Named strengths of each perturbation; a number up to PERTURBATION_MAX_STRENGTH works too.
PERTURBATION_STRENGTHS = {
    "random_conv": {"weak": 0.25, "medium": 0.5, "strong": 1.0},
    "brightness": {"weak": 0.2, "medium": 0.4, "strong": 0.8},
    "contrast": {"weak": 0.2, "medium": 0.4, "strong": 0.8},
    "saturation": {"weak": 0.2, "medium": 0.4, "strong": 0.8},
    "hue": {"weak": 0.1, "medium": 0.25, "strong": 0.5},
}
# Without a strength: Lee et al.'s full random convolution; brightness, contrast and saturation at DrAC's
# colour-jitter range (0.4); hue a quarter turn at most, less than DrAC's color-jitter (0.5 x 255/360 of a turn).
DEFAULT_PERTURBATION_STRENGTH = {"random_conv": "strong", "brightness": "medium", "contrast": "medium",
                                 "saturation": "medium", "hue": "medium"}


def parse_perturbation(spec: str):
    """(name, strength) from NAME or NAME:STRENGTH; UsageError, saying why, for an unknown name or a
    strength out of range."""
    name, _, strength = spec.partition(":")
    if name not in PERTURBATION_STRENGTHS:
        raise UsageError(f"unknown perturbation {name!r}; choose from: {', '.join(PERTURBATION_STRENGTHS)}")
    strength = strength or DEFAULT_PERTURBATION_STRENGTH[name]
    if strength in PERTURBATION_STRENGTHS[name]:
        return name, PERTURBATION_STRENGTHS[name][strength]
    highest = PERTURBATION_MAX_STRENGTH[name]
    try:
        value = float(strength)
    except ValueError:
        raise UsageError(f"strength {strength!r} of {name}: give weak, medium, strong or a number in [0, {highest:g}]") from None
    if not 0 <= value <= highest:
        raise UsageError(f"strength {strength} of {name} is out of range: it must lie in [0, {highest:g}]")
    return name, value


class EpisodePerturbation:
    """A robustness test's perturbation, fixed within an episode: every frame of env i's episode goes
    through the same random filter or colour factor, drawn when the episode starts (Lee et al. draw one
    random convolution per episode). Strength s: random_conv blends s of the filtered frame into the
    frame (1: Lee et al.'s); brightness, contrast and saturation scale by a factor from U[1 - s, 1 + s];
    hue turns the colour wheel by U[-s, s] of a turn. s = 0 is the identity."""

    def __init__(self, name, strength, num_envs, seed):
        if name not in PERTURBATION_MAX_STRENGTH:
            raise ValueError(f"unknown perturbation {name!r}")
        self.name, self.strength = name, strength
        self.generator = torch.Generator().manual_seed(seed)
        self.params = self.draw(num_envs)

    def draw(self, n):
        if self.name == "random_conv":
            return random_conv_weights(n, self.generator)
        centre = 0.0 if self.name == "hue" else 1.0
        return uniform(n, centre - self.strength, centre + self.strength, self.generator, "cpu")

    def start_episodes(self, envs):
        """Fresh parameters for the episodes that start now in these envs."""
        self.params[torch.as_tensor(envs)] = self.draw(len(envs))

    def __call__(self, frames, envs=None):
        """The frames of these envs (all, by default), perturbed with their episodes' parameters."""
        params = self.params if envs is None else self.params[torch.as_tensor(envs)]
        if self.name == "random_conv":
            return convolve(frames, params, self.strength)
        return adjust_colour(frames, **{self.name: params})


def check(args: RobustnessArgs) -> list:
    """The parsed perturbations; bad settings fail here, before any checkpoint is loaded."""
    if not args.runs:
        raise UsageError("give the run directories (or checkpoints) to measure")
    if not args.perturbations:  # `--perturbations` with nothing after it would measure the clean frames alone
        raise UsageError(f"--perturbations must name at least one; choose from: {', '.join(PERTURBATION_STRENGTHS)}")
    check_seed("--seed", args.seed, evaluation.EVAL_SEED_OFFSET)
    if args.episodes < 1:
        raise UsageError(f"--episodes must be positive, got {args.episodes}")
    if args.frames < 2:  # the spread is relative to the clean frames' spread, which is 0 for one frame
        raise UsageError(f"--frames must be at least 2, got {args.frames}")
    if args.copies < 2:  # the spread of one copy is 0
        raise UsageError(f"--copies must be at least 2, got {args.copies}")
    if args.warmup_steps < 0:
        raise UsageError(f"--warmup-steps must not be negative, got {args.warmup_steps}")
    perturbations = [parse_perturbation(spec) for spec in args.perturbations]
    if len(set(perturbations)) != len(perturbations):
        raise UsageError("a perturbation is given twice")
    return perturbations


def load_runs(paths) -> list:
    runs = [load_agents(path) for path in paths]
    run_dirs = [os.path.realpath(run["run"]) for run in runs]
    for run_dir in run_dirs:  # a run given twice would count as two seeds and narrow the interval
        if run_dirs.count(run_dir) > 1:
            raise UsageError(f"{run_dir} is given twice; give each run once")
    for key, what in (("game", "games"), ("mode", "distribution modes")):
        values = sorted({run[key] for run in runs})
        if len(values) > 1:
            raise UsageError(f"the runs are of different {what}: {', '.join(values)}; give runs of one")
    runs = split_by_settings(runs)  # a control trained with other settings is not another seed
    refuse_one_seed_twice(runs, "run")  # nor is a copy of a run
    return runs


@torch.no_grad()
def policy_shift(agent, clean, perturb, copies: int) -> dict:
    """TV distance and feature spread of one agent between clean frames and `copies` perturbed copies of each."""
    clean_hidden = agent.hidden(clean)
    hidden = agent.hidden(perturb(clean.repeat_interleave(copies, 0)))
    tv = tv_distance(agent.actor(clean_hidden).repeat_interleave(copies, 0), agent.actor(hidden))
    copies_spread = spread(hidden.view(len(clean), copies, -1))
    return {"tv_mean": float(tv.mean()), "tv_max": float(tv.max()), "spread": float(copies_spread / spread(clean_hidden))}


@torch.no_grad()
def entropy(agent, frames) -> float:
    return float(Categorical(logits=agent(frames)[0]).entropy().mean())


def perturbation_key(name, strength) -> str:
    return f"{name}:{strength:g}"


def measure_agent(agent, game, mode, frames, perturbations, args: RobustnessArgs) -> dict:
    """Clean return, entropy and, per perturbation, return, drop, TV and spread of one agent."""
    device = torch.device("cpu")
    eval_seed = args.seed + evaluation.EVAL_SEED_OFFSET  # the test levels, as the training's evaluations

    def test_return(perturb=None):
        with contextlib.closing(ppo.ProcgenVecEnv(game, args.episodes, 0, 0, mode, eval_seed)) as env:
            return evaluation.evaluate(agent, env, device, eval_seed, perturb=perturb)[0]

    clean = test_return()
    result = {"clean_return": clean, "entropy": entropy(agent, frames), "perturbations": {}}
    for k, (name, strength) in enumerate(perturbations):
        seed = args.seed * 1000 + k  # the same draws for every agent
        perturbed = test_return(EpisodePerturbation(name, strength, args.episodes, seed))
        shift = policy_shift(agent, frames, EpisodePerturbation(name, strength, len(frames) * args.copies, seed + 500),
                             args.copies)
        result["perturbations"][perturbation_key(name, strength)] = {
            "return": perturbed, "drop": clean - perturbed, **shift}
    return result


def summarise(results, keys) -> dict:
    """Per method and condition ('clean' and each perturbation): the mean over seeds (a run's value is the
    mean over its agents) with its 95% interval, and the number of seeds."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        per_seed = {"clean": [np.mean([a["clean_return"] for a in r["agents"]]) for r in runs]}
        for key in keys:
            per_seed[key] = [np.mean([a["perturbations"][key]["return"] for a in r["agents"]]) for r in runs]
        summary[method] = {cond: dict(zip(("mean", "low", "high"), interval95(v)), n=len(v)) for cond, v in per_seed.items()}
    return summary


def budget_text(results) -> str:
    steps = sorted({r["global_step"] for r in results if r["global_step"] is not None})
    if not steps:
        return "budget unknown"
    if len(steps) == 1:
        return f"{steps[0]:,} env steps per agent"
    return f"budgets differ: {steps[0]:,} to {steps[-1]:,} env steps per agent"


def markdown(game, results, keys, summary, title) -> str:
    lines = [f"# {title.replace(chr(10), ': ')}", "", "Per method: mean over seeds of the test return (an MDPO seed is the mean of its agents), "
             "95% Student-t interval with the sample std (none from one seed).", "",
             "| method | seeds | clean | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for method, conds in summary.items():
        cells = [f"{c['mean']:.2f}" + (f" [{c['low']:.2f}, {c['high']:.2f}]" if c["n"] > 1 else "")
                 for c in (conds["clean"], *(conds[k] for k in keys))]
        lines.append(f"| {method} | {conds['clean']['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Per agent: return under the perturbation, its drop from the clean return, the policy's mean and max "
              "TV distance between clean and perturbed frames, the copies' feature spread relative to the clean "
              "frames', and the policy's entropy on the clean frames.", "",
              "| method | seed | agent | perturbation | return | drop | TV mean | TV max | spread | entropy |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for i, a in enumerate(r["agents"], 1):
            lines.append(f"| {r['method']} | {r['seed']} | {i} | clean | {a['clean_return']:.2f} | | | | | {a['entropy']:.3f} |")
            for key in keys:
                p = a["perturbations"][key]
                lines.append(f"| {r['method']} | {r['seed']} | {i} | {key} | {p['return']:.2f} | {p['drop']:.2f} | "
                             f"{p['tv_mean']:.3f} | {p['tv_max']:.3f} | {p['spread']:.3f} | {a['entropy']:.3f} |")
    return "\n".join(lines) + "\n"


def draw(summary, keys, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = ["clean", *keys]
    methods = list(summary)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(conditions) * max(1, len(methods) / 2)), 4))
    for m, method in enumerate(methods):
        stats = [summary[method][c] for c in conditions]
        means = np.array([s["mean"] for s in stats])
        errors = np.array([[s["mean"] - s["low"], s["high"] - s["mean"]] for s in stats]).T
        x = np.arange(len(conditions)) + (m - (len(methods) - 1) / 2) * width
        ax.bar(x, means, width, label=f"{method} (n={stats[0]['n']})",
               yerr=None if np.isnan(errors).all() else np.nan_to_num(errors), capsize=3)
    ax.set_xticks(np.arange(len(conditions)), conditions, fontsize=8)
    ax.set_ylabel("test return")
    ax.axhline(0, color="#999999", linewidth=0.8)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, never over them
    ax.set_title(title, fontsize=9)
    fig.text(0.01, 0.01, "bars: mean over seeds (MDPO: mean of its agents per seed); whiskers: 95% t-interval, sample std",
             fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    for ext in ("png", "pdf"):
        fig.savefig(f"{path}.{ext}", dpi=150)
    plt.close(fig)


def main(args: RobustnessArgs) -> dict:
    perturbations = check(args)
    runs = load_runs(args.runs)
    game, mode = runs[0]["game"], runs[0]["mode"]
    keys = [perturbation_key(*p) for p in perturbations]
    frames = test_frames(ppo.ProcgenVecEnv, game, mode, args.frames, args.warmup_steps, args.seed)
    results = []
    for run in runs:
        agents = [measure_agent(agent, game, mode, frames, perturbations, args) for agent in run["agents"]]
        results.append({key: run[key] for key in ("run", "method", "seed", "global_step")} | {"agents": agents})
        print(run_line(results[-1], keys), flush=True)

    summary = summarise(results, keys)
    title = f"{game} ({mode}): test return under visual perturbations\n{budget_text(results)}" + (
        f", {args.label}" if args.label else "") + f", {args.episodes} test episodes per agent"
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"robustness_{game}")
    report = {"game": game, "distribution_mode": mode, "budget": budget_text(results), "label": args.label,
              "episodes": args.episodes, "frames": args.frames, "copies": args.copies, "seed": args.seed,
              "perturbations": keys, "runs": results, "summary": summary}
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(markdown(game, results, keys, summary, title))
    if args.figure:
        draw(summary, keys, title, stem)
    print(f"written: {stem}.md, {stem}.json" + (f", {stem}.png, {stem}.pdf" if args.figure else ""))
    return report


def run_line(result, keys) -> str:
    """One terminal line per run: returns (mean over its agents) and mean TV per perturbation."""
    agents = result["agents"]
    parts = [f"clean {np.mean([a['clean_return'] for a in agents]):.2f}"]
    for key in keys:
        ret = np.mean([a["perturbations"][key]["return"] for a in agents])
        tv = np.mean([a["perturbations"][key]["tv_mean"] for a in agents])
        parts.append(f"{key} {ret:.2f} (TV {tv:.3f})")
    return f"{result['run']}: {result['method']}, seed {result['seed']}, {len(agents)} agent(s): " + ", ".join(parts)


if __name__ == "__main__":
    run_tool(RobustnessArgs, main)
