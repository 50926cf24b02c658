"""bench.py on tiny settings, and the device scripts scripts/procgen_fingerprint.py and scripts/rezip_wheels.py
(plot.py and tsne.py: test_plot.py and test_tsne.py)."""

import base64
import hashlib
import importlib.util
import io
import os
import runpy
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import bench
import mdpo
import ppo
from helpers import ROOT


# ---------------------------------------------------------------------------------------------
# bench.py
# ---------------------------------------------------------------------------------------------


def markdown_rows(text):
    """Every data row of every markdown table in text, as lists of cell strings."""
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("|---")]


def number(cell):
    return float(cell.replace(",", "").rstrip("x"))


def test_bench_prints_every_table_with_consistent_numbers(capsys):
    bench.main(bench.BenchArgs(num_envs=4, num_steps=16, num_minibatches=2, update_epochs=1, iterations=1,
                               floor_seconds=0.2, bf16=False, cuda=False))
    out = capsys.readouterr().out
    assert "### CPU" in out and "Procgen stepping (random actions, 4 envs)" in out
    rows = markdown_rows(out)
    networks = [row for row in rows if row[0] == "float32" and len(row) == 4 and not row[3].endswith("x")]
    overlap = [row for row in rows if row[0] == "float32" and len(row) == 4 and row[3].endswith("x")]
    scripts = {row[0]: row for row in rows if row[0] in ("PPO", "MDPO per agent") and len(row) == 9}
    costs = [row for row in rows if len(row) == 6][1:]  # after its header
    assert [row[0] for row in costs] == ["PPO", "MDPO, K = 2"]
    assert len(networks) == 1 and len(overlap) == 1 and set(scripts) == {"PPO", "MDPO per agent"}
    assert all(number(cell) > 0 for cell in networks[0][1:] + overlap[0][1:])
    for row in scripts.values():
        assert all(number(cell) > 0 for cell in row[2:8])
        assert row[1] == "float32" and row[-1] == "1.00x"  # float32 against itself


def test_bench_cost_table_counts_samples_and_passes_per_iteration(capsys):
    # By hand, batch 100 and 3 epochs: PPO 100 samples, 100 inference and 300 fwd+bwd samples; MDPO with
    # K agents K x 100 samples and inferences, and K agents x K minibatches x 3 epochs x 100 fwd+bwd samples.
    bench.print_cost_table({"iteration": 1.0}, {2: {"iteration": 4.0}, 3: {"iteration": 10.0}}, batch=100, epochs=3)
    rows = markdown_rows(capsys.readouterr().out)
    assert rows[-3] == ["PPO", "100", "100", "300", "1.00", "0.25x"]
    assert rows[-2] == ["MDPO, K = 2", "200", "200", "1,200", "4.00", "1.00x"]
    assert rows[-1] == ["MDPO, K = 3", "300", "300", "2,700", "10.00", "2.50x"]


@pytest.mark.parametrize("settings, message", [
    ({"iterations": 0}, "--iterations must be at least 1"),
    ({"floor_seconds": 0.0}, "--floor-seconds must be positive"),
    ({"num_envs": 0}, "--num-envs must be positive"),  # not the default 16
    ({"num_envs": 3, "num_steps": 5}, "does not divide"),
    ({"env_id": "pong"}, "unknown game 'pong'"),
    ({"agent_counts": [1, 2]}, "--agent-counts must list one or more counts, each at least 2"),
    ({"agent_counts": []}, "--agent-counts must list one or more counts"),  # `--agent-counts` with no value
    ({"agent_counts": [2, 10**7]}, "160,000,016 games and 10,240,000,000 rollout frames need at least"),
])
def test_bench_rejects_bad_settings_before_measuring(settings, message, capsys):
    with pytest.raises(ppo.UsageError, match=message):
        bench.main(bench.BenchArgs(cuda=False, **settings))
    assert capsys.readouterr().err == ""  # nothing was measured


