"""sweep.py: the methods, method_of, and what a sweep does with runs that are in use, diverged,
preempted or made with other flags. Most jobs here run a fake training script (FAKE_TRAIN), not ppo.py."""

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import asdict

import pytest

import run_data
import sweep
from helpers import without_evaluation

TINY_FLAGS = "--total-timesteps 128 --num-envs 4 --num-steps 32 --num-minibatches 2 --eval-episodes 2 --no-cuda"

# Stands in for ppo.py/mdpo.py: FAKE_MODE says what it does. It holds run_dir/lock like the real scripts.
FAKE_TRAIN = r'''
import fcntl, json, os, signal, sys
run_dir = sys.argv[sys.argv.index("--run-dir" if "--run-dir" in sys.argv else "--resume") + 1]
os.makedirs(run_dir, exist_ok=True)
lock = open(os.path.join(run_dir, "lock"), "a+")
fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
with open(os.path.join(run_dir, "argv.json"), "w") as f:
    json.dump(sys.argv[1:], f)
mode = os.environ["FAKE_MODE"]
if mode == "diverge":
    with open(os.path.join(run_dir, "diverged.json"), "w") as f:
        json.dump({"iteration": 7, "global_step": 896, "what": "agent 1's loss is nan"}, f)
    sys.exit(3)
if mode == "preempt":  # ask the sweep (our parent) to stop, as Slurm would, and checkpoint when told
    def stop(signum, frame):
        open(os.path.join(run_dir, "checkpoint.pt"), "w").close()
        sys.exit(4)
    signal.signal(signal.SIGUSR2, stop)
    signal.signal(signal.SIGTERM, stop)
    signal.alarm(20)  # only when the signal never reaches us: the test then fails instead of hanging
    os.kill(os.getppid(), int(os.environ["FAKE_SIGNAL"]))
    while True:
        signal.pause()
if mode == "wait":  # train until told to stop, then checkpoint
    def stop(signum, frame):
        open(os.path.join(run_dir, "checkpoint.pt"), "w").close()
        sys.exit(4)
    signal.signal(signal.SIGTERM, stop)
    signal.alarm(20)  # only when the signal never reaches us: the test then fails instead of hanging
    while True:
        signal.pause()
print("error: fake failure" if mode != "0" else "done", file=sys.stderr)
sys.exit(int(mode))
'''


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    """From here on, sweep.make_jobs makes jobs that run FAKE_TRAIN; calling the returned function with
    mode also sets FAKE_MODE (what the fake does: an exit code, "diverge" or "preempt")."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    real_make_jobs = sweep.make_jobs

    def make_jobs(args, mode=None):
        if mode is not None:
            monkeypatch.setenv("FAKE_MODE", mode)
        jobs = real_make_jobs(args)
        for job in jobs:
            job.base = [sys.executable, str(script)]
        return jobs

    monkeypatch.setattr(sweep, "make_jobs", make_jobs)
    monkeypatch.setenv("FAKE_MODE", "0")
    return make_jobs


def sweep_args(root, **kw):
    kw = {"methods": ["ppo"], "games": ["bigfish"], "seeds": [1], "flags": TINY_FLAGS, **kw}
    return sweep.SweepArgs(root=str(root), **kw)


def write_run(job, config_args=None, finished=True, checkpoint=True):
    """A run directory as the training scripts leave it, made with the job's args unless told otherwise."""
    os.makedirs(job.run_dir, exist_ok=True)
    with open(os.path.join(job.run_dir, "config.json"), "w") as f:
        json.dump({"script": job.script, "args": job.expected if config_args is None else config_args}, f)
    if checkpoint:
        open(os.path.join(job.run_dir, "checkpoint.pt"), "w").close()
        with open(os.path.join(job.run_dir, "status.json"), "w") as f:
            json.dump({"global_step": 128, "iteration": 1, "finished": finished}, f)


