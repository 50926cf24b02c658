"""Keep the scalars of finished or stopped runs as project data: copy what plot.py reads (the
TensorBoard event files, config.json, status.json, diverged.json; no checkpoints, videos or locks)
into a results directory, with a README section saying how they were made, and each run's final network
weights as weights.pt: its checkpoint's agents in half precision, without optimiser or environment state
(about 1.3 MB per agent), which agreement.py, robustness.py and tsne.py read as they read a checkpoint.

The event files are copied record by record without the per-episode training returns and lengths
(`charts/episodic_return`, `charts/episodic_length`, one record per finished episode: 95% of the bytes,
about 125 bytes an episode); every other record is copied byte for byte. The per-episode records go
into episodes.npz beside the event files they came from (their steps and values as logged, in the
order written, about 4-7 bytes an episode), which plot.py reads as it reads the event files
(--no-episodes leaves them out). TensorBoard shows the exported runs without those two curves.

    python export.py --runs sweeps/slice/runs --to results/starpilot-h100-8min \
        --how "python sweep.py --root sweeps/slice --methods ppo mdpo ... (docs/results.md)"
    python plot.py --runs results/starpilot-h100-8min --reference results/reference/openai_ppo_hard500.csv

The README section names the machine as the runs logged it (their "machine" text: GPU model, torch,
Python, commit), each run's steps and last test return, and the wall time from the event files'
own clock. A results directory is never overwritten: exporting a run that is already there is refused, as is a
second directory of a seed there (a copy of a run under another name), which plot.py would refuse.
"""

import datetime
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

import run_utils
import run_data
from run_data import UsageError, run_tool

KEPT_FILES = ("config.json", "status.json", "diverged.json")
PER_EPISODE_TAGS = run_data.PER_EPISODE_TAGS  # never copied into the event files: into episodes.npz


@dataclass
class ExportArgs:
    runs: List[str]
    """directories searched (recursively) for run directories"""
    to: str
    """the results directory, e.g. results/starpilot-h100-8min (<game>-<machine>-<budget>)"""
    how: str
    """the command that made the runs, quoted in the README"""
    commit: Optional[str] = None
    """the commit the runs were made at, for runs trained outside a git checkout (their logs say "unknown")"""
    episodes: bool = True
    """keep the per-episode training returns and lengths, as episodes.npz beside each event stream"""
    weights: bool = True
    """keep each run's final network weights (weights.pt, half precision)"""


def kept(name: str) -> bool:
    return name in KEPT_FILES or name.startswith("events.out.tfevents.")


def whole_records(data: bytes):
    """(start, end, payload) of each record of an event file (TFRecord framing: length, its checksum,
    payload, its checksum), up to the first one cut short (a run killed while writing) or corrupt."""
    start = 0
    while start + 12 <= len(data):
        header, header_crc = data[start:start + 8], data[start + 8:start + 12]
        length, = struct.unpack("<Q", header)
        end = start + 12 + length + 4
        if struct.pack("<I", masked_crc32c(header)) != header_crc or end > len(data):
            return
        payload = data[start + 12:end - 4]
        if struct.pack("<I", masked_crc32c(payload)) != data[end - 4:end]:
            return
        yield start, end, payload
        start = end


def copy_events(source: str, destination: str) -> List[tuple]:
    """Copy an event file record by record, byte for byte, leaving out the per-episode ones (each is a record
    of its own: the scripts log one scalar per record); those left out as (tag, step, value), in file order.
    Bytes after the last whole record are copied as they are, as a plain copy would, with a warning."""
    with open(source, "rb") as f:
        data = f.read()
    left_out, copied_to = [], 0
    with open(destination, "wb") as f:
        for start, end, payload in whole_records(data):
            event = Event.FromString(payload)
            episode = [(v.tag, event.step, v.simple_value) for v in event.summary.value if v.tag in PER_EPISODE_TAGS]
            if episode:
                left_out += episode
            else:
                f.write(data[start:end])
            copied_to = end
        if copied_to < len(data):
            f.write(data[copied_to:])
            print(f"warning: {source}: {len(data) - copied_to} bytes after its last whole record (cut short or "
                  "corrupt) copied unfiltered", file=sys.stderr)
    shutil.copystat(source, destination)
    return left_out


