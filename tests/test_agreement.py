"""How far agents agree: the debiased linear CKA between their features against an independent computation,
what it reads for independent and shuffled features, the probe frames, MDPO's logging from step 0, and
agreement.py's table across runs."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import agreement
import evaluation
import mdpo
import ppo
from helpers import ROOT, full_probe_set

# Independent features' debiased CKA at 2,048 x 256 scatters around 0 with a standard deviation of about
# 0.0006 (20 draws measured): 0.005 is 8 of them.
NULL_TOLERANCE = 0.005


def hsic_by_quadruples(k, l):
    """Song et al.'s unbiased HSIC as the U-statistic it is: the mean over ordered quadruples of distinct
    indices (i, j, q, r) of k_ij l_ij + k_ij l_qr - 2 k_ij l_iq. Float64, O(n^4): for a handful of samples."""
    n, total = len(k), 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
    return total / (n * (n - 1) * (n - 2) * (n - 3))


def cka_by_quadruples(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    k, l = x @ x.T, y @ y.T
    return hsic_by_quadruples(k, l) / np.sqrt(hsic_by_quadruples(k, k) * hsic_by_quadruples(l, l))


def biased_cka(x, y):
    """Linear CKA with the biased HSIC estimator (Kornblith et al. 2019): ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F) on
    column-centred features, what mdpo.py logged before the debiased estimator."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


@pytest.mark.parametrize("n, d1, d2", [(5, 3, 4), (8, 6, 2), (9, 12, 12)])
def test_debiased_cka_is_the_u_statistic_of_song_et_al(n, d1, d2):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64)
    y = torch.randn(n, d2, generator=g, dtype=torch.float64) + x[:, :1]  # related: a CKA far from 0
    assert evaluation.debiased_cka(x, y) == pytest.approx(cka_by_quadruples(x.numpy(), y.numpy()), rel=1e-9, abs=1e-12)


def test_debiased_cka_is_one_on_itself_and_invariant_to_rotation_and_isotropic_scaling():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64)
    y = torch.randn(300, 8, generator=g, dtype=torch.float64) + x[:, :8]
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert evaluation.debiased_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    base = evaluation.debiased_cka(x, y)
    assert 0.05 < base < 0.95
    assert evaluation.debiased_cka(x @ rotation, y) == pytest.approx(base, abs=1e-10)
    assert evaluation.debiased_cka(3.5 * x, 0.01 * y) == pytest.approx(base, abs=1e-10)
    assert evaluation.debiased_cka(x * torch.linspace(0.1, 10, 16, dtype=torch.float64), y) != pytest.approx(base, abs=1e-3)


def test_independent_features_score_about_zero_where_the_biased_estimator_does_not():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2048, 256, generator=g), torch.randn(2048, 256, generator=g)
    assert abs(evaluation.debiased_cka(x, y)) < NULL_TOLERANCE
    assert biased_cka(x, y) > 0.1  # its bias at this n / d: the reason for the debiased estimator
    small_x, small_y = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    assert biased_cka(small_x, small_y) > 0.4 and abs(evaluation.debiased_cka(small_x, small_y)) < 0.05


@full_probe_set
def test_the_probe_set_is_2048_frames_of_256_levels_at_many_depths_made_from_the_seed_alone():
    frames = evaluation.probe_frames(ppo.ProcgenVecEnv, "bigfish", "hard", 1)
    assert frames.shape == (2048, 64, 64, 3) and frames.dtype == torch.uint8
    assert len({bytes(frame.numpy()) for frame in frames}) == 2048  # no two alike: not only start screens
    by_depth = frames.view(8, 256, 64, 64, 3)
    assert not torch.equal(by_depth[0], by_depth[1])  # depth 12 is not depth 0
    assert torch.equal(frames, evaluation.probe_frames(ppo.ProcgenVecEnv, "bigfish", "hard", 1))
    assert not torch.equal(frames, evaluation.probe_frames(ppo.ProcgenVecEnv, "bigfish", "hard", 2))
    # Shuffled between two agents, the frames no longer match: about 0, as for independent features.
    torch.manual_seed(1)
    a, b = ppo.Agent(), ppo.Agent()
    features_a, _ = evaluation.features_and_policy(a, frames)
    features_b, _ = evaluation.features_and_policy(b, frames)
    shuffled = features_b[torch.randperm(len(frames), generator=torch.Generator().manual_seed(0))]
    assert abs(evaluation.debiased_cka(features_a, shuffled)) < NULL_TOLERANCE
    assert evaluation.debiased_cka(features_a, features_b) > 0.3  # untrained networks agree on shared frames


