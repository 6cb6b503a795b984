// The Plan: a network + its rules (or a gradient method) + the per-sample input shape, compiled
// once into backend-independent data: op specs, channels-last weight matrices, the rule-derived
// constant maps (w² and flat denominators, zB's constant terms) and the tile/arena sizes.
// Executors (engine.hpp) run a Plan; the CPU executor packs its weights for the GEMM at creation.
//
// Layout: the user sees NCHW; inside the engine every 3-D activation is stored channels-last
// (H, W, C) per sample, so a convolution is one GEMM over (pixels, kh*kw*C) x (kh*kw*C, O) with the
// output landing directly in channels-last order. Flatten permutes back to the user's C-order.
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace deeptaylor {

// Errors with a meaning for the caller (the binding maps them to Python, docs/engine.md "Limits and
// failure modes"): a plan or a run beyond a documented limit, or an input that makes the float32
// computation non-finite -> deeptaylor.errors.InputError; an allocation that failed -> MemoryError
// (with what was being allocated). Every other std::invalid_argument is a bad spec (ValueError).
struct LimitError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};
struct OutOfMemory : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The most memory one plan may ask for beyond its weights: the rule constants that grow with a
// layer's spatial size (w²/flat denominators, zB's bound maps) plus the working memory (arena) of one
// thread for a tile of one image. Default kMaxPlanBytes; the environment variable
// DEEPTAYLOR_MAX_PLAN_BYTES (bytes) overrides it. (The weights' packed copies are proportional to the
// model's own size and not limited.)
constexpr int64_t kMaxPlanBytes = int64_t{8} << 30;
int64_t max_plan_bytes();
// MemAvailable of /proc/meminfo in bytes, or -1 where unknown.
int64_t available_memory_bytes();
// Largest per-sample value (floats) a plan accepts: offsets and max-pool winners are int32 per sample.
constexpr int64_t kMaxValueFloats = int64_t{1} << 31;

enum class OpKind {
    Dense, Conv2d, ReLU, MaxPool, AvgPool, SumPool, GlobalSum, LpPool, Flatten,
    // graph ops (docs/engine.md "The DAG plan")
    ConvTranspose2d, Add, Concat, Slice, Mul, BatchNorm, Activation, AdaptiveAvgPool, GlobalAvgPool,
    Upsample, ChannelShuffle
};

// Element-wise activations (forward and gradient exactly as PyTorch; relevance passes unchanged).
enum class ActFn { LeakyReLU, ReLU6, ELU, GELU, SiLU, Hardswish, Hardsigmoid, Tanh, Sigmoid };

// Rules of linear layers (python/deeptaylor/rules.py has the maths and the citations).
enum class RuleKind { None, Z, Epsilon, ZPlus, Gamma, AlphaBeta, WSquare, Flat, ZBox };

// Relevance rules (per linear layer) or a plain gradient method for the whole network.
// Gradient: the plain gradient df_t/dx (signed); the gradient methods differ only in what is emitted.
enum class Mode { Rules, Sensitivity, GradientXInput, Gradient };

// A per-sample shape as the user sees it: rank 1 (F) -> c = F, h = w = 1; rank 3 (C, H, W).
struct Shape {
    int rank = 1;
    int64_t c = 1, h = 1, w = 1;
    int64_t size() const { return c * h * w; }
    // True when channels-last storage differs from the user's C-order (a layout permutation needed).
    bool permuted() const { return rank == 3 && c > 1 && h * w > 1; }
    int64_t pixels() const { return h * w; }
    bool operator==(const Shape& o) const { return rank == o.rank && c == o.c && h == o.h && w == o.w; }
    bool operator!=(const Shape& o) const { return !(*this == o); }
};

// Window geometry of a linear op or a pooling on one sample, channels-last. A Dense layer is the
// 1x1 case: C = in_features, H = W = 1, O = out_features.
struct Geom {
    int64_t C = 1, H = 1, W = 1;  // input (H, W, C)
    int64_t O = 1, OH = 1, OW = 1;  // output (OH, OW, O); O = C for pooling
    int64_t kh = 1, kw = 1, sh = 1, sw = 1, pt = 0, pb = 0, pl = 0, pr = 0, dh = 1, dw = 1;
    int64_t P() const { return OH * OW; }        // output pixels per sample
    int64_t Kc() const { return kh * kw * C; }   // im2col row length, ordered (i, j, c)
    int64_t in_size() const { return H * W * C; }
    int64_t out_size() const { return OH * OW * O; }
    // im2col is the identity (1x1 kernel, stride 1, no padding): col rows are the input rows.
    bool identity() const {
        return kh == 1 && kw == 1 && sh == 1 && sw == 1 && pt == 0 && pb == 0 && pl == 0 && pr == 0;
    }
};

