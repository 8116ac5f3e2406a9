"""Timing and memory helpers shared by the benchmark scripts."""

import contextlib
import datetime
import gc
import io
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Iterator


def best_time(fn, repeat: int) -> float:
    """The fastest of ``repeat`` runs of ``fn()`` in seconds, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_memory(fn) -> int:
    """Peak resident memory above the level before ``fn`` runs, sampled every millisecond
    (Linux). Run it where large blocks are mmap-ed (``MALLOC_MMAP_THRESHOLD_=131072``), so that
    freed memory leaves the resident set."""
    gc.collect()
    base, peak, done = _rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], _rss()) - base


PAGE = Path(__file__).resolve().parent.parent / "docs" / "performance.rst"
_LATEST_END = ".. end of the latest runs"


def _machine() -> str:
    """The CPU (or GPU), torch's version and threads, in words."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu} ({os.cpu_count()} cores){gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


@contextlib.contextmanager
def docs_table(name: str, enabled: bool, page: Path = PAGE) -> Iterator[None]:
    """Print as usual inside the block; with ``enabled``, also write what was printed into the
    performance page, as the block of ``name`` (``.. begin NAME`` to ``.. end NAME``, replaced
    if there, else added before ``.. end of the latest runs``), with the date and machine."""
    if not enabled:
        yield
        return
    printed, out = io.StringIO(), sys.stdout

    class Tee(io.TextIOBase):
        def write(self, text):
            out.write(text)
            return printed.write(text)

    with contextlib.redirect_stdout(Tee()):
        yield
    command = " ".join(["python3", Path(sys.argv[0]).name, *sys.argv[1:]])
    lines = [f".. begin {name}", "", f"``{command}``, {datetime.date.today()}, {_machine()}:", "",
             ".. code-block:: text", ""]
    lines += ["    " + line if line.strip() else "" for line in printed.getvalue().rstrip().splitlines()]
    block = "\n".join(lines + ["", f".. end {name}"])
    text = page.read_text()
    begin, end = f".. begin {name}\n", f".. end {name}"
    if begin in text:
        start = text.index(begin)
        text = text[:start] + block + text[text.index(end, start) + len(end):]
    else:
        text = text.replace(_LATEST_END, block + "\n\n" + _LATEST_END)
    page.write_text(text)
