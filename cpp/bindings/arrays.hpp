// Helpers to check NumPy arrays on the way into the C++ core.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <sstream>
#include <string>
#include <vector>

namespace deeptaylor::bind {
namespace py = pybind11;

// A float32, C-contiguous array (no implicit conversion: the Python layer converts on purpose).
using farray = py::array_t<float, py::array::c_style>;

inline std::string shape_str(const py::array& a) {
    std::ostringstream os;
    os << "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
    os << (a.ndim() == 1 ? ",)" : ")");
    return os.str();
}

// Check dtype float32, C-contiguity and rank; return the array typed.
inline farray checked(const py::array& a, const char* name, py::ssize_t ndim) {
    if (!py::isinstance<farray>(a) || !(a.flags() & py::array::c_style)) {
        std::ostringstream os;
        os << name << " must be a C-contiguous float32 array, got dtype " << std::string(py::str(a.dtype()))
           << (a.flags() & py::array::c_style ? "" : " (not C-contiguous)");
        throw py::type_error(os.str());
    }
    if (a.ndim() != ndim) {
        std::ostringstream os;
        os << name << " must have " << ndim << " dimensions, got shape " << shape_str(a);
        throw py::value_error(os.str());
    }
    return py::reinterpret_borrow<farray>(a);
}

inline void expect_dim(const py::array& a, const char* name, py::ssize_t axis, py::ssize_t value,
                       const char* what) {
    if (a.shape(axis) != value) {
        std::ostringstream os;
        os << name << " has shape " << shape_str(a) << " but its axis " << axis << " must be " << value
           << " (" << what << ")";
        throw py::value_error(os.str());
    }
}

}  // namespace deeptaylor::bind
