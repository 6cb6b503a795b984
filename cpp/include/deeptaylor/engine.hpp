// The backend seam: a Plan (plan.hpp, backend-independent data) is run by an Executor. The CPU
// executor (engine_cpu.cpp) packs the weights for the SGEMM at creation and runs fused
// forward + relevance passes over batch tiles; a CUDA executor can implement the same interface
// (upload the Plan's matrices, run per tile on the device) without touching the Python surface.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "deeptaylor/plan.hpp"

namespace deeptaylor {

// One call: x (N, input...) in the user's layout (NCHW or (N, F)), C-contiguous float32.
struct RunArgs {
    const float* x = nullptr;
    int64_t N = 0;
    const int64_t* targets = nullptr;  // (N) explained output per sample, or null for argmax
    float* output = nullptr;           // (N, K) network output
    float* relevance = nullptr;        // (N, input...) relevance at the input, user layout
    std::vector<float*> layers;        // empty, or L+1 arrays (N, shape of value v) by value id: the
                                       // relevance at the input, then at every op's output
    int threads = 0;                   // <= 0: OpenMP's default
    bool forward_only = false;         // outputs only: no relevance pass (relevance may be null)
    // Called on the calling thread between tiles and ops (at most every few ms): true stops the run
    // (a pending Ctrl-C); the run then returns with RunStatus::interrupted and partial outputs.
    std::function<bool()> interrupted;
};

// What a run found (the outputs are complete only when both fields are unset).
struct RunStatus {
    // The first op (lowest index, over all tiles) whose forward output held NaN/Inf (float32 overflow
    // or inf - inf), or -1. The relevance pass is then not trusted either.
    int64_t nonfinite_op = -1;
    // With a finite forward: the first value (highest id, i.e. the first reached by the backward pass)
    // whose relevance (or gradient) held NaN/Inf, among the input (0) and, with per-layer outputs,
    // every value; or -1.
    int64_t nonfinite_rel = -1;
    bool interrupted = false;
};

class Executor {
public:
    virtual ~Executor() = default;
    virtual const char* name() const = 0;
    // Working memory of one thread for a full tile (the liveness layout's slab + scratch), bytes.
    virtual int64_t arena_bytes() const = 0;
    // Runs without touching Python objects (callers release the GIL; args.interrupted may take it).
    // Throws OutOfMemory (with context) when an allocation fails, never terminates.
    virtual RunStatus run(const RunArgs& args) const = 0;
};

// Packs the Plan's weight matrices for the CPU GEMM and releases the Plan's copies (LinearPrep::Wm):
// a Plan is made for one executor (a device executor would upload and release them the same way).
std::unique_ptr<Executor> make_cpu_executor(std::shared_ptr<Plan> plan);

// OpenMP's default thread count (1 without OpenMP).
int default_threads();

}  // namespace deeptaylor