def held(path):
    """Hold the flock on path as another process would (flock locks belong to the open file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write(json.dumps({"host": "node7", "pid": 4242, "slurm_job_id": "99_3"}))
    f.flush()
    return f


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


def test_list_methods_prints_every_method_with_a_line_on_it(capsys):
    assert sweep.main(sweep.SweepArgs(list_methods=True)) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == [*sweep.METHODS, "ppo_drac_best"]
    assert all(len(line.split(None, 1)[1]) > 20 for line in lines)  # each says what it controls for
    assert {"ppo", "ppo_l2", "ppo_dropout", "ppo_2x", "mdpo", "mdpo_alpha0", "ppo_ucb_drac",
            "ppo_drac_crop", "ppo_drac_flip", "ppo_drac_rotate", "ppo_drac_random-conv",
            "ppo_drac_color-jitter"} == set(sweep.METHODS)


def test_the_default_grid_is_the_eight_methods_the_docs_list():
    # docs/usage.md: the paper's 4 methods, PPO 2x samples, MDPO alpha=0 and two DrAC methods.
    assert sweep.SweepArgs(root="unused").methods == ["ppo", "ppo_l2", "ppo_dropout", "ppo_2x", "ppo_drac_best",
                                                      "ppo_ucb_drac", "mdpo", "mdpo_alpha0"]


def test_method_flags_are_the_contracts():
    assert sweep.METHODS["ppo_l2"].flags == ("--l2-coef", "1e-4")
    assert sweep.METHODS["ppo_dropout"].flags == ("--dropout", "0.1")
    assert sweep.METHODS["mdpo_alpha0"].flags == ("--alpha", "0")
    assert sweep.METHODS["ppo_drac_crop"].flags == ("--augment", "crop", "--drac-coef", "0.1")
    assert sweep.METHODS["ppo_ucb_drac"].flags == ("--augment", "ucb", "--drac-coef", "0.1")
    # DrAC's best augmentation per game, every entry, as the env_to_aug table built on rraileanu/auto-drac has it
    assert sweep.DRAC_BEST_AUGMENT == {
        "bigfish": "crop", "starpilot": "crop", "fruitbot": "crop", "bossfight": "flip", "ninja": "color-jitter",
        "plunder": "crop", "caveflyer": "rotate", "coinrun": "random-conv", "jumper": "random-conv",
        "chaser": "crop", "climber": "color-jitter", "dodgeball": "crop", "heist": "crop", "leaper": "crop",
        "maze": "crop", "miner": "color-jitter"}
    assert set(sweep.DRAC_BEST_AUGMENT) == set(sweep.PROCGEN_GAMES)


@pytest.mark.parametrize("script, args, method", [
    ("ppo", {"exp_name": "ppo"}, "ppo"),
    # runs made before augment/drac_coef/num_agents existed: their defaults
    ("ppo", {"exp_name": "ppo_l2", "l2_coef": 1e-4, "dropout": 0.0}, "ppo_l2"),
    ("ppo", {"exp_name": "ppo_dropout", "l2_coef": 0.0, "dropout": 0.1}, "ppo_dropout"),
    ("mdpo", {"exp_name": "mdpo", "alpha": 1.0, "detach_peer": False}, "mdpo"),
    ("mdpo", {"exp_name": "mdpo_alpha0", "alpha": 0.0}, "mdpo_alpha0"),
    # the args decide, not the name
    ("ppo", {"exp_name": "ppo_l2", "l2_coef": 0.0, "augment": "none", "drac_coef": 0.0}, "ppo"),
    ("drac", {"exp_name": "my_run", "augment": "crop", "drac_coef": 0.1}, "ppo_drac_crop"),
    ("drac", {"exp_name": "x", "augment": "ucb", "drac_coef": 0.1}, "ppo_ucb_drac"),
    ("mdpo", {"exp_name": "mdpo", "alpha": 0, "num_agents": 2}, "mdpo_alpha0"),
    # plain PPO with a doubled budget: only the sweep's name can tell, and only for plain PPO args
    ("ppo", {"exp_name": "ppo_2x", "num_envs": 128}, "ppo_2x"),
    ("ppo", {"exp_name": "ppo_2x", "l2_coef": 1e-4}, "ppo_l2"),
    # no method: named by what differs
    ("ppo", {"exp_name": "ppo_l2", "l2_coef": 0.001}, "ppo (l2_coef=0.001)"),
    ("ppo", {"l2_coef": 1e-4, "dropout": 0.1}, "ppo (l2_coef=0.0001, dropout=0.1)"),
    ("drac", {"augment": "flip", "drac_coef": 0.2}, "drac (augment=flip, drac_coef=0.2)"),
    ("mdpo", {"dropout": 0.1}, "mdpo (dropout=0.1)"),
    ("mdpo", {"exp_name": "mdpo", "num_agents": 3}, "mdpo (num_agents=3)"),
    ("mdpo", {"alpha": 0.5, "detach_peer": True}, "mdpo (alpha=0.5, detach_peer=True)"),
])
def test_method_of_reads_the_method_from_script_and_args(script, args, method):
    assert run_data.method_of({"script": script, "args": args}) == method


def test_method_of_a_config_that_is_not_a_run():
    assert run_data.method_of({"script": "tsne", "args": {}}) == "unknown (tsne)"
    assert run_data.method_of({}) == "unknown (None)"


def test_method_of_every_job_is_its_method(tmp_path):
    methods = [*sweep.METHODS]
    jobs = sweep.make_jobs(sweep_args(tmp_path, methods=methods, dry_run=True))
    assert [run_data.method_of({"script": job.script, "args": job.expected}) for job in jobs] == methods


def test_each_jobs_command_line_runs_the_args_the_sweep_expects(tmp_path):
    # What the job starts (its flags, through the script's own parser) must be what the sweep compares a
    # run directory with: otherwise ppo_l2 could train as plain PPO, or a resume be refused as a mismatch.
    import tyro

    jobs = sweep.make_jobs(sweep_args(tmp_path, methods=[*sweep.METHODS], seeds=[1, 2]))
    assert len(jobs) == 2 * len(sweep.METHODS)
    for job in jobs:
        module = sweep.SCRIPTS[job.script]
        ran = asdict(module.validate_args(tyro.cli(module.Args, args=job.flags)))
        assert ran == job.expected, job.name
        assert (ran["env_id"], ran["exp_name"], ran["seed"]) == (job.game, job.method, job.seed)
    l2, = [job for job in jobs if job.method == "ppo_l2" and job.seed == 2]
    assert l2.expected["l2_coef"] == 1e-4  # the paper's PPO + L2 baseline


def test_ppo_drac_best_runs_each_game_with_its_augmentation(tmp_path):
    jobs = sweep.make_jobs(sweep_args(tmp_path, methods=["ppo_drac_best", "ppo_drac_crop"],
                                      games=["bigfish", "coinrun"]))
    assert [job.name for job in jobs] == ["bigfish__ppo_drac_crop__1", "coinrun__ppo_drac_random-conv__1",
                                          "coinrun__ppo_drac_crop__1"]
    assert jobs[1].expected["augment"] == "random-conv" and jobs[1].expected["drac_coef"] == 0.1


@pytest.mark.parametrize("flags", ["--total-timesteps 1024 --num-envs 4", "--total_timesteps=1024 --num_envs=4"])
def test_ppo_2x_doubles_the_envs_and_steps_of_the_flags(tmp_path, flags):
    args = sweep_args(tmp_path, methods=["ppo", "ppo_2x", "mdpo"],
                      flags=flags + " --num-steps 32 --num-minibatches 2 --no-cuda")
    ppo_job, ppo_2x_job, mdpo_job = sweep.make_jobs(args)
    assert (ppo_job.expected["num_envs"], ppo_job.expected["total_timesteps"]) == (4, 1024)
    assert (ppo_2x_job.expected["num_envs"], ppo_2x_job.expected["total_timesteps"]) == (8, 2048)
    # as many iterations as PPO and MDPO (1024 / (4 x 32) = 8), evaluated on as many episodes (4)
    assert ppo_2x_job.expected["num_iterations"] == mdpo_job.expected["num_iterations"] == 8
    assert ppo_2x_job.expected["eval_episodes"] == 4


def test_ppo_2x_doubles_the_defaults_too(tmp_path):
    job, = sweep.make_jobs(sweep_args(tmp_path, methods=["ppo_2x"], flags="--no-cuda"))
    assert (job.expected["num_envs"], job.expected["total_timesteps"]) == (128, 100_000_000)
    assert job.expected["eval_episodes"] == 64


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_sweep_rejects_unknown_names(tmp_path):
    with pytest.raises(sweep.UsageError, match="unknown method or game 'pong'"):
        sweep.main(sweep_args(tmp_path, games=["pong"]))
    with pytest.raises(sweep.UsageError, match="unknown method or game 'ppo_drac_grayscale'.*--list-methods"):
        sweep.main(sweep_args(tmp_path, methods=["ppo_drac_grayscale"]))


@pytest.mark.parametrize("flags, message", [
    ("--num-envs 0", "--flags for ppo: --num-envs must be positive"),
    ("--num-envs 6 --num-steps 5", "does not divide"),
    ("--distribution-mode memory", "bigfish has no memory mode"),  # checked for each game of the sweep
    ("--seed 5", "must not set --seed"),  # would give every seed's run the same seed
    ("--exp_name=x", "must not set --exp-name"),
    ("--dropout 0.2", "must not set --dropout"),  # would turn plain PPO into PPO + dropout
    ("--augment crop", "must not set --augment"),
    ("--alpha 0.5", "must not set --alpha"),
])
def test_sweep_rejects_bad_flags_before_any_job_starts(tmp_path, flags, message):
    with pytest.raises(sweep.UsageError, match=message):
        sweep.main(sweep_args(tmp_path, flags=flags, dry_run=True))  # a flag wrongly accepted starts no training
    assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("settings, message", [
    ({"seeds": [-1]}, r"--seeds -1: --seed must lie in \[0, "),  # checked per seed, as the scripts will
    ({"flags": 'unbalanced "quote'}, "--flags 'unbalanced \"quote': no closing quotation"),
    ({"gpus_per_job": -1}, "--gpus-per-job must not be negative, got -1"),
    ({"methods": []}, "--methods is empty: name at least one"),
    ({"games": []}, "--games is empty"),
    ({"seeds": []}, "--seeds is empty"),
])
def test_sweep_rejects_bad_settings_in_one_line(tmp_path, settings, message):
    with pytest.raises(sweep.UsageError, match=message):
        sweep.main(sweep_args(tmp_path, dry_run=True, **settings))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()


def test_sweep_refuses_a_root_that_is_a_file_and_track_without_wandb(tmp_path, monkeypatch):
    (tmp_path / "notes.md").write_text("")
    with pytest.raises(sweep.UsageError, match="--root .*notes.md is a file, not a directory"):
        sweep.main(sweep_args(tmp_path / "notes.md", dry_run=True))
    real_find_spec = sweep.run_utils.importlib.util.find_spec
    monkeypatch.setattr(sweep.run_utils.importlib.util, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name))
    with pytest.raises(sweep.UsageError, match="--flags --track needs Weights & Biases"):  # before, every job failed
        sweep.main(sweep_args(tmp_path, flags="--track", dry_run=True))


def test_a_game_or_seed_named_twice_is_one_job(tmp_path):
    jobs = sweep.make_jobs(sweep_args(tmp_path, games=["bigfish", "bigfish"], seeds=[1, 2, 1]))
    assert [job.name for job in jobs] == ["bigfish__ppo__1", "bigfish__ppo__2"]


@pytest.mark.parametrize("name", ["jobs", "time_min", "cpus_per_job", "max_parallel", "signal_delay_s"])
def test_sweep_rejects_non_positive_settings(tmp_path, name):
    with pytest.raises(sweep.UsageError, match=f"--{name.replace('_', '-')} must be positive, got 0"):
        sweep.main(sweep_args(tmp_path, **{name: 0}))


@pytest.mark.parametrize("gb", [0.0, -1.0, 0.0009, float("nan"), float("inf")])  # 0.0009 GB: Slurm's --mem=0, all
def test_sweep_rejects_a_memory_slurm_would_misread(tmp_path, gb):
    with pytest.raises(sweep.UsageError, match=f"--mem-gb-per-job must be a finite number of GB, at least 1/1024, got {gb}"):
        sweep.main(sweep_args(tmp_path, mem_gb_per_job=gb, dry_run=True))
    sweep.check_settings(sweep_args(tmp_path, mem_gb_per_job=1 / 1024))  # 1 MB: accepted


def test_sweep_checks_flags_against_every_game_not_only_the_first(tmp_path):
    with pytest.raises(sweep.UsageError, match="bigfish has no memory mode"):  # caveflyer has one
        sweep.main(sweep_args(tmp_path, games=["caveflyer", "bigfish"], flags="--distribution-mode memory"))


def test_without_flags_drops_each_named_flag_with_its_value():
    flags = ["--num-envs=4", "--num-steps", "32", "--total_timesteps", "64", "--ent-coef", "0.02"]
    assert sweep.without_flags(flags, {"--num-envs", "--total-timesteps"}) == ["--num-steps", "32",
                                                                               "--ent-coef", "0.02"]


def test_sweep_checks_flags_against_each_chosen_method(tmp_path):
    args = sweep_args(tmp_path, methods=["ppo", "mdpo"], flags="--num-agents 3", dry_run=True)
    with pytest.raises(SystemExit) as error:  # MDPO's flag: ppo.py does not know it
        sweep.main(args)
    assert error.value.code == 2
    args.methods = ["mdpo"]
    assert sweep.main(args) == 0


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, "sweep.py", "--root", str(tmp_path), "--games", "pong"],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(sweep.__file__)))
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown method or game 'pong'") and result.stderr.count("\n") == 1


def test_flags_may_follow_their_option_as_a_separate_argument(tmp_path):
    # docs/usage.md writes --flags "--bf16 --compile"; tyro alone would read "--bf16 --compile" as an option.
    import subprocess

    result = subprocess.run([sys.executable, "sweep.py", "--root", str(tmp_path), "--methods", "ppo", "--games", "bigfish",
                             "--seeds", "1", "--flags", "--num-envs 4 --ent-coef 0.02", "--dry-run"],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(sweep.__file__)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("--num-envs 4 --ent-coef 0.02")
    assert sweep.flags_attached(["--flags", "--bf16", "--jobs", "2"]) == ["--flags=--bf16", "--jobs", "2"]
    assert sweep.flags_attached(["--jobs", "2", "--flags"]) == ["--jobs", "2", "--flags"]  # tyro says what is missing
    for twice in (["--flags", "--bf16", "--flags", "--compile"], ["--flags=--bf16", "--flags", "--compile"]):
        with pytest.raises(sweep.UsageError, match="--flags is given more than once"):
            sweep.flags_attached(twice)


def test_help_on_the_flags_of_a_method_is_help_not_a_traceback(tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, "sweep.py", "--root", str(tmp_path), "--methods", "ppo", "--flags", "--help"],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(sweep.__file__)))
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "ppo.py, in the sweep --flags" in result.stdout and "--num-envs" in result.stdout


# ---------------------------------------------------------------------------------------------
# Runs in use, diverged, preempted, made with other flags
# ---------------------------------------------------------------------------------------------


def test_a_run_in_use_by_a_training_process_is_skipped_and_left_as_it_is(tmp_path, fake_train, capsys):
    args = sweep_args(tmp_path)
    job, = sweep.make_jobs(args)
    write_run(job, checkpoint=False)  # stopped before its first checkpoint, to all appearances
    with held(os.path.join(job.run_dir, "lock")):
        assert job.state().kind == "locked"
        assert str(job()) == "locked: in use by node7:4242 (Slurm job 99_3)"
        assert sweep.main(args) == 0
        assert "bigfish__ppo__1: locked: in use by node7:4242 (Slurm job 99_3)" in capsys.readouterr().out
    assert sorted(os.listdir(job.run_dir)) == ["config.json", "lock"]  # not replaced, not trained


def test_a_run_claimed_by_another_sweep_is_skipped(tmp_path, fake_train):
    job, = sweep.make_jobs(sweep_args(tmp_path))
    write_run(job, checkpoint=False)
    with held(job.claim_path):
        assert job.state().kind == "locked"
        assert job().kind == "locked"
    assert sorted(os.listdir(job.run_dir)) == ["config.json"]
    assert job().kind == "trained"  # released: the unfinished run starts afresh
    assert os.path.isfile(os.path.join(job.run_dir, "argv.json"))


def test_a_diverged_run_is_reported_and_never_rerun(tmp_path, fake_train, capsys):
    args = sweep_args(tmp_path)
    fake_train(args, mode="diverge")
    assert sweep.main(args) == 1
    assert "bigfish__ppo__1: diverged: diverged at iteration 7: agent 1's loss is nan" in capsys.readouterr().out
    job, = sweep.make_jobs(args)
    os.remove(os.path.join(job.run_dir, "argv.json"))
    write_run(job, finished=False)  # its last good checkpoint
    fake_train(args, mode="0")
    assert sweep.main(args) == 1
    out = capsys.readouterr().out
    assert "bigfish__ppo__1: diverged: diverged at iteration 7: agent 1's loss is nan; not rerun" in out
    assert "0 to run, 1 skipped" in out
    assert not os.path.exists(os.path.join(job.run_dir, "argv.json"))


def test_a_diverging_job_says_where(tmp_path, fake_train):
    job, = fake_train(sweep_args(tmp_path), mode="diverge")
    outcome = job()
    assert outcome.kind == "diverged" and outcome.detail.startswith("diverged at iteration 7: agent 1's loss is nan")


def test_a_finished_run_made_with_other_flags_is_reported_not_overwritten(tmp_path, fake_train, capsys):
    args = sweep_args(tmp_path)
    job, = sweep.make_jobs(args)
    write_run(job, config_args={**job.expected, "num_steps": 16})
    assert sweep.main(args) == 1
    out = capsys.readouterr().out
    assert (f"bigfish__ppo__1: mismatch: {job.run_dir} was made with other flags "
            "(--num-steps is 16 in the run, 32 here)") in out
    assert "0 to run" in out
    assert json.load(open(os.path.join(job.run_dir, "config.json")))["args"]["num_steps"] == 16
    assert not os.path.exists(os.path.join(job.run_dir, "argv.json"))
    args.dry_run = True
    assert sweep.main(args) == 1


def test_a_run_of_another_version_of_the_script_is_a_mismatch(tmp_path):
    ppo_job, mdpo_job = sweep.make_jobs(sweep_args(tmp_path, methods=["ppo", "mdpo"]))
    write_run(ppo_job, config_args={**ppo_job.expected, "augment": "none"})  # a flag this ppo.py does not have
    assert ppo_job.state().kind == "mismatch" and "another version of ppo.py (its flags differ: augment)" in ppo_job.state().detail
    write_run(mdpo_job, config_args={k: v for k, v in mdpo_job.expected.items() if k != "num_agents"})
    assert mdpo_job.state().kind == "mismatch" and "(its flags differ: num_agents)" in mdpo_job.state().detail
    write_run(ppo_job, config_args=ppo_job.expected)
    assert ppo_job.state().kind == "done"


def test_another_script_never_matches(tmp_path):
    l2_job, mdpo_job = sweep.make_jobs(sweep_args(tmp_path, methods=["ppo_l2", "mdpo"]))
    config = {"script": "ppo", "args": mdpo_job.expected}
    assert sweep.config_difference(config, mdpo_job.expected, "mdpo") == "it was made by ppo.py, not mdpo.py"


def test_resumable_fields_may_differ_and_a_run_is_extended_not_shortened(tmp_path):
    job, = sweep.make_jobs(sweep_args(tmp_path))
    write_run(job, config_args={**job.expected, "eval_interval": 3, "cuda": True, "run_dir": "elsewhere"})
    assert job.state().kind == "done"
    write_run(job, config_args={**job.expected, "total_timesteps": 64, "num_iterations": 2})
    assert job.state().kind == "resume"
    write_run(job, config_args={**job.expected, "total_timesteps": 256})
    assert job.state().kind == "mismatch" and "--total-timesteps is 256 in the run, 128 here" in job.state().detail


def test_a_run_with_a_checkpoint_is_resumed_and_one_of_other_flags_is_never_started(tmp_path, fake_train):
    job, = fake_train(sweep_args(tmp_path))
    write_run(job, finished=False)
    assert job().kind == "resumed"
    assert "--resume" in json.load(open(os.path.join(job.run_dir, "argv.json")))
    job, = fake_train(sweep_args(tmp_path / "other"))
    write_run(job, config_args={**job.expected, "num_steps": 16})  # what a requeued Slurm job may find
    assert job().kind == "mismatch" and not os.path.exists(os.path.join(job.run_dir, "argv.json"))


def test_a_second_claim_on_a_run_is_refused_and_names_the_owner(tmp_path):
    path = str(tmp_path / "locks" / "bigfish__ppo__1")
    first, owner = sweep.take_lock(path)
    assert first is not None and owner is None
    second, owner = sweep.take_lock(path)  # flock belongs to the open file: refused within one process too
    assert second is None and owner.endswith(f":{os.getpid()}")  # host:pid
    first.close()
    third, _ = sweep.take_lock(path)
    assert third is not None
    third.close()


def test_a_run_without_checkpoint_and_not_in_use_starts_afresh(tmp_path, fake_train):
    job, = sweep.make_jobs(sweep_args(tmp_path))
    write_run(job, checkpoint=False)
    open(os.path.join(job.run_dir, "events.out.tfevents.1"), "w").close()
    assert job.state().kind == "new"
    assert job().kind == "trained"
    assert sorted(os.listdir(job.run_dir)) == ["argv.json", "lock"]
    assert "--run-dir" in json.load(open(os.path.join(job.run_dir, "argv.json")))


@pytest.mark.parametrize("finished", [True, False])
def test_a_run_whose_checkpoint_was_removed_is_never_deleted(tmp_path, fake_train, capsys, finished):
    args = sweep_args(tmp_path)
    job, = sweep.make_jobs(args)
    write_run(job, finished=finished)
    os.remove(os.path.join(job.run_dir, "checkpoint.pt"))  # removed to save space, or an exported run copied in
    before = sorted(os.listdir(job.run_dir))
    if finished:  # status.json says it reached the end: nothing left to do
        assert job.state().kind == "done" and job().kind == "done"
        assert sweep.main(args) == 0
    else:
        assert job.state().kind == job().kind == "no checkpoint"
        assert sweep.main(args) == 1
        assert f"bigfish__ppo__1: no checkpoint: {job.run_dir} holds a run without its checkpoint.pt, not finished " \
               f"at --total-timesteps {job.expected['total_timesteps']:,}; left as it is" in capsys.readouterr().out
    assert sorted(os.listdir(job.run_dir)) == before


def test_a_failed_job_says_why_in_one_line(tmp_path, fake_train, capsys):
    args = sweep_args(tmp_path)
    job, = fake_train(args, mode="2")
    with pytest.raises(sweep.JobFailed, match=r"^bigfish__ppo__1 failed \(exit 2\): error: fake failure; see "):
        job()
    assert sweep.main(args) == 1
    out = capsys.readouterr().out
    assert "bigfish__ppo__1: failed: bigfish__ppo__1 failed (exit 2): error: fake failure; see" in out


# ---------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM])
def test_a_stop_signal_reaches_the_training_process_before_submitit_requeues(tmp_path, fake_train, monkeypatch, signum):
    monkeypatch.setenv("FAKE_SIGNAL", str(int(signum)))
    job, = fake_train(sweep_args(tmp_path), mode="preempt")
    checkpoint = os.path.join(job.run_dir, "checkpoint.pt")
    requeued = []  # stands in for submitit's handler: it must run after the training process checkpointed

    def submitit_handler(sig, frame):
        requeued.append((sig, os.path.exists(checkpoint)))

    previous = signal.signal(signum, submitit_handler)
    try:
        outcome = job()
        assert signal.getsignal(signum) is submitit_handler  # the job put submitit's handler back
    finally:
        signal.signal(signum, previous)
    assert outcome.kind == "preempted"
    assert requeued == [(signum, True)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])
def test_a_job_stopped_before_its_training_process_starts_is_requeued_too(tmp_path, fake_train, monkeypatch, signum):
    job, = fake_train(sweep_args(tmp_path), mode="0")
    real_run = sweep.FORWARDER.run

    def signalled_first(*args):  # the signal lands after the forwarder is installed, before the command starts
        os.kill(os.getpid(), signum)
        return real_run(*args)

    monkeypatch.setattr(sweep.FORWARDER, "run", signalled_first)
    requeued = []
    previous = signal.signal(signum, lambda sig, frame: requeued.append(sig))  # submitit's handler
    try:
        outcome = job()
    finally:
        signal.signal(signum, previous)
    assert outcome.kind == "not started" and requeued == [signum]


def test_a_stop_signal_arriving_as_the_training_process_starts_still_reaches_it(tmp_path, monkeypatch):
    real_popen = subprocess.Popen

    class SignalledAsItStarts(real_popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sweep.FORWARDER.received = signal.SIGTERM  # after run()'s first check, before the child is registered

    monkeypatch.setattr(sweep.FORWARDER, "received", None)
    monkeypatch.setattr(sweep.subprocess, "Popen", SignalledAsItStarts)
    with open(tmp_path / "log", "w") as log:
        code = sweep.FORWARDER.run([sys.executable, "-c", "import time; time.sleep(20)"], log, dict(os.environ))
    assert code == -signal.SIGTERM


def test_a_stop_signal_to_the_local_sweep_stops_its_jobs_and_starts_no_more(tmp_path, fake_train, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SIGNAL", str(int(signal.SIGTERM)))
    args = sweep_args(tmp_path, seeds=[1, 2, 3])
    fake_train(args, mode="preempt")
    assert sweep.main(args) == 1
    out = capsys.readouterr().out
    assert out.count(": preempted: stopped by a signal (exit 4)") == 1
    jobs = sweep.make_jobs(args)
    assert [os.path.exists(job.run_dir) for job in jobs] == [True, False, False]
    assert [os.path.exists(job.log_path) for job in jobs] == [True, False, False]  # not even tried


def test_stop_after_min_stops_the_running_jobs_as_stopped_and_starts_no_more(tmp_path, fake_train, capsys):
    args = sweep_args(tmp_path, seeds=[1, 2, 3], jobs=2, stop_after_min=0.05)  # 3 s
    fake_train(args, mode="wait")
    assert sweep.main(args) == 1  # the third job never started: not what was asked for
    out = capsys.readouterr().out
    assert out.count(": stopped: at the --stop-after-min budget (exit 4)") == 2
    assert "bigfish__ppo__3: not started: the --stop-after-min budget ran out" in out
    jobs = sweep.make_jobs(args)
    assert [os.path.exists(os.path.join(job.run_dir, "checkpoint.pt")) for job in jobs] == [True, True, False]


def test_stop_after_min_with_every_job_running_is_a_success(tmp_path, fake_train, capsys):
    args = sweep_args(tmp_path, methods=["ppo", "mdpo"], seeds=[1], jobs=2, stop_after_min=0.05)
    fake_train(args, mode="wait")
    assert sweep.main(args) == 0
    assert capsys.readouterr().out.count(": stopped: at the --stop-after-min budget") == 2


@pytest.mark.parametrize("settings, message", [
    ({"stop_after_min": 0.0}, "--stop-after-min must be positive and finite, got 0.0"),
    ({"stop_after_min": float("nan")}, "--stop-after-min must be positive and finite, got nan"),
    ({"stop_after_min": float("inf")}, "--stop-after-min must be positive and finite, got inf"),
    ({"stop_after_min": 5.0, "launcher": "slurm"}, "--stop-after-min is for the local launcher"),
    ({"stop_after_min": 5.0, "launcher": "submitit-local"}, "--stop-after-min is for the local launcher")])
def test_stop_after_min_is_refused_where_it_cannot_work(tmp_path, settings, message):
    with pytest.raises(sweep.UsageError, match=message):
        sweep.main(sweep_args(tmp_path, **settings))


# ---------------------------------------------------------------------------------------------
# GPUs and concurrency
# ---------------------------------------------------------------------------------------------


class RecordingJob:
    def __init__(self, name, log, together=None):
        self.name, self.log, self.together = name, log, together

    def __call__(self, env=None):
        self.log.append(dict(env or {}))
        if self.together:  # a threading.Barrier: the workers' jobs must be running at the same time
            self.together.wait(timeout=10)
        return sweep.Outcome("trained")


def test_local_jobs_use_the_inherited_cuda_visible_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert sweep.job_gpus(sweep_args(tmp_path)) == ["2", "3"]
    log, together = [], threading.Barrier(2)  # each of the 2 workers holds a job until the other does
    outcomes = sweep.run_local([RecordingJob(f"job{i}", log, together) for i in range(4)], sweep_args(tmp_path, jobs=2))
    assert [o.kind for o in outcomes] == ["trained"] * 4
    assert sorted(env["CUDA_VISIBLE_DEVICES"] for env in log) == ["2", "2", "3", "3"]  # a GPU per worker
    with pytest.raises(sweep.UsageError, match="--gpus 0 is not among CUDA_VISIBLE_DEVICES=2,3"):
        sweep.job_gpus(sweep_args(tmp_path, gpus=["0"]))
    assert sweep.job_gpus(sweep_args(tmp_path, gpus=["3"])) == ["3"]
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: type("Done", (), {"stdout": "GPU 0: x\nGPU 1: y\n"}))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hides every GPU, even those nvidia-smi lists
    assert sweep.job_gpus(sweep_args(tmp_path)) == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert sweep.job_gpus(sweep_args(tmp_path)) == ["0", "1"]
    assert sweep.job_gpus(sweep_args(tmp_path, gpus=["1", "GPU-8f2a"])) == ["1", "GPU-8f2a"]  # a UUID passes as given
    with pytest.raises(sweep.UsageError, match="--gpus 7: nvidia-smi lists GPUs 0 to 1 only"):
        sweep.job_gpus(sweep_args(tmp_path, gpus=["0", "7"]))


def test_local_jobs_share_the_cores_unless_the_user_set_their_threads(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(sweep.os, "sched_getaffinity", lambda pid: set(range(8)))
    log = []
    sweep.run_local([RecordingJob(f"job{i}", log) for i in range(5)], sweep_args(tmp_path, jobs=3, gpus=[]))
    assert [env.get("OMP_NUM_THREADS") for env in log] == ["2"] * 5  # 8 cores // 3 jobs at once
    log.clear()
    sweep.run_local([RecordingJob(f"job{i}", log) for i in range(2)], sweep_args(tmp_path, jobs=4, gpus=[]))
    assert [env.get("OMP_NUM_THREADS") for env in log] == ["4"] * 2  # only 2 jobs, so 2 at once
    log.clear()
    sweep.run_local([RecordingJob(f"job{i}", log) for i in range(2)], sweep_args(tmp_path, jobs=1, gpus=[]))
    assert log == [{}, {}]  # one at a time: torch's own default, every core
    monkeypatch.setattr(sweep.os, "sched_getaffinity", lambda pid: {0})
    assert sweep.cpu_share(2) == "1"  # never 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice: the jobs inherit it as it is
    log.clear()
    sweep.run_local([RecordingJob(f"job{i}", log) for i in range(2)], sweep_args(tmp_path, jobs=2, gpus=[]))
    assert log == [{}, {}]


class FakeExecutor:
    """submitit's local executor as far as the sweep uses it: a job starts when it is submitted."""

    def __init__(self, folder):
        self.parameters, self.started, self.collected, self.running, self.most_running = {}, [], [], 0, 0
        FakeExecutor.last = self

    def update_parameters(self, **kw):
        self.parameters.update(kw)

    def submit(self, job, env):
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self.started.append((job.name, dict(self.parameters), env))
        executor = self

        class Handle:
            def result(self):
                executor.running -= 1
                executor.collected.append(job.name)
                return job(env)

        return Handle()


