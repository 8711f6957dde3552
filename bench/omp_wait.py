"""torch training on 2 threads with OpenMP's idle threads spinning (ACTIVE) or sleeping (PASSIVE), alone and beside
other work.

The Snakefile sets OMP_WAIT_POLICY=PASSIVE for every job (a user's own value wins). This script measures why: the
same workload — the demo baseline's network (MONAI ResNet10 at 1/8 of its channels, 64 px, batch 32, AdamW) for a
fixed number of steps on 2 threads — runs in a fresh interpreter under each policy, first alone, then beside
`--load` copies of itself looping in the background (what a second job, a second `make demo` or a CI run does to a
laptop's cores). Both policies run in the same invocation, alternating, and the script prints each time and the
ratios against PASSIVE per condition (> 1: PASSIVE is faster); "unset" is libgomp's default (spin a while,
then sleep), which is what a job got before the Snakefile set the policy.

    .venv/bin/python bench/omp_wait.py [--steps 40] [--load 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKLOAD = """
import sys, time, torch
sys.path.insert(0, {src!r})
from cohortlens.models.supervised.networks import build_network
torch.set_num_threads(2)
torch.manual_seed(0)
net = build_network("resnet10", 7, width=0.125, stem_stride=2)
opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-3)
x, y = torch.randn(32, 1, 64, 64), torch.randn(32, 7)
steps = {steps}
t0 = time.perf_counter()
for _ in range(steps if steps else 10**9):
    opt.zero_grad()
    torch.nn.functional.mse_loss(net(x), y).backward()
    opt.step()
print(time.perf_counter() - t0)
"""


def run(policy: str, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "unset":  # unset: libgomp's default (spin a while, then sleep)
        env["OMP_WAIT_POLICY"] = policy
    code = WORKLOAD.format(src=str(ROOT / "src"), steps=steps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--load", type=int, default=2, help="background copies of the workload (each on 2 threads)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    for load in (0, args.load):
        loaders = [subprocess.Popen([sys.executable, "-c", WORKLOAD.format(src=str(ROOT / "src"), steps=0)],
                                    env={**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}, stdout=subprocess.DEVNULL)
                   for _ in range(load)]
        try:
            if loaders:
                time.sleep(5)  # let the loaders get going
            times = {"unset": [], "ACTIVE": [], "PASSIVE": []}
            for _ in range(args.repeats):
                for policy in times:
                    times[policy].append(run(policy, args.steps))
        finally:
            for p in loaders:
                p.kill()
        best = {k: min(v) for k, v in times.items()}
        print(f"{args.steps} steps, {load} loader(s): unset (libgomp default) {best['unset']:.2f} s, ACTIVE "
              f"{best['ACTIVE']:.2f} s, PASSIVE {best['PASSIVE']:.2f} s; unset/PASSIVE {best['unset'] / best['PASSIVE']:.2f}, "
              f"ACTIVE/PASSIVE {best['ACTIVE'] / best['PASSIVE']:.2f} (best of {args.repeats})")


if __name__ == "__main__":
    main()
