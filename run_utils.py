"""Run machinery of ppo.py, drac.py and mdpo.py: what keeps a run alive, never what it learns.

Durable checkpoints and exact resume, the stop signals of Slurm and submitit, the divergence stop, the
run-directory lock and the status.json sweep.py reads: plain functions the training loops call.
"""

import contextlib
import ctypes
import errno
import fcntl
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from typing import Optional

if not (3, 10) <= sys.version_info[:2] <= (3, 12):  # Procgen has wheels for these only; say so before any import fails
    print(f"error: Python {sys.version_info[0]}.{sys.version_info[1]} is not supported, Procgen needs 3.10 to 3.12: "
          f"run `uv run {os.path.basename(sys.argv[0])} ...` (uv fetches a supported Python) or use a 3.10-3.12 venv",
          file=sys.stderr)
    sys.exit(2)

import numpy as np
import torch
import tyro


class UsageError(Exception):
    """Bad input from the user: one line, exit code 2."""


class Diverged(Exception):
    """A loss, gradient or weight went non-finite: exit code 3, the last good checkpoint kept."""


class StorageError(Exception):
    """A checkpoint could not be written (full disk, unwritable directory): exit code 1, the previous one intact."""


class Preempted(Exception):
    """SIGTERM or SIGUSR2 arrived: the run wrote a checkpoint and stops with exit code 4, to be resumed."""


# The exit codes sweep.py reads; Ctrl-C exits with 130.
EXIT_CODES = ((UsageError, 2), (Diverged, 3), (Preempted, 4), (StorageError, 1))
# Fields that may change when a run is resumed; every other field must match the checkpoint.
RESUMABLE_FIELDS = {"cuda", "track", "wandb_project_name", "wandb_entity", "capture_video", "run_dir", "resume",
                    "checkpoint_interval", "total_timesteps", "eval_interval", "eval_episodes", "bf16", "compile",
                    "num_iterations"}


def cli(Args, main, script: str) -> None:
    """Parse the flags with tyro and run main(args); errors become one line and their exit code.
    With --resume DIR the saved run's flags are the defaults, so DIR alone continues it."""
    args = tyro.cli(Args)
    try:
        if args.resume:
            saved = saved_config(args.resume, script)  # a missing or foreign run is refused first
            if args.run_dir and os.path.realpath(args.run_dir) != os.path.realpath(args.resume):
                raise UsageError(f"--resume continues {args.resume} in place; leave out --run-dir {args.run_dir}")
            with contextlib.suppress(TypeError):  # another version's flags: main() says which
                args = tyro.cli(Args, default=Args(**{**saved["args"], "resume": args.resume}))
        main(args)
    except tuple(error_type for error_type, _ in EXIT_CODES) as error:
        print(str(error) if isinstance(error, Preempted) else f"error: {error}", file=sys.stderr)
        sys.exit(next(code for error_type, code in EXIT_CODES if isinstance(error, error_type)))
    except torch.OutOfMemoryError as error:  # check_memory's bound leaves out the networks and their activations
        reason = ". ".join(str(error).split(". ")[:2])  # "CUDA out of memory. Tried to allocate 2.00 GiB"
        print(f"error: {reason}; lower --num-envs or --num-steps, or raise --num-minibatches", file=sys.stderr)
        sys.exit(1)
    except OSError as error:  # the disk filled up or the run directory became unwritable while logging
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise
        print(f"error: could not write the run ({error.strerror}); continue from its last checkpoint with --resume",
              file=sys.stderr)
        sys.exit(1)