def test_submitit_local_runs_at_most_jobs_at_once_on_the_visible_gpus(tmp_path, monkeypatch):
    import submitit

    monkeypatch.setattr(submitit, "LocalExecutor", FakeExecutor)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    pools = []

    def run_pool(jobs, slots, gpus, start):
        def start_and_check(job, env):
            outcome = start(job, env)
            assert job.name in FakeExecutor.last.collected  # the slot is free again only once the job ended
            return outcome

        pools.append(slots)
        return real_run_pool(jobs, slots, gpus, start_and_check)

    real_run_pool = sweep.run_pool
    monkeypatch.setattr(sweep, "run_pool", run_pool)
    log = []
    jobs = [RecordingJob(f"job{i}", log) for i in range(5)]
    outcomes = sweep.run_submitit_local(jobs, sweep_args(tmp_path, jobs=2, launcher="submitit-local"))
    executor = FakeExecutor.last
    assert [o.kind for o in outcomes] == ["trained"] * 5 and len(executor.started) == 5
    assert pools == [2] and executor.most_running <= 2
    for name, parameters, env in executor.started:
        assert parameters["gpus_per_node"] == 1
        assert parameters["visible_gpus"] == (int(env["CUDA_VISIBLE_DEVICES"]),)
        assert env["CUDA_VISIBLE_DEVICES"] in ("2", "3")


