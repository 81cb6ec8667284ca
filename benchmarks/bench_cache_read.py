"""Read throughput and memory of a hidden-pair cache: plain sequential reads vs training-style loading.

    python -m cross_modal_sd.data.synthetic --out /tmp/synth --size-gb 4.5 --dim 4096
    python benchmarks/bench_cache_read.py --cache /tmp/synth

Runs, each over the whole cache and each from a cold page cache:

1. ``sequential``: the shard files read front to back in 16 MiB blocks (the disk's ceiling);
   run first and last, and loader throughput is compared with the mean of the two.
2. ``window/wN``: DataLoader over ``HiddenPairDataset`` with ``ShardWindowSampler`` (the train
   loader's default), batch 64, ``collate_pairs``, N workers.
3. ``random/w2``: the same with a uniform ``RandomSampler``, for contrast.

Cold cache: as root the page cache is dropped (``/proc/sys/vm/drop_caches``) before each run. When
that is not permitted, every file is read once before each run instead, so all runs are warm and
comparable (the mode is printed). Throughput counts payload bytes: whole files for ``sequential``,
unpadded rows (h_draft + h_target + tokens) for the loaders. Memory is sampled every 50 ms over the
process and its DataLoader workers: the peak of summed RSS (counts pages shared between forked
workers once per process, so it overstates) and of summed PSS (shared pages split between sharers:
the physical memory used).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import psutil
import torch
from torch.utils.data import DataLoader, RandomSampler

from cross_modal_sd.data.cache import HiddenPairCache
from cross_modal_sd.data.dataset import HiddenPairDataset, ShardWindowSampler, collate_pairs

BLOCK = 16 << 20


def make_cold(files: list[Path]) -> str:
    """Drop the page cache if allowed (returns "cold"), else pre-read every file ("warm")."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "cold"
    except OSError:
        buf = bytearray(BLOCK)
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
        return "warm"


class MemoryPeak:
    """Background sampler of summed RSS and PSS over this process and its children."""

    def __init__(self, every_s: float = 0.05):
        self.every_s = every_s
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            rss = pss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    m = p.memory_full_info()
                except psutil.Error:  # a worker that just exited
                    continue
                rss += m.rss
                pss += m.pss
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self._stop.wait(self.every_s)


def sequential_read(files: list[Path]) -> int:
    buf = bytearray(BLOCK)
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total


def loader_read(
    cache: HiddenPairCache, sampler: str, workers: int, batch_size: int, seed: int
) -> int:
    ds = HiddenPairDataset(cache)
    if sampler == "window":
        order = ShardWindowSampler(ds.shard_ids, window=4, seed=seed, prefetch=cache.prefetch)
    else:
        order = RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(
        ds, batch_size=batch_size, sampler=order, collate_fn=collate_pairs, num_workers=workers
    )
    row_bytes = sum(cache.dims) * torch.empty(0, dtype=getattr(torch, cache.dtype)).element_size()
    total = 0
    for batch in loader:
        total += int(batch["mask"].sum()) * (row_bytes + 4)  # + the int32 token
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, type=Path, help="cache directory")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    # Sizes only: hashing 4.5 GB would warm the page cache and is not what is measured here.
    cache = HiddenPairCache(args.cache, verify="size")
    files = [args.cache / s["file"] for s in cache.manifest["shards"]]
    size = sum(f.stat().st_size for f in files)
    print(
        f"{cache}\n{len(files)} shards, {size / 1e9:.2f} GB, torch threads {torch.get_num_threads()}"
    )

    # Sequential reads bracket the loader runs: on a shared machine the disk's speed drifts, and
    # the spread of the two shows by how much.
    runs = [("sequential", 0), ("window", 0), ("window", 2), ("random", 2), ("sequential", 0)]
    results = []
    for sampler, workers in runs:
        mode = make_cold(files)
        with MemoryPeak() as mem:
            start = time.perf_counter()
            if sampler == "sequential":
                n = sequential_read(files)
            else:
                n = loader_read(cache, sampler, workers, args.batch_size, args.seed)
            seconds = time.perf_counter() - start
        name = sampler if sampler == "sequential" else f"{sampler}/w{workers}"
        results.append(
            {
                "run": name,
                "page_cache": mode,
                "MB": n / 1e6,
                "seconds": seconds,
                "MB_per_s": n / 1e6 / seconds,
                "peak_rss_sum_GB": mem.rss / 1e9,
                "peak_pss_sum_GB": mem.pss / 1e9,
            }
        )
        print(
            f"{name:<12} {mode:<5} {n / 1e6:9.0f} MB {seconds:7.1f} s {n / 1e6 / seconds:8.0f} MB/s  "
            f"peak RSS sum {mem.rss / 1e9:5.2f} GB  PSS sum {mem.pss / 1e9:5.2f} GB"
        )
    base = (results[0]["MB_per_s"] + results[-1]["MB_per_s"]) / 2
    for r in results:
        r["ratio_to_sequential"] = r["MB_per_s"] / base
    print(
        f"ratio to mean sequential ({base:.0f} MB/s): "
        + ", ".join(f"{r['run']} {r['ratio_to_sequential']:.2f}" for r in results[1:-1])
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
