"""MDPO, Mutual Distillation Policy Optimization, on Procgen with IMPALA-CNN actor-critics.

Two (or --num-agents K) agents learn side by side, each from its own vector of Procgen environments.
Each minimises its PPO loss plus alpha x the mean over its peers of KL(peer || self) on its own states,
which pulls its action distribution towards theirs: mutual distillation as a regulariser. Run
`python mdpo.py --help`.
"""

import contextlib
import ctypes
import errno
import fcntl
import importlib.util
import io
import itertools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Optional

if not (3, 10) <= sys.version_info[:2] <= (3, 12):  # Procgen has wheels for these only; say so before any import fails
    print(f"error: Python {sys.version_info[0]}.{sys.version_info[1]} is not supported, Procgen needs 3.10 to 3.12: "
          f"run `uv run {os.path.basename(sys.argv[0])} ...` (uv fetches a supported Python) or use a 3.10-3.12 venv",
          file=sys.stderr)
    sys.exit(2)

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from gymnasium.vector import AutoresetMode
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

with contextlib.redirect_stderr(io.StringIO()):  # procgen imports the old `gym`, which prints a notice
    from procgen import ProcgenGym3Env

SCRIPT = "mdpo"
PROCGEN_GAMES = (
    "bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
    "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot",
)
# Procgen's "exploration" mode is left out: it fixes one level, so there are no unseen test levels.
DISTRIBUTION_MODES = ("easy", "hard", "extreme", "memory")
# Modes that only some games have; Procgen aborts in C++ on the others.
MODE_GAMES = {
    "extreme": ("chaser", "dodgeball", "leaper", "starpilot"),
    "memory": ("caveflyer", "dodgeball", "heist", "jumper", "maze", "miner"),
}


@dataclass
class Args:
    exp_name: str = SCRIPT
    """the name of this experiment (part of the run directory's name)"""
    seed: int = 1
    """seed of the experiment: networks, sampling and the training levels' order"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """use CUDA when it is available (the CPU otherwise)"""
    track: bool = False
    """log to Weights & Biases too (needs `pip install wandb`)"""
    wandb_project_name: str = "mdpo-procgen"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    capture_video: bool = False
    """record an evaluation episode as a GIF in the run directory and in TensorBoard"""
    run_dir: Optional[str] = None
    """where to write this run (default: runs/{env_id}__{exp_name}__{seed}__{unix_time})"""
    resume: Optional[str] = None
    """continue the run saved in this run directory"""
    checkpoint_interval: int = 10
    """write a checkpoint every this many iterations (and at the end)"""

    # Procgen
    env_id: str = "starpilot"
    """the Procgen game"""
    num_levels: int = 500
    """number of training levels (0: the full level distribution)"""
    start_level: int = 0
    """first training level"""
    distribution_mode: str = "hard"
    """Procgen distribution mode: easy, hard, extreme or memory (the last two for some games only)"""

    # Algorithm
    total_timesteps: int = 50_000_000
    """environment steps of each agent"""
    learning_rate: float = 5e-4
    """Adam's learning rate (constant)"""
    num_envs: int = 64
    """parallel environments of each agent"""
    num_steps: int = 256
    """steps per environment per rollout"""
    gamma: float = 0.999
    """discount factor"""
    gae_lambda: float = 0.95
    """lambda of generalised advantage estimation"""
    num_minibatches: int = 8
    """minibatches per epoch"""
    update_epochs: int = 3
    """epochs over each rollout"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: float = 0.2
    """clipping coefficient of the policy ratio and of the value change"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """gradient norm clip, per agent"""
    num_agents: int = 2
    """K, the number of agents learning side by side (each with its own envs)"""
    alpha: float = 1.0
    """weight of the mutual KL term (0: K independent PPO learners under one loss and optimiser)"""
    detach_peer: bool = False
    """treat the peer's policy as a fixed target in the KL term (classic deep mutual learning)"""

    # Evaluation
    eval_interval: int = 25
    """evaluate on test and training levels every this many iterations"""
    eval_episodes: Optional[int] = None
    """evaluation environments, each contributing its first complete episode (default: num-envs)"""
    eval_perturbation: tuple[str, ...] = ()
    """at each evaluation, play the test levels again with the network seeing perturbed frames (one draw per
    episode) and log eval/test_return_NAME, to follow robustness over training: random_conv, brightness,
    contrast, saturation or hue, each as NAME or NAME:STRENGTH (weak, medium, strong or a number, hue
    up to 0.5 and the others up to 1; NAME alone: strong random_conv, medium colours; as robustness.py),
    e.g. random_conv hue:strong"""

    # Speed (numerics stay float32 unless asked)
    bf16: bool = False
    """run the network under bfloat16 autocast (faster, slightly different numerics)"""
    compile: bool = False
    """torch.compile the network"""

    # Filled in from the above at run time
    batch_size: int = 0
    """the rollout size (computed)"""
    minibatch_size: int = 0
    """the minibatch size (computed)"""
    num_iterations: int = 0
    """the number of iterations (computed)"""


class UsageError(Exception):
    """Bad input from the user: reported as one line, with a non-zero exit."""


# Fields that may change when a run is resumed; every other field must match the checkpoint.
RESUMABLE_FIELDS = {
    "cuda", "track", "wandb_project_name", "wandb_entity", "capture_video", "run_dir", "resume",
    "checkpoint_interval", "total_timesteps", "eval_interval", "eval_episodes", "bf16", "compile",
    "num_iterations",
}
# Not --eval-perturbation: its tags do not name the strength, so another one would continue the same curve.


