"""`diff ppo.py mdpo.py` shows only what MDPO adds, and `diff ppo.py drac.py` only DrAC: every top-level
definition the training scripts share is written identically, except those each method changes."""

import ast
import os

import pytest

from helpers import ROOT

# What each method rewrites of ppo.py; every other definition both scripts have must match ppo.py's.
CHANGED_BY = {
    "mdpo.py": {"SCRIPT", "Args", "minibatch_loss", "update", "validate_args", "main", "train"},
    "drac.py": {"SCRIPT", "Args", "minibatch_loss", "validate_args", "train"},
}


def top_level_definitions(script):
    """name -> source of each top-level function, class and assignment of a script."""
    with open(os.path.join(ROOT, script)) as f:
        source = f.read()
    definitions = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            definitions[node.name] = ast.get_source_segment(source, node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            definitions[", ".join(ast.unparse(target) for target in targets)] = ast.get_source_segment(source, node)
    return definitions


@pytest.mark.parametrize("script", sorted(CHANGED_BY))
def test_the_parts_a_method_shares_with_ppo_are_written_identically(script):
    ours, theirs = top_level_definitions("ppo.py"), top_level_definitions(script)
    shared = set(ours) & set(theirs)
    assert CHANGED_BY[script] <= shared, "a name listed as changed is no longer in both scripts"
    differing = sorted(name for name in shared - CHANGED_BY[script] if ours[name] != theirs[name])
    assert not differing, (f"ppo.py and {script} differ in {differing}: write shared code identically in the "
                           f"training scripts, or list it in CHANGED_BY if {script}'s method changes it")
    assert len(shared - CHANGED_BY[script]) >= 25  # the environments, network, GAE, PPO loss and rollout
