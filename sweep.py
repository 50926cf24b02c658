"""Run a grid of (method, game, seed) training jobs, locally or on Slurm through submitit.

Every job trains into {root}/runs/{game}__{method}__{seed}, so running the same sweep again is
safe: a finished job is skipped, an interrupted one resumes from its checkpoint, a new one starts.

    # 2 jobs at a time on this machine (spread over the visible GPUs, if any)
    python sweep.py --root sweeps/demo --methods ppo mdpo --games bigfish starpilot --seeds 1 2 \
        --jobs 2 --flags="--total-timesteps 100000"
    # the paper's grid on a Slurm cluster, one GPU per job
    python sweep.py --root sweeps/paper --launcher slurm --partition gpu --time-min 2880 --gpus-per-job 1
"""

import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import List, Literal, Optional, Tuple

import tyro

import mdpo
import ppo
from ppo import PROCGEN_GAMES

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Method:
    script: str  # "ppo" or "mdpo"
    flags: Tuple[str, ...]  # the flags that make the method, as (flag, value) pairs
    about: str  # what it controls for, one line
    budget_scale: int = 1  # ppo_2x: the envs and total steps of --flags, times this


# The augmentation DrAC (Raileanu et al. 2021) found best on each Procgen game: the per-game table
# used with rraileanu/auto-drac's train.py (`env_to_aug`). ppo_drac_best runs each game with its entry.
DRAC_BEST_AUGMENT = {
    "bigfish": "crop", "bossfight": "flip", "caveflyer": "rotate", "chaser": "crop", "climber": "color-jitter",
    "coinrun": "random-conv", "dodgeball": "crop", "fruitbot": "crop", "heist": "crop", "jumper": "random-conv",
    "leaper": "crop", "maze": "crop", "miner": "color-jitter", "ninja": "color-jitter", "plunder": "crop",
    "starpilot": "crop",
}
DRAC_COEF = "0.1"  # DrAC's alpha_r for Procgen


def drac_about(augment: str) -> str:
    games = ", ".join(game for game, best in DRAC_BEST_AUGMENT.items() if best == augment)
    return f"PPO + DrAC with {augment} (Raileanu et al. 2021), DrAC's best on {games}: regularisation by augmentation"


METHODS = {
    "ppo": Method("ppo", (), "the baseline: PPO at the paper's settings"),
    "ppo_l2": Method("ppo", ("--l2-coef", "1e-4"),
                     "PPO + L2 weight penalty (Cobbe et al. 2019): is MDPO's gain generic weight regularisation?"),
    "ppo_dropout": Method("ppo", ("--dropout", "0.1"),
                          "PPO + dropout after each convolution (Cobbe et al. 2019): is it noise in the encoder?"),
    "ppo_2x": Method("ppo", (), "PPO with twice the envs and twice the steps: as many samples per iteration and in "
                     "all as MDPO's two agents together, the same iterations (sample-matched)", budget_scale=2),
    **{f"ppo_drac_{augment}": Method("ppo", ("--augment", augment, "--drac-coef", DRAC_COEF), drac_about(augment))
       for augment in sorted(set(DRAC_BEST_AUGMENT.values()))},
    "ppo_ucb_drac": Method("ppo", ("--augment", "ucb", "--drac-coef", DRAC_COEF),
                           "PPO + UCB-DrAC (Raileanu et al. 2021): DrAC choosing its augmentation by a bandit"),
    "mdpo": Method("mdpo", (), "MDPO: two agents, each also pulled towards the other's policy by a KL term"),
    "mdpo_alpha0": Method("mdpo", ("--alpha", "0"), "MDPO without the KL term: the same two-agent training, loss "
                          "scaling, clipping and optimiser; isolates the KL term"),
}
# Not a method of its own: stands for ppo_drac_<DrAC's best augmentation on the job's game>.
DRAC_BEST = "ppo_drac_best"
DRAC_BEST_ABOUT = "each game's ppo_drac_<augment> with the augmentation DrAC found best on it"
DEFAULT_METHODS = ["ppo", "ppo_l2", "ppo_dropout", "ppo_2x", DRAC_BEST, "mdpo", "mdpo_alpha0"]

# The Args fields that tell the methods apart, with their values when no flag sets them. Runs made before
# these fields existed lack them in config.json and ran at these values.
METHOD_FIELDS = {
    "ppo": {"l2_coef": 0.0, "dropout": 0.0, "augment": "none", "drac_coef": 0.0},
    "mdpo": {"num_agents": 2, "alpha": 1.0, "detach_peer": False},
}


def method_settings(script: str, flags: Tuple[str, ...]) -> dict:
    """The method fields a script runs with under these (flag, value) pairs."""
    settings = dict(METHOD_FIELDS[script])
    for flag, value in zip(flags[::2], flags[1::2]):
        name = flag[2:].replace("-", "_")
        settings[name] = type(settings[name])(value)
    return settings


