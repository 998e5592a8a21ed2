"""LesionServe core: the pieces shared by training, export, serving and the reference pipeline.

What the CPU Triton python models import is plain numpy/OpenCV (torch is imported only where a
GPU variant or the reference pipeline asks for it: arrays.py does so lazily, on a torch tensor).
"""
from pathlib import Path

#: The checkout this package runs from (model_repository/, runs/, benchmarks/ results live there).
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def prog(default: str) -> str:
    """argparse ``prog`` of a command: ``lesionserve <command>`` when the lesionserve CLI runs it
    (lesionserve.cli.run_module sets sys.argv[0] so), else ``default`` (its ``python -m`` form)."""
    import sys

    return sys.argv[0] if sys.argv[0].startswith("lesionserve ") else default
