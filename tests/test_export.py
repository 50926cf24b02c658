"""export.py: what it copies (scalars, never checkpoints), what its README says, and what it refuses."""

import itertools
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from torch.utils.tensorboard import SummaryWriter

import export
import plot
import run_data
from helpers import ROOT

T0 = 1_800_000_000.0  # the event files' wall clock, set by hand so the wall times are known


def write_run(root, script, seed, tests, start, seconds_per_eval, machine="NVIDIA H100 80GB HBM3; torch 2.6.0",
              finished=False):
    """A run directory as the scripts leave it, with the files export.py must leave behind."""
    run_dir = os.path.join(root, f"starpilot__{script}__{seed}")
    os.makedirs(os.path.join(run_dir, "videos"))
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"script": script, "args": {"env_id": "starpilot", "seed": seed, "exp_name": script}}, f)
    with open(os.path.join(run_dir, "status.json"), "w") as f:
        json.dump({"global_step": 1000 * len(tests), "iteration": len(tests), "finished": finished}, f)
    for name in ("checkpoint.pt", "lock", os.path.join("videos", "eval_1000.gif")):
        open(os.path.join(run_dir, name), "w").close()
    run_writer = SummaryWriter(run_dir)
    run_writer.add_text("machine", machine, 0)
    agent_dirs = [run_dir] if script == "ppo" else [os.path.join(run_dir, "agent1"), os.path.join(run_dir, "agent2")]
    for agent_dir in agent_dirs:
        writer = run_writer if agent_dir == run_dir else SummaryWriter(agent_dir)
        for i, value in enumerate(tests):
            writer.add_scalar("eval/test_return", value, 1000 * (i + 1), walltime=start + seconds_per_eval * (i + 1))
        writer.close()
    run_writer.close()
    return run_dir


def test_export_copies_only_the_scalars_and_says_how_they_were_made(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "ppo", 1, [1.0, 2.0, 3.0], T0, 60)  # its scalars at T0 + 60 ... T0 + 180
    write_run(runs, "mdpo", 1, [1.5, 2.5], T0 + 30, 120, finished=True)  # at T0 + 150, T0 + 270
    to = tmp_path / "results" / "starpilot-h100-8min"
    export.main(export.ExportArgs(weights=False, runs=[str(runs)], to=str(to), how="python sweep.py --stop-after-min 8",
                                  commit="abc1234"))

    copied = sorted(os.path.relpath(os.path.join(d, f), to) for d, _, files in os.walk(to) for f in files)
    kept = [p for p in copied if p != "README.md"]
    assert all(p.endswith(("config.json", "status.json")) or "events.out.tfevents." in p for p in kept), kept
    assert sum("agent" in p for p in kept) == 2 and len(kept) == 2 * 2 + 1 + 2 + 1  # mdpo: 3 streams
    readme = (to / "README.md").read_text()
    assert "- made with: `python sweep.py --stop-after-min 8`" in readme
    assert "- machine, as the runs logged it: NVIDIA H100 80GB HBM3; torch 2.6.0" in readme
    assert "- commit, as given at export: abc1234" in readme
    assert "- wall time: 3.5 min from the first scalar the runs logged to the last" in readme  # T0 + 60 to T0 + 270
    assert "| starpilot__ppo__1 | PPO | 1 | 3,000 | 3.00 at 3,000 | stopped (resumable) | 2.0 min |" in readme
    assert "| starpilot__mdpo__1 | MDPO | 1 | 2,000 | 2.50 at 2,000 | finished | 2.0 min |" in readme
    # plot.py reads the results directory as it reads the runs
    assert sorted(run["method"] for run in map(plot.load_run, run_data.find_runs([str(to)]))) == ["MDPO", "PPO"]


