"""Behaviours pinned against independent expectations: the update step re-derived with a plain loop,
dropout's modes, the evaluation's levels and seeds, reward normalisation in the rollout, the network
against a separately written IMPALA-CNN, resume of the logged episodes and of the flags, and bad
input through both command lines. Scripted environments stand in for Procgen where the numbers
must be known by hand."""

import copy
import dataclasses
import json
import os
import random
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gymnasium.vector import AutoresetMode
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.summary.writer import event_file_writer
from torch.distributions import Categorical, kl_divergence

import drac
import evaluation
import mdpo
import ppo
import run_utils
from helpers import ROOT, random_batch
from test_agreement import cka_by_quadruples
from test_numerics import plain_forward, plain_ppo_loss
from test_units import reference_gae

CPU = torch.device("cpu")
# Runs of 2 envs x 8 steps: the scripted episodes (3 and 4 steps) straddle every rollout's end.
TINY = dict(num_envs=2, num_steps=8, num_minibatches=2, update_epochs=1, eval_episodes=3, cuda=False)


# ---------------------------------------------------------------------------------------------
# A scripted Procgen: episodes and rewards known by hand
# ---------------------------------------------------------------------------------------------


class ScriptedProcgen(gym.vector.VectorEnv):
    """Stands in for ProcgenVecEnv (same constructor). Env e's episodes last 3 + e steps; step k of an
    episode (k = 1, 2, ...) pays k on the full level distribution (num_levels=0) and 2k on a training
    set of levels, so an episode of length L scores scale * L (L + 1) / 2. Like Procgen it resets inside
    the step that ends an episode, and exposes get_state/set_state (as `procgen`) for checkpoints."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}
    made = []  # (num_envs, num_levels, start_level, seed) of every instance, in order

    def __init__(self, env_id, num_envs, num_levels, start_level, distribution_mode, seed):
        ScriptedProcgen.made.append((num_envs, num_levels, start_level, seed))
        self.num_envs, self.scale = num_envs, 1.0 if num_levels == 0 else 2.0
        self.lengths = 3 + np.arange(num_envs)
        self.t = np.zeros(num_envs, dtype=np.int64)  # steps into the current episode
        self.procgen = self
        self.single_observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self.single_action_space = gym.spaces.Discrete(15)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)

    def get_state(self):
        return self.t.copy()

    def set_state(self, state):
        self.t[:] = state

    def frames(self):
        obs = np.zeros((self.num_envs, 64, 64, 3), np.uint8)
        obs[:, :8, :8, 0] = (40 * self.t % 256)[:, None, None]
        obs[:, 8:16, :8, 1] = (50 * np.arange(self.num_envs) % 256)[:, None, None]
        return obs

    def reset(self, *, seed=None, options=None):
        return self.frames(), {}

    def step(self, actions):
        self.t += 1
        reward = self.scale * self.t
        ended = self.t >= self.lengths
        self.t[ended] = 0
        return self.frames(), reward.astype(np.float64), ended, np.zeros_like(ended), {}

    def close(self, **kwargs):
        pass


def scripted_episodes(num_envs, steps, scale=2.0, first_step=0):
    """(global step, raw return, length) of every episode the scripted envs end in env steps
    first_step + 1 ... first_step + steps, in the order the rollout meets them."""
    found = []
    for s in range(first_step + 1, first_step + steps + 1):
        for e in range(num_envs):
            length = 3 + e
            if s % length == 0:
                found.append((s * num_envs, scale * length * (length + 1) / 2, length))
    return found


@pytest.fixture
def scripted(monkeypatch):
    """The scripts build the scripted envs instead of Procgen's."""
    ScriptedProcgen.made = []
    monkeypatch.setattr(ppo, "ProcgenVecEnv", ScriptedProcgen)
    monkeypatch.setattr(drac, "ProcgenVecEnv", ScriptedProcgen)
    monkeypatch.setattr(mdpo, "ProcgenVecEnv", ScriptedProcgen)
    return ScriptedProcgen


def logged(event_dir, tag):
    accumulator = EventAccumulator(event_dir)
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def event_dirs(module, run_dir):
    return [run_dir] if module is ppo else [os.path.join(run_dir, "agent1"), os.path.join(run_dir, "agent2")]


# ---------------------------------------------------------------------------------------------
# The update step, re-derived with a plain loop
# ---------------------------------------------------------------------------------------------


