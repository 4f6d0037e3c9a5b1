"""Benchmark: load a DICOM series into a volume, pacs-triage against its peers.

Measures, on the same files in the same run: pacs-triage's
``volume_from_datasets`` (after ``pydicom.dcmread``), highdicom's
``get_volume_from_series`` (after ``pydicom.dcmread``), and MONAI's
``LoadImage(reader="PydicomReader")`` on the folder. Prints the median of
several runs, the ratio to pacs-triage, and the hardware.

Usage: python benchmarks/volume_load.py [SERIES_FOLDER] [--runs N]
(default folder: ../shared/data/ct-pancreas-tcia, relative to the repository).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.volume import volume_from_datasets  # noqa: E402


def _read(files: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in files]


def _ours(files: list[Path]) -> np.ndarray:
    return volume_from_datasets(_read(files)).pixels


def _highdicom(files: list[Path]) -> np.ndarray:
    import highdicom as hd

    return hd.get_volume_from_series(_read(files), dtype=np.float32).array


def _monai(files: list[Path]) -> np.ndarray:
    from monai.transforms import LoadImage

    return np.asarray(LoadImage(reader="PydicomReader", image_only=True)(str(files[0].parent)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folder", nargs="?", default=str(REPO / ".." / "shared" / "data" / "ct-pancreas-tcia")
    )
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    files = sorted(Path(args.folder).glob("*.dcm"))
    if not files:
        sys.exit(f"no .dcm files in {args.folder}")
    print(f"series: {len(files)} files in {Path(args.folder).resolve()}")
    print(
        f"hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"visible, Python {platform.python_version()}, {platform.system()}"
    )
    results = {}
    for name, load in (("pacs-triage", _ours), ("highdicom", _highdicom), ("monai", _monai)):
        shape = load(files).shape  # warm-up: imports, decoder plugins
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            load(files)
            times.append(time.perf_counter() - start)
        results[name] = statistics.median(times)
        print(f"{name:12s} median {results[name]:.3f} s over {args.runs} runs, shape {shape}")
    for name in ("highdicom", "monai"):
        print(f"ratio {name} / pacs-triage: {results[name] / results['pacs-triage']:.2f}")


if __name__ == "__main__":
    main()
