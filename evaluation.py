"""The evaluation protocol of ppo.py, drac.py and mdpo.py, and of the tools that test their checkpoints.

A return is the mean raw score of the first complete episode of each evaluation env (SPEC section 3);
agreement between two agents is the debiased linear CKA between their 256-d features and the total
variation between their policies on the same probe frames.
"""

import contextlib
import itertools
import os
import sys

import numpy as np
import torch

import run_utils

# Evaluation's and the probe set's games are seeded this far above the run's seed, away from training's.
EVAL_SEED_OFFSET, PROBE_SEED_OFFSET = 1_000_000, 2_000_000


def log_evaluation(writer, agent, env_class, args, device, iteration, global_step, run_dir, name):
    """Evaluate on test levels (the full distribution) and on the training levels, each in fresh envs of
    env_class (the script's ProcgenVecEnv) that all start an episode at once; log the three scalars and
    return the test return."""
    eval_seed = args.seed + EVAL_SEED_OFFSET + iteration  # differs from the training seed and between evals
    returns = {}
    for levels, num_levels, start_level in (("test", 0, 0), ("train", args.num_levels, args.start_level)):
        env = env_class(args.env_id, args.eval_episodes, num_levels, start_level, args.distribution_mode, eval_seed)
        with contextlib.closing(env):
            returns[levels], frames = evaluate(agent, env, device, eval_seed, args.bf16, args.capture_video and levels == "test")
        if frames:
            log_video(writer, "eval/video", frames, global_step, os.path.join(run_dir, "videos", f"{name}_{global_step}.gif"))
    writer.add_scalar("eval/test_return", returns["test"], global_step)
    writer.add_scalar("eval/train_return", returns["train"], global_step)
    writer.add_scalar("eval/generalization_gap", returns["train"] - returns["test"], global_step)
    return returns["test"]


@torch.inference_mode()
def evaluate(agent, env, device, seed, bf16=False, capture_video=False, perturb=None):
    """Mean raw return of the first complete episode of every env (no bias towards short episodes, as
    stopping "once N episodes have finished" would have), and env 0's frames if asked. Actions come from a
    generator of their own: the training's random stream is untouched. `perturb(frames, envs)`, if given
    (robustness.py's), changes the frames the network sees."""
    was_training = agent.training
    agent.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    obs, _ = env.reset()
    logits_of = eval_network(agent, obs, bf16, device, perturb)
    returns = np.zeros(env.num_envs)
    finished = np.zeros(env.num_envs, dtype=bool)
    frames = [obs[0]] if capture_video else []
    action = np.zeros(env.num_envs, dtype=np.int64)
    while not finished.all():  # every Procgen game has a time limit, so this ends
        # Envs past their first episode repeat their last action; only the running ones' rewards count.
        running = np.flatnonzero(~finished)
        logits = logits_of(obs, running)
        action[running] = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1).cpu().numpy()
        obs, reward, terminated, truncated, _ = env.step(action)
        returns[~finished] += reward[~finished]
        if capture_video and not finished[0]:
            frames.append(obs[0])
        finished |= terminated | truncated
    agent.train(was_training)
    return float(returns.mean()), frames


def eval_network(agent, first_obs, bf16, device, perturb=None):
    """logits_of(obs, running): the policy's logits for the running envs' frames. On a GPU the network
    runs on every env from a CUDA graph (launch-bound: a smaller batch would save nothing); on the CPU
    on the running envs alone, where batch is time."""
    def logits(obs):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16, cache_enabled=False):
            return agent(obs)[0]

    if perturb is not None:  # eager, as perturbed frames may be float (random convolution)
        return lambda obs, running: logits(perturb(torch.as_tensor(obs[running], device=device), running))
    if device.type == "cuda":
        graphed = run_utils.CudaGraphed(logits, torch.as_tensor(first_obs, device=device))
        return lambda obs, running: graphed(torch.as_tensor(obs, device=device))[torch.as_tensor(running, device=device)]
    return lambda obs, running: logits(torch.as_tensor(obs[running], device=device))


def log_video(writer, tag, frames, step, path):
    """Save frames as a GIF and show the same GIF in TensorBoard."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    images = [Image.fromarray(frame).resize((256, 256), Image.NEAREST) for frame in frames[:-1] or frames]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=40, loop=0)
    with open(path, "rb") as f:
        image = Summary.Image(height=256, width=256, colorspace=3, encoded_image_string=f.read())
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def debiased_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Debiased linear CKA (Nguyen et al. 2021) of two representations of the same n >= 4 inputs (n x d1 and
    n x d2): HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) for the Gram matrices K = XX' and L = YY', with the
    unbiased HSIC estimator of Song et al. (2012), in float64. About 0 for independent features at any n and d,
    where the biased HSIC estimator's CKA (Kornblith et al. 2019) is pulled upwards unless n is large beside d; 1 for features that differ by an
    orthogonal transform and an isotropic scaling."""
    x, y = x.double(), y.double()
    gram_x, gram_y = x @ x.T, y @ y.T
    return float(unbiased_hsic(gram_x, gram_y) / (unbiased_hsic(gram_x, gram_x) * unbiased_hsic(gram_y, gram_y)).sqrt())


def unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al.'s (2012) unbiased HSIC estimator from two symmetric n x n Gram matrices, in O(n^2):
    [tr(K'L') + 1'K'1 1'L'1 / ((n - 1)(n - 2)) - 2 1'K'L'1 / (n - 2)] / (n (n - 3)), K' and L' without their diagonals."""
    n = len(k)
    k, l = k - torch.diag_embed(k.diagonal()), l - torch.diag_embed(l.diagonal())
    row_k, row_l = k.sum(1), l.sum(1)
    return ((k * l).sum() + row_k.sum() * row_l.sum() / ((n - 1) * (n - 2)) - 2 * (row_k @ row_l) / (n - 2)) / (n * (n - 3))


def probe_frames(env_class, env_id: str, distribution_mode: str, seed: int, levels: int = 256, depths: int = 8,
                 spacing: int = 12) -> torch.Tensor:
    """The probe set where agents are compared: levels x depths frames of test levels (the full distribution),
    levels envs acting at random and each giving a frame every `spacing` steps, at depths 0 to 84 into its level
    (or into the next one, once an episode ended). Made from the seed alone, so every run with that seed, of any
    method, probes the same frames."""
    envs = env_class(env_id, levels, 0, 0, distribution_mode, seed + PROBE_SEED_OFFSET)
    actions = np.random.default_rng(seed).integers(0, 15, (depths * spacing, levels))
    obs, frames = envs.reset()[0], []
    for step, step_actions in enumerate(actions):
        if step % spacing == 0:
            frames.append(obs.copy())
        obs = envs.step(step_actions)[0]
    envs.close()
    return torch.from_numpy(np.concatenate(frames))


@torch.inference_mode()
def features_and_policy(agent, frames, bf16=False):
    """The agent's 256-d features and action probabilities on the frames (float32), as evaluated: in eval mode
    (without dropout), then back in the mode it was in. In chunks, which bounds the activations' memory."""
    was_training = agent.training
    agent.eval()
    features, probs = [], []
    for chunk in frames.split(512):
        with torch.autocast(frames.device.type, torch.bfloat16, enabled=bf16):
            hidden = agent.hidden(chunk)
            probs.append(agent.actor(hidden).float().softmax(-1))
        features.append(hidden.float())
    agent.train(was_training)
    return torch.cat(features), torch.cat(probs)


def policy_tv(p, q) -> float:
    """Mean over rows of the total-variation distance 1/2 sum_a |p(a) - q(a)| between action distributions."""
    return float(0.5 * (p - q).abs().sum(-1).mean())


def agreement(agents, frames, bf16=False):
    """({(i, j): debiased CKA}, {(i, j): policy TV}) for every pair i < j of the agents on the frames."""
    measured = [features_and_policy(agent, frames, bf16) for agent in agents]
    pairs = list(itertools.combinations(range(len(agents)), 2))
    return ({(i, j): debiased_cka(measured[i][0], measured[j][0]) for i, j in pairs},
            {(i, j): policy_tv(measured[i][1], measured[j][1]) for i, j in pairs})


def test_frames(env_class, game: str, mode: str, count: int, warmup_steps: int, seed: int) -> torch.Tensor:
    """`count` frames of unseen levels, each after `warmup_steps` random actions, from envs of env_class (the
    scripts' ProcgenVecEnv)."""
    env = env_class(game, count, 0, 0, mode, seed)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset()
    for _ in range(warmup_steps):
        obs, *_ = env.step(rng.integers(0, 15, count))
    env.close()
    return torch.as_tensor(obs)


def tv_distance(logits_p, logits_q):
    """Total-variation distance 1/2 sum_a |p(a) - q(a)| between the rows' categorical distributions."""
    return 0.5 * (logits_p.softmax(-1) - logits_q.softmax(-1)).abs().sum(-1)


def spread(features):
    """Mean distance of feature vectors (last dim) to their centroid (over the second-to-last dim)."""
    return (features - features.mean(-2, keepdim=True)).norm(dim=-1).mean()


def interval95(values):
    """(mean, low, high): Student-t 95% interval of the mean with the sample std; no interval from one value."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    from scipy.stats import t

    half = t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, mean - half, mean + half


if __name__ == "__main__":  # a module, not a tool: say where a saved run's evaluation is
    print("error: evaluation.py is the protocol the scripts and tools import; to evaluate a saved run, give it to "
          "robustness.py (its clean return follows this protocol, on levels of its own --seed)", file=sys.stderr)
    raise SystemExit(2)