def clip_by_hand(agent, max_norm):
    """Scale this agent's gradient to norm max_norm if it is longer; return its norm before (float64)."""
    grads = [p.grad for p in agent.parameters()]
    norm = float(sum((g.double() ** 2).sum() for g in grads) ** 0.5)
    if norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def plain_mdpo_losses(agents, batches, inds, args):
    """L_i = PPO loss on agent i's minibatch + alpha x mean over peers j of KL(pi_j || pi_i) on i's states."""
    losses = []
    for i, agent in enumerate(agents):
        obs = batches[i]["obs"][inds]
        logits, value = plain_forward(agent, obs)
        kls = [kl_divergence(Categorical(logits=plain_forward(peer, obs)[0]), Categorical(logits=logits)).mean()
               for j, peer in enumerate(agents) if j != i]
        losses.append(plain_ppo_loss(logits, value, batches[i], inds, args) + args.alpha * sum(kls) / len(kls))
    return losses


def plain_update(agents, optimizer, batches, args, seed):
    """The update written as a loop: the same permutation (same seed) for every agent's buffer, the mean of
    the agents' losses, each agent's gradient clipped alone. Returns each agent's mean pre-clip norm."""
    torch.manual_seed(seed)
    norms = [[] for _ in agents]
    for _ in range(args.update_epochs):
        permutation = torch.randperm(args.batch_size)
        for start in range(0, args.batch_size, args.minibatch_size):
            inds = permutation[start:start + args.minibatch_size]
            if len(agents) == 1:
                logits, value = plain_forward(agents[0], batches[0]["obs"][inds])
                loss = plain_ppo_loss(logits, value, batches[0], inds, args)
            else:
                losses = plain_mdpo_losses(agents, batches, inds, args)
                loss = sum(losses) / len(losses)
            optimizer.zero_grad()
            loss.backward()
            for agent, agent_norms in zip(agents, norms):
                agent_norms.append(clip_by_hand(agent, args.max_grad_norm))
            optimizer.step()
    return [float(np.mean(n)) for n in norms]


def make_optimizer(kind, params):
    # SGD moves each weight by lr x its (clipped) gradient, so a wrong scale shows; Adam is what the scripts use.
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05)
    return torch.optim.Adam(params, lr=5e-4, eps=1e-5, fused=False)


def relative_change_error(before, after_code, after_plain):
    """|code's weight change - plain loop's| / |plain loop's|, over all of an agent's parameters."""
    with torch.no_grad():
        code = torch.cat([(a - b).flatten() for a, b in zip(after_code, before)])
        plain = torch.cat([(a - b).flatten() for a, b in zip(after_plain, before)])
        return float((code - plain).norm() / plain.norm())


def run_both_updates(module, num_agents, optimizer_kind, max_grad_norm, seed=3):
    # Two epochs of two minibatches of 4 samples: 4 optimiser steps, tiny forwards.
    fields = dict(num_envs=2, num_steps=4, num_minibatches=2, update_epochs=2, total_timesteps=8,
                  max_grad_norm=max_grad_norm)
    if module is mdpo:
        fields.update(num_agents=num_agents, alpha=0.7)
    args = module.validate_args(module.Args(**fields))
    torch.manual_seed(0)
    agents = [module.make_agent(args, CPU) for _ in range(num_agents)]
    for agent in agents:  # peaked, different policies: the KL and the entropy matter
        agent.actor.weight.data *= 50
    plain = [copy.deepcopy(agent) for agent in agents]
    for agent in plain:
        for p in agent.parameters():
            p.data = p.data.contiguous()
    before = [[p.detach().clone() for p in agent.parameters()] for agent in agents]
    batches = [random_batch(10 + i, args.batch_size) for i in range(num_agents)]

    optimizer = make_optimizer(optimizer_kind, [p for agent in agents for p in agent.parameters()])
    torch.manual_seed(seed)
    if module is ppo:
        stats = [ppo.update(agents[0], optimizer, batches[0], args)]
    else:
        stats = mdpo.update(agents, optimizer, batches, args)
    plain_optimizer = make_optimizer(optimizer_kind, [p for agent in plain for p in agent.parameters()])
    plain_norms = plain_update(plain, plain_optimizer, batches, args, seed)
    errors = [relative_change_error(b, list(a.parameters()), list(p.parameters())) for b, a, p in
              zip(before, agents, plain)]
    return args, stats, plain_norms, errors, optimizer


@pytest.mark.parametrize("module, num_agents, optimizer_kind, max_grad_norm", [
    (ppo, 1, "sgd", 1e-3), (ppo, 1, "adam", 0.5),
    (mdpo, 2, "sgd", 1e-3),  # every agent clipped: joint clipping would scale them differently
    (mdpo, 3, "sgd", 1e-3),
    (mdpo, 2, "sgd", 1e6),  # nothing clipped: the sum of the losses would double every step
    (mdpo, 2, "adam", 0.5),
])
def test_update_equals_a_plain_loop_with_per_agent_clipping_of_the_mean_loss(module, num_agents, optimizer_kind,
                                                                            max_grad_norm):
    args, stats, plain_norms, errors, optimizer = run_both_updates(module, num_agents, optimizer_kind,
                                                                   max_grad_norm)
    assert max(errors) < 2e-3, errors
    for agent_stats, norm in zip(stats, plain_norms):  # logged before clipping, averaged over minibatches
        assert agent_stats["grad_norm"] == pytest.approx(norm, rel=1e-4)
    if max_grad_norm == 1e-3:
        assert min(plain_norms) > 10 * max_grad_norm  # the clip really acted
    if optimizer_kind == "adam":  # one optimiser step per minibatch of every epoch
        steps = {int(state["step"]) for state in optimizer.state.values()}
        assert steps == {args.update_epochs * args.num_minibatches}