# ---- The run directory ----------------------------------------------------------------------------------
def open_run_dir(args, script: str):
    """The run directory, locked, and the args to run with: running the command of a run that holds a
    checkpoint again continues it (as --resume does); a run stopped before its first checkpoint starts afresh."""
    for flag, value in (("--resume", args.resume), ("--run-dir", args.run_dir)):
        if value is not None and not value.strip():  # an unset shell variable: never the default directory
            raise UsageError(f"{flag} is empty: give a run directory")
    if args.resume:
        saved_config(args.resume, script)  # a missing or foreign run fails here, before anything is written
    check_tracking(args.track)
    run_dir = args.resume or args.run_dir or f"runs/{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if not args.resume and not has_checkpoint(run_dir):
        refuse_foreign_files(run_dir)  # before the lock file is written into a directory that is not a run's
    lock = lock_run_dir(run_dir)
    if not args.resume and has_checkpoint(run_dir):  # looked at again under the lock
        check_compatible(args, saved_config(run_dir, script))
        print(f"{run_dir} holds a checkpoint: continuing it", file=sys.stderr)
        args = replace(args, resume=run_dir)
    elif not args.resume:
        discard_unfinished_run(run_dir)
    return args, run_dir, lock


def check_tracking(track: bool) -> None:
    if track and importlib.util.find_spec("wandb") is None:
        raise UsageError("--track needs Weights & Biases: pip install wandb")


def has_checkpoint(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))


# What a run writes before its first checkpoint, with the temporary files of writes a kill interrupted,
# and the directory of each of MDPO's agents' event files.
LOGGED_FILES = ("config.json", "diverged.json", "config.json.tmp", "diverged.json.tmp", "checkpoint.pt.tmp")
AGENT_DIR = re.compile(r"agent\d+")
NO_CHECKPOINT = "holds a run without its checkpoint.pt (an exported run, or its checkpoint was removed)"


def is_logged_file(name: str) -> bool:
    return name.startswith("events.out.tfevents.") or name in LOGGED_FILES


def is_unfinished_runs_file(run_dir: str, name: str) -> bool:
    path = os.path.join(run_dir, name)
    if os.path.isdir(path):
        return name == "videos" or (AGENT_DIR.fullmatch(name) is not None
                                    and all(inner.startswith("events.out.tfevents.") for inner in os.listdir(path)))
    return name == "lock" or is_logged_file(name)


def refuse_foreign_files(run_dir: str) -> None:
    """A new run goes into a new or empty directory, or one where the same command stopped before its first
    checkpoint: never among other files, which a later start afresh would delete with the run's."""
    if not os.path.isdir(run_dir):
        return
    try:
        entries = sorted(os.listdir(run_dir))
    except OSError as error:
        raise UsageError(f"cannot read the run directory {run_dir} ({error.strerror})") from None
    if "checkpoint.pt" in entries:  # written since this process looked: the lock says by whom
        return
    if "status.json" in entries:  # written only beside a checkpoint
        raise UsageError(f"{run_dir} {NO_CHECKPOINT}: it cannot be continued; give a new --run-dir")
    foreign = [name for name in entries if not is_unfinished_runs_file(run_dir, name)]
    if foreign:
        raise UsageError(f"{run_dir} is not a run directory (it holds {foreign[0]}"
                         f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}): give a new or empty --run-dir")