def method_of(config: dict) -> str:
    """The method a run is, from its config.json ({"script", "args"}): the method whose flags give the run's
    method fields. ppo and ppo_2x differ only in budget, which one run cannot show against its sweep's, so
    there the run's exp_name (the sweep sets it to the method) decides. A run that matches no method is named
    by its script and the method fields it changed, e.g. 'ppo (l2_coef=0.001)'."""
    script, args = config.get("script"), config.get("args")
    if script not in METHOD_FIELDS or not isinstance(args, dict):
        return f"unknown ({script})"
    settings = {name: args.get(name, default) for name, default in METHOD_FIELDS[script].items()}
    matches = [name for name, method in METHODS.items()
               if method.script == script and method_settings(script, method.flags) == settings]
    if args.get("exp_name") in matches:
        return args["exp_name"]
    plain = [name for name in matches if METHODS[name].budget_scale == 1]
    if plain:
        return plain[0]
    changed = [f"{name}={value}" for name, value in settings.items() if value != METHOD_FIELDS[script][name]]
    return f"{script} ({', '.join(changed)})"


def method_list() -> str:
    """Every method with what it controls for, one a line."""
    width = max(map(len, METHODS))
    lines = [f"{name:<{width}}  {method.about}" for name, method in METHODS.items()]
    return "\n".join(lines + [f"{DRAC_BEST:<{width}}  {DRAC_BEST_ABOUT}"])


# Flags the sweep sets for each job; in --flags they would relabel runs or overwrite each other's.
JOB_FLAGS = {"--env-id", "--seed", "--exp-name", "--run-dir", "--resume"} | {
    flag for method in METHODS.values() for flag in method.flags[::2]}


@dataclass
class SweepArgs:
    root: str = "sweeps/default"
    """directory of the sweep: runs/, logs/ and submitit/ go under it"""
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    """methods to run: ppo, ppo_l2, ppo_dropout, mdpo"""
    games: List[str] = field(default_factory=lambda: list(PROCGEN_GAMES))
    """Procgen games"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds"""
    flags: str = ""
    """extra flags for every job, as one string, e.g. "--total-timesteps 1000000 --num-envs 16\""""
    launcher: Literal["local", "slurm", "submitit-local"] = "local"
    """local: a pool of subprocesses here; slurm: one Slurm job per run; submitit-local: submitit's local executor"""
    jobs: int = 1
    """local: how many jobs run at once"""
    gpus: Optional[List[int]] = None
    """local: GPU ids to spread the jobs over (default: all visible GPUs, none on a CPU machine)"""
    partition: Optional[str] = None
    """slurm: partition"""
    time_min: int = 2880
    """slurm: time limit per job, minutes (an interrupted job is requeued and resumes)"""
    gpus_per_job: int = 1
    """slurm: GPUs per job"""
    cpus_per_job: int = 8
    """slurm: CPU cores per job"""
    max_parallel: int = 64
    """slurm: how many jobs of the array run at once"""
    dry_run: bool = False
    """print what each job would do, and run nothing"""


