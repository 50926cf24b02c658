"""The baselines as their source defines them (Cobbe et al. 2019's dropout), K-agent MDPO, and the
environment wrapper chain the scripts rely on."""

import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

import drac
import mdpo
import ppo
from helpers import tiny_args


def dropout_masks(agent):
    return {name: buffer.clone() for name, buffer in agent.named_buffers() if name.endswith("mask")}


def test_dropout_follows_every_convolution_with_one_mask_per_layer_of_its_feature_shape():
    agent = ppo.Agent(dropout=0.1)
    masks = dropout_masks(agent)
    convs = [m for m in agent.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(masks) == len(convs) == 15
    # Each stack: its first conv at the stack's input size, its four residual convs after the max-pool.
    shapes = sorted(tuple(mask.shape) for mask in masks.values())
    expected = sorted([(1, 16, 64, 64)] + [(1, 16, 32, 32)] * 4 + [(1, 32, 32, 32)] + [(1, 32, 16, 16)] * 4
                      + [(1, 32, 16, 16)] + [(1, 32, 8, 8)] * 4)
    assert shapes == expected
    for mask in masks.values():  # coinrun's mask: 0 with probability p, else 1 / (1 - p)
        values = mask.unique()
        assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(1 / 0.9)
    kept = torch.cat([(mask > 0).float().flatten() for mask in masks.values()]).mean()
    assert abs(float(kept) - 0.9) < 0.01
    assert not any(isinstance(m, ppo.SharedDropout) for m in ppo.Agent(dropout=0.0).modules())


@pytest.mark.parametrize("module", [ppo, mdpo, drac])
def test_dropout_mask_is_shared_by_the_batch_and_off_in_eval_mode(module):
    torch.manual_seed(0)
    agent = module.Agent(dropout=0.5)
    frame = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        batch_logits, _ = agent(frame.repeat(4, 1, 1, 1))
        # One mask for the whole batch: identical frames give identical outputs.
        torch.testing.assert_close(batch_logits, batch_logits[:1].expand(4, -1))
        agent.eval()
        eval_logits, _ = agent(frame)
        plain = module.Agent(dropout=0.0)
        plain.load_state_dict({k: v for k, v in agent.state_dict().items() if not k.endswith("mask")})
        plain_logits, _ = plain(frame)
    torch.testing.assert_close(eval_logits, plain_logits)
    assert not torch.allclose(batch_logits[:1], eval_logits)


def test_with_dropout_the_first_minibatch_ratio_is_one_and_masks_change_only_between_iterations():
    args = tiny_args(ppo, env_id="bigfish", dropout=0.1, cuda=False)
    device = torch.device("cpu")
    torch.manual_seed(args.seed)  # as the run seeds itself
    agent = ppo.make_agent(args, device)
    agent.actor.weight.data *= 100  # a peaked policy, so that a different mask would move the log-probs
    envs = ppo.make_envs(args, seed=args.seed)
    rollout = ppo.Rollout(args, device)
    rollout.start(envs)
    _, _, batch = ppo.collect_rollout(ppo.make_policy(agent, args, device), envs, rollout, args, device, 0)
    envs.close()
    masks_at_rollout = dropout_masks(agent)

    torch.manual_seed(1)
    first_minibatch = torch.randperm(args.batch_size)[:args.minibatch_size]
    with torch.no_grad():
        logits, _ = agent(batch["obs"][first_minibatch])
    new_logprob = torch.log_softmax(logits, -1).gather(1, batch["actions"][first_minibatch, None]).squeeze(1)
    ratio = (new_logprob - batch["logprobs"][first_minibatch]).exp()
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)

    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    ppo.update(agent, optimizer, batch, args)
    for name, mask in dropout_masks(agent).items():  # not within the update phase
        assert torch.equal(mask, masks_at_rollout[name]), name
    agent.redraw_dropout_masks()
    changed = [not torch.equal(mask, masks_at_rollout[name]) for name, mask in dropout_masks(agent).items()]
    assert all(changed)


def test_training_redraws_the_masks_once_per_iteration_and_checkpoints_them(tmp_path):
    args = ppo.Args(env_id="bigfish", num_envs=4, num_steps=16, num_minibatches=2, update_epochs=1,
                    total_timesteps=64, eval_interval=100, eval_episodes=2, dropout=0.1, cuda=False,
                    run_dir=str(tmp_path / "run"))
    ppo.main(args)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    saved = {k: v for k, v in checkpoint["agents"][0]["agent"].items() if k.endswith("mask")}
    assert len(saved) == 15
    torch.manual_seed(args.seed)  # as the run seeds itself
    initial = dropout_masks(ppo.make_agent(ppo.validate_args(args), torch.device("cpu")))
    assert all(not torch.equal(saved[name], initial[name]) for name in initial)


