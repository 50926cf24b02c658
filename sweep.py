"""Run a grid of (method, game, seed) training jobs, locally or on Slurm through submitit.

Every job trains into {root}/runs/{game}__{method}__{seed}, so running the same sweep again is safe:
- a finished run is skipped, if it was made with the same flags (all of them, except the ones a run may
  resume with changed: run_utils.RESUMABLE_FIELDS), also once its checkpoint.pt is removed; one made with
  other flags is reported in one line and skipped, never overwritten: move it away or use another --root;
- a run with a checkpoint resumes (also when --total-timesteps grew: the run is extended);
- a run in use (another sweep or training process holds its lock) is reported and left alone;
- a run that diverged (exit code 3, diverged.json) is reported with where it diverged, and never rerun;
- a run stopped by SIGTERM/SIGUSR2 (exit code 4, checkpoint written) is reported as preempted and
  resumes the next time; on Slurm, submitit requeues it. The sweep passes these signals on to its
  training processes, and lets submitit requeue only once the training process has checkpointed (a job
  signalled before its training process started is requeued too);
- with --stop-after-min (local), the sweep stops its runs the same way when that much time has passed
  and reports them as stopped: the time-boxed side-by-side comparison of a GPU slice;
- a run directory without a checkpoint, and not in use, starts afresh, unless its status.json says it once
  had one: an unfinished run whose checkpoint.pt was removed is reported and left as it is.
The sweep exits with 1 when a job failed, diverged, was preempted, was made with other flags, lost its
checkpoint unfinished or never started, else 0.

    python sweep.py --list-methods      # every method, with what it controls for
    # 2 jobs at a time on this machine (spread over the visible GPUs: CUDA_VISIBLE_DEVICES, if set)
    python sweep.py --root sweeps/demo --methods ppo mdpo --games bigfish starpilot --seeds 1 2 \
        --jobs 2 --flags="--total-timesteps 100000"
    # four runs (PPO and MDPO, seeds 1 and 2) side by side on one GPU for 8 minutes, whatever steps they reach
    python sweep.py --root sweeps/slice --methods ppo mdpo --seeds 1 2 --jobs 4 --stop-after-min 8 \
        --games starpilot --flags="--bf16 --compile --eval-interval 4"
    # the paper's grid on a Slurm cluster, one GPU per job
    python sweep.py --root sweeps/paper --launcher slurm --partition gpu --time-min 2880 --gpus-per-job 1

ppo_2x gets twice the --num-envs and twice the --total-timesteps that --flags give the other methods
(defaults included), and evaluates on as many episodes as they do.
"""

import contextlib
import fcntl
import json
import math
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, List, Literal, Optional

import tyro

import drac
import mdpo
import ppo
import run_utils
from ppo import PROCGEN_GAMES
from run_data import DRAC_BEST, DRAC_BEST_ABOUT, DRAC_BEST_AUGMENT, METHODS

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_METHODS = ["ppo", "ppo_l2", "ppo_dropout", "ppo_2x", DRAC_BEST, "ppo_ucb_drac", "mdpo", "mdpo_alpha0"]
SCRIPTS = {"ppo": ppo, "drac": drac, "mdpo": mdpo}


def method_list() -> str:
    """Every method with what it controls for, one a line."""
    width = max(map(len, METHODS))
    lines = [f"{name:<{width}}  {method.about}" for name, method in METHODS.items()]
    return "\n".join(lines + [f"{DRAC_BEST:<{width}}  {DRAC_BEST_ABOUT}"])


# Flags the sweep sets for each job; in --flags they would relabel runs or overwrite each other's.
JOB_FLAGS = {"--env-id", "--seed", "--exp-name", "--run-dir", "--resume"} | {
    flag for method in METHODS.values() for flag in method.flags[::2]}
# The budget flags ppo_2x scales; it evaluates on as many episodes as the other methods do.
BUDGET_FLAGS = {"--num-envs", "--total-timesteps", "--eval-episodes"}
# Signals that ask a run to stop: Slurm sends SIGTERM before it kills or preempts a job, submitit has it
# send SIGUSR2 before the time limit. The training scripts checkpoint on either and exit with code 4.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
EXIT_DIVERGED, EXIT_PREEMPTED = 3, 4