def validate_args(args: Args) -> Args:
    """Check the flags and fill in the computed sizes; raise UsageError on bad input."""
    for name, value in asdict(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.env_id not in PROCGEN_GAMES:
        raise UsageError(f"unknown game {args.env_id!r}; choose one of: {', '.join(PROCGEN_GAMES)}")
    if args.distribution_mode not in DISTRIBUTION_MODES:
        raise UsageError(f"unknown distribution mode {args.distribution_mode!r}; choose one of: {', '.join(DISTRIBUTION_MODES)}")
    if args.env_id not in MODE_GAMES.get(args.distribution_mode, PROCGEN_GAMES):
        raise UsageError(f"{args.env_id} has no {args.distribution_mode} mode; the games that have it: "
                         f"{', '.join(MODE_GAMES[args.distribution_mode])}")
    if args.num_agents < 2:
        raise UsageError(f"--num-agents must be at least 2 (mutual distillation needs peers), got {args.num_agents}")
    if args.eval_episodes is None:
        args = replace(args, eval_episodes=args.num_envs)
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs",
                 "eval_interval", "eval_episodes", "checkpoint_interval"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("num_levels", "start_level", "ent_coef", "vf_coef", "clip_coef", "max_grad_norm", "alpha"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.learning_rate <= 0:
        raise UsageError(f"--learning-rate must be positive, got {args.learning_rate}")
    args = replace(args, eval_perturbation=tuple(args.eval_perturbation))  # a list from a config.json too
    try:
        perturbed = [parse_perturbation(spec)[0] for spec in args.eval_perturbation]
    except ValueError as error:
        raise UsageError(f"--eval-perturbation: {error}") from None
    if len(set(perturbed)) != len(perturbed):  # each logs eval/test_return_NAME: one strength per name
        raise UsageError("--eval-perturbation names a perturbation twice")
    if not (0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1):
        raise UsageError("--gamma and --gae-lambda must lie in [0, 1]")
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches:
        raise UsageError(f"the batch (num-envs x num-steps = {batch_size}) does not divide into "
                         f"{args.num_minibatches} minibatches")
    if args.norm_adv and batch_size // args.num_minibatches < 2:
        raise UsageError("--norm-adv needs minibatches of at least 2 samples (their advantages' std), "
                         f"got {batch_size // args.num_minibatches}")
    if args.total_timesteps < batch_size:
        raise UsageError(f"--total-timesteps ({args.total_timesteps}) is less than one batch ({batch_size})")
    return replace(args, batch_size=batch_size, minibatch_size=batch_size // args.num_minibatches,
                   num_iterations=args.total_timesteps // batch_size)


# ---------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------


class ProcgenVecEnv(gym.vector.VectorEnv):
    """Procgen's native vectorised env (gym3 interface) as a gymnasium VectorEnv.

    Procgen resets a finished episode inside the step that ended it, so the observation returned
    with `terminated=True` is already the first one of the next episode (AutoresetMode.SAME_STEP).
    Procgen reports no separate truncation: time limits come back as terminations.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, env_id, num_envs, num_levels, start_level, distribution_mode, seed):
        # Threads step disjoint envs, so their number changes the speed, never the results:
        # 8 measured 1.2x faster than procgen's default 4 for 64 envs on a 16-core host.
        self.procgen = ProcgenGym3Env(num=num_envs, env_name=env_id, num_levels=num_levels,
                                      start_level=start_level, distribution_mode=distribution_mode,
                                      rand_seed=seed, num_threads=min(8, max(4, os.cpu_count() or 4)))
        self.num_envs = num_envs
        self.single_observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self.single_action_space = gym.spaces.Discrete(15)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)

    def reset(self, *, seed=None, options=None):
        # Procgen environments start when they are created; a reset returns the current frames.
        _, obs, _ = self.procgen.observe()
        return obs["rgb"], {}

    def step(self, actions):
        self.procgen.act(np.asarray(actions, dtype=np.int32))
        reward, obs, first = self.procgen.observe()
        return obs["rgb"], reward, first.copy(), np.zeros_like(first), {}


def make_envs(args: Args, seed: int) -> gym.vector.VectorEnv:
    """Training envs: raw Procgen, episode statistics of the raw score, then reward normalisation."""
    envs = ProcgenVecEnv(args.env_id, args.num_envs, args.num_levels, args.start_level,
                         args.distribution_mode, seed)
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    envs = gym.wrappers.vector.NormalizeReward(envs, gamma=args.gamma)
    # One np.clip over the whole vector: gymnasium's vector ClipReward clips env by env, which
    # measured a quarter of an H100 rollout's time.
    return gym.wrappers.vector.TransformReward(envs, lambda rewards: np.clip(rewards, -10, 10))


def make_eval_env(args: Args, num_levels: int, seed: int) -> ProcgenVecEnv:
    """Fresh evaluation envs, so every env starts an episode at once (no partial episodes)."""
    return ProcgenVecEnv(args.env_id, args.eval_episodes, num_levels, args.start_level if num_levels else 0,
                         args.distribution_mode, seed)


def env_state(envs) -> dict:
    """Everything needed to continue these training envs exactly: games, statistics, normaliser."""
    stats, norm = envs.env.env, envs.env
    return {
        "procgen": stats.env.procgen.get_state(),
        "episode_returns": stats.episode_returns.copy(), "episode_lengths": stats.episode_lengths.copy(),
        "stats_prev_dones": stats.prev_dones.copy(),
        "return_rms": (norm.return_rms.mean, norm.return_rms.var, norm.return_rms.count),
        "accumulated_reward": norm.accumulated_reward.copy(), "norm_prev_dones": norm._prev_dones.copy(),
    }


def restore_env_state(envs, state: dict) -> None:
    stats, norm = envs.env.env, envs.env
    stats.env.procgen.set_state(state["procgen"])
    stats.episode_returns[:], stats.episode_lengths[:] = state["episode_returns"], state["episode_lengths"]
    stats.prev_dones[:] = state["stats_prev_dones"]
    norm.return_rms.mean, norm.return_rms.var, norm.return_rms.count = state["return_rms"]
    norm.accumulated_reward[:], norm._prev_dones[:] = state["accumulated_reward"], state["norm_prev_dones"]


# ---------------------------------------------------------------------------------------------
# Network: IMPALA-CNN actor-critic
# ---------------------------------------------------------------------------------------------


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class SharedDropout(nn.Module):
    """Dropout as Cobbe et al. (2019) define it in openai/coinrun: one mask per layer, of the layer's
    feature shape, shared by every sample in the batch.

    The mask is a buffer, so it is the same in the rollout and in the update (PPO's ratio compares
    one network), is saved with the weights, and changes only when `redraw()` is called (once after
    each update phase). In eval mode (evaluation) the layer is the identity.
    """

    def __init__(self, p, shape):
        super().__init__()
        self.p = p
        self.register_buffer("mask", torch.empty(shape))
        self.redraw()

    @torch.no_grad()
    def redraw(self):
        # In place: a CUDA graph replaying the rollout's policy reads the buffer where it lives.
        keep = torch.rand(self.mask.shape, device=self.mask.device) > self.p
        self.mask.copy_(keep / (1 - self.p))

    def forward(self, x):
        return x * self.mask.to(x.dtype) if self.training else x


def dropout_layer(p, channels, size):
    """Dropout after a convolution whose output is channels x size x size; nothing when p = 0."""
    return SharedDropout(p, (1, channels, size, size)) if p > 0 else nn.Identity()


class ResidualBlock(nn.Module):
    def __init__(self, channels, size, dropout=0.0):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.drop0 = dropout_layer(dropout, channels, size)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.drop1 = dropout_layer(dropout, channels, size)

    def forward(self, x):
        inputs = x
        x = self.drop0(self.conv0(F.relu(x)))
        x = self.drop1(self.conv1(F.relu(x)))
        return x + inputs


class ConvSequence(nn.Module):
    def __init__(self, in_channels, out_channels, size, dropout=0.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.drop = dropout_layer(dropout, out_channels, size)
        self.res_block0 = ResidualBlock(out_channels, size // 2, dropout)
        self.res_block1 = ResidualBlock(out_channels, size // 2, dropout)

    def forward(self, x):
        x = self.drop(self.conv(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        x = self.res_block0(x)
        return self.res_block1(x)


class Agent(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        layers = []
        channels, size = 3, 64
        for out_channels in (16, 32, 32):
            layers.append(ConvSequence(channels, out_channels, size, dropout))
            channels, size = out_channels, size // 2
        # 64x64 frames are halved by each of the three max-pools: 32 channels x 8 x 8 = 2048 features.
        layers += [nn.Flatten(), nn.ReLU(), nn.Linear(32 * 8 * 8, 256), nn.ReLU()]
        self.network = nn.Sequential(*layers)
        self.actor = layer_init(nn.Linear(256, 15), std=0.01)
        self.critic = layer_init(nn.Linear(256, 1), std=1)

    def redraw_dropout_masks(self):
        for module in self.modules():
            if isinstance(module, SharedDropout):
                module.redraw()

    def hidden(self, x):
        """The 256-d representation of uint8 NHWC frames."""
        # Permuting NHWC to NCHW gives a channels-last tensor without a copy.
        return self.network(x.permute(0, 3, 1, 2).float() / 255.0)

    def forward(self, x):
        hidden = self.hidden(x)
        return self.actor(hidden).float(), self.critic(hidden).float().squeeze(-1)


def sample_action(logits):
    """One draw per row from Categorical(logits) by the Gumbel-max trick: argmax(logits + Gumbel noise).

    The same distribution as torch.multinomial, but made of plain kernels, so it can run inside a
    CUDA graph. Clamping the uniforms away from 0 keeps every noise value finite.
    """
    uniform = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)
    return (logits - torch.log(-torch.log(uniform))).argmax(-1)


def policy_step(agent, obs, bf16):
    """The rollout's work per env step: sampled actions, their log-probabilities and the values."""
    # No autocast cache: a CUDA graph must cast the current weights on every replay, not stale copies.
    with torch.autocast(obs.device.type, torch.bfloat16, enabled=bf16, cache_enabled=False):
        logits, value = agent(obs)
    action = sample_action(logits)
    return action, F.log_softmax(logits, dim=-1).gather(-1, action[:, None]).squeeze(-1), value


class CudaGraphed:
    """fn(x) replayed from a CUDA graph, for inputs shaped like `example`: one launch, not one per kernel.

    At the rollout's batch the network is launch-bound: replaying the policy step measured 4.4x
    faster than eager on an H100. The graph reads the parameters where they live, so optimiser
    steps (in place) reach it; its outputs are overwritten by the next call.
    """

    def __init__(self, fn, example):
        self.input = example.clone()
        # Warm-up draws random numbers; restoring the state keeps a resumed run's stream unchanged.
        rng = torch.cuda.get_rng_state(example.device)
        with torch.inference_mode():
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):  # warm-up on a side stream, as graph capture requires
                for _ in range(3):
                    fn(self.input)
            torch.cuda.current_stream().wait_stream(side_stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = fn(self.input)
        torch.cuda.set_rng_state(rng, example.device)

    def __call__(self, x):
        self.input.copy_(x)
        self.graph.replay()
        return self.output


def make_policy(agent, args: Args, device):
    """The rollout's policy: replayed from a CUDA graph on a GPU, called eagerly on the CPU."""
    step = torch.inference_mode()(lambda obs: policy_step(agent, obs, args.bf16))
    if device.type == "cuda":
        return CudaGraphed(step, torch.zeros((args.num_envs, 64, 64, 3), dtype=torch.uint8, device=device))
    return step


# ---------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------


def compute_gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda):
    """Generalised advantage estimates and returns of one rollout ([num_steps, num_envs] tensors).

    dones[t] is 1 where obs[t] is the first frame of an episode, i.e. the step before it ended one.
    """
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        if t == rewards.shape[0] - 1:
            next_nonterminal, next_values = 1.0 - next_done, next_value
        else:
            next_nonterminal, next_values = 1.0 - dones[t + 1], values[t + 1]
        delta = rewards[t] + gamma * next_values * next_nonterminal - values[t]
        advantages[t] = last_gae = delta + gamma * gae_lambda * next_nonterminal * last_gae
    return advantages, advantages + values


def ppo_losses(new_logprob, old_logprob, advantages, new_value, old_value, returns, clip_coef, norm_adv):
    """Clipped surrogate and clipped value losses, with the diagnostics PPO logs."""
    logratio = new_logprob - old_logprob
    ratio = logratio.exp()
    if norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    value_clipped = old_value + (new_value - old_value).clamp(-clip_coef, clip_coef)
    v_loss = 0.5 * torch.max((new_value - returns) ** 2, (value_clipped - returns) ** 2).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1).abs() > clip_coef).float().mean()
    return pg_loss, v_loss, approx_kl, clipfrac


