"""robustness.py: its measures against hand computations, its bad input, and a run end to end."""

import json
import math
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import evaluation
import ppo
import robustness
import run_data
from helpers import CUDA_MARKS, ROOT


def test_tv_distance_of_a_policy_with_itself_is_zero_and_of_known_distributions_matches_by_hand():
    logits = torch.randn(5, 15, generator=torch.Generator().manual_seed(0)) * 4
    assert robustness.tv_distance(logits, logits).abs().max().item() == 0
    p, q = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.1, 0.3, 0.6]])
    # 1/2 (|0.7 - 0.1| + |0.2 - 0.3| + |0.1 - 0.6|) = 1/2 (0.6 + 0.1 + 0.5) = 0.6
    assert robustness.tv_distance(p.log(), q.log()).item() == pytest.approx(0.6, abs=1e-6)
    disjoint = torch.tensor([[0.0, -1e9], [-1e9, 0.0]])
    assert robustness.tv_distance(disjoint[:1], disjoint[1:]).item() == pytest.approx(1.0)


def test_spread_is_the_mean_distance_to_the_centroid_and_ignores_a_shared_offset():
    points = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0], [1.0, -3.0]])  # centroid (1, 0)
    assert robustness.spread(points).item() == pytest.approx((1 + 1 + 3 + 3) / 4)
    assert robustness.spread(points + 100).item() == pytest.approx(robustness.spread(points).item())


class ShiftedAgent(ppo.Agent):
    """An agent whose features carry a large shared offset: the old spread (divided by the feature norm) shrank with it."""

    def hidden(self, x):
        return super().hidden(x) + 50.0


def test_policy_shift_normalises_by_the_clean_frames_spread():
    torch.manual_seed(0)
    agent, shifted = ppo.Agent().eval(), ShiftedAgent().eval()
    shifted.load_state_dict(agent.state_dict())
    frames = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8)
    perturb = robustness.EpisodePerturbation("random_conv", 1.0, 6 * 3, seed=0)
    plain = robustness.policy_shift(agent, frames, perturb, copies=3)
    perturb = robustness.EpisodePerturbation("random_conv", 1.0, 6 * 3, seed=0)
    with torch.no_grad():
        clean = agent.hidden(frames)
        copies = agent.hidden(perturb(frames.repeat_interleave(3, 0))).view(6, 3, -1)
        by_hand = (copies - copies.mean(1, keepdim=True)).norm(dim=-1).mean() / (clean - clean.mean(0)).norm(dim=-1).mean()
    assert plain["spread"] == pytest.approx(by_hand.item(), rel=1e-4)
    perturb = robustness.EpisodePerturbation("random_conv", 1.0, 6 * 3, seed=0)
    assert robustness.policy_shift(shifted, frames, perturb, copies=3)["spread"] == pytest.approx(plain["spread"], rel=1e-3)
    assert 0 <= plain["tv_mean"] <= plain["tv_max"] <= 1
    still = robustness.policy_shift(agent, frames, robustness.EpisodePerturbation("hue", 0.0, 18, seed=0), copies=3)
    # float noise of batched forwards only: clean and perturbed frames go through different batch shapes,
    # whose kernels differ between CPUs
    assert still["tv_max"] < 1e-6 and still["spread"] < 1e-5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
@pytest.mark.parametrize("name", ["random_conv", "hue"])
def test_evaluation_network_sees_the_perturbed_frames_of_the_running_envs(name, device):
    torch.manual_seed(1)
    device = torch.device(device)
    agent = ppo.Agent().to(device).eval()
    obs = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8).numpy()
    perturb = robustness.EpisodePerturbation(name, 0.5, 5, seed=3)
    running = np.array([0, 3, 4])
    logits_of = evaluation.eval_network(agent, obs, False, device, perturb)
    with torch.no_grad():
        expected = agent(perturb(torch.as_tensor(obs[running], device=device), running))[0]
        torch.testing.assert_close(logits_of(obs, running), expected)
        assert not torch.allclose(expected, agent(torch.as_tensor(obs[running], device=device))[0])