# ---------------------------------------------------------------------------------------------
# K agents
# ---------------------------------------------------------------------------------------------


def test_num_agents_below_two_is_refused():
    with pytest.raises(mdpo.UsageError, match="--num-agents must be at least 2"):
        tiny_args(mdpo, num_agents=1)


def test_three_agents_train_with_a_stream_each_and_log_their_agreement(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = str(tmp_path / "run")
    mdpo.main(mdpo.Args(env_id="bigfish", num_agents=3, num_envs=4, num_steps=16, num_minibatches=2,
                        update_epochs=1, total_timesteps=64, eval_interval=1, eval_episodes=2, cuda=False,
                        run_dir=run_dir))
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert len(checkpoint["agents"]) == 3 and all("procgen" in state for state in checkpoint["agents"])
    for i in range(1, 4):
        accumulator = EventAccumulator(os.path.join(run_dir, f"agent{i}"))
        accumulator.Reload()
        assert {"losses/mutual_kl", "losses/grad_norm", "eval/test_return"} <= set(accumulator.Tags()["scalars"])
    accumulator = EventAccumulator(run_dir)
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"eval/debiased_cka", "eval/policy_tv", "eval/debiased_cka_1_2", "eval/debiased_cka_1_3",
            "eval/debiased_cka_2_3"} <= tags
    pairs = [accumulator.Scalars(f"eval/debiased_cka_{i}_{j}")[-1].value for i, j in ((1, 2), (1, 3), (2, 3))]
    assert accumulator.Scalars("eval/debiased_cka")[-1].value == pytest.approx(np.mean(pairs), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The wrapper chain: episode statistics of the raw score, then reward normalisation
# ---------------------------------------------------------------------------------------------


class ScriptedVecEnv(gym.vector.VectorEnv):
    """Two envs with fixed rewards and episode ends, resetting inside the step that ends an episode, as Procgen does."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}
    REWARDS = np.array([[1.0, 2.0], [3.0, 0.0], [5.0, 1.0], [7.0, 4.0], [2.0, 0.0]])
    ENDS = np.array([[False, False], [True, False], [False, True], [False, False], [True, False]])

    def __init__(self, *args, **kwargs):
        self.num_envs, self.t = 2, 0
        self.single_observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self.single_action_space = gym.spaces.Discrete(15)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, 2)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, 2)

    def reset(self, *, seed=None, options=None):
        return np.zeros((2, 64, 64, 3), np.uint8), {}

    def step(self, actions):
        reward, ended = self.REWARDS[self.t], self.ENDS[self.t]
        self.t += 1
        return np.zeros((2, 64, 64, 3), np.uint8), reward.copy(), ended.copy(), np.zeros(2, bool), {}


def test_wrapper_chain_counts_episodes_and_normalises_with_the_running_return_across_boundaries(monkeypatch):
    monkeypatch.setattr(ppo, "ProcgenVecEnv", ScriptedVecEnv)
    gamma = 0.9
    envs = ppo.make_envs(tiny_args(ppo, gamma=gamma), seed=1)
    envs.reset()
    episodes, normalised = [], []
    for t in range(len(ScriptedVecEnv.REWARDS)):
        _, reward, _, _, info = envs.step(np.zeros(2, int))
        normalised.append(reward)
        if "episode" in info:
            episodes += [(t, i, float(info["episode"]["r"][i]), int(info["episode"]["l"][i]))
                         for i in np.flatnonzero(info["_episode"])]
    # Env 0: episodes [1, 3] and [5, 7, 2]; env 1: [2, 0, 1]. Raw scores and lengths, every episode.
    assert episodes == [(1, 0, 4.0, 2), (2, 1, 3.0, 3), (4, 0, 14.0, 3)]

    # The running discounted return restarts with each episode (its first reward starts it afresh); the
    # normaliser divides by the std of all returns seen so far, from a prior of mean 0, var 1, count 1e-4.
    running = np.zeros(2)
    mean, var, count = 0.0, 1.0, 1e-4
    for t, (reward, ended) in enumerate(zip(ScriptedVecEnv.REWARDS, ScriptedVecEnv.ENDS)):
        running = running * gamma * (1 - ended) + reward
        batch_mean, batch_var, n = running.mean(), running.var(), 2
        delta, total = batch_mean - mean, count + n
        var = (var * count + batch_var * n + delta ** 2 * count * n / total) / total
        mean, count = mean + delta * n / total, total
        expected = np.clip(reward / np.sqrt(var + 1e-8), -10, 10)
        np.testing.assert_allclose(normalised[t], expected, rtol=1e-6, err_msg=f"step {t}")
        running[ended] = 0.0
    assert envs.env.return_rms.count == pytest.approx(1e-4 + 2 * len(ScriptedVecEnv.REWARDS))