def mutual_kl(peer_logits, own_logits):
    """mean over states of KL(peer || own), from logits through log-softmax (no epsilon needed)."""
    peer_logp = F.log_softmax(peer_logits, dim=-1)
    own_logp = F.log_softmax(own_logits, dim=-1)
    return (peer_logp.exp() * (peer_logp - own_logp)).sum(-1).mean()


class Rollout:
    """One agent's rollout buffer, plus the env frames to continue from. Frames stay uint8.

    What the network reads lives on the device. Rewards and done flags are read by GAE alone, so
    they stay on the host and move once per rollout instead of twice per env step.
    """

    def __init__(self, args: Args, device):
        shape = (args.num_steps, args.num_envs)
        self.obs = torch.zeros(shape + (64, 64, 3), dtype=torch.uint8, device=device)
        self.actions = torch.zeros(shape, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(shape, device=device)
        self.values = torch.zeros(shape, device=device)
        self.rewards = torch.zeros(shape)
        self.dones = torch.zeros(shape)
        self.next_obs = torch.zeros((args.num_envs, 64, 64, 3), dtype=torch.uint8, device=device)
        self.next_done = torch.zeros(args.num_envs)
        # New frames reach the device through pinned host memory, which copies without a host stall.
        self.staging = torch.zeros((args.num_envs, 64, 64, 3), dtype=torch.uint8, pin_memory=device.type == "cuda")

    def start(self, envs) -> None:
        """Continue from the envs' current frames, each env at the start of an episode."""
        self.next_obs.copy_(torch.from_numpy(envs.reset()[0]))
        self.next_done.fill_(1)

    def flat(self, advantages, returns) -> dict:
        """The rollout as [batch] tensors for the update."""
        return {"obs": self.obs.flatten(0, 1), "actions": self.actions.flatten(), "logprobs": self.logprobs.flatten(),
                "values": self.values.flatten(), "advantages": advantages.flatten(), "returns": returns.flatten()}


def act(policy, rollout: Rollout, step: int):
    """Record the step's observations and choose the envs' actions; returns the actions on the host."""
    rollout.obs[step] = rollout.next_obs
    rollout.dones[step] = rollout.next_done
    action, logprob, value = policy(rollout.next_obs)
    rollout.actions[step], rollout.logprobs[step], rollout.values[step] = action, logprob, value
    return action.cpu().numpy()  # the step's one sync


def store_step(result, rollout: Rollout, step: int, global_step: int, episodes: list) -> None:
    """Store what the envs returned for the step; append the episodes that ended to `episodes`."""
    next_obs, reward, terminated, truncated, info = result
    rollout.rewards[step] = torch.from_numpy(reward)
    rollout.next_done.copy_(torch.from_numpy(terminated | truncated))
    # The staging buffer is rewritten only after the next step's sync, when this copy has finished.
    rollout.staging.numpy()[:] = next_obs
    rollout.next_obs.copy_(rollout.staging, non_blocking=True)
    if "episode" in info:
        for i in np.flatnonzero(info["_episode"]):
            episodes.append((global_step, float(info["episode"]["r"][i]), int(info["episode"]["l"][i])))


def finish_rollout(policy, rollout: Rollout, args: Args, device) -> dict:
    """Bootstrap from the last observations, compute GAE and return the batch for the update."""
    next_value = policy(rollout.next_obs)[2]
    # GAE is a loop of num_steps tiny steps: on the host it measured 3x faster than as GPU launches.
    advantages, returns = compute_gae(rollout.rewards, rollout.values.cpu(), rollout.dones, next_value.cpu(),
                                      rollout.next_done, args.gamma, args.gae_lambda)
    return rollout.flat(advantages.to(device), returns.to(device))


def collect_rollouts(policies, envs, rollouts, args: Args, device, global_step: int, overlap: bool):
    """Every agent's rollout, their steps interleaved; returns the new global_step, episodes and batches.

    With `overlap` (on a GPU) each agent's env step runs on a worker thread while the main thread
    stores the other agent's last step and runs its policy: Procgen steps on its own threads and
    releases the GIL. On the CPU the policy needs the cores the envs would step on (overlapping
    measured 0.80-1.00x of stepping in turn on 2 cores), so there the env steps run in the main
    thread. Either way each agent sees exactly what it would see stepping alone.
    """
    episodes = [[] for _ in envs]  # per agent: (global step, raw return, length) of every episode that ended
    stepping = [None for _ in envs]  # per agent: its env step, in flight or done

    def store(i, step):
        store_step(stepping[i].result(), rollouts[i], step, global_step + (step + 1) * args.num_envs, episodes[i])

    with ThreadPoolExecutor(max_workers=len(envs)) as pool:
        for step in range(args.num_steps):
            for i in range(len(envs)):
                if step > 0:
                    store(i, step - 1)
                actions = act(policies[i], rollouts[i], step)
                stepping[i] = pool.submit(envs[i].step, actions) if overlap else finished(envs[i].step(actions))
        for i in range(len(envs)):
            store(i, args.num_steps - 1)
    batches = [finish_rollout(policy, rollout, args, device) for policy, rollout in zip(policies, rollouts)]
    return global_step + args.num_steps * args.num_envs, episodes, batches


def finished(result) -> Future:
    """A future that already holds its result."""
    future = Future()
    future.set_result(result)
    return future


def ppo_objective(logits, new_value, batch: dict, mb_inds, args: Args):
    """PPO's loss (clipped surrogate + clipped value loss - entropy bonus) on one agent's minibatch."""
    # No argument validation: non-finite logits must reach the divergence check, not raise here.
    probs = Categorical(logits=logits, validate_args=False)
    pg_loss, v_loss, approx_kl, clipfrac = ppo_losses(
        probs.log_prob(batch["actions"][mb_inds]), batch["logprobs"][mb_inds], batch["advantages"][mb_inds],
        new_value, batch["values"][mb_inds], batch["returns"][mb_inds], args.clip_coef, args.norm_adv)
    entropy = probs.entropy().mean()
    loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss
    stats = {"policy_loss": pg_loss, "value_loss": v_loss, "entropy": entropy, "approx_kl": approx_kl,
             "clipfrac": clipfrac}
    return loss, stats


def minibatch_loss(agents, batches, mb_inds, args: Args):
    """Each agent's loss L_i = PPO loss + alpha * mean over peers j of KL(pi_j || pi_i) on its own minibatch B_i."""
    obs = [batch["obs"][mb_inds] for batch in batches]
    # on_states[j][i]: agent j's logits on agent i's states; own_values[i]: agent i's values on its own.
    on_states, own_values = [], []
    for j, agent in enumerate(agents):
        # One forward over every agent's states: its own first (for its PPO loss), then its peers' (for their KL).
        order = [j] + [i for i in range(len(agents)) if i != j]
        with torch.autocast(obs[j].device.type, torch.bfloat16, enabled=args.bf16):
            logits, values = agent(torch.cat([obs[i] for i in order]))
        chunks = logits.split(len(mb_inds))
        on_states.append([chunks[order.index(i)] for i in range(len(agents))])
        own_values.append(values[:len(mb_inds)])
    losses, stats = [], []
    for i in range(len(agents)):
        own_logits = on_states[i][i]
        loss, agent_stats = ppo_objective(own_logits, own_values[i], batches[i], mb_inds, args)
        peer_logits = [on_states[j][i] for j in range(len(agents)) if j != i]  # the peers' policies on i's states
        if args.detach_peer:
            peer_logits = [logits.detach() for logits in peer_logits]
        kl = torch.stack([mutual_kl(logits, own_logits) for logits in peer_logits]).mean()
        if args.alpha > 0:  # alpha = 0 leaves the agents independent: no gradient crosses
            loss = loss + args.alpha * kl
        agent_stats["mutual_kl"] = kl
        losses.append(loss)
        stats.append({key: value.detach() for key, value in agent_stats.items()})
    return losses, stats


def update(agents, optimizer, batches, args: Args) -> list:
    """update_epochs passes of minibatch steps on L = mean_i L_i; returns each agent's mean losses."""
    totals = [{} for _ in agents]
    for _ in range(args.update_epochs):
        permutation = torch.randperm(args.batch_size, device=batches[0]["obs"].device)
        for start in range(0, args.batch_size, args.minibatch_size):
            mb_inds = permutation[start:start + args.minibatch_size]  # the same indices for every agent's buffer
            losses, stats = minibatch_loss(agents, batches, mb_inds, args)
            optimizer.zero_grad(set_to_none=True)
            (sum(losses) / len(agents)).backward()
            for agent, agent_stats in zip(agents, stats):  # each agent's gradient is clipped on its own
                agent_stats["grad_norm"] = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
            for agent_totals, agent_stats in zip(totals, stats):
                for key, value in agent_stats.items():
                    agent_totals[key] = agent_totals.get(key, 0.0) + value
    num_minibatches = args.update_epochs * args.num_minibatches
    # One host sync per iteration, not one per minibatch.
    return [{key: float(value) / num_minibatches for key, value in agent_totals.items()} for agent_totals in totals]


def explained_variance(values, returns) -> float:
    var_returns = returns.var()
    return float("nan") if var_returns == 0 else float(1 - (returns - values).var() / var_returns)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


# --eval-perturbation's perturbations are ppo.py's, the project's one implementation of them (robustness.py
# uses them too); imported when called, so that a run without the flag needs nothing beside this file.


def parse_perturbation(spec: str):
    """(name, strength) from NAME or NAME:STRENGTH: ppo.parse_perturbation."""
    from ppo import parse_perturbation
    return parse_perturbation(spec)


def EpisodePerturbation(name, strength, num_envs, seed):
    """ppo.EpisodePerturbation: one random draw per episode of each env."""
    from ppo import EpisodePerturbation
    return EpisodePerturbation(name, strength, num_envs, seed)


@torch.inference_mode()
def evaluate(agent, env, device, seed, bf16=False, capture_video=False, perturb=None):
    """Mean raw return of the first complete episode of every env, and env 0's frames if asked.
    `perturb(frames, envs)`, if given (an EpisodePerturbation), changes the frames the network sees.

    Counting only each env's first episode avoids the bias towards short episodes that stopping
    "once N episodes have finished" across envs would have. Actions are sampled from the policy
    with a generator of their own, so evaluating leaves the training's random stream untouched.
    """
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
    """logits_of(obs, running): the policy's logits for the running envs' frames.

    On a GPU the network runs on every env from a CUDA graph, where a smaller batch would save
    nothing (launch-bound); on the CPU it runs on the running envs alone, where batch is time.
    """
    def logits(obs):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16, cache_enabled=False):
            return agent(obs)[0]

    if perturb is not None:  # robustness tests: eager, as perturbed frames may be float (random convolution)
        return lambda obs, running: logits(perturb(torch.as_tensor(obs[running], device=device), running))
    if device.type == "cuda":
        graphed = CudaGraphed(logits, torch.as_tensor(first_obs, device=device))
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


