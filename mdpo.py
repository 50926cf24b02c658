"""MDPO, Mutual Distillation Policy Optimization, on Procgen with IMPALA-CNN actor-critics.

Two (or --num-agents K) agents learn side by side, each from its own vector of Procgen environments.
Agent i's loss L_i is its PPO loss plus alpha x the mean over its peers j of KL(pi_j || pi_i) on its own
states, which pulls its action distribution towards theirs: mutual distillation as a regulariser. One
optimiser minimises L = mean_i L_i over all agents' weights, so each KL term's gradient reaches the peer
too, pulling both together; `--detach-peer` makes the peer a fixed target (classic deep mutual learning).
`python mdpo.py --help` lists every flag."""

import contextlib
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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

SCRIPT = "mdpo"
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
    num_agents: int = 2  # K, the number of agents learning side by side (each with its own envs)
    alpha: float = 1.0  # weight of the mutual KL term (0: K independent PPO learners under one loss and optimiser)
    detach_peer: bool = False  # treat the peer's policy as a fixed target in the KL term (classic deep mutual learning)

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


# ---- Learning: GAE, the loss, the update -------------------------------------------------------
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


def mutual_kl(peer_logits, own_logits):
    """mean over states of KL(peer || own), from logits through log-softmax (no epsilon needed)."""
    peer_logp, own_logp = F.log_softmax(peer_logits, dim=-1), F.log_softmax(own_logits, dim=-1)
    return (peer_logp.exp() * (peer_logp - own_logp)).sum(-1).mean()


def l2_penalty(agent):
    """sum(w**2) / 2 over weights, not biases: tf.nn.l2_loss as in Cobbe et al.'s coinrun (their l2_weight 1e-4)."""
    return sum(p.pow(2).sum() for p in agent.parameters() if p.dim() > 1) / 2


def minibatch_loss(agents, batches, mb_inds, args: Args):
    """Each agent's loss L_i = PPO loss + alpha * mean over peers j of KL(pi_j || pi_i) on its own minibatch B_i,
    plus the L2 penalty of --l2-coef."""
    obs = torch.cat([batch["obs"][mb_inds] for batch in batches])  # every agent's states, agent by agent
    logits_on, own_values = [], []  # logits_on[j][i]: agent j's logits on agent i's states
    for j, agent in enumerate(agents):
        with torch.autocast(obs.device.type, torch.bfloat16, enabled=args.bf16):
            logits, values = agent(obs)
        logits_on.append(logits.split(len(mb_inds)))
        own_values.append(values.split(len(mb_inds))[j])
    losses, stats = [], []
    for i, agent in enumerate(agents):
        loss, agent_stats = ppo_loss(logits_on[i][i], own_values[i], batches[i], mb_inds, args)
        peer_logits = [logits_on[j][i] for j in range(len(agents)) if j != i]  # the peers' policies on i's states
        if args.detach_peer:
            peer_logits = [logits.detach() for logits in peer_logits]
        kl = torch.stack([mutual_kl(logits, logits_on[i][i]) for logits in peer_logits]).mean()
        if args.alpha > 0:  # alpha = 0 leaves the agents independent: no gradient crosses
            loss = loss + args.alpha * kl
        if args.l2_coef > 0:
            loss = loss + args.l2_coef * l2_penalty(agent)
        losses.append(loss)
        stats.append({key: value.detach() for key, value in {**agent_stats, "mutual_kl": kl}.items()})
    return losses, stats


