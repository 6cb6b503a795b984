// The compiled Plan, bound as _core.Plan: built once from a list of op specs (plain dicts made by
// python/deeptaylor/backends/cpu.py), then run on whole batches with the GIL released.
#include <pybind11/stl.h>

#include <cfloat>
#include <cmath>
#include <memory>
#include <sstream>
#include <string>

#include "arrays.hpp"
#include "deeptaylor/engine.hpp"
#include "deeptaylor/plan.hpp"

namespace deeptaylor::bind {

namespace {

using iarray = py::array_t<int64_t, py::array::c_style>;

Shape to_shape(const py::handle& h) {
    const auto v = h.cast<std::vector<int64_t>>();
    Shape s;
    if (v.size() == 1) {
        s.rank = 1;
        s.c = v[0];
    } else if (v.size() == 3) {
        s.rank = 3;
        s.c = v[0];
        s.h = v[1];
        s.w = v[2];
    } else {
        throw py::value_error("plan: a sample shape must have 1 or 3 dimensions");
    }
    double n = 1.0;
    for (int64_t d : v) {
        if (d < 1) throw py::value_error("plan: shapes must be positive");
        n *= static_cast<double>(d);
    }
    if (n > static_cast<double>(kMaxValueFloats))
        throw LimitError("plan: a per-sample shape with " + std::to_string(static_cast<long long>(n)) +
                         " values is beyond the engine's limit of 2^31 per sample");
    return s;
}

// "op i (Kind 'name')" of a spec dict, for messages raised before the OpSpec exists.
std::string where(size_t i, const py::dict& d) {
    std::ostringstream os;
    os << "op " << i << " (" << (d.contains("kind") ? py::str(d["kind"]).cast<std::string>() : "?");
    if (d.contains("name") && !d["name"].is_none()) os << " '" << py::str(d["name"]).cast<std::string>() << "'";
    os << ")";
    return os.str();
}

// The engine computes in float32: a parameter beyond float32's range (from a float64 file or a folded
// BatchNorm) would turn into +-inf and give NaN or silently clipped results. Refused, naming the op.
[[noreturn]] void out_of_range(const std::string& ctx, const char* key, double v) {
    std::ostringstream os;
    os.precision(4);
    os << "plan: " << ctx << ": " << key;
    if (std::isfinite(v))
        os << " has values beyond float32's range (" << v << "; float32 holds +-" << FLT_MAX
           << "): the cpu backend computes in float32 (rescale the network or use backend='numpy')";
    else
        os << " has NaN/Inf values";
    throw LimitError(os.str());
}

// A float32 copy of d[key]. C-contiguous float64 arrays (the layers' parameters) are converted
// element by element straight into the vector, without a float32 temporary of the whole array.
// Every value must be finite in float32 (checked on the way, no extra pass).
std::vector<float> floats(const py::dict& d, const char* key, const std::string& ctx) {
    if (!d.contains(key) || d[key].is_none()) return {};
    const py::object v = d[key];
    if (py::isinstance<py::array_t<double>>(v)) {
        auto a64 = py::array_t<double, py::array::c_style>::ensure(v);
        if (a64) {
            std::vector<float> out(static_cast<size_t>(a64.size()));
            const double* src = a64.data();
            for (size_t k = 0; k < out.size(); ++k) {
                const double x = src[k];
                if (!(std::fabs(x) <= static_cast<double>(FLT_MAX))) out_of_range(ctx, key, x);
                out[k] = static_cast<float>(x);
            }
            return out;
        }
    }
    auto a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(v);
    if (!a) throw py::type_error(std::string("plan: ") + key + " must be a float array");
    std::vector<float> out(a.data(), a.data() + a.size());
    for (float x : out)
        if (!std::isfinite(x)) out_of_range(ctx, key, static_cast<double>(x));
    return out;
}

template <class T>
T get(const py::dict& d, const char* key, T dflt) {
    return d.contains(key) && !d[key].is_none() ? d[key].cast<T>() : dflt;
}

OpKind op_kind(const std::string& k) {
    if (k == "Dense") return OpKind::Dense;
    if (k == "Conv2d") return OpKind::Conv2d;
    if (k == "ReLU") return OpKind::ReLU;
    if (k == "MaxPool2d") return OpKind::MaxPool;
    if (k == "AvgPool2d") return OpKind::AvgPool;
    if (k == "SumPool2d") return OpKind::SumPool;
    if (k == "GlobalSumPool") return OpKind::GlobalSum;
    if (k == "LpPool") return OpKind::LpPool;
    if (k == "Flatten") return OpKind::Flatten;
    if (k == "ConvTranspose2d") return OpKind::ConvTranspose2d;
    if (k == "Add") return OpKind::Add;
    if (k == "Concat") return OpKind::Concat;
    if (k == "Slice") return OpKind::Slice;
    if (k == "Mul") return OpKind::Mul;
    if (k == "BatchNorm" || k == "BatchNorm2d" || k == "BatchNorm1d") return OpKind::BatchNorm;
    if (k == "Activation") return OpKind::Activation;
    if (k == "AdaptiveAvgPool2d") return OpKind::AdaptiveAvgPool;
    if (k == "GlobalAvgPool") return OpKind::GlobalAvgPool;
    if (k == "Upsample") return OpKind::Upsample;
    if (k == "ChannelShuffle") return OpKind::ChannelShuffle;
    throw py::value_error("plan: unknown op kind '" + k + "'");
}

ActFn act_fn(const std::string& f) {
    if (f == "leaky_relu") return ActFn::LeakyReLU;
    if (f == "relu6") return ActFn::ReLU6;
    if (f == "elu") return ActFn::ELU;
    if (f == "gelu") return ActFn::GELU;
    if (f == "silu") return ActFn::SiLU;
    if (f == "hardswish") return ActFn::Hardswish;
    if (f == "hardsigmoid") return ActFn::Hardsigmoid;
    if (f == "tanh") return ActFn::Tanh;
    if (f == "sigmoid") return ActFn::Sigmoid;
    throw py::value_error("plan: unknown activation '" + f + "'");
}

RuleKind rule_kind(const std::string& k) {
    if (k == "Z") return RuleKind::Z;
    if (k == "Epsilon") return RuleKind::Epsilon;
    if (k == "ZPlus") return RuleKind::ZPlus;
    if (k == "Gamma") return RuleKind::Gamma;
    if (k == "AlphaBeta") return RuleKind::AlphaBeta;
    if (k == "WSquare") return RuleKind::WSquare;
    if (k == "Flat") return RuleKind::Flat;
    if (k == "ZBox") return RuleKind::ZBox;
    throw py::value_error("plan: unknown rule '" + k + "'");
}

OpSpec to_op(const py::dict& d, size_t index) {
    const std::string ctx = where(index, d);
    OpSpec op;
    op.kind = op_kind(d["kind"].cast<std::string>());
    op.name = get<std::string>(d, "name", "");
    op.in = to_shape(d["in_shape"]);
    op.out = to_shape(d["out_shape"]);
    if (d.contains("inputs") && !d["inputs"].is_none()) {
        op.inputs = d["inputs"].cast<std::vector<int64_t>>();
        if (!d.contains("in_shapes") || d["in_shapes"].is_none())
            throw py::value_error("plan: an op with \"inputs\" needs \"in_shapes\"");
        for (const auto& h : d["in_shapes"].cast<py::list>()) op.in_shapes.push_back(to_shape(h));
    } else if (d.contains("in_shapes") && !d["in_shapes"].is_none()) {
        for (const auto& h : d["in_shapes"].cast<py::list>()) op.in_shapes.push_back(to_shape(h));
    }
    op.groups = get<int64_t>(d, "groups", 1);
    const auto opad = get<std::vector<int64_t>>(d, "output_padding", {0, 0});
    if (opad.size() != 2) throw py::value_error("plan: output_padding needs 2 entries");
    op.oph = opad[0];
    op.opw = opad[1];
    if (op.kind == OpKind::BatchNorm) {
        op.scale = floats(d, "scale", ctx);
        op.shift = floats(d, "shift", ctx);
    }
    if (op.kind == OpKind::Upsample) {
        const auto sc = get<std::vector<int64_t>>(d, "scale", {1, 1});
        if (sc.size() != 2) throw py::value_error("plan: Upsample scale needs 2 entries");
        op.up_h = sc[0];
        op.up_w = sc[1];
    }
    if (op.kind == OpKind::Activation) {
        op.act = act_fn(get<std::string>(d, "fn", ""));
        op.param = get<float>(d, "param", 0.0f);
    }
    op.inv_count = floats(d, "inv_count", ctx);
    if (op.kind == OpKind::AdaptiveAvgPool) {
        for (const char* key : {"rows", "cols"}) {
            auto& dst = key[0] == 'r' ? op.rows : op.cols;
            for (const auto& pr : d[key].cast<py::list>()) {
                const auto v = pr.cast<std::vector<int64_t>>();
                if (v.size() != 2) throw py::value_error("plan: AdaptiveAvgPool2d windows are [start, end) pairs");
                dst.push_back(v[0]);
                dst.push_back(v[1]);
            }
        }
    }
    op.start = get<int64_t>(d, "start", 0);
    op.stop = get<int64_t>(d, "stop", 0);
    op.weight = floats(d, "weight", ctx);
    op.bias = floats(d, "bias", ctx);
    const auto k = get<std::vector<int64_t>>(d, "kernel", {1, 1});
    const auto st = get<std::vector<int64_t>>(d, "stride", {1, 1});
    const auto pad = get<std::vector<int64_t>>(d, "padding", {0, 0, 0, 0});
    const auto dil = get<std::vector<int64_t>>(d, "dilation", {1, 1});
    if (k.size() != 2 || st.size() != 2 || pad.size() != 4 || dil.size() != 2)
        throw py::value_error("plan: kernel/stride/dilation need 2 entries, padding 4");
    op.g.kh = k[0];
    op.g.kw = k[1];
    op.g.sh = st[0];
    op.g.sw = st[1];
    op.g.pt = pad[0];
    op.g.pb = pad[1];
    op.g.pl = pad[2];
    op.g.pr = pad[3];
    op.g.dh = dil[0];
    op.g.dw = dil[1];
    op.p = get<float>(d, "p", 2.0f);
    op.global = get<bool>(d, "global", false);
    const auto rule = get<std::string>(d, "rule", "");
    if (!rule.empty()) {
        op.rule.kind = rule_kind(rule);
        op.rule.eps = get<float>(d, "eps", 0.0f);
        op.rule.gamma = get<float>(d, "gamma", 0.0f);
        op.rule.alpha = get<float>(d, "alpha", 1.0f);
        op.rule.beta = get<float>(d, "beta", 0.0f);
        op.rule.use_bias = get<bool>(d, "use_bias", false);
        for (const char* k : {"eps", "gamma", "alpha", "beta"})
            if (d.contains(k) && !d[k].is_none() && !std::isfinite(d[k].cast<float>()))
                out_of_range(ctx, k, d[k].cast<double>());
        op.rule.low = floats(d, "low", ctx);
        op.rule.high = floats(d, "high", ctx);
    }
    return op;
}

std::vector<py::ssize_t> full_shape(int64_t N, const Shape& s) {
    if (s.rank == 1) return {N, s.c};
    return {N, s.c, s.h, s.w};
}

struct PyPlan {
    std::shared_ptr<const Plan> plan;
    std::unique_ptr<Executor> exec;
};

}  // namespace

void register_plan(py::module_& m) {
    // LimitError -> deeptaylor.errors.InputError; OutOfMemory and std::bad_alloc -> MemoryError with
    // what was being allocated (docs/engine.md "Limits and failure modes").
    py::register_exception_translator([](std::exception_ptr e) {
        try {
            if (e) std::rethrow_exception(e);
        } catch (const LimitError& x) {
            py::object cls = py::module_::import("deeptaylor.errors").attr("InputError");
            PyErr_SetString(cls.ptr(), x.what());
        } catch (const OutOfMemory& x) {
            PyErr_SetString(PyExc_MemoryError, x.what());
        } catch (const std::bad_alloc&) {
            PyErr_SetString(PyExc_MemoryError, "deeptaylor core: out of memory");
        }
    });
    py::class_<PyPlan>(m, "Plan", "A compiled network + rules + input shape (see docs/engine.md).")
        .def(py::init([](const py::list& ops, const py::tuple& input_shape, const std::string& mode) {
                 std::vector<OpSpec> specs;
                 for (const auto& h : ops) specs.push_back(to_op(h.cast<py::dict>(), specs.size()));
                 Mode md = Mode::Rules;
                 if (mode == "sensitivity")
                     md = Mode::Sensitivity;
                 else if (mode == "gradient_x_input")
                     md = Mode::GradientXInput;
                 else if (mode == "gradient")
                     md = Mode::Gradient;
                 else if (mode != "rules")
                     throw py::value_error("plan: mode must be rules, sensitivity, gradient_x_input or gradient");
                 const Shape in = to_shape(input_shape);
                 auto p = std::make_unique<PyPlan>();
                 {
                     py::gil_scoped_release nogil;
                     std::shared_ptr<Plan> plan = build_plan(std::move(specs), in, md);
                     p->plan = plan;
                     p->exec = make_cpu_executor(std::move(plan));
                 }
                 return p;
             }),
             py::arg("ops"), py::arg("input_shape"), py::arg("mode"),
             "ops: list of op dicts; input_shape: per-sample shape; mode: rules|sensitivity|gradient_x_input|gradient.")
        .def_property_readonly("tile", [](const PyPlan& p) { return p.plan->tile; },
                               "Images per batch tile (fixed at plan time, independent of threads).")
        .def_property_readonly("arena_bytes",
                               [](const PyPlan& p) { return p.exec->arena_bytes(); },
                               "Working memory of one thread for a full tile, in bytes.")
        .def_property_readonly("slab_bytes",
                               [](const PyPlan& p) {
                                   return arena_sizes(*p.plan).slab * static_cast<int64_t>(sizeof(float));
                               },
                               "Bytes of one arena's slab: every live activation, relevance and max-pool "
                               "winner buffer of a full tile, placed by the liveness assignment.")
        .def_property_readonly("head", [](const PyPlan& p) { return p.plan->head; },
                               "First op of the head run on groups (= number of ops when none).")
        .def_property_readonly("fused", [](const PyPlan& p) {
                                   std::vector<bool> f(p.plan->fuse_relu.begin(), p.plan->fuse_relu.end());
                                   return f;
                               }, "Per op: whether its forward also writes the following ReLU's output.")
        .def_property_readonly("group", [](const PyPlan& p) { return p.plan->group; },
                               "Images per head group (= tile when the plan has no head groups).")
        .def_property_readonly("executor", [](const PyPlan& p) { return std::string(p.exec->name()); })
        .def("passes", [](const PyPlan& p, int64_t K) {
                 if (K < 1) throw py::value_error("K must be >= 1");
                 return py::make_tuple(p.exec->passes(K), p.exec->arena_bytes(K));
             }, py::arg("K"),
             "For K relevance passes per sample: (passes per round, bytes of one thread's arena) "
             "(docs/engine.md \"Many targets and seeds\").")
        .def(
            "run",
            [](const PyPlan& p, const py::array& x_, const py::object& targets_, bool return_layers,
               int threads, bool forward_only, const py::object& seed_, bool seed_times_output, int64_t top,
               bool reuse_rows) {
                const Plan& pl = *p.plan;
                const Shape& in = pl.input;
                const Shape& os = pl.values.back();
                auto x = checked(x_, "x", in.rank == 1 ? 2 : 4);
                const int64_t N = x.shape(0);
                const auto want = full_shape(N, in);
                for (size_t d = 1; d < want.size(); ++d)
                    expect_dim(x, "x", static_cast<py::ssize_t>(d), want[d], "the plan's input shape");
                const int64_t F = pl.num_outputs();
                const auto out_shape = full_shape(N, os);
                // K passes per sample: targets (N, K), a seed (N, K, output...) or the top K outputs; the
                // results then have a K axis after N
                int64_t K = 1;
                bool k_axis = false;
                iarray targets;
                if (!targets_.is_none()) {
                    targets = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(targets_);
                    if (!targets || (targets.ndim() != 1 && targets.ndim() != 2) || targets.shape(0) != N)
                        throw py::value_error("targets must be an int array of shape (N,) or (N, K)");
                    if (targets.ndim() == 2) {
                        K = targets.shape(1);
                        k_axis = true;
                    }
                    for (int64_t q = 0; q < targets.size(); ++q)
                        if (targets.data()[q] < 0 || targets.data()[q] >= F)
                            throw py::value_error("targets out of range");
                }
                farray seed;
                if (!seed_.is_none()) {
                    if (!targets_.is_none() || top > 0) throw py::value_error("seed excludes targets and top");
                    const py::ssize_t r = static_cast<py::ssize_t>(out_shape.size());
                    if (!py::isinstance<py::array>(seed_)) throw py::type_error("seed must be a float32 array");
                    const py::array sa = py::reinterpret_borrow<py::array>(seed_);
                    seed = checked(sa, "seed", sa.ndim() == r + 1 ? r + 1 : r);
                    if (seed.ndim() == r + 1) {
                        K = seed.shape(1);
                        k_axis = true;
                    }
                    expect_dim(seed, "seed", 0, N, "the batch");
                    for (py::ssize_t d = 1; d < r; ++d)
                        expect_dim(seed, "seed", d + (k_axis ? 1 : 0), out_shape[static_cast<size_t>(d)],
                                   "the network's output shape");
                }
                if (top < 0) throw py::value_error("top must be >= 0");
                if (top > 0) {
                    if (!targets_.is_none()) throw py::value_error("top excludes targets");
                    if (top > F) throw py::value_error("top is beyond the number of outputs");
                    K = top;
                    k_axis = true;
                }
                if (K < 1) throw py::value_error("K (targets or seeds per sample) must be >= 1");
                if (forward_only && return_layers)
                    throw py::value_error("forward_only runs no relevance pass: return_layers must be false");
                auto with_k = [&](std::vector<py::ssize_t> sh) {
                    if (k_axis) sh.insert(sh.begin() + 1, K);
                    return sh;
                };
                farray output(out_shape);
                farray relevance(forward_only ? std::vector<py::ssize_t>{0} : with_k(full_shape(N, in)));
                py::list layers;
                RunArgs a;
                a.x = x.data();
                a.N = N;
                a.K = K;
                a.targets = targets_.is_none() ? nullptr : targets.data();
                a.seed = seed_.is_none() ? nullptr : seed.data();
                a.seed_times_output = seed_times_output;
                a.output = output.mutable_data();
                a.relevance = forward_only ? nullptr : relevance.mutable_data();
                a.threads = threads;
                a.forward_only = forward_only;
                a.reuse_rows = reuse_rows;
                if (return_layers) {
                    for (size_t i = 0; i < pl.values.size(); ++i) {  // by value id
                        farray li(with_k(full_shape(N, pl.values[i])));
                        a.layers.push_back(li.mutable_data());
                        layers.append(li);
                    }
                }
                // Ctrl-C: on the main thread, the engine polls for pending signals between tiles and ops
                // (briefly taking the GIL); a raised KeyboardInterrupt stops the run and is re-raised.
                std::shared_ptr<py::error_already_set> pending;
                auto threading = py::module_::import("threading");
                if (threading.attr("get_ident")().equal(threading.attr("main_thread")().attr("ident"))) {
                    a.interrupted = [&pending]() {
                        py::gil_scoped_acquire gil;
                        if (PyErr_CheckSignals() == 0) return false;
                        pending = std::make_shared<py::error_already_set>();
                        return true;
                    };
                }
                RunStatus st;
                {
                    py::gil_scoped_release nogil;
                    st = p.exec->run(a);
                }
                if (pending) throw *pending;
                auto input_error = [](const std::string& msg) {
                    py::object cls = py::module_::import("deeptaylor.errors").attr("InputError");
                    PyErr_SetString(cls.ptr(), msg.c_str());
                    throw py::error_already_set();
                };
                if (st.nonfinite_op >= 0) {
                    const size_t i = static_cast<size_t>(st.nonfinite_op);
                    input_error("the forward pass overflowed float32 at " + op_where(i, pl.ops[i]) +
                                ": its output has NaN/Inf values (backend 'cpu' computes in float32); scale the "
                                "input or the weights down, or use backend='numpy' (float64)");
                }
                if (st.nonfinite_rel >= 0) {
                    const int64_t v = st.nonfinite_rel;
                    const std::string at = v == 0 ? std::string("the network input")
                                                  : "the output of " + op_where(static_cast<size_t>(v - 1),
                                                                                pl.ops[static_cast<size_t>(v - 1)]);
                    input_error("the relevance pass overflowed float32 at " + at +
                                ": its relevance has NaN/Inf values (backend 'cpu' computes in float32); use a "
                                "rule with a larger epsilon, scale the input or the weights down, or use "
                                "backend='numpy' (float64)");
                }
                return py::make_tuple(output, forward_only ? py::object(py::none()) : py::object(relevance),
                                      return_layers ? py::object(layers) : py::none());
            },
            py::arg("x"), py::arg("targets") = py::none(), py::arg("return_layers") = false,
            py::arg("threads") = 0, py::arg("forward_only") = false, py::arg("seed") = py::none(),
            py::arg("seed_times_output") = false, py::arg("top") = 0, py::arg("reuse_rows") = false,
            "x (N, input...) C-contiguous float32; targets (N,) int64 or None (argmax) or (N, K) (K passes); "
            "threads <= 0: OpenMP's default; forward_only: outputs only (no relevance pass); seed (N, output...) "
            "or (N, K, output...) float32: the starting relevance (gradient) instead of one-hot targets, times "
            "the output with seed_times_output; top > 0 (without targets and seed): the top outputs, largest "
            "first. Returns (output (N, output...), relevance (N, [K,] input...) or None with forward_only, "
            "layers list or None); K axis with 2-D targets, a seed with a K axis or top > 0. reuse_rows (with "
            "forward_only): convolution / Dense output rows whose receptive field holds bitwise the previous "
            "sample's input are copied from it (bitwise the same outputs; perturbation curves).");
    m.def("default_threads", &default_threads, "OpenMP's default thread count (1 without OpenMP).");
}

}  // namespace deeptaylor::bind
