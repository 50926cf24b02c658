import os
import sys

# The scripts live at the repository root; tests import their functions directly.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402

import evaluation  # noqa: E402


@pytest.fixture(autouse=True)
def small_probe_sets(monkeypatch, request):
    """MDPO's 2,048 probe frames cost seconds per tiny run on a CPU: tests of something else probe 32 (16 levels
    at 2 depths); tests marked full_probe_set (helpers.py) get the real set."""
    if request.node.get_closest_marker("full_probe_set") is None:
        real = evaluation.probe_frames
        monkeypatch.setattr(evaluation, "probe_frames", lambda *args, **kw: real(*args, **{**kw, "levels": 16, "depths": 2}))