@dataclass
class SweepArgs:
    root: str = "sweeps/default"
    """directory of the sweep: runs/, logs/, locks/ and submitit/ go under it"""
    methods: List[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    """methods to run (--list-methods lists them)"""
    games: List[str] = field(default_factory=lambda: list(PROCGEN_GAMES))
    """Procgen games"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds"""
    flags: str = ""
    """extra flags for every job, as one string, e.g. "--total-timesteps 1000000 --num-envs 16\""""
    launcher: Literal["local", "slurm", "submitit-local"] = "local"
    """local: a pool of subprocesses here; slurm: one Slurm job per run; submitit-local: submitit's local executor"""
    jobs: int = 1
    """local, submitit-local: how many jobs run at once (each job's torch gets an equal share of the cores)"""
    gpus: Optional[List[str]] = None
    """local, submitit-local: GPU ids to spread the jobs over, one per job at a time (default: the visible
    GPUs: CUDA_VISIBLE_DEVICES if set, else all; none on a CPU machine)"""
    partition: Optional[str] = None
    """slurm: partition"""
    time_min: int = 2880
    """slurm: time limit per job, minutes (an interrupted job is requeued and resumes)"""
    gpus_per_job: int = 1
    """slurm: GPUs per job"""
    cpus_per_job: int = 8
    """slurm: CPU cores per job"""
    mem_gb_per_job: Optional[float] = None
    """slurm: memory per job in GB (default: the cluster's); a run that could never fit in it stops in one line"""
    account: Optional[str] = None
    """slurm: the account the jobs are charged to, where the cluster asks for one (other sbatch options:
    its SBATCH_* environment variables, e.g. SBATCH_QOS)"""
    max_parallel: int = 64
    """slurm: how many jobs of the array run at once"""
    signal_delay_s: int = 180
    """slurm: seconds between the stop signal (SIGUSR2) before the time limit and the kill: time for the
    training process to finish its iteration and write a checkpoint"""
    stop_after_min: Optional[float] = None
    """local: a wall-clock budget. When it has passed, the running jobs are stopped as by SIGTERM (each
    checkpoints at the end of its iteration and exits; the next sweep resumes it), and no job starts"""
    dry_run: bool = False
    """print what each job would do, and run nothing"""
    list_methods: bool = False
    """print every method with what it controls for, and exit"""


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


@dataclass
class Outcome:
    kind: str  # done, trained, resumed, locked, diverged, mismatch, preempted, stopped, failed, not started
    detail: str = ""

    def __str__(self):
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


# Outcomes after which the sweep has not got what it was asked for (a locked run is being trained elsewhere).
UNSUCCESSFUL = {"diverged", "mismatch", "no checkpoint", "preempted", "failed", "not started"}


# ---------------------------------------------------------------------------------------------
# Locks. A training process holds run_dir/lock while it trains (run_utils.lock_run_dir); a sweep job holds
# {root}/locks/{name} from its decision to skip, resume or start until its training process has exited,
# so that two sweeps on one root never both start, or delete, the same run.
# ---------------------------------------------------------------------------------------------


def describe_owner(text: str) -> str:
    try:
        owner = json.loads(text)
        slurm = f" (Slurm job {owner['slurm_job_id']})" if owner.get("slurm_job_id") else ""
        return f"{owner['host']}:{owner['pid']}{slurm}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return text.strip() or "another process"


def lock_owner(path: str) -> Optional[str]:
    """Who holds the lock on path, or None when nobody does (the same non-blocking flock the owner
    takes, released at once)."""
    try:
        f = open(path, "r+")  # r+: an exclusive flock over NFS needs a file open for writing
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return describe_owner(f.read())
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def take_lock(path: str):
    """(the locked file, None), or (None, its owner) when another process holds it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = describe_owner(f.read())
        f.close()
        return None, owner
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "slurm_job_id": os.environ.get("SLURM_JOB_ID")}))
    f.flush()
    return f, None


def read_json(path: str):
    """The JSON in path, None when the file is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------


class SignalForwarder:
    """Passes SIGTERM and SIGUSR2 that this process receives on to the training processes it runs (which
    checkpoint and exit with code 4), and remembers the signal so that no new training starts."""

    def __init__(self):
        self.children = set()
        self.received = None
        self.out_of_time = False  # the stop came from --stop-after-min, not from outside

    def stop_for_time(self):
        """--stop-after-min ran out: stop the runs as a scheduler's SIGTERM would (unless a signal from
        outside already stopped them: they are then preempted, not stopped by the budget)."""
        if self.received:
            return
        self.out_of_time = True
        self.handle(signal.SIGTERM, None)

    def handle(self, signum, frame):
        self.received = signum
        for child in tuple(self.children):  # tuple(): one step under the GIL, safe against worker threads
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    @contextlib.contextmanager
    def installed(self):
        """Forward the stop signals while the block runs (main thread only); yields the handlers it replaced."""
        self.received, self.out_of_time = None, False
        previous = {signum: signal.signal(signum, self.handle) for signum in STOP_SIGNALS}
        try:
            yield previous
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def run(self, command: List[str], log, env: dict) -> Optional[int]:
        """The exit code of the command, None when a stop signal came before it could start."""
        if self.received:
            return None
        with subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env) as child:
            self.children.add(child)
            try:
                if self.received:  # arrived between the check above and add(): handle() missed this child
                    child.send_signal(self.received)
                return child.wait()
            finally:
                self.children.discard(child)


