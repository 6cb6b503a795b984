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
// Every array is in the user's layout (NCHW, or (N, F)); an output of rank 3 (C, H, W) is indexed by
// its C-order flat index (c H W + h W + w), as NumPy's reshape(N, -1).
struct RunArgs {
    const float* x = nullptr;
    int64_t N = 0;
    // Relevance passes per sample, all from one forward pass (docs/engine.md "Many targets and
    // seeds"); relevance and layers then hold (N, K, shape) (K = 1: the same memory as (N, shape)).
    int64_t K = 1;
    const int64_t* targets = nullptr;  // (N, K) explained output per sample and pass (flat index into
                                       // the output), or null: the K largest outputs, largest first
                                       // (ties: the lower index first; K = 1: argmax)
    // (N, K, output...) the relevance (Mode::Rules) or output gradient (the gradient methods) each pass
    // starts from, instead of the one-hot target; null: one-hot targets. With seed_times_output it is
    // multiplied by the network output first (the relevance of the linear objective sum seed (.) y).
    const float* seed = nullptr;
    bool seed_times_output = false;
    float* output = nullptr;           // (N, output...) network output
    float* relevance = nullptr;        // (N, K, input...) relevance at the input, user layout
    std::vector<float*> layers;        // empty, or L+1 arrays (N, K, shape of value v) by value id: the
                                       // relevance at the input, then at every op's output
    int threads = 0;                   // <= 0: OpenMP's default
    bool forward_only = false;         // outputs only: no relevance pass (relevance may be null)
    // With forward_only: a convolution / Dense output row (one output pixel of one sample) whose
    // receptive field holds bitwise the same input as the previous sample's (in the same tile) is
    // copied from it instead of computed: bitwise the same outputs, far less work when consecutive
    // samples differ in a few positions (perturbation curves; docs/engine.md "Row reuse").
    bool reuse_rows = false;
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
    // A run with K passes per sample does them in rounds of passes(K) (<= K, <= kMaxPasses) passes, each
    // round one batched backward pass over the shared activations; arena_bytes(K): one thread's arena then.
    virtual int64_t passes(int64_t K) const = 0;
    virtual int64_t arena_bytes(int64_t K) const = 0;
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
