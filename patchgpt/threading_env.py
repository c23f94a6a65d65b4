"""OpenMP's waiting policy, set before torch loads its OpenMP runtime (so imported first by the package).

OpenMP threads spin-wait for each other between parallel regions (libgomp: about 300,000 spins). Beside one
busy process on two cores that collapses small models' training (`benchmarks/bench_busy.py`); a short spin
keeps the quiet speed and about half the speed beside a busy neighbour. ``PATCHGPT_THREADING=torch``, or the
user's own ``GOMP_SPINCOUNT`` / ``OMP_WAIT_POLICY``, leaves OpenMP as it is. Where torch was imported before
patchgpt, its runtime is already set up and this has no effect.
"""

import os

SPINCOUNT = "1000"

if os.environ.get("PATCHGPT_THREADING") != "torch" and not ({"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ)):
    os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
