"""PPO + DrAC and UCB-DrAC on Procgen (Raileanu et al. 2021): the field's augmentation baselines.

ppo.py's agent and loss, plus DrAC's regularisers G_pi + G_V, which ask the policy and the value to be
the same on augmented frames as on clean ones (`--augment NAME --drac-coef 0.1`), or with `--augment ucb`
a bandit that picks one of DrAC's eight augmentations before each update. `python drac.py --help`
lists every flag."""

import contextlib
import io
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import run_utils  # first: it refuses a Python that Procgen has no wheel for
import evaluation
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

from run_utils import StopSignals, UsageError

with contextlib.redirect_stderr(io.StringIO()):  # procgen imports the old `gym`, which prints a notice
    from procgen import ProcgenGym3Env

SCRIPT = "drac"
PROCGEN_GAMES = ("bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
                 "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot")
# Procgen's "exploration" mode is left out: it fixes one level, so there are no unseen test levels.
DISTRIBUTION_MODES = ("easy", "hard", "extreme", "memory")
# Modes that only some games have; Procgen aborts in C++ on the others.
MODE_GAMES = {
    "extreme": ("chaser", "dodgeball", "leaper", "starpilot"),
    "memory": ("caveflyer", "dodgeball", "heist", "jumper", "maze", "miner"),
}
# Procgen takes its seeds and levels as 32-bit ints. A run's evaluations and probes seed above its own seed,
# by evaluation.py's offsets (plus the iteration): SEED_HEADROOM plus the iterations keeps them all below 2**31.
INT32_MAX, SEED_HEADROOM = 2**31 - 1, 3_000_000


@dataclass
class Args:
    exp_name: str = SCRIPT  # the name of this experiment (part of the run directory's name)
    seed: int = 1  # seed of the experiment: networks, sampling and the training levels' order
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # use CUDA when it is available (the CPU otherwise)
    track: bool = False  # log to Weights & Biases too (needs `pip install wandb`)
    wandb_project_name: str = "mdpo-procgen"  # the wandb project
    wandb_entity: Optional[str] = None  # the wandb entity (team)
    capture_video: bool = False  # record an evaluation episode as a GIF in the run directory and in TensorBoard
    run_dir: Optional[str] = None  # where to write this run (default: runs/{env_id}__{exp_name}__{seed}__{unix_time})
    resume: Optional[str] = None  # continue the run saved in this run directory
    checkpoint_interval: int = 10  # write a checkpoint every this many iterations (and at the end)

    # Procgen
    env_id: str = "starpilot"  # the Procgen game
    num_levels: int = 500  # number of training levels (0: the full level distribution)
    start_level: int = 0  # first training level
    distribution_mode: str = "hard"  # Procgen distribution mode: easy, hard, extreme or memory (the last two for some games only)

    # Algorithm
    total_timesteps: int = 50_000_000  # environment steps per agent, rounded down to whole batches
    learning_rate: float = 5e-4  # Adam's learning rate (constant)
    num_envs: int = 64  # parallel environments per agent
    num_steps: int = 256  # steps per environment per rollout
    gamma: float = 0.999  # discount factor
    gae_lambda: float = 0.95  # lambda of generalised advantage estimation
    num_minibatches: int = 8  # minibatches per epoch
    update_epochs: int = 3  # epochs over each rollout
    norm_adv: bool = True  # normalise advantages per minibatch
    clip_coef: float = 0.2  # clipping coefficient of the policy ratio and of the value change
    ent_coef: float = 0.01  # entropy bonus coefficient
    vf_coef: float = 0.5  # value loss coefficient
    max_grad_norm: float = 0.5  # gradient norm clip, per agent
    l2_coef: float = 0.0  # L2 regularisation of the weights (the PPO + L2 baseline uses 1e-4)
    dropout: float = 0.0  # dropout probability in the encoder (the PPO + dropout baseline uses 0.1)
    augment: str = "crop"  # DrAC's augmentation: crop, random-conv, grayscale, flip, rotate, cutout, cutout-color, color-jitter, or ucb (UCB-DrAC: a bandit picks one before each update)
    drac_coef: float = 0.1  # weight of DrAC's regularisers G_pi + G_V (their alpha_r, 0.1 in their paper)

    # Evaluation
    eval_interval: int = 25  # evaluate on test and training levels every this many iterations
    eval_episodes: Optional[int] = None  # evaluation environments, each contributing its first complete episode (default: num-envs)

    # Speed (numerics stay float32 unless asked)
    bf16: bool = False  # run the network under bfloat16 autocast (faster, slightly different numerics)
    compile: bool = False  # torch.compile the network
    # Computed from the flags above by validate_args, so no flags of their own.
    batch_size: tyro.conf.Suppress[int] = 0  # the rollout size: num_envs x num_steps
    minibatch_size: tyro.conf.Suppress[int] = 0  # batch_size / num_minibatches
    num_iterations: tyro.conf.Suppress[int] = 0  # total_timesteps // batch_size