class EnvRecordingJob:
    """A job submitit can run in its own process: writes the env it was given beside what that process sees."""

    def __init__(self, name, path):
        self.name, self.path = name, path

    def __call__(self, env):
        with open(self.path, "w") as file:
            json.dump({"given": env, "seen": os.environ.get("CUDA_VISIBLE_DEVICES")}, file)
        return sweep.Outcome("trained")


def test_submitit_local_runs_jobs_with_the_real_submitit(tmp_path, monkeypatch):
    # The fake above accepts any parameter; the real local executor is what refused one before.
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests_dir, os.path.dirname(tests_dir)]))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(sweep.os, "sched_getaffinity", lambda pid: set(range(4)))
    jobs = [EnvRecordingJob(f"job{i}", str(tmp_path / f"job{i}.json")) for i in range(2)]
    outcomes = sweep.run_submitit_local(jobs, sweep_args(tmp_path, jobs=2, gpus=[], launcher="submitit-local"))
    assert [o.kind for o in outcomes] == ["trained", "trained"]
    for i in range(2):
        record = json.load(open(tmp_path / f"job{i}.json"))
        assert record == {"given": {"OMP_NUM_THREADS": "2"}, "seen": ""}  # no GPU given: submitit hides them all


class FakeSlurmExecutor:
    """submitit's Slurm executor as far as the sweep uses it: parameters, a batch (a job array), submit."""

    def __init__(self, folder, cluster):
        assert cluster == "slurm"
        self.parameters, self.submitted, self.in_batch = {}, [], False
        FakeSlurmExecutor.last = self

    def update_parameters(self, **kw):
        from submitit.auto.auto import AutoExecutor
        from submitit.slurm.slurm import SlurmExecutor

        # The names submitit's AutoExecutor accepts: a wrong one (account= for slurm_account=) is an error there.
        known = AutoExecutor._valid_parameters() | {f"slurm_{name}" for name in SlurmExecutor._valid_parameters()}
        assert set(kw) <= known, set(kw) - known
        self.parameters.update(kw)

    @contextlib.contextmanager
    def batch(self):
        self.in_batch, handles = True, []
        self.handles = handles
        yield
        self.in_batch = False
        for i, handle in enumerate(handles):  # as submitit: the array's ids exist once the batch is submitted
            handle.job_id = f"77_{i}"

    def submit(self, job):
        assert self.in_batch  # one array, so that --max-parallel bounds it
        self.submitted.append(job)
        self.handles.append(type("Handle", (), {})())
        return self.handles[-1]