struct RuleSpec {
    RuleKind kind = RuleKind::None;
    float eps = 0.0f, gamma = 0.0f, alpha = 1.0f, beta = 0.0f;
    bool use_bias = false;
    std::vector<float> low, high;  // ZBox bounds broadcast to the layer's input shape (user order)
};

// One layer, as Python describes it (weights in PyTorch layout, float32).
struct OpSpec {
    OpKind kind = OpKind::ReLU;
    std::string name;           // node name (error messages)
    std::vector<int64_t> inputs;  // value ids read (0: network input, j + 1: output of op j)
    std::vector<Shape> in_shapes; // one per input; in == in_shapes[0]
    Shape in, out;
    Geom g;                     // linear ops and window pools
    std::vector<float> weight;  // Dense (O, I) or Conv2d (O, C, kh, kw); emptied by build_plan (see Wm)
    std::vector<float> bias;    // (O)
    float p = 2.0f;             // LpPool exponent
    bool global = false;        // LpPool without a kernel (pools everything to (N, 1))
    // grouped Conv2d / ConvTranspose2d (the generic linear module, linear_generic.hpp); ChannelShuffle
    int64_t groups = 1;
    int64_t oph = 0, opw = 0;   // ConvTranspose2d output_padding
    ActFn act = ActFn::LeakyReLU;
    float param = 0.0f;         // Activation: slope / alpha / 1 for GELU's tanh approximation
    std::vector<float> scale, shift;  // BatchNorm: y = x * scale[c] + shift[c]
    std::vector<float> inv_count;     // AvgPool2d: (OH * OW) 1 / divisor per output pixel (empty: 1/(kh kw))
    std::vector<int64_t> rows, cols;  // AdaptiveAvgPool2d: [start, end) pairs, flattened (2 OH, 2 OW)
    int64_t start = 0, stop = 0;      // Slice: channels [start, stop)
    int64_t up_h = 1, up_w = 1;       // Upsample (nearest): integer scale factors
    RuleSpec rule;
};

// Derived data of one linear op (channels-last, backend independent).
struct LinearPrep {
    std::vector<float> Wm;        // (O, Kc) weights, columns ordered (i, j, c)
    std::vector<float> bias2;     // (w*O) bias of the rule's denominator, empty when none
    std::vector<float> inv_den;   // (P, O) WSquare / Flat: 1 / L(1; V) (0 where L(1; V) = 0)
    std::vector<float> zb_const;  // (P, O) ZBox: b + L(low; W+) + L(high; W-)
    std::vector<float> lo_col, hi_col;  // (P, Kc) ZBox: im2col of low / high of one sample
    int64_t chunk_rows = 0;       // rows of the (T*P, Kc) im2col matrix processed per GEMM block
};

// Rule-derived weight matrices (O', Kc) built from Wm on demand (by the executors, once).
enum class Derived { W, Wplus, Wminus, WSquare, Ones, GammaUp, GammaDown };
std::vector<float> derive(const std::vector<float>& Wm, Derived which, float gamma = 0.0f);

struct Plan {
    Mode mode = Mode::Rules;
    Shape input;
    std::vector<OpSpec> ops;
    std::vector<LinearPrep> lin;     // one per op (empty for non-linear and generic linear ops)
    std::vector<char> nonneg_in;     // op's (first) input is >= 0 by construction (after a ReLU)
    int64_t tile = 1;                // images per tile (independent of the thread count)
    // Head groups (chain plans only): the trailing run of rank-1 ops (the Dense head after the last
    // Flatten / pooling, ops [head, L)) runs on up to `group` images at once (a multiple of `tile`)
    // fed by several tiles of the ops before it, so that its weight matrices stream from memory
    // once per group instead of once per tile. head == L (no head) or group == tile: plain tiles.
    size_t head = 0;
    int64_t group = 1;
    int64_t max_size = 1;            // largest per-sample activation (floats)
    int64_t const_bytes = 0;         // bytes of the spatial rule constants (max_plan_bytes), estimated
    int64_t num_outputs() const { return ops.back().out.size(); }

    // ---- the DAG (build_plan) ----
    // Value ids: 0 is the network input, i + 1 the output of op i; the network output is value L.
    std::vector<Shape> values;                      // per-sample shape of every value
    std::vector<std::vector<std::pair<int64_t, int>>> consumers;  // per value: (op, input slot), ascending
    bool chain = true;                              // every op reads the previous op's output only
    std::vector<char> need_in, need_out;            // op's backward reads its inputs' / its output's activation
    std::vector<char> fuse_relu;                    // op i (linear or Add) also writes op i + 1's ReLU output
    std::vector<char> skip;                         // op's forward is done by the op before it (fused)
    // first_write[i][k]: op i's backward is the first to write the relevance of input slot k (the
    // consumer with the highest index, lowest slot); every later writer accumulates.
    std::vector<std::vector<char>> first_write;
};

