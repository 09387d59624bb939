"""python -m benchmarks.agnews --out DIR: the AG News headline job (benchmarks.headline)."""

from benchmarks.headline import main
from fwdfed.cli import run_main

if __name__ == "__main__":
    run_main(lambda argv=None: main(argv, task="agnews"))