def test_interval_is_student_t_with_the_sample_std():
    mean, low, high = robustness.interval95([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 dof) x sample std 1 / sqrt(3)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert math.isnan(robustness.interval95([5.0])[1])


def test_measure_agent_drops_are_clean_minus_perturbed_with_the_same_draws_for_every_agent(monkeypatch):
    # The evaluations are stubbed: clean 10, perturbed 4. What is measured: the sign of the drop, and the
    # perturbations' seeds: one per perturbation, the same for every agent, and for the frames whose TV
    # distance and spread are measured another (seed + 500) than for the test episodes.
    seeds = []

    class RecordedPerturbation(robustness.EpisodePerturbation):
        def __init__(self, name, strength, num_envs, seed):
            seeds.append((name, seed))
            super().__init__(name, strength, num_envs, seed)

    monkeypatch.setattr(ppo, "ProcgenVecEnv", lambda *args: types.SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(evaluation, "evaluate", lambda agent, env, device, seed, perturb=None: (4.0 if perturb else 10.0,))
    monkeypatch.setattr(robustness, "EpisodePerturbation", RecordedPerturbation)
    args = robustness.RobustnessArgs(runs=["unused"], episodes=2, frames=2, copies=2, seed=3)
    frames = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    perturbations = [("hue", 0.5), ("random_conv", 1.0)]
    first = robustness.measure_agent(ppo.Agent().eval(), "bigfish", "hard", frames, perturbations, args)
    for key in ("hue:0.5", "random_conv:1"):
        assert first["perturbations"][key]["return"] == 4.0 and first["perturbations"][key]["drop"] == 6.0
    assert first["clean_return"] == 10.0
    assert seeds == [("hue", 3000), ("hue", 3500), ("random_conv", 3001), ("random_conv", 3501)]
    robustness.measure_agent(ppo.Agent().eval(), "bigfish", "hard", frames, perturbations, args)
    assert seeds[4:] == seeds[:4]


def test_a_dropout_agent_is_measured_as_the_same_network_without_dropout():
    # In eval mode dropout is the identity, so every number must be the dropout-free copy's: none may be measured
    # with the agent's masks on (ppo_dropout's runs go through here).
    torch.manual_seed(0)
    with_dropout = ppo.Agent(dropout=0.1).eval()
    without = ppo.Agent().eval()
    without.load_state_dict({name: value for name, value in with_dropout.state_dict().items() if not name.endswith("mask")})
    args = robustness.RobustnessArgs(runs=["unused"], episodes=2, frames=3, copies=2, seed=0)
    frames = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    measured = [robustness.measure_agent(agent, "bigfish", "hard", frames, [("random_conv", 1.0)], args)
                for agent in (with_dropout, without)]

    def flat(result):
        return {"clean_return": result["clean_return"], "entropy": result["entropy"], **result["perturbations"]["random_conv:1"]}

    assert flat(measured[0]) == pytest.approx(flat(measured[1]), rel=1e-5)
    assert not with_dropout.training


@pytest.mark.parametrize("name, strength, low, high", [("brightness", 0.3, 0.7, 1.3), ("saturation", 0.5, 0.5, 1.5),
                                                       ("hue", 0.1, -0.1, 0.1)])
def test_colour_factors_are_drawn_uniformly_around_the_identity(name, strength, low, high):
    # U[1 - s, 1 + s] (hue: U[-s, s]): 20,000 draws reach within 0.01 of each end, and their mean is the centre
    # (its standard error is (high - low) / sqrt(12 x 20,000) < 0.003).
    params = robustness.EpisodePerturbation(name, strength, 20_000, seed=0).params.double()
    assert low <= params.min() < low + 0.01 and high - 0.01 < params.max() <= high
    assert float(params.mean()) == pytest.approx((low + high) / 2, abs=0.01)


def agent_result(clean, perturbed):
    return {"clean_return": clean, "entropy": 1.0, "perturbations": {"hue:0.5": {
        "return": perturbed, "drop": clean - perturbed, "tv_mean": 0.1, "tv_max": 0.2, "spread": 0.5}}}


def two_seeds_of_mdpo():
    """Seed 1: three agents returning 12, 6, 6 clean (mean 8, median 6) and 9, 0, 0 perturbed (mean 3, median 0);
    seed 2: two agents returning 4, 4 and 1, 1."""
    agents = {1: [agent_result(12.0, 9.0), agent_result(6.0, 0.0), agent_result(6.0, 0.0)],
              2: [agent_result(4.0, 1.0), agent_result(4.0, 1.0)]}
    return [{"run": f"r{seed}", "method": "mdpo", "seed": seed, "global_step": 64, "agents": agents[seed]}
            for seed in (1, 2)]


def test_summary_is_the_mean_over_seeds_of_each_seeds_agent_mean_with_a_t_interval():
    results = two_seeds_of_mdpo()
    summary = robustness.summarise(results, ["hue:0.5"])["mdpo"]
    # per seed: clean 8 and 4 (sample std 2 sqrt 2), perturbed 3 and 1 (sqrt 2); with 2 seeds the interval is
    # t(0.975, 1 dof) x std / sqrt(2), and the t quantile with 1 dof is the Cauchy one, tan(0.475 pi)
    t1 = math.tan(0.475 * math.pi)
    assert summary["clean"] == pytest.approx({"mean": 6.0, "low": 6 - 2 * t1, "high": 6 + 2 * t1, "n": 2})
    assert summary["hue:0.5"] == pytest.approx({"mean": 2.0, "low": 2 - t1, "high": 2 + t1, "n": 2})
    table = robustness.markdown("bigfish", results, ["hue:0.5"], robustness.summarise(results, ["hue:0.5"]), "t")
    assert f"| mdpo | 2 | 6.00 [{6 - 2 * t1:.2f}, {6 + 2 * t1:.2f}] | 2.00 [{2 - t1:.2f}, {2 + t1:.2f}] |" in table
    assert "| mdpo | 1 | 1 | hue:0.5 | 9.00 | 3.00 | 0.100 | 0.200 | 0.500 | 1.000 |" in table


@pytest.mark.parametrize("spec, expected", [
    ("random_conv", ("random_conv", 1.0)), ("hue", ("hue", 0.25)), ("hue:strong", ("hue", 0.5)),
    ("brightness:0.3", ("brightness", 0.3)), ("contrast:0", ("contrast", 0.0)),
])
def test_perturbation_specs(spec, expected):
    assert robustness.parse_perturbation(spec) == expected


@pytest.mark.parametrize("spec, expected", [("hue:0.5", ("hue", 0.5)), ("random_conv:1", ("random_conv", 1.0)),
                                            ("brightness:1.0", ("brightness", 1.0))])
def test_a_numeric_strength_may_equal_the_largest_one(spec, expected):
    assert robustness.parse_perturbation(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("blur", "unknown perturbation 'blur'"), ("hue:0.6", "out of range"), ("brightness:-0.1", "out of range"),
    ("saturation:lots", "give weak, medium, strong or a number"),
])
def test_bad_perturbation_specs(spec, message):
    with pytest.raises(robustness.UsageError, match=message):
        robustness.parse_perturbation(spec)


def fake_run(path, script="ppo", game="bigfish", agents=1, mode="hard", **settings):
    """A run directory as ppo.py / drac.py / mdpo.py write it, with untrained networks (no training needed to load one)."""
    os.makedirs(path)
    args = {"env_id": game, "seed": 1, "exp_name": script, "distribution_mode": mode, "dropout": 0.0, **settings}
    states = [ppo.Agent().state_dict() for _ in range(agents)]
    checkpoint = {"script": script, "args": args, "global_step": 64,
                  "agents": [{"agent": state} for state in states]}
    torch.save(checkpoint, os.path.join(path, "checkpoint.pt"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"script": script, "args": args}, f)
    return str(path)


def test_every_agent_of_an_mdpo_run_is_loaded(tmp_path):
    run = run_data.load_agents(fake_run(tmp_path / "mdpo", "mdpo", agents=3))
    assert len(run["agents"]) == 3 and run["game"] == "bigfish" and not run["agents"][0].training


def test_a_run_trained_with_other_settings_is_its_own_method_not_another_seed(tmp_path):
    runs = robustness.load_runs([fake_run(tmp_path / "a", num_envs=64), fake_run(tmp_path / "b", num_envs=64, seed=2),
                                 fake_run(tmp_path / "c", num_envs=256), fake_run(tmp_path / "d", "mdpo", agents=2)])
    assert [run["method"] for run in runs] == ["ppo", "ppo", "ppo (num_envs=256)", "mdpo"]


def run_cli(*flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "robustness.py"), *flags], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_bad_input_fails_in_one_line(tmp_path):
    ppo_run = fake_run(tmp_path / "a")
    other_game = fake_run(tmp_path / "b", game="coinrun")
    easy = fake_run(tmp_path / "easy", mode="easy")
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "checkpoint.pt").write_bytes(b"not a checkpoint")
    scalars_only = tmp_path / "scalars_only"  # an export made with --no-weights
    scalars_only.mkdir()
    (scalars_only / "config.json").write_text("{}")
    # The command line turns a UsageError into one line and exit code 2 (two calls: each costs an interpreter).
    assert_one_line_error(run_cli(ppo_run, "--perturbations", "blur"), "unknown perturbation 'blur'")
    assert_one_line_error(run_cli(ppo_run, other_game), "different games: bigfish, coinrun")
    for runs, flags, message in [
        ([ppo_run], dict(perturbations=["hue:0.9"]), "out of range"),
        ([ppo_run, str(torn)], {}, "is not a readable checkpoint"),
        ([str(tmp_path / "missing")], {}, "no checkpoint.pt or weights.pt in"),
        ([str(scalars_only)], {}, "weights.pt in .*scalars_only: a run not yet checkpointed, or exported without"),
        ([ppo_run], dict(copies=1), "--copies must be at least 2"),
        ([ppo_run], dict(frames=1), "--frames must be at least 2, got 1"),  # one clean frame: its spread is 0
        ([ppo_run], dict(episodes=0), "--episodes must be positive, got 0"),
        ([ppo_run], dict(warmup_steps=-1), "--warmup-steps must not be negative, got -1"),
        ([ppo_run], dict(perturbations=["hue:strong", "hue:0.5"]), "a perturbation is given twice"),  # both 0.5
        ([ppo_run, easy], {}, "different distribution modes: easy, hard"),
        ([ppo_run, str(tmp_path / "a" / "checkpoint.pt")], {}, "is given twice"),  # would count as two seeds
    ]:
        with pytest.raises(robustness.UsageError, match=message):
            robustness.main(robustness.RobustnessArgs(runs=runs, out=str(tmp_path / "out"), **flags))
    assert not os.path.exists(tmp_path / "out")  # refused before any work


