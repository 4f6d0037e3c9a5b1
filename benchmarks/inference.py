"""Benchmark: model inference per installed model, pacs-triage's registry against plain MONAI.

For every installed model (shipped bundles plus ``--models-dir``), on volumes
the model applies to (synthetic head CT phantoms, 40 x 256 x 256, for CT
models; synthetic 512 x 512 chest radiographs otherwise; the real 134-slice
512 x 512 abdominal CT times preprocessing of a full-size CT), measures in one run:

- preprocessing (the bundle's MONAI transforms) per volume,
- the network alone: volumes/s at batch 1 and at batches 2, 4, 8 (the best is quoted),
- postprocessing (probability, mask volume, centroid, key image) per volume,
- ``InstalledModel.predict`` end to end per volume (= pre + network + post),
- the peer: the same bundle run the plain MONAI way (``ConfigParser`` network,
  the Compose of inference.json, ``SimpleInferer``, sigmoid) on the same volume,

and prints the ratios (predict / peer; share of predict spent outside the
network). Threads: ``--threads`` (default: all visible cores); device: ``--device``
(default ``auto``: CUDA when present). Prints the hardware.

Usage: python benchmarks/inference.py [--runs N] [--threads T] [--device cpu|cuda|auto]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from models.phantoms import head_phantom  # noqa: E402
from models.registry import (  # noqa: E402
    SHIPPED_BUNDLES_DIR,
    InstalledModel,
    ModelRegistry,
    resolve_device,
)
from pipeline.volume import Volume  # noqa: E402

CT_SERIES = REPO / ".." / "shared" / "data" / "ct-pancreas-tcia"


def _median(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _phantom_volume(seed: int) -> Volume:
    phantom = head_phantom(seed, positive=seed % 2 == 0)
    return Volume(
        pixels=phantom.hu.astype(np.float32),
        spacing=phantom.spacing,
        origin=(0.0, 0.0, 0.0),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        sop_instance_uids=tuple(f"2.25.{seed}.{k}" for k in range(phantom.hu.shape[0])),
        modality="CT",
        series_instance_uid=f"2.25.{seed}",
    )


def _chest_volume(seed: int) -> Volume:
    from models.phantoms import chest_radiograph

    phantom = chest_radiograph(seed, positive=seed % 2 == 0)
    return Volume(
        pixels=phantom.pixels.astype(np.float32)[np.newaxis],
        spacing=(1.0, phantom.spacing, phantom.spacing),
        origin=(0.0, 0.0, 0.0),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        sop_instance_uids=(f"2.25.{seed}.1",),
        modality="DX",
        series_instance_uid=f"2.25.{seed}",
    )


def _volumes_for(model: InstalledModel) -> list[Volume]:
    """Eight phantoms the model applies to: head CT for CT models, chest radiographs else."""
    if "CT" in model.rule.modality:
        return [_phantom_volume(seed) for seed in range(8)]
    return [_chest_volume(seed) for seed in range(8)]


def _real_ct() -> Volume | None:
    files = sorted(CT_SERIES.glob("*.dcm"))
    if not files:
        return None
    import pydicom

    from pipeline.volume import volume_from_datasets

    return volume_from_datasets([pydicom.dcmread(f) for f in files])


def _peer(model: InstalledModel) -> Callable[[Volume], float]:
    """The bundle run the plain MONAI way, without the registry."""
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor
    from monai.inferers import SimpleInferer

    parser = ConfigParser()
    parser.read_config(str(model.path / "configs" / "inference.json"))
    transforms = [
        t
        for t in parser.config["preprocessing"]["transforms"]
        if not str(t.get("_target_", "")).startswith("LoadImage")
    ]
    parser["preprocessing"]["transforms"] = transforms
    compose = parser.get_parsed_content("preprocessing")
    if model.weights_file is not None and model.weights_file.suffix == ".ts":
        network = torch.jit.load(str(model.weights_file), map_location=model.device)
    else:
        network = parser.get_parsed_content("network_def")
        network.load_state_dict(torch.load(str(model.weights_file), weights_only=True))
        network = network.to(model.device)
    network.eval()
    inferer = SimpleInferer()

    two_d = model.input.patch_size is not None and len(model.input.patch_size) == 2

    def run(volume: Volume) -> float:
        pixels = volume.pixels[0] if two_d else volume.pixels
        image = MetaTensor(pixels, meta={"original_channel_dim": "no_channel"})
        data = compose({"image": image})
        with torch.inference_mode():
            out = inferer(data["image"][None].to(model.device), network)
            if isinstance(out, tuple | list):
                out = out[0]
            return float(torch.sigmoid(out.flatten(1).max(dim=1).values)[0])

    return run


def bench_model(
    model: InstalledModel, volumes: list[Volume], runs: int, real: Volume | None
) -> None:
    print(f"\nmodel {model.name} {model.version} ({model.mode.value}) on {model.device}")
    volume = volumes[0]
    pre = _median(lambda: model.preprocess(volume), runs)
    print(f"  preprocessing {volume.shape}:          {pre * 1000:8.1f} ms/volume")
    if real is not None and model.rule.modality and "CT" in model.rule.modality:
        pre_real = _median(lambda: model.preprocess(real), max(1, runs // 2))
        print(f"  preprocessing {real.shape} (real CT): {pre_real * 1000:8.1f} ms/volume")
    images = [model.preprocess(v) for v in volumes]
    rates = {}
    for batch in (1, 2, 4, 8):
        if batch > len(images):
            break
        seconds = _median(lambda b=batch: model.infer(images[:b]), runs)
        rates[batch] = batch / seconds
        print(f"  network, batch {batch}:                 {rates[batch]:8.1f} volumes/s")
    best = max(rates, key=lambda b: rates[b])
    raw = model.infer(images[:1])[0]
    post = _median(lambda: [model._finding(s, raw, volume) for s in model.outputs], runs)
    print(f"  postprocessing:                     {post * 1000:8.1f} ms/volume")
    predict = _median(lambda: model.predict(volume), runs)
    network_1 = 1.0 / rates[1]
    peer_run = _peer(model)
    peer = _median(lambda: peer_run(volume), runs)
    print(f"  predict (end to end):               {predict * 1000:8.1f} ms/volume")
    print(f"  peer (plain MONAI bundle run):      {peer * 1000:8.1f} ms/volume")
    print(f"  batch 1: {rates[1]:.1f} volumes/s; best batch {best}: {rates[best]:.1f} volumes/s")
    print(f"  ratio predict / plain MONAI: {predict / peer:.2f}")
    print(f"  share of predict outside the network: {max(predict - network_1, 0) / predict:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models-dir", type=Path, action="append", default=[])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(
        f"hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, GPU {gpu}, "
        f"device {device}, Python {platform.python_version()}"
    )
    registry = ModelRegistry.discover([SHIPPED_BUNDLES_DIR, *args.models_dir], device=device)
    for problem in registry.problems:
        print(f"skipped: {problem.message}")
    real = _real_ct()
    for model in registry.models():
        bench_model(model, _volumes_for(model), args.runs, real)


if __name__ == "__main__":
    main()
