"""Finished runs as data, for the tools that read them (sweep.py, plot.py, export.py, robustness.py,
agreement.py, tsne.py, bench.py): which method a run is (the table of methods sweep.py runs), the name
and colour figures give it, its scalars (the event files, and the episodes.npz export.py writes) and its
agents (from a checkpoint or an exported weights.pt)."""

import json
import os
import struct
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

import ppo
import run_utils
from run_utils import UsageError  # one class for every tool: a one-line error and exit code 2


def run_tool(Args, main) -> None:
    """A tool's command line: parse the flags with tyro and run main(args). Bad input (a UsageError) and a
    file the tool cannot read or write (--out above all) end in one `error:` line and exit code 2."""
    args = tyro.cli(Args)
    try:
        main(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        print(f"error: {error.filename}: {error.strerror}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# Methods: what sweep.py runs, and which of them a run is
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    script: str  # "ppo", "drac" or "mdpo"
    flags: Tuple[str, ...]  # the flags that make the method, as (flag, value) pairs
    about: str  # what it controls for, one line
    budget_scale: int = 1  # ppo_2x: the envs and total steps of --flags, times this


# The augmentation DrAC (Raileanu et al. 2021) found best on each Procgen game, as the `env_to_aug` table
# of public train scripts built on rraileanu/auto-drac has it (auto-drac's own train.py takes it as
# --aug_type; see docs/method.md). ppo_drac_best runs each game with its entry.
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
    "ppo_2x": Method("ppo", (), "PPO with twice --num-envs and --total-timesteps: as many samples per iteration and in "
                     "all as MDPO's two agents together, the same iterations (sample-matched)", budget_scale=2),
    **{f"ppo_drac_{augment}": Method("drac", ("--augment", augment, "--drac-coef", DRAC_COEF), drac_about(augment))
       for augment in sorted(set(DRAC_BEST_AUGMENT.values()))},
    "ppo_ucb_drac": Method("drac", ("--augment", "ucb", "--drac-coef", DRAC_COEF),
                           "PPO + UCB-DrAC (Raileanu et al. 2021): DrAC choosing its augmentation by a bandit"),
    "mdpo": Method("mdpo", (), "MDPO: two agents, each also pulled towards the other's policy by a KL term"),
    "mdpo_alpha0": Method("mdpo", ("--alpha", "0"), "MDPO without the KL term: the same two-agent training, loss "
                          "scaling, clipping and optimiser; isolates the KL term"),
}
# Not a method of its own: stands for ppo_drac_<DrAC's best augmentation on the job's game>.
DRAC_BEST = "ppo_drac_best"
DRAC_BEST_ABOUT = "each game's ppo_drac_<augment> with the augmentation DrAC found best on it"

# The Args fields that tell the methods apart, with their values when no flag sets them.
METHOD_FIELDS = {
    "ppo": {"l2_coef": 0.0, "dropout": 0.0},
    "drac": {"augment": "crop", "drac_coef": 0.1, "l2_coef": 0.0, "dropout": 0.0},
    "mdpo": {"num_agents": 2, "alpha": 1.0, "detach_peer": False, "l2_coef": 0.0, "dropout": 0.0},
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
    return with_settings(script, changed)


# What changes what a run learns, beside the method's own fields (which name the method already). Not the
# seed, the budget's ceiling (the learning rate is not annealed), evaluation, checkpoints, nor the speed flags
# (--bf16, --compile: a resume may change them, and config.json keeps only the last).
LEARNING_SETTINGS = ("num_levels", "start_level", "learning_rate", "num_envs", "num_steps", "gamma", "gae_lambda",
                     "num_minibatches", "update_epochs", "norm_adv", "clip_coef", "ent_coef", "vf_coef",
                     "max_grad_norm")


# A run made before a setting existed lacks it in config.json and ran at its default (ppo.py's, drac.py's and
# mdpo.py's agree).
LEARNING_DEFAULTS = {name: ppo.Args.__dataclass_fields__[name].default for name in LEARNING_SETTINGS}


def split_by_settings(runs: List[dict]) -> List[dict]:
    """Runs of one method in one game trained with different settings (a control such as PPO with
    --num-envs 256 beside the default) are not seeds of one curve. Each setting in which some game's runs of
    a method differ names that method's runs in every game wherever it is not the default:
    "PPO (num_envs=256)" beside "PPO". Settings that differ only between games (each game's runs agree)
    split nothing. A run is a dict with its "game", "method" and config's "args" (plot.py's and
    robustness.py's runs); the runs given are not changed."""
    settings = [{name: run["args"].get(name, default) for name, default in LEARNING_DEFAULTS.items()} for run in runs]
    values = {}  # (method, setting) -> game -> the values its runs there have
    for run, own in zip(runs, settings):
        for name, value in own.items():
            values.setdefault((run["method"], name), {}).setdefault(run["game"], set()).add(value)
    split = []
    for run, own in zip(runs, settings):
        named = [f"{name}={value}" for name, value in own.items() if value != LEARNING_DEFAULTS[name]
                 and any(len(game_values) > 1 for game_values in values[(run["method"], name)].values())]
        split.append({**run, "method": with_settings(run["method"], named)})
    return split


def refuse_one_seed_twice(runs: List[dict], place: str, kept: int = 0) -> None:
    """Runs as split_by_settings names them, each with its directory at run[place]: two directories holding
    one seed of one method, game and mode with the same settings (a run and its export or copy, or a seed
    trained twice) are one seed, not two; taken together they would narrow every spread and interval.
    Refused in one line naming both, except between two of the first `kept` runs (export.py's runs already
    in --to, which it leaves as they are)."""
    first = {}
    for index, run in enumerate(runs):
        key = (run["game"], run["mode"], run["method"], run["seed"])
        if key in first and index >= kept:
            raise UsageError(f"{first[key]} and {run[place]} are both seed {run['seed']} of {run['method']} on "
                             f"{run['game']} with the same settings (--bf16 and --compile aside): one seed, not two; "
                             "give one of them")
        first.setdefault(key, run[place])


def with_settings(method: str, settings: List[str]) -> str:
    """'PPO' with ['num_envs=256'] -> 'PPO (num_envs=256)'; a name with settings of its own keeps one bracket."""
    if not settings:
        return method
    if method.endswith(")"):
        return f"{method[:-1]}, {', '.join(settings)})"
    return f"{method} ({', '.join(settings)})"


# ---------------------------------------------------------------------------------------------
# Names and colours in figures and tables
# ---------------------------------------------------------------------------------------------

METHOD_NAMES = {"ppo": "PPO", "ppo_l2": "PPO + L2", "ppo_dropout": "PPO + dropout", "ppo_2x": "PPO 2x samples",
                "ppo_ucb_drac": "PPO + UCB-DrAC", "drac": "PPO + DrAC", "mdpo_alpha0": "MDPO α=0", "mdpo": "MDPO"}
METHOD_COLOURS = {"PPO": "#17becf", "PPO + L2": "#f5a700", "PPO + dropout": "#1565d8", "PPO 2x samples": "#2ca02c",
                  "PPO + UCB-DrAC": "#8c564b", "MDPO α=0": "#9467bd", "MDPO": "#e8323c"}
OTHER_COLOURS = ["#bcbd22", "#e377c2", "#393b79", "#637939", "#ff7f0e"]  # no grey: OpenAI's band is grey


# ---------------------------------------------------------------------------------------------
# A run's scalars
# ---------------------------------------------------------------------------------------------

TEST, TRAIN, CKA = "eval/test_return", "eval/train_return", "eval/debiased_cka"
PER_EPISODE_TAGS = ("charts/episodic_return", "charts/episodic_length")  # one record per finished episode
EPISODES_FILE = "episodes.npz"  # export.py keeps an exported stream's per-episode records there, not in its events


def find_runs(roots: List[str]) -> List[str]:
    """Every directory below the roots whose config.json was written by ppo.py, drac.py or mdpo.py, each once:
    a directory reached twice (a root given twice, or inside another root) would count as two seeds."""
    found = {}  # real path -> the path it was first reached by
    for root in roots:
        for directory, subdirectories, files in os.walk(root):
            # not into hidden directories: an export's staging copy (.export-*) is no run of its own
            subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
            if "config.json" not in files:
                continue
            real = os.path.realpath(directory)
            if real not in found and is_run(directory):
                found[real] = directory
    return sorted(found.values())


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


# What every tool reads from a run's config.json, and its type; every other field has a default.
REQUIRED_ARGS = {"env_id": str, "seed": int}


def is_run(directory: str) -> bool:
    """Whether the directory's config.json is a run's; one that is not a JSON object, or names a script of ours
    but lacks what every tool reads, is skipped saying why (another tool's JSON object is skipped silently)."""
    try:
        config = read_json(os.path.join(directory, "config.json"))
    except (OSError, ValueError) as error:
        print(f"skipping {directory}: its config.json is unreadable ({type(error).__name__})", file=sys.stderr)
        return False
    if not isinstance(config, dict):
        print(f"skipping {directory}: its config.json is not a JSON object", file=sys.stderr)
        return False
    if config.get("script") not in METHOD_FIELDS:
        return False
    args = config.get("args")
    lacking = [f"{name} ({kind.__name__})" for name, kind in REQUIRED_ARGS.items()
               if not isinstance(args, dict) or not isinstance(args.get(name), kind)]
    if lacking:
        print(f"skipping {directory}: its config.json lacks {', '.join(lacking)} in its args", file=sys.stderr)
        return False
    return True


def read_status(run_dir: str) -> dict:
    """The run's status.json ({} before its first checkpoint); a UsageError naming it where it is not a JSON object."""
    path = os.path.join(run_dir, "status.json")
    if not os.path.isfile(path):
        return {}
    try:
        status = read_json(path)
    except ValueError:  # not JSON, or not UTF-8
        status = None
    if not isinstance(status, dict):
        raise UsageError(f"{path} is not a JSON object: resume the run to rewrite it at its next checkpoint, or "
                         "remove it to read the run as unfinished")
    return status


def display_name(method: str) -> str:
    if method.startswith("ppo_drac_"):
        return f"PPO + DrAC ({method[len('ppo_drac_'):]})"
    script, _, settings = method.partition(" (")  # a run that matches no method, e.g. "mdpo (num_agents=3)"
    if settings and script in METHOD_NAMES:
        return f"{METHOD_NAMES[script]} ({settings}"
    return METHOD_NAMES.get(method, method)


def read_scalars(event_dir: str, tags) -> Dict[str, tuple]:
    """tag -> (steps, values) of these tags, one value per step: a step logged twice (a resumed run re-logging
    an evaluation after its checkpoint) keeps the later value."""
    events = read_events(event_dir, lambda tag: tag in tags)
    return {tag: last_per_step(steps, values) for tag, (steps, values) in events.items()}


def read_events(event_dir: str, wanted) -> Dict[str, tuple]:
    """tag -> (steps, values) of every event of the tags `wanted(tag)` accepts, in the order written
    (a per-episode tag holds many events at one step), the per-episode ones of an exported run from its
    episodes.npz (read only when one of them is wanted)."""
    accumulator = EventAccumulator(event_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    events = {}
    for tag in accumulator.Tags()["scalars"]:
        if wanted(tag):
            scalars = accumulator.Scalars(tag)
            events[tag] = (np.array([e.step for e in scalars], dtype=np.int64),
                           np.array([e.value for e in scalars], dtype=np.float64))
    path = os.path.join(event_dir, EPISODES_FILE)
    wanted_episodes = list(filter(wanted, PER_EPISODE_TAGS))
    if wanted_episodes and os.path.isfile(path):
        episodes = read_episodes(path)
        for tag in wanted_episodes:
            if f"{tag}/step" not in episodes:  # a tag the stream never logged
                continue
            if tag in events:
                raise UsageError(f"{event_dir} holds its {tag} records twice: in its event files and in {path}")
            events[tag] = (episodes[f"{tag}/step"].astype(np.int64), episodes[f"{tag}/value"].astype(np.float64))
    return events


def read_episodes(path: str) -> Dict[str, np.ndarray]:
    """The arrays of an episodes.npz, each tag's steps beside as many values; a UsageError naming the file where
    it cannot be read whole."""
    try:
        with np.load(path) as episodes:
            arrays = {key: episodes[key] for key in episodes.files}
    except Exception as error:  # cut short, corrupt or not an .npz at all: one line, not a traceback
        raise UsageError(f"{path} cannot be read ({type(error).__name__}): export the run again, or remove the file "
                         "to read the run without its per-episode records") from None
    for key in [key for key in arrays if key.endswith("/step")]:
        values = arrays.get(key[:-len("step")] + "value")
        if values is None or values.shape != arrays[key].shape:
            raise UsageError(f"{path} holds {key} without as many values: export the run again, or remove the file "
                             "to read the run without its per-episode records")
    return arrays


def event_file_damage(path: str) -> Optional[Tuple[str, int]]:
    """Where an event file stops holding whole records (TFRecord framing: length, its checksum, payload, its
    checksum), as (what, byte offset): "partial", a last record cut short (being written now, or the writer was
    killed), before which the reader reads every record; "corrupt", bytes that are no record's header, where
    the reader stops without a word; None for a file of whole records. It checks every header, not the
    payloads (a damaged payload goes unseen): a header's checksum depends on the record's length alone, and the
    few lengths a file holds are checksummed once each, so this costs little beside reading the file."""
    with open(path, "rb") as f:
        data = f.read()
    header_crcs = {}  # header -> its checksum
    start = 0
    while start + 12 <= len(data):
        header = data[start:start + 8]
        if header not in header_crcs:
            header_crcs[header] = struct.pack("<I", masked_crc32c(header))
        if data[start + 8:start + 12] != header_crcs[header]:
            # zeros to the end: space a crash (XFS, NFS) left unwritten after the last record, nothing lost
            return ("partial" if not data[start:].strip(b"\0") else "corrupt"), start
        end = start + 16 + struct.unpack("<Q", header)[0]
        if end > len(data):
            return "partial", start
        start = end
    return None if start == len(data) else ("partial", start)  # fewer bytes than a header left


def damaged_event_files(event_dir: str) -> List[Tuple[str, str, int]]:
    """(path, what, offset) of each event file the reader reads in the directory that does not end with a whole
    record (event_file_damage)."""
    damaged = []
    for name in sorted(os.listdir(event_dir)) if os.path.isdir(event_dir) else []:
        path = os.path.join(event_dir, name)
        if "tfevents" in name and os.path.isfile(path):  # the files TensorBoard's reader takes
            damage = event_file_damage(path)
            if damage is not None:
                damaged.append((path, *damage))
    return damaged


def last_per_step(steps, values) -> tuple:
    """(steps, values) with one value per step, the one written last, in step order."""
    by_step = dict(zip(steps.tolist(), values.tolist()))
    ordered = np.array(sorted(by_step), dtype=np.int64)
    return ordered, np.array([by_step[s] for s in ordered.tolist()], dtype=np.float64)


def agents_mean(per_agent: List[tuple]) -> tuple:
    """The agents' mean at the steps every agent logged."""
    steps = per_agent[0][0]
    for agent_steps, _ in per_agent[1:]:
        steps = np.intersect1d(steps, agent_steps)
    return steps, np.mean([values[np.searchsorted(s, steps)] for s, values in per_agent], axis=0)


def samples_scale(method: str) -> int:
    """How many times PPO's samples per iteration the method's one agent takes (ppo_2x: 2)."""
    return METHODS[method].budget_scale if method in METHODS else 1


def run_identity(run_dir: str, config: Optional[dict] = None) -> dict:
    """A run's game, mode, method, seed and args from its config.json alone (read unless given), and its
    directory at "dir": what names its curves, without reading them."""
    config = config if config is not None else read_json(os.path.join(run_dir, "config.json"))
    args = config["args"]
    return {"game": args["env_id"], "method": display_name(method_of(config)), "seed": args["seed"], "args": args,
            "mode": args.get("distribution_mode", "hard"), "dir": run_dir}


def load_run(run_dir: str, x_axis: str = "agent") -> dict:
    """A run's game, method, seed, mode and curves. With K agents its score curve is their mean; with
    x_axis "total" its steps count every agent's environment steps (K x steps per agent).

    ppo_2x takes twice PPO's samples per iteration, as MDPO's two agents do together. On the per-agent
    axis it is drawn at half its steps: at every x it has made as many updates as each method and seen as
    many samples as MDPO's agents together, so all runs meet at the end of training. "total" draws its own steps.
    """
    config = read_json(os.path.join(run_dir, "config.json"))
    args = config["args"]
    method = method_of(config)
    num_agents = int(args.get("num_agents", 2)) if config["script"] == "mdpo" else 1
    event_dirs = [run_dir] if num_agents == 1 else [os.path.join(run_dir, f"agent{i}") for i in range(1, num_agents + 1)]
    scale, per = (num_agents, 1) if x_axis == "total" else (1, samples_scale(method))
    curves, agent_curves = {}, {}
    streams = [read_scalars(d, (TEST, TRAIN)) if os.path.isdir(d) else {} for d in event_dirs]  # each once
    for tag in (TEST, TRAIN):
        per_agent = [stream.get(tag) for stream in streams]
        if any(c is None or len(c[0]) == 0 for c in per_agent):
            continue
        agent_curves[tag] = [(steps * scale // per, values) for steps, values in per_agent]
        steps, values = agents_mean(per_agent)
        curves[tag] = (steps * scale // per, values)
    if num_agents > 1 and os.path.isdir(run_dir):  # run-level scalars live in the run directory's own stream
        cka = read_scalars(run_dir, [CKA]).get(CKA)
        if cka is not None and len(cka[0]):
            curves[CKA] = (cka[0] * scale, cka[1])
    status = read_status(run_dir)
    return {**run_identity(run_dir, config), "num_agents": num_agents,
            "finished": bool(status.get("finished")), "steps": status.get("global_step"),
            "curves": curves, "agent_curves": agent_curves, "steps_per_x": per}


def at_own_steps(run: dict) -> dict:
    """The run with its curves at its own environment steps (ppo_2x's halving on the per-agent axis undone)."""
    per = run["steps_per_x"]
    return run if per == 1 else {**run, "steps_per_x": 1,
                                 "curves": {tag: (steps * per, values) for tag, (steps, values) in run["curves"].items()}}


# ---------------------------------------------------------------------------------------------
# A run's agents
# ---------------------------------------------------------------------------------------------


def weights_file(path: str) -> str:
    """The file a run's agents are read from: `path` itself (a .pt file), else the run directory's
    checkpoint.pt, else its weights.pt (what export.py keeps)."""
    if path.endswith(".pt"):
        if not os.path.isfile(path):
            raise UsageError(f"no file {path}")
        return path
    for name in ("checkpoint.pt", "weights.pt"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    why = ""
    if os.path.isfile(os.path.join(path, "config.json")):  # a run directory: say why it has no weights
        why = (": a run not yet checkpointed, or exported without its weights (--no-weights, or before export.py "
               "kept them)")
    raise UsageError(f"no checkpoint.pt or weights.pt in {path}{why}")


def load_agents(path: str) -> dict:
    """A run's config, method, game, mode, seed, step and its K agents (networks in eval mode), from a run
    directory or a checkpoint or weights file of ppo.py, drac.py or mdpo.py; a UsageError saying why not."""
    file = weights_file(path)
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=False)
        config = {"script": checkpoint["script"], "args": dict(checkpoint["args"])}
        agents = []
        for state in run_utils.agent_weights(checkpoint):
            agent = ppo.Agent(dropout=config["args"].get("dropout", 0.0))
            agent.load_state_dict(state)  # half-precision weights too: loading casts to the network's dtype
            agents.append(agent.eval())
    except Exception as error:  # torn, foreign or from another network: one line, not a traceback
        raise UsageError(f"{file} is not a readable checkpoint of ppo.py, drac.py or mdpo.py "
                         f"({type(error).__name__})") from None
    args = config["args"]
    if config["script"] not in METHOD_FIELDS or not isinstance(args.get("env_id"), str):
        raise UsageError(f"{file} is not a checkpoint of ppo.py, drac.py or mdpo.py")
    return {"run": os.path.dirname(file), "config": config, "args": args, "method": method_of(config),
            "agents": agents, "game": args["env_id"], "mode": args.get("distribution_mode", "hard"),
            "seed": args.get("seed"), "global_step": checkpoint.get("global_step")}


def check_seed(flag: str, seed: int, offset: int = 0) -> None:
    """Procgen takes its seeds as 32-bit ints: a tool that seeds games from `seed` up to `seed + offset` needs
    seed + offset <= INT32_MAX, as the training scripts check theirs."""
    highest = ppo.INT32_MAX - offset
    if not 0 <= seed <= highest:
        raise UsageError(f"{flag} must lie in [0, {highest}], got {seed}")