def test_the_smallest_good_settings_are_accepted():
    args = robustness.RobustnessArgs(runs=["unused"], episodes=1, frames=2, copies=2, warmup_steps=0,
                                     perturbations=["hue:0.5", "hue:0.25"])
    assert robustness.check(args) == [("hue", 0.5), ("hue", 0.25)]


@pytest.mark.parametrize("settings, message", [
    ({"runs": []}, "give the run directories (or checkpoints) to measure"),  # `robustness.py --out x`
    ({"perturbations": []}, "--perturbations must name at least one; choose from: random_conv, brightness"),
    ({"seed": -1}, "--seed must lie in [0, 2146483647], got -1"),
    ({"seed": 2146483648}, "--seed must lie in [0, 2146483647], got 2146483648"),  # the test levels' seed: 2**31
])
def test_settings_that_leave_nothing_to_measure_or_seed_no_game_are_refused(settings, message):
    args = robustness.RobustnessArgs(**{"runs": ["unused"], **settings})
    with pytest.raises(robustness.UsageError, match="^" + re.escape(message)):
        robustness.check(args)


def test_the_largest_seed_procgen_takes_is_accepted():
    assert robustness.check(robustness.RobustnessArgs(runs=["unused"], seed=2**31 - 1 - 1_000_000))