def update(agents, optimizer, batches, args: Args) -> list:
    """update_epochs passes of minibatch steps on L = mean_i L_i; returns, per agent, the means of
    minibatch_loss's stats and of its gradient norm."""
    totals = [{} for _ in agents]
    for _ in range(args.update_epochs):
        permutation = torch.randperm(args.batch_size, device=batches[0]["obs"].device)
        for start in range(0, args.batch_size, args.minibatch_size):
            mb_inds = permutation[start:start + args.minibatch_size]  # the same indices for every agent's buffer
            losses, stats = minibatch_loss(agents, batches, mb_inds, args)
            optimizer.zero_grad(set_to_none=True)
            (sum(losses) / len(agents)).backward()
            # Each agent's gradient clipped on its own. It is the gradient of mean_i L_i, so with K agents it is
            # 1/K of its own PPO loss's: MDPO's clip acts as K x max_grad_norm would in ppo.py (docs/method.md).
            for agent, agent_stats in zip(agents, stats):
                agent_stats["grad_norm"] = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)  # before clipping
            optimizer.step()
            for agent_stats, agent_totals in zip(stats, totals):
                for key, value in agent_stats.items():
                    agent_totals[key] = agent_totals.get(key, 0.0) + value
    # One host sync per iteration, not one per minibatch.
    return [{key: float(value) / (args.update_epochs * args.num_minibatches) for key, value in agent_totals.items()}
            for agent_totals in totals]


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


def collect_rollouts(policies, envs, rollouts, args: Args, device, global_step: int, overlap: bool):
    """Every agent's rollout, their steps interleaved; returns the new global_step, episodes and batches.
    With `overlap` (on a GPU) each agent's env step runs on a worker thread while the main thread stores the
    other agent's last step and runs its policy (Procgen releases the GIL); on the CPU the policy needs the
    cores, so the envs step in the main thread. Either way each agent sees what it would see stepping alone."""
    episodes = [[] for _ in envs]  # per agent: (global step, raw return, length) of every episode that ended
    stepping = [None for _ in envs]  # per agent: its env step's result, or its future while in flight

    def store(i, step):
        result = stepping[i].result() if overlap else stepping[i]
        store_step(result, rollouts[i], step, global_step + (step + 1) * args.num_envs, episodes[i])

    with ThreadPoolExecutor(max_workers=len(envs)) as pool:
        for step in range(args.num_steps):
            for i in range(len(envs)):
                if step > 0:
                    store(i, step - 1)
                actions = act(policies[i], rollouts[i], step)
                stepping[i] = pool.submit(envs[i].step, actions) if overlap else envs[i].step(actions)
        for i in range(len(envs)):
            store(i, args.num_steps - 1)
    batches = [finish_rollout(policy, rollout, args, device) for policy, rollout in zip(policies, rollouts)]
    return global_step + args.num_steps * args.num_envs, episodes, batches