def test_a_submission_slurm_refuses_is_one_line(tmp_path, monkeypatch):
    import submitit
    from submitit.core.utils import FailedJobError

    class RefusingExecutor(FakeSlurmExecutor):
        @contextlib.contextmanager
        def batch(self):  # submitit runs sbatch as the batch closes
            self.in_batch, self.handles = True, []
            yield
            raise FailedJobError("sbatch: error: Batch job submission failed: Invalid partition name specified")

    monkeypatch.setattr(submitit, "AutoExecutor", RefusingExecutor)
    with pytest.raises(sweep.UsageError, match="^Slurm refused the jobs: sbatch: error: Batch job submission failed: "
                                               "Invalid partition name specified$"):
        sweep.run_slurm([RecordingJob("job0", [])], sweep_args(tmp_path, launcher="slurm", partition="nope"))


def test_slurm_gets_the_sweeps_resources_and_the_signal_delay_in_one_array(tmp_path, monkeypatch, capsys):
    import submitit

    monkeypatch.setattr(submitit, "AutoExecutor", FakeSlurmExecutor)
    jobs = [RecordingJob(f"job{i}", []) for i in range(3)]
    args = sweep_args(tmp_path, launcher="slurm", partition="gpu", time_min=600, gpus_per_job=2, cpus_per_job=6,
                      max_parallel=5, signal_delay_s=240)
    assert sweep.run_slurm(jobs, args) == []
    executor = FakeSlurmExecutor.last
    assert executor.submitted == jobs
    assert {key: executor.parameters[key] for key in ("timeout_min", "slurm_partition", "gpus_per_node",
                                                      "cpus_per_task", "slurm_array_parallelism",
                                                      "slurm_signal_delay_s")} == {
        "timeout_min": 600, "slurm_partition": "gpu", "gpus_per_node": 2, "cpus_per_task": 6,
        "slurm_array_parallelism": 5, "slurm_signal_delay_s": 240}
    assert "submitted 3 jobs to slurm; job ids 77_0 ... 77_2" in capsys.readouterr().out
    assert "mem_gb" not in executor.parameters and "slurm_account" not in executor.parameters  # the cluster's defaults


