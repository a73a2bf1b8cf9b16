"""``./run.sh bench --only decode``: peak memory of decoding one image, for the worst files we accept.

Each file is decoded by ``core.images.load_image`` in a fresh process whose peak-RSS mark is reset
just before the call (``/proc/self/clear_refs``), so the figure is the decode's own memory above
what the process already held, not the imports'. The files sit just under ``core.images``'
limits: what a hostile or careless test folder can make every decode cost.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
from pathlib import Path

from PIL import Image

from bench.measure import BenchContext, Row
from core.images import MAX_DECODE_BYTES, MAX_PIXELS, decode_budget

# (kind, PIL mode to create, file format, EXIF-rotated); each a legal image that load_image accepts.
KINDS = (
    ("1-bit PNG", "1", "PNG", False),
    ("16-bit grayscale PNG", "I;16", "PNG", False),
    ("palette PNG with transparency", "P", "PNG", False),
    ("8-bit RGB PNG", "RGB", "PNG", False),
    ("RGBA PNG", "RGBA", "PNG", False),
    ("RGB JPEG", "RGB", "JPEG", False),
    ("EXIF-rotated RGB JPEG", "RGB", "JPEG", True),
    ("CMYK JPEG", "CMYK", "JPEG", False),
)


def largest_accepted_side(mode: str, rotated: bool) -> int:
    """The side of the largest square image of this kind within ``MAX_PIXELS`` and the decode budget."""
    side = int(min(MAX_PIXELS, MAX_DECODE_BYTES / decode_budget(mode, 1, 1, rotated)) ** 0.5)
    while side * side > MAX_PIXELS or decode_budget(mode, side, side, rotated) > MAX_DECODE_BYTES:
        side -= 1
    return side


def write_image(path: Path, mode: str, fmt: str, side: int, rotated: bool) -> None:
    """A flat image (a few KB compressed: the decompression-bomb shape)."""
    options: dict = {"transparency": 0} if mode == "P" else {}
    if rotated:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees to display
        options["exif"] = exif
    Image.new(mode, (side, side)).save(path, fmt, **options)


def _probe(path: str, out) -> None:
    """Child process: decode ``path`` once; report (peak kB above the start, start kB)."""
    from core.images import load_image

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    start = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak mark to the current RSS
    pixels = load_image(Path(path))
    out.put((status("VmHWM") - start, start, pixels.shape))


def measure_decode_kb(path: Path) -> tuple[int, tuple]:
    """Peak resident kB that decoding ``path`` adds to a fresh process."""
    mp = multiprocessing.get_context("spawn")
    queue = mp.Queue()
    proc = mp.Process(target=_probe, args=(str(path), queue))
    proc.start()
    try:
        while True:
            try:
                peak_kb, _, shape = queue.get(timeout=1)
                break
            except queue_module.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"the decode probe of {path} died (exit code {proc.exitcode})") from None
    finally:
        proc.join(timeout=60)
    return peak_kb, shape


def bench_decode(ctx: BenchContext) -> None:
    folder = ctx.workdir / "decode"
    folder.mkdir(exist_ok=True)
    for kind, mode, fmt, rotated in KINDS:
        side = largest_accepted_side(mode, rotated)
        if ctx.settings.quick:
            side = min(side, 1024)
        path = folder / f"{mode.replace(';', '')}{'-rotated' if rotated else ''}.{fmt.lower()}"
        write_image(path, mode, fmt, side, rotated)
        peak_kb, shape = measure_decode_kb(path)
        pixels = shape[0] * shape[1]
        ctx.rows.append(
            Row(
                "decode",
                f"peak memory of decoding a {kind} of {side}x{side}",
                peak_kb / 1024,
                f"{path.stat().st_size / 1024:.1f} KB file, {peak_kb * 1024 / pixels:.2f} bytes per pixel; "
                f"budget {decode_budget(mode, side, side, rotated) / 2**20:.0f} MB",
                goal=("<=", MAX_DECODE_BYTES / 2**20),
                unit="MB",
            )
        )
