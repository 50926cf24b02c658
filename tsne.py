"""Representation robustness: random-convolution copies of frames through trained encoders.

The experiment of the paper's t-SNE figure: take an observation, make `--copies` perturbed copies of
it, each through a fresh random 3x3 convolution (network randomisation, Lee et al. 2020: the filter's
raw float output goes to the network, no clipping or rounding), encode them with each checkpoint's
256-d hidden layer, and embed all features together with t-SNE, one colour per encoder. This is done
for `--frames` frames of each of `--seeds` (each seed its own test levels, random actions and filters);
each encoder's numbers are the mean and sample std over those frames:
  spread   mean distance of the copies' features to their centroid, divided by the same spread of
           the encoder's features over the clean frames (so encoders of different scale and offset
           compare: a constant added to every feature changes neither)
  TV       mean total-variation distance between the policy on each copy and on the clean frame
  entropy  the policy's mean entropy on the clean frames (log 15 = 2.708 is uniform): a near-uniform
           policy has a small TV whatever its features do, so read TV beside it
and, for every pair of encoders, the debiased linear CKA (evaluation.debiased_cka) of their features on
the clean frames (for example PPO seed 1 against PPO seed 2, or MDPO's agents); agreement.py compares
checkpoints on a larger probe set, against the same networks untrained.

    python tsne.py sweeps/demo/runs/bigfish__ppo__1 sweeps/demo/runs/bigfish__mdpo__1 --label "CPU, 2 cores"
    python tsne.py runs/x runs/y runs/z --no-figure      # just the numbers, for any checkpoints
    python tsne.py runs/mdpo_k3 runs/mdpo_k3 runs/mdpo_k3 --mdpo-agent 1 2 3 --no-figure

A run directory or its checkpoint.pt both work; an MDPO checkpoint (K agents) contributes the agent
--mdpo-agent names (one number for all checkpoints, or one per checkpoint).
"""

import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import tyro  # noqa: E402

import drac  # noqa: E402
import evaluation  # noqa: E402
import ppo  # noqa: E402
from evaluation import spread, test_frames, tv_distance  # noqa: E402
from run_data import (METHOD_COLOURS, OTHER_COLOURS, UsageError, check_seed, display_name,  # noqa: E402
                      load_agents, method_of, run_tool, weights_file)


@dataclass
class TsneArgs:
    checkpoints: tyro.conf.Positional[List[str]]
    """run directories or checkpoint files, all of the same game"""
    labels: Optional[List[str]] = None
    """one name per checkpoint (default: the method, e.g. PPO, MDPO, and the agent of an MDPO run)"""
    mdpo_agent: List[int] = field(default_factory=lambda: [1])
    """which agent (1..K) of an MDPO checkpoint to use: one number for all, or one per checkpoint"""
    copies: int = 100
    """random-convolution copies of each perturbed frame (at least 3: the figure shows three)"""
    frames: int = 4
    """frames perturbed per seed (the first of the clean frames, each of its own level)"""
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    """seeds of the levels, the random actions and the filters; the figure shows the first seed's first frame"""
    clean_frames: int = 256
    """clean observations per seed that set each encoder's feature spread and its policy entropy"""
    warmup_steps: int = 50
    """random-action steps before the frames are taken, so that the scene is not a start screen"""
    out: str = "Fig"
    """where the figure and the numbers go"""
    label: str = ""
    """what trained the checkpoints, e.g. "CPU, 2 cores, 50k steps"; added to the title"""
    figure: bool = True
    """draw the t-SNE figure (else print and save only the numbers)"""


def load_encoder(path: str, mdpo_agent: int):
    """(agent, config, agent number or None) from a run directory, checkpoint or weights file of any script;
    an MDPO run holds K agents and gives agent `mdpo_agent` (1-based)."""
    run = load_agents(path)
    if run["config"]["script"] != "mdpo":
        return run["agents"][0], run["config"], None
    if not 1 <= mdpo_agent <= len(run["agents"]):
        raise UsageError(f"--mdpo-agent {mdpo_agent}: {path} has agents 1 to {len(run['agents'])}")
    return run["agents"][mdpo_agent - 1], run["config"], mdpo_agent


def random_conv_copies(frame: np.ndarray, copies: int, seed: int) -> torch.Tensor:
    """`copies` float32 versions of one uint8 HWC frame, each through its own random 3x3 convolution
    (drac.random_conv, the project's one implementation), unclipped as Lee et al. feed them."""
    generator = torch.Generator().manual_seed(seed)
    frames = torch.as_tensor(frame).unsqueeze(0).expand(copies, *frame.shape)
    return drac.random_conv(frames, generator)


