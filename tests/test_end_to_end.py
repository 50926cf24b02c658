"""Tiny real runs of both scripts: event files, checkpoints, resume, and bad input."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import drac
import mdpo
import ppo
import run_utils
from helpers import CUDA_MARKS, ROOT

COMMON_TAGS = {
    "charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
    "losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
    "losses/explained_variance", "eval/test_return", "eval/train_return", "eval/generalization_gap",
}
TINY = dict(num_envs=4, num_steps=32, num_minibatches=2, update_epochs=2, eval_episodes=2, eval_interval=2,
            checkpoint_interval=1, cuda=False)


def scalars(event_dir):
    accumulator = EventAccumulator(event_dir)
    accumulator.Reload()
    return {tag: [event.step for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def returns(event_dir, tag):
    accumulator = EventAccumulator(event_dir)
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def event_dirs(module, run_dir):
    if module is not mdpo:
        return [run_dir]
    return [os.path.join(run_dir, "agent1"), os.path.join(run_dir, "agent2")]


@pytest.mark.parametrize("module", [ppo, drac, mdpo])
@pytest.mark.parametrize("game", ["bigfish", "starpilot"])
def test_tiny_run_writes_every_tag_and_a_checkpoint(module, game, tmp_path):
    run_dir = str(tmp_path / "run")
    capture_video = game == "bigfish"
    module.main(module.Args(env_id=game, total_timesteps=256, run_dir=run_dir, capture_video=capture_video, **TINY))
    expected = COMMON_TAGS | {mdpo: {"losses/mutual_kl"}, drac: {"losses/drac_pi", "losses/drac_v"}}.get(module, set())
    for event_dir in event_dirs(module, run_dir):
        steps = scalars(event_dir)
        assert expected <= set(steps), expected - set(steps)
        assert steps["charts/SPS"] == [128, 256]
        assert steps["eval/test_return"] == [256]
        if capture_video:
            accumulator = EventAccumulator(event_dir)
            accumulator.Reload()
            assert accumulator.Tags()["images"] == ["eval/video"]
    if capture_video:
        gifs = os.listdir(os.path.join(run_dir, "videos"))
        assert len(gifs) == len(event_dirs(module, run_dir)) and all(g.endswith("_256.gif") for g in gifs)
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert checkpoint["script"] == module.SCRIPT and checkpoint["global_step"] == 256
    # SPEC: Adam, eps 1e-5, one group over every agent's parameters, no learning-rate annealing (after 2 of 2
    # iterations cleanrl's annealing would have halved it)
    (group,) = checkpoint["optimizer"]["param_groups"]
    assert group["lr"] == 5e-4 and group["eps"] == 1e-5
    assert len(group["params"]) == len(event_dirs(module, run_dir)) * len(list(module.Agent().parameters()))
    # The run's own stream says what it trained on, with the commit of the scripts.
    (step, machine), = machine_texts(run_dir)
    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    cores, machine_cores = len(os.sched_getaffinity(0)), os.cpu_count()
    cpu = f"CPU, {cores} cores" if cores == machine_cores else f"CPU, {cores} of {machine_cores} cores"
    assert step == 0 and machine.startswith(f"{cpu}; torch {torch.__version__}; Python ")
    assert re.search(r"; commit (\w{7}(\+changes)?|unknown)$", machine)
    if head.returncode == 0:
        assert f"; commit {head.stdout.strip()}" in machine


def machine_texts(run_dir):
    accumulator = EventAccumulator(run_dir, size_guidance={"tensors": 0})
    accumulator.Reload()
    return [(event.step, event.tensor_proto.string_val[0].decode()) for event in
            accumulator.Tensors("machine/text_summary")]


@pytest.mark.parametrize("cuda", [False, pytest.param(True, marks=CUDA_MARKS)])
@pytest.mark.parametrize("module", [ppo, drac, mdpo])
def test_resumed_run_continues_exactly_where_it_stopped(module, cuda, tmp_path):
    """Two iterations straight equal one iteration, a stop, and a resume: same weights, same steps.

    On CUDA this covers the graphed policy too: building its graph must not move the random stream.
    """
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    # Every baseline's state at once: L2, dropout masks and UCB-DrAC's bandit must all resume exactly.
    extra = {"l2_coef": 1e-4, "dropout": 0.1, **({"augment": "ucb", "drac_coef": 0.1} if module is drac else {})}
    extra["cuda"] = cuda
    module.main(module.Args(env_id="bigfish", total_timesteps=256, run_dir=straight, **{**TINY, **extra}))
    module.main(module.Args(env_id="bigfish", total_timesteps=128, run_dir=stopped, **{**TINY, **extra}))
    saved = json.load(open(os.path.join(stopped, "config.json")))["args"]
    resumed = module.Args(**{**saved, "resume": stopped, "total_timesteps": 256})
    module.main(resumed)

    a = torch.load(os.path.join(straight, "checkpoint.pt"), weights_only=False, map_location="cpu")
    b = torch.load(os.path.join(stopped, "checkpoint.pt"), weights_only=False, map_location="cpu")
    assert a["global_step"] == b["global_step"] == 256 and b["iteration"] == 2
    a_params, b_params = run_utils.agent_weights(a), run_utils.agent_weights(b)
    for sa, sb in zip(a_params, b_params):
        for name in sa:
            assert torch.equal(sa[name], sb[name]), name
    for event_dir in event_dirs(module, stopped):
        assert scalars(event_dir)["charts/SPS"] == [128, 256]


def run_cli(script, *flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("flags, fragments", [
    (["--env-id", "pacman"], ["unknown game 'pacman'", "starpilot", "bigfish"]),
    (["--num-envs", "6", "--num-steps", "5"], ["does not divide", "8 minibatches"]),
    (["--num-envs", "0"], ["--num-envs must be positive"]),
    (["--update-epochs", "-1"], ["--update-epochs must be positive"]),
    (["--num-envs", "1", "--num-steps", "8"], ["--norm-adv needs minibatches of at least 2 samples", "got 1"]),
    (["--resume", "/nonexistent/run"], ["does not exist"]),
])
def test_bad_input_fails_with_one_line(flags, fragments, tmp_path):
    result = run_cli("mdpo.py", "--run-dir", str(tmp_path / "run"), *flags)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "run").exists()


def test_bad_resumes_fail_and_overwrite_nothing(tmp_path):
    run_dir = str(tmp_path / "run")
    ppo.main(ppo.Args(env_id="starpilot", total_timesteps=128, run_dir=run_dir, **TINY))
    before = {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir) if name != "lock"}

    assert_one_line_error(run_cli("mdpo.py", "--resume", run_dir), "made by ppo.py")
    assert_one_line_error(run_cli("ppo.py", "--resume", run_dir, "--env-id", "coinrun"), "--env-id")
    assert_one_line_error(run_cli("ppo.py", "--resume", run_dir, "--num-envs", "2"), "--num-envs")
    # The same directory with other flags: continuing it would mix two configs in one run.
    assert_one_line_error(run_cli("ppo.py", "--run-dir", run_dir), "cannot resume: --num-envs is 4 in the run, 64 here")
    assert_one_line_error(run_cli("ppo.py", "--resume", str(tmp_path)), "holds no checkpoint")
    # A resume continues its run where it lies: another --run-dir would be silently ignored.
    assert_one_line_error(run_cli("ppo.py", "--resume", run_dir, "--run-dir", str(tmp_path / "other")),
                          f"--resume continues {run_dir} in place; leave out --run-dir")
    assert not (tmp_path / "other").exists()
    os.makedirs(tmp_path / "torn_run")
    (tmp_path / "torn_run" / "config.json").write_text(open(os.path.join(run_dir, "config.json")).read())
    (tmp_path / "torn_run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(run_cli("ppo.py", "--resume", str(tmp_path / "torn_run")), "checkpoint.pt is unreadable")
    for config, message in (("{torn", "config.json is unreadable"), ('{"script": "ppo"}', "not a run's config")):
        (tmp_path / "torn_run" / "config.json").write_text(config)
        assert_one_line_error(run_cli("ppo.py", "--resume", str(tmp_path / "torn_run")), message)
    after = {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir) if name != "lock"}
    assert before == after


def test_resume_with_no_other_flags_uses_the_saved_config(tmp_path):
    run_dir = str(tmp_path / "run")
    ppo.main(ppo.Args(env_id="starpilot", total_timesteps=128, run_dir=run_dir, num_levels=200, **TINY))
    result = run_cli("ppo.py", "--resume", run_dir, "--total-timesteps", "256")  # at the defaults it would be refused
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Warning" not in result.stderr
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["global_step"] == 256
    assert json.load(open(os.path.join(run_dir, "config.json")))["args"]["num_levels"] == 200


# A training process that presses Ctrl-C on itself at a chosen moment: just after the Nth checkpoint's
# rename, before its status.json is written (the worst moment), or inside the first update.
CTRL_C_RUN = """
import os, signal, sys, tyro
sys.path.insert(0, {root!r})
import {script} as script
import run_utils
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job's shell starts it ignored
where, nth = sys.argv[1], int(sys.argv[2])
real_write, real_update, checkpoints = run_utils.write_durably, script.update, []
def write_then_interrupt(path, write):
    real_write(path, write)
    if path.endswith("checkpoint.pt"):
        checkpoints.append(path)
        if where == "after-checkpoint-rename" and len(checkpoints) == nth:
            os.kill(os.getpid(), signal.SIGINT)
