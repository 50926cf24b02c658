"""Throughput benchmark of ppo.py and mdpo.py against the hardware's floors, in one process.

Measures, on the chosen device and in this order:
  1. the floors: Procgen stepping with random actions, and the IMPALA-CNN's own rates for rollout
     inference (batch = num-envs) and for forward+backward (batch = one minibatch, and two for
     MDPO, whose every agent also runs the peer's minibatch for the KL term), channels-last;
  2. the compute floor of one iteration derived from them:
       PPO:            1 inference + update-epochs forward+backward passes per sample
       MDPO per agent: the same for each of the two agents, each pass over both agents' minibatches;
  3. end-to-end steps/s of the real ppo.main and mdpo.main over a few iterations after a warm-up
     iteration, from their perf/* timers: rollout, update, and evaluation amortised over the default
     --eval-interval (the run evaluates once, at its last iteration);
  4. each end-to-end rate as a ratio of its floor; the bf16 rows also as a speed-up over float32;
  5. MDPO's two rollouts with the env steps in turn against overlapped (its GPU default), side by side;
  6. with --agent-counts, MDPO's float32 iteration with K agents against K = 2, side by side, with
     the samples and network passes each iteration takes.
It prints markdown tables last. Defaults: a small config on the CPU, the paper's on a GPU.

    python bench.py                # float32 and bf16, CPU config or GPU paper defaults
    python bench.py --compile      # adds torch.compile rows
    python bench.py --agent-counts 2 3 4 --no-bf16   # what more agents cost per iteration
"""

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import mdpo
import ppo
import run_utils
from run_data import read_scalars, run_tool


@dataclass
class BenchArgs:
    env_id: str = "starpilot"
    """the Procgen game"""
    num_envs: Optional[int] = None
    """environments per agent (default: 16 on CPU, 64 on GPU)"""
    num_steps: Optional[int] = None
    """steps per rollout (default: 64 on CPU, 256 on GPU)"""
    num_minibatches: int = 8
    update_epochs: int = 3
    iterations: int = 3
    """measured iterations of each script, after one warm-up iteration"""
    floor_seconds: float = 3.0
    """how long each network floor is measured"""
    cuda: bool = True
    """use CUDA when available"""
    bf16: bool = True
    """also measure the opt-in bf16 autocast path"""
    compile: bool = False
    """also measure the opt-in torch.compile path (float32, and with bf16 when measured)"""
    agent_counts: List[int] = field(default_factory=lambda: [2])
    """MDPO's numbers of agents K to time side by side (float32); the other rows use K = 2"""


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def env_rate(env_id, num_envs, steps=500) -> float:
    """Raw Procgen steps/s with random actions."""
    env = ppo.ProcgenVecEnv(env_id, num_envs, 500, 0, "hard", seed=0)
    actions = np.random.default_rng(0).integers(0, 15, (steps, num_envs))
    env.step(actions[0])
    start = time.perf_counter()
    for a in actions:
        env.step(a)
    return steps * num_envs / (time.perf_counter() - start)


def network_rate(device, batch_size, backward, bf16, compiled, seconds) -> float:
    """Samples/s of the channels-last network alone: the rollout's policy step, or forward+backward.

    Inference goes through the scripts' own make_policy (a CUDA graph on a GPU), so the floor is
    the fastest the rollout can run the network, not a slower eager loop.
    """
    args = ppo.Args(num_envs=batch_size, bf16=bf16, compile=compiled)
    agent = ppo.make_agent(args, device)
    model = torch.compile(agent) if compiled else agent
    obs = torch.randint(0, 256, (batch_size, 64, 64, 3), dtype=torch.uint8, device=device)
    policy = None if backward else ppo.make_policy(model, args, device)

    def step():
        if backward:
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                logits, value = model(obs)
            (logits.logsumexp(-1).mean() + value.mean()).backward()
            agent.zero_grad(set_to_none=True)
        else:
            policy(obs)

    for _ in range(3):  # warm-up (and compilation)
        step()
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
        if count % 4 == 0:
            synchronize(device)
    synchronize(device)
    return count * batch_size / (time.perf_counter() - start)


