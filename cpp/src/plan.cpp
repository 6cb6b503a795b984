// Plan compilation: validate the op specs, reorder weights channels-last, resolve each rule into
// the constants it needs (python/deeptaylor/rules.py has the maths), choose the tile size.
#include "deeptaylor/plan.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>

#include "deeptaylor/gemm.hpp"
#include "deeptaylor/ops.hpp"

namespace deeptaylor {

const char* op_name(OpKind k) {
    switch (k) {
        case OpKind::Dense: return "Dense";
        case OpKind::Conv2d: return "Conv2d";
        case OpKind::ReLU: return "ReLU";
        case OpKind::MaxPool: return "MaxPool2d";
        case OpKind::AvgPool: return "AvgPool2d";
        case OpKind::SumPool: return "SumPool2d";
        case OpKind::GlobalSum: return "GlobalSumPool";
        case OpKind::LpPool: return "LpPool";
        case OpKind::Flatten: return "Flatten";
    }
    return "?";
}

std::vector<float> derive(const std::vector<float>& Wm, Derived which, float gamma) {
    std::vector<float> out(Wm.size());
    for (size_t i = 0; i < Wm.size(); ++i) {
        const float w = Wm[i], wp = w > 0.0f ? w : 0.0f, wn = w < 0.0f ? w : 0.0f;
        switch (which) {
            case Derived::W: out[i] = w; break;
            case Derived::Wplus: out[i] = wp; break;
            case Derived::Wminus: out[i] = wn; break;
            case Derived::WSquare: out[i] = w * w; break;
            case Derived::Ones: out[i] = 1.0f; break;
            case Derived::GammaUp: out[i] = w + gamma * wp; break;
            case Derived::GammaDown: out[i] = w + gamma * wn; break;
        }
    }
    return out;
}

namespace {

[[noreturn]] void fail(size_t i, const OpSpec& op, const std::string& msg) {
    std::ostringstream os;
    os << "plan: op " << i << " (" << op_name(op.kind) << "): " << msg;
    throw std::invalid_argument(os.str());
}

// user order (C, H, W) -> channels-last (H, W, C) for one sample
std::vector<float> to_hwc(const std::vector<float>& v, const Shape& s) {
    if (!s.permuted()) return v;
    std::vector<float> out(v.size());
    nchw_to_nhwc(v.data(), out.data(), 1, s.c, s.h, s.w);
    return out;
}

// out (P, O) = L(img; M) for one channels-last sample img, M (O, Kc): im2col + GEMM, no bias.
std::vector<float> conv_single(const std::vector<float>& img, const Geom& g, const std::vector<float>& M) {
    const int64_t P = g.P(), Kc = g.Kc(), O = g.O;
    std::vector<float> col(static_cast<size_t>(P * Kc));
    im2col_rows(img.data(), g, 0, P, col.data());
    std::vector<float> out(static_cast<size_t>(P * O));
    sgemm(false, true, P, O, Kc, col.data(), Kc, M.data(), Kc, out.data(), O, false, 1);
    return out;
}

void prepare_linear(size_t i, const OpSpec& op, LinearPrep& lp) {
    const Geom& g = op.g;
    const int64_t O = g.O, C = g.C, Kc = g.Kc(), P = g.P();
    if (static_cast<int64_t>(op.weight.size()) != O * Kc) fail(i, op, "weight size does not match the shape");
    if (static_cast<int64_t>(op.bias.size()) != O) fail(i, op, "bias size does not match the outputs");
    // (O, C, kh, kw) -> (O, kh, kw, C)
    lp.Wm.resize(static_cast<size_t>(O * Kc));
    for (int64_t o = 0; o < O; ++o)
        for (int64_t c = 0; c < C; ++c)
            for (int64_t a = 0; a < g.kh; ++a)
                for (int64_t b = 0; b < g.kw; ++b)
                    lp.Wm[o * Kc + (a * g.kw + b) * C + c] = op.weight[((o * C + c) * g.kh + a) * g.kw + b];
    // at least 128 rows per GEMM block: fewer would re-stream the packed weights per block
    lp.chunk_rows = std::max<int64_t>(kMinChunkRows, kChunkFloats / std::max<int64_t>(Kc, 1));
    lp.chunk_rows = (lp.chunk_rows + kRowMultiple - 1) / kRowMultiple * kRowMultiple;

    const RuleSpec& r = op.rule;
    const std::vector<float>& b = op.bias;
    auto pos = [](float v) { return v > 0.0f ? v : 0.0f; };
    auto neg = [](float v) { return v < 0.0f ? v : 0.0f; };
    switch (r.kind) {
        case RuleKind::ZPlus:
            if (r.use_bias) {
                lp.bias2.resize(static_cast<size_t>(O));
                for (int64_t o = 0; o < O; ++o) lp.bias2[o] = pos(b[o]);
            }
            break;
        case RuleKind::Gamma:  // [b + g b+ | b + g b-]
            lp.bias2.resize(static_cast<size_t>(2 * O));
            for (int64_t o = 0; o < O; ++o) {
                lp.bias2[o] = b[o] + r.gamma * pos(b[o]);
                lp.bias2[O + o] = b[o] + r.gamma * neg(b[o]);
            }
            break;
        case RuleKind::AlphaBeta:  // [b+ | b-]
            lp.bias2.resize(static_cast<size_t>(2 * O));
            for (int64_t o = 0; o < O; ++o) {
                lp.bias2[o] = pos(b[o]);
                lp.bias2[O + o] = neg(b[o]);
            }
            break;
        case RuleKind::WSquare:
        case RuleKind::Flat: {
            // the denominator L(1; V) depends on the output position only (border taps excluded)
            const std::vector<float> ones(static_cast<size_t>(g.in_size()), 1.0f);
            const auto V = derive(lp.Wm, r.kind == RuleKind::WSquare ? Derived::WSquare : Derived::Ones);
            lp.inv_den = conv_single(ones, g, V);
            for (auto& v : lp.inv_den) v = v != 0.0f ? 1.0f / v : 0.0f;
            break;
        }
        case RuleKind::ZBox: {
            if (static_cast<int64_t>(r.low.size()) != op.in.size() ||
                static_cast<int64_t>(r.high.size()) != op.in.size())
                fail(i, op, "ZBox low/high must be broadcast to the layer's input shape");
            const auto lo = to_hwc(r.low, op.in), hi = to_hwc(r.high, op.in);
            lp.lo_col.resize(static_cast<size_t>(P * Kc));
            lp.hi_col.resize(static_cast<size_t>(P * Kc));
            im2col_rows(lo.data(), g, 0, P, lp.lo_col.data());
            im2col_rows(hi.data(), g, 0, P, lp.hi_col.data());
            const auto a = conv_single(lo, g, derive(lp.Wm, Derived::Wplus));
            const auto c = conv_single(hi, g, derive(lp.Wm, Derived::Wminus));
            lp.zb_const.resize(static_cast<size_t>(P * O));
            for (int64_t p = 0; p < P; ++p)
                for (int64_t o = 0; o < O; ++o) lp.zb_const[p * O + o] = b[o] + a[p * O + o] + c[p * O + o];
            break;
        }
        case RuleKind::Z:
        case RuleKind::Epsilon:
        case RuleKind::None:
            break;
    }
}

// The output size must follow from the window parameters, and every window must hold at least
// one real input (max pooling's winner must exist): a mismatch would index out of bounds.
void check_geometry(size_t i, const OpSpec& op) {
    const Geom& g = op.g;
    if (g.kh < 1 || g.kw < 1 || g.sh < 1 || g.sw < 1 || g.dh < 1 || g.dw < 1 || g.pt < 0 || g.pb < 0 ||
        g.pl < 0 || g.pr < 0)
        fail(i, op, "kernel, stride and dilation must be >= 1 and padding >= 0");
    const int64_t oh = (g.H + g.pt + g.pb - g.dh * (g.kh - 1) - 1) / g.sh + 1;
    const int64_t ow = (g.W + g.pl + g.pr - g.dw * (g.kw - 1) - 1) / g.sw + 1;
    if (g.H + g.pt + g.pb - g.dh * (g.kh - 1) - 1 < 0 || g.W + g.pl + g.pr - g.dw * (g.kw - 1) - 1 < 0 ||
        oh != op.out.h || ow != op.out.w || op.out.rank != 3)
        fail(i, op, "output shape does not match the window geometry");
    if (op.kind != OpKind::Conv2d && (g.dh != 1 || g.dw != 1 || std::max(g.pt, g.pb) > g.kh / 2 ||
                                      std::max(g.pl, g.pr) > g.kw / 2))
        fail(i, op, "pooling padding must be at most half the kernel, without dilation");
    if (op.kind == OpKind::LpPool && (g.pt || g.pb || g.pl || g.pr)) fail(i, op, "LpPool takes no padding");
    if (op.kind != OpKind::Conv2d && op.out.c != op.in.c) fail(i, op, "pooling keeps the channels");
}

}  // namespace

int64_t ArenaSizes::bytes() const {
    int64_t f = 4 * work + 4 * col + 2 * den + ccol + head_rel;
    for (auto v : act) f += v;
    int64_t b = f * static_cast<int64_t>(sizeof(float));
    for (auto v : arg) b += v * static_cast<int64_t>(sizeof(int32_t));
    return b;
}

ArenaSizes arena_sizes(const Plan& plan, int64_t T, int64_t G) {
    ArenaSizes s;
    const size_t L = plan.ops.size();
    s.act.assign(L + 1, 0);
    s.arg.assign(L, 0);
    if (plan.input.permuted()) s.act[0] = G * plan.input.size();
    int64_t work = 0;
    for (size_t i = 0; i < L; ++i) {
        const OpSpec& op = plan.ops[i];
        const int64_t rows_i = i < plan.head ? T : G;  // images an op works on at once
        s.act[i + 1] = G * op.out.size();
        if (op.kind == OpKind::MaxPool) s.arg[i] = G * op.out.size();
        work = std::max(work, rows_i * std::max(op.in.size(), op.out.size()));
        if (op.kind == OpKind::Dense || op.kind == OpKind::Conv2d) {
            const int64_t rows = std::min(plan.lin[i].chunk_rows, rows_i * op.g.P());
            s.col = std::max(s.col, rows * op.g.Kc());
            s.den = std::max(s.den, rows * 2 * op.g.O);
            s.ccol = std::max(s.ccol, rows * 2 * op.g.Kc());
        }
    }
    s.work = std::max(work, (plan.head < L ? T : G) * plan.input.size());
    // the head's input relevance, kept while the group's tiles run their relevance passes
    s.head_rel = plan.head < L && G > T ? G * plan.ops[plan.head].in.size() : 0;
    return s;
}

std::shared_ptr<Plan> build_plan(std::vector<OpSpec> ops, Shape input, Mode mode) {
    if (ops.empty()) throw std::invalid_argument("plan: the network has no layers");
    auto plan = std::make_shared<Plan>();
    plan->mode = mode;
    plan->input = input;
    plan->ops = std::move(ops);
    const size_t L = plan->ops.size();
    plan->lin.resize(L);
    plan->nonneg_in.assign(L, 0);
    plan->max_size = input.size();
    Shape cur = input;
    bool nonneg = false;  // unknown at the network input (checked per tile at run time)
    for (size_t i = 0; i < L; ++i) {
        OpSpec& op = plan->ops[i];
        if (op.in.rank != cur.rank || op.in.size() != cur.size() || op.in.c != cur.c || op.in.h != cur.h)
            fail(i, op, "input shape does not follow from the previous op");
        if (op.out.size() < 1) fail(i, op, "empty output");
        plan->nonneg_in[i] = nonneg;
        Geom& g = op.g;
        switch (op.kind) {
            case OpKind::Dense:
            case OpKind::Conv2d:
                if (op.kind == OpKind::Dense && op.in.rank != 1) fail(i, op, "Dense needs a rank-1 sample");
                if (op.kind == OpKind::Conv2d && op.in.rank != 3) fail(i, op, "Conv2d needs (C, H, W)");
                g.C = op.in.c;
                g.H = op.in.h;
                g.W = op.in.w;
                g.O = op.out.c;
                g.OH = op.out.h;
                g.OW = op.out.w;
                if (op.rule.kind == RuleKind::None && mode == Mode::Rules) fail(i, op, "no rule assigned");
                prepare_linear(i, op, plan->lin[i]);
                std::vector<float>().swap(op.weight);  // Wm (channels-last) is the plan's copy now
                nonneg = false;
                break;
            case OpKind::MaxPool:
            case OpKind::AvgPool:
            case OpKind::SumPool:
                if (op.in.rank != 3) fail(i, op, "pooling needs (C, H, W)");
                g.C = g.O = op.in.c;
                g.H = op.in.h;
                g.W = op.in.w;
                g.OH = op.out.h;
                g.OW = op.out.w;
                break;
            case OpKind::LpPool:
                if (!(op.p >= 1.0f) || !std::isfinite(op.p)) fail(i, op, "p must be finite and >= 1");
                if (!op.global) {
                    if (op.in.rank != 3) fail(i, op, "LpPool with a kernel needs (C, H, W)");
                    g.C = g.O = op.in.c;
                    g.H = op.in.h;
                    g.W = op.in.w;
                    g.OH = op.out.h;
                    g.OW = op.out.w;
                }
                nonneg = true;
                break;
            case OpKind::ReLU:
                nonneg = true;
                break;
            case OpKind::GlobalSum:
            case OpKind::Flatten:
                break;
        }
        const bool windowed = op.kind == OpKind::Conv2d || op.kind == OpKind::MaxPool ||
                              op.kind == OpKind::AvgPool || op.kind == OpKind::SumPool ||
                              (op.kind == OpKind::LpPool && !op.global);
        if (windowed) check_geometry(i, op);
        if (op.kind == OpKind::Dense && (!g.identity() || g.O != op.out.c || op.out.rank != 1))
            fail(i, op, "Dense geometry must be 1x1");
        if (op.kind == OpKind::ReLU && (op.out.rank != op.in.rank || op.out.size() != op.in.size()))
            fail(i, op, "ReLU keeps its input shape");
        if (op.kind == OpKind::Flatten && (op.out.rank != 1 || op.out.size() != op.in.size()))
            fail(i, op, "Flatten gives (C*H*W)");
        if ((op.kind == OpKind::GlobalSum || (op.kind == OpKind::LpPool && op.global)) &&
            (op.out.rank != 1 || op.out.size() != 1))
            fail(i, op, "global pooling gives (1)");
        plan->max_size = std::max(plan->max_size, op.out.size());
        cur = op.out;
    }
    if (cur.rank != 1) throw std::invalid_argument("plan: the network's output must be (N, K)");
    // Largest tile (<= kMaxTile) whose arena fits the budget; never depends on the thread count.
    plan->head = L;  // no head groups while the tile is chosen
    int64_t T = kMaxTile;
    while (T > 1 && arena_sizes(*plan, T, T).bytes() > kArenaBudgetBytes) --T;
    // A tile cut by the budget is rounded down to whole GEMM micro-panels: T = 13 images made every
    // Dense product 12 + 1 rows, and the 1-row panel streamed the whole weight matrix again.
    if (T < kMaxTile && T > kRowMultiple) T -= T % kRowMultiple;
    plan->tile = T;
    plan->group = T;
    // Head groups: the trailing rank-1 ops (after the last op with a 3-D input or output), if their
    // weights are large enough to be worth streaming once per group rather than once per tile.
    size_t h = L;
    while (h > 0 && plan->ops[h - 1].out.rank == 1 && plan->ops[h - 1].in.rank == 1) --h;
    int64_t head_weight_bytes = 0;
    for (size_t i = h; i < L; ++i)
        if (plan->ops[i].kind == OpKind::Dense)
            head_weight_bytes += static_cast<int64_t>(sizeof(float)) * plan->ops[i].g.O * plan->ops[i].g.Kc();
    // Only for tiles of a few images (a 12-row micro-panel mostly empty in every head product):
    // measured, groups help cifar_vgg (T = 2: 252 -> 275 img/s at 2 threads, 512 images) but not
    // lenet (T = 12: 2,696 -> 2,646), whose tiles' activations no longer stay in cache from their
    // forward to their relevance pass.
    if (h > 0 && h < L && T <= kMaxGroupTile && head_weight_bytes >= kHeadGroupMinWeightBytes) {
        plan->head = h;
        int64_t G = kMaxGroup / T * T;
        while (G > T && arena_sizes(*plan, T, G).bytes() > kGroupBudgetBytes) G -= T;
        plan->group = G;
        if (G == T) plan->head = L;
    }
    return plan;
}

}  // namespace deeptaylor