def update_then_interrupt(*args):
    if where == "in-update":
        os.kill(os.getpid(), signal.SIGINT)
    return real_update(*args)
run_utils.write_durably, script.update = write_then_interrupt, update_then_interrupt
script.main(tyro.cli(script.Args, args=sys.argv[3:]))
"""


def last_message(stderr):
    """The last line of stderr without the progress bar, which shares a line with the message and closes after it."""
    text = re.sub(r"\s*\d+%\|[^|]*\|[^\[\n]*\[[^\]\n]*\]", "\n", stderr.replace("\r", "\n"))
    return [line for line in text.splitlines() if line.strip()][-1]


def run_interrupted(script, where, nth, flags):
    return subprocess.run([sys.executable, "-c", CTRL_C_RUN.format(root=ROOT, script=script), where, str(nth), *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_ctrl_c_stops_cleanly_and_the_run_resumes(tmp_path):
    """Ctrl-C between the checkpoint's rename and status.json's waits for both: they agree, and the run resumes."""
    run_dir = str(tmp_path / "run")
    flags = ["--env-id", "starpilot", "--num-envs", "4", "--num-steps", "32", "--num-minibatches", "2",
             "--total-timesteps", str(128 * 4), "--checkpoint-interval", "1", "--eval-interval", "100",
             "--eval-episodes", "2", "--no-cuda", "--run-dir", run_dir]
    result = run_interrupted("mdpo", "after-checkpoint-rename", 2, flags)
    assert result.returncode == 130, result.stderr[-2000:]
    assert last_message(result.stderr) == f"interrupted; continue with: python mdpo.py --resume {run_dir}"
    status = os.path.join(run_dir, "status.json")
    assert json.load(open(status)) == {"global_step": 256, "iteration": 2, "finished": False}
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["iteration"] == 2

    result = run_cli("mdpo.py", "--resume", run_dir, "--total-timesteps", str(256 + 128))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.load(open(status)) == {"global_step": 384, "iteration": 3, "finished": True}


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    flags = ["--env-id", "starpilot", "--num-envs", "4", "--num-steps", "32", "--num-minibatches", "2",
             "--total-timesteps", "1000000", "--checkpoint-interval", "1000", "--no-cuda", "--run-dir",
             str(tmp_path / "run")]
    result = run_interrupted("ppo", "in-update", 1, flags)  # inside the training loop's first iteration
    assert result.returncode == 130, result.stderr[-2000:]
    assert last_message(result.stderr) == "interrupted before the first checkpoint (iteration 1000): nothing to resume"
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


def git(*command):
    return subprocess.run(["git", *command], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_source_commit_says_whether_tracked_files_changed(module):
    head = git("rev-parse", "--short=7", "HEAD")
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    changed = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    assert run_utils.source_commit() == head.stdout.strip() + ("+changes" if changed else "")


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_machine_description_names_the_gpu_model_and_counts_cores_not_threads(module, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert run_utils.machine_description(torch.device("cuda", 0)).startswith("NVIDIA H100 80GB HBM3; torch ")
    monkeypatch.setattr(run_utils.os, "sched_getaffinity", lambda pid: set(range(os.cpu_count())))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_utils.machine_description(torch.device("cpu")).startswith(f"CPU, {os.cpu_count()} cores;")
    finally:
        torch.set_num_threads(threads)
    # A Slurm job or taskset given 4 of the machine's 64 cores: the run says both.
    monkeypatch.setattr(run_utils.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(run_utils.os, "sched_getaffinity", lambda pid: set(range(4)))
    assert run_utils.machine_description(torch.device("cpu")).startswith("CPU, 4 of 64 cores; torch ")


def test_a_resumed_run_logs_its_machine_again_at_the_step_it_resumed(tmp_path):
    run_dir = str(tmp_path / "run")
    ppo.main(ppo.Args(env_id="starpilot", total_timesteps=128, run_dir=run_dir, **TINY))
    saved = json.load(open(os.path.join(run_dir, "config.json")))["args"]
    ppo.main(ppo.Args(**{**saved, "resume": run_dir, "total_timesteps": 256}))
    assert [step for step, _ in machine_texts(run_dir)] == [0, 128]
