"""The torchvision classification zoo: does each architecture import (``dt.from_torch``), do its heatmaps
agree with Zennit's, and how fast / how large is each framework, at 224², 2 threads.

For every architecture (torchvision 0.28, ``weights=None``; BatchNorm running statistics and affine
parameters seeded random, as tests/test_zoo_zennit.py, so that folding matters; float32):

* **imports**: ``dt.from_torch(model, (3, 224, 224))`` succeeds (or the error, one line), and the
  imported graph's forward vs torch's (max relative difference);
* **heatmap vs Zennit**: ``epsilon_plus_flat`` (Zennit's ``EpsilonPlusFlat``) on the first images,
  ``max|R - R_zennit| / max|R_zennit|``, median over the images. Zennit runs with ``ResNetCanonizer``
  (ResNet, ResNeXt, Wide-ResNet) or ``SequentialMergeBatchNorm`` (the rest). Where no Zennit canonizer
  makes Zennit apply the same rules (a functional ``+`` / ``*`` / pooling that Zennit takes the plain
  gradient of, or BatchNorm before the convolution), the table says "Zennit: no canonizer" and gives
  the measured difference in brackets (docs/importing.md, "Agreement with Zennit");
* **img/s**: deeptaylor ``backend="cpu"`` and Zennit (PyTorch CPU) at ``--threads`` (2), same run,
  best of ``--repeats`` timed runs after a warm-up, each framework in its own subprocess with its
  thread count pinned, timed with bench/compare.py's ``_best_time`` (imported, not copied);
* **peak RSS**: ``ru_maxrss`` of each framework's own process (model construction, import and
  explanation included; the torch model is built in both).

Writes ``bench/results/zoo-<date>.json`` and prints a Markdown table, one row per architecture.

Usage::

    python bench/zoo.py                                   # the whole zoo (about an hour on 2 cores)
    python bench/zoo.py --models resnet18 alexnet --batch 2 --repeats 1
    python bench/zoo.py --list
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare import WARN_DIFF, _best_time, _env, _fmt_rate, _peak_rss_mib

SHAPE = (3, 224, 224)
COMPOSITE = "epsilon_plus_flat"
CHECK_IMAGES = 4

_NO_CANON_ADD = "functional + (Zennit: plain gradient)"
_NO_CANON_SE = "functional + and squeeze-excitation x * gate (Zennit: plain gradient)"

# name -> (torchvision constructor, kwargs, Zennit canonizer, why Zennit's rules differ (None: the same))
ARCHS: dict[str, tuple[str, dict, str, str | None]] = {
    "alexnet": ("alexnet", {}, "merge_bn", None),
    **{f"vgg{d}{bn}": (f"vgg{d}{bn}", {}, "merge_bn", None) for d in (11, 13, 16, 19) for bn in ("", "_bn")},
    **{f"resnet{d}": (f"resnet{d}", {}, "resnet", None) for d in (18, 34, 50, 101, 152)},
    "resnext50_32x4d": ("resnext50_32x4d", {}, "resnet", None),
    "resnext101_32x8d": ("resnext101_32x8d", {}, "resnet", None),
    "wide_resnet50_2": ("wide_resnet50_2", {}, "resnet", None),
    "wide_resnet101_2": ("wide_resnet101_2", {}, "resnet", None),
    **{f"densenet{d}": (f"densenet{d}", {}, "none",
                        ("BatchNorm before each convolution, on the concatenation (SequentialMergeBatchNorm "
                        "would merge it into the previous layer's conv, which it does not follow: run without "
                        "canonizer, Zennit passes relevance through it unchanged); F.relu / "
                        "F.adaptive_avg_pool2d at the head (plain gradient)"))
       for d in (121, 161, 169, 201)},
    "squeezenet1_0": ("squeezenet1_0", {}, "merge_bn", None),
    "squeezenet1_1": ("squeezenet1_1", {}, "merge_bn", None),
    "googlenet": ("googlenet", {"aux_logits": False, "init_weights": False}, "merge_bn", None),
    "inception_v3": ("inception_v3", {"aux_logits": False, "init_weights": False}, "merge_bn",
                     ("functional F.avg_pool2d / F.max_pool2d in the Inception blocks (plain gradient: "
                     "R / k² to every pixel of an average pool window)")),
    "mobilenet_v2": ("mobilenet_v2", {}, "merge_bn", _NO_CANON_ADD + "; F.adaptive_avg_pool2d at the head"),
    "mobilenet_v3_small": ("mobilenet_v3_small", {}, "merge_bn", _NO_CANON_SE),
    "mobilenet_v3_large": ("mobilenet_v3_large", {}, "merge_bn", _NO_CANON_SE),
    "mnasnet1_0": ("mnasnet1_0", {}, "merge_bn", _NO_CANON_ADD + "; x.mean([2, 3]) at the head"),
    "shufflenet_v2_x1_0": ("shufflenet_v2_x1_0", {}, "merge_bn",
                           "x.mean([2, 3]) at the head (plain gradient: R / HW to every pixel)"),
    **{f"efficientnet_b{i}": (f"efficientnet_b{i}", {}, "merge_bn", _NO_CANON_SE) for i in range(8)},
    **{f"efficientnet_v2_{s}": (f"efficientnet_v2_{s}", {}, "merge_bn", _NO_CANON_SE) for s in "sml"},
    "regnet_x_400mf": ("regnet_x_400mf", {}, "merge_bn", _NO_CANON_ADD),
    "regnet_y_400mf": ("regnet_y_400mf", {}, "merge_bn", _NO_CANON_SE),
}
QUICK = ["resnet18", "alexnet", "squeezenet1_1"]


# --------------------------------------------------------------------------------------------------
# Workers (run in subprocesses)


def import_torchvision():
    """torchvision's model zoo beside the CPU torch (as tests/conftest.py: PyPI's torchvision 0.28 is
    built for CUDA torch, its compiled ops fail to register; an empty ``_meta_registrations`` first)."""
    name = "torchvision._meta_registrations"
    if "torchvision" not in sys.modules and name not in sys.modules:
        sys.modules[name] = types.ModuleType(name)
    import torchvision

    return torchvision


def make_model(arch: str):
    """The architecture in eval mode (float32), seeded; BatchNorm statistics / affine parameters random
    (mean N(0, 0.1), var U(0.5, 1.5), weight U(0.5, 1.5), bias N(0, 0.1))."""
    import torch

    tv = import_torchvision()
    ctor, kwargs, _, _ = ARCHS[arch]
    torch.manual_seed(0)
    model = getattr(tv.models, ctor)(weights=None, **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(c, generator=g))
                    m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return model.eval()


def make_input(n: int, seed: int = 1):
    import numpy as np

    return np.random.default_rng(seed).uniform(0.05, 0.95, size=(n, *SHAPE)).astype(np.float32)


def _save(path: str, a) -> None:
    import numpy as np

    np.save(path, np.ascontiguousarray(np.asarray(a, dtype=np.float32)), allow_pickle=False)


def worker_deeptaylor(spec: dict) -> dict:
    import numpy as np
    import torch

    import deeptaylor as dt

    torch.set_num_threads(spec["threads"])
    model = make_model(spec["arch"])
    x = make_input(spec["batch"])
    t0 = time.perf_counter()
    try:
        net = dt.from_torch(model, SHAPE)
    except Exception as exc:  # noqa: BLE001 - any import failure is the result
        return {"status": "import_error", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:400],
                "peak_rss_mib": _peak_rss_mib()}
    import_s = time.perf_counter() - t0
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    fwd = np.asarray(net.forward(x.astype(np.float64)))
    fwd_diff = float(np.abs(fwd - ref).max() / max(np.abs(ref).max(), 1e-30))
    del model
    try:
        ex = dt.Explainer(net, dt.composites.get(spec["composite"]), backend="cpu", threads=spec["threads"])
        res = ex.explain(x)  # warm-up
    except dt.DeepTaylorError as exc:
        return {"status": "explain_error", "reason": f"{type(exc).__name__}: {exc}"[:400], "import_s": import_s,
                "forward_rel_diff": fwd_diff, "peak_rss_mib": _peak_rss_mib()}
    best = _best_time(lambda: ex.explain(x), spec["repeats"])
    _save(spec["heatmap"], res.relevance[:spec["check_images"]])
    return {"status": "ok", "nodes": len(net), "import_s": import_s, "forward_rel_diff": fwd_diff,
            "seconds": best, "images_per_s": spec["batch"] / best, "peak_rss_mib": _peak_rss_mib()}


def zennit_canonizers(kind: str):
    import_torchvision()
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer

    return {"resnet": [ResNetCanonizer()], "merge_bn": [SequentialMergeBatchNorm()], "none": []}[kind]


def worker_zennit(spec: dict) -> dict:
    import torch

    import_torchvision()
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    torch.set_num_threads(spec["threads"])
    model = make_model(spec["arch"])
    x = torch.from_numpy(make_input(spec["batch"]))
    comp = EpsilonPlusFlat(canonizers=zennit_canonizers(ARCHS[spec["arch"]][2]))

    def seed(out):  # the argmax logit, as deeptaylor's target=None
        idx = out.argmax(dim=1, keepdim=True)
        return torch.zeros_like(out).scatter_(1, idx, out.gather(1, idx))

    def run():
        with Gradient(model=model, composite=comp) as attributor:
            return attributor(x, seed)

    try:
        _, rel = run()
    except Exception as exc:  # noqa: BLE001 - e.g. a canonizer that does not fit the model
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:400],
                "peak_rss_mib": _peak_rss_mib()}
    best = _best_time(run, spec["repeats"])
    _save(spec["heatmap"], rel.detach().numpy()[:spec["check_images"]])
    import zennit

    return {"status": "ok", "seconds": best, "images_per_s": spec["batch"] / best, "peak_rss_mib": _peak_rss_mib(),
            "torch": torch.__version__, "zennit": getattr(zennit, "__version__", None)}


WORKERS = {"deeptaylor": worker_deeptaylor, "zennit": worker_zennit}


# --------------------------------------------------------------------------------------------------
# Parent


def run_worker(kind: str, spec: dict, threads: int, timeout: float) -> dict:
    """``kind``'s worker in a fresh process (its own peak RSS), threads pinned as bench/compare.py."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)]
    try:
        p = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"more than {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"status": "error", "reason": " | ".join(tail)[:400], "returncode": p.returncode}