def lock_run_dir(run_dir: str):
    """Hold an exclusive lock on run_dir/lock while this process trains there (the kernel drops it when the
    process dies, even by SIGKILL): two processes never train one run directory."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = open(os.path.join(run_dir, "lock"), "a+")
    except OSError as error:
        raise UsageError(f"cannot write the run directory {run_dir} ({error.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # a filesystem without locks
            lock.close()
            raise UsageError(f"cannot lock {run_dir} ({error.strerror})") from None
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise UsageError(f"{run_dir} is in use by {owner}") from None
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}))
    lock.flush()
    return lock


def discard_unfinished_run(run_dir: str) -> None:
    """Remove what a run that stopped before its first checkpoint logged, so that it starts afresh."""
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        return
    print(f"{run_dir} holds a run stopped before its first checkpoint: starting it afresh", file=sys.stderr)
    for name in os.listdir(run_dir):  # not below agent<k>/: a directory of other runs is never walked
        path = os.path.join(run_dir, name)
        if AGENT_DIR.fullmatch(name) and os.path.isdir(path):
            for inner in os.listdir(path):
                if inner.startswith("events.out.tfevents."):
                    os.remove(os.path.join(path, inner))
        elif is_logged_file(name):
            os.remove(path)


def start_run(args, run_dir: str, script: str, checkpoint) -> None:
    """Write config.json, afresh on a resume too (a run extended with more --total-timesteps resumes as extended),
    after rewriting status.json from the checkpoint (a kill may have left it one behind; "finished" is against
    this run's --total-timesteps, before config.json takes it); keep freed memory for the next batch."""
    if checkpoint:
        write_status(run_dir, checkpoint, args.num_iterations)
    write_json(os.path.join(run_dir, "config.json"), {"script": script, "args": asdict(args)})
    keep_freed_memory()


def saved_config(run_dir: str, script: str) -> dict:
    """The config.json of a run directory, or a UsageError saying why it cannot be resumed."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise UsageError(f"cannot resume: {run_dir} " + ("is a file, not a run directory" if os.path.exists(run_dir)
                                                         else "does not exist"))
    if not os.path.isfile(path) or not has_checkpoint(run_dir):
        if os.path.isfile(os.path.join(run_dir, "status.json")):
            raise UsageError(f"cannot resume: {run_dir} {NO_CHECKPOINT}")
        raise UsageError(f"cannot resume: {run_dir} holds no checkpoint of a run "
                         "(a run stopped before its first checkpoint starts afresh without --resume)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot resume: {path} is unreadable ({type(error).__name__})") from None
    if not isinstance(config, dict) or not isinstance(config.get("args"), dict):
        raise UsageError(f"cannot resume: {path} is not a run's config")
    if config.get("script") != script:
        raise UsageError(f"cannot resume: {run_dir} was made by {config.get('script')}.py, not {script}.py")
    return config


def check_compatible(args, config: dict) -> None:
    """Refuse to resume a run of another version of the script, or with flags that change what it computes."""
    fields = asdict(args)
    difference = flag_difference(config, fields)
    if difference:
        another_version = set(config["args"]) != set(fields)
        raise UsageError(f"cannot resume: {difference}" + (": continue it with the scripts that made it (their commit "
                         "is in the run's TensorBoard text 'machine'), or start a new run" if another_version else ""))


def flag_difference(config: dict, fields: dict) -> Optional[str]:
    """How a saved run (its config or checkpoint: {"script", "args"}) differs from these flags in what a resume
    may not change; None when it does not. sweep.py asks the same before it resumes a job's run."""
    saved, script = config["args"], f"{config['script']}.py" if config.get("script") else "this script"
    if set(saved) != set(fields):
        return (f"the run was made by another version of {script} (its flags differ: "
                f"{', '.join(sorted(set(fields) ^ set(saved)))})")
    for key, value in fields.items():
        if key not in RESUMABLE_FIELDS and saved[key] != value:
            return f"--{key.replace('_', '-')} is {saved[key]!r} in the run, {value!r} here"
    return None


# ---- Checkpoints ----------------------------------------------------------------------------------------
def write_durably(path: str, write) -> None:
    """write(file) into path + ".tmp", flushed and fsynced, then renamed over path, and the rename fsynced:
    a kill or a machine crash at any moment leaves either the old file or the new one, never a torn one."""
    try:
        with open(path + ".tmp", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_json(path: str, content) -> None:
    write_durably(path, lambda f: f.write(json.dumps(content, indent=2).encode()))


def save_checkpoint(run_dir: str, checkpoint: dict) -> None:
    """Write the checkpoint, then status.json (which tells sweep.py how far the run got without loading it).
    Each write is atomic and Ctrl-C waits for both; a kill between the two leaves status.json one checkpoint
    behind, which the next resume rewrites from the checkpoint."""
    try:
        with interrupts_deferred():
            write_durably(os.path.join(run_dir, "checkpoint.pt"), lambda f: torch.save(checkpoint, f))
            write_status(run_dir, checkpoint, checkpoint["args"]["num_iterations"])
    except OSError as error:
        raise StorageError(f"could not write the checkpoint in {run_dir} ({error.strerror}); the previous checkpoint "
                           f"is intact: make room and continue with: python {checkpoint['script']}.py --resume {run_dir}") from None


def write_status(run_dir: str, checkpoint: dict, num_iterations: int) -> None:
    write_json(os.path.join(run_dir, "status.json"), {"global_step": checkpoint["global_step"], "iteration":
               checkpoint["iteration"], "finished": checkpoint["iteration"] >= num_iterations})


def load_checkpoint(args, script: str, device) -> dict:
    """The checkpoint to resume from, after checking that it fits this script and these flags."""
    check_compatible(args, saved_config(args.resume, script))
    path = os.path.join(args.resume, "checkpoint.pt")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
    except Exception as error:  # a torn or foreign file: say so in one line
        raise UsageError(f"cannot resume: {path} is unreadable ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != script:
        raise UsageError(f"cannot resume: {path} is not a {script}.py checkpoint")
    check_compatible(args, checkpoint)
    if checkpoint["iteration"] > args.num_iterations:
        raise UsageError(f"cannot resume: the run is at step {checkpoint['global_step']:,}, past --total-timesteps "
                         f"{args.total_timesteps:,} (a run is extended, never shortened)")
    return checkpoint


def agent_weights(checkpoint: dict) -> list:
    """The state dicts of a checkpoint's agents: one for ppo.py and drac.py, K for mdpo.py."""
    return [state["agent"] for state in checkpoint["agents"]]


def rng_state() -> dict:
    # The current GPU's state only, so the run can resume on a machine with another number of GPUs.
    return {"numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def restore_rng_state(state: dict) -> None:
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())  # loaded onto the training device, but RNG states are CPU tensors
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


# ---- Stopping: signals, Ctrl-C, divergence --------------------------------------------------------------
class StopSignals:
    """SIGTERM and SIGUSR2 (what Slurm and submitit send before they kill a job) ask the run to stop at the
    end of the current iteration, after a checkpoint. The handlers only set a flag."""

    def __init__(self):
        self.received = None
        self.previous = {signum: signal.signal(signum, self.handle) for signum in (signal.SIGTERM, signal.SIGUSR2)}

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def stop_if_received(self, iteration: int, num_iterations: int, script: str, run_dir: str) -> None:
        """After the iteration's checkpoint: Preempted (exit code 4) if a signal came, unless the run is done."""
        if self.received and iteration < num_iterations:
            raise Preempted(f"stopped by {self.received} after iteration {iteration}, checkpoint written; "
                            f"continue with: python {script}.py --resume {run_dir}")


@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C waits until the block is done, so that a checkpoint and its status.json are written together."""
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_reported(run_dir: str, script: str, checkpoint_interval: int):
    """Ctrl-C ends the run with exit code 130 and the command that continues it."""
    try:
        yield
    except KeyboardInterrupt:
        if has_checkpoint(run_dir):
            print(f"interrupted; continue with: python {script}.py --resume {run_dir}", file=sys.stderr)
        else:
            print(f"interrupted before the first checkpoint (iteration {checkpoint_interval}): nothing to resume",
                  file=sys.stderr)
        raise SystemExit(130) from None


def stop_if_diverged(run_dir: str, iteration: int, global_step: int, stats: list, agents: list) -> None:
    """Stop with Diverged (exit code 3), keeping the last good checkpoint and writing diverged.json, when an
    iteration's losses or gradient norms (already on the host) or the updated weights are non-finite."""
    for i, (agent_stats, agent) in enumerate(zip(stats, agents)):
        whose = f"agent {i + 1}'s " if len(agents) > 1 else ""
        what = next((f"{whose}{key} is {value}" for key, value in agent_stats.items() if not math.isfinite(value)), None)
        if what is None and not bool(torch.isfinite(torch.cat([p.detach().flatten() for p in agent.parameters()])).all()):
            what = f"{whose}weights are non-finite after the update"
        if what:
            write_json(os.path.join(run_dir, "diverged.json"), {"iteration": iteration, "global_step": global_step,
                                                                "what": what})
            kept = (f"the last good checkpoint in {run_dir} is kept" if has_checkpoint(run_dir)
                    else "before the first checkpoint: nothing to resume")
            raise Diverged(f"diverged at iteration {iteration} (step {global_step}): {what}; {kept}")


# ---- Memory ---------------------------------------------------------------------------------------------
# Lower bounds, so that a refused run could never have fit: a Procgen game holds 52-101 KiB of host memory
# before its first step (maze in memory mode to plunder), and a rollout keeps every 64x64x3 frame of an iteration.
GAME_BYTES, FRAME_BYTES = 48 * 1024, 64 * 64 * 3


def check_memory(games: int, frames: int, cuda: bool) -> None:
    """Refuse a run whose games and rollout frames cannot fit in the memory it may use, before anything is built:
    past it, Procgen spends minutes building games and the kernel then kills the run without a word."""
    frame_bytes = frames * FRAME_BYTES
    on_gpu = cuda and torch.cuda.is_available()
    needs = [("memory", games * GAME_BYTES + (0 if on_gpu else frame_bytes), host_memory())]
    if on_gpu:
        needs.append(("GPU memory", frame_bytes, torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory))
    for kind, needed, available in needs:
        if available is not None and needed > available:
            raise UsageError(f"{games:,} games and {frames:,} rollout frames need at least {needed / 2**30:,.1f} GiB of "
                             f"{kind}, more than the {available / 2**30:,.1f} GiB this run may use: lower --num-envs or --num-steps")


def host_memory(meminfo: str = "/proc/meminfo", cgroups: str = "/proc/self/cgroup",
                cgroup_root: str = "/sys/fs/cgroup") -> Optional[int]:
    """The memory this process may use in bytes: RAM and swap, each capped by its control group's limits where
    lower (a Slurm job's --mem, a container's); None where Linux's meminfo does not say (then it is not checked)."""
    try:
        with open(meminfo) as file:
            fields = dict(line.split(":", 1) for line in file if ":" in line)
        ram, swap = (int(fields[name].split()[0]) * 1024 for name in ("MemTotal", "SwapTotal"))
    except (OSError, KeyError, ValueError, IndexError):
        return None
    # cgroup v2 caps memory and swap separately, v1 memory and memory plus swap.
    total = (capped(ram, cgroup_limit("memory.max", "memory.limit_in_bytes", cgroups, cgroup_root))
             + capped(swap, cgroup_limit("memory.swap.max", None, cgroups, cgroup_root)))
    return capped(total, cgroup_limit(None, "memory.memsw.limit_in_bytes", cgroups, cgroup_root))


def capped(value: int, limit: Optional[int]) -> int:
    return value if limit is None else min(value, limit)


def cgroup_limit(v2_file: Optional[str], v1_file: Optional[str], cgroups: str = "/proc/self/cgroup",
                 cgroup_root: str = "/sys/fs/cgroup") -> Optional[int]:
    """The lowest of a memory limit (cgroup v2's file v2_file, v1's v1_file in its memory hierarchy) on this
    process's control group and the groups above it, in bytes; None where none is set or readable."""
    try:
        with open(cgroups) as file:
            memberships = [line.rstrip("\n").split(":", 2) for line in file if line.count(":") >= 2]
    except OSError:
        return None
    limits = []
    for _, controllers, path in memberships:
        if controllers == "" and v2_file:  # cgroup v2, one hierarchy for every controller
            base, limit_file = cgroup_root, v2_file
        elif "memory" in controllers.split(",") and v1_file:
            base, limit_file = os.path.join(cgroup_root, "memory"), v1_file
        else:
            continue
        parts = [part for part in path.split("/") if part]
        if ".." in parts:  # a group outside this cgroup namespace: none of its files is under the mount
            continue
        # In a container the group's path may not exist under the mount, whose root is then the container's own group.
        for depth in range(len(parts), -1, -1):
            try:
                with open(os.path.join(base, *parts[:depth], limit_file)) as file:
                    value = file.read().strip()
            except OSError:
                continue
            if value.isdigit():  # "max" is no limit
                limits.append(int(value))
    return min(limits, default=None)


# ---- Speed, and what a run logs about itself ------------------------------------------------------------
class CudaGraphed:
    """fn(x) replayed from a CUDA graph, for inputs shaped like `example`: one launch, not one per kernel
    (at the rollout's batch the network is launch-bound). The graph reads the parameters where they live,
    so optimiser steps (in place) reach it; its outputs are overwritten by the next call."""

    def __init__(self, fn, example):
        self.input = example.clone()
        # Warm-up draws random numbers; restoring the state keeps a resumed run's stream unchanged.
        rng = torch.cuda.get_rng_state(example.device)
        with torch.inference_mode():
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):  # warm-up on a side stream, as graph capture requires
                for _ in range(3):
                    fn(self.input)
            torch.cuda.current_stream().wait_stream(side_stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = fn(self.input)
        torch.cuda.set_rng_state(rng, example.device)

    def __call__(self, x):
        self.input.copy_(x)
        self.graph.replay()
        return self.output


def keep_freed_memory() -> None:
    """Stop glibc from handing large freed blocks back to the OS after every batch: each activation tensor of
    a minibatch would otherwise be a fresh mmap whose pages fault in again on the next one."""
    with contextlib.suppress(OSError):  # not Linux's glibc: nothing to tune
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap'd blocks, so large blocks are reused from the heap
        libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap


class Timer:
    """Wall-clock seconds of the parts of one iteration as perf/* scalars (bench.py reads them)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds = {}

    def lap(self, name=None):
        now = time.perf_counter()
        if name:
            self.seconds[name] = now - self.last
        self.last = now

    def log(self, writer, step):
        self.seconds["iteration"] = time.perf_counter() - self.start
        for name, seconds in self.seconds.items():
            writer.add_scalar(f"perf/{name}_seconds", seconds, step)


def hyperparameter_table(args) -> str:
    return "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())


def usable_cores() -> int:
    """The cores this process may run on: a Slurm job or `taskset` allows fewer than the machine has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_description(device) -> str:
    """What this process trains on, logged as text at each start, so a run resumed elsewhere says so."""
    cores, machine_cores = usable_cores(), os.cpu_count() or 1
    cpu = f"CPU, {cores} cores" if cores >= machine_cores else f"CPU, {cores} of {machine_cores} cores"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return f"{where}; torch {torch.__version__}; Python {sys.version.split()[0]}; commit {source_commit()}"


def source_commit() -> str:
    """The scripts' git commit, with "+changes" when tracked files differ from it; "unknown" outside git."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        described = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "describe", "--always",
                                    "--abbrev=7", "--dirty=+changes", "--exclude=*"], capture_output=True, text=True, timeout=10)
        if described.returncode == 0:
            return described.stdout.strip()
    return "unknown"


def start_tracking(args, run_dir: str) -> None:
    """Mirror the TensorBoard logs to Weights & Biases (open_run_dir has checked that it is installed)."""
    import wandb
    wandb.tensorboard.patch(root_logdir=run_dir)
    name = os.path.basename(run_dir.rstrip("/"))
    # W&B's own files go beside the run directory: inside it, its watcher of the run directory's events reads
    # the copies W&B makes of them, copies of copies without end, and drops MDPO's run-level stream.
    wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args), name=name, id=name,
               resume="allow", dir=os.path.dirname(os.path.abspath(run_dir)), save_code=True)