def log_evaluation(writer, agent, args: Args, device, iteration, global_step, run_dir, name):
    """Evaluate on test levels (full distribution) and on training levels; log the three scalars."""
    eval_seed = args.seed + 1_000_000 + iteration  # differs from the training seed and between evals
    test_return, frames = evaluate(agent, make_eval_env(args, 0, eval_seed), device, eval_seed, args.bf16,
                                   args.capture_video)
    train_return, _ = evaluate(agent, make_eval_env(args, args.num_levels, eval_seed), device, eval_seed, args.bf16)
    writer.add_scalar("eval/test_return", test_return, global_step)
    writer.add_scalar("eval/train_return", train_return, global_step)
    writer.add_scalar("eval/generalization_gap", train_return - test_return, global_step)
    for spec in args.eval_perturbation:  # the clean test's levels and action seed: only the frames differ
        perturbation, strength = parse_perturbation(spec)
        perturb = EpisodePerturbation(perturbation, strength, args.eval_episodes, eval_seed)
        perturbed_return, _ = evaluate(agent, make_eval_env(args, 0, eval_seed), device, eval_seed, args.bf16,
                                       perturb=perturb)
        writer.add_scalar(f"eval/test_return_{perturbation}", perturbed_return, global_step)
    if args.capture_video:
        log_video(writer, "eval/video", frames, global_step, os.path.join(run_dir, "videos", f"{name}_{global_step}.gif"))
    return test_return


