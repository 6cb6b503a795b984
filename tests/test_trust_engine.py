"""Issue 14, the engine's part: no silent wrong answers, bounded resources, interruptible runs.

Each test reproduces one item of the issue and failed before its fix:

1. float32 overflow in the cpu forward is an InputError naming the node (a ReLU used to map NaN/-inf
   to 0); parameters beyond float32's range are refused when the plan is built.
2. one CpuBackend shared by Explainers of different networks and threads runs the right plan.
4. Epsilon(0) (linear and BatchNorm) gives the reference's zeros on cpu, not NaN.
5. LpPool with a large p does not underflow on cpu; a p float32 cannot carry is refused clearly.
6. Ctrl-C stops a cpu explain within a short time (KeyboardInterrupt).
7. the plan cache is an LRU of PLAN_CACHE_SIZE plans with clear(); threads has an upper bound.
9. a plan beyond the memory limit is an InputError naming the node; an allocation failure is a
   MemoryError with context (never an abort).
10. the numpy backend refuses up front a batch that cannot fit in memory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.errors import InputError

cpu = pytest.mark.skipif("cpu" not in dt.available_backends(), reason="needs the compiled core")


def _maxnorm(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ---- 1. non-finite values where they arise -------------------------------------------------------

@cpu
def test_forward_overflow_hidden_by_relu_is_an_error_naming_the_node():
    net = dt.Sequential([dt.Dense(np.array([[-1e20, 1e20, 1.0]])), dt.ReLU(), dt.Dense(np.array([[1.0], [2.0]]))])
    x = np.array([[1e20, 1e20, 1.0]], np.float32)
    with pytest.raises(InputError, match=r"forward pass overflowed float32 at op 0 \(Dense '0'\)"):
        dt.Explainer(net, dt.rules.ZPlus(), backend="cpu").explain(x)


@cpu
def test_forward_overflow_in_a_residual_add_names_the_add():
    inp = dt.Input((2,))
    h = dt.Dense(np.eye(2) * 1e19, np.zeros(2))(inp, name="big")
    y = dt.Add()(h, h, name="sum")
    r = dt.ReLU()(y)
    out = dt.Dense(np.array([[1.0, -1.0]]), np.zeros(1))(r)
    net = dt.Graph(inp, out)
    x = np.array([[-3e19, 1.0]], np.float32)   # big: (-3e38, 1e19); the sum -6e38 overflows, ReLU hides it
    with pytest.raises(InputError, match="overflowed float32 at op 1 \\(Add 'sum'\\)"):
        dt.Explainer(net, dt.rules.Epsilon(1e-6), backend="cpu").explain(x)


@cpu
def test_finite_runs_unchanged_by_the_checks(rng):
    net = dt.Sequential([dt.Dense(rng.normal(size=(8, 5)), rng.normal(size=8)), dt.ReLU(),
                         dt.Dense(rng.normal(size=(3, 8)), np.zeros(3))])
    x = rng.normal(size=(40, 5)).astype(np.float32)
    a = dt.Explainer(net, dt.rules.Epsilon(1e-3), backend="cpu").explain(x)
    b = dt.Explainer(net, dt.rules.Epsilon(1e-3), backend="numpy").explain(x.astype(np.float64))
    assert _maxnorm(a.relevance, b.relevance) < 1e-4


@cpu
@pytest.mark.parametrize("where", ["weight", "bias"])
def test_parameters_beyond_float32_are_refused_naming_the_node(where):
    w = np.array([[1.0, 2.0]])
    b = np.zeros(1)
    if where == "weight":
        w = np.array([[1e40, 2.0]])
    else:
        b = np.array([-1e39])
    net = dt.Sequential([dt.Dense(w, b), dt.ReLU(), dt.Dense(np.array([[1.0]]))])
    ex = dt.Explainer(net, dt.rules.ZPlus(), backend="cpu")
    with pytest.raises(InputError, match=f"op 0 \\(Dense '0'\\): {where} has values beyond float32's range"):
        ex.explain(np.ones((1, 2), np.float32))


@cpu
def test_batchnorm_scale_beyond_float32_is_refused():
    bn = dt.BatchNorm1d(np.zeros(2), np.full(2, 1e-300), np.full(2, 1e30), np.zeros(2), eps=0.0)
    net = dt.Sequential([bn, dt.Dense(np.ones((1, 2)))])
    with pytest.raises(InputError, match="BatchNorm.*scale has values beyond float32's range"):
        dt.Explainer(net, dt.rules.Z(), backend="cpu").explain(np.ones((1, 2), np.float32))


@cpu
def test_zbox_bounds_beyond_float32_are_refused():
    net = dt.Sequential([dt.Dense(np.ones((2, 2))), dt.ReLU(), dt.Dense(np.ones((1, 2)))])
    comp = dt.Composite(first=dt.rules.ZBox(-1e39, 1.0), default=dt.rules.ZPlus())
    with pytest.raises(InputError, match="low has values beyond float32's range"):
        dt.Explainer(net, comp, backend="cpu").explain(np.zeros((1, 2), np.float32))


# ---- 2. one backend, several networks and threads ------------------------------------------------

def _two_nets(rng):
    nets = []
    for k in range(2):
        nets.append(dt.Sequential([dt.Dense(rng.normal(size=(16, 6)), rng.normal(size=16)), dt.ReLU(),
                                   dt.Dense(rng.normal(size=(4, 16)) * (k + 1), np.zeros(4))]))
    return nets


@cpu
def test_shared_backend_keeps_a_plan_per_network(rng):
    from deeptaylor.backends.cpu import CpuBackend

    be = CpuBackend(threads=1)
    nets = _two_nets(rng)
    exs = [dt.Explainer(n, dt.rules.Epsilon(0.01), backend=be) for n in nets]
    x = rng.normal(size=(5, 6)).astype(np.float32)
    want = [dt.Explainer(n, dt.rules.Epsilon(0.01), backend="numpy").explain(x.astype(np.float64)) for n in nets]
    for _ in range(3):
        for ex, w in zip(exs, want, strict=True):
            assert _maxnorm(ex.explain(x).output, w.output) < 1e-5
    assert be.plans == 2   # one per network, not rebuilt on every switch


@cpu
def test_shared_backend_two_networks_two_threads(rng):
    from deeptaylor.backends.cpu import CpuBackend

    be = CpuBackend(threads=1)
    nets = _two_nets(rng)
    exs = [dt.Explainer(n, dt.rules.Epsilon(0.01), backend=be) for n in nets]
    xs = [rng.normal(size=(3, 6)).astype(np.float32) for _ in range(2)]
    want = [dt.Explainer(n, dt.rules.Epsilon(0.01), backend="cpu").explain(x).output for n, x in zip(nets, xs, strict=True)]
    wrong = []

    def work(k):
        for _ in range(300):
            out = exs[k].explain(xs[k]).output
            if not np.array_equal(out, want[k]):
                wrong.append(k)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not wrong


@cpu
def test_one_explainer_four_threads(rng):
    net = _two_nets(rng)[0]
    ex = dt.Explainer(net, dt.rules.ZPlus(), backend="cpu", threads=1)
    xs = [rng.normal(size=(7, 6)).astype(np.float32) for _ in range(4)]
    want = [ex.explain(x).relevance for x in xs]
    wrong = []

    def work(k):
        for _ in range(100):
            if not np.array_equal(ex.explain(xs[k]).relevance, want[k]):
                wrong.append(k)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not wrong


# ---- 4. zero denominators: one policy ------------------------------------------------------------

@cpu
def test_epsilon_zero_matches_the_reference_zeros():
    net = dt.Sequential([dt.Dense(np.array([[1.0, -1.0], [0.5, 0.5]]), np.zeros(2)), dt.ReLU(),
                         dt.Dense(np.array([[1.0, 1.0], [1.0, -1.0]]), np.zeros(2))])
    x = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]], np.float32)   # z = 0 exactly in places
    a = dt.Explainer(net, dt.rules.Epsilon(0.0), backend="cpu").explain(x)
    b = dt.Explainer(net, dt.rules.Epsilon(0.0), backend="numpy").explain(x.astype(np.float64))
    assert np.isfinite(a.relevance).all()
    np.testing.assert_allclose(a.relevance, b.relevance, atol=1e-6)


@cpu
def test_batchnorm_epsilon_zero_matches_the_reference():
    bn = dt.BatchNorm1d(np.array([1.0, 0.0]), np.ones(2), np.ones(2), np.zeros(2), eps=0.0)
    net = dt.Sequential([bn, dt.Dense(np.array([[1.0, 1.0]]), np.zeros(1))])
    comp = dt.Composite(by_index={0: dt.rules.Epsilon(0.0)}, default=dt.rules.Epsilon(0.0))
    x = np.array([[1.0, 2.0], [1.0, 0.0]], np.float32)   # y = x - mean: 0 in the first channel
    a = dt.Explainer(net, comp, backend="cpu").explain(x)
    b = dt.Explainer(net, comp, backend="numpy").explain(x.astype(np.float64))
    assert np.isfinite(a.relevance).all()
    np.testing.assert_allclose(a.relevance, b.relevance, atol=1e-6)


# ---- 5. LpPool with a large p --------------------------------------------------------------------

@cpu
@pytest.mark.parametrize("method", ["rules", "sensitivity"])
@pytest.mark.parametrize("kernel", [2, None])
def test_lppool_large_p_does_not_underflow(method, kernel):
    pool = dt.LpPool(200.0, kernel) if kernel else dt.LpPool(200.0)
    feats = 4 if kernel else 1
    net = dt.Sequential([pool, dt.Flatten(), dt.Dense(np.ones((1, feats)), np.zeros(1))])
    x = np.full((2, 1, 4, 4), 0.5, np.float32)
    x[1, 0, 0, 0] = 0.25
    comp = dt.rules.Z() if method == "rules" else dt.methods.Sensitivity()
    a = dt.Explainer(net, comp, backend="cpu").explain(x)
    b = dt.Explainer(net, comp, backend="numpy").explain(x.astype(np.float64))
    assert float(a.output.min()) > 0.5            # was 0: 0.5**200 underflows float32
    assert _maxnorm(a.output, b.output) < 1e-5
    assert _maxnorm(a.relevance, b.relevance) < 1e-4


@cpu
def test_lppool_p_beyond_float32_is_a_clear_error():
    net = dt.Sequential([dt.LpPool(1e300), dt.Flatten(), dt.Dense(np.ones((1, 1)))])
    with pytest.raises(InputError, match="p is beyond float32's range"):
        dt.Explainer(net, dt.rules.Z(), backend="cpu").explain(np.ones((1, 1, 2, 2), np.float32))


# ---- 6. Ctrl-C -----------------------------------------------------------------------------------

@cpu
@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread")
def test_ctrl_c_stops_a_long_cpu_explain(rng):
    c = 16
    net = dt.Sequential([dt.Conv2d(rng.normal(size=(c, 3, 3, 3)) * 0.2, np.zeros(c), padding=1), dt.ReLU(),
                         dt.Conv2d(rng.normal(size=(c, c, 3, 3)) * 0.1, np.zeros(c), padding=1), dt.ReLU(),
                         dt.Conv2d(rng.normal(size=(c, c, 3, 3)) * 0.1, np.zeros(c), padding=1), dt.ReLU(),
                         dt.GlobalSumPool(), dt.Dense(np.ones((1, 1)))])
    ex = dt.Explainer(net, dt.rules.ZPlus(), backend="cpu", threads=2)
    x0 = rng.random((16, 3, 48, 48), dtype=np.float32)
    t = time.perf_counter()
    ex.explain(x0)
    per = (time.perf_counter() - t) / len(x0)
    n = int(min(20000, max(64, 6.0 / per)))          # about 6 s uninterrupted
    x = np.ascontiguousarray(np.resize(x0, (n,) + x0.shape[1:]))
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    t = time.perf_counter()
    timer.start()
    raised = False
    try:
        ex.explain(x)
        time.sleep(1.0)                               # (before the fix the signal landed here)
    except KeyboardInterrupt:
        raised = True
    took = time.perf_counter() - t
    timer.cancel()
    assert raised
    assert took < 2.5, f"Ctrl-C took {took:.1f} s to stop a ~6 s run"
    # the plan is still usable afterwards
    assert np.isfinite(ex.explain(x0[:2]).relevance).all()


# ---- 7. plan cache and threads -------------------------------------------------------------------

@cpu
def test_plan_cache_is_bounded_and_clearable(rng):
    from deeptaylor.backends.cpu import PLAN_CACHE_SIZE

    net = dt.Sequential([dt.Conv2d(rng.normal(size=(2, 1, 3, 3)), np.zeros(2)), dt.ReLU(), dt.GlobalSumPool(),
                         dt.Dense(np.ones((1, 1)))])
    ex = dt.Explainer(net, dt.rules.ZPlus(), backend="cpu")
    for s in range(4, 4 + PLAN_CACHE_SIZE + 4):
        ex.explain(rng.random((1, 1, s, s), dtype=np.float32))
    assert ex.backend.plans == PLAN_CACHE_SIZE == 8
    # the most recent shapes stay cached
    last = ex.backend.plan(ex.graph, ex.assignment, (1, 4 + PLAN_CACHE_SIZE + 3, 4 + PLAN_CACHE_SIZE + 3))
    assert ex.backend.plan(ex.graph, ex.assignment, (1, 4 + PLAN_CACHE_SIZE + 3, 4 + PLAN_CACHE_SIZE + 3)) is last
    ex.backend.clear()
    assert ex.backend.plans == 0
    assert np.isfinite(ex.explain(rng.random((1, 1, 5, 5), dtype=np.float32)).relevance).all()


@cpu
def test_threads_upper_bound():
    from deeptaylor.backends.cpu import CpuBackend, max_threads

    net = dt.Sequential([dt.Dense(np.ones((1, 2)))])
    assert 8 <= max_threads() <= 256
    with pytest.raises(InputError, match="threads=.* beyond the limit"):
        dt.Explainer(net, dt.rules.Z(), backend="cpu", threads=max_threads() + 1)
    with pytest.raises(InputError, match="beyond the limit"):
        CpuBackend(threads=100000)
    with pytest.raises(InputError):
        CpuBackend(threads=0)
    assert CpuBackend(threads=max_threads()).threads == max_threads()


# ---- 9. memory limits of a plan, MemoryError -----------------------------------------------------

@cpu
def test_huge_padding_is_refused_naming_the_node():
    net = dt.Sequential([dt.Conv2d(np.ones((1, 1, 1, 1)), np.zeros(1), padding=20000), dt.GlobalSumPool(),
                         dt.Dense(np.ones((1, 1)))])
    ex = dt.Explainer(net, dt.rules.Z(), backend="cpu")
    t = time.perf_counter()
    with pytest.raises(InputError, match=r"(beyond the limit|2\^31).*Conv2d|Conv2d.*(beyond the limit|2\^31)"):
        ex.explain(np.ones((1, 1, 1, 1), np.float32))
    assert time.perf_counter() - t < 5


@cpu
def test_plan_limit_is_configurable(monkeypatch):
    net = dt.Sequential([dt.Conv2d(np.ones((1, 1, 1, 1)), np.zeros(1), padding=300), dt.GlobalSumPool(),
                         dt.Dense(np.ones((1, 1)))])
    x = np.ones((1, 1, 1, 1), np.float32)
    monkeypatch.setenv("DEEPTAYLOR_MAX_PLAN_BYTES", str(1 << 20))
    with pytest.raises(InputError, match="Conv2d '0'.*DEEPTAYLOR_MAX_PLAN_BYTES|DEEPTAYLOR_MAX_PLAN_BYTES.*Conv2d '0'"):
        dt.Explainer(net, dt.rules.Z(), backend="cpu").explain(x)
    monkeypatch.delenv("DEEPTAYLOR_MAX_PLAN_BYTES")
    assert dt.Explainer(net, dt.rules.Z(), backend="cpu").explain(x).output.shape == (1, 1)


@cpu
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS")
def test_allocation_failure_is_a_memory_error_not_an_abort():
    script = textwrap.dedent("""
        import resource, numpy as np, deeptaylor as dt
        net = dt.Sequential([dt.Conv2d(np.ones((1, 1, 1, 1)), np.zeros(1), padding=4000), dt.GlobalSumPool(),
                             dt.Dense(np.ones((1, 1)))])
        ex = dt.Explainer(net, dt.rules.Z(), backend="cpu", threads=1)
        x = np.ones((1, 1, 1, 1), np.float32)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize:")][0].split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (300 << 20), hard))
        try:
            ex.explain(x)
            print("RAN")
        except MemoryError as e:
            print("MEMORYERROR", e)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "MEMORYERROR" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "out of memory" in r.stdout