def copy_scalars(run_dir: str, destination: str, episodes: bool = True) -> int:
    """Copy the run's kept files, keeping their places (agent1/, ...), each stream's per-episode records into
    its episodes.npz (unless not `episodes`); the number of per-episode records."""
    count = 0
    for directory, _, files in os.walk(run_dir):
        left_out = []
        for name in sorted(filter(kept, files)):  # event files in the order TensorBoard reads them
            relative = os.path.relpath(os.path.join(directory, name), run_dir)
            os.makedirs(os.path.dirname(os.path.join(destination, relative)), exist_ok=True)
            if name in KEPT_FILES:
                shutil.copy2(os.path.join(run_dir, relative), os.path.join(destination, relative))
            else:
                left_out += copy_events(os.path.join(run_dir, relative), os.path.join(destination, relative))
        target = os.path.join(destination, os.path.relpath(directory, run_dir))
        saved = os.path.join(directory, run_data.EPISODES_FILE)  # a run exported before keeps its records there
        if os.path.isfile(saved):
            if left_out:
                raise UsageError(f"{directory} holds per-episode records twice: in its event files and in {saved}")
            if episodes:  # copied as it is
                earlier = run_data.read_episodes(saved)  # refused in one line if it cannot be read whole
                shutil.copy2(saved, os.path.join(target, run_data.EPISODES_FILE))
                count += sum(len(earlier[key]) for key in earlier if key.endswith("/step"))
        elif left_out and episodes:
            save_episodes(left_out, target)
        count += len(left_out)
    return count


def save_episodes(records: List[tuple], directory: str) -> None:
    """episodes.npz: per tag logged, its steps (int64) and values (float32, as logged), in the order given."""
    arrays = {}
    for tag in PER_EPISODE_TAGS:
        mine = [(step, value) for t, step, value in records if t == tag]
        if not mine:
            continue
        arrays[f"{tag}/step"] = np.array([step for step, _ in mine], dtype=np.int64)
        arrays[f"{tag}/value"] = np.array([value for _, value in mine], dtype=np.float32)
    np.savez_compressed(os.path.join(directory, run_data.EPISODES_FILE), **arrays)


