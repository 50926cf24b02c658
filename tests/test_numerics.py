"""The fast path (channels-last, one forward over both agents' minibatches) computes what a plain
implementation computes: same losses and gradients on the same batch, in float32."""

import copy

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

import evaluation
import mdpo
import ppo
import run_utils
from helpers import needs_cuda, random_batch, tiny_args


def plain_forward(agent, obs):
    """Contiguous NCHW frames, one network call per batch: the textbook implementation."""
    hidden = agent.network(obs.permute(0, 3, 1, 2).contiguous().float() / 255.0)
    return agent.actor(hidden), agent.critic(hidden).squeeze(-1)


def plain_ppo_loss(logits, value, batch, inds, args):
    dist = Categorical(logits=logits)
    ratio = (dist.log_prob(batch["actions"][inds]) - batch["logprobs"][inds]).exp()
    adv = batch["advantages"][inds]
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    pg = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)).mean()
    old_v, ret = batch["values"][inds], batch["returns"][inds]
    v_clip = old_v + torch.clamp(value - old_v, -args.clip_coef, args.clip_coef)
    v_loss = 0.5 * torch.max((value - ret) ** 2, (v_clip - ret) ** 2).mean()
    return pg - args.ent_coef * dist.entropy().mean() + args.vf_coef * v_loss


def plain_l2(plain, args):
    """Cobbe et al.'s L2: l2_weight * sum over weight tensors of tf.nn.l2_loss(w) = sum(w**2) / 2."""
    return args.l2_coef * sum((p ** 2).sum() / 2 for n, p in plain.named_parameters() if n.endswith("weight"))


def plain_copy(agent):
    plain = copy.deepcopy(agent)
    for p in plain.parameters():
        p.data = p.data.contiguous()
    return plain


def assert_same_gradients(fast, plain):
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_ppo_fast_path_matches_plain_path():
    torch.manual_seed(0)
    args = tiny_args(ppo, l2_coef=1e-3)
    fast = ppo.make_agent(args, torch.device("cpu"))
    fast.actor.weight.data *= 100  # a non-uniform policy, so that every term matters
    plain = plain_copy(fast)
    batch, inds = random_batch(0), torch.randperm(64)[:32]
    loss, _ = ppo.minibatch_loss(fast, batch, inds, args)
    loss.backward()
    logits, value = plain_forward(plain, batch["obs"][inds])
    expected = plain_ppo_loss(logits, value, batch, inds, args)
    expected = expected + plain_l2(plain, args)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert_same_gradients(fast, plain)