class Job:
    """One training run. Calling it decides at run time whether to skip, resume or start, so that a
    requeued Slurm job (submitit calls checkpoint() on preemption or timeout) picks up where it was."""

    def __init__(self, root, method, game, seed, flags, total_timesteps):
        self.method, self.game, self.seed = method, game, seed
        self.name = f"{game}__{method}__{seed}"
        self.run_dir = os.path.join(os.path.abspath(root), "runs", self.name)
        self.log_path = os.path.join(os.path.abspath(root), "logs", self.name + ".log")
        self.base = [sys.executable, os.path.join(ROOT, METHODS[method].script + ".py")]
        self.flags = ["--env-id", game, "--seed", str(seed), "--exp-name", method, *METHODS[method].flags, *flags]
        self.total_timesteps = total_timesteps

    def state(self) -> str:
        """'done', 'resume' or 'new'."""
        status_path = os.path.join(self.run_dir, "status.json")
        if os.path.isfile(status_path):
            with open(status_path) as f:
                status = json.load(f)
            with open(os.path.join(self.run_dir, "config.json")) as f:
                saved_total = json.load(f)["args"]["total_timesteps"]
            return "done" if status["finished"] and saved_total == self.total_timesteps else "resume"
        return "new"

    def command(self, state: str) -> List[str]:
        if state == "resume":
            return self.base + ["--resume", self.run_dir, *self.flags]
        return self.base + ["--run-dir", self.run_dir, *self.flags]

    def __call__(self, env=None) -> str:
        state = self.state()
        if state == "done":
            return "skipped"
        if state == "new" and os.path.exists(self.run_dir):
            shutil.rmtree(self.run_dir)  # died before its first checkpoint: nothing to keep
        command = self.command(state)
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, **(env or {})})
        if result.returncode != 0:
            raise RuntimeError(f"{self.name} failed (exit {result.returncode}); see {self.log_path}")
        return "resumed" if state == "resume" else "trained"

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def make_jobs(args: SweepArgs) -> List[Job]:
    for name in ("jobs", "time_min", "cpus_per_job", "max_parallel"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    unknown = [m for m in args.methods if m not in METHODS] + [g for g in args.games if g not in PROCGEN_GAMES]
    if unknown:
        raise SystemExit(f"error: unknown method or game {unknown[0]!r}; methods: {', '.join(METHODS)}; "
                         f"games: {', '.join(PROCGEN_GAMES)}")
    flags = shlex.split(args.flags)
    for flag in flags:
        name = flag.split("=", 1)[0].replace("_", "-")
        if name in JOB_FLAGS:
            raise SystemExit(f"error: --flags must not set {name}: the sweep sets it for each job")
    total_timesteps = {method: parse_flags(method, flags, args.games).total_timesteps for method in args.methods}
    return [Job(args.root, method, game, seed, flags, total_timesteps[method])
            for game in args.games for method in args.methods for seed in args.seeds]


def parse_flags(method: str, flags: List[str], games: List[str]):
    """The method's Args from the extra flags, parsed and checked for every game as its script will:
    a bad flag fails here, once, not in every job."""
    script, method_flags = METHODS[method].script, METHODS[method].flags
    module = mdpo if script == "mdpo" else ppo
    # An unknown or malformed flag: tyro prints what is wrong and exits with 2.
    args = tyro.cli(module.Args, args=[*method_flags, *flags], prog=f"{script}.py (the sweep's --flags)")
    try:
        for game in games:
            module.validate_args(replace(args, env_id=game))
    except module.UsageError as error:
        raise SystemExit(f"error: --flags for {method}: {error}") from None
    return args


def visible_gpus() -> List[int]:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return list(range(sum(line.startswith("GPU ") for line in out.splitlines())))


def run_local(jobs: List[Job], args: SweepArgs) -> int:
    """A pool of `args.jobs` workers; worker k runs on GPU gpus[k % len(gpus)]. Returns the failures."""
    gpus = visible_gpus() if args.gpus is None else args.gpus
    todo = queue.Queue()
    for job in jobs:
        todo.put(job)
    lock, counts, start = threading.Lock(), {"done": 0, "failed": 0, "running": 0}, time.time()

    def report(message):
        print(f"[{time.time() - start:7.0f}s] {counts['done']}/{len(jobs)} done, {counts['running']} running, "
              f"{counts['failed']} failed | {message}", flush=True)

    def worker(slot):
        env = {"CUDA_VISIBLE_DEVICES": str(gpus[slot % len(gpus)])} if gpus else {}
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            with lock:
                counts["running"] += 1
                report(f"start {job.name}" + (f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if env else ""))
            try:
                outcome, failed = job(env), False
            except RuntimeError as error:
                outcome, failed = str(error), True
            with lock:
                counts["running"] -= 1
                counts["failed" if failed else "done"] += 1
                report(f"{job.name}: {outcome}")

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(args.jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts["failed"]


def run_submitit(jobs: List[Job], args: SweepArgs) -> int:
    import submitit

    cluster = "local" if args.launcher == "submitit-local" else "slurm"
    executor = submitit.AutoExecutor(folder=os.path.join(args.root, "submitit", "%j"), cluster=cluster)
    executor.update_parameters(timeout_min=args.time_min, name="mdpo-sweep")
    if cluster == "slurm":
        executor.update_parameters(slurm_partition=args.partition, gpus_per_node=args.gpus_per_job,
                                   cpus_per_task=args.cpus_per_job, slurm_array_parallelism=args.max_parallel)
    with executor.batch():
        submitted = [executor.submit(job) for job in jobs]
    print(f"submitted {len(submitted)} jobs to {cluster}; job ids {submitted[0].job_id} ... {submitted[-1].job_id}",
          flush=True)
    if cluster == "slurm":
        return 0  # the cluster runs them; run this command again later to resubmit any that failed
    failed = 0
    for job, handle in zip(jobs, submitted):
        try:
            print(f"{job.name}: {handle.result()}", flush=True)
        except Exception as error:  # submitit wraps the job's exception
            failed += 1
            print(f"{job.name}: failed: {str(error).strip().splitlines()[-1]}", flush=True)
    return failed


def main(args: SweepArgs) -> int:
    jobs = make_jobs(args)
    pending = [job for job in jobs if job.state() != "done"]
    print(f"{len(jobs)} jobs, {len(jobs) - len(pending)} already finished, {len(pending)} to run", flush=True)
    if args.dry_run:
        for job in pending:
            print(shlex.join(job.command(job.state())))
        return 0
    if not pending:
        return 0
    failed = run_local(pending, args) if args.launcher == "local" else run_submitit(pending, args)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(SweepArgs)))