# ---- Environments ------------------------------------------------------------------------------
class ProcgenVecEnv(gym.vector.VectorEnv):
    """Procgen's native vectorised env (gym3 interface) as a gymnasium VectorEnv. Procgen resets a finished
    episode inside the step that ended it, so the observation returned with `terminated=True` is already the
    first of the next episode (AutoresetMode.SAME_STEP); time limits come back as terminations."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, env_id, num_envs, num_levels, start_level, distribution_mode, seed):
        # Threads step disjoint envs, so their number changes the speed, never the results.
        self.procgen = ProcgenGym3Env(num=num_envs, env_name=env_id, num_levels=num_levels,
                                      start_level=start_level, distribution_mode=distribution_mode,
                                      rand_seed=seed, num_threads=min(8, max(4, run_utils.usable_cores())))
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

    def close_extras(self, **kwargs):
        self.procgen.close()  # now, not whenever the garbage collector runs (inside cffi, that can deadlock)


def make_envs(args: Args, seed: int) -> gym.vector.VectorEnv:
    """Training envs: raw Procgen, episode statistics of the raw score, then reward normalisation."""
    envs = ProcgenVecEnv(args.env_id, args.num_envs, args.num_levels, args.start_level, args.distribution_mode, seed)
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    envs = gym.wrappers.vector.NormalizeReward(envs, gamma=args.gamma)
    # One np.clip over the whole vector: gymnasium's vector ClipReward clips env by env, which is slow.
    return gym.wrappers.vector.TransformReward(envs, lambda rewards: np.clip(rewards, -10, 10))


# ---- Network: IMPALA-CNN actor-critic ----------------------------------------------------------
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class SharedDropout(nn.Module):
    """Dropout as Cobbe et al. (2019) define it in openai/coinrun: one mask per layer, shared by every sample,
    a buffer that is the same in the rollout and the update (PPO's ratio compares one network) until `redraw()`,
    once after each update phase. In eval mode the layer is the identity: our evaluation's choice."""

    def __init__(self, p, shape):
        super().__init__()
        self.p = p
        self.register_buffer("mask", torch.empty(shape))
        self.redraw()

    @torch.no_grad()
    def redraw(self):
        # In place: a CUDA graph replaying the rollout's policy reads the buffer where it lives.
        self.mask.copy_((torch.rand(self.mask.shape, device=self.mask.device) > self.p) / (1 - self.p))

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
        """The 256-d representation of uint8 NHWC frames (permuted to NCHW: channels-last, without a copy)."""
        return self.network(x.permute(0, 3, 1, 2).float() / 255.0)

    def forward(self, x):
        hidden = self.hidden(x)
        return self.actor(hidden).float(), self.critic(hidden).float().squeeze(-1)


def make_agent(args: Args, device):
    # Channels-last: convolutions on the CPU run several times faster than in NCHW.
    return Agent(dropout=args.dropout).to(device).to(memory_format=torch.channels_last)


# ---- DrAC's augmentations (and the robustness tests' perturbations) ----------------------------
# The project's one implementation: drac.py trains with them, robustness.py and tsne.py test with them.
# Each takes uint8 NHWC frames and draws its random parameters from an explicit CPU generator, so a seed
# fixes them on any device. Each returns frames on the pixel scale Agent.hidden reads: uint8, except random
# convolution's raw output (float32, unclamped), which is what Lee et al. (2020) and DrAC feed the network.


def to_unit(frames):
    """uint8 NHWC frames as float NCHW images in [0, 1], the form kornia's colour operations take."""
    return frames.permute(0, 3, 1, 2).float() / 255.0


def from_unit(images):
    """float NCHW images in [0, 1] back to uint8 NHWC frames (rounded)."""
    return (images * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def uniform(n, low, high, generator, device):
    """n draws from U[low, high), made on the CPU by `generator` and moved to `device`."""
    return (low + (high - low) * torch.rand(n, generator=generator)).to(device)


def crop(frames, generator, pad=12):
    """DrAC's crop: pad each frame by `pad` pixels replicating its border, then cut a random window of
    the frame's size (offsets 0 ... 2 * pad, uniform). Clamped indices are the replicated border."""
    n, size = frames.shape[:2]
    offsets = torch.randint(0, 2 * pad + 1, (n, 2, 1), generator=generator).to(frames.device) - pad
    span = torch.arange(size, device=frames.device)
    rows, cols = (span + offsets[:, 0]).clamp(0, size - 1), (span + offsets[:, 1]).clamp(0, size - 1)
    return frames[torch.arange(n, device=frames.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


def grayscale(frames, generator=None):
    """DrAC's grayscale: kornia's luma (0.299 R + 0.587 G + 0.114 B) in all three channels. Nothing random."""
    import kornia  # imported here: 2.7 s that the default training does not need

    gray = kornia.color.rgb_to_grayscale(to_unit(frames))
    return from_unit(gray.expand(-1, 3, -1, -1))


def cutout_boxes(n, generator, device, size=64, box_min=7, box_max=22, pivot_h=12, pivot_w=24):
    """(n, size, size) masks of DrAC's cutout boxes: sides h, w drawn from [box_min, box_max), the box
    covering rows [pivot_h + h, pivot_h + 2h) and columns [pivot_w + w, pivot_w + 2w), cut at the edge."""
    sides = torch.randint(box_min, box_max, (2, n, 1), generator=generator).to(device)
    span = torch.arange(size, device=device)
    starts = sides + torch.tensor([[[pivot_h]], [[pivot_w]]], device=device)
    inside = (span >= starts) & (span < starts + sides)  # (2, n, size): rows, then columns
    return inside[0][:, :, None] & inside[1][:, None, :]


def cutout(frames, generator):
    """DrAC's cutout: one black box per frame (see cutout_boxes)."""
    boxes = cutout_boxes(frames.shape[0], generator, frames.device, frames.shape[1])
    return frames.masked_fill(boxes[..., None], 0)


def cutout_color(frames, generator):
    """DrAC's cutout-color: one box per frame filled with a random colour, each channel from 0 ... 254."""
    boxes = cutout_boxes(frames.shape[0], generator, frames.device, frames.shape[1])
    colours = torch.randint(0, 255, (frames.shape[0], 1, 1, 3), generator=generator, dtype=torch.uint8)
    return torch.where(boxes[..., None], colours.to(frames.device), frames)


def flip(frames, generator, p=0.5):
    """DrAC's flip: each frame upside down with probability p (their flip is of axis 2 of NCHW frames: rows)."""
    chosen = (torch.rand(frames.shape[0], generator=generator) < p).to(frames.device)
    return torch.where(chosen[:, None, None, None], frames.flip(1), frames)


def rotate(frames, generator):
    """DrAC's rotate: each frame turned by 0, 90, 180 or 270 degrees, uniformly (numpy's rot90 direction)."""
    turns = torch.randint(0, 4, (frames.shape[0], 1, 1, 1), generator=generator).to(frames.device)
    out = frames
    for k in (1, 2, 3):
        out = torch.where(turns == k, torch.rot90(frames, k, dims=(1, 2)), out)
    return out


def random_conv_weights(n, generator):
    """n random 3x3 RGB -> RGB filters, Xavier-normal as Lee et al. and DrAC draw them: std sqrt(2 / (27 + 27))."""
    return torch.randn((n, 3, 3, 3, 3), generator=generator) * (2 / 54) ** 0.5


def convolve(frames, weights, strength=1.0):
    """Frame i through filter i (padding 1, no bias): float32, unclamped, on the pixel scale (the filter is
    linear, so the network's /255 gives the filter's output on [0, 1] images, Lee et al.'s input).
    strength s blends (1 - s) * frame + s * filtered: 1 is Lee et al.'s random convolution, 0 the identity."""
    n, size = frames.shape[:2]
    images = frames.permute(0, 3, 1, 2).float().reshape(1, 3 * n, size, size)
    filtered = F.conv2d(images, weights.to(frames.device).reshape(3 * n, 3, 3, 3), padding=1, groups=n)
    filtered = filtered.reshape(n, 3, size, size).permute(0, 2, 3, 1).contiguous()
    return filtered if strength == 1 else torch.lerp(frames.float(), filtered, strength)


def random_conv(frames, generator):
    """DrAC's random-conv: a fresh random filter for every frame."""
    return convolve(frames, random_conv_weights(frames.shape[0], generator))


def adjust_colour(frames, brightness=None, contrast=None, saturation=None, hue=None, contrast_first=False):
    """Frames with per-frame colour factors ([n] tensors; None leaves that property alone), by kornia's
    operations and DrAC's definitions: brightness scales the HSV value and saturation the HSV saturation
    (both clipped to [0, 1]), hue turns the colour wheel by that fraction of a turn, contrast blends each
    frame with its mean grey level (PIL's definition; DrAC's blends each channel with its own mean)."""
    import kornia

    images = to_unit(frames)
    if contrast is not None and contrast_first:
        images = kornia.enhance.adjust_contrast_with_mean_subtraction(images, contrast.to(frames.device))
    if brightness is not None or saturation is not None or hue is not None:
        hsv = kornia.color.rgb_to_hsv(images)
        if brightness is not None:
            hsv = torch.cat([hsv[:, :2], (hsv[:, 2:] * brightness.to(frames.device)[:, None, None, None]).clamp(0, 1)], 1)
        if saturation is not None:
            hsv = kornia.enhance.adjust_saturation_raw(hsv, saturation.to(frames.device))
        if hue is not None:  # kornia's hue is an angle in radians
            hsv = kornia.enhance.adjust_hue_raw(hsv, 2 * np.pi * hue.to(frames.device))
        images = kornia.color.hsv_to_rgb(hsv)
    if contrast is not None and not contrast_first:
        images = kornia.enhance.adjust_contrast_with_mean_subtraction(images, contrast.to(frames.device))
    return from_unit(images)


def color_jitter(frames, generator):
    """DrAC's color-jitter: brightness, contrast and saturation factors from U[0.6, 1.4] and a hue factor h
    from U[-0.5, 0.5] per frame (their code turns the hue by h * 255/360 of a turn), contrast applied before
    or after the other three with even odds, drawn once per batch."""
    n, device = frames.shape[0], frames.device
    brightness, contrast, saturation = (uniform(n, 0.6, 1.4, generator, device) for _ in range(3))
    hue = uniform(n, -0.5, 0.5, generator, device) * 255 / 360
    contrast_first = bool(torch.rand((), generator=generator) < 0.5)
    return adjust_colour(frames, brightness, contrast, saturation, hue, contrast_first)


# DrAC's eight augmentations for Procgen, by the names of their code and in its order (rraileanu/auto-drac,
# data_augs.py and UCB-DrAC's list): UCB-DrAC's argmax breaks ties by position, so the order matters.
AUGMENTATIONS = {
    "crop": crop, "random-conv": random_conv, "grayscale": grayscale, "flip": flip, "rotate": rotate,
    "cutout": cutout, "cutout-color": cutout_color, "color-jitter": color_jitter,
}


# ---- Learning: GAE, the loss, DrAC's regularisers, the update ----------------------------------
def compute_gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda):
    """Generalised advantage estimates and returns of one rollout ([num_steps, num_envs] tensors).
    dones[t] is 1 where obs[t] is the first frame of an episode (step t - 1 ended one), so 1 - dones[t + 1]
    stops step t's return from bootstrapping across the episode's end."""
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


def ppo_loss(logits, new_value, batch: dict, mb_inds, args: Args):
    """PPO's loss on one agent's minibatch (clipped surrogate + clipped value loss - entropy bonus), and its stats."""
    # No argument validation: non-finite logits must reach the divergence check, not raise here.
    probs = Categorical(logits=logits, validate_args=False)
    logratio = probs.log_prob(batch["actions"][mb_inds]) - batch["logprobs"][mb_inds]
    ratio = logratio.exp()
    advantages = batch["advantages"][mb_inds]
    if args.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
    old_value, returns = batch["values"][mb_inds], batch["returns"][mb_inds]
    value_clipped = old_value + (new_value - old_value).clamp(-args.clip_coef, args.clip_coef)
    v_loss = 0.5 * torch.max((new_value - returns) ** 2, (value_clipped - returns) ** 2).mean()
    entropy = probs.entropy().mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1).abs() > args.clip_coef).float().mean()
    stats = {"policy_loss": pg_loss, "value_loss": v_loss, "entropy": entropy, "approx_kl": approx_kl, "clipfrac": clipfrac}
    return pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss, stats


def drac_terms(clean_logits, clean_value, aug_logits, aug_value):
    """DrAC's regularisers from the network's outputs on clean and augmented frames: G_pi = mean KL(pi(.|s) ||
    pi(.|f(s))) and G_V = mean (V(s) - V(f(s)))^2 / 2, the clean side a fixed target (detached): gradients reach
    the network through the augmented frames only, as in their code. Their code estimates G_pi by -log pi(a|f(s))
    with a ~ pi(.|s), which has this KL's gradient in expectation; the exact KL over the 15 actions has none of
    that sampling noise. The 1/2 of G_V is their code's."""
    clean_logp, aug_logp = F.log_softmax(clean_logits.detach(), -1), F.log_softmax(aug_logits, -1)
    g_pi = (clean_logp.exp() * (clean_logp - aug_logp)).sum(-1).mean()
    g_v = 0.5 * (clean_value.detach() - aug_value).pow(2).mean()
    return g_pi, g_v


def drac_loss(agent, obs, logits, value, augment: str, bf16: bool):
    """G_pi + G_V on a minibatch's frames `obs`, given the network's logits and values on them, and its stats."""
    # The augmentation's parameters come from the global stream, which checkpoints save: resumes stay exact.
    generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
    augmented = AUGMENTATIONS[augment](obs, generator)  # in float32: only the network runs under --bf16
    with torch.autocast(obs.device.type, torch.bfloat16, enabled=bf16):
        aug_logits, aug_value = agent(augmented)
    g_pi, g_v = drac_terms(logits, value, aug_logits, aug_value)
    return g_pi + g_v, {"drac_pi": g_pi, "drac_v": g_v}


class UCBAugmentation:
    """UCB-DrAC's bandit over DrAC's augmentations (their code's defaults): before each update, the one with the
    highest Q + c * sqrt(log(N) / n), where Q is the mean of the last `window` mean returns of the rollouts that
    followed its updates (0 before any), n its count (from 1) and N the total (from 1); after the next rollout,
    that rollout's mean return estimate credits it."""

    def __init__(self, names=tuple(AUGMENTATIONS), exploration=0.1, window=10):
        self.names, self.exploration, self.window = list(names), exploration, window
        self.counts, self.total = [1] * len(self.names), 1
        self.returns = [[] for _ in self.names]
        self.current = None  # the augmentation of the last update, waiting for its credit

    def step(self, rollout_returns) -> str:
        """Credit the last update's augmentation with this rollout's returns; choose the next update's."""
        if self.current is not None:
            self.total += 1
            self.counts[self.current] += 1
            self.returns[self.current] = (self.returns[self.current] + [float(rollout_returns.mean())])[-self.window:]
        scores = [(np.mean(r) if r else 0.0) + self.exploration * np.sqrt(np.log(self.total) / n)
                  for r, n in zip(self.returns, self.counts)]
        self.current = int(np.argmax(scores))
        return self.names[self.current]

    def state_dict(self) -> dict:
        return {"counts": list(self.counts), "total": self.total, "returns": [list(r) for r in self.returns],
                "current": self.current}

    def load_state_dict(self, state: dict) -> None:
        self.counts, self.total, self.current = list(state["counts"]), state["total"], state["current"]
        self.returns = [list(r) for r in state["returns"]]


def l2_penalty(agent):
    """sum(w**2) / 2 over weights, not biases: tf.nn.l2_loss as in Cobbe et al.'s coinrun (their l2_weight 1e-4)."""
    return sum(p.pow(2).sum() for p in agent.parameters() if p.dim() > 1) / 2


def minibatch_loss(agent, batch: dict, mb_inds, args: Args):
    """The PPO loss on a minibatch, plus drac_coef x DrAC's regularisers (the PPO terms stay on the clean
    frames; the regularisers see augmented ones) and the L2 penalty of --l2-coef."""
    with torch.autocast(batch["obs"].device.type, torch.bfloat16, enabled=args.bf16):
        logits, new_value = agent(batch["obs"][mb_inds])
    loss, stats = ppo_loss(logits, new_value, batch, mb_inds, args)
    drac, drac_stats = drac_loss(agent, batch["obs"][mb_inds], logits, new_value, args.augment, args.bf16)
    loss, stats = loss + args.drac_coef * drac, {**stats, **drac_stats}
    if args.l2_coef > 0:
        loss = loss + args.l2_coef * l2_penalty(agent)
    return loss, {key: value.detach() for key, value in stats.items()}


def update(agent, optimizer, batch: dict, args: Args) -> dict:
    """update_epochs passes of minibatch gradient steps over one rollout; returns the means of
    minibatch_loss's stats and of the gradient norm."""
    totals = {}
    for _ in range(args.update_epochs):
        permutation = torch.randperm(args.batch_size, device=batch["obs"].device)
        for start in range(0, args.batch_size, args.minibatch_size):
            mb_inds = permutation[start:start + args.minibatch_size]
            loss, stats = minibatch_loss(agent, batch, mb_inds, args)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stats["grad_norm"] = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)  # before clipping
            optimizer.step()
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
    # One host sync per iteration, not one per minibatch.
    return {key: float(value) / (args.update_epochs * args.num_minibatches) for key, value in totals.items()}