def test_slurm_gets_the_sweeps_memory_and_account_when_given(tmp_path, monkeypatch):
    import submitit

    monkeypatch.setattr(submitit, "AutoExecutor", FakeSlurmExecutor)
    sweep.run_slurm([RecordingJob("job", [])], sweep_args(tmp_path, launcher="slurm", mem_gb_per_job=24.5, account="rl-lab"))
    assert FakeSlurmExecutor.last.parameters["mem_gb"] == 24.5
    assert FakeSlurmExecutor.last.parameters["slurm_account"] == "rl-lab"


# ---------------------------------------------------------------------------------------------
# Real training, tiny
# ---------------------------------------------------------------------------------------------


def test_sweep_runs_skips_finished_and_resumes_extended_jobs(tmp_path, capsys):
    args = sweep_args(tmp_path, methods=["ppo", "mdpo"], jobs=2)
    assert sweep.main(args) == 0
    jobs = sweep.make_jobs(args)
    assert [job.state().kind for job in jobs] == ["done", "done"]
    for job in jobs:
        assert json.load(open(os.path.join(job.run_dir, "status.json")))["global_step"] == 128
        assert run_data.method_of(json.load(open(os.path.join(job.run_dir, "config.json")))) == job.method

    capsys.readouterr()
    assert sweep.main(args) == 0
    assert "2 already finished, 0 to run" in capsys.readouterr().out

    args.flags = TINY_FLAGS.replace("--total-timesteps 128", "--total-timesteps 256")
    assert [job.state().kind for job in sweep.make_jobs(args)] == ["resume", "resume"]
    job = sweep.make_jobs(args)[0]
    assert "--resume" in job.command(job.state().kind)
    capsys.readouterr()
    assert sweep.main(args) == 0
    assert "2 jobs, 0 already finished, 2 to run (2 from their checkpoints)\n" in capsys.readouterr().out
    for job in sweep.make_jobs(args):
        assert json.load(open(os.path.join(job.run_dir, "status.json")))["global_step"] == 256


