// Per-layer kernels, exposed in the private submodule _core.kernels so tests can check each
// against the NumPy reference. Arrays are checked here; the GIL is released around the loops.
#include <pybind11/stl.h>

#include <chrono>
#include <random>
#include <string>
#include <vector>

#include "arrays.hpp"
#include "deeptaylor/kernels.hpp"
#include "deeptaylor/linear_generic.hpp"
#include "deeptaylor/ops.hpp"

namespace deeptaylor::bind {

namespace {

// ---- the generic linear module (grouped / depthwise / transposed convolutions) -------------------
// A minimal op-spec reader (the keys of the Conv2d / ConvTranspose2d specs, docs/engine.md), so the
// module can be tested on its own, independent of the plan.
std::vector<int64_t> ints(const py::dict& d, const char* key, std::vector<int64_t> dflt) {
    return d.contains(key) && !d[key].is_none() ? d[key].cast<std::vector<int64_t>>() : dflt;
}
std::vector<float> fvec(const py::dict& d, const char* key) {
    if (!d.contains(key) || d[key].is_none()) return {};
    auto a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(d[key]);
    if (!a) throw py::type_error(std::string(key) + " must be a float array");
    return std::vector<float>(a.data(), a.data() + a.size());
}
Shape shape3(const py::dict& d, const char* key) {
    const auto v = ints(d, key, {});
    if (v.size() != 3) throw py::value_error(std::string(key) + " must be (C, H, W)");
    Shape s;
    s.rank = 3;
    s.c = v[0];
    s.h = v[1];
    s.w = v[2];
    return s;
}

OpSpec generic_spec(const py::dict& d) {
    OpSpec op;
    const auto kind = d["kind"].cast<std::string>();
    if (kind == "Conv2d")
        op.kind = OpKind::Conv2d;
    else if (kind == "ConvTranspose2d")
        op.kind = OpKind::ConvTranspose2d;
    else
        throw py::value_error("generic linear: kind must be Conv2d or ConvTranspose2d");
    op.in = shape3(d, "in_shape");
    op.out = shape3(d, "out_shape");
    op.weight = fvec(d, "weight");
    op.bias = fvec(d, "bias");
    const auto k = ints(d, "kernel", {1, 1}), st = ints(d, "stride", {1, 1}), pad = ints(d, "padding", {0, 0, 0, 0}),
               dil = ints(d, "dilation", {1, 1}), opad = ints(d, "output_padding", {0, 0});
    if (k.size() != 2 || st.size() != 2 || pad.size() != 4 || dil.size() != 2 || opad.size() != 2)
        throw py::value_error("generic linear: kernel/stride/dilation/output_padding need 2 entries, padding 4");
    Geom& g = op.g;
    g.C = op.in.c, g.H = op.in.h, g.W = op.in.w, g.O = op.out.c, g.OH = op.out.h, g.OW = op.out.w;
    g.kh = k[0], g.kw = k[1], g.sh = st[0], g.sw = st[1];
    g.pt = pad[0], g.pb = pad[1], g.pl = pad[2], g.pr = pad[3], g.dh = dil[0], g.dw = dil[1];
    op.oph = opad[0];
    op.opw = opad[1];
    op.groups = d.contains("groups") ? d["groups"].cast<int64_t>() : 1;
    const auto rule = d.contains("rule") && !d["rule"].is_none() ? d["rule"].cast<std::string>() : std::string();
    auto getf = [&](const char* key, float dflt) {
        return d.contains(key) && !d[key].is_none() ? d[key].cast<float>() : dflt;
    };
    if (!rule.empty()) {
        static const std::vector<std::pair<std::string, RuleKind>> kinds = {
            {"Z", RuleKind::Z},         {"Epsilon", RuleKind::Epsilon}, {"ZPlus", RuleKind::ZPlus},
            {"Gamma", RuleKind::Gamma}, {"AlphaBeta", RuleKind::AlphaBeta}, {"WSquare", RuleKind::WSquare},
            {"Flat", RuleKind::Flat},   {"ZBox", RuleKind::ZBox}};
        bool found = false;
        for (const auto& kr : kinds)
            if (kr.first == rule) op.rule.kind = kr.second, found = true;
        if (!found) throw py::value_error("generic linear: unknown rule '" + rule + "'");
        op.rule.eps = getf("eps", 0.0f);
        op.rule.gamma = getf("gamma", 0.0f);
        op.rule.alpha = getf("alpha", 1.0f);
        op.rule.beta = getf("beta", 0.0f);
        op.rule.use_bias = d.contains("use_bias") && !d["use_bias"].is_none() && d["use_bias"].cast<bool>();
        op.rule.low = fvec(d, "low");
        op.rule.high = fvec(d, "high");
    }
    return op;
}

// make_generic_linear with the depthwise choice direct (-1 auto, 0 GEMM, 1 direct) for this call
std::unique_ptr<GenericLinear> make_gl(const OpSpec& op, bool nonneg_in, Mode mode, int direct) {
    generic_set_depthwise_direct(direct);
    try {
        auto gl = make_generic_linear(op, nonneg_in, mode);
        generic_set_depthwise_direct(-1);
        return gl;
    } catch (...) {
        generic_set_depthwise_direct(-1);
        throw;
    }
}

// (N, C, H, W) float32 array of the shape s -> channels-last copy
std::vector<float> to_nhwc(const py::array& x_, const char* name, const Shape& s) {
    auto x = checked(x_, name, 4);
    expect_dim(x, name, 1, s.c, "channels");
    expect_dim(x, name, 2, s.h, "height");
    expect_dim(x, name, 3, s.w, "width");
    std::vector<float> out(static_cast<size_t>(x.shape(0) * s.size()));
    nchw_to_nhwc(x.data(), out.data(), x.shape(0), s.c, s.h, s.w);
    return out;
}
farray to_nchw(const std::vector<float>& v, int64_t N, const Shape& s) {
    farray out({N, s.c, s.h, s.w});
    nhwc_to_nchw(v.data(), out.mutable_data(), N, s.c, s.h, s.w);
    return out;
}

void register_generic(py::module_& m) {
    m.def(
        "generic_forward",
        [](const py::dict& spec, const py::array& a_, int threads, int direct) {
            const OpSpec op = generic_spec(spec);
            auto a = to_nhwc(a_, "a", op.in);
            const int64_t N = static_cast<int64_t>(a.size()) / op.in.size();
            std::vector<float> z(static_cast<size_t>(N * op.out.size()));
            {
                py::gil_scoped_release nogil;
                auto gl = make_gl(op, false, Mode::Sensitivity, direct);
                std::vector<float> scratch(static_cast<size_t>(generic_scratch_floats(*gl, N)));
                generic_forward(*gl, a.data(), z.data(), N, scratch.data(), threads);
            }
            return to_nchw(z, N, op.out);
        },
        py::arg("spec"), py::arg("a"), py::arg("threads") = 1, py::arg("direct") = -1,
        "Generic linear op (grouped Conv2d / ConvTranspose2d spec dict): a (N, C, H, W) -> z (N, O, OH, OW) = "
        "L(a) + bias. direct: depthwise kernel choice (-1 auto, 0 per-group GEMM, 1 direct).");
    m.def(
        "generic_relevance",
        [](const py::dict& spec, const py::array& a_, const py::array& R_, bool nonneg_in, int threads, int direct) {
            const OpSpec op = generic_spec(spec);
            auto a = to_nhwc(a_, "a", op.in);
            auto R = to_nhwc(R_, "R", op.out);
            const int64_t N = static_cast<int64_t>(a.size()) / op.in.size();
            if (static_cast<int64_t>(R.size()) != N * op.out.size()) throw py::value_error("R: batch of a");
            std::vector<float> z(R.size()), Rin(a.size());
            {
                py::gil_scoped_release nogil;
                auto gl = make_gl(op, nonneg_in, Mode::Rules, direct);
                std::vector<float> scratch(static_cast<size_t>(generic_scratch_floats(*gl, N)));
                generic_forward(*gl, a.data(), z.data(), N, scratch.data(), threads);
                generic_relevance(*gl, a.data(), z.data(), R.data(), Rin.data(), N, scratch.data(), threads);
            }
            return to_nchw(Rin, N, op.in);
        },
        py::arg("spec"), py::arg("a"), py::arg("R"), py::arg("nonneg_in") = false, py::arg("threads") = 1,
        py::arg("direct") = -1,
        "The spec's rule on a generic linear op: a (N, C, H, W), R (N, O, OH, OW) -> R_in (N, C, H, W) (z is "
        "computed by the module's own forward).");
    m.def(
        "generic_gradient",
        [](const py::dict& spec, const py::array& g_, int threads, int direct) {
            const OpSpec op = generic_spec(spec);
            auto g = to_nhwc(g_, "g", op.out);
            const int64_t N = static_cast<int64_t>(g.size()) / op.out.size();
            std::vector<float> gin(static_cast<size_t>(N * op.in.size()));
            {
                py::gil_scoped_release nogil;
                auto gl = make_gl(op, false, Mode::Sensitivity, direct);
                std::vector<float> scratch(static_cast<size_t>(generic_scratch_floats(*gl, N)));
                generic_gradient(*gl, g.data(), gin.data(), N, scratch.data(), threads);
            }
            return to_nchw(gin, N, op.in);
        },
        py::arg("spec"), py::arg("g"), py::arg("threads") = 1, py::arg("direct") = -1,
        "Gradient of a generic linear op: g (N, O, OH, OW) -> L^T(g) (N, C, H, W).");
    m.def(
        "generic_bench",
        [](const py::dict& spec, int64_t T, const std::string& what, int repeats, int threads, int direct) {
            const OpSpec op = generic_spec(spec);
            double best = 1e30;
            bool used_direct = false;
            {
                py::gil_scoped_release nogil;
                const bool rules = what == "relevance";
                auto gl = make_gl(op, false, rules ? Mode::Rules : Mode::Sensitivity, direct);
                used_direct = generic_uses_direct(*gl);
                std::mt19937 rng(0);
                std::normal_distribution<float> nd;
                std::vector<float> a(static_cast<size_t>(T * op.in.size())), z(static_cast<size_t>(T * op.out.size())),
                    R(z.size()), Rin(a.size());
                for (auto& v : a) v = nd(rng);
                for (auto& v : R) v = nd(rng);
                std::vector<float> scratch(static_cast<size_t>(generic_scratch_floats(*gl, T)));
                generic_forward(*gl, a.data(), z.data(), T, scratch.data(), threads);
                for (int k = 0; k < std::max(repeats, 1); ++k) {
                    const auto t0 = std::chrono::steady_clock::now();
                    if (what == "forward")
                        generic_forward(*gl, a.data(), z.data(), T, scratch.data(), threads);
                    else if (what == "gradient")
                        generic_gradient(*gl, R.data(), Rin.data(), T, scratch.data(), threads);
                    else
                        generic_relevance(*gl, a.data(), z.data(), R.data(), Rin.data(), T, scratch.data(), threads);
                    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
                }
            }
            return py::make_tuple(best, used_direct);
        },
        py::arg("spec"), py::arg("T"), py::arg("what") = "forward", py::arg("repeats") = 5, py::arg("threads") = 1,
        py::arg("direct") = -1,
        "Best time in seconds of one call (forward | relevance | gradient) on T random images, and whether the "
        "direct depthwise kernel ran: (seconds, direct).");
}

}  // namespace

void register_kernels(py::module_& m) {
    m.def(
        "dense_forward",
        [](const py::array& x_, const py::array& w_, const py::array& b_) {
            auto x = checked(x_, "x", 2), w = checked(w_, "weight", 2), b = checked(b_, "bias", 1);
            const auto N = x.shape(0), I = x.shape(1), O = w.shape(0);
            expect_dim(w, "weight", 1, I, "in_features of x");
            expect_dim(b, "bias", 0, O, "out_features of weight");
            farray out({N, O});
            const float *px = x.data(), *pw = w.data(), *pb = b.data();
            float* po = out.mutable_data();
            {
                py::gil_scoped_release nogil;
                dense_forward(px, pw, pb, po, N, I, O);
            }
            return out;
        },
        py::arg("x"), py::arg("weight"), py::arg("bias"),
        "x (N, I) @ weight (O, I).T + bias (O,) -> (N, O), float32.");

    m.def(
        "dense_zplus_relevance",
        [](const py::array& a_, const py::array& w_, const py::array& R_) {
            auto a = checked(a_, "a", 2), w = checked(w_, "weight", 2), R = checked(R_, "R", 2);
            const auto N = a.shape(0), I = a.shape(1), O = w.shape(0);
            expect_dim(w, "weight", 1, I, "in_features of a");
            expect_dim(R, "R", 0, N, "batch of a");
            expect_dim(R, "R", 1, O, "out_features of weight");
            farray out({N, I});
            const float *pa = a.data(), *pw = w.data(), *pR = R.data();
            float* po = out.mutable_data();
            {
                py::gil_scoped_release nogil;
                dense_zplus_relevance(pa, pw, pR, po, N, I, O);
            }
            return out;
        },
        py::arg("a"), py::arg("weight"), py::arg("R"),
        "Deep Taylor z+ relevance of a dense layer: a (N, I), weight (O, I), R (N, O) -> (N, I).");

    m.def(
        "dense_wsquare_relevance",
        [](const py::array& w_, const py::array& R_) {
            auto w = checked(w_, "weight", 2), R = checked(R_, "R", 2);
            const auto N = R.shape(0), I = w.shape(1), O = w.shape(0);
            expect_dim(R, "R", 1, O, "out_features of weight");
            farray out({N, I});
            const float *pw = w.data(), *pR = R.data();
            float* po = out.mutable_data();
            {
                py::gil_scoped_release nogil;
                dense_wsquare_relevance(pw, pR, po, N, I, O);
            }
            return out;
        },
        py::arg("weight"), py::arg("R"),
        "Deep Taylor w² relevance of a dense layer: weight (O, I), R (N, O) -> (N, I).");

    m.def(
        "global_sum_relevance",
        [](const py::array& a_, const py::array& R_) {
            auto a = checked(a_, "a", 2), R = checked(R_, "R", 1);
            const auto N = a.shape(0), F = a.shape(1);
            expect_dim(R, "R", 0, N, "batch of a");
            farray out({N, F});
            const float *pa = a.data(), *pR = R.data();
            float* po = out.mutable_data();
            {
                py::gil_scoped_release nogil;
                global_sum_relevance(pa, pR, po, N, F);
            }
            return out;
        },
        py::arg("a"), py::arg("R"),
        "Global sum pooling relevance: a (N, F), R (N,) -> a * R / sum(a), (N, F).");

    register_generic(m);
}

}  // namespace deeptaylor::bind