def test_export_gives_ppo_2x_its_return_at_its_own_step(tmp_path):
    run_dir = write_run(tmp_path / "runs", "ppo", 1, [1.0, 2.0], T0, 60)  # evaluated at 1,000 and 2,000 steps
    config_path = os.path.join(run_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["args"]["exp_name"] = "ppo_2x"  # as sweep.py names it; plot's per-agent axis draws it at half its steps
    with open(config_path, "w") as f:
        json.dump(config, f)
    run = export.describe_run(run_data.load_run(run_dir))
    assert run["method"] == "PPO 2x samples" and run["last_test"] == "2.00 at 2,000"


def test_export_never_overwrites_and_appends_its_readme(tmp_path):
    write_run(tmp_path / "a", "ppo", 1, [1.0], T0, 60)
    write_run(tmp_path / "b", "ppo", 2, [1.0], T0, 60)
    to = str(tmp_path / "results")
    export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "a")], to=to, how="first slice"))
    with pytest.raises(export.UsageError, match="exists already: results are never overwritten"):
        export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "a")], to=to, how="again"))
    # nor when only one of the runs is there already: nothing of the others is written either
    write_run(tmp_path / "c", "ppo", 3, [1.0], T0, 60)
    with pytest.raises(export.UsageError, match="starpilot__ppo__1 exists already"):
        export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "a"), str(tmp_path / "c")], to=to, how="mixed"))
    assert not os.path.exists(os.path.join(to, "starpilot__ppo__3"))
    export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "b")], to=to, how="second slice"))
    readme = open(os.path.join(to, "README.md")).read()
    assert readme.count("## Exported") == 2 and readme.index("first slice") < readme.index("second slice")


def test_export_refuses_bad_input_in_one_line(tmp_path):
    with pytest.raises(export.UsageError, match="--how must say"):
        export.main(export.ExportArgs(weights=False, runs=[str(tmp_path)], to=str(tmp_path / "r"), how=" "))
    write_run(tmp_path / "a", "ppo", 1, [1.0], T0, 60)
    write_run(tmp_path / "b", "ppo", 1, [1.0], T0, 60)
    with pytest.raises(export.UsageError, match="two runs share a directory name"):
        export.main(export.ExportArgs(weights=False, runs=[str(tmp_path)], to=str(tmp_path / "r"), how="x"))
    result = subprocess.run([sys.executable, "export.py", "--runs", str(tmp_path / "none"), "--to",
                             str(tmp_path / "r"), "--how", "x"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no runs of ppo.py, drac.py or mdpo.py under {tmp_path / 'none'}"


def test_export_keeps_a_diverged_runs_record_and_says_so(tmp_path):
    run_dir = write_run(tmp_path / "runs", "ppo", 1, [1.0], T0, 60)
    with open(os.path.join(run_dir, "diverged.json"), "w") as f:
        json.dump({"iteration": 1, "what": "agent 1's loss is nan"}, f)
    to = tmp_path / "r"
    export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "runs")], to=str(to), how="x"))
    assert (to / "starpilot__ppo__1" / "diverged.json").is_file()
    assert "| diverged |" in (to / "README.md").read_text()


def test_export_wall_time_starts_at_the_earliest_scalar_of_any_stream(tmp_path):
    run_dir = write_run(tmp_path / "runs", "mdpo", 1, [1.0, 2.0], T0, 60)  # agents at T0 + 60, T0 + 120
    writer = SummaryWriter(run_dir)  # a run-level scalar, in the stream os.walk visits first
    writer.add_scalar("eval/representation_cka", 0.5, 2000, walltime=T0 + 120)
    writer.close()
    run, = export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "runs")], to=str(tmp_path / "r"), how="x"))
    assert (run["start"], run["end"]) == (T0 + 60, T0 + 120)


def test_export_names_every_machine_and_the_last_not_the_best_return(tmp_path):
    write_run(tmp_path / "runs", "ppo", 1, [3.0, 1.0], T0, 60, machine="NVIDIA H100 80GB HBM3; torch 2.6.0")
    write_run(tmp_path / "runs", "ppo", 2, [1.0], T0, 60, machine="NVIDIA H200; torch 2.6.0")
    export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "runs")], to=str(tmp_path / "r"), how="x"))
    readme = (tmp_path / "r" / "README.md").read_text()
    assert "- machine, as the runs logged it: NVIDIA H100 80GB HBM3; torch 2.6.0" in readme
    assert "- machine, as the runs logged it: NVIDIA H200; torch 2.6.0" in readme
    assert "| starpilot__ppo__1 | PPO | 1 | 2,000 | 1.00 at 2,000 |" in readme