def rollout_overlap(device, config: dict, repeats: int = 3) -> tuple:
    """Seconds for MDPO's two rollouts with env steps in turn vs overlapped, alternating (medians).

    Both use the scripts' own policies, envs and buffers; only the order of the env steps differs.
    """
    args = mdpo.validate_args(mdpo.Args(total_timesteps=config["num_envs"] * config["num_steps"], **config))
    agents = [mdpo.make_agent(args, device) for _ in range(args.num_agents)]
    policies = [mdpo.make_policy(torch.compile(agent) if args.compile else agent, args, device) for agent in agents]
    envs = [mdpo.make_envs(args, seed=args.seed) for _ in range(args.num_agents)]
    rollouts = [mdpo.Rollout(args, device) for _ in range(args.num_agents)]
    for agent_envs, rollout in zip(envs, rollouts):
        rollout.start(agent_envs)

    seconds = {False: [], True: []}  # overlap -> seconds per pair of rollouts
    for repeat in range(1 + repeats):  # the first round warms up (and compiles)
        for overlap in seconds:
            start = time.perf_counter()
            mdpo.collect_rollouts(policies, envs, rollouts, args, device, 0, overlap=overlap)
            synchronize(device)
            if repeat:
                seconds[overlap].append(time.perf_counter() - start)
    for agent_envs in envs:
        agent_envs.close()
    return float(np.median(seconds[False])), float(np.median(seconds[True]))


def end_to_end(module, config: dict, bench: BenchArgs) -> dict:
    """Run the script's main for warm-up + measured iterations; per-iteration seconds from its timers."""
    batch = config["num_envs"] * config["num_steps"]
    with tempfile.TemporaryDirectory() as run_dir:
        module.main(module.Args(total_timesteps=(1 + bench.iterations) * batch, run_dir=run_dir, **config))
        event_dir = run_dir if module is ppo else os.path.join(run_dir, "agent1")
        parts = ("rollout", "update", "eval", "iteration")
        series = read_scalars(event_dir, [f"perf/{part}_seconds" for part in parts])
        seconds = {part: list(series[f"perf/{part}_seconds"][1]) for part in parts}
        eval_at = dict(zip(*series["perf/eval_seconds"]))  # step -> seconds, at the iterations that evaluated
        measured_steps = series["perf/iteration_seconds"][0][1:]
    eval_interval = module.Args().eval_interval
    # every evaluation comes out of its iteration (the last always evaluates; with --iterations past the
    # interval, others do too) and their mean is put back amortised over the interval, as in a training run
    evaluation = np.mean([eval_at[step] for step in measured_steps if step in eval_at])
    iteration = np.array(seconds["iteration"][1:]) - [eval_at.get(step, 0.0) for step in measured_steps]
    per_iteration = iteration.mean() + evaluation / eval_interval
    return {"sps": batch / per_iteration, "rollout": np.mean(seconds["rollout"][1:]),
            "update": np.mean(seconds["update"][1:]), "eval": evaluation / eval_interval, "iteration": per_iteration}


def check(bench: BenchArgs) -> None:
    """Bad settings fail here, in one line, before minutes of measuring."""
    if bench.iterations < 1:
        raise ppo.UsageError(f"--iterations must be at least 1, got {bench.iterations}")
    if not 0 < bench.floor_seconds < math.inf:  # nan fails this too: it would divide by zero, inf never stop
        raise ppo.UsageError(f"--floor-seconds must be positive and finite, got {bench.floor_seconds}")
    if not bench.agent_counts or min(bench.agent_counts) < 2:
        raise ppo.UsageError(f"--agent-counts must list one or more counts, each at least 2, got {bench.agent_counts}")