@pytest.mark.parametrize("seconds", [float("nan"), float("inf"), float("-inf"), -1.0])
def test_bench_refuses_a_floor_time_that_is_not_a_positive_finite_number(seconds, capsys):
    # nan divided the samples by a zero count; inf measured forever
    with pytest.raises(ppo.UsageError, match=f"--floor-seconds must be positive and finite, got {seconds}"):
        bench.main(bench.BenchArgs(cuda=False, floor_seconds=seconds))
    assert capsys.readouterr().err == ""  # nothing was measured


def test_bench_reports_bad_settings_in_one_line():
    result = subprocess.run([sys.executable, "bench.py", "--iterations", "0"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --iterations must be at least 1, got 0"


class Clock:
    """A stand-in for bench's `time` module: the clock moves only when a stub says so."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_bench_tables_compose_the_floors_ratios_and_speed_ups(monkeypatch, capsys):
    # num_envs 4 x num_steps 16 in 2 minibatches of 32; 3 epochs. Rates by hand, bf16 twice float32's.
    rates = {(4, False): 1000.0, (32, True): 400.0, (64, True): 600.0}
    calls, configs = [], []

    def network_rate(device, batch_size, backward, bf16, compiled, seconds):
        calls.append((batch_size, backward, bf16))
        return rates.get((batch_size, backward), 100.0) * (2 if bf16 else 1)

    def end_to_end(module, config, bench_args):
        configs.append((module.__name__, config))
        if "num_agents" in config:
            return {"sps": 1.0, "rollout": 1.0, "update": 1.0, "eval": 0.1, "iteration": 9.0}
        sps = (100.0 if module is ppo else 50.0) * (2 if config["bf16"] else 1)
        return {"sps": sps, "rollout": 1.0, "update": 2.0, "eval": 0.1, "iteration": 2.0 if module is ppo else 4.0}

    monkeypatch.setattr(bench, "env_rate", lambda env_id, num_envs: 1234.0)
    monkeypatch.setattr(bench, "network_rate", network_rate)
    monkeypatch.setattr(bench, "end_to_end", end_to_end)
    monkeypatch.setattr(bench, "rollout_overlap", lambda device, config: (3.0, 1.5))
    bench.main(bench.BenchArgs(num_envs=4, num_steps=16, num_minibatches=2, update_epochs=3, cuda=False,
                               agent_counts=[3, 2]))
    rows = markdown_rows(capsys.readouterr().out)
    assert calls == [(4, False, False), (32, True, False), (64, True, False), (4, False, True), (32, True, True),
                     (64, True, True)]
    assert ["float32", "1,000", "400", "600"] in rows and ["bf16", "2,000", "800", "1,200"] in rows
    assert ["float32", "3.000", "1.500", "2.00x"] in rows  # in turn / overlapped
    # PPO: 1 / (1/1000 + 3/400) = 117.6; MDPO per agent: 1 / (2/1000 + 2 x 2 x 3/600) = 45.5
    assert ["PPO", "float32", "118", "100", "0.85", "1.00", "2.00", "0.100", "1.00x"] in rows
    assert ["PPO", "bf16", "235", "200", "0.85", "1.00", "2.00", "0.100", "2.00x"] in rows
    assert ["MDPO per agent", "float32", "45", "50", "1.10", "1.00", "2.00", "0.100", "1.00x"] in rows
    assert ["MDPO per agent", "bf16", "91", "100", "1.10", "1.00", "2.00", "0.100", "2.00x"] in rows
    assert rows[-3:] == [["PPO", "64", "64", "192", "2.00", "0.50x"],
                         ["MDPO, K = 2", "128", "128", "768", "4.00", "1.00x"],
                         ["MDPO, K = 3", "192", "192", "1,728", "9.00", "2.25x"]]
    k3 = [config for name, config in configs if "num_agents" in config]
    assert len(k3) == 1 and k3[0]["num_agents"] == 3 and k3[0]["num_envs"] == 4 and configs[-1][0] == "mdpo"
    bench.main(bench.BenchArgs(cuda=False, bf16=False))  # the CPU defaults
    assert "num-envs 16, num-steps 64, 8 minibatches of 128, 3 epochs" in capsys.readouterr().out


def fake_main(event_dir_of, timers):
    """A script's main that only logs perf/* timers, one dict per iteration (the last one's eval included)."""

    def main(args):
        fake_main.args = args
        writer = SummaryWriter(event_dir_of(args.run_dir))
        for i, seconds in enumerate(timers, start=1):
            for name, value in seconds.items():
                writer.add_scalar(f"perf/{name}_seconds", value, i * args.num_envs * args.num_steps)
        writer.close()

    return main


TINY_CONFIG = dict(env_id="starpilot", num_envs=4, num_steps=16, num_minibatches=2, update_epochs=1, cuda=False,
                   bf16=False, compile=False)  # the scripts' settings as bench passes them; 64 samples per iteration
TIMERS = [{"rollout": 5.0, "update": 5.0, "iteration": 20.0},  # the warm-up iteration
          {"rollout": 1.0, "update": 2.0, "iteration": 3.0}, {"rollout": 1.0, "update": 2.0, "iteration": 3.0},
          {"rollout": 1.0, "update": 2.0, "eval": 5.0, "iteration": 8.0}]  # 3 s + the one evaluation's 5 s


@pytest.mark.parametrize("module", [ppo, mdpo])
def test_end_to_end_leaves_out_the_warm_up_and_amortises_the_evaluation(module, monkeypatch):
    if module is ppo:
        monkeypatch.setattr(ppo, "main", fake_main(lambda run_dir: run_dir, TIMERS))
    else:  # MDPO's timers are agent 1's; the run directory's own stream says something else
        def both(args):
            fake_main(lambda run_dir: os.path.join(run_dir, "agent1"), TIMERS)(args)
            fake_main(lambda run_dir: run_dir, [{k: 100.0 for k in t} for t in TIMERS])(args)
        monkeypatch.setattr(mdpo, "main", both)
    result = bench.end_to_end(module, TINY_CONFIG, bench.BenchArgs(iterations=3))
    assert fake_main.args.total_timesteps == 4 * 64
    # per iteration: the measured ones' mean, 3 s, plus the evaluation spread over --eval-interval 25: 5 / 25
    assert result == pytest.approx({"sps": 64 / 3.2, "rollout": 1.0, "update": 2.0, "eval": 0.2, "iteration": 3.2})


def test_end_to_end_takes_every_evaluation_out_of_its_own_iteration(monkeypatch):
    # --iterations past --eval-interval: a measured iteration before the last evaluates too (6 s); each comes
    # out of its iteration and their mean goes back amortised, so one iteration still costs 3 s + 5.5 / 25
    timers = [*TIMERS[:2], {"rollout": 1.0, "update": 2.0, "eval": 6.0, "iteration": 9.0}, TIMERS[3]]
    monkeypatch.setattr(ppo, "main", fake_main(lambda run_dir: run_dir, timers))
    result = bench.end_to_end(ppo, TINY_CONFIG, bench.BenchArgs(iterations=3))
    assert result["iteration"] == pytest.approx(3.0 + 5.5 / 25) and result["eval"] == pytest.approx(5.5 / 25)


def test_rollout_overlap_takes_medians_without_the_warm_up_round(monkeypatch):
    clock = Clock()
    seconds = {False: iter([100.0, 2.0, 4.0, 3.0]), True: iter([100.0, 1.0, 1.0, 5.0])}  # first: the warm-up round

    class Envs:
        def close(self):
            pass

    class Rollout:
        def __init__(self, args, device):
            pass

        def start(self, envs):
            pass

    def collect_rollouts(policies, envs, rollouts, args, device, step, overlap):
        clock.now += next(seconds[overlap])

    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(mdpo, "make_agent", lambda args, device: torch.nn.Linear(1, 1))
    monkeypatch.setattr(mdpo, "make_policy", lambda agent, args, device: None)
    monkeypatch.setattr(mdpo, "make_envs", lambda args, seed: Envs())
    monkeypatch.setattr(mdpo, "Rollout", Rollout)
    monkeypatch.setattr(mdpo, "collect_rollouts", collect_rollouts)
    assert bench.rollout_overlap(torch.device("cpu"), TINY_CONFIG) == (3.0, 1.0)  # (in turn, overlapped)


def test_env_and_network_rates_count_samples_over_seconds(monkeypatch):
    clock = Clock()

    class Env:
        def __init__(self, *args, **kwargs):
            pass

        def step(self, actions):
            clock.now += 0.5

    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(ppo, "ProcgenVecEnv", Env)
    assert bench.env_rate("starpilot", 4, steps=10) == pytest.approx(10 * 4 / 5.0)

    def make_policy(model, args, device):
        def policy(obs):
            clock.now += 1.0
        return policy

    monkeypatch.setattr(ppo, "make_policy", make_policy)
    # five policy steps of 8 samples in five seconds (the three warm-up steps before the clock starts)
    assert bench.network_rate(torch.device("cpu"), 8, False, False, False, 5.0) == pytest.approx(8.0)


# ---------------------------------------------------------------------------------------------
# scripts/procgen_fingerprint.py
# ---------------------------------------------------------------------------------------------


FINGERPRINT = os.path.join(ROOT, "scripts", "procgen_fingerprint.py")


def fingerprint_words(*flags):
    """What procgen_fingerprint.py prints, run in a process of its own, split into words."""
    return subprocess.run([sys.executable, FINGERPRINT, *flags], capture_output=True, text=True,
                          check=True).stdout.split()


def test_procgen_fingerprint_is_reproducible_and_tells_streams_apart():
    out = fingerprint_words("--games", "coinrun", "starpilot", "--steps", "12")
    again = fingerprint_words("--games", "coinrun", "--steps", "12")
    longer = fingerprint_words("--games", "coinrun", "--steps", "13")
    assert out[0::2] == ["coinrun", "starpilot"] and all(len(h) == 16 for h in out[1::2])
    assert again == out[:2]  # a fresh process, the same stream
    assert out[1] != out[3] and longer[1] != out[1]  # another game, one more step: another hash
    for flags, message in ((["--steps", "0"], "--steps must be at least 1 (got 0)"),
                           (["--check", "--steps", "12"], "--check compares 300 steps (got --steps 12)")):
        bad = subprocess.run([sys.executable, FINGERPRINT, *flags], capture_output=True, text=True)
        assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].endswith(message)


def test_procgen_fingerprint_check_passes_with_this_procgen_and_fails_on_another_stream(monkeypatch, capsys):
    """The installed procgen-mirror renders all 16 games as the committed hashes say; a stream that differs
    (here another seed, as a changed renderer would) fails --check in one line."""
    import procgen
    monkeypatch.setattr(sys, "argv", [FINGERPRINT, "--check"])
    runpy.run_path(FINGERPRINT, run_name="__main__")
    printed = capsys.readouterr().out.split()
    assert len(printed) == 32 and printed[printed.index("coinrun") + 1] == "0180d971957231e7"
    monkeypatch.setattr(sys, "argv", [FINGERPRINT, "--check", "--games", "coinrun"])
    real = procgen.ProcgenGym3Env
    monkeypatch.setattr(procgen, "ProcgenGym3Env", lambda **kwargs: real(**{**kwargs, "rand_seed": 2}))
    differs = r"coinrun renders otherwise than PyPI's procgen-mirror 0.10.7 \(installed: procgen-mirror 0.10.7\)$"
    with pytest.raises(SystemExit, match=differs):
        runpy.run_path(FINGERPRINT, run_name="__main__")


# ---------------------------------------------------------------------------------------------
# scripts/rezip_wheels.py
# ---------------------------------------------------------------------------------------------


def rezip_wheels():
    spec = importlib.util.spec_from_file_location("rezip_wheels", os.path.join(ROOT, "scripts", "rezip_wheels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_file(width=7, height=5, idat_pieces=3, before=b"", after=b"", seed=0):
    """An 8-bit RGB PNG written by hand (filter 0 on every row), its deflated pixels cut into idat_pieces chunks."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)
    deflated = zlib.compress(raw, 9)
    cuts = np.linspace(0, len(deflated), idat_pieces + 1).astype(int)
    idat = b"".join(png_chunk(b"IDAT", deflated[a:b]) for a, b in zip(cuts[:-1], cuts[1:]))
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + before + idat + after + png_chunk(b"IEND", b""), pixels


def chunks_of(data):
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append(data[pos:pos + 12 + length])
        pos += 12 + length
    return chunks


def test_png_with_stored_pixels_decodes_to_the_same_pixels_and_keeps_every_other_chunk():
    from PIL import Image
    text_before, text_after = png_chunk(b"tEXt", b"Comment\x00before"), png_chunk(b"tEXt", b"Comment\x00after")
    original, pixels = png_file(before=text_before, after=text_after)
    stored = rezip_wheels().with_stored_pixels(original)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored)).convert("RGB")), pixels)  # PIL checks CRCs too
    kinds = [chunk[4:8] for chunk in chunks_of(stored)]
    assert kinds == [b"IHDR", b"tEXt", b"IDAT", b"tEXt", b"IEND"]  # three IDAT chunks joined into one
    assert [c for c in chunks_of(stored) if c[4:8] != b"IDAT"] == [c for c in chunks_of(original) if c[4:8] != b"IDAT"]
    body = chunks_of(stored)[2][8:-4]
    assert body[:2] == b"\x78\x01" and len(body) > 5 * (1 + 7 * 3)  # zlib at level 0: the raw rows, uncompressed


