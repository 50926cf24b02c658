"""Representation robustness: random-convolution copies of one frame through trained encoders.

The experiment of the paper's t-SNE figure: take one observation, make `--copies` perturbed copies
of it, each through a fresh random 3x3 convolution (network randomisation, Lee et al. 2020),
encode them with each checkpoint's 256-d hidden layer, and embed all features together with
t-SNE, one colour per encoder. Beside the picture, for each encoder:
  spread  mean distance of the copies' features to their centroid, divided by the encoder's mean
          feature norm on clean observations (so encoders of different scale compare);
  TV      mean total-variation distance between the policy on each copy and on the clean frame.

    python tsne.py sweeps/demo/runs/bigfish__ppo__1 sweeps/demo/runs/bigfish__mdpo__1 --label "CPU, 2 cores"
    python tsne.py runs/x runs/y runs/z --no-figure      # just the numbers, for any checkpoints

A run directory or its checkpoint.pt both work; an MDPO checkpoint contributes --mdpo-agent.
"""

import json
import os
from dataclasses import dataclass
from typing import List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import tyro  # noqa: E402

import ppo  # noqa: E402
from plot import METHOD_COLOURS, METHOD_NAMES  # noqa: E402

OTHER_COLOURS = ["#2ca02c", "#9467bd", "#8c564b", "#7f7f7f"]


@dataclass
class TsneArgs:
    checkpoints: tyro.conf.Positional[List[str]]
    """run directories or checkpoint files, all of the same game"""
    labels: Optional[List[str]] = None
    """one name per checkpoint (default: the method, e.g. PPO, MDPO)"""
    mdpo_agent: int = 1
    """which agent of an MDPO checkpoint to use (1 or 2)"""
    copies: int = 100
    """random-convolution copies of the observation"""
    clean_frames: int = 256
    """clean observations that set each encoder's feature scale"""
    warmup_steps: int = 50
    """random-action steps before the frame is taken, so that the scene is not a start screen"""
    seed: int = 0
    """seed of the level, the actions, the filters and t-SNE"""
    out: str = "Fig"
    """where the figure and the numbers go"""
    label: str = ""
    """what trained the checkpoints, e.g. "CPU, 2 cores, 50k steps"; added to the title"""
    figure: bool = True
    """draw the t-SNE figure (else print and save only the numbers)"""


def load_encoder(path: str, mdpo_agent: int):
    """(agent, config) from a run directory or checkpoint file of either script."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a torn or foreign file: say so in one line
        raise SystemExit(f"error: {path} is unreadable ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("script") not in ("ppo", "mdpo"):
        raise SystemExit(f"error: {path} is not a checkpoint of ppo.py or mdpo.py")
    args = checkpoint["args"]
    agent = ppo.Agent(dropout=args.get("dropout", 0.0))
    state = checkpoint["agent"] if checkpoint["script"] == "ppo" else checkpoint["agents"][mdpo_agent - 1]
    agent.load_state_dict(state)
    return agent.eval(), checkpoint["script"], args


def observations(env_id: str, count: int, warmup_steps: int, seed: int) -> np.ndarray:
    """`count` frames of unseen levels after `warmup_steps` random actions: frame 0 is the one perturbed."""
    env = ppo.ProcgenVecEnv(env_id, count, 0, 0, "hard", seed)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset()
    for _ in range(warmup_steps):
        obs, *_ = env.step(rng.integers(0, 15, count))
    return obs


def random_conv_copies(frame: np.ndarray, copies: int, seed: int) -> torch.Tensor:
    """`copies` versions of one uint8 HWC frame, each through its own random 3x3 RGB->RGB convolution
    with Xavier-normal weights (Lee et al. 2020), clipped back to the valid pixel range."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.as_tensor(frame).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    out = []
    for _ in range(copies):
        weight = torch.empty(3, 3, 3, 3)
        std = (2.0 / (3 * 9 + 3 * 9)) ** 0.5
        weight.normal_(0, std, generator=generator)
        out.append(F.conv2d(image, weight, padding=1).clamp(0, 1))
    return (torch.cat(out).permute(0, 2, 3, 1) * 255.0).round().to(torch.uint8)