def scalars_and_texts(directory):
    """Every scalar (step, value, wall time) and text of one event-file directory, by tag."""
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    found = {tag: [(e.step, e.value, e.wall_time) for e in accumulator.Scalars(tag)] for tag in tags["scalars"]}
    found.update({tag: [e.tensor_proto.string_val[0] for e in accumulator.Tensors(tag)] for tag in tags["tensors"]})
    return found


def test_export_moves_the_per_episode_records_into_episodes_npz_and_keeps_every_other_one(tmp_path):
    run_dir = write_run(tmp_path / "runs", "ppo", 1, [1.0, 2.0], T0, 60)
    writer = SummaryWriter(run_dir)  # training as the scripts log it: one record per finished episode
    for episode in range(40):
        writer.add_scalar("charts/episodic_return", episode / 10, 25 * episode, walltime=T0 + episode)
        writer.add_scalar("charts/episodic_length", 100 + episode, 25 * episode, walltime=T0 + episode)
        if episode % 10 == 9:
            writer.add_scalar("losses/value_loss", episode / 100, 25 * episode, walltime=T0 + episode)
            writer.add_scalar("charts/SPS", 1000 + episode, 25 * episode, walltime=T0 + episode)  # per iteration: kept
    writer.close()
    export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "runs")], to=str(tmp_path / "r"), how="x"))
    source, exported = scalars_and_texts(run_dir), scalars_and_texts(tmp_path / "r" / "starpilot__ppo__1")
    assert len(source["charts/episodic_return"]) == 40 and set(source) - set(exported) == {
        "charts/episodic_return", "charts/episodic_length"}
    assert exported == {tag: events for tag, events in source.items() if not tag.startswith("charts/episodic")}
    assert "- per-episode records (charts/episodic_return, charts/episodic_length): 80, in episodes.npz beside " \
           "the event files, not in them" in (tmp_path / "r" / "README.md").read_text()
    # plot.py reads from episodes.npz what the source's event files held, step for step and value for value
    wanted = ("charts/episodic_return", "charts/episodic_length", "losses/value_loss")
    original = run_data.read_events(run_dir, wanted.__contains__)
    kept = run_data.read_events(str(tmp_path / "r" / "starpilot__ppo__1"), wanted.__contains__)
    assert original.keys() == kept.keys() == set(wanted)
    for tag in wanted:
        assert original[tag][0].tolist() == kept[tag][0].tolist() and original[tag][1].tolist() == kept[tag][1].tolist()
    assert kept["charts/episodic_length"][1].tolist() == [100.0 + e for e in range(40)]

    for name in os.listdir(run_dir):  # record by record: the file's header and every other record, in order
        if name.startswith("events.out.tfevents."):
            source_records = list(RawEventFileLoader(os.path.join(run_dir, name)).Load())
            exported_records = list(RawEventFileLoader(str(tmp_path / "r" / "starpilot__ppo__1" / name)).Load())
            assert exported_records == [r for r in source_records if b"charts/episodic_" not in r]

    export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "runs")], to=str(tmp_path / "k"), how="x",
                                  episodes=False))
    assert not (tmp_path / "k" / "starpilot__ppo__1" / "episodes.npz").exists()
    assert "80, left out (export.py --no-episodes)" in (tmp_path / "k" / "README.md").read_text()


def test_each_agents_stream_keeps_its_own_episodes_and_the_updates_figure_reads_them(tmp_path):
    run_dir = write_run(tmp_path / "runs", "mdpo", 1, [1.0], T0, 60)
    for agent in (1, 2):
        writer = SummaryWriter(os.path.join(run_dir, f"agent{agent}"))
        for episode in range(5):
            writer.add_scalar("charts/episodic_length", 10 * agent + episode, 100 * episode)
        writer.close()
    export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "runs")], to=str(tmp_path / "r"), how="x"))
    exported = tmp_path / "r" / "starpilot__mdpo__1"
    assert not (exported / "episodes.npz").exists()  # the run's own stream logged no episode
    for agent in (1, 2):
        lengths = run_data.read_events(str(exported / f"agent{agent}"), "charts/episodic_length".__eq__)
        assert lengths["charts/episodic_length"][1].tolist() == [10.0 * agent + e for e in range(5)]


