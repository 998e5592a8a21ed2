"""What every benchmark script shares: the images, the artifacts, a server, timing and the machine.

Benchmarks measure speed, which does not depend on what the weights learned: by default they use
randomly initialised backbones exported exactly as trained ones are (``--artifacts`` takes real ones).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from lesionserve.server import PROJECT_ROOT, TritonServer
from lesionserve.pipelines import LESION_ENSEMBLE
from lesionserve.spec import CLASS_NAMES

#: Real ISIC-size dermoscopy JPEGs (600x450), when this machine has them; never committed.
REAL_IMAGES = PROJECT_ROOT.parent / "shared/data/isic-real/ham10000-native"
DEFAULT_OUT = PROJECT_ROOT / "runs/benchmarks"


def load_images(source: str, count: int, seed: int = 0) -> tuple[list[bytes], str]:
    """``count`` encoded images and a description of where they came from.

    ``source``: a folder of .jpg files, ``synthetic`` (600x450 JPEGs rendered here), or ``auto``
    (the real HAM10000 folder when present, else synthetic).
    """
    if count < 1:
        raise ValueError(f"image count must be >= 1, got {count}")
    if source == "auto":
        source = str(REAL_IMAGES) if REAL_IMAGES.is_dir() else "synthetic"
    if source == "synthetic":
        import cv2

        from lesionserve.synthetic import render_lesion

        rng = np.random.default_rng(seed)
        images = []
        for i in range(count):
            rgb = render_lesion(CLASS_NAMES[i % len(CLASS_NAMES)], rng, (600, 450))
            ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok, "OpenCV failed to encode a synthetic lesion"
            images.append(buf.tobytes())
        return images, f"synthetic 600x450 JPEGs (quality 90), seed {seed}"
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder} (give a folder of .jpg files, 'synthetic' or 'auto')")
    files = sorted(folder.glob("*.jpg"))[:count]
    if len(files) < count:
        raise ValueError(f"{folder} has {len(files)} .jpg files; {count} are needed")
    images = [f.read_bytes() for f in files]
    mean_kb = sum(map(len, images)) / len(images) / 1024
    return images, f"{count} JPEGs from {folder} (first by name, mean {mean_kb:.0f} KB)"


def random_artifacts(out: Path, seed: int = 0) -> Path:
    """Random-weight artifacts at the native sizes (224/224/300), reused when already complete:
    an export costs about a minute on 2 cores."""
    from lesionserve.export.random_artifacts import build_random_artifacts

    out = Path(out)
    def servable(path: Path) -> bool:  # exported with the cams output the explain ensemble serves
        import onnx

        return path.is_file() and "cams" in [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]

    complete = all(servable(out / name / "model.onnx") for name in LESION_ENSEMBLE.member_names) and (out / "calibration.json").is_file()
    return out if complete else build_random_artifacts(out, seed=seed)


def served_run_batch() -> int:
    """Rows per ORT run in the generated CPU member configs: the in-process baselines use the same."""
    from lesionserve.repository import CPU_RUN_BATCH

    return CPU_RUN_BATCH


@contextmanager
def served(artifacts: Path, views: int, out: Path, log_name: str = "tritonserver.log",
           variant: str | None = None) -> Iterator[TritonServer]:
    """The seed ensemble with ``artifacts`` at ``views`` views, served on free ports; ``variant``:
    a GPU variant (``--model-config-name``; checkpoints are placed where it needs them), None = CPU."""
    from lesionserve.export.assemble import assemble
    from lesionserve.spec import get_variant

    checkpoints = variant is not None and get_variant(variant).needs_checkpoints
    repo = assemble(artifacts, out=out / f"repository_t{views}", views=views, checkpoints=checkpoints)
    server = TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_path=out / log_name, startup_timeout=300,
                          model_config_name=variant)
    with server:
        yield server


@dataclass(frozen=True)
class Timing:
    """Throughput and latency percentiles from one measured loop."""

    items: int
    seconds: float
    latencies: tuple[float, ...]

    @classmethod
    def combine(cls, timings: Sequence["Timing"]) -> "Timing":
        """Several measured loops as one: items and seconds add up, latencies pool."""
        return cls(sum(t.items for t in timings), sum(t.seconds for t in timings),
                   tuple(x for t in timings for x in t.latencies))

    @property
    def per_second(self) -> float:
        return self.items / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q))

    def summary(self) -> dict[str, float]:
        return {
            "images_per_s": round(self.per_second, 3),
            "p50_ms": round(1000 * self.percentile(50), 1),
            "p95_ms": round(1000 * self.percentile(95), 1),
            "p99_ms": round(1000 * self.percentile(99), 1),
            "calls": len(self.latencies),
        }


def measure(call: Callable[[], object], items_per_call: int, calls: int, warmup: int = 1) -> Timing:
    """Run ``call`` ``warmup`` times unmeasured, then ``calls`` times back to back."""
    for _ in range(warmup):
        call()
    latencies = []
    start = time.perf_counter()
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)
    return Timing(items_per_call * calls, time.perf_counter() - start, tuple(latencies))


def calls_for(budget_views: int, views: int, images_per_call: int, minimum: int) -> int:
    """How many calls make about ``budget_views`` backbone views (at least ``minimum``)."""
    return max(minimum, -(-budget_views // (views * images_per_call)))


def cycle(items: Sequence, size: int) -> Callable[[], list]:
    """A function returning the next ``size`` items of ``items``, wrapping around."""
    position = [0]

    def take() -> list:
        start = position[0]
        position[0] = (start + size) % len(items)
        return [items[(start + i) % len(items)] for i in range(size)]

    return take


def machine_info() -> dict[str, str]:
    """CPU, core count and the versions that decide the figures."""
    import cv2
    import onnxruntime
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "tritonserver": "2.51.0 (nvidia-pytriton 0.7.0)",
    }


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)  # a crashed run never leaves half a results file


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def interleaved_rounds(ways: dict[str, Callable[[], object]], items_per_call: int, calls: int, rounds: int,
                       label: str = "") -> tuple[dict[str, list[dict]], dict[str, dict[str, float]]]:
    """Time each way in turn, ``rounds`` times (drift then touches every way alike): (each round's
    summary per way, the medians over rounds of images/s, p50 and p95 per way)."""
    rates: dict[str, list[dict]] = {name: [] for name in ways}
    for index in range(rounds):
        for name, call in ways.items():
            rates[name].append(measure(call, items_per_call, calls).summary())
        print(f"{label}round {index + 1}: " + ", ".join(f"{k} {v[-1]['images_per_s']} img/s" for k, v in rates.items()), flush=True)
    medians = {k: {m: median([r[m] for r in v]) for m in ("images_per_s", "p50_ms", "p95_ms")} for k, v in rates.items()}
    return rates, medians