def test_mdpo_update_uses_one_set_of_minibatch_indices_for_every_agent():
    """Identical buffers and identical agents stay identical through an update only if every agent
    sees the same samples at every step."""
    args = mdpo.validate_args(mdpo.Args(num_envs=2, num_steps=4, num_minibatches=2, update_epochs=1,
                                        total_timesteps=8, num_agents=2))
    torch.manual_seed(0)
    agent = mdpo.make_agent(args, CPU)
    agent.actor.weight.data *= 50
    agents = [copy.deepcopy(agent) for _ in range(2)]
    batch = random_batch(4, args.batch_size)
    optimizer = torch.optim.SGD([p for a in agents for p in a.parameters()], lr=0.05)
    mdpo.update(agents, optimizer, [batch, batch], args)
    for other in agents[1:]:
        for p, q in zip(agents[0].parameters(), other.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert not torch.equal(agents[0].actor.weight, agent.actor.weight)


# ---------------------------------------------------------------------------------------------
# Dropout: on in the rollout and the update, off in evaluation, restored afterwards
# ---------------------------------------------------------------------------------------------


def test_dropout_is_on_in_rollout_and_update_off_in_evaluation_and_reaches_the_network(scripted, monkeypatch,
                                                                                      tmp_path):
    phase, seen, agents = ["setup"], [], []
    real_make_agent = ppo.make_agent

    def make_agent_watched(args, device):
        agent = real_make_agent(args, device)
        agents.append(agent)
        for module in agent.modules():
            if isinstance(module, ppo.SharedDropout):
                module.register_forward_pre_hook(lambda m, inputs: seen.append((phase[0], m.training, m.p)))
        return agent

    def in_phase(name, fn):
        def wrapped(*args, **kwargs):
            phase[0] = name
            try:
                return fn(*args, **kwargs)
            finally:
                phase[0] = "between"
        return wrapped

    monkeypatch.setattr(ppo, "make_agent", make_agent_watched)
    for owner, name in ((ppo, "collect_rollout"), (ppo, "update"), (evaluation, "log_evaluation")):
        monkeypatch.setattr(owner, name, in_phase(name, getattr(owner, name)))
    ppo.main(ppo.Args(total_timesteps=32, eval_interval=1, dropout=0.3, run_dir=str(tmp_path / "run"), **TINY))

    assert len(agents) == 1
    modes = {name: {training for phase_name, training, _ in seen if phase_name == name}
             for name in ("collect_rollout", "update", "log_evaluation", "between", "setup")}
    assert modes["collect_rollout"] == {True}  # both iterations: the second one after an evaluation
    assert modes["update"] == {True}
    assert modes["log_evaluation"] == {False}
    assert modes["between"] == modes["setup"] == set()
    assert {p for _, _, p in seen} == {0.3}  # --dropout's value reached every layer
    # The second rollout came after the first evaluation: training mode was restored.
    phases = [name for name, _, _ in seen]
    first_eval = phases.index("log_evaluation")
    assert "collect_rollout" in phases[first_eval:] and agents[0].training


# ---------------------------------------------------------------------------------------------
# Evaluation: which levels, which seeds, the gap's sign, and the training's random stream
# ---------------------------------------------------------------------------------------------


class ScalarLog:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)


def random_streams():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_evaluation_tests_on_all_levels_trains_on_the_training_levels_and_logs_train_minus_test(module, scripted):
    args = module.validate_args(module.Args(num_levels=200, start_level=7, seed=3, num_envs=4, num_steps=16,
                                            num_minibatches=2, total_timesteps=64, eval_episodes=3, cuda=False))
    agent = module.make_agent(args, CPU)
    seeds = []
    for iteration in (1, 2):
        scripted.made = []
        torch.manual_seed(11)
        np.random.seed(11)
        random.seed(11)
        before = random_streams()
        log = ScalarLog()
        evaluation.log_evaluation(log, agent, module.ProcgenVecEnv, args, CPU, iteration, 640, "unused", "agent1")
        after = random_streams()
        assert after[0] == before[0] and np.array_equal(after[1], before[1]) and torch.equal(after[2], before[2])
        # Two fresh envs of eval_episodes each: the full distribution (levels from 0), then the training levels.
        (test_n, test_levels, test_start, test_seed), (train_n, train_levels, train_start, train_seed) = scripted.made
        assert (test_n, test_levels, test_start) == (3, 0, 0)
        assert (train_n, train_levels, train_start) == (3, 200, 7)
        assert args.seed not in (test_seed, train_seed)
        seeds.append((test_seed, train_seed))
        # First episodes of lengths 3, 4, 5: 6, 10, 15 points a step-unit; training levels pay twice.
        assert log.scalars["eval/test_return"] == (pytest.approx(31 / 3), 640)
        assert log.scalars["eval/train_return"] == (pytest.approx(62 / 3), 640)
        assert log.scalars["eval/generalization_gap"] == (pytest.approx(62 / 3 - 31 / 3), 640)
    assert seeds[0][0] != seeds[1][0] and seeds[0][1] != seeds[1][1]  # fresh levels at every evaluation