def test_a_stream_with_its_episodes_in_both_places_is_refused_in_one_line(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("charts/episodic_return", 1.0, 5)
    writer.close()
    export.save_episodes([("charts/episodic_return", 5, 1.0)], str(tmp_path))
    with pytest.raises(plot.UsageError, match="records twice"):
        run_data.read_events(str(tmp_path), "charts/episodic_return".__eq__)


@pytest.mark.parametrize("damage", ["cut short", "corrupt"])
def test_export_copies_the_bytes_after_a_damaged_record_as_they_are(tmp_path, damage, capsys):
    """A run killed while writing leaves a last record cut short: nothing of the file may be lost."""
    writer = SummaryWriter(str(tmp_path / "events"))
    for step in range(6):
        writer.add_scalar("charts/episodic_return", step, step)
        writer.add_scalar("losses/value_loss", step, step)
    writer.close()
    source, = [str(p) for p in (tmp_path / "events").iterdir()]
    data = open(source, "rb").read()
    records = list(RawEventFileLoader(source).Load())  # the file version, then per step an episode and a loss
    ends = [0] + list(itertools.accumulate(len(r) + 16 for r in records))  # 16 bytes of framing per record
    framed = [data[ends[i]:ends[i + 1]] for i in range(len(records))]
    whole = ends[7]  # the header and the first 3 steps stay whole
    # the 8th record cut short (the file ends inside it), or one byte of its payload changed (the file goes on)
    damaged = data[:whole + 20] if damage == "cut short" else data[:whole + 20] + b"x" + data[whole + 21:]
    open(source, "wb").write(damaged)
    destination = str(tmp_path / "copy")
    left_out = export.copy_events(source, destination)
    # the header and the losses of steps 0-2, then every byte from the damaged record on, as it was
    assert open(destination, "rb").read() == framed[0] + framed[2] + framed[4] + framed[6] + damaged[whole:]
    assert left_out == [("charts/episodic_return", step, step) for step in range(3)]
    assert "copied unfiltered" in capsys.readouterr().err


def test_a_file_ending_in_per_episode_records_loses_them_all_and_warns_of_nothing(tmp_path, capsys):
    writer = SummaryWriter(str(tmp_path / "events"))
    for step in range(3):
        writer.add_scalar("losses/value_loss", step, step)
        writer.add_scalar("charts/episodic_return", step, step)  # the file's last records are per-episode ones
        writer.add_scalar("charts/episodic_length", 100 + step, step)
    writer.close()
    source, = [str(p) for p in (tmp_path / "events").iterdir()]
    destination = str(tmp_path / "copy")
    assert len(export.copy_events(source, destination)) == 6
    records = list(RawEventFileLoader(destination).Load())
    assert len(records) == 1 + 3 and not any(b"charts/episodic_" in r for r in records)
    assert capsys.readouterr().err == ""  # a whole file: nothing after its last record to warn about
    assert os.stat(destination).st_mtime == os.stat(source).st_mtime  # copied as a copy would, its times too


def test_readme_names_a_shared_machine_once_and_counts_one_run_in_the_singular(tmp_path):
    write_run(tmp_path / "a", "ppo", 1, [1.0], T0, 60)
    write_run(tmp_path / "a", "ppo", 2, [1.0], T0, 60)  # the same machine text
    write_run(tmp_path / "b", "ppo", 3, [1.0], T0, 60)
    export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "a")], to=str(tmp_path / "r"), how="x"))
    export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "b")], to=str(tmp_path / "r"), how="y"))
    readme = (tmp_path / "r" / "README.md").read_text()
    assert readme.count("- machine, as the runs logged it: NVIDIA H100 80GB HBM3; torch 2.6.0") == 2  # once per export
    assert ": 2 runs\n" in readme and ": 1 run\n" in readme