# ---------------------------------------------------------------------------------------------
# Agreement between the agents: representation similarity and policy distance
# ---------------------------------------------------------------------------------------------


def probe_frames(args: Args, num_envs: int = 16, steps: int = 16) -> torch.Tensor:
    """A fixed set of test-level frames (full level distribution), drawn once from the run's seed with
    random actions: where the agents' representations and policies are compared at every evaluation."""
    envs = ProcgenVecEnv(args.env_id, num_envs, 0, 0, args.distribution_mode, args.seed + 2_000_000)
    actions = np.random.default_rng(args.seed).integers(0, 15, (steps, num_envs))
    frames = [envs.step(step_actions)[0].copy() for step_actions in actions]
    envs.close()
    return torch.from_numpy(np.concatenate(frames))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same n inputs (n x d1, n x d2):
    ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F) on column-centred features; 1 for representations that differ
    by an orthogonal transform and an isotropic scaling, in float64."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


@torch.inference_mode()
def log_agreement(writer, agents, frames, global_step, bf16) -> None:
    """Log the mean over agent pairs of linear CKA between their 256-d features and of the total-variation
    distance between their policies, on the probe frames (each pair too when K > 2)."""
    features, probs = [], []
    for agent in agents:
        was_training = agent.training
        agent.eval()
        with torch.autocast(frames.device.type, torch.bfloat16, enabled=bf16):
            hidden = agent.hidden(frames)
            logits = agent.actor(hidden)
        agent.train(was_training)
        features.append(hidden.float())
        probs.append(logits.float().softmax(-1))
    ckas, tvs = [], []
    for i, j in itertools.combinations(range(len(agents)), 2):
        ckas.append(linear_cka(features[i], features[j]))
        tvs.append(float(0.5 * (probs[i] - probs[j]).abs().sum(-1).mean()))
        if len(agents) > 2:
            writer.add_scalar(f"eval/representation_cka_{i + 1}_{j + 1}", ckas[-1], global_step)
    writer.add_scalar("eval/representation_cka", float(np.mean(ckas)), global_step)
    writer.add_scalar("eval/policy_tv", float(np.mean(tvs)), global_step)