class Recorder:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = value


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_agreement_logs_mean_pairwise_cka_and_the_policies_tv_distance(dropout):
    torch.manual_seed(0)
    agents = [mdpo.Agent(dropout=dropout) for _ in range(3)]
    agents[2].load_state_dict(agents[0].state_dict())  # agents 1 and 3 are the same network
    frames = torch.randint(0, 256, (32, 64, 64, 3), dtype=torch.uint8)
    writer = Recorder()
    mdpo.log_agreement(writer, agents, frames, 0, bf16=False)
    assert all(agent.training for agent in agents)  # evaluated in eval mode, then restored
    with torch.no_grad():  # the networks as evaluated: in eval mode, dropout (where there is any) off
        features = [agent.eval().hidden(frames) for agent in agents]
        probs = [agent.actor(h).softmax(-1).double() for agent, h in zip(agents, features)]
    assert writer.scalars["eval/debiased_cka_1_3"] == pytest.approx(1.0, abs=1e-9)
    expected_tv = [0.5 * float((probs[i] - probs[j]).abs().sum(-1).mean()) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert expected_tv[1] == 0
    assert writer.scalars["eval/policy_tv"] == pytest.approx(np.mean(expected_tv), rel=1e-5)
    ckas = [writer.scalars[f"eval/debiased_cka_{i}_{j}"] for i, j in ((1, 2), (1, 3), (2, 3))]
    assert writer.scalars["eval/debiased_cka"] == pytest.approx(np.mean(ckas))


TINY = dict(env_id="bigfish", num_envs=4, num_steps=16, num_minibatches=2, update_epochs=1, eval_episodes=2, cuda=False)


def scalar_steps(event_dir, tag):
    accumulator = EventAccumulator(event_dir)
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def test_mdpo_logs_its_agreement_from_step_0_and_a_resume_does_not_log_it_again(tmp_path):
    run_dir = str(tmp_path / "run")
    mdpo.main(mdpo.Args(total_timesteps=64, eval_interval=1, run_dir=run_dir, **TINY))
    mdpo.main(mdpo.Args(total_timesteps=128, eval_interval=1, resume=run_dir, **TINY))
    logged = scalar_steps(run_dir, "eval/debiased_cka")
    assert [step for step, _ in logged] == [0, 64, 128]
    assert [step for step, _ in scalar_steps(run_dir, "eval/policy_tv")] == [0, 64, 128]
    assert all(-1 <= value <= 1 for _, value in logged)


def tiny_run(module, run_dir, seed, **kw):
    module.main(module.Args(total_timesteps=64, eval_interval=100, seed=seed, run_dir=str(run_dir), **TINY, **kw))
    return str(run_dir)


def test_agreement_tool_reads_the_untrained_level_a_run_logged_and_pairs_runs_by_kind(tmp_path):
    runs = [tiny_run(mdpo, tmp_path / "mdpo1", 1), tiny_run(mdpo, tmp_path / "mdpo2", 2),
            tiny_run(ppo, tmp_path / "ppo1", 1), tiny_run(ppo, tmp_path / "ppo2", 2)]
    # Probing with the first MDPO run's seed, the tool's untrained level of its two agents is what it logged at step 0.
    table = agreement.main(agreement.AgreementArgs(runs=runs, probe_seed=1, out=str(tmp_path / "fig")))
    assert sorted(table) == ["mdpo vs ppo: two seeds", "mdpo: agents of one run", "mdpo: two seeds", "ppo: two seeds"]
    assert [len(table[kind]) for kind in sorted(table)] == [2, 2, 1, 1]  # the pairs of different seeds only
    (_, logged_start), *_ = scalar_steps(runs[0], "eval/debiased_cka")
    within_first = next(row for row in table["mdpo: agents of one run"] if row["a"].startswith(runs[0]))
    assert within_first["cka_untrained"] == pytest.approx(logged_start, abs=1e-4)
    (_, logged_end), = [(s, v) for s, v in scalar_steps(runs[0], "eval/debiased_cka") if s == 64]
    assert within_first["cka"] == pytest.approx(logged_end, abs=1e-4)
    # and the policies' total variation, which MDPO logs beside it on the same probe frames
    logged_tv = dict(scalar_steps(runs[0], "eval/policy_tv"))
    assert within_first["tv_untrained"] == pytest.approx(logged_tv[0], abs=1e-4)
    assert within_first["tv"] == pytest.approx(logged_tv[64], abs=1e-4)
    # across runs, the first agent of each
    assert all(row[side].endswith(" agent 1") for kind, rows in table.items() if kind.endswith("two seeds")
               for row in rows for side in ("a", "b"))
    assert all(-1 <= row[key] <= 1 for rows in table.values() for row in rows for key in ("cka", "cka_untrained"))
    saved = json.load(open(tmp_path / "fig" / "agreement_bigfish.json"))
    assert saved["pairs"] == json.loads(json.dumps(table))
    text = open(tmp_path / "fig" / "agreement_bigfish.md").read()
    assert "| mdpo: agents of one run | 2 |" in text and "at 64 steps per agent" in text


def test_the_untrained_level_of_a_dropout_run_is_the_network_it_started_from(tmp_path):
    # Dropout's masks are drawn as the network is built: the tool must rebuild it with the run's dropout.
    run = tiny_run(mdpo, tmp_path / "mdpo_dropout", 1, dropout=0.1)
    table = agreement.main(agreement.AgreementArgs(runs=[run], probe_seed=1, out=str(tmp_path / "fig")))
    [[row]] = table.values()  # the one pair: its two agents
    (_, logged_start), *_ = scalar_steps(run, "eval/debiased_cka")
    assert row["cka_untrained"] == pytest.approx(logged_start, abs=1e-4)


def test_the_probe_frames_come_from_the_probe_seed_not_the_runs(tmp_path, monkeypatch):
    seeds, real = [], evaluation.probe_frames
    monkeypatch.setattr(evaluation, "probe_frames", lambda *args: seeds.append(args[-1]) or real(*args))
    runs = [tiny_run(ppo, tmp_path / "ppo1", 1), tiny_run(ppo, tmp_path / "ppo2", 2)]
    agreement.main(agreement.AgreementArgs(runs=runs, probe_seed=5, out=str(tmp_path / "fig")))
    assert seeds == [5]


def test_agreement_tool_refuses_runs_at_other_steps_or_games_in_one_line(tmp_path):
    a, b = tiny_run(ppo, tmp_path / "a", 1), tiny_run(ppo, tmp_path / "b", 2)
    ppo.main(ppo.Args(total_timesteps=128, eval_interval=100, seed=3, run_dir=str(tmp_path / "c"), **TINY))
    for runs, message in (([a, str(tmp_path / "c")], "different steps per agent: 64, 128"), ([a, a], "given twice"),
                          ([a, str(tmp_path / "none")], "no checkpoint.pt or weights.pt"), ([a], "no pair to compare")):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "agreement.py"), *runs, "--out", str(tmp_path / "f")],
                                capture_output=True, text=True, cwd=ROOT, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert b  # a second seed is what makes a pair: see the test above


