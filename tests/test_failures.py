"""A run that goes wrong keeps what it had: divergence, a failed checkpoint write, SIGTERM, SIGKILL at
any moment, and two processes on one run directory."""

import contextlib
import errno
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import types
from dataclasses import asdict

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import drac
import mdpo
import ppo
import run_utils
from helpers import ROOT, without_evaluation

TINY = dict(env_id="bigfish", num_envs=4, num_steps=16, num_minibatches=2, update_epochs=1, eval_interval=2,
            eval_episodes=2, checkpoint_interval=1, cuda=False)


def tiny_flags(run_dir, total_timesteps):
    flags = ["--run-dir", run_dir, "--total-timesteps", str(total_timesteps), "--no-cuda"]
    for key, value in TINY.items():
        if key != "cuda":
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def load(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False, map_location="cpu")


def logged_scalars(event_dir):
    """Every scalar the run logged, except the timings, as {tag: [(step, value), ...]}."""
    accumulator = EventAccumulator(event_dir)
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
            if not tag.startswith("perf/") and tag != "charts/SPS"}


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_weights_gone_non_finite_stop_the_run_and_keep_the_last_good_checkpoint(module, monkeypatch, tmp_path):
    real_update, calls = module.update, []

    def update_that_breaks_a_weight_on_its_last_step(models, optimizer, batch, args):
        stats = real_update(models, optimizer, batch, args)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                weight = optimizer.param_groups[0]["params"][0]  # the first conv's weight (agent 1's in MDPO)
                weight[(0,) * weight.dim()] = float("nan")
        return stats

    monkeypatch.setattr(module, "update", update_that_breaks_a_weight_on_its_last_step)
    run_dir = str(tmp_path / "run")
    with pytest.raises(run_utils.Diverged, match="iteration 2 .*weights are non-finite"):
        module.main(module.Args(total_timesteps=64 * 4, run_dir=run_dir, **TINY))
    checkpoint = load(run_dir)
    assert checkpoint["iteration"] == 1
    states = run_utils.agent_weights(checkpoint)
    assert all(torch.isfinite(value).all() for state in states for value in state.values())
    assert json.load(open(os.path.join(run_dir, "diverged.json"))) == {
        "iteration": 2, "global_step": 128, "what": "weights are non-finite after the update" if module is ppo
        else "agent 1's weights are non-finite after the update"}
    assert json.load(open(os.path.join(run_dir, "status.json")))["iteration"] == 1


