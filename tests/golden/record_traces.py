"""Rewrite tests/golden/traces.json: the per-step traces of every training loop on this machine.

    .venv/bin/python tests/golden/record_traces.py

Runs each scenario of tests/engine/loop_traces.py (the classifier's `fit` with a one-cycle and
a step schedule, the detector, the box pretraining, the rescorer, the degradation study's loop
and benchmarks/seed_screen.py's `screen`) on the tests' synthetic data, and stores per optimizer
step each param group's learning rate and the global gradient norm, the losses each loop writes,
the number of steps and a sha256 of the final weights, with this machine's CPU (model name and
flags) and torch version. tests/engine/test_traces.py compares against it: exactly on a machine
with the same CPU and torch, within a tolerance elsewhere.

Record only for a change that is meant to move the numbers, and say why in its commit: the file
is what a rewrite of the loops must reproduce.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HELPER = Path(__file__).parents[1] / "engine" / "loop_traces.py"


def main() -> int:
    sys.path.insert(0, str(HELPER.parent))
    import loop_traces

    with tempfile.TemporaryDirectory() as root:
        golden = loop_traces.record(Path(root))
    for name, recorded in golden["scenarios"].items():
        print(f"{name}: {recorded['steps']} steps")
    print(f"wrote {loop_traces.GOLDEN} on {golden['machine']['cpu']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
