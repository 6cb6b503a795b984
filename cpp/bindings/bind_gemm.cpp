// The SGEMM, exposed in the private submodule _core.kernels for tests and benchmarks.
#include <optional>
#include <string>

#include <pybind11/stl.h>

#include "arrays.hpp"
#include "deeptaylor/gemm.hpp"

namespace deeptaylor::bind {
namespace {

// kernel: None (the selected family), "scalar", "avx2", "avx512", or "reference" (the plain loop).
// Returns true for "reference".
bool parse_kernel(const std::optional<std::string>& name, GemmKernel& k) {
    k = GemmKernel::Auto;
    if (!name) return false;
    if (*name == "reference") return true;
    if (*name == "scalar") k = GemmKernel::Scalar;
    else if (*name == "avx2") k = GemmKernel::Avx2;
    else if (*name == "avx512") k = GemmKernel::Avx512;
    else
        throw py::value_error("kernel must be None, 'scalar', 'avx2', 'avx512' or 'reference', got '" +
                              *name + "'");
    if (!gemm_kernel_supported(k))
        throw py::value_error("GEMM kernel '" + *name + "' is not supported on this CPU");
    return false;
}

// c: optional (M, N) array to accumulate into (copied: the result is always a new array).
farray result(const std::optional<py::array>& c_, py::ssize_t M, py::ssize_t N) {
    farray out({M, N});
    if (c_) {
        auto c = checked(*c_, "c", 2);
        expect_dim(c, "c", 0, M, "rows of op(a)");
        expect_dim(c, "c", 1, N, "columns of op(b)");
        std::copy(c.data(), c.data() + M * N, out.mutable_data());
    }
    return out;
}

// The test epilogue: C = [relu](C + bias[j]).
struct BiasRelu {
    const float* bias;
    bool relu;
    static void apply(void* ctx, int64_t, int64_t j0, int64_t m, int64_t n, float* C, int64_t ldc) {
        const auto* e = static_cast<const BiasRelu*>(ctx);
        for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < n; ++j) {
                float v = C[i * ldc + j] + (e->bias ? e->bias[j0 + j] : 0.0f);
                C[i * ldc + j] = e->relu && v < 0.0f ? 0.0f : v;
            }
    }
};

// bias (N,) or None; returns the data pointer (kept alive by the caller's array).
const float* bias_ptr(const std::optional<py::array>& b_, py::ssize_t N, farray& keep) {
    if (!b_) return nullptr;
    keep = checked(*b_, "bias", 1);
    expect_dim(keep, "bias", 0, N, "columns of op(b)");
    return keep.data();
}

void check_threads(int threads) {
    if (threads < 1) throw py::value_error("threads must be >= 1, got " + std::to_string(threads));
}

}  // namespace

