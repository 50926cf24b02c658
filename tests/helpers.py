"""Shared test data."""

import os

import pytest
import torch

import evaluation

# The repository root, where the scripts live: the working directory of the tests' subprocesses.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Tests of the GPU paths (CUDA graphs, pinned transfers): skipped on the CPU; `python -m pytest -m cuda tests`
# runs them alone on a GPU machine.
CUDA_MARKS = (pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


def needs_cuda(test):
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


def random_batch(seed, n=64):
    """A flattened rollout of n random transitions, as Rollout.flat returns it."""
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=g),
            "actions": torch.randint(0, 15, (n,), generator=g), "logprobs": -torch.rand(n, generator=g) * 3,
            "values": torch.randn(n, generator=g), "advantages": torch.randn(n, generator=g),
            "returns": torch.randn(n, generator=g)}


def tiny_args(module, **kw):
    """Validated Args of a tiny run (8 envs x 16 steps, 2 minibatches) of ppo or mdpo."""
    return module.validate_args(module.Args(num_envs=8, num_steps=16, num_minibatches=2, total_timesteps=128, **kw))


# MDPO probes 2,048 frames (seconds per tiny run on a CPU); conftest.py gives every other test 32 of them.
full_probe_set = pytest.mark.full_probe_set


def without_evaluation(module, monkeypatch):
    """The evaluation at a tiny run's last iteration is most of its time: for tests of something else."""
    monkeypatch.setattr(evaluation, "log_evaluation", lambda *a, **k: float("nan"))