@pytest.mark.parametrize("change, message", [
    (lambda png: png + b"junk", "4 bytes after IEND"),
    (lambda png: png[:-6], "ends inside a chunk, or before IEND"),
    (lambda png: b"GIF89a" + png[6:], "not a PNG"),
])
def test_png_with_stored_pixels_refuses_what_it_would_not_carry_faithfully(change, message):
    module = rezip_wheels()
    with pytest.raises(module.BadFile, match=message):
        module.with_stored_pixels(change(png_file()[0]))
    split = png_file(idat_pieces=2)[0]
    first_idat_end = len(b"\x89PNG\r\n\x1a\n") + len(chunks_of(split)[0]) + len(chunks_of(split)[1])
    between = split[:first_idat_end] + png_chunk(b"tEXt", b"a\x00b") + split[first_idat_end:]
    with pytest.raises(module.BadFile, match="not consecutive"):
        module.with_stored_pixels(between)


def test_rezip_stores_every_file_and_gives_record_the_changed_hashes(tmp_path):
    module = rezip_wheels()
    art, _ = png_file(width=40, height=30, idat_pieces=2)
    files = {"demo/__init__.py": b"x = 1\n", "procgen/data/assets/sprite.png": art, "demo/notes.txt": b"a,b\n" * 50}
    record_rows = [f"{name},sha256=stale,{len(data)}" for name, data in files.items()] + ["demo-1.0.dist-info/RECORD,,"]
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zout:
        for name, data in files.items():
            zout.writestr(name, data)
        zout.writestr("demo-1.0.dist-info/RECORD", "\n".join(record_rows) + "\n")
    module.rezip(str(wheel))
    with zipfile.ZipFile(wheel) as zin:
        assert {info.compress_type for info in zin.infolist()} == {zipfile.ZIP_STORED}
        record = zin.read("demo-1.0.dist-info/RECORD").decode().splitlines()
        png = zin.read("procgen/data/assets/sprite.png")
        assert zin.read("demo/__init__.py") == files["demo/__init__.py"]
    digest = base64.urlsafe_b64encode(hashlib.sha256(png).digest()).rstrip(b"=").decode()
    assert png != art and record[1] == f"procgen/data/assets/sprite.png,sha256={digest},{len(png)}"
    assert record[0] == record_rows[0] and record[2:] == record_rows[2:]  # the others as they were
    procgen_named = tmp_path / "procgen_mirror-0.10.7-cp312-cp312-manylinux2014_x86_64.whl"
    os.replace(wheel, procgen_named)
    with pytest.raises(module.BadFile, match="has no procgen/data/prebuilt/libenv.so"):
        module.rezip(str(procgen_named))
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "rezip_wheels.py"), str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("usage: python3 scripts/rezip_wheels.py WHEEL_DIR")
