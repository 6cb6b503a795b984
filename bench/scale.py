"""Scale: the streaming command line on a memory-mapped archive, Dask worker processes, per-worker memory.

    python bench/scale.py                      # (a) 200,000 images, (b) 20,000 images, (c) VGG-16
    python bench/scale.py --parts a --n 50000 --models lenet,mlp
    python bench/scale.py --parts c            # VGG-16's per-worker memory only

(a) **Streaming CLI.** ``n`` MNIST-size images (1x28x28 float32, uniform in [0, 1], seeded; 200,000
    images = 627 MB) are written to a ``.npy`` file, and a model (``bench/workloads.py``: ``lenet``,
    the CNN, or ``mlp``, 784-400-400-10) to a native ``.npz``. ``deeptaylor explain`` (cpu, deep_taylor,
    default windows, the default 64 PNGs) runs under ``/usr/bin/time -v`` (else its ``VmHWM`` is read
    from /proc while it runs): its peak RSS (``Maximum resident set size``, what the kernel counts,
    memory-mapped file pages included) and images/s (the CLI's own count over its stream, and the
    whole process's wall time). The same data are then explained in memory, in a fresh process:
    ``np.load`` (no memory map), one ``Explainer.explain(x)`` after a warm-up, images/s and peak RSS.
    The input file was just written, so it is read from the page cache in both runs (warm).
(b) **Dask.** ``dt.dask.explain`` on a ``distributed.LocalCluster`` of 2 worker processes x 1 thread,
    then of 1 process x 1 thread, on the same ``dask_n`` images in chunks of ``chunk`` (``threads=1``
    per task). Each chunk is generated on the worker (a seeded ``from_delayed`` block, no transfer from
    the client) and reduced there to its per-image relevance sums (no transfer back), so what is timed
    is the explanation, the scheduling and the worker processes; cluster start-up and the first
    (warm-up) computation, which ships the Explainer and builds each worker's plan, are reported apart.
    The same chunks explained in this process on one thread give the pure compute time; overhead per
    chunk = (1 x 1 wall - in-process time) / chunks, which the machine's load moves as much as the work
    itself, so it is also measured on 200 chunks of one image each (little work, mostly overhead):
    (wall x workers - in-process time of the same 200 calls) / 200.
(c) **Per-worker memory: VGG-16** (3x224x224, deep_taylor, random float32 weights). A fresh process
    reports its RSS after ``import deeptaylor``, after building the network, after building the
    Explainer and its compiled plan, and after explaining one image (1 and 2 threads): what each Dask
    worker holds for one model, and the size of the payload that travels to it.

Results go to ``bench/results/scale-<date>.json`` (and a summary on stdout). Nothing is asserted about
speed; the heatmaps of (a) are compared with the in-memory ones (max abs difference) and (b)'s with
the in-process sums. The machine's load is recorded (``os.getloadavg``): on a shared machine the
ratios are the numbers to read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import deeptaylor as dt  # noqa: E402
import workloads  # noqa: E402

SHAPES = {"lenet": (1, 28, 28), "mlp": (784,)}


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    return env


def _write_inputs(path: Path, n: int, seed: int = 1, rows: int = 10000) -> None:
    """``n`` images (n, 28, 28) float32 in [0, 1) written through a memory map, ``rows`` at a time."""
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 28, 28))
    rng = np.random.default_rng(seed)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        x[s:e] = rng.random((e - s, 28, 28), dtype=np.float32)
    x.flush()
    del x


def _time_v(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; its wall time, exit status, output and peak RSS (``/usr/bin/time -v``, else VmHWM
    polled from /proc)."""
    t0 = time.perf_counter()
    if Path("/usr/bin/time").exists():
        p = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
        peak = int(m.group(1)) / 1024 if m else None
        how = "/usr/bin/time -v (Maximum resident set size)"
    else:  # pragma: no cover - machines without GNU time
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak = 0.0
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
            except OSError:
                pass
            time.sleep(0.05)
        out, err = proc.communicate()
        p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        wall = time.perf_counter() - t0
        how = "VmHWM polled from /proc every 50 ms"
    return {"rc": p.returncode, "wall_s": wall, "peak_rss_mib": peak, "stdout": p.stdout, "stderr": p.stderr[-3000:],
            "peak_rss_source": how}


