"""Timing and memory helpers shared by the benchmark scripts."""

import gc
import os
import threading
import time


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
