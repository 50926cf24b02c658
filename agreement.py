"""Do mutual distillation's agents end more alike than independent agents? Agreement across runs' checkpoints.

For pairs of agents, on one fixed set of probe frames (evaluation.probe_frames: 2,048 test-level frames
from 256 levels at many depths, made from --probe-seed alone), the debiased linear CKA of their 256-d
features and the total variation between their policies, at the runs' last checkpoint and at the same
networks untrained (rebuilt from each run's seed as training builds them): a raw CKA says little, since
two untrained networks already agree on shared frames; its change from the untrained level does.

  <method>: agents of one run          every pair of agents within a run of K > 1 agents (mdpo, mdpo_alpha0)
  <method>: two seeds                  the first agents of two runs of one method with different seeds
  <method> vs <other>: two seeds       the first agents of runs of two methods with different seeds

Mean and Student-t 95% interval over the pairs of each kind. All runs must be of one game and mode and
at one step per agent (pairs are compared at equal steps).

    python agreement.py sweeps/demo/runs/bigfish__{mdpo,mdpo_alpha0,ppo}__{1,2} --label "CPU, 16,384 steps"

Writes {out}/agreement_{game}.md, .json and .png (each kind's CKA, trained beside untrained, on one axis);
the table on the terminal.
"""

import itertools
import json
import os
from dataclasses import dataclass
from typing import List

import numpy as np
import torch
import tyro

import evaluation
import ppo
from run_data import (UsageError, check_seed, load_agents, refuse_one_seed_twice, run_tool,
                      split_by_settings)


@dataclass
class AgreementArgs:
    runs: tyro.conf.Positional[List[str]]
    """run directories (or their checkpoint.pt or export.py's weights.pt) of one game, at one step"""
    probe_seed: int = 0
    """seed of the probe frames, the same for every pair"""
    out: str = "Fig"
    """where agreement_{game}.md, .json and .png go"""
    label: str = ""
    """what made the runs, e.g. "CPU, 2 cores, 16,384 steps per agent"; added to the title"""


def load_run(path: str) -> dict:
    """A run's method, game, seed, step and its agents, trained (from the file) and untrained (rebuilt from the
    seed: train() seeds torch, then builds its K agents one after the other)."""
    run = load_agents(path)
    torch.manual_seed(run["seed"])
    untrained = [ppo.Agent(dropout=run["args"].get("dropout", 0.0)).eval() for _ in run["agents"]]
    return {**run, "trained": run["agents"], "untrained": untrained}


def check_runs(runs: list) -> None:
    for key, what in (("game", "games"), ("mode", "distribution modes"), ("global_step", "steps per agent")):
        values = sorted({run[key] for run in runs})
        if len(values) > 1:
            raise UsageError(f"the runs are at different {what}: {', '.join(map(str, values))}; give runs of one")
    places = [os.path.realpath(run["run"]) for run in runs]
    if len(set(places)) < len(places):
        raise UsageError("a run is given twice; give each run once")
    refuse_one_seed_twice(split_by_settings(runs), "run")  # a copy of a run would make a second pair of each kind


def pairs(runs: list) -> list:
    """(kind, (run, agent), (run, agent)) for every pair the table compares."""
    found = []
    for run in runs:
        for i, j in itertools.combinations(range(len(run["trained"])), 2):
            found.append((f"{run['method']}: agents of one run", (run, i), (run, j)))
    for a, b in itertools.combinations(runs, 2):
        if a["seed"] == b["seed"]:
            continue  # runs of one seed start from the same networks
        first, second = sorted((a, b), key=lambda run: run["method"])
        kind = (f"{first['method']}: two seeds" if first["method"] == second["method"]
                else f"{first['method']} vs {second['method']}: two seeds")
        found.append((kind, (first, 0), (second, 0)))
    return found