def save_weights(run_dir: str, destination: str) -> bool:
    """weights.pt from the run's checkpoint: its script, args, step and agents' weights in half precision, in the
    checkpoint's layout (a run exported before: its weights.pt as it is); False when the run has neither."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        if not os.path.isfile(os.path.join(run_dir, "weights.pt")):
            return False
        shutil.copy2(os.path.join(run_dir, "weights.pt"), os.path.join(destination, "weights.pt"))
        return True
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torn or foreign: one line
        raise UsageError(f"cannot read {path} for the run's weights ({type(error).__name__}); --no-weights leaves "
                         "them out") from None
    agents = [{"agent": {name: value.half() if value.is_floating_point() else value for name, value in state.items()}}
              for state in run_utils.agent_weights(checkpoint)]
    torch.save({key: checkpoint[key] for key in ("script", "args", "iteration", "global_step")} | {"agents": agents},
               os.path.join(destination, "weights.pt"))
    return True


def event_summary(run_dir: str) -> dict:
    """Over every event file of the run: its first and last wall-clock times and its "machine" texts."""
    times, machines = [], []
    for directory, _, files in os.walk(run_dir):
        if not any(name.startswith("events.out.tfevents.") for name in files):
            continue
        accumulator = EventAccumulator(directory, size_guidance={"scalars": 0, "tensors": 0})
        accumulator.Reload()
        tags = accumulator.Tags()
        times += [event.wall_time for tag in tags["scalars"] for event in accumulator.Scalars(tag)]
        if "machine/text_summary" in tags["tensors"]:
            machines += [event.tensor_proto.string_val[0].decode()
                         for event in accumulator.Tensors("machine/text_summary")]
    return {"start": min(times, default=None), "end": max(times, default=None), "machines": machines}


def describe_run(loaded: dict) -> dict:
    """The README's row of a run as run_data.load_run read it."""
    run, run_dir = run_data.at_own_steps(loaded), loaded["dir"]  # its return at its own step, ppo_2x too
    diverged = os.path.isfile(os.path.join(run_dir, "diverged.json"))
    state = "diverged" if diverged else "finished" if run["finished"] else "stopped (resumable)"
    test = run["curves"].get(run_data.TEST)
    last = f"{test[1][-1]:.2f} at {int(test[0][-1]):,}" if test is not None else "not evaluated"
    return {"name": os.path.basename(run_dir), "method": run["method"], "seed": run["seed"], "game": run["game"],
            "steps": run["steps"], "last_test": last, "state": state, **event_summary(run_dir)}


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def readme_section(runs: List[dict], how: str, commit: Optional[str], episodes: int = 0, kept_episodes: bool = True,
                   weights: int = 0) -> str:
    machines = sorted({m for run in runs for m in run["machines"]}) or ["not logged (runs older than the machine text)"]
    starts = [run["start"] for run in runs if run["start"] is not None]
    ends = [run["end"] for run in runs if run["end"] is not None]
    wall = (f"{minutes(max(ends) - min(starts))} from the first scalar the runs logged to the last, "
            "per-episode records included, all runs together" if starts else "no scalars logged")
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    lines = [f"## Exported {today}: {len(runs)} run{'s' if len(runs) > 1 else ''}", "",
             f"- made with: `{how}`",
             *[f"- machine, as the runs logged it: {m}" for m in machines],
             *([f"- commit, as given at export: {commit}"] if commit else []),
             f"- wall time: {wall}",
             *([f"- per-episode records ({', '.join(PER_EPISODE_TAGS)}): {episodes:,}, "
                + ("in episodes.npz beside the event files, not in them" if kept_episodes else
                   "left out (export.py --no-episodes)")] if episodes else []),
             *([f"- final weights: weights.pt of {weights} run{'s' if weights > 1 else ''} (half precision, no "
                "optimiser state)"] if weights else []), "",
             "| run | method | seed | steps per agent | last test return (at step) | state | wall time |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        steps = f"{run['steps']:,}" if isinstance(run["steps"], int) else "no checkpoint"
        run_wall = minutes(run["end"] - run["start"]) if run["start"] is not None else ""
        lines.append(f"| {run['name']} | {run['method']} | {run['seed']} | {steps} | {run['last_test']} | "
                     f"{run['state']} | {run_wall} |")
    return "\n".join(lines) + "\n"


def copy_runs(run_dirs: List[str], args: ExportArgs) -> tuple:
    """Copy every run into args.to, all or none: each into a staging directory inside args.to, renamed into
    place once all are copied, so that a failure (an unreadable checkpoint, a full disk) leaves no run in
    args.to and the same command can be run again; the staging directory is hidden, which run_data.find_runs
    skips, should a kill leave it. The number of per-episode records, and of weights.pt written."""
    os.makedirs(args.to, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=args.to)  # on args.to's file system: a rename, not a copy
    try:
        staged = [os.path.join(staging, os.path.basename(d)) for d in run_dirs]
        episodes = sum(copy_scalars(d, to, args.episodes) for d, to in zip(run_dirs, staged))
        weights = sum(save_weights(d, to) for d, to in zip(run_dirs, staged)) if args.weights else 0
        for to in staged:
            os.rename(to, os.path.join(args.to, os.path.basename(to)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return episodes, weights


def main(args: ExportArgs) -> List[dict]:
    if not args.how.strip():
        raise UsageError("--how must say what command made the runs")
    run_dirs = run_data.find_runs(args.runs)
    if not run_dirs:
        raise UsageError(f"no runs of ppo.py, drac.py or mdpo.py under {', '.join(args.runs)}")
    names = [os.path.basename(d) for d in run_dirs]
    if len(set(names)) < len(names):
        raise UsageError("two runs share a directory name; export them to separate results directories")
    there = [name for name in names if os.path.exists(os.path.join(args.to, name))]
    if there:
        raise UsageError(f"{os.path.join(args.to, there[0])} exists already: results are never overwritten")
    there_before = [run_data.run_identity(d) for d in run_data.find_runs([args.to])] if os.path.isdir(args.to) else []
    loaded = [run_data.load_run(d) for d in run_dirs]
    # plot.py would refuse the results directory: one seed in two directories is one seed, not two
    run_data.refuse_one_seed_twice(run_data.split_by_settings(there_before + loaded), "dir", kept=len(there_before))
    runs = [describe_run(run) for run in loaded]
    episodes, weights = copy_runs(run_dirs, args)
    section = readme_section(runs, args.how, args.commit, episodes, args.episodes, weights)
    readme = os.path.join(args.to, "README.md")
    with open(readme, "a") as f:
        f.write(("\n" if os.path.getsize(readme) else "") + section)
    print(section)
    print(f"{len(runs)} runs' scalars copied to {args.to}/")
    return runs


if __name__ == "__main__":
    run_tool(ExportArgs, main)