FORWARDER = SignalForwarder()


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------


def config_difference(config: dict, expected: dict, script: str) -> Optional[str]:
    """How a run's config.json differs from what the job would run, in the fields a resume may not
    change; None when it does not. A run of another version of the script (other flags) is refused, as the
    scripts' resume refuses it."""
    if not isinstance(config, dict) or not isinstance(config.get("args"), dict):
        return "its config.json is missing or not a run's config"
    if config.get("script") != script:
        return f"it was made by {config.get('script')}.py, not {script}.py"
    difference = run_utils.flag_difference(config, expected)
    if difference:
        return difference
    saved_total, total = config["args"].get("total_timesteps"), expected["total_timesteps"]
    if not isinstance(saved_total, int) or saved_total > total:
        return f"--total-timesteps is {saved_total!r} in the run, {total!r} here (a run is extended, never shortened)"
    return None


class JobFailed(Exception):
    pass


class Job:
    """One training run. Calling it decides at run time whether to skip, resume or start, so that a
    requeued Slurm job (submitit calls checkpoint() on preemption or timeout) picks up where it was."""

    def __init__(self, root, method, game, seed, flags, expected: dict):
        self.method, self.game, self.seed = method, game, seed
        self.script = METHODS[method].script
        self.name = f"{game}__{method}__{seed}"
        root = os.path.abspath(root)
        self.run_dir = os.path.join(root, "runs", self.name)
        self.log_path = os.path.join(root, "logs", self.name + ".log")
        self.claim_path = os.path.join(root, "locks", self.name)
        self.base = [sys.executable, os.path.join(ROOT, self.script + ".py")]
        self.flags = ["--env-id", game, "--seed", str(seed), "--exp-name", method, *METHODS[method].flags, *flags]
        self.expected = expected  # the Args the job runs with, as config.json stores them

    def state(self) -> Outcome:
        """locked, diverged, mismatch or done (nothing to run), resume or new."""
        for path in (self.claim_path, os.path.join(self.run_dir, "lock")):
            owner = lock_owner(path)
            if owner:
                return Outcome("locked", f"in use by {owner}")
        return self.run_dir_state()

    def run_dir_state(self) -> Outcome:
        diverged = os.path.join(self.run_dir, "diverged.json")
        if os.path.exists(diverged):
            return Outcome("diverged", describe_divergence(read_json(diverged)) + "; not rerun")
        has_checkpoint = run_utils.has_checkpoint(self.run_dir)
        status_path = os.path.join(self.run_dir, "status.json")  # written only beside a checkpoint
        if not has_checkpoint and not os.path.isfile(status_path):
            return Outcome("new")
        difference = config_difference(read_json(os.path.join(self.run_dir, "config.json")), self.expected,
                                       self.script)
        if difference:
            return Outcome("mismatch", f"{self.run_dir} was made with other flags ({difference}); "
                                       "left as it is: move it away or use another --root")
        status = read_json(status_path)
        status = status if isinstance(status, dict) else {}
        saved_total = read_json(os.path.join(self.run_dir, "config.json"))["args"]["total_timesteps"]
        # status.json's own iteration, not only its "finished": a resume killed as it began may have left
        # config.json with the new total beside the status of the shorter run
        reached = isinstance(status.get("iteration"), int) and status["iteration"] >= self.expected["num_iterations"]
        if status.get("finished") and reached and saved_total == self.expected["total_timesteps"]:
            return Outcome("done")  # with or without its checkpoint.pt, which a user may remove to save space
        if not has_checkpoint:
            return Outcome("no checkpoint", f"{self.run_dir} holds a run without its checkpoint.pt, not finished at "
                                            f"--total-timesteps {self.expected['total_timesteps']:,}; left as it is: "
                                            "move it away to train it again")
        return Outcome("resume")

    def command(self, state: str) -> List[str]:
        if state == "resume":
            return self.base + ["--resume", self.run_dir, *self.flags]
        return self.base + ["--run-dir", self.run_dir, *self.flags]

    def __call__(self, env: Optional[dict] = None) -> Outcome:
        claim, owner = take_lock(self.claim_path)
        if claim is None:
            return Outcome("locked", f"in use by {owner}")
        with claim:
            owner = lock_owner(os.path.join(self.run_dir, "lock"))
            if owner:
                return Outcome("locked", f"in use by {owner}")
            state = self.run_dir_state()
            if state.kind not in ("new", "resume"):
                return state
            if state.kind == "new" and os.path.exists(self.run_dir):
                shutil.rmtree(self.run_dir)  # stopped before its first checkpoint, and not in use: nothing to keep
            if threading.current_thread() is not threading.main_thread():
                return self.train(state.kind, env)  # the sweep's main thread forwards the signals
            with FORWARDER.installed() as previous:
                outcome = self.train(state.kind, env)
        if outcome.kind in ("preempted", "not started") and callable(previous.get(FORWARDER.received)):
            # Only now that the training process has checkpointed and exited (or never started), let the
            # handler we replaced act: under submitit, it calls checkpoint() and requeues the job.
            previous[FORWARDER.received](FORWARDER.received, None)
        return outcome

    def train(self, state: str, env: Optional[dict]) -> Outcome:
        command = self.command(state)
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            code = FORWARDER.run(command, log, {**os.environ, **(env or {})})
        if code == 0:
            return Outcome("resumed" if state == "resume" else "trained")
        if code is None:
            why = "the --stop-after-min budget ran out" if FORWARDER.out_of_time else \
                f"stopped by {signal.Signals(FORWARDER.received).name}"
            return Outcome("not started", why + " before it started")
        if code == EXIT_DIVERGED:
            diverged = read_json(os.path.join(self.run_dir, "diverged.json"))
            return Outcome("diverged", describe_divergence(diverged) + f"; see {self.log_path}")
        if FORWARDER.out_of_time and (code == EXIT_PREEMPTED or code < 0):
            return Outcome("stopped", f"at the --stop-after-min budget (exit {code}); the next run of the sweep "
                                      "resumes it from its last checkpoint")
        if code == EXIT_PREEMPTED or (FORWARDER.received and code < 0):
            return Outcome("preempted", f"stopped by a signal (exit {code}); the next run of the sweep resumes it "
                                        "from its last checkpoint")
        raise JobFailed(f"{self.name} failed (exit {code}): {last_line(self.log_path)}; see {self.log_path}")

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def describe_divergence(record) -> str:
    if not isinstance(record, dict) or "iteration" not in record:
        return "diverged (exit code 3), without a readable diverged.json"
    return f"diverged at iteration {record['iteration']}: {record.get('what')}"