def test_a_copy_of_a_run_is_not_another_seed(tmp_path):
    first, copy = fake_run(tmp_path / "runs" / "a"), fake_run(tmp_path / "export" / "a")  # both seed 1 of ppo
    other = fake_run(tmp_path / "runs" / "b", seed=2)
    with pytest.raises(robustness.UsageError, match=re.escape(f"{first} and {copy} are both seed 1 of ppo on bigfish "
                                                              "with the same settings (--bf16 and --compile aside): one seed, not two")):
        robustness.load_runs([first, copy, other])
    assert_one_line_error(run_cli(first, copy, "--out", str(tmp_path / "out")), "are both seed 1 of ppo")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_without_its_game_is_refused_in_one_line(tmp_path):
    torch.save({"script": "ppo", "args": {"seed": 1}, "agents": [{"agent": ppo.Agent().state_dict()}]},
               tmp_path / "checkpoint.pt")
    with pytest.raises(robustness.UsageError, match="is not a checkpoint of ppo.py, drac.py or mdpo.py"):
        run_data.load_agents(str(tmp_path))


class RecordingEnv:
    """Stands in for ProcgenVecEnv: records how each env was made, returns blank frames."""
    made = []

    def __init__(self, *args):
        RecordingEnv.made.append(args)
        self.num_envs = args[1]

    def reset(self):
        return np.zeros((self.num_envs, 64, 64, 3), dtype=np.uint8), {}

    def step(self, actions):
        return self.reset()[0], None, None, None, None

    def close(self):
        pass