def test_sections_are_separated_by_a_blank_line(tmp_path):
    write_run(tmp_path / "a", "ppo", 1, [1.0], T0, 60)
    write_run(tmp_path / "b", "ppo", 2, [1.0], T0, 60)
    for source in ("a", "b"):
        export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / source)], to=str(tmp_path / "r"), how=source))
    readme = (tmp_path / "r" / "README.md").read_text()
    assert readme.startswith("## Exported") and readme.count("|\n\n## Exported") == 1


def test_a_diverged_run_is_called_diverged_even_if_its_status_says_finished(tmp_path):
    run_dir = write_run(tmp_path / "runs", "ppo", 1, [1.0], T0, 60, finished=True)
    open(os.path.join(run_dir, "diverged.json"), "w").write("{}")
    assert export.describe_run(run_data.load_run(run_dir))["state"] == "diverged"


@pytest.mark.parametrize("script, num_agents", [("ppo", 1), ("mdpo", 2)])
def test_a_runs_final_weights_are_kept_in_half_precision_without_the_optimiser(tmp_path, script, num_agents):
    import importlib

    import ppo
    import run_utils

    module = importlib.import_module(script)
    run_dir = str(tmp_path / "runs" / f"bigfish__{script}__1")
    module.main(module.Args(env_id="bigfish", num_envs=4, num_steps=16, num_minibatches=2, update_epochs=1,
                            total_timesteps=64, eval_episodes=2, cuda=False, run_dir=run_dir))
    to = tmp_path / "results" / "x"
    export.main(export.ExportArgs(runs=[str(tmp_path / "runs")], to=str(to), how="a tiny run"))
    weights = torch.load(to / f"bigfish__{script}__1" / "weights.pt", weights_only=False)
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert sorted(weights) == ["agents", "args", "global_step", "iteration", "script"]
    assert weights["global_step"] == checkpoint["global_step"] == 64 and weights["args"] == checkpoint["args"]
    saved_agents, trained_agents = run_utils.agent_weights(weights), run_utils.agent_weights(checkpoint)
    assert len(saved_agents) == len(trained_agents) == num_agents  # every agent, each its own
    for saved, trained in zip(saved_agents, trained_agents):
        assert saved.keys() == trained.keys() and all(value.dtype == torch.float16 for value in saved.values())
        for name, value in trained.items():
            torch.testing.assert_close(saved[name].float(), value, rtol=1e-3, atol=1e-4)
    assert "- final weights: weights.pt of 1 run (half precision, no optimiser state)" in (to / "README.md").read_text()
    agent = ppo.Agent()
    agent.load_state_dict(saved_agents[-1])  # a float32 network takes them as they are
    assert len(run_data.load_agents(str(to / f"bigfish__{script}__1"))["agents"]) == num_agents


EPISODES = ("charts/episodic_return", "charts/episodic_length")


def test_a_resumed_streams_episodes_from_every_event_file_reach_episodes_npz(tmp_path):
    run_dir = write_run(tmp_path / "runs", "mdpo", 1, [1.0], T0, 60)
    for part in range(3):  # three sessions: three event files per agent directory
        for agent in (1, 2):
            writer = SummaryWriter(os.path.join(run_dir, f"agent{agent}"), filename_suffix=f".{part}")
            for step in range(part * 100, part * 100 + 150, 10):  # overlapping, as a resume re-logs
                writer.add_scalar("charts/episodic_return", step / 7 + agent, step)
                writer.add_scalar("charts/episodic_length", step + agent, step)
            writer.close()
    export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "runs")], to=str(tmp_path / "r"), how="x"))
    for agent in (1, 2):
        source = run_data.read_events(os.path.join(run_dir, f"agent{agent}"), EPISODES.__contains__)
        kept = run_data.read_events(str(tmp_path / "r" / "starpilot__mdpo__1" / f"agent{agent}"), EPISODES.__contains__)
        assert len(source["charts/episodic_return"][0]) == 45
        for tag in EPISODES:
            assert kept[tag][0].tolist() == source[tag][0].tolist()
            assert kept[tag][1].tolist() == source[tag][1].tolist()