def measure(runs: list, frames: torch.Tensor) -> dict:
    """kind -> list of {"cka", "cka_untrained", "tv", "tv_untrained", "a", "b"}, one per pair."""
    measured = {}  # (run, agent, state) -> (features, probabilities), each network measured once
    for run in runs:
        for state in ("trained", "untrained"):
            for i, agent in enumerate(run[state]):
                measured[(run["run"], i, state)] = evaluation.features_and_policy(agent, frames)
    table = {}
    for kind, (a, i), (b, j) in pairs(runs):
        row = {"a": f"{a['run']} agent {i + 1}", "b": f"{b['run']} agent {j + 1}"}
        for state, suffix in (("trained", ""), ("untrained", "_untrained")):
            (fa, pa), (fb, pb) = measured[(a["run"], i, state)], measured[(b["run"], j, state)]
            row["cka" + suffix] = evaluation.debiased_cka(fa, fb)
            row["tv" + suffix] = evaluation.policy_tv(pa, pb)
        table.setdefault(kind, []).append(row)
    return table


def summary_row(rows: list) -> dict:
    values = {key: [row[key] for row in rows] for key in ("cka_untrained", "cka", "tv_untrained", "tv")}
    values["cka_change"] = [row["cka"] - row["cka_untrained"] for row in rows]
    return {key: evaluation.interval95(column) for key, column in values.items()}


def markdown(table: dict, title: str) -> str:
    def cell(mean, low, high):
        return f"{mean:.3f}" if np.isnan(low) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"

    lines = [f"{title}\n", "| pairs | n | CKA untrained | CKA trained | CKA change | TV untrained | TV trained |",
             "|---|---|---|---|---|---|---|"]
    for kind, rows in sorted(table.items()):
        summary = summary_row(rows)
        lines.append(f"| {kind} | {len(rows)} | " + " | ".join(
            cell(*summary[key]) for key in ("cka_untrained", "cka", "cka_change", "tv_untrained", "tv")) + " |")
    lines.append("\nDebiased linear CKA of the 256-d features and mean total variation between the policies on the "
                 "probe frames; mean and Student-t 95% interval over pairs (none from one pair). Pairs across runs share "
                 "runs (3 seeds make 3 pairs of 3 runs), so they are not independent: read those intervals as too narrow.")
    return "\n".join(lines) + "\n"


def draw(table: dict, title: str, path: str) -> None:
    """Each kind of pair on one axis: the trained agents' CKA (filled, 95% interval) beside the untrained
    networks' (hollow), so that a change reads against where the pairs started."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted(table)
    fig, ax = plt.subplots(figsize=(1.6 * len(kinds) + 2, 4.2))
    for x, kind in enumerate(kinds):
        summary = summary_row(table[kind])
        for offset, key, fill in ((-0.12, "cka_untrained", "none"), (0.12, "cka", "C0")):
            mean, low, high = summary[key]
            error = None if np.isnan(low) else [[mean - low], [high - mean]]
            ax.errorbar(x + offset, mean, yerr=error, fmt="o", color="C0", markerfacecolor=fill, capsize=3,
                        label={"cka_untrained": "untrained", "cka": "trained"}[key] if x == 0 else None)
        ax.scatter([x + 0.12] * len(table[kind]), [row["cka"] for row in table[kind]], s=8, color="grey", zorder=3)
    ax.set_xticks(range(len(kinds)), [kind.replace(": ", ":\n") for kind in kinds], fontsize=8)
    ax.set_ylabel("Debiased linear CKA")
    ax.set_title(title, fontsize=8, wrap=True)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(args: AgreementArgs) -> dict:
    if not args.runs:
        raise UsageError("give the run directories to compare")
    check_seed("--probe-seed", args.probe_seed, evaluation.PROBE_SEED_OFFSET)
    runs = [load_run(path) for path in args.runs]
    check_runs(runs)
    if not pairs(runs):
        raise UsageError("no pair to compare: give a run of several agents, or runs of different seeds")
    game, mode, step = runs[0]["game"], runs[0]["mode"], runs[0]["global_step"]
    frames = evaluation.probe_frames(ppo.ProcgenVecEnv, game, mode, args.probe_seed)
    table = measure(runs, frames)
    title = (f"Agreement on {game} ({mode}) at {step:,} steps per agent, {len(frames):,} probe frames "
             f"(probe seed {args.probe_seed})" + (f"; {args.label}" if args.label else ""))
    text = markdown(table, title)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"agreement_{game}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"agreement_{game}.json"), "w") as f:
        json.dump({"title": title, "pairs": table}, f, indent=2)
    draw(table, title, os.path.join(args.out, f"agreement_{game}.png"))
    print(text)
    return table


if __name__ == "__main__":
    run_tool(AgreementArgs, main)