# ---------------------------------------------------------------------------------------------
# Run directory, checkpoints, resume
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # The current device's state only, so the run can resume on a machine with another number of GPUs.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # The checkpoint is loaded onto the training device, but RNG states must be CPU byte tensors.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_state = state["cuda"]
        if isinstance(cuda_state, (list, tuple)):  # older checkpoints saved every visible GPU's state
            cuda_state = cuda_state[0]
        torch.cuda.set_rng_state(cuda_state.cpu())


class Diverged(Exception):
    """A loss, gradient or weight went non-finite: the run stops with exit code 3, its last good checkpoint kept."""


class StorageError(Exception):
    """A checkpoint could not be written (full disk, unwritable directory): the previous one is intact."""


class Preempted(Exception):
    """SIGTERM or SIGUSR2 arrived: the run wrote a checkpoint and stops with exit code 4, to be resumed."""


class StopSignals:
    """SIGTERM and SIGUSR2 (what Slurm and submitit send before they kill a job) ask the run to stop
    at the end of the current iteration, after a checkpoint. The handlers only set a flag."""

    def __init__(self):
        self.received = None
        self.previous = {}
        for signum in (signal.SIGTERM, signal.SIGUSR2):
            self.previous[signum] = signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C waits until the block is done, so that a checkpoint and its status.json are written together."""
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def write_durably(path: str, write) -> None:
    """write(file) into path + ".tmp", flushed and fsynced, then renamed over path, and the rename fsynced:
    a kill or a machine crash at any moment leaves either the old file or the new one, never a torn one."""
    try:
        with open(path + ".tmp", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_checkpoint(run_dir: str, checkpoint: dict) -> None:
    """Write the checkpoint, then status.json (which tells tools such as sweep.py how far the run got
    without loading it). Each write is atomic and Ctrl-C waits for both; a kill between the two leaves
    status.json one checkpoint behind, which the next resume rewrites from the checkpoint."""
    with interrupts_deferred():
        write_durably(os.path.join(run_dir, "checkpoint.pt"), lambda f: torch.save(checkpoint, f))
        write_status(run_dir, checkpoint, checkpoint["args"]["num_iterations"])


def write_status(run_dir: str, checkpoint: dict, num_iterations: int) -> None:
    status = {"global_step": checkpoint["global_step"], "iteration": checkpoint["iteration"],
              "finished": checkpoint["iteration"] >= num_iterations}
    write_durably(os.path.join(run_dir, "status.json"), lambda f: f.write(json.dumps(status).encode()))


def saved_config(run_dir: str) -> dict:
    """The config.json of a run directory, or a UsageError saying why it cannot be resumed."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise UsageError(f"cannot resume: {run_dir} does not exist")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        raise UsageError(f"cannot resume: {run_dir} holds no checkpoint of a run "
                         "(a run stopped before its first checkpoint starts afresh without --resume)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot resume: {path} is unreadable ({type(error).__name__})") from None
    if not isinstance(config, dict) or not isinstance(config.get("args"), dict):
        raise UsageError(f"cannot resume: {path} is not a run's config")
    if config.get("script") != SCRIPT:
        raise UsageError(f"cannot resume: {run_dir} was made by {config.get('script')}.py, not {SCRIPT}.py")
    # JSON gives the tuple fields (--eval-perturbation) back as lists: restore what Args held.
    config["args"] = {key: tuple(value) if isinstance(value, list) else value for key, value in config["args"].items()}
    return config


def check_compatible(args: Args, config: dict) -> None:
    """Refuse to resume with flags that change what the run computes."""
    for key, value in asdict(args).items():
        # A field missing from an older run's config held its default there.
        saved = config["args"].get(key, Args.__dataclass_fields__[key].default)
        if key not in RESUMABLE_FIELDS and saved != value:
            raise UsageError(f"cannot resume: --{key.replace('_', '-')} is {value!r} here but "
                             f"{saved!r} in the checkpoint")


def load_checkpoint(args: Args, device) -> dict:
    """The checkpoint to resume from, after checking that it fits this script and these flags."""
    check_compatible(args, saved_config(args.resume))
    path = os.path.join(args.resume, "checkpoint.pt")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
    except Exception as error:  # a torn or foreign file: say so in one line
        raise UsageError(f"cannot resume: {path} is unreadable ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != SCRIPT:
        raise UsageError(f"cannot resume: {path} is not a {SCRIPT}.py checkpoint")
    check_compatible(args, checkpoint)
    if checkpoint["iteration"] > args.num_iterations:
        raise UsageError(f"cannot resume: the run is at step {checkpoint['global_step']:,}, past --total-timesteps "
                         f"{args.total_timesteps:,} (a run is extended, never shortened)")
    return checkpoint


def lock_run_dir(run_dir: str):
    """Hold an exclusive lock on run_dir/lock while this process trains there (the kernel drops it
    when the process dies, even by SIGKILL): two processes never train one run directory."""
    os.makedirs(run_dir, exist_ok=True)
    lock = open(os.path.join(run_dir, "lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise UsageError(f"{run_dir} is in use by {owner}") from None
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "slurm_job_id": os.environ.get("SLURM_JOB_ID")}))
    lock.flush()
    return lock


def open_run_dir(args: Args):
    """The run directory, locked, and the args to run with: running the command of a run that holds a
    checkpoint again continues it (as --resume does); a run stopped before its first checkpoint starts afresh."""
    if args.resume:
        saved_config(args.resume)  # a missing or foreign run fails here, before anything is written
    run_dir = args.resume or args.run_dir or f"runs/{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    lock = lock_run_dir(run_dir)
    if not args.resume and os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        check_compatible(args, saved_config(run_dir))
        print(f"{run_dir} holds a checkpoint: continuing it", file=sys.stderr)
        args = replace(args, resume=run_dir)
    elif not args.resume:
        discard_unfinished_run(run_dir)
    return args, run_dir, lock