def last_line(path: str) -> str:
    """The last non-empty line of a log: where the training script says what went wrong."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f.readlines()[-50:] if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------
# Building the jobs
# ---------------------------------------------------------------------------------------------


def resolve_method(method: str, game: str) -> str:
    return f"ppo_drac_{DRAC_BEST_AUGMENT[game]}" if method == DRAC_BEST else method


def without_flags(flags: List[str], names: set) -> List[str]:
    """flags less the named ones and their values (--name value and --name=value, - or _)."""
    kept, skip = [], False
    for flag in flags:
        name = flag.split("=", 1)[0].replace("_", "-")
        if skip:
            skip = False
        elif name in names:
            skip = "=" not in flag
        else:
            kept.append(flag)
    return kept


def method_flags(method: str, flags: List[str], games: List[str]) -> List[str]:
    """The extra flags of the method's jobs: --flags, with ppo_2x's budget doubled."""
    scale = METHODS[method].budget_scale
    if scale == 1:
        return flags
    base = parse_flags(method, flags, games)
    return [*without_flags(flags, BUDGET_FLAGS), "--num-envs", str(scale * base.num_envs),
            "--total-timesteps", str(scale * base.total_timesteps),
            "--eval-episodes", str(base.eval_episodes or base.num_envs)]


def check_settings(args: SweepArgs) -> List[str]:
    """The extra flags, after refusing bad sweep settings."""
    for name in ("jobs", "time_min", "cpus_per_job", "max_parallel", "signal_delay_s"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.gpus_per_job < 0:  # 0: CPU jobs
        raise UsageError(f"--gpus-per-job must not be negative, got {args.gpus_per_job}")
    for name in ("methods", "games", "seeds"):
        if not getattr(args, name):
            raise UsageError(f"--{name} is empty: name at least one")
    if os.path.exists(args.root) and not os.path.isdir(args.root):
        raise UsageError(f"--root {args.root} is a file, not a directory")
    # Slurm reads --mem=0 (below 1 MB once in MB) as all of a node's memory.
    if args.mem_gb_per_job is not None and not 1 / 1024 <= args.mem_gb_per_job < math.inf:  # also nan
        raise UsageError(f"--mem-gb-per-job must be a finite number of GB, at least 1/1024, got {args.mem_gb_per_job}")
    if args.stop_after_min is not None:
        if not 0 < args.stop_after_min < math.inf:  # also nan
            raise UsageError(f"--stop-after-min must be positive and finite, got {args.stop_after_min}")
        if args.launcher != "local":
            raise UsageError(f"--stop-after-min is for the local launcher (--launcher {args.launcher}: "
                             "--time-min limits a job's time)")
    known = [*METHODS, DRAC_BEST]
    unknown = [m for m in args.methods if m not in known] + [g for g in args.games if g not in PROCGEN_GAMES]
    if unknown:
        raise UsageError(f"unknown method or game {unknown[0]!r}; methods: {', '.join(known)} "
                         f"(--list-methods says what each is); games: {', '.join(PROCGEN_GAMES)}")
    try:
        flags = shlex.split(args.flags)
    except ValueError as error:  # an unclosed quote
        raise UsageError(f"--flags {args.flags!r}: {str(error).lower()}") from None
    for flag in flags:
        name = flag.split("=", 1)[0].replace("_", "-")
        if name in JOB_FLAGS:
            raise UsageError(f"--flags must not set {name}: the sweep sets it for each job")
    return flags


def make_jobs(args: SweepArgs) -> List[Job]:
    flags = check_settings(args)
    methods_of = {game: list(dict.fromkeys(resolve_method(m, game) for m in args.methods)) for game in args.games}
    games_of = {}
    for game, methods in methods_of.items():
        for method in methods:
            games_of.setdefault(method, []).append(game)
    flags_of = {method: method_flags(method, flags, games) for method, games in games_of.items()}
    parsed = {method: parse_flags(method, flags_of[method], games) for method, games in games_of.items()}
    jobs = []
    for game in dict.fromkeys(args.games):  # a game or seed named twice is one run directory
        for method in methods_of[game]:
            module = SCRIPTS[METHODS[method].script]
            for seed in dict.fromkeys(args.seeds):
                try:
                    expected = asdict(module.validate_args(replace(parsed[method], env_id=game, seed=seed,
                                                                   exp_name=method)))
                except module.UsageError as error:  # the seed: the rest was checked by parse_flags
                    raise UsageError(f"--seeds {seed}: {error}") from None
                jobs.append(Job(args.root, method, game, seed, flags_of[method], expected))
    return jobs


def parse_flags(method: str, flags: List[str], games: List[str]):
    """The method's Args from the extra flags, parsed and checked for every game as its script will:
    a bad flag fails here, once, not in every job."""
    script, flags = METHODS[method].script, [*METHODS[method].flags, *flags]
    module = SCRIPTS[script]
    # An unknown or malformed flag: tyro prints what is wrong and exits with 2.
    args = tyro.cli(module.Args, args=flags, prog=f"{script}.py, in the sweep --flags")  # no quote: tyro's help splits prog
    try:
        for game in games:
            module.validate_args(replace(args, env_id=game))
    except module.UsageError as error:
        raise UsageError(f"--flags for {method}: {error}") from None
    try:
        run_utils.check_tracking(args.track)  # each job would fail with it
    except run_utils.UsageError as error:
        raise UsageError(f"--flags {error}") from None
    return args


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def visible_gpus() -> List[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set (by the user or a scheduler), else all."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None:
        return [gpu.strip() for gpu in inherited.split(",") if gpu.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i in range(sum(line.startswith("GPU ") for line in out.splitlines()))]


def job_gpus(args: SweepArgs) -> List[str]:
    visible = visible_gpus()
    if args.gpus is None:
        return visible
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        hidden = [gpu for gpu in args.gpus if gpu not in visible]
        if hidden:
            inherited = os.environ["CUDA_VISIBLE_DEVICES"]
            raise UsageError(f"--gpus {hidden[0]} is not among CUDA_VISIBLE_DEVICES={inherited}")
    elif visible:  # an index past nvidia-smi's GPUs: the job's torch would see none and train on the CPU
        missing = [gpu for gpu in args.gpus if gpu.isdigit() and gpu not in visible]
        if missing:
            raise UsageError(f"--gpus {missing[0]}: nvidia-smi lists GPUs 0 to {len(visible) - 1} only")
    return list(args.gpus)


def cpu_share(running: int) -> Optional[str]:
    """Each of `running` jobs' torch threads (OMP_NUM_THREADS), an equal share of this process's cores: each job's
    torch would otherwise take every core, and spinning threads of several jobs slow each other far more than
    the share costs. None with one job, or where the user set OMP_NUM_THREADS."""
    if running < 2 or "OMP_NUM_THREADS" in os.environ:
        return None
    return str(max(1, run_utils.usable_cores() // running))


def run_pool(jobs: List[Job], slots: int, gpus: List[str], start: Callable,
             stop_after_s: Optional[float] = None) -> List[Outcome]:
    """Runs the jobs on `slots` workers, worker k on GPU gpus[k % len(gpus)]: start(job, env) runs one
    and returns its Outcome. Stops starting jobs once a stop signal came (forwarded to the running ones)
    or stop_after_s seconds have passed (then the running ones are sent SIGTERM)."""
    todo = queue.Queue()
    for job in jobs:
        todo.put(job)
    outcomes = {}
    lock, counts, start_time = threading.Lock(), {"ended": 0, "running": 0}, time.time()

    def report(message):
        print(f"[{time.time() - start_time:7.0f}s] {counts['ended']}/{len(jobs)} ended, "
              f"{counts['running']} running | {message}", flush=True)

    threads_each = cpu_share(min(slots, len(jobs)))

    def worker(slot):
        env = {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} if gpus else {}
        if threads_each:
            env["OMP_NUM_THREADS"] = threads_each
        while not FORWARDER.received:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            with lock:
                counts["running"] += 1
                report(f"start {job.name}" + (f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else ""))
            try:
                outcome = start(job, env)
            except Exception as error:  # a failed job, or submitit's wrapping of one: the others go on
                outcome = Outcome("failed", str(error).strip().splitlines()[-1] if str(error).strip() else repr(error))
            with lock:
                counts["running"] -= 1
                counts["ended"] += 1
                outcomes[job.name] = outcome
                report(f"{job.name}: {outcome}")

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(slots)]
    timer = threading.Timer(stop_after_s, FORWARDER.stop_for_time) if stop_after_s else None
    with FORWARDER.installed():
        if timer:
            timer.daemon = True  # never what keeps the process alive (after Ctrl-C, say)
            timer.start()
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            if timer:
                timer.cancel()
    why = "the --stop-after-min budget ran out" if FORWARDER.out_of_time else "the sweep was stopped"
    for job in jobs:
        if job.name not in outcomes:  # never taken from the queue: say so, as the ended ones were
            outcomes[job.name] = Outcome("not started", why)
            print(f"{job.name}: {outcomes[job.name]}", flush=True)
    return [outcomes[job.name] for job in jobs]


def run_local(jobs: List[Job], args: SweepArgs) -> List[Outcome]:
    stop_after_s = args.stop_after_min * 60 if args.stop_after_min else None
    return run_pool(jobs, args.jobs, job_gpus(args), lambda job, env: job(env), stop_after_s)


def run_submitit_local(jobs: List[Job], args: SweepArgs) -> List[Outcome]:
    """submitit's local executor starts every job as soon as it is submitted: the pool submits one job per
    worker and waits for it, so that --jobs bound what runs at once."""
    import submitit

    # LocalExecutor itself: AutoExecutor refuses visible_gpus, the local executor's way to pick a job's GPU.
    executor = submitit.LocalExecutor(folder=os.path.join(args.root, "submitit", "%j"))
    executor.update_parameters(timeout_min=args.time_min)
    submitting = threading.Lock()

    def start(job, env):
        gpu = env.get("CUDA_VISIBLE_DEVICES")
        with submitting:  # update_parameters and submit together, one job at a time
            # Without gpus_per_node, submitit hides every GPU from the job (CUDA_VISIBLE_DEVICES="").
            executor.update_parameters(gpus_per_node=1 if gpu else 0,
                                       visible_gpus=(int(gpu),) if gpu and gpu.isdigit() else ())
            handle = executor.submit(job, env)  # env also reaches the training process: GPU ids that are not numbers
        return handle.result()

    return run_pool(jobs, args.jobs, job_gpus(args), start)


def run_slurm(jobs: List[Job], args: SweepArgs) -> List[Outcome]:
    import submitit
    from submitit.core.utils import FailedJobError

    executor = submitit.AutoExecutor(folder=os.path.join(args.root, "submitit", "%j"), cluster="slurm")
    executor.update_parameters(timeout_min=args.time_min, name="mdpo-sweep", slurm_partition=args.partition,
                               gpus_per_node=args.gpus_per_job, cpus_per_task=args.cpus_per_job,
                               slurm_array_parallelism=args.max_parallel, slurm_signal_delay_s=args.signal_delay_s)
    if args.mem_gb_per_job is not None:
        executor.update_parameters(mem_gb=args.mem_gb_per_job)
    if args.account is not None:
        executor.update_parameters(slurm_account=args.account)
    try:
        with executor.batch():
            submitted = [executor.submit(job) for job in jobs]
    except FailedJobError as error:  # sbatch's own line: a partition, gres or account it refused
        said = str(error).strip().splitlines()
        raise UsageError(f"Slurm refused the jobs: {said[-1] if said else 'sbatch failed without a message'}") from None
    print(f"submitted {len(submitted)} jobs to slurm; job ids {submitted[0].job_id} ... {submitted[-1].job_id}; "
          "run this command again later: it skips what is finished or running and resubmits the rest", flush=True)
    return []  # the cluster runs them


def main(args: SweepArgs) -> int:
    if args.list_methods:
        print(method_list())
        return 0
    jobs = make_jobs(args)
    states = [job.state() for job in jobs]
    for job, state in zip(jobs, states):
        if state.kind not in ("done", "new", "resume"):
            print(f"{job.name}: {state}", flush=True)
    pending = [job for job, state in zip(jobs, states) if state.kind in ("new", "resume")]
    finished = sum(state.kind == "done" for state in states)
    resuming = sum(state.kind == "resume" for state in states)
    skipped = len(jobs) - finished - len(pending)
    print(f"{len(jobs)} jobs, {finished} already finished, {len(pending)} to run"
          + (f" ({resuming} from their checkpoints)" if resuming else "")
          + (f", {skipped} skipped (above)" if skipped else ""), flush=True)
    outcomes = []
    if args.dry_run:
        for job, state in zip(jobs, states):
            if state.kind in ("new", "resume"):
                print(shlex.join(job.command(state.kind)))
    elif pending:
        launch = {"local": run_local, "submitit-local": run_submitit_local, "slurm": run_slurm}[args.launcher]
        outcomes = launch(pending, args)
    return 1 if any(outcome.kind in UNSUCCESSFUL for outcome in [*states, *outcomes]) else 0


def flags_attached(argv: List[str]) -> List[str]:
    """argv with `--flags VALUE` as `--flags=VALUE`: tyro takes a separate value starting with -- for a flag.
    A second --flags is refused: tyro would keep the last and drop the first without a word."""
    attached, rest = [], list(argv)
    while rest:
        word = rest.pop(0)
        attached.append(f"--flags={rest.pop(0)}" if word == "--flags" and rest else word)
    if sum(word == "--flags" or word.startswith("--flags=") for word in attached) > 1:
        raise UsageError("--flags is given more than once: put every flag in one --flags \"...\"")
    return attached


if __name__ == "__main__":
    try:
        cli_args = tyro.cli(SweepArgs, args=flags_attached(sys.argv[1:]))
        sys.exit(main(cli_args))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