def config_as_saved(module, args, run_dir):
    """The run's config as a resume reads it: written to config.json (tuples become lists), read by saved_config."""
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"script": module.SCRIPT, "args": dataclasses.asdict(args)}, f)
    open(os.path.join(run_dir, "checkpoint.pt"), "w").close()
    return run_utils.saved_config(str(run_dir), module.SCRIPT)


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_evaluation_samples_with_its_own_seeded_generator(module):
    """Same seed, same actions; another seed, other actions; the training's stream untouched either way."""
    torch.manual_seed(0)
    agent = module.Agent()
    agent.actor.weight.data *= 0  # a uniform policy: every action equally likely

    class ActionLog(ScriptedProcgen):
        def step(self, actions):
            taken.append(np.array(actions))
            return super().step(actions)

    def actions_of(seed):
        taken.clear()
        evaluation.evaluate(agent, ActionLog("bigfish", 4, 0, 0, "hard", 0), CPU, seed)
        return np.concatenate(taken)

    taken = []
    torch.manual_seed(5)
    first = actions_of(1)
    assert torch.rand(1).item() == torch.rand(1, generator=torch.Generator().manual_seed(5)).item()
    assert np.array_equal(actions_of(1), first) and not np.array_equal(actions_of(2), first)


# ---------------------------------------------------------------------------------------------
# Reward normalisation in the rollout; raw scores in the episode statistics
# ---------------------------------------------------------------------------------------------


def normalised_by_hand(raw, ends, gamma, epsilon=1e-8):
    """Each step's rewards divided by the std of the running discounted returns seen so far (a running
    estimate from mean 0, var 1, count 1e-4), then clipped to [-10, 10]. As gymnasium's vector wrapper
    with same-step resets, a return is cut at the step that ends its episode."""
    running = np.zeros(raw.shape[1])
    mean, var, count = 0.0, 1.0, 1e-4
    out = np.zeros_like(raw)
    for t, (reward, ended) in enumerate(zip(raw, ends)):
        running = running * gamma * (1 - ended) + reward
        n, delta = len(running), running.mean() - mean
        total = count + n
        var = (var * count + running.var() * n + delta ** 2 * count * n / total) / total
        mean, count = mean + delta * n / total, total
        out[t] = np.clip(reward / np.sqrt(var + epsilon), -10, 10)
        running[ended] = 0.0
    return out


def constant_policy(obs):
    n = obs.shape[0]
    return torch.zeros(n, dtype=torch.long), torch.zeros(n), torch.zeros(n)


def one_rollout(module, policy, args, seed):
    """(rollout, global step, episodes, batch) of one rollout of one agent on fresh envs, in any script."""
    envs = module.make_envs(args, seed=seed)
    rollout = module.Rollout(args, CPU)
    rollout.start(envs)
    if module is not mdpo:
        return (rollout, *module.collect_rollout(policy, envs, rollout, args, CPU, 0))
    global_step, (episodes,), (batch,) = mdpo.collect_rollouts([policy], [envs], [rollout], args, CPU, 0, False)
    return rollout, global_step, episodes, batch


@pytest.mark.parametrize("module", [ppo, drac, mdpo])
def test_rollout_stores_normalised_clipped_rewards_and_reports_raw_episode_scores(module, scripted):
    args = module.validate_args(module.Args(num_envs=4, num_steps=16, num_minibatches=2, total_timesteps=64))
    assert args.gamma == 0.999  # the paper's, not the wrapper's default 0.99
    rollout, global_step, episodes, _ = one_rollout(module, constant_policy, args, seed=1)
    steps = np.arange(1, 17)[:, None]
    lengths = 3 + np.arange(4)[None, :]
    raw = 2.0 * ((steps - 1) % lengths + 1)
    ends = steps % lengths == 0
    expected = normalised_by_hand(raw, ends, args.gamma)
    np.testing.assert_allclose(rollout.rewards.numpy(), expected, rtol=1e-5)
    assert (expected == 10).any() and (np.abs(expected) < 10).any()  # both the clip and the scale acted
    assert global_step == 64
    assert episodes == scripted_episodes(4, 16)  # raw scores: 2 + 4 + 6 = 12 for a 3-step episode


