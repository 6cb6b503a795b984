// Per-layer kernels, exposed in the private submodule _core.kernels so tests can check each
// against the NumPy reference. Arrays are checked here; the GIL is released around the loops.
#include "arrays.hpp"
#include "deeptaylor/kernels.hpp"

namespace deeptaylor::bind {

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
}

}  // namespace deeptaylor::bind