@pytest.mark.parametrize("script", ["ppo", "mdpo"])
def test_an_extension_killed_before_its_first_checkpoint_is_resumed_not_done(tmp_path, monkeypatch, script):
    # The resume rewrites config.json with the new total at once; status.json must not go on saying finished.
    module = __import__(script)
    without_evaluation(module, monkeypatch)
    args = sweep_args(tmp_path, methods=[script])
    job, = sweep.make_jobs(args)
    module.main(module.Args(**{**job.expected, "run_dir": job.run_dir}))  # 128 steps, finished
    args.flags = TINY_FLAGS.replace("--total-timesteps 128", "--total-timesteps 256")
    job, = sweep.make_jobs(args)

    def killed(*_, **__):  # Ctrl-C here; SIGKILL, an OOM or a lost node leave the same files
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "update", killed)
    with pytest.raises(SystemExit):
        module.main(module.Args(**{**job.expected, "resume": job.run_dir}))
    status = json.load(open(os.path.join(job.run_dir, "status.json")))
    assert status == {"global_step": 128, "iteration": 1, "finished": False}
    assert job.state().kind == "resume"


def test_a_run_whose_status_is_short_of_the_jobs_iterations_is_resumed_whatever_it_says(tmp_path):
    # config.json with the new total beside the shorter run's status.json (a resume killed as it began)
    job, = sweep.make_jobs(sweep_args(tmp_path, flags=TINY_FLAGS.replace("--total-timesteps 128",
                                                                          "--total-timesteps 256")))
    write_run(job, finished=True)  # iteration 1 of the job's 2
    assert job.expected["num_iterations"] == 2 and job.state().kind == "resume"