_IN_MEMORY = r"""
import json, resource, sys, time
import numpy as np
import deeptaylor as dt
model, xpath, relpath = sys.argv[1:4]
net = dt.load(model)
x = np.load(xpath)                       # the whole array in memory (no memory map)
shape = {"lenet": (1, 28, 28), "mlp": (784,)}[sys.argv[4]]
x = x.reshape((x.shape[0], *shape))
ex = dt.Explainer(net, "deep-taylor", backend="cpu")
ex.explain(x[:1000])                     # warm-up: plan built, pages touched
t0 = time.perf_counter()
res = ex.explain(x)
t = time.perf_counter() - t0
ref = np.load(relpath, mmap_mode="r")
diff = 0.0
for s in range(0, x.shape[0], 20000):
    diff = max(diff, float(np.abs(res.relevance[s:s + 20000].reshape(-1) - ref[s:s + 20000].reshape(-1)).max()))
print(json.dumps({"seconds": t, "images_per_s": x.shape[0] / t,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "max_abs_diff_vs_cli": diff}))
"""


def part_a(n: int, model: str, work: Path, threads: int) -> dict:
    net = workloads.build(model, seed=0)
    mpath = work / f"{model}.npz"
    dt.save(net, mpath, input_shape=SHAPES[model])
    xpath = work / "x.npy"
    if not xpath.exists() or np.load(xpath, mmap_mode="r").shape[0] != n:
        t0 = time.perf_counter()
        _write_inputs(xpath, n)
        print(f"(a) wrote {n} images ({xpath.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s",
              flush=True)
    out = work / f"out-{model}"
    shutil.rmtree(out, ignore_errors=True)
    cli = _time_v([sys.executable, "-m", "deeptaylor.cli", "explain", "--model", str(mpath), "--input", str(xpath),
                   "--out", str(out), "--backend", "cpu", "--no-progress"], _env(threads))
    if cli["rc"] != 0:
        raise RuntimeError(f"the CLI failed: {cli['stderr']}")
    m = re.search(r"in ([\d.]+) s \((\d+) images/s\)", cli["stdout"])
    stream_s = float(m.group(1)) if m else None
    print(f"(a) {model} CLI: {cli['stdout'].splitlines()[0]}; peak RSS {cli['peak_rss_mib']:.0f} MiB, "
          f"process wall {cli['wall_s']:.1f} s", flush=True)
    p = subprocess.run([sys.executable, "-c", _IN_MEMORY, str(mpath), str(xpath), str(out / "relevance.npy"), model],
                       env=_env(threads), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"the in-memory run failed: {p.stderr[-2000:]}")
    mem = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"(a) {model} in memory: {mem['images_per_s']:.0f} images/s, peak RSS {mem['peak_rss_mib']:.0f} MiB",
          flush=True)
    size = xpath.stat().st_size
    res = {
        "model": model, "n": n, "input_file_bytes": size,
        "relevance_file_bytes": (out / "relevance.npy").stat().st_size, "threads": threads,
        "cli": {"peak_rss_mib": cli["peak_rss_mib"], "peak_rss_source": cli["peak_rss_source"],
                "process_wall_s": cli["wall_s"], "stream_s": stream_s,
                "stream_images_per_s": n / stream_s if stream_s else None,
                "process_images_per_s": n / cli["wall_s"], "stdout": cli["stdout"]},
        "in_memory": mem,
    }
    if stream_s:
        res["stream_vs_in_memory"] = (n / stream_s) / mem["images_per_s"]
    res["process_vs_in_memory"] = (n / cli["wall_s"]) / mem["images_per_s"]
    shutil.rmtree(out, ignore_errors=True)
    return res