def test_a_copy_of_a_run_is_not_a_second_pair_of_seeds(tmp_path, monkeypatch):
    from test_robustness import fake_run

    monkeypatch.setattr(evaluation, "probe_frames", lambda *args: pytest.fail("measured runs it should refuse"))
    first, copy = fake_run(tmp_path / "runs" / "a"), fake_run(tmp_path / "export" / "a")  # both seed 1 of ppo
    other = fake_run(tmp_path / "runs" / "b", seed=2)
    with pytest.raises(agreement.UsageError, match=f"{first} and {copy} are both seed 1 of ppo on bigfish"):
        agreement.main(agreement.AgreementArgs(runs=[first, copy, other], out=str(tmp_path / "fig")))


@pytest.mark.parametrize("probe_seed", [-1, 2**31 - 2_000_000])
def test_a_probe_seed_procgen_cannot_take_is_refused(tmp_path, probe_seed):
    with pytest.raises(agreement.UsageError, match=f"--probe-seed must lie in \\[0, 2145483647\\], got {probe_seed}"):
        agreement.main(agreement.AgreementArgs(runs=["unused"], probe_seed=probe_seed, out=str(tmp_path / "fig")))


def test_the_table_gives_the_cka_change_as_trained_minus_untrained_with_a_t_interval():
    rows = [{"cka": 0.9, "cka_untrained": 0.8, "tv": 0.3, "tv_untrained": 0.1, "a": "x", "b": "y"},
            {"cka": 0.7, "cka_untrained": 0.75, "tv": 0.2, "tv_untrained": 0.1, "a": "x", "b": "z"}]
    mean, low, high = agreement.summary_row(rows)["cka_change"]
    # Changes +0.10 and -0.05: mean 0.025, sample std 0.15 / sqrt(2); t(0.975, 1 degree of freedom) = 12.7062047.
    half = 12.706204736174707 * (0.15 / np.sqrt(2)) / np.sqrt(2)
    assert (mean, low, high) == pytest.approx((0.025, 0.025 - half, 0.025 + half))
    row, = [line for line in agreement.markdown({"k": rows}, "t").splitlines() if line.startswith("| k |")]
    assert row.split(" | ")[4] == f"0.025 [{0.025 - half:.3f}, {0.025 + half:.3f}]"  # the CKA change column
