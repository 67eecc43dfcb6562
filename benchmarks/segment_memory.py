"""Child process of bench_speed.py: segment one synthetic volume and report peak resident memory.

Usage: segment_memory.py NX NY NZ PRESET [THREADS]  -> one JSON line on stdout with the peak
resident set size (bytes) after imports, after the input volume exists, and after segmenting
it. Run in its own process so the peak belongs to this one job.
"""
from __future__ import annotations

import json
import resource
import sys
import time

from common import max_rss_bytes, random_volume

import torch  # noqa: E402  (after common, which puts the engine on sys.path)

from vaeuda.nets import VAEUDANet, get_preset  # noqa: E402
from vaeuda.predict import segment_image  # noqa: E402
from vaeuda.volumes import DEFAULT_NORMALISATION  # noqa: E402


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    /proc/self/status VmHWM where there is one: Linux carries ``ru_maxrss`` over fork + exec, so
    a child started by a large parent would report the parent's peak; VmHWM belongs to this
    process's own memory map only. Elsewhere ``getrusage`` (KiB on Linux, bytes on macOS).
    """
    try:
        for line in open("/proc/self/status", encoding="utf-8"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return max_rss_bytes(resource.RUSAGE_SELF)


def main(argv) -> None:
    if len(argv) not in (4, 5) or not all(a.isdigit() for a in argv[:3] + argv[4:]):   # e.g. --help
        sys.exit(__doc__.split("\n\n")[1].strip())
    nx, ny, nz, preset = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    if len(argv) > 4:
        torch.set_num_threads(int(argv[4]))
    torch.manual_seed(0)
    net = VAEUDANet(get_preset(preset)).eval()
    meta = {"normalisation": dict(DEFAULT_NORMALISATION)}
    after_import = peak_rss_bytes()
    image = random_volume((nx, ny, nz))
    with_input = peak_rss_bytes()
    t = time.perf_counter()
    classes = segment_image(net, meta, image, torch.device("cpu"), domain="source")
    seconds = time.perf_counter() - t
    assert classes.GetSize() == image.GetSize()
    print(json.dumps({"size_xyz": [nx, ny, nz], "preset": preset, "input_bytes": nx * ny * nz * 4,
                      "rss_after_import": after_import, "rss_with_input": with_input,
                      "rss_peak": peak_rss_bytes(), "seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1:])