@torch.no_grad()
def robustness(agent, clean: torch.Tensor, perturbed: torch.Tensor) -> dict:
    """The spread of the perturbed copies' features and the TV distance of their policies."""
    clean_hidden = agent.hidden(clean)
    scale = clean_hidden.norm(dim=1).mean()
    hidden = agent.hidden(perturbed)
    spread = (hidden - hidden.mean(0)).norm(dim=1).mean() / scale
    clean_policy = agent.actor(clean_hidden[:1]).softmax(-1)
    policies = agent.actor(hidden).softmax(-1)
    tv = 0.5 * (policies - clean_policy).abs().sum(-1).mean()
    return {"spread": float(spread), "tv_distance": float(tv), "features": (hidden / scale).numpy()}


def draw(frame, perturbed, results, labels, title, path):
    from sklearn.manifold import TSNE

    features = np.concatenate([r["features"] for r in results])
    perplexity = min(30, len(features) - 1)
    embedded = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(features)
    fig = plt.figure(figsize=(12, 4.6))
    grid = fig.add_gridspec(2, 4, width_ratios=[1, 1, 0.15, 3])
    for k, (image, name) in enumerate([(frame, "observation")] + [(perturbed[i], f"random conv {i + 1}") for i in range(3)]):
        ax = fig.add_subplot(grid[k // 2, k % 2])
        ax.imshow(image)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[:, 3])
    start = 0
    for k, (result, label) in enumerate(zip(results, labels)):
        n = len(result["features"])
        colour = METHOD_COLOURS.get(label, OTHER_COLOURS[k % len(OTHER_COLOURS)])
        ax.scatter(*embedded[start:start + n].T, s=18, color=colour,
                   label=f"{label} encoder: spread {result['spread']:.3f}, TV {result['tv_distance']:.3f}")
        start += n
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
    if args.labels and len(args.labels) != len(args.checkpoints):
        raise SystemExit("error: give one --labels entry per checkpoint")
    if args.mdpo_agent not in (1, 2):
        raise SystemExit(f"error: --mdpo-agent must be 1 or 2, got {args.mdpo_agent}")
    if args.copies < 3:  # the figure shows three of them
        raise SystemExit(f"error: --copies must be at least 3, got {args.copies}")
    if args.clean_frames < 1 or args.warmup_steps < 0:
        raise SystemExit("error: --clean-frames must be positive and --warmup-steps not negative")


def main(args: TsneArgs) -> dict:
    check(args)
    encoders = [load_encoder(path, args.mdpo_agent) for path in args.checkpoints]
    games = {config["env_id"] for _, _, config in encoders}
    if len(games) != 1:
        raise SystemExit(f"error: the checkpoints are of different games: {', '.join(sorted(games))}")
    game = games.pop()
    labels = args.labels or [METHOD_NAMES.get(config["exp_name"], config["exp_name"]) for _, _, config in encoders]

    frames = observations(game, args.clean_frames, args.warmup_steps, args.seed)
    clean = torch.as_tensor(frames)
    perturbed = random_conv_copies(frames[0], args.copies, args.seed)
    results = [robustness(agent, clean, perturbed) for agent, _, _ in encoders]

    os.makedirs(args.out, exist_ok=True)
    summary = {"game": game, "copies": args.copies, "seed": args.seed, "encoders": [
        {"label": label, "checkpoint": path, "spread": r["spread"], "tv_distance": r["tv_distance"]}
        for label, path, r in zip(labels, args.checkpoints, results)]}
    with open(os.path.join(args.out, f"tsne_{game}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"{game}: {args.copies} random-conv copies of one frame")
    print("| encoder | feature spread | policy TV distance |\n|---|---|---|")
    for entry in summary["encoders"]:
        print(f"| {entry['label']} | {entry['spread']:.4f} | {entry['tv_distance']:.4f} |")
    if args.figure:
        title = f"{game}: {args.copies} random-convolution copies of one observation" + (f" ({args.label})" if args.label else "")
        draw(frames[0], perturbed.numpy(), results, labels, title, os.path.join(args.out, f"tsne_{game}"))
        print(f"figure written to {args.out}/tsne_{game}.png")
    return summary


if __name__ == "__main__":
    main(tyro.cli(TsneArgs))
