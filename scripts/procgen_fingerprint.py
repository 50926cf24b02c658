"""Prints one hash per Procgen game over a fixed stream of random actions: the observations, rewards and
episode starts of 8 environments (hard mode, levels 0-499, seed 1) over 300 steps. Two installs of Procgen
that print the same lines render every game alike. --check compares them with the hashes PyPI's
procgen-mirror 0.10.7 gives on x86_64 Linux CPU machines (its Python 3.11 and 3.12 wheels agree). The test
suite checks the installed procgen against them, and scripts/gpu_slice.sh, before a slice trains, the wheel
scripts/gather_device_files.sh rebuilds (its PNGs stored, libenv.so stripped).

    python scripts/procgen_fingerprint.py                      # every game's hash
    python scripts/procgen_fingerprint.py --check --games coinrun
"""

import argparse
import hashlib
import importlib.metadata
import sys

import numpy as np
from procgen import ProcgenGym3Env

STEPS = 300
HASHED_VERSION = "0.10.7"
PYPI_HASHES = {
    "bigfish": "fd022c7ee77608ae",
    "bossfight": "42a3981273e22cd9",
    "caveflyer": "1ac63a3f61887d2e",
    "chaser": "9d19438d5e2d6f35",
    "climber": "9e679c75d154950f",
    "coinrun": "0180d971957231e7",
    "dodgeball": "ca60647a33931fd5",
    "fruitbot": "fe2c1aa1dcbadcdd",
    "heist": "75a51abcb5ca8d4c",
    "jumper": "5e00ded824f68598",
    "leaper": "4fe026916144031a",
    "maze": "516dc5e1b659fca6",
    "miner": "1f3c88b263b6084e",
    "ninja": "a9c88707549a790b",
    "plunder": "dcd98e81eedb47d6",
    "starpilot": "4af8863362754b0e",
}


def installed_procgen() -> str:
    for name in ("procgen-mirror", "procgen"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            pass
    return "a procgen of unknown version"


def fingerprint(game: str, steps: int = STEPS, num_envs: int = 8) -> str:
    env = ProcgenGym3Env(num=num_envs, env_name=game, num_levels=500, start_level=0, distribution_mode="hard",
                         rand_seed=1)
    actions = np.random.default_rng(0).integers(0, 15, size=(steps, num_envs), dtype=np.int32)
    digest = hashlib.sha256()
    for action in actions:
        env.act(action)
        reward, obs, first = env.observe()
        for array in (obs["rgb"], reward, first):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--games", nargs="+", default=list(PYPI_HASHES), choices=list(PYPI_HASHES), metavar="GAME")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps of each game's 8 environments ({STEPS})")
    parser.add_argument("--check", action="store_true", help="exit 1 where a hash differs from PyPI's wheel's")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1 (got {args.steps})")
    if args.check and args.steps != STEPS:
        parser.error(f"--check compares {STEPS} steps (got --steps {args.steps})")
    differ = []
    for game in args.games:
        digest = fingerprint(game, args.steps)
        print(game, digest)
        if args.check and digest != PYPI_HASHES[game]:
            differ.append(game)
    if differ:
        sys.exit(f"procgen_fingerprint.py: {' '.join(differ)} renders otherwise than PyPI's procgen-mirror "
                 f"{HASHED_VERSION} (installed: {installed_procgen()})")