def explained_variance(values, returns) -> float:
    var_returns = returns.var()
    return float("nan") if var_returns == 0 else float(1 - (returns - values).var() / var_returns)


# ---- Acting: the rollout -----------------------------------------------------------------------
def sample_action(logits):
    """One draw per row from Categorical(logits) by the Gumbel-max trick: torch.multinomial's distribution from
    plain kernels, which a CUDA graph can hold. Clamping the uniforms away from 0 keeps the noise finite."""
    uniform = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)
    return (logits - torch.log(-torch.log(uniform))).argmax(-1)


def policy_step(agent, obs, bf16):
    """The rollout's work per env step: sampled actions, their log-probabilities and the values."""
    # No autocast cache: a CUDA graph must cast the current weights on every replay, not stale copies.
    with torch.autocast(obs.device.type, torch.bfloat16, enabled=bf16, cache_enabled=False):
        logits, value = agent(obs)
    action = sample_action(logits)
    return action, F.log_softmax(logits, dim=-1).gather(-1, action[:, None]).squeeze(-1), value


def make_policy(agent, args: Args, device):
    """The rollout's policy: replayed from a CUDA graph on a GPU (each call's outputs are overwritten by the
    next call's), called eagerly on the CPU."""
    step = torch.inference_mode()(lambda obs: policy_step(agent, obs, args.bf16))
    if device.type == "cuda":
        return run_utils.CudaGraphed(step, torch.zeros((args.num_envs, 64, 64, 3), dtype=torch.uint8, device=device))
    return step