def test_read_events_returns_only_the_wanted_per_episode_tags(tmp_path):
    export.save_episodes([("charts/episodic_return", 5, 1.5), ("charts/episodic_length", 5, 9.0)], str(tmp_path))
    assert list(run_data.read_events(str(tmp_path), "charts/episodic_length".__eq__)) == ["charts/episodic_length"]
    os.makedirs(tmp_path / "lengths_only")
    export.save_episodes([("charts/episodic_length", 5, 9.0)], str(tmp_path / "lengths_only"))  # a tag never logged
    assert list(run_data.read_events(str(tmp_path / "lengths_only"), EPISODES.__contains__)) == ["charts/episodic_length"]


def test_an_exported_run_exported_again_keeps_its_episodes_and_weights(tmp_path):
    run_dir = write_run(tmp_path / "runs", "ppo", 1, [1.0], T0, 60)
    writer = SummaryWriter(run_dir)
    for episode in range(4):
        writer.add_scalar("charts/episodic_length", 10 + episode, 100 * episode)
    writer.close()
    torch.save({"script": "ppo", "args": {"env_id": "starpilot", "seed": 1}, "iteration": 1, "global_step": 1000,
                "agents": [{"agent": {"w": torch.ones(2)}}]}, os.path.join(run_dir, "checkpoint.pt"))
    export.main(export.ExportArgs(runs=[str(tmp_path / "runs")], to=str(tmp_path / "once"), how="x"))
    export.main(export.ExportArgs(runs=[str(tmp_path / "once")], to=str(tmp_path / "twice"), how="x"))
    once, twice = tmp_path / "once" / "starpilot__ppo__1", tmp_path / "twice" / "starpilot__ppo__1"
    assert (once / "episodes.npz").read_bytes() == (twice / "episodes.npz").read_bytes()
    assert (once / "weights.pt").read_bytes() == (twice / "weights.pt").read_bytes()
    assert "per-episode records (charts/episodic_return, charts/episodic_length): 4, in episodes.npz" in \
        (tmp_path / "twice" / "README.md").read_text()


def test_a_run_given_twice_is_exported_once(tmp_path):
    write_run(tmp_path / "runs", "ppo", 1, [1.0], T0, 60)
    runs = [str(tmp_path / "runs"), str(tmp_path / "runs"), str(tmp_path / "runs" / "starpilot__ppo__1")]
    assert len(export.main(export.ExportArgs(weights=False, runs=runs, to=str(tmp_path / "r"), how="x"))) == 1
    assert ": 1 run\n" in (tmp_path / "r" / "README.md").read_text()  # "## Exported <date>: 1 run"


def test_one_seed_in_two_directories_is_refused_as_plot_would_refuse_it(tmp_path):
    first = write_run(tmp_path / "a", "ppo", 1, [1.0], T0, 60)
    copy = str(tmp_path / "b" / "starpilot__ppo__1-again")
    shutil.copytree(first, copy)
    to = tmp_path / "r"
    with pytest.raises(export.UsageError, match="are both seed 1 of PPO on starpilot with the same settings"):
        export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "a"), copy], to=str(to), how="x"))
    # nor beside the seed exported before under another name; other seeds and settings are exported
    export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "a")], to=str(to), how="x"))
    with pytest.raises(export.UsageError, match=f"{to / 'starpilot__ppo__1'} and {copy} are both seed 1"):
        export.main(export.ExportArgs(weights=False, runs=[copy], to=str(to), how="x"))
    write_run(tmp_path / "c", "ppo", 2, [1.0], T0, 60)
    control = write_run(tmp_path / "d", "ppo", 1, [1.0], T0, 60)
    with open(os.path.join(control, "config.json"), "w") as f:
        json.dump({"script": "ppo", "args": {"env_id": "starpilot", "seed": 1, "exp_name": "ppo", "num_envs": 256}}, f)
    os.rename(control, control + "-envs256")
    export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "c"), str(tmp_path / "d")], to=str(to), how="y"))
    assert sorted(os.listdir(to)) == ["README.md", "starpilot__ppo__1", "starpilot__ppo__1-envs256", "starpilot__ppo__2"]
    # a pair already in --to (put there by hand) is plot.py's to refuse, not a reason to refuse another seed
    shutil.copytree(to / "starpilot__ppo__2", to / "starpilot__ppo__2-copy")
    write_run(tmp_path / "e", "ppo", 3, [1.0], T0, 60)
    export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "e")], to=str(to), how="z"))
    assert (to / "starpilot__ppo__3").is_dir()