# ---- 10. the numpy backend refuses what cannot fit -----------------------------------------------

def test_numpy_backend_refuses_a_batch_beyond_memory(monkeypatch, rng):
    from deeptaylor.backends import numpy_backend

    net = dt.Sequential([dt.Conv2d(rng.normal(size=(8, 1, 5, 5)), np.zeros(8)), dt.ReLU(), dt.Flatten(),
                         dt.Dense(rng.normal(size=(10, 8 * 24 * 24)), np.zeros(10))])
    x = rng.random((2000, 1, 28, 28))
    monkeypatch.setattr(numpy_backend, "available_memory", lambda: 64 << 20)
    ex = dt.Explainer(net, dt.rules.Epsilon(0.01), backend="numpy")
    t = time.perf_counter()
    with pytest.raises(InputError, match="batch_size=.*backend='cpu'"):
        ex.explain(x)
    assert time.perf_counter() - t < 2.0
    # the suggested chunking runs
    assert ex.explain(x[:64], batch_size=16).relevance.shape == (64, 1, 28, 28)


def test_numpy_memory_estimate_lenet_50k():
    from deeptaylor.backends.numpy_backend import estimate_bytes

    net = dt.Sequential([dt.Conv2d(np.zeros((32, 1, 5, 5)), np.zeros(32)), dt.ReLU(), dt.MaxPool2d(2),
                         dt.Conv2d(np.zeros((64, 32, 5, 5)), np.zeros(64)), dt.ReLU(), dt.MaxPool2d(2),
                         dt.Flatten(), dt.Dense(np.zeros((10, 64 * 4 * 4)), np.zeros(10))])
    gib = estimate_bytes(net, (1, 28, 28), 50_000, False) / 2**30
    assert 20 < gib < 400