class Rollout:
    """One agent's rollout buffer and the frames to continue from (uint8). What the network reads lives on the
    device; rewards and done flags, read by GAE alone, stay on the host."""

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
    """Bootstrap from the last observations, compute GAE and return the batch for the update ([batch] tensors)."""
    next_value = policy(rollout.next_obs)[2]
    # GAE is a loop of num_steps tiny steps: faster on the host than as GPU launches.
    advantages, returns = compute_gae(rollout.rewards, rollout.values.cpu(), rollout.dones, next_value.cpu(),
                                      rollout.next_done, args.gamma, args.gae_lambda)
    return {"obs": rollout.obs.flatten(0, 1), "actions": rollout.actions.flatten(), "logprobs": rollout.logprobs.flatten(),
            "values": rollout.values.flatten(), "advantages": advantages.flatten().to(device),
            "returns": returns.flatten().to(device)}


def collect_rollout(policy, envs, rollout: Rollout, args: Args, device, global_step: int):
    """Step the envs num_steps times; return the new global_step, the finished episodes and the batch."""
    episodes = []  # (global step, raw return, length) of every episode that ended
    for step in range(args.num_steps):
        global_step += args.num_envs
        store_step(envs.step(act(policy, rollout, step)), rollout, step, global_step, episodes)
    return global_step, episodes, finish_rollout(policy, rollout, args, device)