def test_a_signal_after_a_time_boxed_sweep_is_reported_as_preempted(tmp_path, fake_train, monkeypatch, capsys):
    args = sweep_args(tmp_path / "a", stop_after_min=0.05)
    fake_train(args, mode="wait")
    assert sweep.main(args) == 0
    monkeypatch.setenv("FAKE_SIGNAL", str(int(signal.SIGTERM)))
    args = sweep_args(tmp_path / "b")
    fake_train(args, mode="preempt")
    assert sweep.main(args) == 1
    assert ": preempted: stopped by a signal (exit 4)" in capsys.readouterr().out


@pytest.mark.parametrize("code, kind", [(4, "stopped"), (-15, "stopped"), (1, None)])
def test_at_the_budget_only_a_checkpointed_or_killed_run_counts_as_stopped(tmp_path, fake_train, monkeypatch, code, kind):
    job, = fake_train(sweep_args(tmp_path))
    monkeypatch.setattr(sweep.FORWARDER, "out_of_time", True)
    monkeypatch.setattr(sweep.FORWARDER, "received", signal.SIGTERM)
    monkeypatch.setattr(sweep.FORWARDER, "run", lambda *a: code)
    if kind is None:
        with pytest.raises(sweep.JobFailed):
            job.train("new", None)
    else:
        assert job.train("new", None).kind == kind


def test_a_run_killed_by_no_signal_of_ours_failed(tmp_path, fake_train, monkeypatch):
    # e.g. the kernel's OOM killer: a negative exit with no stop signal forwarded and no budget run out
    job, = fake_train(sweep_args(tmp_path))
    monkeypatch.setattr(sweep.FORWARDER, "received", None)  # (a sweep before may have left its own)
    monkeypatch.setattr(sweep.FORWARDER, "out_of_time", False)
    monkeypatch.setattr(sweep.FORWARDER, "run", lambda *a: -9)
    with pytest.raises(sweep.JobFailed, match=r"failed \(exit -9\)"):
        job.train("new", None)


def test_stop_after_min_is_minutes(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(sweep, "run_pool", lambda jobs, slots, gpus, start, stop_after_s=None: seen.append(stop_after_s))
    sweep.run_local([], sweep_args(tmp_path, stop_after_min=2.5))
    assert seen == [150.0]


def test_a_sweep_that_ends_before_its_budget_leaves_no_timer_behind(tmp_path, fake_train):
    args = sweep_args(tmp_path, stop_after_min=0.5)
    fake_train(args, mode="0")
    assert sweep.main(args) == 0
    pending = [t for t in threading.enumerate() if isinstance(t, threading.Timer) and not t.finished.is_set()]
    for t in pending:
        t.cancel()  # so that a failure does not hold pytest's exit for the budget
    assert not pending


def test_jobs_the_budget_left_unstarted_say_why(tmp_path, fake_train):
    args = sweep_args(tmp_path, seeds=[1, 2, 3], jobs=2, stop_after_min=0.05)
    outcomes = sweep.run_local(fake_train(args, mode="wait"), args)
    assert [o.kind for o in outcomes] == ["stopped", "stopped", "not started"]
    assert outcomes[2].detail == "the --stop-after-min budget ran out"


def test_the_budget_does_not_relabel_runs_an_outside_signal_already_stopped(monkeypatch):
    forwarder = sweep.SignalForwarder()
    forwarder.received = signal.SIGTERM  # e.g. Slurm's, before the budget ran out
    forwarder.stop_for_time()
    assert forwarder.out_of_time is False


@pytest.mark.parametrize("flags", ["--run-dir elsewhere", "--run_dir=elsewhere", "--resume elsewhere",
                                   "--env-id starpilot", "--l2-coef 1e-3", "--drac-coef 0.2"])
def test_flags_that_would_move_or_relabel_every_job_are_refused(tmp_path, flags):
    name = flags.split()[0].split("=")[0].replace("_", "-")
    with pytest.raises(sweep.UsageError, match=f"must not set {name}"):
        # dry: a sweep that let the flag through must not train
        sweep.main(sweep_args(tmp_path, methods=["ppo", "ppo_l2", "ppo_drac_crop"], flags=f"{TINY_FLAGS} {flags}",
                              dry_run=True))
    assert not (tmp_path / "runs").exists()