# ---- Agreement between the agents: representation similarity and policy distance ---------------
def log_agreement(writer, agents, frames, global_step, bf16) -> None:
    """Log the mean over agent pairs of the debiased linear CKA between their 256-d features and of the
    total-variation distance between their policies on the probe frames (each pair's CKA too when K > 2).
    Logged from step 0, before any update: untrained agents already agree on shared frames, so a value is
    read against its run's own start."""
    ckas, tvs = evaluation.agreement(agents, frames, bf16)
    for (i, j), cka in ckas.items():
        if len(agents) > 2:
            writer.add_scalar(f"eval/debiased_cka_{i + 1}_{j + 1}", cka, global_step)
    writer.add_scalar("eval/debiased_cka", float(np.mean(list(ckas.values()))), global_step)
    writer.add_scalar("eval/policy_tv", float(np.mean(list(tvs.values()))), global_step)


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
    refuse_unless(args.alpha >= 0, f"--alpha must not be negative, got {args.alpha}")
    refuse_unless(args.num_agents >= 2, f"--num-agents must be at least 2 (mutual distillation needs peers), got {args.num_agents}")
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
    run_utils.check_memory(games=args.num_agents * args.num_envs + args.eval_episodes,
                           frames=args.num_agents * args.num_envs * args.num_steps, cuda=args.cuda)
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

    agents = [make_agent(args, device) for _ in range(args.num_agents)]
    # One optimiser over every agent's parameters: L = mean_i L_i is minimised jointly.
    optimizer = torch.optim.Adam([p for agent in agents for p in agent.parameters()], lr=args.learning_rate, eps=1e-5,
                                 fused=True)
    envs = [make_envs(args, seed=args.seed) for _ in agents]  # each agent its own envs, same level seed
    rollouts = [Rollout(args, device) for _ in agents]
    for agent_envs, rollout in zip(envs, rollouts):
        rollout.start(agent_envs)
    probes = evaluation.probe_frames(ProcgenVecEnv, args.env_id, args.distribution_mode, args.seed).to(device)
    iteration, global_step = 0, 0
    if checkpoint:
        for agent, agent_envs, rollout, state in zip(agents, envs, rollouts, checkpoint["agents"]):
            restore_agent_state(agent, agent_envs, rollout, state)
        optimizer.load_state_dict(checkpoint["optimizer"])
        run_utils.restore_rng_state(checkpoint["rng"])
        iteration, global_step = checkpoint["iteration"], checkpoint["global_step"]
    # Evaluation uses the plain module: on the CPU its batch shrinks as envs finish, which would recompile.
    models = [torch.compile(agent) if args.compile else agent for agent in agents]
    policies = [make_policy(model, args, device) for model in models]

    if args.track:
        run_utils.start_tracking(args, run_dir)
    # One event stream per agent, so that the agents overlay on the same charts, and the run's own for
    # what compares them. purge_step hides what the interrupted process logged after its last checkpoint.
    purge_step = global_step + 1 if checkpoint else None
    agent_writers = [SummaryWriter(os.path.join(run_dir, f"agent{i + 1}"), purge_step=purge_step) for i in range(len(agents))]
    writer = SummaryWriter(run_dir, purge_step=purge_step)
    for agent_writer in agent_writers:
        agent_writer.add_text("hyperparameters", run_utils.hyperparameter_table(args))
    writer.add_text("machine", run_utils.machine_description(device), global_step)
    if not checkpoint:
        log_agreement(writer, agents, probes, 0, args.bf16)
    progress = tqdm(total=args.num_iterations * args.batch_size, initial=global_step, unit="step",
                    dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)
    start_time, start_step, test_return = time.time(), global_step, [None] * len(agents)  # None: not evaluated yet
    stop = StopSignals()
    try:
        while iteration < args.num_iterations:
            iteration += 1
            timer = run_utils.Timer()
            global_step, episodes, batches = collect_rollouts(policies, envs, rollouts, args, device, global_step,
                                                         overlap=device.type == "cuda")
            timer.lap("rollout")
            stats = update(models, optimizer, batches, args)
            for agent in agents:
                agent.redraw_dropout_masks()  # once after each update phase, as in coinrun (nothing without dropout)
            timer.lap("update")
            run_utils.stop_if_diverged(run_dir, iteration, global_step, stats, agents)
            for i, agent_writer in enumerate(agent_writers):
                log_iteration(agent_writer, stats[i], batches[i], episodes[i], global_step, args.learning_rate)

            if iteration % args.eval_interval == 0 or iteration == args.num_iterations:
                timer.lap()
                for i, agent_writer in enumerate(agent_writers):
                    test_return[i] = evaluation.log_evaluation(agent_writer, agents[i], ProcgenVecEnv, args, device, iteration,
                                                               global_step, run_dir, f"agent{i + 1}")
                timer.lap("eval")
                log_agreement(writer, agents, probes, global_step, args.bf16)
                timer.lap("agreement")
            sps = int((global_step - start_step) / (time.time() - start_time))  # steps per second of each agent
            if iteration % args.checkpoint_interval == 0 or iteration == args.num_iterations or stop.received:
                run_utils.save_checkpoint(run_dir, {
                    "script": SCRIPT, "args": asdict(args), "iteration": iteration, "global_step": global_step,
                    "agents": [agent_state(*state) for state in zip(agents, envs, rollouts)],
                    "optimizer": optimizer.state_dict(), "rng": run_utils.rng_state()})
            for agent_writer in agent_writers:
                agent_writer.add_scalar("charts/SPS", sps, global_step)
                timer.log(agent_writer, global_step)
            progress.update(args.batch_size)
            progress.set_postfix(sps=sps, test_return="not yet" if None in test_return else f"{np.mean(test_return):.2f}")
            stop.stop_if_received(iteration, args.num_iterations, SCRIPT, run_dir)
    finally:
        stop.restore()
        progress.close()
        writer.close()
        for agent_writer, agent_envs in zip(agent_writers, envs):
            agent_writer.close()
            agent_envs.close()


if __name__ == "__main__":
    run_utils.cli(Args, main, SCRIPT)
