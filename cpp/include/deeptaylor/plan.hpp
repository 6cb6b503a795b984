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
#include <string>
#include <vector>

namespace deeptaylor {

enum class OpKind { Dense, Conv2d, ReLU, MaxPool, AvgPool, SumPool, GlobalSum, LpPool, Flatten };

// Rules of linear layers (python/deeptaylor/rules.py has the maths and the citations).
enum class RuleKind { None, Z, Epsilon, ZPlus, Gamma, AlphaBeta, WSquare, Flat, ZBox };

// Relevance rules (per linear layer) or a plain gradient method for the whole network.
enum class Mode { Rules, Sensitivity, GradientXInput };

// A per-sample shape as the user sees it: rank 1 (F) -> c = F, h = w = 1; rank 3 (C, H, W).
struct Shape {
    int rank = 1;
    int64_t c = 1, h = 1, w = 1;
    int64_t size() const { return c * h * w; }
    // True when channels-last storage differs from the user's C-order (a layout permutation needed).
    bool permuted() const { return rank == 3 && c > 1 && h * w > 1; }
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
    Shape in, out;
    Geom g;                     // linear ops and window pools
    std::vector<float> weight;  // Dense (O, I) or Conv2d (O, C, kh, kw); emptied by build_plan (see Wm)
    std::vector<float> bias;    // (O)
    float p = 2.0f;             // LpPool exponent
    bool global = false;        // LpPool without a kernel (pools everything to (N, 1))
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
    std::vector<LinearPrep> lin;     // one per op (empty for non-linear ops)
    std::vector<char> nonneg_in;     // op input is >= 0 by construction (after a ReLU)
    int64_t tile = 1;                // images per tile (independent of the thread count)
    // Head groups: the trailing run of rank-1 ops (the Dense head after the last Flatten / pooling,
    // ops [head, L)) runs on up to `group` images at once (a multiple of `tile`) fed by several
    // tiles of the ops before it, so that its weight matrices stream from memory once per group
    // instead of once per tile. head == L (no head) or group == tile: plain tiles.
    size_t head = 0;
    int64_t group = 1;
    int64_t max_size = 1;            // largest per-sample activation (floats)
    int64_t num_outputs() const { return ops.back().out.size(); }
};

// Per-thread working memory for a tile of T images (floats unless stated).
struct ArenaSizes {
    std::vector<int64_t> act;  // act[i]: input of op i (i = 0..L); act[0] only if the input is permuted
    std::vector<int64_t> arg;  // int32 winners per op (max pooling only)
    int64_t work = 0;          // each of the 4 tile buffers (relevance ping-pong, two temporaries)
    int64_t col = 0;           // each of the 4 im2col-block buffers (col, col+, col-, combined)
    int64_t den = 0;           // each of denominators and s (block rows x 2 O)
    int64_t ccol = 0;          // transpose-GEMM output block (block rows x 2 Kc)
    int64_t head_rel = 0;      // head groups: the head's input relevance for the whole group
    int64_t bytes() const;
};
// T images per tile for ops [0, head), G (a multiple of T) for the head and for the stored
// activations of every op (a group's tiles all keep theirs until the head's relevance is back).
ArenaSizes arena_sizes(const Plan& plan, int64_t T, int64_t G);
inline ArenaSizes arena_sizes(const Plan& plan) { return arena_sizes(plan, plan.tile, plan.group); }

// Validate the specs, derive every rule matrix/constant map and choose the tile size.
// Throws std::invalid_argument naming the op on inconsistent specs.
std::shared_ptr<Plan> build_plan(std::vector<OpSpec> ops, Shape input, Mode mode);

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

}  // namespace deeptaylor