def listing(directory):
    return sorted(os.path.relpath(os.path.join(d, name), directory) for d, dirs, files in os.walk(directory)
                  for name in dirs + files)


def test_a_failed_export_leaves_nothing_behind_and_can_be_run_again(tmp_path):
    write_run(tmp_path / "runs", "ppo", 1, [1.0], T0, 60)  # its checkpoint.pt is empty: its weights cannot be read
    write_run(tmp_path / "earlier", "ppo", 2, [1.0], T0, 60)
    to = tmp_path / "results"
    with pytest.raises(export.UsageError, match="checkpoint.pt for the run's weights .*--no-weights leaves them out"):
        export.main(export.ExportArgs(runs=[str(tmp_path / "runs")], to=str(to), how="x"))
    assert os.listdir(to) == []  # no run in it, nor the staging directory
    export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "earlier")], to=str(to), how="y"))
    before = listing(to)
    with pytest.raises(export.UsageError, match="--no-weights leaves them out"):
        export.main(export.ExportArgs(runs=[str(tmp_path / "runs")], to=str(to), how="x"))
    assert listing(to) == before  # an earlier export's results directory as it was, no half-written run in it
    export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "runs")], to=str(to), how="x"))  # as advised
    assert (to / "starpilot__ppo__1" / "config.json").is_file()


@pytest.mark.parametrize("damage", ["cut short", "not an npz"])
def test_an_episodes_npz_that_cannot_be_read_is_one_line_where_it_is_read(tmp_path, damage):
    run_dir = write_run(tmp_path / "runs", "ppo", 1, [1.0], T0, 60)
    export.save_episodes([(tag, step, 1.0) for step in range(50) for tag in EPISODES], run_dir)
    path = os.path.join(run_dir, "episodes.npz")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2] if damage == "cut short" else b"not an npz")
    message = re.escape(path) + r" cannot be read \(\w+\): export the run again, or remove the file"
    with pytest.raises(run_data.UsageError, match=message):
        run_data.read_events(run_dir, EPISODES.__contains__)  # what plot.py --x-axis updates reads
    assert run_data.load_run(run_dir)["curves"][run_data.TEST][1].tolist() == [1.0]  # the test curve needs none of it
    with pytest.raises(run_data.UsageError, match=message):
        export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "runs")], to=str(tmp_path / "r"), how="x"))
    assert os.listdir(tmp_path / "r") == []


def test_a_staging_copy_a_killed_export_left_is_no_run(tmp_path):
    write_run(tmp_path / "runs", "ppo", 1, [1.0], T0, 60)
    export.main(export.ExportArgs(weights=False, runs=[str(tmp_path / "runs")], to=str(tmp_path / "r"), how="x"))
    shutil.copytree(tmp_path / "r" / "starpilot__ppo__1", tmp_path / "r" / ".export-k1ll" / "starpilot__ppo__1")
    assert run_data.find_runs([str(tmp_path / "r")]) == [str(tmp_path / "r" / "starpilot__ppo__1")]


def test_an_episodes_npz_with_steps_but_not_as_many_values_is_refused(tmp_path):
    np.savez(tmp_path / "episodes.npz", **{"charts/episodic_return/step": np.arange(3)})
    with pytest.raises(run_data.UsageError, match="holds charts/episodic_return/step without as many values"):
        run_data.read_episodes(str(tmp_path / "episodes.npz"))
