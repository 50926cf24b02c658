"""MDPO interleaves its two agents' steps, and on a GPU overlaps them (one agent's envs step on a
worker thread while the other's policy runs); each agent must still collect exactly what it
collects stepping alone."""

import threading

import pytest
import torch

import mdpo
import ppo
from helpers import CUDA_MARKS


def pixel_policy(offset):
    """A deterministic stand-in for the network: actions, log-probs and values from the frames' sums."""
    def policy(obs):
        total = obs.sum(dim=(1, 2, 3))
        return (total + offset) % 15, -(total % 7).float(), (total % 11).float()
    return policy


def small_args(module, **kw):
    """4 coinrun envs x 64 steps: long enough for episodes to end inside the rollouts."""
    return module.validate_args(module.Args(env_id="coinrun", num_envs=4, num_steps=64, num_minibatches=2,
                                            total_timesteps=256, **kw))


def start(module, args, rollout):
    envs = module.make_envs(args, seed=args.seed)
    rollout.start(envs)
    return envs


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
@pytest.mark.parametrize("overlap, agents", [(False, 2), (True, 2), (True, 3)])
def test_interleaved_rollouts_equal_each_agent_stepping_alone(overlap, agents, device):
    args = small_args(mdpo, num_agents=agents)
    device = torch.device(device)  # on a GPU: pinned host buffers and copies that do not block
    policies = [pixel_policy(7 * i) for i in range(agents)]  # different actions: the trajectories differ
    rollouts = [mdpo.Rollout(args, device) for _ in range(agents)]
    envs = [start(mdpo, args, rollout) for rollout in rollouts]
    alone_args = small_args(ppo)
    alone_rollouts = [ppo.Rollout(alone_args, device) for _ in range(agents)]
    alone_envs = [start(ppo, alone_args, rollout) for rollout in alone_rollouts]
    global_step, found_episodes = 0, 0
    for _ in range(2):  # the second rollout continues from the first's last frames
        next_step, episodes, batches = mdpo.collect_rollouts(policies, envs, rollouts, args, device, global_step,
                                                             overlap)
        for i in range(agents):
            alone_step, alone_episodes, alone_batch = ppo.collect_rollout(
                policies[i], alone_envs[i], alone_rollouts[i], alone_args, device, global_step)
            assert next_step == alone_step
            assert episodes[i] == alone_episodes
            for key, value in alone_batch.items():
                torch.testing.assert_close(batches[i][key], value, rtol=0, atol=0, msg=key)
            torch.testing.assert_close(rollouts[i].next_obs, alone_rollouts[i].next_obs, rtol=0, atol=0)
            found_episodes += len(episodes[i])
        assert not torch.equal(batches[0]["obs"], batches[1]["obs"])
        global_step = next_step
    assert found_episodes > 0  # the episode bookkeeping was exercised


def test_ctrl_c_inside_overlapped_rollouts_propagates_and_leaves_no_thread():
    args = small_args(mdpo)
    device = torch.device("cpu")
    calls = []

    def interrupted_policy(obs):
        calls.append(1)
        if len(calls) == 5:  # the third step's first agent: the other agent's env step is in flight
            raise KeyboardInterrupt
        return pixel_policy(0)(obs)

    rollouts = [mdpo.Rollout(args, device) for _ in range(2)]
    envs = [start(mdpo, args, rollout) for rollout in rollouts]
    threads_before = threading.active_count()
    with pytest.raises(KeyboardInterrupt):
        mdpo.collect_rollouts([interrupted_policy] * 2, envs, rollouts, args, device, 0, overlap=True)
    assert threading.active_count() == threads_before