def discard_unfinished_run(run_dir: str) -> None:
    """Remove what a run that stopped before its first checkpoint logged, so that it starts afresh."""
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        return
    print(f"{run_dir} holds a run stopped before its first checkpoint: starting it afresh", file=sys.stderr)
    for directory, _, files in os.walk(run_dir):
        for name in files:
            if name.startswith("events.out.tfevents.") or name in ("config.json", "status.json", "diverged.json"):
                os.remove(os.path.join(directory, name))


def write_config(args: Args, run_dir: str) -> None:
    # Rewritten on resume too, so that a run extended with more --total-timesteps resumes as extended.
    config = {"script": SCRIPT, "args": asdict(args)}
    write_durably(os.path.join(run_dir, "config.json"), lambda f: f.write(json.dumps(config, indent=2).encode()))


def stop_diverged(run_dir: str, iteration: int, global_step: int, what: str):
    """Record where and how the run diverged, keep the last good checkpoint, and stop (exit code 3)."""
    record = {"iteration": iteration, "global_step": global_step, "what": what}
    write_durably(os.path.join(run_dir, "diverged.json"), lambda f: f.write(json.dumps(record).encode()))
    raise Diverged(f"diverged at iteration {iteration} (step {global_step}): {what}; "
                   f"the last good checkpoint in {run_dir} is kept")


def find_nonfinite(stats: list, agents: list) -> Optional[str]:
    """What went non-finite in an iteration's losses and gradient norms (already on the host) or in
    the weights after its last optimiser step; None when everything is finite."""
    for i, (agent_stats, agent) in enumerate(zip(stats, agents)):
        whose = f"agent {i + 1}'s " if len(agents) > 1 else ""
        for key, value in agent_stats.items():
            if not math.isfinite(value):
                return f"{whose}{key} is {value}"
        weights = torch.cat([p.detach().flatten() for p in agent.parameters()])
        if not bool(torch.isfinite(weights).all()):
            return f"{whose}weights are non-finite after the update"
    return None


class Timer:
    """Wall-clock seconds of the parts of one iteration, logged as perf/* scalars (bench.py reads them)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds = {}

    def lap(self, name=None):
        now = time.perf_counter()
        if name:
            self.seconds[name] = now - self.last
        self.last = now

    def log(self, writer, step):
        self.seconds["iteration"] = time.perf_counter() - self.start
        for name, seconds in self.seconds.items():
            writer.add_scalar(f"perf/{name}_seconds", seconds, step)


def hyperparameter_table(args: Args) -> str:
    return "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())


def machine_description(device) -> str:
    """What this process trains on, logged as text at each start, so a run resumed elsewhere says so."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    return f"{where}; torch {torch.__version__}; Python {sys.version.split()[0]}; commit {source_commit()}"


def source_commit() -> str:
    """The git commit of the scripts, with "+changes" when tracked files differ from it; "unknown"
    outside a git checkout."""
    def git(*command):
        return subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), *command],
                              capture_output=True, text=True, timeout=10)
    try:
        head, changes = git("rev-parse", "--short=7", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+changes" if changes.stdout.strip() else "")


def start_tracking(args: Args, run_dir: str) -> None:
    """Mirror the TensorBoard logs to Weights & Biases."""
    import wandb

    wandb.tensorboard.patch(root_logdir=run_dir)
    wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args),
               name=os.path.basename(run_dir.rstrip("/")), id=os.path.basename(run_dir.rstrip("/")),
               resume="allow", dir=run_dir, save_code=True)