def test_frames_and_test_episodes_come_from_unseen_levels_with_the_evaluation_seed(monkeypatch):
    RecordingEnv.made = []
    monkeypatch.setattr(ppo, "ProcgenVecEnv", RecordingEnv)
    robustness.test_frames(ppo.ProcgenVecEnv, "bigfish", "hard", 3, 2, seed=7)
    assert RecordingEnv.made == [("bigfish", 3, 0, 0, "hard", 7)]  # num_levels 0: unseen levels, not the training's
    action_seeds = []
    monkeypatch.setattr(evaluation, "evaluate", lambda agent, env, device, seed, perturb=None: action_seeds.append(seed)
                        or (1.0,))
    args = robustness.RobustnessArgs(runs=["unused"], episodes=5, frames=2, copies=2, seed=3)
    frames = torch.zeros(2, 64, 64, 3, dtype=torch.uint8)
    robustness.measure_agent(ppo.Agent().eval(), "bigfish", "easy", frames, [("hue", 0.5)], args)
    assert RecordingEnv.made[1:] == [("bigfish", 5, 0, 0, "easy", 1_000_003)] * 2  # clean and perturbed: same levels
    assert action_seeds == [1_000_003] * 2  # and the same actions' random stream: the returns are paired


def test_budget_text_names_the_smallest_and_largest_budget():
    results = [{"global_step": s} for s in (300, 100, 200, None)]
    assert robustness.budget_text(results) == "budgets differ: 100 to 300 env steps per agent"
    assert robustness.budget_text([{"global_step": None}]) == "budget unknown"


def test_markdown_gives_no_interval_for_one_seed():
    result = {"run": "r", "method": "ppo", "seed": 1, "global_step": 64, "agents": [
        {"clean_return": 5.0, "entropy": 1.0, "perturbations": {"hue:0.5": {
            "return": 3.0, "drop": 2.0, "tv_mean": 0.1, "tv_max": 0.2, "spread": 0.5}}}]}
    summary = robustness.summarise([result], ["hue:0.5"])
    table = robustness.markdown("bigfish", [result], ["hue:0.5"], summary, "t")
    assert "| ppo | 1 | 5.00 | 3.00 |" in table and "nan" not in table