# ---- The run: its flags, checkpointed state and logs, and the training loop --------------------
def validate_args(args: Args) -> Args:
    """Check the flags and fill in the computed sizes; raise UsageError on bad input."""
    def refuse_unless(condition, message):
        if not condition:
            raise UsageError(message)

    flag = lambda name: name.replace("_", "-")  # noqa: E731
    for name, value in asdict(args).items():
        refuse_unless(not isinstance(value, float) or np.isfinite(value), f"--{flag(name)} must be a finite number, got {value}")
    refuse_unless(args.env_id in PROCGEN_GAMES, f"unknown game {args.env_id!r}; choose one of: {', '.join(PROCGEN_GAMES)}")
    refuse_unless(args.distribution_mode in DISTRIBUTION_MODES, f"unknown distribution mode {args.distribution_mode!r}; "
                  f"choose one of: {', '.join(DISTRIBUTION_MODES)}")
    games = MODE_GAMES.get(args.distribution_mode, PROCGEN_GAMES)
    refuse_unless(args.env_id in games, f"{args.env_id} has no {args.distribution_mode} mode; the games that have it: {', '.join(games)}")
    if args.eval_episodes is None:
        args = replace(args, eval_episodes=args.num_envs)
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs",
                 "eval_interval", "eval_episodes", "checkpoint_interval", "learning_rate", "max_grad_norm", "clip_coef"):
        refuse_unless(getattr(args, name) > 0, f"--{flag(name)} must be positive, got {getattr(args, name)}")
    for name in ("num_levels", "start_level", "ent_coef", "vf_coef", "l2_coef"):
        refuse_unless(getattr(args, name) >= 0, f"--{flag(name)} must not be negative, got {getattr(args, name)}")
    for name in ("num_levels", "start_level", "num_envs", "eval_episodes"):
        refuse_unless(getattr(args, name) <= INT32_MAX, f"--{flag(name)} must be at most {INT32_MAX}, got {getattr(args, name)}")
    # Procgen adds the two as C ints; with --num-levels 0 (every level) it ignores --start-level.
    refuse_unless(args.start_level + args.num_levels <= INT32_MAX, f"--start-level + --num-levels must be at most {INT32_MAX}")
    refuse_unless(args.num_levels > 0 or args.start_level == 0, "--start-level has no effect with --num-levels 0 (every level)")
    refuse_unless(0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1, "--gamma and --gae-lambda must lie in [0, 1]")
    refuse_unless(0 <= args.dropout < 1, f"--dropout must lie in [0, 1), got {args.dropout}")
    refuse_unless(args.augment in (*AUGMENTATIONS, "ucb"), f"unknown augmentation {args.augment!r}; choose one of: "
                  f"{', '.join(AUGMENTATIONS)}, ucb")
    refuse_unless(args.drac_coef > 0, f"--drac-coef must be positive (DrAC's paper uses 0.1; 0 is plain PPO: run ppo.py), "
                  f"got {args.drac_coef}")
    batch_size = args.num_envs * args.num_steps
    refuse_unless(batch_size % args.num_minibatches == 0, f"the batch (num-envs x num-steps = {batch_size}) does not "
                  f"divide into {args.num_minibatches} minibatches")
    refuse_unless(not args.norm_adv or batch_size // args.num_minibatches >= 2, "--norm-adv needs minibatches of at "
                  f"least 2 samples (their advantages' std), got {batch_size // args.num_minibatches}")
    refuse_unless(args.total_timesteps >= batch_size, f"--total-timesteps ({args.total_timesteps}) is less than one batch ({batch_size})")
    num_iterations = args.total_timesteps // batch_size
    refuse_unless(num_iterations <= INT32_MAX - SEED_HEADROOM, f"--total-timesteps must be at most "
                  f"{(INT32_MAX - SEED_HEADROOM) * batch_size:,} at {batch_size} steps an iteration (Procgen's seeds are C ints)")
    highest_seed = INT32_MAX - SEED_HEADROOM - num_iterations
    refuse_unless(0 <= args.seed <= highest_seed, f"--seed must lie in [0, {highest_seed}], got {args.seed}")
    return replace(args, batch_size=batch_size, minibatch_size=batch_size // args.num_minibatches,
                   num_iterations=num_iterations)