def heatmap_diff(a, b) -> dict:
    """Per image ``max|a - b| / max|b|`` (b = Zennit), their median and maximum."""
    import numpy as np

    k = min(len(a), len(b))
    a, b = a[:k].reshape(k, -1).astype(np.float64), b[:k].reshape(k, -1).astype(np.float64)
    per = (np.abs(a - b).max(axis=1) / np.maximum(np.abs(b).max(axis=1), 1e-30)).tolist()
    return {"per_image": per, "median": float(np.median(per)), "max": float(np.max(per))}


def _agreement_cell(arch: str, r: dict) -> str:
    why = ARCHS[arch][3]
    d = r.get("heatmap_diff")
    num = f"{d['median']:.1e}" if d else "-"
    if why is not None:
        return f"Zennit: no canonizer ({num})"
    if not d:
        z = r["zennit"]
        return f"- (Zennit {z.get('status')})" if z.get("status") != "ok" else "-"
    return num + ("" if d["median"] <= WARN_DIFF else " ✗")


def markdown(report: dict) -> str:
    rows = [("| architecture | imports | heatmap vs Zennit (epsilon_plus_flat) | deeptaylor cpu img/s | "
            "Zennit img/s | × Zennit | peak RSS MiB deeptaylor / Zennit |"),
            "|---|---|---|---|---|---|---|"]
    for arch, r in report["models"].items():
        d, z = r["deeptaylor"], r["zennit"]
        if d.get("status") == "import_error":
            imports = f"no: {d['reason'][:120]}"
        elif "forward_rel_diff" in d:
            imports = "yes" + ("" if d["forward_rel_diff"] <= 1e-4 else f" (forward off {d['forward_rel_diff']:.1e})")
        else:
            imports = f"? ({d.get('status')}: {d.get('reason', '')[:80]})"
        if d.get("status") not in ("ok", "import_error"):
            imports += f"; explain: {d.get('status')} {d.get('reason', '')[:80]}"
        ratio = (d["images_per_s"] / z["images_per_s"]) if d.get("images_per_s") and z.get("images_per_s") else None
        rss = f"{_fmt_rate(d.get('peak_rss_mib'))} / {_fmt_rate(z.get('peak_rss_mib'))}"
        rows.append(f"| {arch} | {imports} | {_agreement_cell(arch, r)} | {_fmt_rate(d.get('images_per_s'))} | "
                    f"{_fmt_rate(z.get('images_per_s'))} | {'-' if ratio is None else f'{ratio:.2f}'} | {rss} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    ap = argparse.ArgumentParser(description="torchvision zoo: import, Zennit agreement, speed, memory")
    ap.add_argument("--models", nargs="+", default=list(ARCHS), choices=list(ARCHS), metavar="ARCH",
                    help="architectures (default: all; --list shows them)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, one repeat")
    ap.add_argument("--list", action="store_true", help="list the architectures and exit")
    ap.add_argument("--batch", type=int, default=4, help="images per explanation (default 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up; the best counts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-zennit", action="store_true", help="deeptaylor only")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker process")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/zoo-<date>.json)")
    args = ap.parse_args(argv)
    if args.list:
        for a, (_, _, canon, why) in ARCHS.items():
            canon = {"resnet": "ResNetCanonizer", "merge_bn": "SequentialMergeBatchNorm", "none": "no canonizer"}[canon]
            print(f"{a:<22} Zennit: {canon}"
                  f"{'' if why is None else ' — no canonizer makes the rules equal: ' + why}")
        return 0
    models = QUICK if args.quick else args.models
    repeats = 1 if args.quick else args.repeats
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = args.out or HERE / "results" / f"zoo-{stamp}.json"
    report: dict = {
        "date": stamp, "threads": args.threads, "batch": args.batch, "repeats": repeats, "input": list(SHAPE),
        "composite": COMPOSITE,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": list(os.getloadavg())},
        "heatmap_diff": "per image max|R - R_zennit| / max|R_zennit| (float32 both), median over the first "
                        f"{CHECK_IMAGES} images",
        "models": {},
    }
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dt-zoo-") as tmp:
        for arch in models:
            t0 = time.perf_counter()
            files = {k: os.path.join(tmp, f"{arch}-{k}.npy") for k in ("deeptaylor", "zennit")}
            base = {"arch": arch, "composite": COMPOSITE, "batch": args.batch, "threads": args.threads,
                    "repeats": repeats, "check_images": min(CHECK_IMAGES, args.batch)}
            r = {"deeptaylor": run_worker("deeptaylor", {**base, "heatmap": files["deeptaylor"]}, args.threads,
                                          args.timeout)}
            r["zennit"] = ({"status": "skipped"} if args.no_zennit else
                           run_worker("zennit", {**base, "heatmap": files["zennit"]}, args.threads, args.timeout))
            if all(os.path.exists(f) for f in files.values()):
                r["heatmap_diff"] = heatmap_diff(np.load(files["deeptaylor"]), np.load(files["zennit"]))
            r["zennit_rules_differ"] = ARCHS[arch][3]
            r["wall_s"] = time.perf_counter() - t0
            report["models"][arch] = r
            d, z = r["deeptaylor"], r["zennit"]
            print(f"{arch:<22} dt {d.get('status'):<12} {_fmt_rate(d.get('images_per_s')):>7} img/s  "
                  f"zennit {z.get('status'):<8} {_fmt_rate(z.get('images_per_s')):>7} img/s  "
                  f"diff {r.get('heatmap_diff', {}).get('median', float('nan')):.1e}  ({r['wall_s']:.0f} s)"
                  + (f"  {d.get('reason', '')[:100]}" if d.get("status") != "ok" else "")
                  + (f"  zennit: {z.get('reason', '')[:100]}" if z.get("status") not in ("ok", "skipped") else ""),
                  flush=True)
    report["total_wall_s"] = time.perf_counter() - t_start
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, default=float))
    print()
    print(markdown(report))
    print(f"\nwrote {out_path} ({report['total_wall_s']:.0f} s; load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--worker":
        result = WORKERS[sys.argv[2]](json.loads(sys.argv[3]))
        print("RESULT " + json.dumps(result, default=float), flush=True)
        sys.exit(0)
    sys.exit(main())