def test_policy_shift_reports_the_largest_and_the_mean_tv_over_all_copies():
    torch.manual_seed(0)
    agent = ppo.Agent().eval()
    frames = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    shift = robustness.policy_shift(agent, frames, robustness.EpisodePerturbation("random_conv", 1.0, 4 * 3, seed=0), copies=3)
    perturb = robustness.EpisodePerturbation("random_conv", 1.0, 4 * 3, seed=0)  # the same draws, applied here by hand
    with torch.no_grad():
        clean = agent.actor(agent.hidden(frames)).softmax(-1).repeat_interleave(3, 0)
        perturbed = agent.actor(agent.hidden(perturb(frames.repeat_interleave(3, 0)))).softmax(-1)
    tv = 0.5 * (clean - perturbed).abs().sum(-1)
    assert shift["tv_max"] == pytest.approx(tv.max().item(), rel=1e-5) and shift["tv_max"] > shift["tv_mean"]
    assert shift["tv_mean"] == pytest.approx(tv.mean().item(), rel=1e-5)


def test_entropy_is_the_policys_mean_entropy_over_the_frames():
    torch.manual_seed(0)
    agent = ppo.Agent().eval()
    frames = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        p = agent.actor(agent.hidden(frames)).softmax(-1).double()
    assert robustness.entropy(agent, frames) == pytest.approx(-(p * p.log()).sum(-1).mean().item(), rel=1e-5)
    torch.nn.init.zeros_(agent.actor.weight)
    torch.nn.init.zeros_(agent.actor.bias)
    assert robustness.entropy(agent, frames) == pytest.approx(math.log(15), rel=1e-6)  # uniform over 15 actions


def test_one_terminal_line_per_run_each_naming_its_own_run(tmp_path, monkeypatch, capsys):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", seed=2)  # two seeds: one seed twice is refused
    monkeypatch.setattr(robustness, "test_frames", lambda *args: torch.zeros(2, 64, 64, 3, dtype=torch.uint8))
    returns = iter([1.0, 7.0])
    monkeypatch.setattr(robustness, "measure_agent", lambda *args: {
        "clean_return": next(returns), "entropy": 1.0, "perturbations": {"hue:0.5": {
            "return": 0.0, "drop": 0.0, "tv_mean": 0.0, "tv_max": 0.0, "spread": 0.0}}})
    robustness.main(robustness.RobustnessArgs(runs=[a, b], perturbations=["hue:strong"], figure=False,
                                              out=str(tmp_path / "out")))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{a}: ") and "clean 1.00" in lines[0]
    assert lines[1].startswith(f"{b}: ") and "clean 7.00" in lines[1]


def test_a_tiny_run_end_to_end(tmp_path, capsys):
    run_dir = str(tmp_path / "starpilot__ppo__1")
    ppo.main(ppo.Args(env_id="starpilot", num_envs=4, num_steps=16, num_minibatches=2, total_timesteps=64,
                      eval_episodes=1, cuda=False, run_dir=run_dir))
    out = str(tmp_path / "fig")
    report = robustness.main(robustness.RobustnessArgs(
        runs=[run_dir], perturbations=["random_conv", "hue:0"], episodes=1, frames=4, copies=2, warmup_steps=5,
        out=out, label="test"))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{run_dir}: ppo, seed 1, 1 agent(s): clean ")
    for ext in ("md", "json", "png", "pdf"):
        assert os.path.isfile(os.path.join(out, f"robustness_starpilot.{ext}"))
    agent = report["runs"][0]["agents"][0]
    conv, still = agent["perturbations"]["random_conv:1"], agent["perturbations"]["hue:0"]
    # Zero strength changes nothing: the same levels and action seeds give the clean return exactly.
    assert still["return"] == agent["clean_return"] and still["drop"] == 0 and still["tv_max"] < 1e-6  # batch-shape noise
    assert conv["tv_mean"] > 0 and conv["drop"] == pytest.approx(agent["clean_return"] - conv["return"])
    assert 0 < agent["entropy"] <= math.log(15) + 1e-6
    with open(os.path.join(out, "robustness_starpilot.json")) as f:
        saved = json.load(f)
    assert saved["summary"]["ppo"]["clean"]["n"] == 1 and saved["budget"] == "64 env steps per agent"