def agent_state(agent, envs, rollout) -> dict:
    """One agent's part of a checkpoint, all its run needs to continue exactly: weights, games, episode statistics,
    the reward normaliser's running return (public state; with same-step autoreset it keeps no other) and the
    frames its rollout continues from."""
    norm, episode_stats = env_wrappers(envs)
    return {"agent": agent.state_dict(), "procgen": episode_stats.env.procgen.get_state(),
            "return_rms": (norm.return_rms.mean, norm.return_rms.var, norm.return_rms.count),
            **{name: getattr(owner, name).copy() for owner, name in env_arrays(envs)},
            "next_obs": rollout.next_obs, "next_done": rollout.next_done}


def restore_agent_state(agent, envs, rollout, state: dict) -> None:
    norm, episode_stats = env_wrappers(envs)
    agent.load_state_dict(state["agent"])
    episode_stats.env.procgen.set_state(state["procgen"])
    norm.return_rms.mean, norm.return_rms.var, norm.return_rms.count = state["return_rms"]
    for owner, name in env_arrays(envs):
        getattr(owner, name)[:] = state[name]
    rollout.next_obs.copy_(state["next_obs"])
    rollout.next_done.copy_(state["next_done"])


def env_wrappers(envs):
    """make_envs' reward normaliser and the episode statistics inside it (envs is the reward clip around both)."""
    return envs.env, envs.env.env