def main(bench: BenchArgs) -> None:
    check(bench)
    run_utils.keep_freed_memory()  # as the training scripts do, so the floors are the fastest this machine gives
    device = torch.device("cuda" if torch.cuda.is_available() and bench.cuda else "cpu")
    on_gpu = device.type == "cuda"
    num_envs = (64 if on_gpu else 16) if bench.num_envs is None else bench.num_envs
    num_steps = (256 if on_gpu else 64) if bench.num_steps is None else bench.num_steps
    minibatch = num_envs * num_steps // bench.num_minibatches
    base = dict(env_id=bench.env_id, num_envs=num_envs, num_steps=num_steps, num_minibatches=bench.num_minibatches,
                update_epochs=bench.update_epochs, cuda=bench.cuda)
    ppo.validate_args(ppo.Args(**base))  # bad sizes and games fail here
    for count in bench.agent_counts:  # as mdpo.py checks K agents' games and frames: here, not after the floors
        run_utils.check_memory(games=count * num_envs + num_envs, frames=count * num_envs * num_steps, cuda=bench.cuda)

    variants = [("float32", False, False)]
    if bench.bf16:
        variants.append(("bf16", True, False))
    if bench.compile:
        variants.append(("compile", False, True))
        if bench.bf16:
            variants.append(("bf16 + compile", True, True))

    env_sps = env_rate(bench.env_id, num_envs)
    print(f"procgen stepping: {env_sps:,.0f} steps/s", file=sys.stderr)
    floors, nets = {}, {}
    for name, bf16, compiled in variants:
        inference = network_rate(device, num_envs, False, bf16, compiled, bench.floor_seconds)
        train_mb = network_rate(device, minibatch, True, bf16, compiled, bench.floor_seconds)
        train_2mb = network_rate(device, 2 * minibatch, True, bf16, compiled, bench.floor_seconds)
        nets[name] = (inference, train_mb, train_2mb)
        floors[("PPO", name)] = 1 / (1 / inference + bench.update_epochs / train_mb)
        floors[("MDPO", name)] = 1 / (2 / inference + 2 * 2 * bench.update_epochs / train_2mb)
        print(f"{name}: inference {inference:,.0f}/s, fwd+bwd {train_mb:,.0f}/s (batch {minibatch}), "
              f"{train_2mb:,.0f}/s (batch {2 * minibatch})", file=sys.stderr)

    results = {}
    for script, module in (("PPO", ppo), ("MDPO", mdpo)):
        for name, bf16, compiled in variants:
            results[(script, name)] = end_to_end(module, {**base, "bf16": bf16, "compile": compiled}, bench)
            print(f"{script} {name}: {results[(script, name)]['sps']:,.0f} steps/s", file=sys.stderr)

    by_agents = {2: results[("MDPO", "float32")]}
    for count in sorted(set(bench.agent_counts) - {2}):
        by_agents[count] = end_to_end(mdpo, {**base, "num_agents": count}, bench)
        print(f"MDPO with {count} agents: {by_agents[count]['iteration']:.2f} s per iteration", file=sys.stderr)

    overlap = {}
    for name, bf16, compiled in variants:
        overlap[name] = rollout_overlap(device, {**base, "bf16": bf16, "compile": compiled})
        print(f"{name}: MDPO's rollouts in turn {overlap[name][0]:.3f} s, overlapped {overlap[name][1]:.3f} s",
              file=sys.stderr)

    device_name = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n### {device_name}: {bench.env_id}, num-envs {num_envs}, num-steps {num_steps}, "
          f"{bench.num_minibatches} minibatches of {minibatch}, {bench.update_epochs} epochs, torch {torch.__version__}\n")
    print(f"Procgen stepping (random actions, {num_envs} envs): {env_sps:,.0f} steps/s\n")
    print("| path | inference /s (batch %d) | fwd+bwd /s (batch %d) | fwd+bwd /s (batch %d) |" % (num_envs, minibatch, 2 * minibatch))
    print("|---|---|---|---|")
    for name, (inference, train_mb, train_2mb) in nets.items():
        print(f"| {name} | {inference:,.0f} | {train_mb:,.0f} | {train_2mb:,.0f} |")
    print("\n| path | MDPO's two rollouts in turn, s | overlapped, s | speed-up |")
    print("|---|---|---|---|")
    for name, (in_turn, overlapped) in overlap.items():
        print(f"| {name} | {in_turn:.3f} | {overlapped:.3f} | {in_turn / overlapped:.2f}x |")
    print("\n| script | path | floor steps/s | end-to-end steps/s | ratio to floor | rollout s/it | update s/it "
          "| eval s/it (amortised) | speed-up vs float32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (script, name), result in results.items():
        floor = floors[(script, name)]
        speedup = result["sps"] / results[(script, "float32")]["sps"]
        per_agent = " per agent" if script == "MDPO" else ""
        print(f"| {script}{per_agent} | {name} | {floor:,.0f} | {result['sps']:,.0f} | {result['sps'] / floor:.2f} "
              f"| {result['rollout']:.2f} | {result['update']:.2f} | {result['eval']:.3f} | {speedup:.2f}x |")
    print_cost_table(results[("PPO", "float32")], by_agents, num_envs * num_steps, bench.update_epochs)


def print_cost_table(ppo_result: dict, by_agents: dict, batch: int, epochs: int) -> None:
    """Per iteration, float32: PPO and MDPO with K agents. Every MDPO agent runs its network forward and
    backward over all K agents' minibatches (its own for its PPO loss, its peers' for their KL terms)."""
    print("\n| float32 | env samples / it | inference passes (samples) | fwd+bwd passes (samples) | s / it | vs MDPO K = 2 |")
    print("|---|---|---|---|---|---|")
    print(f"| PPO | {batch:,} | {batch:,} | {epochs * batch:,} | {ppo_result['iteration']:.2f} "
          f"| {ppo_result['iteration'] / by_agents[2]['iteration']:.2f}x |")
    for count, result in by_agents.items():
        print(f"| MDPO, K = {count} | {count * batch:,} | {count * batch:,} | {count * count * epochs * batch:,} "
              f"| {result['iteration']:.2f} | {result['iteration'] / by_agents[2]['iteration']:.2f}x |")


if __name__ == "__main__":
    run_tool(BenchArgs, main)