def _block(i: int, rows: int) -> np.ndarray:
    """Chunk ``i`` of the Dask input: ``rows`` seeded images (1, 28, 28) in [0, 1)."""
    return np.random.default_rng(1000 + i).random((rows, 1, 28, 28), dtype=np.float32)


def part_b(n: int, chunk: int) -> dict:
    import dask
    import dask.array as da
    from distributed import Client, LocalCluster

    net = workloads.build("lenet", seed=0)
    ex = dt.Explainer(net, "deep-taylor", backend="cpu", threads=1)
    sizes = [min(chunk, n - s) for s in range(0, n, chunk)]

    def array(sizes):
        blocks = [da.from_delayed(dask.delayed(_block, pure=True)(i, r), shape=(r, 1, 28, 28), dtype=np.float32)
                  for i, r in enumerate(sizes)]
        return da.concatenate(blocks)

    tiny = [1] * 200   # 200 chunks of one image: what a chunk costs beyond its work
    t0 = time.perf_counter()
    for i, r in enumerate(tiny):
        ex.explain(_block(i, r))
    t_tiny_local = time.perf_counter() - t0

    # in this process, one thread: the pure compute time of the same chunks
    ex.explain(_block(0, min(chunk, 256)))
    t0 = time.perf_counter()
    local = np.concatenate([ex.explain(_block(i, r)).relevance.sum(axis=(1, 2, 3)) for i, r in enumerate(sizes)])
    t_local = time.perf_counter() - t0
    print(f"(b) in-process, 1 thread: {n / t_local:.0f} images/s", flush=True)
    out = {"model": "lenet", "n": n, "chunk": chunk, "chunks": len(sizes), "in_process_s": t_local,
           "in_process_images_per_s": n / t_local, "clusters": {}}
    for workers in (2, 1):
        t0 = time.perf_counter()
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=50) as cluster, Client(cluster):
            t_start = time.perf_counter() - t0
            x = array(sizes)
            t1 = time.perf_counter()
            dt.dask.explain(ex, x[: 2 * chunk], threads=1).relevance.sum(axis=(1, 2, 3)).compute()
            t_warm = time.perf_counter() - t1
            t1 = time.perf_counter()
            sums = dt.dask.explain(ex, x, threads=1).relevance.sum(axis=(1, 2, 3)).compute()
            t_run = time.perf_counter() - t1
            load = os.getloadavg()[0]
            t1 = time.perf_counter()
            dt.dask.explain(ex, array(tiny), threads=1).relevance.sum(axis=(1, 2, 3)).compute()
            t_tiny = time.perf_counter() - t1
        diff = float(np.abs(sums - local).max())
        out["clusters"][f"{workers}x1"] = {
            "start_s": t_start, "warm_up_s": t_warm, "seconds": t_run, "images_per_s": n / t_run,
            "max_abs_diff_sums_vs_in_process": diff, "loadavg_1min_after": load,
            "tiny_chunks": len(tiny), "tiny_seconds": t_tiny, "tiny_in_process_seconds": t_tiny_local,
            "overhead_per_chunk_ms_from_tiny": 1000 * (t_tiny * workers - t_tiny_local) / len(tiny)}
        print(f"(b) LocalCluster {workers} x 1: {n / t_run:.0f} images/s (start {t_start:.1f} s, warm-up "
              f"{t_warm:.1f} s); {len(tiny)} one-image chunks in {t_tiny:.2f} s (in process {t_tiny_local:.2f} s)",
              flush=True)
    c1, c2 = out["clusters"]["1x1"], out["clusters"]["2x1"]
    out["speedup_2x1_vs_1x1"] = c1["seconds"] / c2["seconds"]
    out["overhead_per_chunk_ms"] = 1000 * (c1["seconds"] - t_local) / len(sizes)
    out["overhead_per_chunk_ms_from_tiny_1x1"] = c1["overhead_per_chunk_ms_from_tiny"]
    return out