// Per-thread working memory for a tile of T images: where every live buffer sits in the thread's
// slab (interval colouring over the step timeline, docs/engine.md "Liveness"), and the per-step
// scratch buffers (floats unless stated; int32 winners take float-sized slots in the slab).
struct ArenaSizes {
    std::vector<int64_t> act_off, rel_off;  // per value: offset of its activation / relevance (-1: none)
    std::vector<int64_t> arg_off;           // per op: max pooling winners (-1: none)
    std::vector<char> act_g, rel_g, arg_g;  // sized for the group's G images (each tile at its offset)
    int64_t slab = 0;          // floats of the shared slab
    int64_t work = 0;          // each of the 2 tile temporaries
    int64_t acc = 0;           // the accumulation buffer (passes x work)
    int64_t col = 0;           // each of the 4 im2col-block buffers (col, col+, col-, combined)
    int64_t den = 0;           // denominators (block rows x 2 O)
    int64_t s = 0;             // s of up to `passes` blocks stacked (rows x 2 O)
    int64_t ccol = 0;          // transpose-GEMM output of the stacked blocks (rows x 2 Kc)
    int64_t live_sum = 0;      // floats of all activations and relevances if nothing were shared (info)
    int64_t bytes() const;
};
// T images per tile for ops [0, head), G (a multiple of T) for the head and for the stored
// activations of the body (a group's tiles all keep theirs until the head's relevance is back).
// keep_for_layers: GradientXInput with per-layer outputs needs every activation until its value's
// gradient is complete (a second, larger layout).
// passes: relevance passes run together (every relevance buffer and the accumulation buffer hold
// `passes` copies); rounds: more than one round of passes follows the forward pass, so every
// activation the backward pass reads stays live to the end (docs/engine.md "Many targets and seeds").
ArenaSizes arena_sizes(const Plan& plan, int64_t T, int64_t G, bool keep_for_layers = false,
                       int64_t passes = 1, bool rounds = false);
inline ArenaSizes arena_sizes(const Plan& plan) { return arena_sizes(plan, plan.tile, plan.group); }

// Validate the specs (inputs, shapes, geometry; chain specs have inputs = {i}), derive every rule
// matrix/constant map, analyse the DAG (consumers, what each backward step needs, fusions, in-place
// buffers) and choose the tile size. Throws std::invalid_argument naming the op on bad specs.
std::shared_ptr<Plan> build_plan(std::vector<OpSpec> ops, Shape input, Mode mode);

// Many targets: at most kMaxPasses relevance passes per round, and as many as keep one thread's arena
// within pass_budget_bytes() or twice the single-pass arena, whichever is larger; pass_budget_bytes() is
// kPassBudgetBytes or the environment variable DEEPTAYLOR_PASS_BUDGET_BYTES (bytes), read when a plan
// first runs K passes.
constexpr int64_t kMaxPasses = 16;
constexpr int64_t kPassBudgetBytes = int64_t{96} << 20;
int64_t pass_budget_bytes();
// Per-thread arena budget used to choose the tile size, and the largest tile.
constexpr int64_t kArenaBudgetBytes = 16 << 20;
constexpr int64_t kMaxTile = 64;
// Head groups: at most this many images, arena at most this budget, and only for heads whose
// weights exceed kHeadGroupMinWeightBytes (smaller ones stay in cache across tiles anyway).
constexpr int64_t kMaxGroup = 64;
constexpr int64_t kGroupBudgetBytes = 48 << 20;
constexpr int64_t kHeadGroupMinWeightBytes = 1 << 20;
constexpr int64_t kMaxGroupTile = 4;  // head groups only for tiles of at most this many images
// Floats of one im2col block (rows x Kc); bounds the conv working set independent of the batch.
constexpr int64_t kChunkFloats = 1 << 17;
constexpr int64_t kMinChunkRows = 128;
// GEMM rows come in micro-panels of MR (12 for AVX-512, 6 for AVX2, 4 portable): tiles cut by the
// arena budget and im2col blocks are rounded to multiples of 12 so that no product ends in a short panel.
constexpr int64_t kRowMultiple = 12;

const char* op_name(OpKind k);
// "op i (Kind 'name')" for messages; a byte count as "1.5 GiB" / "12 MiB".
std::string op_where(size_t i, const OpSpec& op);
std::string gib(double bytes);
const char* act_name(ActFn f);
// True for linear ops run by the generic module (linear_generic.hpp): grouped Conv2d, ConvTranspose2d.
inline bool generic_op(const OpSpec& op) {
    return op.kind == OpKind::ConvTranspose2d || (op.kind == OpKind::Conv2d && op.groups != 1);
}

}  // namespace deeptaylor