def frame_valued_policy(obs):
    """Values that differ from frame to frame (the scripted frames encode each env's step), so a
    bootstrap from the wrong frame or a done from the wrong step changes the advantages."""
    n = obs.shape[0]
    return torch.zeros(n, dtype=torch.long), torch.zeros(n), (obs.sum(dim=(1, 2, 3)) % 11).float() / 5


@pytest.mark.parametrize("module", [ppo, drac, mdpo])
def test_rollout_advantages_are_gae_of_its_rewards_values_and_episode_ends(module, scripted):
    # 2 envs x 8 steps: env 1's episodes (4 steps) end on the rollout's last step, env 0's (3 steps) do not.
    args = module.validate_args(module.Args(num_envs=2, num_steps=8, num_minibatches=2, total_timesteps=16,
                                            gamma=0.9, gae_lambda=0.8))
    rollout, _, _, batch = one_rollout(module, frame_valued_policy, args, seed=0)
    lengths = [3, 4]
    starts = [[t > 0 and t % lengths[e] == 0 for e in range(2)] for t in range(8)]
    next_start = [8 % length == 0 for length in lengths]
    next_value = frame_valued_policy(rollout.next_obs)[2].tolist()
    expected = reference_gae(rollout.rewards.tolist(), rollout.values.tolist(), starts, next_value, next_start,
                             0.9, 0.8)
    assert next_start == [False, True] and len(set(rollout.values.flatten().tolist())) > 2
    np.testing.assert_allclose(batch["advantages"].view(8, 2).numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("module", [ppo, drac, mdpo])
def test_agent_state_carries_the_reward_normaliser_so_a_resumed_run_scales_rewards_alike(module, scripted):
    args = module.validate_args(module.Args(num_envs=2, num_steps=8, num_minibatches=2, total_timesteps=16))
    stay = module.make_envs(args, seed=0)
    stay.reset()
    for _ in range(5):  # the scripted envs pay every step: the normaliser's statistics move
        stay.step(np.zeros(2, dtype=np.int64))
    resumed = module.make_envs(args, seed=0)
    resumed.reset()
    agent, rollouts = module.make_agent(args, CPU), [module.Rollout(args, CPU) for _ in range(2)]
    module.restore_agent_state(agent, resumed, rollouts[1], module.agent_state(agent, stay, rollouts[0]))
    for _ in range(4):
        a, b = stay.step(np.zeros(2, dtype=np.int64))[1], resumed.step(np.zeros(2, dtype=np.int64))[1]
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# The network against an IMPALA-CNN written from the spec
# ---------------------------------------------------------------------------------------------


def impala_by_hand(weights, frames):
    """SPEC section 1 in float64: three stacks (conv 3x3, max-pool 3x3 stride 2 padding 1, two residual
    blocks relu-conv-relu-conv + skip), flatten, ReLU, Linear(2048, 256), ReLU; the two heads."""
    w = {name: value.double() for name, value in weights.items()}
    x = frames.permute(0, 3, 1, 2).double() / 255.0
    for stack in range(3):
        prefix = f"network.{stack}."
        x = F.conv2d(x, w[prefix + "conv.weight"], w[prefix + "conv.bias"], padding=1)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        for block in ("res_block0", "res_block1"):
            b = prefix + block + "."
            y = F.conv2d(F.relu(x), w[b + "conv0.weight"], w[b + "conv0.bias"], padding=1)
            y = F.conv2d(F.relu(y), w[b + "conv1.weight"], w[b + "conv1.bias"], padding=1)
            x = x + y
    hidden = F.relu(F.linear(F.relu(x.flatten(1)), w["network.5.weight"], w["network.5.bias"]))
    logits = F.linear(hidden, w["actor.weight"], w["actor.bias"])
    value = F.linear(hidden, w["critic.weight"], w["critic.bias"]).squeeze(-1)
    return hidden, logits, value


@pytest.mark.parametrize("module", [ppo, drac, mdpo])
def test_network_matches_an_impala_cnn_written_from_the_spec(module):
    torch.manual_seed(0)
    agent = module.make_agent(module.validate_args(module.Args(num_envs=4, num_steps=16, num_minibatches=2,
                                                               total_timesteps=64)), CPU)
    with torch.no_grad():  # every weight and bias away from its initial value, so each one matters
        for p in agent.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    frames = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    hidden, logits, value = impala_by_hand(agent.state_dict(), frames)
    with torch.no_grad():
        got_logits, got_value = agent(frames)
        got_hidden = agent.hidden(frames)
    for got, want in ((got_hidden, hidden), (got_logits, logits), (got_value, value)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert float(logits.std()) > 0.1  # the outputs are not all alike, so the comparison can fail


def test_mdpo_agent_is_ppo_agent_weight_for_weight_with_the_spec_head_gains():
    torch.manual_seed(0)
    mdpo_state = mdpo.Agent().state_dict()
    torch.manual_seed(0)
    ppo_state = ppo.Agent().state_dict()
    assert list(mdpo_state) == list(ppo_state)
    for name in ppo_state:
        assert torch.equal(mdpo_state[name], ppo_state[name]), name
    for module in (ppo, mdpo):
        agent = module.Agent()
        # An orthogonal (15 x 256) matrix with gain g has every singular value g; the biases start at 0.
        torch.testing.assert_close(torch.linalg.svdvals(agent.actor.weight), torch.full((15,), 0.01))
        torch.testing.assert_close(torch.linalg.svdvals(agent.critic.weight), torch.ones(1))
        assert agent.actor.bias.abs().max() == 0 and agent.critic.bias.abs().max() == 0


# ---------------------------------------------------------------------------------------------
# The agents' agreement (MDPO): policy TV distance and representation CKA by hand
# ---------------------------------------------------------------------------------------------


def test_agreement_logs_the_mean_tv_distance_and_debiased_cka_computed_by_hand():
    torch.manual_seed(0)
    agents = [mdpo.Agent() for _ in range(3)]
    for agent in agents:  # policies far from uniform, and far from each other
        agent.actor.weight.data.normal_(0, 1)
    frames = torch.randint(0, 256, (12, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    log = ScalarLog()
    mdpo.log_agreement(log, agents, frames, 7, bf16=False)
    with torch.no_grad():
        hidden = [agent.hidden(frames).double().numpy() for agent in agents]
        probs = [agent(frames)[0].double().softmax(-1).numpy() for agent in agents]
    tvs, ckas = [], []
    for i, j in ((0, 1), (0, 2), (1, 2)):
        tvs.append(np.mean([0.5 * np.sum(np.abs(p - q)) for p, q in zip(probs[i], probs[j])]))
        ckas.append(cka_by_quadruples(hidden[i], hidden[j]))
        assert log.scalars[f"eval/debiased_cka_{i + 1}_{j + 1}"] == (pytest.approx(ckas[-1], rel=1e-4, abs=1e-6), 7)
    assert 0.05 < np.mean(tvs) < 0.95  # the policies differ, but not totally: the distance can be wrong
    assert log.scalars["eval/policy_tv"] == (pytest.approx(np.mean(tvs), rel=1e-4), 7)
    assert log.scalars["eval/debiased_cka"] == (pytest.approx(np.mean(ckas), rel=1e-4, abs=1e-6), 7)


# ---------------------------------------------------------------------------------------------
# Resume: the logged episodes continue; flags that change the computation are refused
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_after_an_interrupted_run_resumes_its_logged_episodes_are_those_of_one_straight_run(module, scripted,
                                                                                          monkeypatch, tmp_path):
    """Checkpoints at iterations 2 and 4 of 4; Ctrl-C before the second: iterations 3-4 were logged but not
    saved, so the resumed run must hide them, and carry the unfinished episodes' scores across."""
    run_dir = str(tmp_path / "run")
    args = module.Args(total_timesteps=4 * 16, checkpoint_interval=2, eval_interval=100, run_dir=run_dir, **TINY)
    real_write, writes = run_utils.save_checkpoint, []
    # Both runs are in this process, often within one second: their event files then sort by tensorboard's
    # per-process file counter, written unpadded (".10" before ".9"). Three digits throughout keep the order.
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(100))

    def interrupted_second_write(*a):
        writes.append(1)
        if len(writes) == 2:
            raise KeyboardInterrupt
        real_write(*a)

    monkeypatch.setattr(run_utils, "save_checkpoint", interrupted_second_write)
    with pytest.raises(SystemExit) as stopped:
        module.main(args)
    assert stopped.value.code == 130
    monkeypatch.setattr(run_utils, "save_checkpoint", real_write)
    module.main(dataclasses.replace(args, resume=run_dir))
    expected = scripted_episodes(2, 32)  # 4 rollouts of 8 steps of 2 envs
    # every agent's training envs, before and after the resume, play the run's seed (the same levels)
    training_seeds = [seed for n, levels, _, seed in scripted.made if (n, levels) == (2, args.num_levels)]
    assert training_seeds == [args.seed] * 2 * (2 if module is mdpo else 1)
    for event_dir in event_dirs(module, run_dir):
        assert logged(event_dir, "charts/episodic_return") == [(s, r) for s, r, _ in expected]
        assert logged(event_dir, "charts/episodic_length") == [(s, length) for s, _, length in expected]


# Fields whose change alters what a run computes: a resume must refuse every one of them.
MUST_MATCH = {"seed", "torch_deterministic", "env_id", "num_levels", "start_level", "distribution_mode",
              "learning_rate", "num_envs", "num_steps", "gamma", "gae_lambda", "num_minibatches", "update_epochs",
              "norm_adv", "clip_coef", "ent_coef", "vf_coef", "max_grad_norm", "batch_size", "minibatch_size",
              "l2_coef", "dropout"}
MUST_MATCH_OF = {ppo: MUST_MATCH, drac: MUST_MATCH | {"augment", "drac_coef"},
                 mdpo: MUST_MATCH | {"num_agents", "alpha", "detach_peer"}}


# What docs/usage.md promises a resume may change: where the run is logged, its budget, its evaluation and its speed.
MAY_CHANGE = {"cuda", "track", "wandb_project_name", "wandb_entity", "capture_video", "run_dir", "resume",
              "checkpoint_interval", "total_timesteps", "num_iterations", "eval_interval", "eval_episodes",
              "bf16", "compile"}


def another_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, tuple):
        return (*value, "other")
    return "other" if value is None else value + "-other"


@pytest.mark.parametrize("module", [ppo, drac, mdpo])
def test_resume_refuses_every_field_outside_the_resumable_ones(module, tmp_path):
    args = module.validate_args(module.Args(num_envs=4, num_steps=16, num_minibatches=2, total_timesteps=64))
    config = config_as_saved(module, args, tmp_path)  # through config.json, as a resume reads it
    run_utils.check_compatible(args, config)
    names = {field.name for field in dataclasses.fields(module.Args)}
    assert MUST_MATCH_OF[module] <= names - run_utils.RESUMABLE_FIELDS
    assert MAY_CHANGE == run_utils.RESUMABLE_FIELDS  # no more: a field added there would pass the loop below
    for name in sorted(names):
        changed = dataclasses.replace(args, **{name: another_value(getattr(args, name))})
        if name in run_utils.RESUMABLE_FIELDS:
            run_utils.check_compatible(changed, config)
        else:
            with pytest.raises(module.UsageError, match=f"cannot resume: --{name.replace('_', '-')} is "):
                run_utils.check_compatible(changed, config)


# ---------------------------------------------------------------------------------------------
# Bad input through both command lines: one line, exit code 2
# ---------------------------------------------------------------------------------------------


# Runs each script's command line (its __main__ block, as `python ppo.py ...` does) once per case in one
# process, so that the dozens of cases pay for one interpreter start.
CLI_CASES = """
import contextlib, io, json, runpy, sys
results = []
for script, argv in json.loads(sys.argv[1]):
    sys.argv = [script, *argv]
    stderr, code = io.StringIO(), 0
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as error:
            code = error.code
    results.append([code, stderr.getvalue()])
print(json.dumps(results))
"""


def bad_input_cases(script):
    """(flags, what the one line must say) for every check of validate_args."""
    cases = [
        (["--env-id", "pacman"], "unknown game 'pacman'"),
        (["--distribution-mode", "exploration"], "unknown distribution mode 'exploration'"),
        (["--env-id", "coinrun", "--distribution-mode", "extreme"], "coinrun has no extreme mode"),
        (["--learning-rate", "0"], "--learning-rate must be positive"),
        (["--gamma", "1.5"], "--gamma and --gae-lambda must lie in [0, 1]"),
        (["--gae-lambda=-0.1"], "--gamma and --gae-lambda must lie in [0, 1]"),
        (["--num-envs", "3", "--num-steps", "5"], "does not divide into 2 minibatches"),
        (["--num-envs", "1", "--num-steps", "2"], "--norm-adv needs minibatches of at least 2 samples"),
        (["--total-timesteps", "32"], "--total-timesteps (32) is less than one batch (64)"),
        (["--total-timesteps", str(10**15)], "--total-timesteps must be at most 137,246,953,408 at 64 steps"),
        # What numpy, torch or Procgen would reject after the checks above, and a run directory that cannot be made.
        (["--seed=-1"], "--seed must lie in [0, "),
        (["--seed", str(2**32)], "--seed must lie in [0, "),
        (["--num-levels", str(2**31)], "--num-levels must be at most 2147483647"),
        (["--start-level", str(2**31)], "--start-level must be at most 2147483647"),
        (["--start-level", "5", "--num-levels", str(2**31 - 1)], "--start-level + --num-levels must be at most 2147483647"),
        (["--start-level", "5", "--num-levels", "0"], "--start-level has no effect with --num-levels 0"),
        ([], "cannot write the run directory"),
        (["--run-dir", ""], "--run-dir is empty"),  # an unset shell variable: not the default directory
        (["--resume", ""], "--resume is empty"),
        (["--resume", "README.md"], "cannot resume: README.md is a file, not a run directory"),
        # Frames past any machine's memory: refused before a game is built.
        (["--num-envs", "1000000", "--num-steps", "10000000", "--total-timesteps", str(10**13)],
         "rollout frames need at least"),
    ]
    for flag in ("total-timesteps", "num-envs", "num-steps", "num-minibatches", "update-epochs", "eval-interval",
                 "eval-episodes", "checkpoint-interval", "max-grad-norm", "clip-coef"):
        cases.append(([f"--{flag}", "0"], f"--{flag} must be positive"))
    negatives = ["num-levels", "start-level", "ent-coef", "vf-coef"]
    negatives += ["l2-coef"] + (["alpha"] if script == "mdpo.py" else [])
    for flag in negatives:
        cases.append(([f"--{flag}=-1"], f"--{flag} must not be negative"))
    module = {"ppo.py": ppo, "drac.py": drac, "mdpo.py": mdpo}[script]
    floats = [f.name for f in dataclasses.fields(module.Args) if f.type in (float, "float")]
    assert "learning_rate" in floats and "gamma" in floats
    for name in floats:
        for value in ("nan", "inf", "-inf"):
            flag = name.replace("_", "-")
            cases.append(([f"--{flag}={value}"], f"--{flag} must be a finite number, got {value}"))
    cases += [(["--dropout", "1"], "--dropout must lie in [0, 1)"), (["--dropout=-0.1"], "--dropout must lie in [0, 1)")]
    if script == "drac.py":
        cases += [
            (["--augment", "blur"], "unknown augmentation 'blur'"),
            (["--augment", "none"], "unknown augmentation 'none'"),
            (["--drac-coef=-1"], "--drac-coef must be positive"),
            (["--drac-coef", "0"], "--drac-coef must be positive"),
        ]
    if script == "mdpo.py":
        cases.append((["--num-agents", "1"], "--num-agents must be at least 2"))
    return cases


def test_bad_input_through_both_command_lines_fails_in_one_line_with_exit_code_2(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # Valid tiny flags that each case overrides; a case wrongly accepted fails at once on this run directory
    # (inside a file) instead of training.
    base = ["--env-id", "bigfish", "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2",
            "--total-timesteps", "64", "--no-cuda", "--run-dir", str(blocker / "run")]
    cases = [(script, flags, message) for script in ("ppo.py", "drac.py", "mdpo.py")
             for flags, message in bad_input_cases(script)]
    result = subprocess.run([sys.executable, "-c", CLI_CASES, json.dumps([[s, base + f] for s, f, _ in cases])],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    failures = []
    for (script, flags, message), (code, stderr) in zip(cases, outcomes):
        lines = stderr.strip().splitlines()
        if code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or message not in lines[0]:
            failures.append(f"{script} {' '.join(flags)}: exit {code}, stderr {stderr[-300:]!r}")
    assert not failures, "\n".join(failures)
    assert len(outcomes) == len(cases) > 80


def test_the_computed_sizes_are_no_flags_so_they_cannot_be_set_and_silently_ignored(tmp_path):
    # validate_args computes them from --num-envs, --num-steps, --num-minibatches and --total-timesteps.
    cases = [[script, [f"--{name}", "4096", "--run-dir", str(tmp_path / "run")]]
             for script in ("ppo.py", "drac.py", "mdpo.py") for name in ("batch-size", "minibatch-size", "num-iterations")]
    result = subprocess.run([sys.executable, "-c", CLI_CASES, json.dumps(cases)], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for (script, flags), (code, stderr) in zip(cases, json.loads(result.stdout.strip().splitlines()[-1])):
        assert code == 2 and f"Unrecognized options: {flags[0]}" in stderr, (script, flags, code, stderr[-300:])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", [ppo, drac, mdpo])
def test_the_seed_headroom_holds_every_seed_a_run_derives_from_its_own(module):
    # validate_args keeps seed + SEED_HEADROOM + num_iterations below 2**31; evaluations seed at
    # seed + EVAL_SEED_OFFSET + iteration, the probes at seed + PROBE_SEED_OFFSET.
    assert module.SEED_HEADROOM > max(evaluation.EVAL_SEED_OFFSET, evaluation.PROBE_SEED_OFFSET)
    args = module.validate_args(module.Args(num_envs=4, num_steps=16, num_minibatches=2, total_timesteps=64 * 10))
    highest = module.INT32_MAX - module.SEED_HEADROOM - args.num_iterations
    module.validate_args(dataclasses.replace(args, seed=highest))
    with pytest.raises(module.UsageError, match="--seed must lie in"):
        module.validate_args(dataclasses.replace(args, seed=highest + 1))
    assert highest + evaluation.EVAL_SEED_OFFSET + args.num_iterations <= 2**31 - 1
    assert highest + evaluation.PROBE_SEED_OFFSET <= 2**31 - 1
