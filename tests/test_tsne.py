"""tsne.py on tiny checkpoints and on an encoder whose features and policies are known by hand."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import ppo
import tsne
from test_agreement import cka_by_quadruples
from helpers import ROOT


def write_checkpoint(path, script, game="bigfish", uniform_policy=False, num_agents=2, mode="hard"):
    """A checkpoint as the scripts write it; agent k of an MDPO one (1-based) has actor bias k, so a test
    can tell which agent was loaded."""
    torch.manual_seed(len(str(path)))
    agents = [ppo.Agent() for _ in range(1 if script == "ppo" else num_agents)]
    for k, agent in enumerate(agents, start=1):
        torch.nn.init.constant_(agent.actor.bias, float(k))
        if uniform_policy:
            torch.nn.init.zeros_(agent.actor.weight)
    states = [agent.state_dict() for agent in agents]
    args = {"env_id": game, "exp_name": script, "seed": 1, "dropout": 0.0, "distribution_mode": mode}
    if script == "mdpo":
        args["num_agents"] = num_agents
    checkpoint = {"script": script, "args": args}
    checkpoint["agents"] = [{"agent": state} for state in states]
    os.makedirs(path)
    torch.save(checkpoint, os.path.join(path, "checkpoint.pt"))
    return str(path)


class KnownEncoder(torch.nn.Module):
    """Features = the first two channels of pixel (0, 0) plus `offset`; logits = (f1, f2, 0)."""

    def __init__(self, offset=0.0):
        super().__init__()
        self.offset = offset

    def hidden(self, frames):
        return frames[:, 0, 0, :2].float() + self.offset

    def actor(self, hidden):
        return torch.cat([hidden - self.offset, torch.zeros(len(hidden), 1)], 1)


def frames_with_first_pixels(pairs, dtype=torch.uint8):
    frames = torch.zeros(len(pairs), 64, 64, 3, dtype=dtype)
    frames[:, 0, 0, :2] = torch.tensor(pairs, dtype=dtype)
    return frames


def softmax(logits):
    exps = [math.exp(x) for x in logits]
    return [e / sum(exps) for e in exps]


def test_robustness_numbers_match_a_hand_computation():
    # Clean features (0,0) (2,0) (0,2) (2,2): centroid (1,1), every one sqrt(2) from it.
    # Copies of clean frame 1 at (1,0) and (3,0): centroid (2,0), each 1 away: spread 1/sqrt(2).
    clean = frames_with_first_pixels([[0, 0], [2, 0], [0, 2], [2, 2]])
    copies = frames_with_first_pixels([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float32)
    for offset in (0.0, 50.0):  # a constant added to every feature changes no number
        result = tsne.robustness(KnownEncoder(offset), clean, [copies, copies])
        assert result["spread"] == pytest.approx([1 / math.sqrt(2)] * 2, rel=1e-6)
        # what t-SNE embeds: the copies' features in units of the clean frames' spread (sqrt 2)
        np.testing.assert_allclose(result["features"][0], (np.array([[1.0, 0.0], [3.0, 0.0]]) + offset) / math.sqrt(2),
                                   rtol=1e-6)
        # TV of each copy's policy from clean frame 1's (logits 2, 0, 0); the second entry from frame 0's.
        for index, reference in ((0, [0, 0, 0]), (1, [2, 0, 0])):
            p0 = softmax(reference)
            tv = np.mean([0.5 * sum(abs(a - b) for a, b in zip(softmax(logits), p0)) for logits in ([1, 0, 0], [3, 0, 0])])
            assert result["tv_distance"][index] == pytest.approx(tv, rel=1e-6)
        entropy = np.mean([-sum(p * math.log(p) for p in softmax([a, b, 0])) for a, b in ([0, 0], [2, 0], [0, 2], [2, 2])])
        assert result["entropy"] == pytest.approx(entropy, rel=1e-6)


def test_robustness_numbers_of_a_real_encoder_match_a_float64_rederivation():
    torch.manual_seed(0)
    agent = ppo.Agent().eval()
    clean = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8)
    perturbed = torch.rand(9, 64, 64, 3) * 400 - 100  # raw random-conv output: floats outside [0, 255]
    result = tsne.robustness(agent, clean, [perturbed])
    with torch.no_grad():
        h_clean = agent.hidden(clean).double().numpy()
        h = agent.hidden(perturbed).double().numpy()
        logits_clean = agent.actor(agent.hidden(clean)).double().numpy()
        logits = agent.actor(agent.hidden(perturbed)).double().numpy()
    p_clean = np.exp(logits_clean) / np.exp(logits_clean).sum(1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    clean_spread = np.linalg.norm(h_clean - h_clean.mean(0), axis=1).mean()
    assert result["spread"][0] == pytest.approx(np.linalg.norm(h - h.mean(0), axis=1).mean() / clean_spread, rel=1e-4)
    assert result["tv_distance"][0] == pytest.approx(0.5 * np.abs(p - p_clean[0]).sum(1).mean(), rel=1e-4, abs=1e-7)
    assert result["entropy"] == pytest.approx(-(p_clean * np.log(p_clean)).sum(1).mean(), rel=1e-5)


def test_mean_and_sample_std_over_frames():
    assert tsne.mean_std([1.0, 2.0, 4.0]) == pytest.approx([7 / 3, math.sqrt(7 / 3)])  # ddof=1 by hand
    assert math.isnan(tsne.mean_std([1.0])[1])


def test_a_single_frame_prints_its_mean_without_a_nan_std():
    assert tsne.plus_minus(tsne.mean_std([1.0, 2.0, 4.0])) == "2.3333 ± 1.5275"
    assert tsne.plus_minus(tsne.mean_std([0.5])) == "0.5000"


def test_a_summary_of_one_frame_and_one_seed_prints_no_nan(capsys):
    one = tsne.mean_std([0.5])
    tsne.print_summary({"game": "bigfish", "seeds": [0], "frames_per_seed": 1, "copies": 3,
                        "encoders": [{"label": "PPO", "spread": one, "tv_distance": one, "entropy": one}],
                        "debiased_cka": [{"a": "PPO", "b": "MDPO", "cka": one}]})
    printed = capsys.readouterr().out
    assert "nan" not in printed and "| PPO | 0.5000 | 0.5000 | 0.5000 |" in printed


def test_random_conv_copies_are_raw_floats_distinct_and_reproducible():
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    copies = tsne.random_conv_copies(frame, 5, seed=3)
    assert copies.shape == (5, 64, 64, 3) and copies.dtype == torch.float32
    assert not torch.equal(copies[0], copies[1])
    assert torch.equal(copies, tsne.random_conv_copies(frame, 5, seed=3))
    assert not torch.equal(copies, tsne.random_conv_copies(frame, 5, seed=4))
    # Not clipped to the pixel range nor rounded: Lee et al. feed the filter's output as it is.
    assert copies.min() < 0 and copies.max() > 255
    assert not torch.equal(copies, copies.round())


def test_mdpo_agent_picks_the_agent_asked_for_from_k_agents(tmp_path):
    path = write_checkpoint(tmp_path / "mdpo_k3", "mdpo", num_agents=3)
    saved = torch.load(os.path.join(path, "checkpoint.pt"), weights_only=False)["agents"]
    for number in (1, 2, 3):
        agent, config, picked = tsne.load_encoder(path, number)
        assert picked == number and config["args"]["num_agents"] == 3
        assert torch.equal(agent.actor.bias, saved[number - 1]["agent"]["actor.bias"])
        assert torch.equal(agent.actor.bias, torch.full((15,), float(number)))
        assert not agent.training
    with pytest.raises(tsne.UsageError, match=r"--mdpo-agent 4: .* has agents 1 to 3"):
        tsne.load_encoder(path, 4)


def test_tsne_numbers_and_figure_from_ppo_and_k_agent_mdpo_checkpoints(tmp_path):
    ppo_dir = write_checkpoint(tmp_path / "ppo_run", "ppo")
    mdpo_dir = write_checkpoint(tmp_path / "mdpo_run", "mdpo", uniform_policy=True, num_agents=3)
    summary = tsne.main(tsne.TsneArgs(checkpoints=[ppo_dir, mdpo_dir, mdpo_dir], mdpo_agent=[1, 3, 3], copies=6,
                                      clean_frames=4, frames=2, seeds=[0, 1], warmup_steps=3,
                                      out=str(tmp_path / "fig"), label="tiny"))
    assert [e["label"] for e in summary["encoders"]] == ["PPO"] + ["MDPO (num_agents=3) agent 3"] * 2
    ppo_entry, mdpo_entry, _ = summary["encoders"]
    assert mdpo_entry["tv_distance"] == pytest.approx([0.0, 0.0], abs=1e-6)  # a uniform policy cannot move ...
    assert mdpo_entry["entropy"][0] == pytest.approx(math.log(15), rel=1e-6)  # ... and its entropy says why
    assert ppo_entry["spread"][0] > 0 and ppo_entry["spread"][1] > 0  # a std over 2 seeds x 2 frames
    assert ppo_entry["entropy"][0] < math.log(15)
    same = [pair for pair in summary["debiased_cka"] if pair["a"] == pair["b"]]
    assert len(summary["debiased_cka"]) == 3 and same[0]["cka"][0] == pytest.approx(1.0, rel=1e-9)
    assert (tmp_path / "fig" / "tsne_bigfish.png").stat().st_size > 0
    assert json.load(open(tmp_path / "fig" / "tsne_bigfish.json")) == json.loads(json.dumps(summary))


def test_debiased_cka_of_two_encoders_matches_a_float64_computation_on_their_features(tmp_path, monkeypatch):
    frames = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(tsne, "test_frames", lambda *args: frames)
    # write_checkpoint seeds the weights with the path's length: "a" and "bb" give two different encoders
    a, b = write_checkpoint(tmp_path / "a", "ppo"), write_checkpoint(tmp_path / "bb", "ppo")
    summary = tsne.main(tsne.TsneArgs(checkpoints=[a, b], copies=3, clean_frames=8, frames=1, seeds=[0],
                                      figure=False, out=str(tmp_path / "fig")))
    with torch.no_grad():
        x, y = (tsne.load_encoder(path, 1)[0].hidden(frames).double().numpy() for path in (a, b))
    expected = cka_by_quadruples(x, y)
    [pair] = summary["debiased_cka"]
    assert pair["cka"][0] == pytest.approx(expected, rel=1e-6) and expected < 0.999


def test_tsne_refuses_checkpoints_of_different_games(tmp_path):
    a = write_checkpoint(tmp_path / "a", "ppo", game="bigfish")
    b = write_checkpoint(tmp_path / "b", "ppo", game="coinrun")
    with pytest.raises(tsne.UsageError, match="different games"):
        tsne.main(tsne.TsneArgs(checkpoints=[a, b], figure=False, out=str(tmp_path / "fig")))


def test_tsne_takes_its_frames_from_the_distribution_the_runs_trained_on(tmp_path, monkeypatch):
    modes = []

    def recording_test_frames(env_class, game, mode, *rest):
        modes.append(mode)
        return real_test_frames(env_class, game, mode, *rest)

    real_test_frames = tsne.test_frames
    monkeypatch.setattr(tsne, "test_frames", recording_test_frames)
    a = write_checkpoint(tmp_path / "a", "ppo", mode="easy")
    summary = tsne.main(tsne.TsneArgs(checkpoints=[a], copies=3, clean_frames=2, frames=1, seeds=[0],
                                      warmup_steps=0, figure=False, out=str(tmp_path / "fig")))
    assert modes == ["easy"] and summary["distribution_mode"] == "easy"
    b = write_checkpoint(tmp_path / "b", "ppo", mode="hard")
    with pytest.raises(tsne.UsageError, match="different distribution modes: easy, hard"):
        tsne.main(tsne.TsneArgs(checkpoints=[a, b], figure=False, out=str(tmp_path / "fig")))


@pytest.mark.parametrize("settings, message", [
    ({"mdpo_agent": [0]}, "--mdpo-agent counts from 1, got 0"),  # would silently pick the last agent
    ({"mdpo_agent": [1, 2]}, "one --mdpo-agent for all checkpoints or one per checkpoint"),
    ({"copies": 2}, "--copies must be at least 3"),
    ({"clean_frames": 1}, "--clean-frames must be at least 2"),
    ({"frames": 0}, r"--frames must lie in \[1, --clean-frames\]"),
    ({"frames": 5, "clean_frames": 4}, r"--frames must lie in \[1, --clean-frames\], got 5"),
    ({"seeds": [1, 1]}, "--seeds must name at least one seed, each once"),
    ({"seeds": []}, "--seeds must name at least one seed"),
    ({"warmup_steps": -1}, "--warmup-steps not negative"),
    ({"labels": ["a", "b"]}, "one --labels entry per checkpoint"),
])
def test_tsne_refuses_bad_settings(tmp_path, settings, message):
    run_dir = write_checkpoint(tmp_path / "run", "mdpo")
    with pytest.raises(tsne.UsageError, match=message):
        tsne.main(tsne.TsneArgs(checkpoints=[run_dir], figure=False, out=str(tmp_path / "fig"), **settings))


@pytest.mark.parametrize("settings, message", [
    ({"checkpoints": []}, "give the run directories (or checkpoints) to compare"),
    ({"seeds": [0, -1]}, "--seeds must lie in [0, 2147483647], got -1"),
    ({"seeds": [2**31]}, "--seeds must lie in [0, 2147483647], got 2147483648"),
])
def test_tsne_refuses_nothing_to_compare_and_seeds_procgen_cannot_take(settings, message):
    args = tsne.TsneArgs(**{"checkpoints": ["unused"], **settings})
    with pytest.raises(tsne.UsageError, match="^" + re.escape(message)):
        tsne.check(args)
    tsne.check(tsne.TsneArgs(checkpoints=["unused"], seeds=[0, 2**31 - 1]))  # Procgen's largest seed is fine


def test_one_encoder_given_twice_is_measured_and_named_as_such(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tsne, "test_frames", lambda *args: torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8))
    a, k3 = write_checkpoint(tmp_path / "a", "ppo"), write_checkpoint(tmp_path / "k3", "mdpo", num_agents=3)
    a_file = os.path.join(a, "checkpoint.pt")
    summary = tsne.main(tsne.TsneArgs(checkpoints=[a, a_file, k3, k3, k3], mdpo_agent=[1, 1, 1, 2, 1], copies=3,
                                      clean_frames=4, frames=1, seeds=[0], figure=False, out=str(tmp_path / "fig")))
    assert len(summary["encoders"]) == 5  # each measured, as asked
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {a} and {a_file} are one encoder twice: their CKA is 1 by construction",
                     f"note: {k3} and {k3} (agent 1) are one encoder twice: their CKA is 1 by construction"]


def test_tsne_says_bad_input_in_one_line_with_exit_code_2(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_text("not a checkpoint")
    result = subprocess.run([sys.executable, "tsne.py", str(path), "--no-figure", "--out", str(tmp_path / "fig")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path} is not a readable checkpoint of ppo.py, drac.py or mdpo.py (UnpicklingError)"


def test_tsne_accepts_as_many_perturbed_frames_as_clean_ones():
    tsne.check(tsne.TsneArgs(checkpoints=["unused"], frames=4, clean_frames=4, copies=3, warmup_steps=0))


def test_each_frame_gets_its_own_frame_and_its_own_filters(tmp_path, monkeypatch):
    frames = torch.arange(3).view(3, 1, 1, 1).expand(3, 64, 64, 3).to(torch.uint8).clone()  # frame i is all i
    frame_seeds = []
    monkeypatch.setattr(tsne, "test_frames", lambda *args: frame_seeds.append(args[-1]) or frames)
    calls, real = [], tsne.random_conv_copies

    def recording(frame, copies, seed):
        calls.append((int(frame[0, 0, 0]), seed))
        return real(frame, copies, seed)

    monkeypatch.setattr(tsne, "random_conv_copies", recording)
    run = write_checkpoint(tmp_path / "a", "ppo")
    tsne.main(tsne.TsneArgs(checkpoints=[run], copies=3, clean_frames=3, frames=3, seeds=[0, 1], figure=False,
                            out=str(tmp_path / "fig")))
    assert frame_seeds == [0, 1]  # each seed its own levels' frames
    assert [frame for frame, _ in calls] == [0, 1, 2, 0, 1, 2]
    assert len({seed for _, seed in calls}) == 6  # no two frames share filters, within or across seeds


def test_the_figure_shows_the_numbers_of_the_first_seeds_first_frame(tmp_path, monkeypatch):
    frames = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(tsne, "test_frames", lambda *args: frames)
    measured, drawn = [], []
    real = tsne.robustness
    monkeypatch.setattr(tsne, "robustness", lambda *args: measured.append(real(*args)) or measured[-1])
    monkeypatch.setattr(tsne, "draw", lambda frame, perturbed, results, *rest: drawn.append(results))
    run = write_checkpoint(tmp_path / "a", "ppo")
    tsne.main(tsne.TsneArgs(checkpoints=[run], copies=3, clean_frames=4, frames=3, seeds=[0, 1],
                            out=str(tmp_path / "fig")))
    [[shown]] = drawn
    first = measured[0]
    assert shown["spread"] == first["spread"][0] and shown["tv_distance"] == first["tv_distance"][0]
    np.testing.assert_array_equal(shown["features"], first["features"][0])


def test_two_encoders_of_one_method_get_two_colours():
    colours = tsne.colours_of(["MDPO agent 1", "MDPO agent 2", "PPO"], ["MDPO", "MDPO", "PPO"])
    assert len(set(colours)) == 3
    assert colours[0] == tsne.METHOD_COLOURS["MDPO"] and colours[2] == tsne.METHOD_COLOURS["PPO"]
