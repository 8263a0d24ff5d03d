"""Per-rank entry point.

    python launcher/run.py --recipe lora_tiny [key=value ...]           # one process
    deepspeed --num_gpus 2 launcher/run.py --recipe lora_tiny            # every rank runs this file
    deepspeed launcher/run.py --recipe qlora_7b                          # all local GPUs

Each rank computes the same plan from the same inputs; rank 0 writes the DeepSpeed config to ds_configs/.
"""
import os
import sys

# Run as a file (`deepspeed launcher/run.py`), Python puts launcher/ first on sys.path: replace it by the repo
# root, so `launcher.config` imports as a package and launcher/*.py never shadow top-level modules.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from launcher.cli import main  # noqa: E402
from launcher.dist import exit_rank  # noqa: E402

if __name__ == "__main__":
    exit_rank(main(["run", *sys.argv[1:]]))