@pytest.mark.parametrize("detach_peer", [False, True])
def test_mdpo_fast_path_matches_plain_path(detach_peer):
    torch.manual_seed(0)
    args = tiny_args(mdpo, alpha=0.7, detach_peer=detach_peer, l2_coef=1e-3)
    fast = [mdpo.make_agent(args, torch.device("cpu")) for _ in range(2)]
    for agent in fast:
        agent.actor.weight.data *= 100
    plain = [plain_copy(agent) for agent in fast]
    batches, inds = [random_batch(1), random_batch(2)], torch.randperm(64)[:32]

    losses, _ = mdpo.minibatch_loss(fast, batches, inds, args)
    ((losses[0] + losses[1]) / 2).backward()

    expected = []
    for i in range(2):  # separate calls: agent i on its states, then the peer on agent i's states
        obs = batches[i]["obs"][inds]
        logits, value = plain_forward(plain[i], obs)
        peer_logits, _ = plain_forward(plain[1 - i], obs)
        if detach_peer:
            peer_logits = peer_logits.detach()
        kl = kl_divergence(Categorical(logits=peer_logits), Categorical(logits=logits)).mean()
        expected.append(plain_ppo_loss(logits, value, batches[i], inds, args) + plain_l2(plain[i], args) + args.alpha * kl)
    ((expected[0] + expected[1]) / 2).backward()
    for got, want in zip(losses, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for f, p in zip(fast, plain):
        assert_same_gradients(f, p)


def test_rollout_inference_matches_plain_forward():
    torch.manual_seed(0)
    fast = ppo.make_agent(tiny_args(ppo), torch.device("cpu"))
    plain = plain_copy(fast)
    obs = random_batch(3)["obs"]
    with torch.inference_mode():
        logits, value = fast(obs)
    want_logits, want_value = plain_forward(plain, obs)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value, want_value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_gumbel_max_sampling_follows_the_softmax(module):
    """sample_action draws from Categorical(logits): frequencies within 5 standard errors."""
    torch.manual_seed(0)
    logits = torch.randn(3, 15) * 2
    draws = 100_000
    actions = module.sample_action(logits.repeat_interleave(draws, 0)).view(3, draws)
    counts = torch.stack([torch.bincount(row, minlength=15) for row in actions]).double()
    probs = torch.softmax(logits.double(), -1)
    standard_error = (probs * (1 - probs) / draws).sqrt()
    assert ((counts / draws - probs).abs() <= 5 * standard_error + 1e-9).all()


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_policy_step_log_probability_and_value(module):
    """policy_step's log-probabilities and values match Categorical on the plain NCHW network."""
    torch.manual_seed(1)
    agent = module.make_agent(tiny_args(module), torch.device("cpu"))
    agent.actor.weight.data *= 100
    obs = random_batch(1)["obs"][:16]
    with torch.inference_mode():
        action, logprob, value = module.policy_step(agent, obs, bf16=False)
        logits, expected_value = plain_forward(plain_copy(agent), obs)
    torch.testing.assert_close(logprob, Categorical(logits=logits).log_prob(action), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("bf16, compiled, dropout", [(False, False, 0.0), (True, False, 0.0), (False, True, 0.0),
                                                     (True, False, 0.1), (False, True, 0.1)])
def test_graphed_policy_matches_eager_policy_and_follows_weight_updates(bf16, compiled, dropout, monkeypatch):
    # cuDNN's TF32 convolutions (PyTorch's default on an H100) round to ~1e-3, and torch.compile may pick
    # another algorithm than eager: compiled with dropout differed by 1e-3 there. Exact float32 on both sides
    # keeps the 1e-4 tolerance, which a stale weight or dropout mask in the graph exceeds by far.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(2)
    device = torch.device("cuda")
    args = tiny_args(ppo, bf16=bf16, compile=compiled, dropout=dropout)
    agent = ppo.make_agent(args, device)
    policy = ppo.make_policy(torch.compile(agent) if compiled else agent, args, device)
    assert isinstance(policy, run_utils.CudaGraphed)
    before_update = None
    for _ in range(2):  # the second round after an in-place weight change, as an optimiser step makes
        obs = torch.randint(0, 256, (args.num_envs, 64, 64, 3), dtype=torch.uint8, device=device)
        action, logprob, value = (t.clone() for t in policy(obs))
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            logits, expected_value = agent(obs)
            if before_update is not None:  # what a graph that missed the update would give
                stale_value = before_update(obs)[1]
        torch.testing.assert_close(value, expected_value, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logprob, torch.log_softmax(logits, -1).gather(-1, action[:, None]).squeeze(-1),
                                   rtol=1e-4, atol=1e-4)
        if before_update is not None:  # the tolerance tells the two apart
            assert (value - stale_value).abs().max() > 1e-2
        before_update = copy.deepcopy(agent)
        with torch.no_grad():
            for p in agent.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        agent.redraw_dropout_masks()  # in place, as after an update: the graph must see the new masks


@needs_cuda
def test_graphed_evaluation_network_gives_the_running_envs_logits():
    torch.manual_seed(3)
    device = torch.device("cuda")
    agent = ppo.make_agent(tiny_args(ppo), device).eval()
    frames = [torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8).numpy() for _ in range(2)]
    logits_of = evaluation.eval_network(agent, frames[0], bf16=False, device=device)
    running = np.array([1, 4, 5])
    with torch.inference_mode():
        expected = agent(torch.as_tensor(frames[1][running], device=device))[0]
        torch.testing.assert_close(logits_of(frames[1], running), expected, rtol=1e-4, atol=1e-4)