def test_a_diverging_run_exits_with_code_3_and_one_line(tmp_path):
    run_dir = str(tmp_path / "run")
    result = subprocess.run([sys.executable, "ppo.py", *tiny_flags(run_dir, 64 * 3), "--learning-rate", "1e30"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    last_line = result.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last_line.startswith("error: diverged at iteration 1 (step 64): "), last_line
    assert "Traceback" not in result.stderr and not os.path.exists(os.path.join(run_dir, "checkpoint.pt"))


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_the_same_command_resumes(monkeypatch, tmp_path):
    run_dir = str(tmp_path / "run")
    args = ppo.Args(total_timesteps=64 * 3, run_dir=run_dir, **TINY)
    real_save, saves = torch.save, []

    def save_on_a_full_disk(obj, f):
        saves.append(1)
        if len(saves) == 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    with pytest.raises(run_utils.StorageError, match="No space left on device.*previous checkpoint is intact"):
        ppo.main(args)
    assert load(run_dir)["iteration"] == 1
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.pt.tmp"))
    monkeypatch.setattr(torch, "save", real_save)
    ppo.main(args)  # the same command again continues the run
    assert load(run_dir)["iteration"] == 3


def test_sigterm_writes_a_checkpoint_exits_4_and_the_run_resumes(tmp_path):
    run_dir = str(tmp_path / "run")
    process = subprocess.Popen([sys.executable, "mdpo.py", *tiny_flags(run_dir, 64 * 10_000)],
                               stderr=subprocess.PIPE, text=True, cwd=ROOT)
    status = os.path.join(run_dir, "status.json")
    while not os.path.exists(status):  # the first checkpoint: the training loop is running
        assert process.poll() is None, process.stderr.read()[-2000:]
        os.sched_yield()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 4, stderr[-2000:]
    stopped_at = json.load(open(status))["iteration"]
    assert stderr.replace("\r", "\n").strip().splitlines()[-1] == (
        f"stopped by SIGTERM after iteration {stopped_at}, checkpoint written; "
        f"continue with: python mdpo.py --resume {run_dir}")
    assert load(run_dir)["iteration"] == stopped_at
    assert not os.path.exists(os.path.join(run_dir, "lock")) or open(os.path.join(run_dir, "lock")).read()
    result = subprocess.run([sys.executable, "mdpo.py", "--resume", run_dir, "--total-timesteps",
                             str(64 * (stopped_at + 1))], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.load(open(status)) == {"global_step": 64 * (stopped_at + 1), "iteration": stopped_at + 1,
                                       "finished": True}


# A training process that SIGKILLs itself on its Nth durable write, either with the file half written
# (before its rename) or just after the checkpoint's rename, before status.json.
DYING_RUN = """
import os, signal, sys, tyro
sys.path.insert(0, {root!r})
import ppo
where, nth = sys.argv[1], int(sys.argv[2])
import run_utils
real_write, writes = run_utils.write_durably, []
def write_then_die(path, write):
    writes.append(path)
    if len(writes) == nth and where == "mid-write":
        with open(path + ".tmp", "wb") as f:
            f.write(b"torn")
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(path, write)
    if len(writes) == nth and where == "after-checkpoint-rename":
        os.kill(os.getpid(), signal.SIGKILL)
run_utils.write_durably = write_then_die
ppo.main(tyro.cli(ppo.Args, args=sys.argv[3:]))
"""


def test_sigkill_at_any_moment_then_resuming_equals_an_uninterrupted_run(tmp_path):
    total = 64 * 6
    straight = str(tmp_path / "straight")
    ppo.main(module_args(ppo, straight, total))
    killed = str(tmp_path / "killed")
    command = [sys.executable, "ppo.py", *tiny_flags(killed, total)]
    # Kills inside a checkpoint write (config.json is write 1; then checkpoint, status per iteration).
    for where, nth in (("mid-write", 2), ("after-checkpoint-rename", 4), ("mid-write", 7)):
        result = subprocess.run([sys.executable, "-c", DYING_RUN.format(root=ROOT), where, str(nth),
                                 *tiny_flags(killed, total)], capture_output=True, cwd=ROOT, timeout=300)
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    # Kills at random moments of whole runs (startup, rollout, update, evaluation, writes).
    rng = np.random.default_rng(0)
    for delay in rng.uniform(0.5, 6.0, size=3):
        process = subprocess.Popen(command, stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

    a, b = load(straight), load(killed)
    assert a["iteration"] == b["iteration"] == 6
    for name, value in a["agents"][0]["agent"].items():
        assert torch.equal(value, b["agents"][0]["agent"][name]), name
    assert logged_scalars(killed) == logged_scalars(straight)


def module_args(module, run_dir, total, **kw):
    return module.Args(total_timesteps=total, run_dir=run_dir, **{**TINY, **kw})


def test_a_second_process_on_a_run_directory_is_refused(tmp_path):
    run_dir = str(tmp_path / "run")
    lock = run_utils.lock_run_dir(run_dir)
    try:
        owner = json.loads(open(os.path.join(run_dir, "lock")).read())
        assert owner["pid"] == os.getpid()
        result = subprocess.run([sys.executable, "ppo.py", *tiny_flags(run_dir, 64)], capture_output=True,
                                text=True, cwd=ROOT, timeout=300)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [f"error: {run_dir} is in use by {json.dumps(owner)}"]
    finally:
        lock.close()
    again = run_utils.lock_run_dir(run_dir)  # released: the directory is free again
    assert json.loads(open(os.path.join(run_dir, "lock")).read())["pid"] == os.getpid()  # one owner, not two
    again.close()


def test_the_command_of_a_finished_run_run_again_finishes_at_once(tmp_path, monkeypatch):
    # As a sweep does with a run killed between its last checkpoint and its status.json.
    without_evaluation(ppo, monkeypatch)
    run_dir = str(tmp_path / "run")
    ppo.main(module_args(ppo, run_dir, 64))
    written = os.path.getmtime(os.path.join(run_dir, "checkpoint.pt"))
    ppo.main(module_args(ppo, run_dir, 64))
    assert load(run_dir)["iteration"] == 1 and os.path.getmtime(os.path.join(run_dir, "checkpoint.pt")) == written
    assert json.load(open(os.path.join(run_dir, "status.json")))["finished"]


def test_checkpoints_come_every_checkpoint_interval_and_at_the_last_iteration(tmp_path, monkeypatch):
    without_evaluation(ppo, monkeypatch)
    iterations, real = [], run_utils.save_checkpoint
    monkeypatch.setattr(run_utils, "save_checkpoint", lambda run_dir, checkpoint: iterations.append(checkpoint["iteration"])
                        or real(run_dir, checkpoint))
    ppo.main(module_args(ppo, str(tmp_path / "run"), 64 * 5, checkpoint_interval=2))
    assert iterations == [2, 4, 5]


def test_ctrl_c_is_handled_as_before_once_a_checkpoint_has_been_written():
    before = signal.getsignal(signal.SIGINT)
    with run_utils.interrupts_deferred():
        assert signal.getsignal(signal.SIGINT) is not before  # deferred while the checkpoint is written
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("number, message", [
    (errno.ENOSPC, "error: could not write the run (No space left on device); continue from its last checkpoint "
                   "with --resume"),
    (errno.EACCES, "error: could not write the run (Permission denied); continue from its last checkpoint with --resume"),
])
def test_a_full_disk_or_a_lost_permission_while_logging_is_one_line_with_exit_code_1(monkeypatch, capsys, number, message):
    with pytest.raises(SystemExit) as stopped:
        cli_where_main_raises(OSError(number, os.strerror(number)), monkeypatch)
    assert stopped.value.code == 1 and capsys.readouterr().err == message + "\n"


def test_other_os_errors_are_not_mistaken_for_a_full_disk(monkeypatch):
    with pytest.raises(FileNotFoundError):
        cli_where_main_raises(FileNotFoundError(errno.ENOENT, "No such file or directory"), monkeypatch)


def cli_where_main_raises(error, monkeypatch):
    """ppo.py's command line, with no flags, around a main() that raises `error`."""
    def main(args):
        raise error
    monkeypatch.setattr(sys, "argv", ["ppo.py"])
    run_utils.cli(ppo.Args, main, ppo.SCRIPT)


def test_a_run_stopped_before_its_first_checkpoint_starts_afresh_with_the_same_command(tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"script": "ppo", "args": {}}, f)
    open(os.path.join(run_dir, "events.out.tfevents.1.host.1.0"), "wb").close()
    ppo.main(module_args(ppo, run_dir, 64))
    assert "events.out.tfevents.1.host.1.0" not in os.listdir(run_dir)
    assert load(run_dir)["iteration"] == 1


def test_an_mdpo_run_stopped_before_its_first_checkpoint_is_a_run_directory_not_foreign_files(tmp_path):
    run_dir = tmp_path / "run"
    for name in ("lock", "config.json", "diverged.json", "events.out.tfevents.1", "agent1/events.out.tfevents.2",
                 "agent2/events.out.tfevents.3", "videos/episode.mp4", "checkpoint.pt.tmp", "config.json.tmp"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("{}")
    run_utils.refuse_foreign_files(str(run_dir))  # what mdpo.py writes before its first checkpoint


def files_under(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("contents, message", [
    # --run-dir given the directory of other runs: starting afresh there would delete their records
    ({"bigfish__ppo__1/config.json": "{}", "bigfish__ppo__1/events.out.tfevents.1": "x"},
     "is not a run directory (it holds bigfish__ppo__1): give a new or empty --run-dir"),
    ({"notes.txt": "", "data.csv": "", "z": ""}, "is not a run directory (it holds data.csv and 2 more)"),
    ({"agent1/results.csv": "", "config.json": "{}"}, "is not a run directory (it holds agent1)"),
    # an exported run, or one whose checkpoint was removed: its records are all that is left of it
    ({"config.json": "{}", "status.json": "{}", "events.out.tfevents.1": "x"},
     "holds a run without its checkpoint.pt (an exported run, or its checkpoint was removed)"),
])
def test_a_new_run_never_starts_among_other_files_and_writes_nothing_there(tmp_path, contents, message):
    run_dir = tmp_path / "dir"
    for name, text in contents.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(text)
    before = files_under(run_dir)
    result = subprocess.run([sys.executable, "ppo.py", *tiny_flags(str(run_dir), 64)], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {run_dir} ") and message in line
    assert files_under(run_dir) == before  # not even a lock file


def test_starting_afresh_removes_the_runs_own_files_and_never_walks_other_directories(tmp_path):
    run_dir = tmp_path / "run"
    for name in ("config.json", "diverged.json", "events.out.tfevents.1", "agent1/events.out.tfevents.2",
                 "checkpoint.pt.tmp", "other/events.out.tfevents.3", "other/config.json", "other/agent1/events.out.tfevents.4"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("{}")
    run_utils.discard_unfinished_run(str(run_dir))
    assert sorted(files_under(run_dir)) == ["other/agent1/events.out.tfevents.4", "other/config.json",
                                            "other/events.out.tfevents.3"]


# ---------------------------------------------------------------------------------------------
# The pieces of a stop and a resume, one at a time
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def harmless(signum):
    """A handler that ignores signum while a test sends it to this process: if the code under test stops
    catching it, the test fails instead of the signal killing pytest."""
    def ignore(*_):
        pass

    previous = signal.signal(signum, ignore)
    try:
        yield ignore
    finally:
        signal.signal(signum, previous)


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_exit_codes_are_the_ones_documented_and_the_sweep_reads(module):
    import sweep

    codes = {error_type.__name__: code for error_type, code in run_utils.EXIT_CODES}
    assert codes == {"UsageError": 2, "Diverged": 3, "Preempted": 4, "StorageError": 1}
    assert (sweep.EXIT_DIVERGED, sweep.EXIT_PREEMPTED) == (3, 4)


@pytest.mark.parametrize("module", [ppo, mdpo])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])  # Slurm's and submitit's
def test_both_stop_signals_are_caught_and_the_handlers_restored(module, signum):
    with harmless(signum) as before:
        stop = module.StopSignals()
        os.kill(os.getpid(), signum)
        stop.restore()
        assert stop.received == signal.Signals(signum).name and signal.getsignal(signum) is before


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_status_is_written_after_the_checkpoint_and_says_finished_at_the_last_iteration(module, monkeypatch, tmp_path):
    written = []
    monkeypatch.setattr(run_utils, "write_durably", lambda path, write: written.append(os.path.basename(path)))
    run_utils.save_checkpoint(str(tmp_path), {"global_step": 64, "iteration": 1, "args": {"num_iterations": 2}})
    assert written == ["checkpoint.pt", "status.json"]  # a kill between the two leaves status.json behind
    monkeypatch.undo()
    for iteration, finished in ((1, False), (2, True)):
        run_utils.write_status(str(tmp_path), {"global_step": 64 * iteration, "iteration": iteration}, 2)
        assert json.load(open(tmp_path / "status.json"))["finished"] is finished


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_resume_refuses_what_is_not_a_run_before_writing_anything(module, tmp_path):
    missing = str(tmp_path / "typo")
    with pytest.raises(module.UsageError, match="does not exist"):
        module.main(module_args(module, None, 64, resume=missing))
    assert not os.path.exists(missing)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"script": module.SCRIPT, "args": {}}))
    with pytest.raises(module.UsageError, match="holds no checkpoint of a run"):
        run_utils.saved_config(str(run_dir), module.SCRIPT)
    (run_dir / "status.json").write_text("{}")  # an exported run: not one to start afresh
    with pytest.raises(module.UsageError, match=r"holds a run without its checkpoint.pt \(an exported run"):
        run_utils.saved_config(str(run_dir), module.SCRIPT)
    (run_dir / "checkpoint.pt").write_bytes(b"")
    (run_dir / "config.json").write_text(json.dumps({"script": module.SCRIPT}))
    with pytest.raises(module.UsageError, match="is not a run's config"):
        run_utils.saved_config(str(run_dir), module.SCRIPT)


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_track_without_wandb_is_refused_before_writing_anything(module, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    run_dir = tmp_path / "run"
    with pytest.raises(module.UsageError, match="--track needs Weights & Biases: pip install wandb"):
        module.main(module_args(module, str(run_dir), 64, track=True))
    assert not run_dir.exists()


def test_tracking_keeps_wandbs_files_out_of_the_tensorboard_logs_it_watches(tmp_path, monkeypatch):
    calls = {}
    fake = types.SimpleNamespace(tensorboard=types.SimpleNamespace(patch=lambda **kw: calls.update(patch=kw)),
                                 init=lambda **kw: calls.update(init=kw))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_dir = str(tmp_path / "runs" / "bigfish__mdpo__1")
    run_utils.start_tracking(mdpo.Args(track=True), run_dir)
    assert calls["patch"]["root_logdir"] == run_dir  # agent1/, agent2/ and the run's own stream, each named
    wandb_dir = os.path.abspath(calls["init"]["dir"])
    assert os.path.commonpath([wandb_dir, os.path.abspath(run_dir)]) != os.path.abspath(run_dir)
    assert calls["init"]["id"] == "bigfish__mdpo__1" and calls["init"]["resume"] == "allow"


@pytest.mark.parametrize("module, agents", [(ppo, 1), (drac, 1), (mdpo, 2)])
def test_a_run_past_the_machines_memory_is_refused_before_writing_anything(module, agents, tmp_path, monkeypatch):
    # Counted by hand: every agent's games and rollout frames of 64x64x3 bytes, and the evaluation's games.
    games, frames = agents * TINY["num_envs"] + TINY["eval_episodes"], agents * TINY["num_envs"] * TINY["num_steps"]
    needed = games * run_utils.GAME_BYTES + frames * 64 * 64 * 3
    monkeypatch.setattr(run_utils, "host_memory", lambda: needed - 1)
    run_dir = tmp_path / "run"
    with pytest.raises(module.UsageError, match=f"{games} games and {frames} rollout frames need at least .* GiB of memory"):
        module.main(module_args(module, str(run_dir), 64 * agents))
    assert not run_dir.exists()
    monkeypatch.setattr(run_utils, "host_memory", lambda: needed)  # just enough: on to the (unwritable) run directory
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(module.UsageError, match="cannot write the run directory"):
        module.main(module_args(module, str(blocker / "run"), 64 * agents))


def test_on_a_gpu_the_frames_are_checked_against_its_memory_and_the_games_against_the_hosts(monkeypatch):
    frame_bytes = 64 * 64 * 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(total_memory=100 * frame_bytes))
    monkeypatch.setattr(run_utils, "host_memory", lambda: 10 * run_utils.GAME_BYTES)
    run_utils.check_memory(games=10, frames=100, cuda=True)
    with pytest.raises(run_utils.UsageError, match="of GPU memory"):
        run_utils.check_memory(games=10, frames=101, cuda=True)
    with pytest.raises(run_utils.UsageError, match="of memory"):
        run_utils.check_memory(games=11, frames=1, cuda=True)
    with pytest.raises(run_utils.UsageError, match="of memory"):  # --no-cuda: the frames are the host's
        run_utils.check_memory(games=1, frames=100, cuda=False)
    monkeypatch.setattr(run_utils, "host_memory", lambda: None)  # a host that does not say: not checked
    run_utils.check_memory(games=10**9, frames=1, cuda=False)


def write_cgroups(tmp_path, memberships, limits):
    """A /proc/self/cgroup naming `memberships` and a cgroup mount holding each {path: value} of `limits`."""
    (tmp_path / "cgroup").write_text("".join(line + "\n" for line in memberships))
    for path, value in limits.items():
        (tmp_path / "fs" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / path).write_text(value + "\n")
    return str(tmp_path / "cgroup"), str(tmp_path / "fs")


def test_the_hosts_memory_is_its_ram_and_swap(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        1000 kB\nMemFree:          500 kB\nSwapTotal:         24 kB\nHugePages_Total:       0\n")
    no_cgroups = str(tmp_path / "no_cgroup"), str(tmp_path / "no_fs")
    assert run_utils.host_memory(str(meminfo), *no_cgroups) == 1024 * 1024
    cgroups = write_cgroups(tmp_path, ["0::/job"], {"job/memory.max": str(600 * 1024)})
    assert run_utils.host_memory(str(meminfo), *cgroups) == (600 + 24) * 1024  # a Slurm job's --mem, plus swap
    cgroups = write_cgroups(tmp_path, ["0::/job"], {"job/memory.max": str(2000 * 1024)})
    assert run_utils.host_memory(str(meminfo), *cgroups) == 1024 * 1024  # a limit above the RAM changes nothing
    cgroups = write_cgroups(tmp_path, ["0::/job"], {"job/memory.max": str(600 * 1024), "job/memory.swap.max": "0"})
    assert run_utils.host_memory(str(meminfo), *cgroups) == 600 * 1024  # Docker, or Slurm's AllowedSwapSpace=0
    cgroups = write_cgroups(tmp_path, ["0::/job"], {"job/memory.max": "max", "job/memory.swap.max": str(10 * 1024)})
    assert run_utils.host_memory(str(meminfo), *cgroups) == (1000 + 10) * 1024
    meminfo.write_text("MemFree:          500 kB\n")
    assert run_utils.host_memory(str(meminfo), *no_cgroups) is None
    assert run_utils.host_memory(str(tmp_path / "missing"), *no_cgroups) is None


def memory_limit(cgroups, cgroup_root):
    return run_utils.cgroup_limit("memory.max", "memory.limit_in_bytes", cgroups, cgroup_root)


def test_a_cgroup_v2_limit_is_the_lowest_on_the_groups_path(tmp_path):
    memberships = ["0::/slurm/job_7/step_0"]
    assert memory_limit(*write_cgroups(tmp_path, memberships, {
        "slurm/job_7/step_0/memory.max": "max", "slurm/job_7/memory.max": "4096", "slurm/memory.max": "8192",
        "memory.max": "max"})) == 4096
    assert memory_limit(*write_cgroups(tmp_path, memberships, {
        "slurm/job_7/memory.max": "4096", "slurm/memory.max": "2048"})) == 2048  # a parent's lower limit binds
    assert memory_limit(*write_cgroups(tmp_path, memberships, {
        "slurm/job_7/step_0/memory.max": "max", "slurm/job_7/memory.max": "max", "slurm/memory.max": "max"})) is None


def test_a_cgroup_v1_limit_is_read_from_the_memory_controllers_hierarchy(tmp_path):
    memberships = ["9:pids:/docker/abc", "4:cpu,memory:/docker/abc", "0::/"]
    assert memory_limit(*write_cgroups(tmp_path, memberships, {
        "memory/docker/abc/memory.limit_in_bytes": "1024", "memory/memory.limit_in_bytes": "9223372036854771712",
        "pids/docker/abc/memory.limit_in_bytes": "1", "memory.max": "max"})) == 1024


def test_a_cgroup_v1_limit_on_memory_and_swap_together_caps_both(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        1000 kB\nSwapTotal:        500 kB\n")
    cgroups = write_cgroups(tmp_path, ["4:memory:/slurm/job_7"], {
        "memory/slurm/job_7/memory.limit_in_bytes": str(400 * 1024),
        "memory/slurm/job_7/memory.memsw.limit_in_bytes": str(450 * 1024)})
    assert run_utils.host_memory(str(meminfo), *cgroups) == 450 * 1024
    cgroups = write_cgroups(tmp_path, ["4:memory:/slurm/job_7"], {
        "memory/slurm/job_7/memory.limit_in_bytes": str(400 * 1024),
        "memory/slurm/job_7/memory.memsw.limit_in_bytes": "9223372036854771712"})  # v1's "unlimited"
    assert run_utils.host_memory(str(meminfo), *cgroups) == 400 * 1024 + 500 * 1024


def test_a_cgroup_outside_the_namespace_is_not_read(tmp_path):
    # "/../other" names a group above the namespace's root: its files are not under the mount.
    assert memory_limit(*write_cgroups(tmp_path, ["0::/../other"], {"memory.max": "512", "../memory.max": "256"})) is None


def test_a_containers_own_cgroup_at_the_mounts_root_is_read(tmp_path):
    # With a cgroup namespace the listed path may be the host's, absent from the container's mount.
    assert memory_limit(*write_cgroups(tmp_path, ["0::/kubepods/pod1/ctr"], {"memory.max": "512"})) == 512
    assert memory_limit(str(tmp_path / "missing"), str(tmp_path / "fs")) is None


# Procgen's games alone: a run's wrappers and spaces only add to them.
MEASURE_GAMES = """
import os, sys
from procgen import ProcgenGym3Env
def resident():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
game, mode = sys.argv[1:]
make = lambda num: ProcgenGym3Env(num=num, env_name=game, distribution_mode=mode, num_levels=0, start_level=0, num_threads=4)
make(4)  # the library's one-off allocations
before = resident()
games = make(200)
print((resident() - before) / 200)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="measures resident memory through Linux's /proc")
@pytest.mark.parametrize("game, mode", [("maze", "memory"), ("jumper", "easy")])  # the smallest games
def test_check_memory_counts_no_more_per_game_than_procgen_holds(game, mode):
    # check_memory refuses only runs that cannot fit, so its bytes per game must not exceed Procgen's.
    result = subprocess.run([sys.executable, "-c", MEASURE_GAMES, game, mode],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) >= run_utils.GAME_BYTES


def test_running_out_of_gpu_memory_is_one_line_with_exit_code_1(monkeypatch, capsys):
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                   "79.19 GiB of which 1.06 GiB is free. Of the allocated memory 70.3 GiB is allocated")
    with pytest.raises(SystemExit) as stopped:
        cli_where_main_raises(error, monkeypatch)
    assert stopped.value.code == 1
    assert capsys.readouterr().err == ("error: CUDA out of memory. Tried to allocate 2.00 GiB; lower --num-envs or "
                                       "--num-steps, or raise --num-minibatches\n")


@pytest.mark.parametrize("module, field", [(ppo, "l2_coef"), (mdpo, "alpha")])
def test_a_run_made_by_another_version_of_the_script_is_refused_in_one_line(module, field):
    # A pre-release project keeps no compatibility branches: a config whose flags are not this script's is refused.
    args = module.Args()
    older = {"args": {k: v for k, v in asdict(args).items() if k != field}}
    with pytest.raises(module.UsageError, match=f"cannot resume: the run was made by another version .*{field}.*"
                                                 "continue it with the scripts that made it .* or start a new run"):
        run_utils.check_compatible(args, older)
    run_utils.check_compatible(args, {"args": asdict(args)})  # the same version and flags: the same run


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_the_iterations_never_exceed_the_budget(module):
    args = module.validate_args(module.Args(num_envs=4, num_steps=16, num_minibatches=2, total_timesteps=100))
    assert args.batch_size == 64 and args.num_iterations == 1  # a second would take 128 steps of the 100


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_a_fresh_start_discards_the_unfinished_runs_records(module, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "agent1").mkdir(parents=True)
    for name in ("config.json", "diverged.json", "events.out.tfevents.1", "agent1/events.out.tfevents.2"):
        (run_dir / name).write_text("{}")
    (run_dir / "notes.txt").write_text("the user's")
    run_utils.discard_unfinished_run(str(run_dir))  # a stale diverged.json would have the sweep report "diverged" forever
    assert sorted(p.name for p in run_dir.rglob("*") if p.is_file()) == ["notes.txt"]


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_a_stop_signal_between_checkpoints_writes_one_and_at_the_end_is_a_finished_run(module, monkeypatch, tmp_path):
    without_evaluation(module, monkeypatch)
    real_update = module.update

    def update_then_sigterm(*args, **kwargs):
        stats = real_update(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # as Slurm would, during the first iteration
        return stats

    monkeypatch.setattr(module, "update", update_then_sigterm)
    run_dir, last = str(tmp_path / "run"), str(tmp_path / "last")
    with harmless(signal.SIGTERM):
        with pytest.raises(run_utils.Preempted, match="after iteration 1, checkpoint written"):
            module.main(module_args(module, run_dir, 64 * 3, checkpoint_interval=100))
        assert load(run_dir)["iteration"] == 1
        module.main(module_args(module, last, 64, checkpoint_interval=100))  # at the last iteration: simply done
    assert json.load(open(os.path.join(last, "status.json"))) == {"global_step": 64, "iteration": 1, "finished": True}


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_resume_restores_which_envs_ended_on_the_rollouts_last_step(module, monkeypatch, tmp_path):
    # GAE needs next_done: an episode that ended on the checkpointed rollout's last step must not be
    # bootstrapped into the next rollout after a resume.
    without_evaluation(module, monkeypatch)
    run_dir = str(tmp_path / "run")
    module.main(module_args(module, run_dir, 128))
    with pytest.raises(module.UsageError, match="at step 128, past --total-timesteps 64 .*never shortened"):
        module.main(module_args(module, None, 64, resume=run_dir))
    checkpoint = load(run_dir)
    ended = torch.tensor([1.0, 0.0, 1.0, 1.0])
    for state, next_done in zip(checkpoint["agents"], (ended, 1 - ended)):
        state["next_done"] = next_done.clone()
    torch.save(checkpoint, os.path.join(run_dir, "checkpoint.pt"))
    seen = []

    def record_then_stop(policies, envs, rollouts, *args, **kwargs):
        seen.extend(r.next_done.clone() for r in (rollouts if module is mdpo else [rollouts]))
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "collect_rollouts" if module is mdpo else "collect_rollout", record_then_stop)
    with pytest.raises(SystemExit):
        module.main(module_args(module, None, 192, resume=run_dir))
    expected = [ended] if module is ppo else [ended, 1 - ended]
    assert len(seen) == len(expected) and all(torch.equal(a, b) for a, b in zip(seen, expected))


def test_write_durably_fsyncs_the_data_then_renames_then_fsyncs_the_directory(monkeypatch, tmp_path):
    calls, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, target):
        calls.append(("replace", os.path.realpath(source)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = os.path.join(os.path.realpath(tmp_path), "checkpoint.pt")
    run_utils.write_durably(path, lambda f: f.write(b"data"))
    assert calls == [("fsync", path + ".tmp"), ("replace", path + ".tmp"), ("fsync", os.path.dirname(path))]
    assert open(path, "rb").read() == b"data"


def test_a_divergence_says_whether_a_checkpoint_is_kept(tmp_path):
    stats, agents = [{"policy_loss": float("nan")}], [ppo.Agent()]
    with pytest.raises(run_utils.Diverged, match="policy_loss is nan; before the first checkpoint: nothing to resume$"):
        run_utils.stop_if_diverged(str(tmp_path), 1, 64, stats, agents)
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(run_utils.Diverged, match=f"policy_loss is nan; the last good checkpoint in {re.escape(str(tmp_path))} is kept$"):
        run_utils.stop_if_diverged(str(tmp_path), 2, 128, stats, agents)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_nan_or_infinite_loss_stops_the_run(tmp_path, bad):
    agent = ppo.Agent()
    run_utils.stop_if_diverged(str(tmp_path), 2, 128, [{"policy_loss": 0.1, "value_loss": 1e30}], [agent])  # finite
    with pytest.raises(run_utils.Diverged, match=f"iteration 3 .*value_loss is {bad}"):
        run_utils.stop_if_diverged(str(tmp_path), 3, 192, [{"policy_loss": 0.1, "value_loss": bad}], [agent])
    assert json.load(open(tmp_path / "diverged.json")) == {"iteration": 3, "global_step": 192,
                                                          "what": f"value_loss is {bad}"}