def env_arrays(envs):
    """(wrapper, attribute) of the arrays the episode statistics and the reward normaliser carry across steps."""
    norm, episode_stats = env_wrappers(envs)
    return [(episode_stats, "episode_returns"), (episode_stats, "episode_lengths"), (episode_stats, "prev_dones"),
            (norm, "accumulated_reward")]


def log_iteration(writer, stats: dict, batch: dict, episodes: list, global_step: int, learning_rate: float) -> None:
    """The episodes that ended in the rollout, the update's losses and stats, the value's explained variance
    on the rollout and the learning rate."""
    for step, episode_return, length in episodes:
        writer.add_scalar("charts/episodic_return", episode_return, step)
        writer.add_scalar("charts/episodic_length", length, step)
    for key, value in stats.items():
        writer.add_scalar(f"losses/{key}", value, global_step)
    writer.add_scalar("losses/explained_variance", explained_variance(batch["values"], batch["returns"]), global_step)
    writer.add_scalar("charts/learning_rate", learning_rate, global_step)


def main(args: Args) -> str:
    args = validate_args(args)
    run_utils.check_memory(games=args.num_envs + args.eval_episodes, frames=args.num_envs * args.num_steps, cuda=args.cuda)
    args, run_dir, lock = run_utils.open_run_dir(args, SCRIPT)
    with lock, run_utils.interrupt_reported(run_dir, SCRIPT, args.checkpoint_interval):
        train(args, run_dir)
    return run_dir


