"""Unit tests: the learning maths against independent float64 references, and the checks on flags."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import drac
import mdpo
import ppo
from helpers import ROOT, random_batch, tiny_args


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


def conv_params(c_in, c_out):
    return c_in * c_out * 9 + c_out


def test_impala_cnn_shapes_and_parameter_count():
    agent = ppo.Agent()
    obs = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8)
    logits, value = agent(obs)
    assert logits.shape == (5, 15) and value.shape == (5,)
    assert agent.hidden(obs).shape == (5, 256)
    expected = 0
    for c_in, c_out in ((3, 16), (16, 32), (32, 32)):  # a conv, then two residual blocks of two convs
        expected += conv_params(c_in, c_out) + 4 * conv_params(c_out, c_out)
    expected += 2048 * 256 + 256 + 256 * 15 + 15 + 256 + 1
    assert sum(p.numel() for p in agent.parameters()) == expected


def test_heads_are_initialised_with_the_spec_gains():
    torch.manual_seed(0)
    agent = ppo.Agent()
    # An orthogonal matrix with gain g has singular values g.
    assert torch.linalg.svdvals(agent.actor.weight).allclose(torch.full((15,), 0.01), atol=1e-6)
    assert torch.linalg.svdvals(agent.critic.weight).allclose(torch.ones(1), atol=1e-6)


def test_mdpo_and_ppo_networks_are_the_same():
    torch.manual_seed(0)
    a = mdpo.Agent()
    torch.manual_seed(0)
    b = ppo.Agent()
    obs = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    assert torch.equal(a(obs)[0], b(obs)[0])


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------


def reference_gae(rewards, values, starts, next_value, next_start, gamma, lam):
    """Plain-Python GAE: walk each env's rollout backwards, cutting the recursion at episode ends.

    starts[t][e] is True when obs t of env e begins an episode, so transition t-1 ended one.
    """
    T, N = len(rewards), len(rewards[0])
    adv = [[0.0] * N for _ in range(T)]
    for e in range(N):
        running = 0.0
        for t in range(T - 1, -1, -1):
            episode_ends = next_start[e] if t == T - 1 else starts[t + 1][e]
            bootstrap = next_value[e] if t == T - 1 else values[t + 1][e]
            if episode_ends:
                delta = rewards[t][e] - values[t][e]
                running = delta
            else:
                delta = rewards[t][e] + gamma * bootstrap - values[t][e]
                running = delta + gamma * lam * running
            adv[t][e] = running
    return adv


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_a_plain_python_loop(seed):
    rng = np.random.default_rng(seed)
    T, N, gamma, lam = 17, 5, 0.99, 0.9
    rewards = rng.normal(size=(T, N))
    values = rng.normal(size=(T, N))
    starts = rng.random((T, N)) < 0.15  # several episode ends inside the rollout
    next_value, next_start = rng.normal(size=N), rng.random(N) < 0.5
    expected = np.array(reference_gae(rewards.tolist(), values.tolist(), starts.tolist(), next_value.tolist(),
                                      next_start.tolist(), gamma, lam))
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    for module in (ppo, mdpo, drac):
        adv, ret = module.compute_gae(t(rewards), t(values), t(starts.astype(float)), t(next_value),
                                      t(next_start.astype(float)), gamma, lam)
        np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ret.numpy(), expected + values, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------------------------


def reference_ppo_losses(new_lp, old_lp, adv, new_v, old_v, ret, clip, norm_adv):
    n = len(new_lp)
    if norm_adv:
        mean = sum(adv) / n
        std = math.sqrt(sum((a - mean) ** 2 for a in adv) / (n - 1))  # unbiased, as torch.std
        adv = [(a - mean) / (std + 1e-8) for a in adv]
    pg, vl = 0.0, 0.0
    for i in range(n):
        ratio = math.exp(new_lp[i] - old_lp[i])
        clipped_ratio = min(max(ratio, 1 - clip), 1 + clip)
        pg += max(-adv[i] * ratio, -adv[i] * clipped_ratio) / n
        v_clipped = old_v[i] + min(max(new_v[i] - old_v[i], -clip), clip)
        vl += 0.5 * max((new_v[i] - ret[i]) ** 2, (v_clipped - ret[i]) ** 2) / n
    return pg, vl


def clipped_losses(module, new_lp, old_lp, adv, new_v, old_v, ret, clip, norm_adv):
    """module.ppo_loss's policy and value losses, approx KL and clip fraction, given the taken actions'
    new log-probabilities: logits whose action 0 has probability exp(new_lp) and action 1 the rest."""
    n = len(new_lp)
    logits = torch.full((n, 15), -math.inf, dtype=new_lp.dtype)
    logits[:, 0], logits[:, 1] = new_lp, torch.log1p(-new_lp.exp())
    batch = {"actions": torch.zeros(n, dtype=torch.long), "logprobs": old_lp, "advantages": adv, "values": old_v,
             "returns": ret}
    args = module.Args(clip_coef=clip, norm_adv=norm_adv)
    _, stats = module.ppo_loss(logits, new_v, batch, torch.arange(n), args)
    return stats["policy_loss"], stats["value_loss"], stats["approx_kl"], stats["clipfrac"]


@pytest.mark.parametrize("norm_adv", [True, False])
def test_clipped_policy_and_value_losses_match_reference(norm_adv):
    rng = np.random.default_rng(3)
    n, clip = 64, 0.2
    old_lp = rng.normal(-2, 0.5, n)
    new_lp = old_lp + rng.normal(0, 0.3, n)  # many ratios outside [0.8, 1.2]
    adv, old_v, ret = rng.normal(size=n), rng.normal(size=n), rng.normal(size=n)
    new_v = old_v + rng.normal(0, 0.4, n)  # many value changes beyond the clip
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    expected_pg, expected_v = reference_ppo_losses(new_lp, old_lp, adv, new_v, old_v, ret, clip, norm_adv)
    for module in (ppo, mdpo):
        pg, vl, approx_kl, clipfrac = clipped_losses(module, t(new_lp), t(old_lp), t(adv), t(new_v), t(old_v), t(ret), clip,
                                                     norm_adv)
        assert pg.item() == pytest.approx(expected_pg, rel=1e-10, abs=1e-12)
        assert vl.item() == pytest.approx(expected_v, rel=1e-10, abs=1e-12)
        ratio = np.exp(new_lp - old_lp)
        assert clipfrac.item() == pytest.approx(np.mean(np.abs(ratio - 1) > clip))
        assert approx_kl.item() == pytest.approx(np.mean(ratio - 1 - (new_lp - old_lp)), rel=1e-10)


def test_l2_penalty_is_tf_l2_loss_of_the_weights_only():
    # By hand: weights 3 and 4, bias 5; tf.nn.l2_loss(w) = sum(w**2) / 2 = (9 + 16) / 2 = 12.5, biases excluded.
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0]]))
        layer.bias.fill_(5.0)
    for module in (ppo, mdpo, drac):
        assert module.l2_penalty(layer).item() == 12.5
        agent = module.Agent()
        expected = sum(float((p.detach().double() ** 2).sum()) / 2 for name, p in agent.named_parameters()
                       if name.endswith("weight"))
        assert module.l2_penalty(agent).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Mutual KL
# ---------------------------------------------------------------------------------------------


def test_mutual_kl_matches_float64_formula():
    rng = np.random.default_rng(4)
    peer, own = rng.normal(0, 3, (50, 15)), rng.normal(0, 3, (50, 15))
    expected = 0.0
    for p_logits, q_logits in zip(peer, own):
        p = np.exp(p_logits - p_logits.max()); p /= p.sum()
        q = np.exp(q_logits - q_logits.max()); q /= q.sum()
        expected += float(np.sum(p * np.log(p / q))) / len(peer)
    got = mdpo.mutual_kl(torch.tensor(peer), torch.tensor(own))
    assert got.item() == pytest.approx(expected, rel=1e-10)
    assert mdpo.mutual_kl(torch.tensor(own), torch.tensor(own)).item() == pytest.approx(0.0, abs=1e-12)


def test_mutual_kl_is_finite_for_extreme_logits():
    peer = torch.tensor([[80.0] + [-80.0] * 14])
    own = torch.tensor([[-80.0] * 14 + [80.0]])
    kl = mdpo.mutual_kl(peer, own)
    assert torch.isfinite(kl) and kl.item() == pytest.approx(160.0, rel=1e-5)


def agent_grads(agent):
    return [p.grad for p in agent.parameters()]


@pytest.mark.parametrize("alpha, detach_peer, crosses", [(1.0, False, True), (1.0, True, False), (0.0, False, False)])
def test_which_gradients_cross_between_agents(alpha, detach_peer, crosses):
    torch.manual_seed(0)
    agents = [mdpo.Agent(), mdpo.Agent()]
    args = mdpo.validate_args(mdpo.Args(alpha=alpha, detach_peer=detach_peer, num_envs=4, num_steps=8,
                                        num_minibatches=1, total_timesteps=32))
    batches = [random_batch(1, 32), random_batch(2, 32)]
    losses, _ = mdpo.minibatch_loss(agents, batches, torch.arange(32), args)
    losses[0].backward()  # agent 1's loss only
    assert all(g is not None and g.abs().sum() > 0 for g in agent_grads(agents[0])[-4:])
    peer_grads = [g for g in agent_grads(agents[1]) if g is not None and g.abs().sum() > 0]
    if crosses:
        assert len(peer_grads) == len(list(agents[1].parameters())) - 2  # all but the value head
    else:  # not even zeros: with alpha = 0 the KL is left out, so a NaN in one agent cannot reach the other
        assert all(g is None for g in agent_grads(agents[1]))


@pytest.mark.parametrize("module", [ppo, drac, mdpo])
def test_explained_variance_is_one_minus_residual_variance_over_return_variance(module):
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])  # variance 5/3 (ddof=1)
    assert module.explained_variance(returns, returns) == pytest.approx(1.0)
    assert module.explained_variance(torch.zeros(4), returns) == pytest.approx(0.0)
    assert module.explained_variance(0.5 * returns, returns) == pytest.approx(0.75)  # 1 - (5/12) / (5/3)
    assert math.isnan(module.explained_variance(torch.ones(4), torch.ones(4)))


@pytest.mark.parametrize("num_agents", [2, 3])  # with 3, a sum over the peers instead of their mean doubles the term
def test_mdpo_loss_is_ppo_loss_plus_alpha_kl(num_agents):
    torch.manual_seed(0)
    agents = [mdpo.Agent() for _ in range(num_agents)]
    for agent in agents:  # fresh heads are near uniform; make the policies differ visibly
        agent.actor.weight.data *= 200
    batches = [random_batch(seed, 32) for seed in range(1, num_agents + 1)]
    make = lambda alpha: mdpo.validate_args(mdpo.Args(alpha=alpha, num_agents=num_agents, num_envs=4,  # noqa: E731
                                                      num_steps=8, num_minibatches=1, total_timesteps=32))
    inds = torch.arange(32)
    with torch.no_grad():
        plain, _ = mdpo.minibatch_loss(agents, batches, inds, make(0.0))
        mixed, stats = mdpo.minibatch_loss(agents, batches, inds, make(0.5))
        for i in range(num_agents):
            own = agents[i](batches[i]["obs"])[0].double()
            kls = []
            for j in range(num_agents):
                if j != i:  # peer j's policy on agent i's states
                    peer = agents[j](batches[i]["obs"])[0].double()
                    kls.append((peer.softmax(-1) * (peer.log_softmax(-1) - own.log_softmax(-1))).sum(-1).mean().item())
            kl = sum(kls) / len(kls)
            assert stats[i]["mutual_kl"].item() == pytest.approx(kl, rel=1e-4)
            assert mixed[i].item() == pytest.approx(plain[i].item() + 0.5 * kl, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_training_rewards_are_clipped_to_plus_minus_ten(module):
    """The outermost training wrapper clips the normalised rewards of the whole vector at once."""
    envs = module.make_envs(tiny_args(module), seed=0)
    clipped = envs.rewards(np.array([-50.0, 0.5, 50.0]))
    envs.close()
    np.testing.assert_array_equal(clipped, [-10.0, 0.5, 10.0])


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_advantage_normalisation_needs_two_samples_per_minibatch(module):
    # The std of one sample is NaN: the policy loss of a one-sample minibatch would be NaN, silently.
    one, zero = torch.ones(1), torch.zeros(1)  # zero: the log-probability of a certain action
    with pytest.warns(UserWarning, match="degrees of freedom"):
        policy_loss = clipped_losses(module, zero, zero, one, one, one, one, 0.2, norm_adv=True)[0]
    assert torch.isnan(policy_loss)
    with pytest.raises(module.UsageError, match="at least 2 samples"):
        module.validate_args(module.Args(num_envs=1, num_steps=8, num_minibatches=8, total_timesteps=8))
    args = module.validate_args(module.Args(num_envs=1, num_steps=8, num_minibatches=8, total_timesteps=8, norm_adv=False))
    assert args.minibatch_size == 1


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_modes_that_some_games_lack_are_refused_for_those_games(module):
    for mode, games in module.MODE_GAMES.items():
        for game in module.PROCGEN_GAMES:
            args = module.Args(env_id=game, distribution_mode=mode)
            if game in games:
                module.validate_args(args)
            else:
                with pytest.raises(module.UsageError, match=f"{game} has no {mode} mode"):
                    module.validate_args(args)
    with pytest.raises(module.UsageError, match="unknown distribution mode 'exploration'"):
        module.validate_args(module.Args(env_id="coinrun", distribution_mode="exploration"))


STEP_ENVS = """
import sys, numpy as np, ppo
for game in sys.argv[2:]:
    ppo.ProcgenVecEnv(game, 2, 10, 0, sys.argv[1], seed=0).step(np.zeros(2, dtype=np.int64))
"""


@pytest.mark.parametrize("mode", sorted(ppo.MODE_GAMES))
def test_mode_table_matches_procgen(mode):
    """The games listed for a mode step in it; a game not listed makes Procgen abort, hence the refusal.

    In subprocesses, because Procgen's abort would take pytest down with it.
    """
    def step(*games):
        return subprocess.run([sys.executable, "-c", STEP_ENVS, mode, *games], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)

    listed = step(*ppo.MODE_GAMES[mode])
    assert listed.returncode == 0, listed.stdout + listed.stderr
    unlisted = step(next(game for game in ppo.PROCGEN_GAMES if game not in ppo.MODE_GAMES[mode]))
    assert unlisted.returncode != 0 and "assert" in (unlisted.stdout + unlisted.stderr).lower()
