"""Planner wall time over 1-4096 GPUs x 0.5B-405B models (goal: < 50 ms per plan, search and explanations included).

    .venv/bin/python bench/planner.py [--repeat N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.inventory import parse_spec  # noqa: E402
from launcher.planner import PlanRequest, plan  # noqa: E402
from launcher.shapes import resolve_shape  # noqa: E402

MODELS = ["qwen2.5-0.5b", "llama-2-7b", "llama-3-8b", "qwen2.5-32b", "llama-2-70b", "llama-3.1-405b"]
INVENTORIES = ["1xRTX3090-24GB", "8xA100-80GB", "4x8xH100-80GB", "32x8xH100-80GB", "128x8xH100-80GB",
               "512x8xH100-80GB"]  # 1 .. 4096 GPUs
METHODS = ["full", "lora", "qlora"]
GOAL_MS = 50.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    worst, rows = 0.0, []
    print(f"{'model':<16}{'inventory':<18}{'method':<7}{'fits':<6}{'plan':<34}{'median ms':>10}{'max ms':>9}")
    for model in MODELS:
        shape = resolve_shape(model)
        for spec in INVENTORIES:
            inventory = parse_spec(spec)
            for method in METHODS:
                request = PlanRequest(method=method, seq_len=4096, global_batch_size=max(16, inventory.world_size))
                times = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    result = plan(request, inventory, shape)
                    times.append((time.perf_counter() - start) * 1000)
                label = (f"ZeRO-{result.zero_stage} {result.offload} gc={int(result.gradient_checkpointing)} "
                         f"mb={result.micro_batch_size}")
                worst = max(worst, max(times))
                rows.append(statistics.median(times))
                print(f"{model:<16}{spec:<18}{method:<7}{str(result.fits):<6}{label:<34}"
                      f"{statistics.median(times):>10.2f}{max(times):>9.2f}")
    print(f"\n{len(rows)} plans: median {statistics.median(rows):.2f} ms, slowest median {max(rows):.2f} ms, "
          f"worst single run {worst:.2f} ms (goal < {GOAL_MS:.0f} ms)")
    return 0 if max(rows) < GOAL_MS else 1


if __name__ == "__main__":
    sys.exit(main())
