"""DrAC in drac.py: the augmentations, the regularisers G_pi and G_V, UCB-DrAC's bandit, the flags, a tiny run."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import drac
import ppo
import robustness
from helpers import ROOT, random_batch, tiny_args
from test_numerics import plain_copy, plain_forward, plain_ppo_loss


def frames(n=32, seed=0):
    return torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", list(drac.AUGMENTATIONS))
def test_augmentations_keep_shape_and_dtype(name):
    x = frames()
    out = drac.AUGMENTATIONS[name](x, seeded(0))
    assert out.shape == x.shape
    # Random convolution's raw output is float (Lee et al. feed it unclamped); the others stay uint8.
    assert out.dtype == (torch.float32 if name == "random-conv" else torch.uint8)


@pytest.mark.parametrize("name", list(drac.AUGMENTATIONS))
def test_augmentations_are_deterministic_for_a_seed_and_differ_across_seeds(name):
    x = frames()
    fn = drac.AUGMENTATIONS[name]
    assert torch.equal(fn(x, seeded(1)), fn(x, seeded(1)))
    if name == "grayscale":  # nothing random to draw
        assert torch.equal(fn(x, seeded(1)), fn(x, seeded(2)))
    else:
        assert not torch.equal(fn(x, seeded(1)), fn(x, seeded(2)))


def test_crop_is_a_window_of_the_edge_padded_frame():
    x = frames(6)
    out = drac.crop(x, seeded(3)).numpy()
    offsets = set()
    for frame, got in zip(x.numpy(), out):
        padded = np.pad(frame, ((12, 12), (12, 12), (0, 0)), mode="edge")
        found = [(i, j) for i in range(25) for j in range(25) if np.array_equal(padded[i:i + 64, j:j + 64], got)]
        assert found, "not a 64x64 window of the replicate-padded frame"
        offsets.update(found)
    assert len(offsets) > 1


def test_flip_turns_frames_upside_down_and_rotate_by_quarter_turns():
    x = frames(64)
    flipped, rotated = drac.flip(x, seeded(4)).numpy(), drac.rotate(x, seeded(4)).numpy()
    flips, turns = [], []
    for frame, f, r in zip(x.numpy(), flipped, rotated):
        flips.append(next(k for k, ref in enumerate([frame, frame[::-1]]) if np.array_equal(ref, f)))
        turns.append(next(k for k in range(4) if np.array_equal(np.rot90(frame, k, axes=(0, 1)), r)))
    assert set(flips) == {0, 1} and set(turns) == {0, 1, 2, 3}


@pytest.mark.parametrize("name", ["cutout", "cutout-color"])
def test_cutout_fills_one_box_where_drac_puts_it(name):
    x = frames(32) | 1  # no black pixel to start with, so a black box shows
    out = drac.AUGMENTATIONS[name](x, seeded(5))
    for frame, got in zip(x, out):
        changed = (frame != got).any(-1).numpy()
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        # DrAC: sides h, w in [7, 22), rows [12 + h, 12 + 2h) and columns [24 + w, 24 + 2w), cut at 64.
        assert any(list(rows) == list(range(12 + h, min(64, 12 + 2 * h))) for h in range(7, 22))
        assert any(list(cols) == list(range(24 + w, min(64, 24 + 2 * w))) for w in range(7, 22))
        box = got[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].reshape(-1, 3)
        assert (box == box[0]).all()  # one colour
        if name == "cutout":
            assert (box == 0).all()


def test_grayscale_is_the_luma_in_every_channel():
    x = frames(4)
    luma = (x.double() * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)).sum(-1)
    out = drac.grayscale(x)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    assert (out[..., 0].double() - luma).abs().max() <= 1


def test_convolution_matches_a_float64_loop_on_the_zero_padded_frame():
    x = frames(2)
    weights = drac.random_conv_weights(2, seeded(6))
    out = drac.convolve(x, weights).double().numpy()
    for i in range(2):
        padded = np.pad(x[i].double().numpy(), ((1, 1), (1, 1), (0, 0)))
        w = weights[i].double().numpy()  # (out, in, 3, 3)
        expected = np.zeros((64, 64, 3))
        for dy in range(3):
            for dx in range(3):
                expected += padded[dy:dy + 64, dx:dx + 64] @ w[:, :, dy, dx].T
        np.testing.assert_allclose(out[i], expected, rtol=1e-4, atol=1e-2)
    assert abs(weights.std().item() - math.sqrt(2 / 54)) < 0.03  # Xavier-normal, fan in = fan out = 27


def test_colour_operations_against_hand_computed_pixels():
    red = torch.tensor([200, 0, 0], dtype=torch.uint8).expand(1, 64, 64, 3).clone()
    third = drac.adjust_colour(red, hue=torch.tensor([1 / 3]))  # a third of a turn: red -> green
    assert (third[0, 0, 0] - torch.tensor([0, 200, 0])).abs().max() <= 1
    pixel = torch.tensor([100, 50, 20], dtype=torch.uint8).expand(1, 64, 64, 3).clone()
    brighter = drac.adjust_colour(pixel, brightness=torch.tensor([1.5]))  # HSV value x 1.5: every channel x 1.5
    assert (brighter[0, 0, 0].int() - torch.tensor([150, 75, 30])).abs().max() <= 1
    capped = drac.adjust_colour(pixel, brightness=torch.tensor([4.0]))  # value capped at 255: x 2.55
    assert (capped[0, 0, 0].int() - torch.tensor([255, 128, 51])).abs().max() <= 1
    grey = drac.adjust_colour(pixel, saturation=torch.tensor([0.0]))  # no HSV saturation: max channel
    assert (grey[0, 0, 0].int() - 100).abs().max() <= 1
    flat = drac.adjust_colour(pixel, contrast=torch.tensor([0.0]))  # contrast 0: the mean grey level
    assert (flat[0, 0, 0].int() - round(0.299 * 100 + 0.587 * 50 + 0.114 * 20)).abs().max() <= 1


@pytest.mark.parametrize("name", list(robustness.PERTURBATION_MAX_STRENGTH))
def test_zero_strength_perturbations_are_the_identity(name):
    x = frames(8)
    out = robustness.EpisodePerturbation(name, 0.0, 8, seed=0)(x)
    assert out.shape == x.shape and torch.equal(out.float(), x.float())
    assert not torch.equal(robustness.EpisodePerturbation(name, 0.5, 8, seed=0)(x).float(), x.float())


def test_random_convolution_is_fixed_within_an_episode_and_fresh_across_episodes():
    perturb = robustness.EpisodePerturbation("random_conv", 1.0, 3, seed=0)
    frame = frames(1).expand(3, -1, -1, -1)
    first = perturb(frame)
    assert first.shape == frame.shape and first.dtype == torch.float32
    # The same filter later in the episode (equal up to float summation order: a batch of one convolves apart).
    torch.testing.assert_close(perturb(frame[[1]], [1]), first[[1]], rtol=1e-5, atol=1e-3)
    assert (first[0] - first[1]).abs().max() > 1  # two envs' episodes: two filters
    perturb.start_episodes([1])  # env 1 starts a new episode
    assert (perturb(frame[[1]], [1]) - first[[1]]).abs().max() > 1
    torch.testing.assert_close(perturb(frame[[0]], [0]), first[[0]], rtol=1e-5, atol=1e-3)


def hand_drac_terms(clean_logits, clean_value, aug_logits, aug_value):
    """G_pi = mean_s sum_a p(a|s) log(p(a|s) / q(a|f(s))), G_V = mean_s (V(s) - V(f(s)))^2 / 2, in float64 numpy."""
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    p, q = softmax(clean_logits), softmax(aug_logits)
    return (p * np.log(p / q)).sum(-1).mean(), 0.5 * ((clean_value - aug_value) ** 2).mean()


def test_drac_terms_match_a_hand_computation_and_only_the_augmented_side_learns():
    g = seeded(7)
    clean_logits, aug_logits = (torch.randn(32, 15, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    clean_value, aug_value = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    for t in (clean_logits, aug_logits, clean_value, aug_value):
        t.requires_grad_(True)
    g_pi, g_v = drac.drac_terms(clean_logits, clean_value, aug_logits, aug_value)
    want_pi, want_v = hand_drac_terms(*(t.detach().numpy() for t in (clean_logits, clean_value, aug_logits, aug_value)))
    assert g_pi.item() == pytest.approx(want_pi, rel=1e-10) and g_v.item() == pytest.approx(want_v, rel=1e-10)
    (g_pi + g_v).backward()
    assert clean_logits.grad is None and clean_value.grad is None  # the clean side is the fixed target
    assert aug_logits.grad.abs().sum() > 0 and aug_value.grad.abs().sum() > 0
    same = drac.drac_terms(clean_logits, clean_value, clean_logits, clean_value)
    assert same[0].item() == pytest.approx(0, abs=1e-12) and same[1].item() == 0


def test_without_drac_the_loss_is_plain_ppo_and_draws_no_random_numbers():
    torch.manual_seed(0)
    args = tiny_args(ppo)
    agent = ppo.make_agent(args, torch.device("cpu"))
    agent.actor.weight.data *= 100
    batch, inds = random_batch(0), torch.randperm(64)[:32]
    state = torch.get_rng_state()
    loss, stats = ppo.minibatch_loss(agent, batch, inds, args)
    assert torch.equal(torch.get_rng_state(), state)
    assert "drac_pi" not in stats
    logits, value = plain_forward(plain_copy(agent), batch["obs"][inds])
    torch.testing.assert_close(loss, plain_ppo_loss(logits, value, batch, inds, args), rtol=1e-5, atol=1e-6)


def test_drac_loss_is_ppo_on_clean_frames_plus_coef_times_the_terms_on_augmented_ones():
    torch.manual_seed(0)
    args = tiny_args(drac, augment="flip", drac_coef=0.3)
    agent = drac.make_agent(args, torch.device("cpu"))
    # A policy peaked enough that G_pi is far from float32's rounding of a KL between near-equal rows.
    agent.actor.weight.data *= 3000
    plain = plain_copy(agent)
    batch, inds = random_batch(1), torch.randperm(64)[:32]
    torch.manual_seed(5)
    loss, stats = drac.minibatch_loss(agent, batch, inds, args)
    torch.manual_seed(5)  # the augmentation's seed comes from the global stream
    augmented = drac.flip(batch["obs"][inds], seeded(int(torch.randint(2**62, ()))))
    logits, value = plain_forward(plain, batch["obs"][inds])
    aug_logits, aug_value = plain_forward(plain, augmented)
    g_pi, g_v = hand_drac_terms(*(t.detach().double().numpy() for t in (logits, value, aug_logits, aug_value)))
    expected = plain_ppo_loss(logits, value, batch, inds, args).item() + 0.3 * (g_pi + g_v)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["drac_pi"].item() == pytest.approx(g_pi, rel=1e-3, abs=1e-8)
    assert stats["drac_v"].item() == pytest.approx(g_v, rel=1e-3, abs=1e-8)


@pytest.mark.parametrize("flags, message", [
    (dict(augment="blur", drac_coef=0.1), "unknown augmentation 'blur'; choose one of: crop, random-conv"),
    (dict(augment="none", drac_coef=0.1), "unknown augmentation 'none'"),
    (dict(augment="crop", drac_coef=-0.1), "--drac-coef must be positive"),
    (dict(augment="crop", drac_coef=float("nan")), "--drac-coef must be a finite number"),
    (dict(augment="crop", drac_coef=float("inf")), "--drac-coef must be a finite number"),
    (dict(augment="crop", drac_coef=0.0), "--drac-coef must be positive .*run ppo.py"),
])
def test_bad_drac_flags_are_refused(flags, message):
    with pytest.raises(drac.UsageError, match=message.replace("(", r"\(").replace("?", r"\?")):
        tiny_args(drac, **flags)


def hand_ucb_choice(returns, counts, total, c=0.1):
    scores = [(sum(r) / len(r) if r else 0.0) + c * math.sqrt(math.log(total) / n) for r, n in zip(returns, counts)]
    return scores.index(max(scores))


def test_ucb_bandit_follows_drac_rule_and_resumes_exactly():
    bandit = drac.UCBAugmentation()
    assert bandit.names == ["crop", "random-conv", "grayscale", "flip", "rotate", "cutout", "cutout-color", "color-jitter"]
    returns, counts, total = [[] for _ in range(8)], [1] * 8, 1
    assert bandit.step(torch.tensor([0.0])) == "crop"  # all scores 0 at first: the first augmentation
    chosen, rng = 0, np.random.default_rng(0)
    for i in range(40):
        value = float(rng.normal(chosen * 0.1, 1.0))
        total, counts[chosen] = total + 1, counts[chosen] + 1
        returns[chosen] = (returns[chosen] + [value])[-10:]  # DrAC's window of 10
        chosen = hand_ucb_choice(returns, counts, total)
        assert bandit.step(torch.tensor([value - 1.0, value + 1.0])) == bandit.names[chosen], i
        if i == 20:  # a checkpoint's copy continues as the original does
            copy = drac.UCBAugmentation()
            copy.load_state_dict(bandit.state_dict())
            assert copy.step(torch.tensor([2.0])) == bandit.step(torch.tensor([2.0]))
            total, counts[chosen] = total + 1, counts[chosen] + 1
            returns[chosen] = (returns[chosen] + [2.0])[-10:]
            chosen = hand_ucb_choice(returns, counts, total)
    assert max(len(r) for r in bandit.returns) == 10


def test_tiny_drac_run_from_the_command_line_logs_both_regularisers(tmp_path):
    run_dir = str(tmp_path / "run")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "drac.py"), "--env-id", "bigfish", "--augment", "crop", "--drac-coef", "0.1",
         "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2", "--total-timesteps", "64",
         "--eval-episodes", "1", "--no-cuda", "--run-dir", run_dir], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    accumulator = EventAccumulator(run_dir)
    accumulator.Reload()
    for tag in ("losses/drac_pi", "losses/drac_v"):
        values = [event.value for event in accumulator.Scalars(tag)]
        assert len(values) == 1 and all(math.isfinite(v) and v >= 0 for v in values), tag


def test_tiny_ucb_drac_run_saves_its_bandit(tmp_path):
    run_dir = str(tmp_path / "run")
    drac.main(drac.Args(env_id="starpilot", augment="ucb", drac_coef=0.1, num_envs=4, num_steps=16, num_minibatches=2,
                      total_timesteps=128, eval_interval=100, eval_episodes=1, cuda=False, run_dir=run_dir))
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    # Two updates: crop first (all scores equal), then the bandit's choice after crediting crop once.
    assert checkpoint["ucb"]["counts"] == [2] + [1] * 7 and checkpoint["ucb"]["total"] == 2
    assert len(checkpoint["ucb"]["returns"][0]) == 1
    accumulator = EventAccumulator(run_dir)
    accumulator.Reload()
    assert [e.value for e in accumulator.Scalars("charts/ucb_augmentation")][0] == 0
    assert "losses/drac_pi" in accumulator.Tags()["scalars"]