void register_gemm(py::module_& m) {
    m.def(
        "sgemm",
        [](const py::array& a_, const py::array& b_, bool trans_a, bool trans_b, int threads,
           const std::optional<std::string>& kernel, const std::optional<py::array>& c_,
           const std::optional<py::array>& bias_, bool relu) {
            auto a = checked(a_, "a", 2), b = checked(b_, "b", 2);
            check_threads(threads);
            const py::ssize_t M = trans_a ? a.shape(1) : a.shape(0), K = trans_a ? a.shape(0) : a.shape(1);
            const py::ssize_t N = trans_b ? b.shape(0) : b.shape(1);
            expect_dim(b, "b", trans_b ? 1 : 0, K, "inner dimension of op(a)");
            GemmKernel k;
            const bool ref = parse_kernel(kernel, k);
            farray out = result(c_, M, N);
            const bool acc = c_.has_value();
            const float *pa = a.data(), *pb = b.data();
            float* pc = out.mutable_data();
            const int64_t lda = a.shape(1), ldb = b.shape(1);
            farray keep;
            BiasRelu e{bias_ptr(bias_, N, keep), relu};
            const bool fused = e.bias || relu;
            {
                py::gil_scoped_release nogil;
                if (ref) {
                    sgemm_reference(trans_a, trans_b, M, N, K, pa, lda, pb, ldb, pc, N, acc, threads);
                    if (fused && M > 0 && N > 0) BiasRelu::apply(&e, 0, 0, M, N, pc, N);
                } else if (fused) {
                    sgemm_epilogue(k, trans_a, trans_b, M, N, K, pa, lda, pb, ldb, pc, N, acc, threads,
                                   GemmEpilogue{&BiasRelu::apply, &e});
                } else {
                    sgemm_with(k, trans_a, trans_b, M, N, K, pa, lda, pb, ldb, pc, N, acc, threads);
                }
            }
            return out;
        },
        py::arg("a"), py::arg("b"), py::arg("trans_a") = false, py::arg("trans_b") = false,
        py::arg("threads") = 1, py::arg("kernel") = py::none(), py::arg("c") = py::none(),
        py::arg("bias") = py::none(), py::arg("relu") = false,
        "op(a) (M, K) @ op(b) (K, N) [+ c (M, N)] -> new (M, N) float32 array; op = transpose if "
        "trans_a / trans_b. kernel: None (selected), 'scalar', 'avx2', 'avx512' or 'reference'. "
        "bias (N,) / relu: a fused epilogue C = [relu](C + bias).");

    m.def(
        "sgemm_packed",
        [](const py::array& a_, const py::array& b_, bool trans_b, int threads,
           const std::optional<std::string>& kernel, const std::optional<py::array>& c_,
           const std::optional<py::array>& bias_, bool relu, const std::string& filter,
           std::optional<double> sparse) {
            auto a = checked(a_, "a", 2), b = checked(b_, "b", 2);
            check_threads(threads);
            const py::ssize_t M = a.shape(0), K = a.shape(1), N = trans_b ? b.shape(0) : b.shape(1);
            expect_dim(b, "b", trans_b ? 1 : 0, K, "columns of a");
            GemmKernel k;
            if (parse_kernel(kernel, k)) throw py::value_error("sgemm_packed has no 'reference' kernel");
            BFilter f = BFilter::None;
            if (filter == "pos")
                f = BFilter::Pos;
            else if (filter == "neg")
                f = BFilter::Neg;
            else if (filter != "none")
                throw py::value_error("filter must be 'none', 'pos' or 'neg'");
            farray out = result(c_, M, N);
            const bool acc = c_.has_value();
            const float *pa = a.data(), *pb = b.data();
            float* pc = out.mutable_data();
            const int64_t ldb = b.shape(1);
            farray keep;
            BiasRelu e{bias_ptr(bias_, N, keep), relu};
            if (sparse.has_value() && (e.bias || relu)) throw py::value_error("sparse takes no bias / relu");
            {
                py::gil_scoped_release nogil;
                const PackedB packed(pb, K, N, ldb, trans_b, k);
                if (sparse.has_value()) {
                    sgemm_packed_sparse_a(M, pa, K, packed, pc, N, acc, threads, f, *sparse);
                } else if (e.bias || relu)
                    sgemm_packed_epilogue(M, pa, K, packed, pc, N, acc, threads,
                                          GemmEpilogue{&BiasRelu::apply, &e}, f);
                else
                    sgemm_packed(M, pa, K, packed, pc, N, acc, threads, f);
            }
            return out;
        },
        py::arg("a"), py::arg("b"), py::arg("trans_b") = false, py::arg("threads") = 1,
        py::arg("kernel") = py::none(), py::arg("c") = py::none(), py::arg("bias") = py::none(),
        py::arg("relu") = false, py::arg("filter") = "none", py::arg("sparse") = py::none(),
        "a (M, K) @ f(op(b)) (K, N) [+ c] through PackedB (op(b) packed first) -> new (M, N) float32; "
        "bias (N,) / relu: a fused epilogue C = [relu](C + bias); filter: f = identity ('none'), "
        "max(., 0) ('pos') or min(., 0) ('neg'), applied by the micro-kernel. sparse: None (dense) or "
        "the max_density of sgemm_packed_sparse_a (zeros of a skipped in row chunks at most that dense; "
        "0 = dense, < 0 = the default), bitwise the dense result.");

    m.def("gemm_kernel_name", []() { return std::string(gemm_kernel_name()); },
          "Name of the GEMM micro-kernel family selected at run time: 'avx512', 'avx2' or 'scalar'.");

    m.def(
        "gemm_kernels_available",
        []() {
            py::list out;
            for (GemmKernel k : {GemmKernel::Avx512, GemmKernel::Avx2, GemmKernel::Scalar})
                if (gemm_kernel_supported(k)) out.append(gemm_kernel_name(k));
            return out;
        },
        "GEMM micro-kernel families this CPU can run, best first.");
}

}  // namespace deeptaylor::bind