_VGG = r"""
import json, os, pickle, resource, sys, time
sys.path.insert(0, sys.argv[1])
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
import numpy as np
import deeptaylor as dt
import workloads
r = {"after_import_mib": rss()}
t0 = time.perf_counter(); net = workloads.build("vgg16", seed=0); r["build_s"] = time.perf_counter() - t0
r["after_network_mib"] = rss()
r["parameters"] = int(sum(l.weight.size + l.bias.size for l in net if hasattr(l, "weight")))
r["weights_mib"] = sum(l.weight.nbytes + l.bias.nbytes for l in net if hasattr(l, "weight")) / 2**20
threads = int(sys.argv[2])
ex = dt.Explainer(net, "deep-taylor", backend="cpu", threads=threads)
t0 = time.perf_counter(); ex.backend.plan(ex.graph, ex.assignment, (3, 224, 224)); r["plan_s"] = time.perf_counter() - t0
r["after_plan_mib"] = rss()
x = workloads.inputs("vgg16", 1)
t0 = time.perf_counter(); ex.explain(x); r["one_image_s"] = time.perf_counter() - t0
r["after_one_image_mib"] = rss()
r["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter(); payload = pickle.dumps(ex); r["payload_s"] = time.perf_counter() - t0
r["payload_mib"] = len(payload) / 2**20
r["threads"] = threads
print(json.dumps(r))
"""


def part_c(threads_list: list[int]) -> dict:
    out = {}
    for t in threads_list:
        p = subprocess.run([sys.executable, "-c", _VGG, str(HERE), str(t)], env=_env(t), capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"VGG-16 run failed: {p.stderr[-2000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["plan_mib"] = r["after_plan_mib"] - r["after_network_mib"]
        r["worker_total_mib"] = r["after_one_image_mib"] - r["after_import_mib"]
        out[f"{t}_threads"] = r
        print(f"(c) VGG-16, {t} thread(s): network {r['after_network_mib'] - r['after_import_mib']:.0f} MiB, plan "
              f"+{r['plan_mib']:.0f} MiB, after one image {r['after_one_image_mib']:.0f} MiB (peak "
              f"{r['peak_rss_mib']:.0f}), payload {r['payload_mib']:.0f} MiB", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="a,b,c", help="which of a,b,c to run (default all)")
    ap.add_argument("--n", type=int, default=200_000, help="(a) images in the archive (default 200,000)")
    ap.add_argument("--models", default="lenet", help="(a) comma-separated: lenet, mlp (default lenet)")
    ap.add_argument("--threads", type=int, default=2, help="(a) OpenMP threads of both runs (default 2)")
    ap.add_argument("--dask-n", type=int, default=20_000, help="(b) images (default 20,000)")
    ap.add_argument("--chunk", type=int, default=1000, help="(b) images per chunk (default 1,000)")
    ap.add_argument("--vgg-threads", default="1,2", help="(c) thread counts (default 1,2)")
    ap.add_argument("--work", default=None, help="scratch directory for the files of (a) (default: a temp dir)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/scale-<date>.json)")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_count": os.cpu_count(),
                    "loadavg_start": os.getloadavg(), "deeptaylor": dt.__version__, "numpy": np.__version__}
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dt-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if "a" in parts:
            report["a_stream_cli"] = [part_a(args.n, m, work, args.threads) for m in args.models.split(",")]
        if "b" in parts:
            import dask
            import distributed

            report["b_dask"] = part_b(args.dask_n, args.chunk)
            report["b_dask"]["versions"] = {"dask": dask.__version__, "distributed": distributed.__version__}
        if "c" in parts:
            report["c_vgg16_worker_memory"] = part_c([int(t) for t in args.vgg_threads.split(",")])
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report["loadavg_end"] = os.getloadavg()
    path = Path(args.out) if args.out else HERE / "results" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