@torch.no_grad()
def robustness(agent, clean: torch.Tensor, perturbed: List[torch.Tensor]) -> dict:
    """perturbed[i] holds copies of clean[i]. For each i: the spread of the copies' features over the
    spread of the clean frames' features, and the TV distance of their policies from clean[i]'s. Beside
    them the policy's mean entropy on the clean frames, and the clean frames' features."""
    clean_hidden = agent.hidden(clean)
    clean_spread = spread(clean_hidden)
    clean_log_policies = agent.actor(clean_hidden).log_softmax(-1)
    entropy = -(clean_log_policies.exp() * clean_log_policies).sum(-1).mean()
    spreads, tvs, features = [], [], []
    for index, copies in enumerate(perturbed):
        hidden = agent.hidden(copies)
        spreads.append(float(spread(hidden) / clean_spread))
        logits = agent.actor(hidden)
        tvs.append(float(tv_distance(clean_log_policies[index].expand_as(logits), logits).mean()))
        features.append((hidden / clean_spread).numpy())
    return {"spread": spreads, "tv_distance": tvs, "entropy": float(entropy), "features": features,
            "clean_features": clean_hidden}


def mean_std(values) -> List[float]:
    """[mean, sample std (ddof=1)] over the frames; the std is nan for a single frame."""
    values = np.asarray(values, dtype=np.float64)
    return [float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")]


def draw(frame, perturbed, results, labels, colours, title, path):
    from sklearn.manifold import TSNE

    features = np.concatenate([r["features"] for r in results])
    perplexity = min(30, len(features) - 1)
    # The exact gradient: a few hundred points take a second, and Barnes-Hut's threads crawl on a busy machine.
    embedded = TSNE(n_components=2, perplexity=perplexity, init="pca", method="exact",
                    random_state=0).fit_transform(features)
    fig = plt.figure(figsize=(12, 4.6))
    grid = fig.add_gridspec(2, 4, width_ratios=[1, 1, 0.15, 3])
    # The filters' raw output is shown clipped to the displayable range; the network got it unclipped.
    shown = [(frame, "observation")] + [(perturbed[i].clip(0, 255) / 255, f"random conv {i + 1}") for i in range(3)]
    for k, (image, name) in enumerate(shown):
        ax = fig.add_subplot(grid[k // 2, k % 2])
        ax.imshow(image)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[:, 3])
    start = 0
    for result, label, colour in zip(results, labels, colours):
        n = len(result["features"])
        ax.scatter(*embedded[start:start + n].T, s=18, color=colour,
                   label=f"{label}: spread {result['spread']:.3f}, TV {result['tv_distance']:.3f}, "
                         f"entropy {result['entropy']:.2f}")
        start += n
    ax.set_title("spread: the copies' feature spread over the clean frames'; TV: from the clean frame's policy; "
                 f"entropy: on the clean frames (uniform {np.log(15):.2f})", fontsize=8)
    ax.set_xlabel("t-SNE component 1")
    ax.set_ylabel("t-SNE component 2")
    ax.grid(color="#dddddd")
    ax.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(f"{path}.{ext}", dpi=150, bbox_inches="tight")
    plt.close(fig)


def check(args: TsneArgs) -> None:
    """Bad settings fail here, in one line, before any checkpoint is loaded."""
    if not args.checkpoints:
        raise UsageError("give the run directories (or checkpoints) to compare")
    if args.labels and len(args.labels) != len(args.checkpoints):
        raise UsageError("give one --labels entry per checkpoint")
    if len(args.mdpo_agent) not in (1, len(args.checkpoints)):
        raise UsageError("give one --mdpo-agent for all checkpoints or one per checkpoint")
    if min(args.mdpo_agent) < 1:
        raise UsageError(f"--mdpo-agent counts from 1, got {min(args.mdpo_agent)}")
    if args.copies < 3:  # the figure shows three of them
        raise UsageError(f"--copies must be at least 3, got {args.copies}")
    if args.clean_frames < 2 or args.warmup_steps < 0:  # a spread needs two frames
        raise UsageError("--clean-frames must be at least 2 and --warmup-steps not negative")
    if not 1 <= args.frames <= args.clean_frames:
        raise UsageError(f"--frames must lie in [1, --clean-frames], got {args.frames}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise UsageError("--seeds must name at least one seed, each once")
    for seed in args.seeds:
        check_seed("--seeds", seed)


def label_of(config: dict, agent_number: Optional[int]) -> str:
    name = display_name(method_of(config))
    return name if agent_number is None else f"{name} agent {agent_number}"


def measure(encoders, game: str, mode: str, args: TsneArgs):
    """Every encoder on every seed's frames: per encoder the numbers of every (seed, frame), the pairwise CKA
    of the encoders on each seed's clean frames, and what the figure shows (the first seed's first frame)."""
    numbers = [{"spread": [], "tv_distance": [], "entropy": []} for _ in encoders]
    ckas = {pair: [] for pair in itertools.combinations(range(len(encoders)), 2)}
    figure = None
    for seed in args.seeds:
        frames = test_frames(ppo.ProcgenVecEnv, game, mode, args.clean_frames, args.warmup_steps, seed).numpy()
        perturbed = [random_conv_copies(frames[index], args.copies, seed * 1_000_003 + index)
                     for index in range(args.frames)]
        results = [robustness(agent, torch.as_tensor(frames), perturbed) for agent, _, _ in encoders]
        for k, result in enumerate(results):
            for key in numbers[k]:
                numbers[k][key] += result[key] if isinstance(result[key], list) else [result[key]]
        for i, j in ckas:
            ckas[(i, j)].append(evaluation.debiased_cka(results[i]["clean_features"], results[j]["clean_features"]))
        if figure is None:
            figure = (frames[0], perturbed[0].numpy(), [{"features": r["features"][0], "spread": r["spread"][0],
                                                         "tv_distance": r["tv_distance"][0], "entropy": r["entropy"]}
                                                        for r in results])
    return numbers, ckas, figure


def colours_of(labels: List[str], methods: List[str]) -> List[str]:
    """The method's colour for the first encoder of each method, other colours for the rest."""
    colours, others = [], iter(OTHER_COLOURS * len(labels))
    for method in methods:
        colour = METHOD_COLOURS.get(method)
        colours.append(colour if colour and colour not in colours else next(others))
    return colours


def shared_setting(encoders, read, what: str):
    """The setting `read(args)` that every checkpoint shares, or a UsageError naming the different ones."""
    values = sorted({read(config["args"]) for _, config, _ in encoders})
    if len(values) > 1:
        raise UsageError(f"the checkpoints are of different {what}: {', '.join(values)}")
    return values[0]


def note_repeated_encoders(paths: List[str], encoders) -> None:
    """Say which checkpoints give one encoder twice (one run's file, and its agent where it has K): measured
    twice, not refused, as each encoder's numbers are its own and their CKA of 1 checks the measure."""
    places = [(os.path.dirname(os.path.realpath(weights_file(path))), number)
              for path, (_, _, number) in zip(paths, encoders)]
    for i, j in itertools.combinations(range(len(paths)), 2):
        if places[i] == places[j]:
            agent = "" if places[i][1] is None else f" (agent {places[i][1]})"
            print(f"note: {paths[i]} and {paths[j]}{agent} are one encoder twice: their CKA is 1 by construction",
                  file=sys.stderr)


def main(args: TsneArgs) -> dict:
    check(args)
    agent_numbers = args.mdpo_agent * len(args.checkpoints) if len(args.mdpo_agent) == 1 else args.mdpo_agent
    encoders = [load_encoder(path, number) for path, number in zip(args.checkpoints, agent_numbers)]
    note_repeated_encoders(args.checkpoints, encoders)
    game = shared_setting(encoders, lambda args: args["env_id"], "games")
    # The frames come from the unseen levels of the distribution the agents trained on.
    mode = shared_setting(encoders, lambda args: args.get("distribution_mode", "hard"), "distribution modes")
    labels = args.labels or [label_of(config, number) for _, config, number in encoders]

    numbers, ckas, (frame, perturbed, first_results) = measure(encoders, game, mode, args)
    summary = {"game": game, "distribution_mode": mode, "copies": args.copies, "frames_per_seed": args.frames, "seeds": args.seeds,
               "clean_frames": args.clean_frames, "encoders": [
                   {"label": label, "checkpoint": path, "mdpo_agent": number,
                    **{key: mean_std(values) for key, values in numbers[k].items()}}
                   for k, (label, path, (_, _, number)) in enumerate(zip(labels, args.checkpoints, encoders))],
               "debiased_cka": [{"a": labels[i], "b": labels[j], "cka": mean_std(values)}
                              for (i, j), values in ckas.items()]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"tsne_{game}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print_summary(summary)
    if args.figure:
        title = (f"{game}: {args.copies} random-convolution copies of one observation (seed {args.seeds[0]}); "
                 f"numbers of this frame" + (f" ({args.label})" if args.label else ""))
        colours = colours_of(labels, [display_name(method_of(config)) for _, config, _ in encoders])
        draw(frame, perturbed, first_results, labels, colours, title, os.path.join(args.out, f"tsne_{game}"))
        print(f"figure written to {args.out}/tsne_{game}.png")
    return summary


def plus_minus(mean_and_std: List[float]) -> str:
    """'mean ± std', or the mean alone where one value leaves no std."""
    mean, std = mean_and_std
    return f"{mean:.4f}" + ("" if np.isnan(std) else f" ± {std:.4f}")


def print_summary(summary: dict) -> None:
    cases = len(summary["seeds"]) * summary["frames_per_seed"]
    print(f"{summary['game']}: {summary['copies']} random-conv copies of each of {cases} frames "
          f"({summary['frames_per_seed']} per seed, seeds {', '.join(map(str, summary['seeds']))}); "
          "mean ± sample std over the frames")
    print("| encoder | feature spread | policy TV distance | policy entropy on clean frames |\n|---|---|---|---|")
    for entry in summary["encoders"]:
        cells = [plus_minus(entry[key]) for key in ("spread", "tv_distance", "entropy")]
        print(f"| {entry['label']} | " + " | ".join(cells) + " |")
    for pair in summary["debiased_cka"]:
        print(f"debiased CKA of {pair['a']} and {pair['b']} on the clean frames: "
              f"{plus_minus(pair['cka'])} over {len(summary['seeds'])} seed(s)")


if __name__ == "__main__":
    run_tool(TsneArgs, main)
