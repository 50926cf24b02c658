"""The evaluation counts exactly one complete episode per evaluation env."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluation
import mdpo
import ppo
from helpers import ROOT


class ScriptedEnv:
    """Env e ends its episodes every lengths[e] steps; the first episode pays 1 a step, later ones 100."""

    def __init__(self, lengths):
        self.lengths = np.array(lengths)
        self.num_envs = len(lengths)
        self.t = np.zeros(self.num_envs, dtype=int)

    def reset(self):
        return np.zeros((self.num_envs, 64, 64, 3), np.uint8), {}

    def step(self, actions):
        assert actions.shape == (self.num_envs,)
        self.t += 1
        first_episode = self.t <= self.lengths
        reward = np.where(first_episode, 1.0, 100.0)
        done = self.t % self.lengths == 0
        return np.zeros((self.num_envs, 64, 64, 3), np.uint8), reward, done, np.zeros_like(done), {}


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_each_env_contributes_its_first_complete_episode(module):
    lengths = [1, 3, 7, 20]  # short episodes finish many times before the long one ends once
    env = ScriptedEnv(lengths)
    mean_return, frames = evaluation.evaluate(module.Agent(), env, torch.device("cpu"), seed=0, capture_video=True)
    assert mean_return == pytest.approx(np.mean(lengths))
    assert env.t[0] == max(lengths)  # it ran until the slowest env finished, and no further
    assert len(frames) == lengths[0] + 1  # env 0's frames: the first one and one per step of its episode


def test_evaluation_is_reproducible_and_leaves_training_rng_alone():
    agent = ppo.Agent()
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    args = ppo.validate_args(ppo.Args(env_id="bigfish", eval_episodes=3, num_envs=2, num_steps=8, num_minibatches=1,
                                      total_timesteps=16))
    first = evaluation.evaluate(agent, ppo.ProcgenVecEnv("bigfish", args.eval_episodes, 0, 0, "hard", 7), torch.device("cpu"), seed=7)[0]
    assert torch.rand(1) == before
    assert evaluation.evaluate(agent, ppo.ProcgenVecEnv("bigfish", args.eval_episodes, 0, 0, "hard", 7), torch.device("cpu"), seed=7)[0] == first


@pytest.mark.parametrize("bf16", [False, True])
def test_the_evaluation_runs_the_network_in_bfloat16_only_when_asked(bf16):
    agent, seen = ppo.Agent(), []
    agent.actor.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    evaluation.evaluate(agent, ScriptedEnv([2, 3]), torch.device("cpu"), seed=0, bf16=bf16)
    assert seen and set(seen) == {torch.bfloat16 if bf16 else torch.float32}


def test_running_the_module_points_to_the_tool_that_evaluates_a_saved_run():
    result = subprocess.run([sys.executable, "evaluation.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "robustness.py" in result.stderr