def select_device(args: Args):
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def keep_freed_memory() -> None:
    """Stop glibc from handing large freed blocks back to the OS after every batch.

    By default each activation tensor of a minibatch is a fresh mmap whose pages fault in again on
    the next one; reusing freed memory measured 1.2-1.5x faster forward+backward on a 2-core CPU.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap'd blocks, so large blocks are reused from the heap
    libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap


def seed_everything(args: Args) -> None:
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic


def make_agent(args: Args, device):
    agent = Agent().to(device)
    # Channels-last: forward+backward measured 1.9x, inference 3.4x faster than NCHW on a 2-core CPU.
    return agent.to(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def main(args: Args) -> str:
    args = validate_args(args)
    if args.track and importlib.util.find_spec("wandb") is None:
        raise UsageError("--track needs Weights & Biases: pip install wandb")
    device = select_device(args)
    args, run_dir, lock = open_run_dir(args)
    try:
        train(args, run_dir, device)
    finally:
        lock.close()
    return run_dir


def train(args: Args, run_dir: str, device) -> None:
    checkpoint = load_checkpoint(args, device) if args.resume else None
    # A kill between the checkpoint and status.json left the latter one checkpoint behind; and "finished"
    # is against this run's --total-timesteps (written before config.json takes the new total): an
    # extension killed before its first checkpoint is not done.
    if checkpoint:
        write_status(run_dir, checkpoint, args.num_iterations)
    write_config(args, run_dir)
    seed_everything(args)
    keep_freed_memory()

    agents = [make_agent(args, device) for _ in range(args.num_agents)]
    # One optimiser over every agent's parameters: L = mean_i L_i is minimised jointly.
    # Fused Adam updates every parameter in one pass: 0.04 s less per update on 2 CPU cores.
    optimizer = torch.optim.Adam([p for agent in agents for p in agent.parameters()], lr=args.learning_rate, eps=1e-5,
                                 fused=True)
    envs = [make_envs(args, seed=args.seed) for _ in agents]  # each agent its own envs, same level seed
    rollouts = [Rollout(args, device) for _ in agents]
    for agent_envs, rollout in zip(envs, rollouts):
        rollout.start(agent_envs)
    iteration, global_step = 0, 0
    probes = checkpoint["probe_frames"] if checkpoint and "probe_frames" in checkpoint else probe_frames(args)
    if checkpoint:
        if len(checkpoint["agents"]) != args.num_agents:
            raise UsageError(f"cannot resume: {args.resume} holds {len(checkpoint['agents'])} agents, not {args.num_agents}")
        for i, agent in enumerate(agents):
            load_weights(agent, checkpoint["agents"][i], args.resume)
            restore_env_state(envs[i], checkpoint["envs"][i])
            rollouts[i].next_obs.copy_(checkpoint["next_obs"][i])
            rollouts[i].next_done.copy_(checkpoint["next_done"][i])
        optimizer.load_state_dict(checkpoint["optimizer"])
        restore_rng_state(checkpoint["rng"])
        iteration, global_step = checkpoint["iteration"], checkpoint["global_step"]
    probes = probes.to(device)
    # Evaluation uses the plain module: on the CPU its batch shrinks as envs finish, which would recompile.
    models = [torch.compile(agent) if args.compile else agent for agent in agents]
    policies = [make_policy(model, args, device) for model in models]

    if args.track:
        start_tracking(args, run_dir)
    # One event stream per agent, so that the agents overlay on the same charts, and the run's own for
    # what compares them. purge_step hides what the interrupted process logged after its last checkpoint.
    purge_step = global_step + 1 if checkpoint else None
    writers = [SummaryWriter(os.path.join(run_dir, f"agent{i + 1}"), purge_step=purge_step) for i in range(len(agents))]
    run_writer = SummaryWriter(run_dir, purge_step=purge_step)
    for writer in writers:
        writer.add_text("hyperparameters", hyperparameter_table(args))
    run_writer.add_text("machine", machine_description(device), global_step)

    def checkpoint_now():
        write_checkpoint(run_dir, {
            "script": SCRIPT, "args": asdict(args), "iteration": iteration, "global_step": global_step,
            "agents": [agent.state_dict() for agent in agents], "optimizer": optimizer.state_dict(),
            "envs": [env_state(agent_envs) for agent_envs in envs],
            "next_obs": [rollout.next_obs for rollout in rollouts],
            "next_done": [rollout.next_done for rollout in rollouts], "rng": rng_state(),
            "probe_frames": probes.cpu()})

    progress = tqdm(total=args.num_iterations * args.batch_size, initial=global_step, unit="step",
                    dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)
    start_time, start_step = time.time(), global_step
    last_return, test_return = [float("nan")] * len(agents), [float("nan")] * len(agents)
    stop = StopSignals()
    try:
        while iteration < args.num_iterations:
            iteration += 1
            timer = Timer()
            global_step, episodes, batches = collect_rollouts(policies, envs, rollouts, args, device, global_step,
                                                         overlap=device.type == "cuda")
            for i, writer in enumerate(writers):
                for step, episode_return, length in episodes[i]:
                    writer.add_scalar("charts/episodic_return", episode_return, step)
                    writer.add_scalar("charts/episodic_length", length, step)
                if episodes[i]:
                    last_return[i] = float(np.mean([r for _, r, _ in episodes[i]]))
            timer.lap("rollout")
            stats = update(models, optimizer, batches, args)
            for agent in agents:
                agent.redraw_dropout_masks()  # once after each update phase, as in coinrun (nothing without dropout)
            timer.lap("update")
            what = find_nonfinite(stats, agents)
            if what:
                stop_diverged(run_dir, iteration, global_step, what)

            for i, writer in enumerate(writers):
                for key, value in stats[i].items():
                    writer.add_scalar(f"losses/{key}", value, global_step)
                writer.add_scalar("losses/explained_variance", explained_variance(batches[i]["values"], batches[i]["returns"]), global_step)
                writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            if iteration % args.eval_interval == 0 or iteration == args.num_iterations:
                timer.lap()
                for i, writer in enumerate(writers):
                    test_return[i] = log_evaluation(writer, agents[i], args, device, iteration, global_step, run_dir,
                                                    f"agent{i + 1}")
                timer.lap("eval")
                log_agreement(run_writer, agents, probes, global_step, args.bf16)
                timer.lap("agreement")
            sps = int((global_step - start_step) / (time.time() - start_time))
            for writer in writers:
                writer.add_scalar("charts/SPS", sps, global_step)
            if iteration % args.checkpoint_interval == 0 or iteration == args.num_iterations or stop.received:
                checkpoint_now()
            for writer in writers:
                timer.log(writer, global_step)
            progress.update(args.batch_size)
            progress.set_postfix(sps=sps, train_return=f"{np.mean(last_return):.2f}", test_return=f"{np.mean(test_return):.2f}")
            if stop.received and iteration < args.num_iterations:
                raise Preempted(f"stopped by {stop.received} after iteration {iteration}, checkpoint written; "
                                f"continue with: python {SCRIPT}.py --resume {run_dir}")
    except KeyboardInterrupt:
        progress.close()  # before the message, so that it is the last line
        report_interrupt(run_dir, args)
    finally:
        stop.restore()
        progress.close()
        for writer, agent_envs in zip(writers, envs):
            writer.close()
            agent_envs.close()
        run_writer.close()


def load_weights(agent, state_dict: dict, run_dir: str) -> None:
    try:
        agent.load_state_dict(state_dict)
    except RuntimeError:
        raise UsageError(f"cannot resume: the network in {run_dir} does not match this {SCRIPT}.py "
                         "(made by an older version)") from None


def write_checkpoint(run_dir: str, checkpoint: dict) -> None:
    try:
        save_checkpoint(run_dir, checkpoint)
    except OSError as error:
        raise StorageError(f"could not write the checkpoint in {run_dir} ({error.strerror}); the previous "
                           f"checkpoint is intact: make room and continue with: python {SCRIPT}.py --resume {run_dir}") from None


def report_interrupt(run_dir: str, args: Args):
    if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        print(f"interrupted; continue with: python {SCRIPT}.py --resume {run_dir}", file=sys.stderr)
    else:
        print(f"interrupted before the first checkpoint (iteration {args.checkpoint_interval}): nothing to resume",
              file=sys.stderr)
    raise SystemExit(130)


def resume_defaults(argv) -> Optional[Args]:
    """With --resume DIR, the saved run's flags become the defaults, so DIR alone is enough."""
    for i, arg in enumerate(argv):
        if arg.startswith("--resume"):
            run_dir = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                config = saved_config(run_dir)
            except UsageError:
                return None  # main() reports the problem
            fields = {k: v for k, v in config["args"].items() if k in Args.__dataclass_fields__}
            return Args(**{**fields, "resume": run_dir})
    return None


# Exit codes: 2 bad input, 3 diverged, 4 stopped by a signal after a checkpoint (resume it), 1 cannot write, 130 Ctrl-C.
EXIT_CODES = ((UsageError, 2), (Diverged, 3), (Preempted, 4), (StorageError, 1))

if __name__ == "__main__":
    cli_args = tyro.cli(Args, default=resume_defaults(sys.argv[1:]))
    try:
        main(cli_args)
    except tuple(error_type for error_type, _ in EXIT_CODES) as error:
        print(f"error: {error}" if not isinstance(error, Preempted) else str(error), file=sys.stderr)
        sys.exit(next(code for error_type, code in EXIT_CODES if isinstance(error, error_type)))
    except OSError as error:  # the disk filled up or the run directory became unwritable while logging
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise
        print(f"error: could not write the run ({error.strerror}); continue from its last checkpoint with --resume",
              file=sys.stderr)
        sys.exit(1)