def train(args: Args, run_dir: str) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    checkpoint = run_utils.load_checkpoint(args, SCRIPT, device) if args.resume else None
    run_utils.start_run(args, run_dir, SCRIPT, checkpoint)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    agent = make_agent(args, device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    envs = make_envs(args, seed=args.seed)
    rollout = Rollout(args, device)
    rollout.start(envs)
    iteration, global_step = 0, 0
    if checkpoint:
        restore_agent_state(agent, envs, rollout, checkpoint["agents"][0])
        optimizer.load_state_dict(checkpoint["optimizer"])
        run_utils.restore_rng_state(checkpoint["rng"])
        iteration, global_step = checkpoint["iteration"], checkpoint["global_step"]
    # Evaluation uses the plain module: on the CPU its batch shrinks as envs finish, which would recompile.
    model = torch.compile(agent) if args.compile else agent
    policy = make_policy(model, args, device)
    # UCB-DrAC's bandit; its state travels in the checkpoint, so a resumed run chooses as this one would have.
    bandit = UCBAugmentation() if args.augment == "ucb" else None
    if bandit and checkpoint:
        bandit.load_state_dict(checkpoint["ucb"])

    if args.track:
        run_utils.start_tracking(args, run_dir)
    # purge_step hides what the interrupted process logged after its last checkpoint.
    writer = SummaryWriter(run_dir, purge_step=global_step + 1 if checkpoint else None)
    writer.add_text("hyperparameters", run_utils.hyperparameter_table(args))
    writer.add_text("machine", run_utils.machine_description(device), global_step)
    progress = tqdm(total=args.num_iterations * args.batch_size, initial=global_step, unit="step",
                    dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)
    start_time, start_step, test_return = time.time(), global_step, None  # None: not evaluated yet
    stop = StopSignals()
    try:
        while iteration < args.num_iterations:
            iteration += 1
            timer = run_utils.Timer()
            global_step, episodes, batch = collect_rollout(policy, envs, rollout, args, device, global_step)
            timer.lap("rollout")
            update_args = args
            if bandit:  # UCB-DrAC: credit the last update's augmentation with this rollout, choose the next
                update_args = replace(args, augment=bandit.step(batch["returns"]))
                writer.add_scalar("charts/ucb_augmentation", bandit.current, global_step)
            stats = update(model, optimizer, batch, update_args)
            agent.redraw_dropout_masks()  # once after each update phase, as in coinrun (nothing without dropout)
            timer.lap("update")
            run_utils.stop_if_diverged(run_dir, iteration, global_step, [stats], [agent])
            log_iteration(writer, stats, batch, episodes, global_step, args.learning_rate)

            if iteration % args.eval_interval == 0 or iteration == args.num_iterations:
                timer.lap()
                test_return = evaluation.log_evaluation(writer, agent, ProcgenVecEnv, args, device, iteration, global_step,
                                                         run_dir, SCRIPT)
                timer.lap("eval")
            sps = int((global_step - start_step) / (time.time() - start_time))  # steps per second of each agent
            if iteration % args.checkpoint_interval == 0 or iteration == args.num_iterations or stop.received:
                run_utils.save_checkpoint(run_dir, {
                    "script": SCRIPT, "args": asdict(args), "iteration": iteration, "global_step": global_step,
                    "agents": [agent_state(agent, envs, rollout)],
                    "optimizer": optimizer.state_dict(), "rng": run_utils.rng_state(),
                    **({"ucb": bandit.state_dict()} if bandit else {})})
            writer.add_scalar("charts/SPS", sps, global_step)
            timer.log(writer, global_step)
            progress.update(args.batch_size)
            progress.set_postfix(sps=sps, test_return="not yet" if test_return is None else f"{test_return:.2f}")
            stop.stop_if_received(iteration, args.num_iterations, SCRIPT, run_dir)
    finally:
        stop.restore()
        progress.close()
        writer.close()
        envs.close()


if __name__ == "__main__":
    run_utils.cli(Args, main, SCRIPT)
