// The compiled core of deeptaylor. This file only wires the submodules.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace deeptaylor::bind {
void register_kernels(py::module_& m);
void register_plan(py::module_& m);
void register_gemm(py::module_& m);
}

PYBIND11_MODULE(_core, m) {
    m.doc() = "deeptaylor compiled core (private; use the deeptaylor package)";
#ifdef DEEPTAYLOR_HAVE_OPENMP
    m.attr("has_openmp") = true;
#else
    m.attr("has_openmp") = false;
#endif
    auto k = m.def_submodule("kernels", "Per-layer kernels, for tests against the NumPy reference");
    deeptaylor::bind::register_kernels(k);
    deeptaylor::bind::register_gemm(k);
    deeptaylor::bind::register_plan(m);
}
