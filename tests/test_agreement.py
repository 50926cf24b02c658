"""The agents' agreement that every MDPO run logs: linear CKA between their features, and the total-variation
distance between their policies, on probe frames fixed for the whole run."""


import numpy as np
import pytest
import torch

import evaluation
import mdpo


def test_linear_cka_of_a_hand_computed_case():
    # Centred x = (-1, 0, 1), y = (-1, 1, 0): |y'x|^2 = 1, |x'x| = |y'y| = 2, so CKA = 1 / 4 (the squared correlation).
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [3.0], [2.0]])
    assert evaluation.linear_cka(x, y) == pytest.approx(0.25, abs=1e-12)


def test_linear_cka_is_one_on_itself_and_invariant_to_rotation_and_isotropic_scaling():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64)
    y = torch.randn(200, 8, generator=g, dtype=torch.float64) + x[:, :8]  # related to x, but not a copy
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert evaluation.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    base = evaluation.linear_cka(x, y)
    assert 0.05 < base < 0.95
    assert evaluation.linear_cka(x.double() @ rotation, y) == pytest.approx(base, abs=1e-10)
    assert evaluation.linear_cka(3.5 * x, y) == pytest.approx(base, abs=1e-10)
    assert evaluation.linear_cka(x, 0.01 * y) == pytest.approx(base, abs=1e-10)
    # Not invariant to an anisotropic scaling: a CKA that ignored the features' geometry would pass the above.
    assert evaluation.linear_cka(x * torch.linspace(0.1, 10, 16, dtype=torch.float64), y) != pytest.approx(base, abs=1e-3)


class Recorder:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = value


def test_agreement_logs_mean_pairwise_cka_and_the_policies_tv_distance():
    torch.manual_seed(0)
    agents = [mdpo.Agent() for _ in range(3)]
    agents[2].load_state_dict(agents[0].state_dict())  # agents 1 and 3 are the same network
    frames = torch.randint(0, 256, (32, 64, 64, 3), dtype=torch.uint8)
    writer = Recorder()
    mdpo.log_agreement(writer, agents, frames, 0, bf16=False)
    with torch.no_grad():
        features = [agent.hidden(frames) for agent in agents]
        probs = [agent.actor(h).softmax(-1).double() for agent, h in zip(agents, features)]
    assert writer.scalars["eval/representation_cka_1_3"] == pytest.approx(1.0, abs=1e-9)
    expected_tv = [0.5 * float((probs[i] - probs[j]).abs().sum(-1).mean()) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert expected_tv[1] == 0
    assert writer.scalars["eval/policy_tv"] == pytest.approx(np.mean(expected_tv), rel=1e-5)
    ckas = [writer.scalars[f"eval/representation_cka_{i}_{j}"] for i, j in ((1, 2), (1, 3), (2, 3))]
    assert writer.scalars["eval/representation_cka"] == pytest.approx(np.mean(ckas))
    assert all(agent.training for agent in agents)  # evaluated in eval mode, then restored


def test_the_probe_frames_come_from_the_seed_alone():
    # Not in the checkpoint: a resumed run makes the same frames again from its seed.
    args = mdpo.validate_args(mdpo.Args(env_id="bigfish", num_envs=4, num_steps=16, num_minibatches=2, total_timesteps=64))
    first = mdpo.probe_frames(args)
    assert first.shape == (256, 64, 64, 3) and first.dtype == torch.uint8
    assert torch.equal(first, mdpo.probe_frames(args))
    assert not torch.equal(first, mdpo.probe_frames(mdpo.validate_args(mdpo.Args(env_id="bigfish", num_envs=4, num_steps=16,
                                                                                   num_minibatches=2, total_timesteps=64, seed=2))))
