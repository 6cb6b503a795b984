// Plan compilation: validate the op specs, reorder weights channels-last, resolve each rule into
// the constants it needs (python/deeptaylor/rules.py has the maths), choose the tile size.
#include "deeptaylor/plan.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
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
        case OpKind::ConvTranspose2d: return "ConvTranspose2d";
        case OpKind::Add: return "Add";
        case OpKind::Concat: return "Concat";
        case OpKind::Slice: return "Slice";
        case OpKind::Mul: return "Mul";
        case OpKind::BatchNorm: return "BatchNorm";
        case OpKind::Activation: return "Activation";
        case OpKind::AdaptiveAvgPool: return "AdaptiveAvgPool2d";
        case OpKind::GlobalAvgPool: return "GlobalAvgPool";
        case OpKind::Upsample: return "Upsample";
        case OpKind::ChannelShuffle: return "ChannelShuffle";
    }
    return "?";
}

const char* act_name(ActFn f) {
    switch (f) {
        case ActFn::LeakyReLU: return "leaky_relu";
        case ActFn::ReLU6: return "relu6";
        case ActFn::ELU: return "elu";
        case ActFn::GELU: return "gelu";
        case ActFn::SiLU: return "silu";
        case ActFn::Hardswish: return "hardswish";
        case ActFn::Hardsigmoid: return "hardsigmoid";
        case ActFn::Tanh: return "tanh";
        case ActFn::Sigmoid: return "sigmoid";
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

int64_t max_plan_bytes() {
    if (const char* e = std::getenv("DEEPTAYLOR_MAX_PLAN_BYTES")) {
        char* end = nullptr;
        const long long v = std::strtoll(e, &end, 10);
        if (end != e && v > 0) return static_cast<int64_t>(v);
    }
    return kMaxPlanBytes;
}

int64_t pass_budget_bytes() {
    if (const char* e = std::getenv("DEEPTAYLOR_PASS_BUDGET_BYTES")) {
        char* end = nullptr;
        const long long v = std::strtoll(e, &end, 10);
        if (end != e && v > 0) return static_cast<int64_t>(v);
    }
    return kPassBudgetBytes;
}

int64_t available_memory_bytes() {
    std::FILE* f = std::fopen("/proc/meminfo", "r");
    if (!f) return -1;
    char line[256];
    int64_t kb = -1;
    while (std::fgets(line, sizeof line, f))
        if (std::strncmp(line, "MemAvailable:", 13) == 0) {
            kb = std::strtoll(line + 13, nullptr, 10);
            break;
        }
    std::fclose(f);
    return kb < 0 ? -1 : kb * 1024;
}

std::string op_where(size_t i, const OpSpec& op) {
    std::ostringstream os;
    os << "op " << i << " (" << op_name(op.kind);
    if (!op.name.empty()) os << " '" << op.name << "'";
    os << ")";
    return os.str();
}

std::string gib(double bytes) {
    std::ostringstream os;
    os.precision(3);
    if (bytes >= double(int64_t{1} << 30))
        os << bytes / double(int64_t{1} << 30) << " GiB";
    else
        os << bytes / double(1 << 20) << " MiB";
    return os.str();
}

namespace {

[[noreturn]] void fail(size_t i, const OpSpec& op, const std::string& msg) {
    throw std::invalid_argument("plan: " + op_where(i, op) + ": " + msg);
}

[[noreturn]] void limit(size_t i, const OpSpec& op, const std::string& msg) {
    throw LimitError("plan: " + op_where(i, op) + ": " + msg);
}

// Bytes of what the plan and the CPU executor derive for op i beyond copies of its weights: the
// rule's constant maps and their one-sample temporaries, which grow with the layer's spatial size
// (a large padding), not with the model file. Estimated from the spec before anything is allocated.
// (The weights' own layouts are proportional to the file and not limited here.)
double const_bytes(const OpSpec& op, Mode mode) {
    const double f = sizeof(float);
    if (op.kind != OpKind::Dense && op.kind != OpKind::Conv2d && op.kind != OpKind::ConvTranspose2d) return 0.0;
    const Geom& g = op.g;
    const double O = double(g.O), Kc = double(g.kh) * double(g.kw) * double(g.C), P = double(g.OH) * double(g.OW);
    const double in = double(g.H) * double(g.W) * double(g.C), out = P * O;
    const RuleKind rk = mode == Mode::Rules ? op.rule.kind : RuleKind::None;
    double b = 0.0;
    if (rk == RuleKind::WSquare || rk == RuleKind::Flat) b += in + out + (generic_op(op) ? 0.0 : P * Kc);
    if (rk == RuleKind::ZBox) b += 2.0 * in + 3.0 * out + (generic_op(op) ? 0.0 : 3.0 * P * Kc);
    return b * f;
}

// Refuse a per-sample value the engine cannot index (int32 winners, tile offsets).
void check_value(size_t i, const OpSpec& op, const Shape& s) {
    const double n = double(s.c) * double(s.h) * double(s.w);
    if (n > double(kMaxValueFloats))
        limit(i, op, "a per-sample value of " + std::to_string(static_cast<long long>(n)) +
                         " floats is beyond the engine's limit of 2^31 per sample");
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
    // pooling: every window must hold at least one real input (ceil_mode's resolved padding may
    // exceed half the kernel at the bottom/right)
    if (op.kind != OpKind::Conv2d &&
        (g.dh != 1 || g.dw != 1 || g.pt >= g.kh || g.pl >= g.kw || (oh - 1) * g.sh - g.pt >= g.H ||
         (ow - 1) * g.sw - g.pl >= g.W))
        fail(i, op, "pooling windows must each hold a real input, without dilation");
    if (op.kind == OpKind::LpPool && (g.pt || g.pb || g.pl || g.pr)) fail(i, op, "LpPool takes no padding");
    if (op.kind != OpKind::Conv2d && op.out.c != op.in.c) fail(i, op, "pooling keeps the channels");
}

}  // namespace

int64_t ArenaSizes::bytes() const {
    const int64_t f = slab + 2 * work + acc + 4 * col + den + s + ccol;
    return f * static_cast<int64_t>(sizeof(float));
}

namespace {

// A buffer to place: floats, live over steps [t0, t1] (inclusive).
struct Item {
    int64_t floats = 0;
    int64_t t0 = 0, t1 = 0;
    int64_t off = -1;
};

// First-fit interval colouring: the largest buffers first, each at the lowest offset that does not
// overlap a placed buffer live at the same time. Returns the slab size (floats).
int64_t place(std::vector<Item>& items) {
    std::vector<size_t> order(items.size());
    for (size_t k = 0; k < order.size(); ++k) order[k] = k;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
        if (items[a].floats != items[b].floats) return items[a].floats > items[b].floats;
        return items[a].t0 < items[b].t0;
    });
    std::vector<size_t> placed;
    std::vector<std::pair<int64_t, int64_t>> busy;
    int64_t slab = 0;
    for (size_t k : order) {
        Item& it = items[k];
        if (it.floats <= 0) continue;
        busy.clear();
        for (size_t q : placed)
            if (items[q].t0 <= it.t1 && it.t0 <= items[q].t1) busy.emplace_back(items[q].off, items[q].off + items[q].floats);
        std::sort(busy.begin(), busy.end());
        int64_t off = 0;
        for (const auto& b : busy) {
            if (b.first >= off + it.floats) break;
            off = std::max(off, b.second);
        }
        it.off = off;
        slab = std::max(slab, off + it.floats);
        placed.push_back(k);
    }
    return slab;
}

int64_t find(std::vector<int64_t>& p, int64_t v) {
    while (p[v] != v) v = p[v] = p[p[v]];
    return v;
}

inline int64_t round16(int64_t f) { return (f + 15) / 16 * 16; }

bool is_linear(const OpSpec& op) { return op.kind == OpKind::Dense || op.kind == OpKind::Conv2d; }

}  // namespace

// The step timeline of a tile: forward of op i at step i, the targets/seed at L, the backward of op
// i at 2L - i, the input heatmap at 2L + 1. Every activation lives from the step that writes it to
// the last step that reads it (a later op's forward, a backward that needs it), every relevance from
// its first writer (the backward of its last consumer) to its producer's backward. With `passes`
// relevance passes a relevance buffer holds one copy per pass; with several rounds of passes the
// timeline's backward half repeats, so an activation (or max-pool winners) that the backward half
// reads lives to the end.
ArenaSizes arena_sizes(const Plan& plan, int64_t T, int64_t G, bool keep_for_layers, int64_t passes, bool rounds) {
    ArenaSizes s;
    const int64_t L = static_cast<int64_t>(plan.ops.size());
    const int64_t END = 2 * L + 1;
    const int64_t h = std::min<int64_t>(static_cast<int64_t>(plan.head), L);
    const bool grouped = h < L && G > T;  // body activations persist for the whole group
    const bool gxi = plan.mode == Mode::GradientXInput;
    auto vsize = [&](int64_t v) { return plan.values[static_cast<size_t>(v)].size(); };
    auto rows_of_value = [&](int64_t v) { return v > h ? G : T; };  // images per call of its producer
    const bool x_buf = plan.input.permuted();
    // ---- activations
    std::vector<int64_t> t0(L + 1), t1(L + 1);
    for (int64_t v = 0; v <= L; ++v) {
        t0[v] = v == 0 ? 0 : (plan.skip[v - 1] ? v - 2 : v - 1);
        int64_t e = t0[v];
        for (const auto& [c, k] : plan.consumers[v]) {
            e = std::max(e, c);
            if (plan.need_in[c]) e = std::max(e, 2 * L - c);
        }
        if (v >= 1 && plan.need_out[v - 1]) e = std::max(e, 2 * L - (v - 1));
        if (v == L) e = std::max(e, L);
        if (gxi && v == 0) e = END;
        if (keep_for_layers && gxi && v >= 1) e = std::max(e, 2 * L - (v - 1));
        if (rounds && e >= L) e = END;
        t1[v] = e;
    }
    std::vector<int64_t> ap(L + 1);
    for (int64_t v = 0; v <= L; ++v) ap[v] = v;
    for (int64_t c = 0; c < L; ++c) {  // element-wise ops in place when their input is dead after them
        const OpSpec& op = plan.ops[c];
        if (op.kind != OpKind::ReLU && op.kind != OpKind::Activation && op.kind != OpKind::BatchNorm) continue;
        const int64_t v = op.inputs[0];
        if ((v == 0 && !x_buf) || plan.consumers[v].size() != 1 || t1[v] != c) continue;
        if (grouped && (v <= h) != (c + 1 <= h)) continue;
        ap[find(ap, c + 1)] = find(ap, v);
    }
    // ---- relevances
    std::vector<int64_t> r0(L + 1), r1(L + 1), rp(L + 1);
    for (int64_t v = 0; v <= L; ++v) {
        r0[v] = plan.consumers[v].empty() ? L : 2 * L - plan.consumers[v].back().first;
        r1[v] = v >= 1 ? 2 * L - (v - 1) : END;
        rp[v] = v;
    }
    for (int64_t c = 0; c < L; ++c) {  // pass-through / in-place backward
        const OpSpec& op = plan.ops[c];
        const bool pass = op.kind == OpKind::ReLU || op.kind == OpKind::Activation || op.kind == OpKind::BatchNorm ||
                          (op.kind == OpKind::Flatten && !op.in.permuted());
        if (!pass) continue;
        const int64_t v = op.inputs[0];
        if (plan.consumers[v].size() != 1) continue;
        rp[find(rp, c + 1)] = find(rp, v);
    }
    // ---- items: one per buffer class
    std::vector<Item> items;
    std::vector<int64_t> act_item(L + 1, -1), rel_item(L + 1, -1), arg_item(L, -1);
    std::vector<char> act_g(L + 1, 0), rel_g(L + 1, 0);
    auto add_class = [&](std::vector<int64_t>& parent, std::vector<int64_t>& item_of, std::vector<char>& gsz,
                         int64_t v, int64_t a, int64_t b, int64_t rows, bool persist, int64_t copies) {
        const int64_t r = find(parent, v);
        if (item_of[r] < 0) {
            item_of[r] = static_cast<int64_t>(items.size());
            Item it;
            it.t0 = a;
            it.t1 = b;
            items.push_back(it);
        }
        Item& it = items[static_cast<size_t>(item_of[r])];
        if (persist) {
            a = 0;
            b = END;
        }
        it.t0 = std::min(it.t0, a);
        it.t1 = std::max(it.t1, b);
        if (rows == G && G != T) gsz[r] = 1;
        it.floats = std::max(it.floats, round16(copies * rows * vsize(v)));
    };
    for (int64_t v = 0; v <= L; ++v) {
        s.live_sum += T * vsize(v) * 2;
        if (v == 0 && !x_buf) continue;
        const bool body = grouped && v <= h;
        add_class(ap, act_item, act_g, v, t0[v], t1[v], body ? G : rows_of_value(v), body, 1);
    }
    for (int64_t v = 0; v <= L; ++v) {
        const bool hr = grouped && v == h;  // the head's input relevance, read by every tile after it
        add_class(rp, rel_item, rel_g, v, r0[v], hr ? END : r1[v], hr ? G : rows_of_value(v), false, passes);
    }
    for (int64_t i = 0; i < L; ++i) {
        if (plan.ops[i].kind != OpKind::MaxPool) continue;
        Item it;
        it.floats = round16((grouped || i >= h ? G : T) * plan.ops[i].out.size());
        it.t0 = grouped && i < h ? 0 : i;
        it.t1 = (grouped && i < h) || rounds ? END : 2 * L - i;
        arg_item[i] = static_cast<int64_t>(items.size());
        items.push_back(it);
    }
    // the G-sized classes: every member sized for the group
    for (int64_t v = 0; v <= L; ++v) {
        if (!(v == 0 && !x_buf)) {
            const int64_t r = find(ap, v);
            if (act_g[r]) items[act_item[r]].floats = std::max(items[act_item[r]].floats, round16(G * vsize(v)));
        }
        const int64_t r = find(rp, v);
        if (rel_g[r])
            items[rel_item[r]].floats = std::max(items[rel_item[r]].floats, round16(passes * G * vsize(v)));
    }
    s.slab = place(items);
    s.act_off.assign(L + 1, -1);
    s.rel_off.assign(L + 1, -1);
    s.arg_off.assign(L, -1);
    s.act_g.assign(L + 1, 0);
    s.rel_g.assign(L + 1, 0);
    s.arg_g.assign(L, 0);
    for (int64_t v = 0; v <= L; ++v) {
        if (!(v == 0 && !x_buf)) {
            const int64_t r = find(ap, v);
            s.act_off[v] = items[act_item[r]].off;
            s.act_g[v] = act_g[r];
        }
        const int64_t r = find(rp, v);
        s.rel_off[v] = items[rel_item[r]].off;
        s.rel_g[v] = rel_g[r];
    }
    for (int64_t i = 0; i < L; ++i)
        if (arg_item[i] >= 0) {
            s.arg_off[i] = items[arg_item[i]].off;
            s.arg_g[i] = grouped || i >= h;
        }
    // ---- per-step scratch
    int64_t work = 0;
    for (int64_t i = 0; i < L; ++i) {
        const OpSpec& op = plan.ops[i];
        const int64_t rows_i = i < h ? T : G;
        int64_t mx = op.out.size();
        for (const auto& sh : op.in_shapes) mx = std::max(mx, sh.size());
        work = std::max(work, rows_i * mx);
        if (is_linear(op) && !generic_op(op)) {
            const int64_t rows = std::min(plan.lin[i].chunk_rows, rows_i * op.g.P());
            // the passes' blocks stacked for one transpose GEMM, up to a full block of rows
            const int64_t srows = std::min(plan.lin[i].chunk_rows, passes * rows_i * op.g.P());
            s.col = std::max(s.col, rows * op.g.Kc());
            s.den = std::max(s.den, rows * 2 * op.g.O);
            s.s = std::max(s.s, srows * 2 * op.g.O);
            s.ccol = std::max(s.ccol, srows * 2 * op.g.Kc());
        }
    }
    s.work = std::max(work, (h < L ? T : G) * plan.input.size());
    s.acc = passes * s.work;
    return s;
}

namespace {

void check_inputs(size_t i, const OpSpec& op, const std::vector<Shape>& values) {
    size_t arity_min = 1, arity_max = 1;
    if (op.kind == OpKind::Add || op.kind == OpKind::Concat) arity_min = 2, arity_max = 1 << 30;
    if (op.kind == OpKind::Mul) arity_min = arity_max = 2;
    if (op.inputs.size() < arity_min || op.inputs.size() > arity_max)
        fail(i, op, "wrong number of inputs (" + std::to_string(op.inputs.size()) + ")");
    if (op.in_shapes.size() != op.inputs.size()) fail(i, op, "in_shapes must give one shape per input");
    for (size_t k = 0; k < op.inputs.size(); ++k) {
        const int64_t v = op.inputs[k];
        if (v < 0 || v > static_cast<int64_t>(i))
            fail(i, op, "input value " + std::to_string(v) + " is not computed before the op (ids 0.." +
                            std::to_string(i) + ")");
        if (op.in_shapes[k] != values[static_cast<size_t>(v)])
            fail(i, op, "in_shapes[" + std::to_string(k) + "] does not match the shape of value " + std::to_string(v));
    }
}

// Shape rules of the graph ops (the linear and window ops are checked as before).
void check_graph_op(size_t i, const OpSpec& op) {
    const Shape& in = op.in;
    const Shape& out = op.out;
    switch (op.kind) {
        case OpKind::Add:
            for (const auto& sh : op.in_shapes)
                if (sh != out) fail(i, op, "Add needs inputs of the output's shape");
            break;
        case OpKind::Concat: {
            int64_t c = 0;
            for (const auto& sh : op.in_shapes) {
                if (sh.rank != out.rank || sh.h != out.h || sh.w != out.w)
                    fail(i, op, "Concat inputs must agree in everything but the channels");
                c += sh.c;
            }
            if (c != out.c) fail(i, op, "Concat output channels must be the sum of the inputs'");
            break;
        }
        case OpKind::Slice:
            if (op.start < 0 || op.stop > in.c || op.start >= op.stop) fail(i, op, "Slice range out of bounds");
            if (out.rank != in.rank || out.h != in.h || out.w != in.w || out.c != op.stop - op.start)
                fail(i, op, "Slice output shape does not match [start, stop)");
            break;
        case OpKind::Mul: {
            const Shape& g = op.in_shapes[1];
            if (in != out) fail(i, op, "Mul's signal (input 0) must have the output's shape");
            const bool bcast = g.rank == 3 && out.rank == 3 && g.c == out.c && g.h == 1 && g.w == 1;
            if (g != out && !bcast) fail(i, op, "Mul's gate must have the signal's shape or (C, 1, 1)");
            break;
        }
        case OpKind::BatchNorm:
            if (in != out) fail(i, op, "BatchNorm keeps its input shape");
            if (static_cast<int64_t>(op.scale.size()) != in.c || static_cast<int64_t>(op.shift.size()) != in.c)
                fail(i, op, "scale/shift must have one value per channel");
            if (op.rule.kind != RuleKind::None && op.rule.kind != RuleKind::Epsilon && op.rule.kind != RuleKind::Z)
                fail(i, op, "BatchNorm takes no rule, Epsilon or Z");
            break;
        case OpKind::Activation:
            if (in != out) fail(i, op, "activations keep their input shape");
            break;
        case OpKind::AdaptiveAvgPool: {
            if (in.rank != 3 || out.rank != 3 || out.c != in.c) fail(i, op, "AdaptiveAvgPool2d needs (C, H, W)");
            if (static_cast<int64_t>(op.rows.size()) != 2 * out.h || static_cast<int64_t>(op.cols.size()) != 2 * out.w)
                fail(i, op, "rows/cols must give one [start, end) window per output row/column");
            for (size_t k = 0; k < op.rows.size(); k += 2)
                if (op.rows[k] < 0 || op.rows[k] >= op.rows[k + 1] || op.rows[k + 1] > in.h)
                    fail(i, op, "row window out of bounds");
            for (size_t k = 0; k < op.cols.size(); k += 2)
                if (op.cols[k] < 0 || op.cols[k] >= op.cols[k + 1] || op.cols[k + 1] > in.w)
                    fail(i, op, "column window out of bounds");
            break;
        }
        case OpKind::GlobalAvgPool:
            if (in.rank != 3 || out.rank != 1 || out.c != in.c) fail(i, op, "GlobalAvgPool gives (C) from (C, H, W)");
            break;
        case OpKind::Upsample:
            if (in.rank != 3 || op.up_h < 1 || op.up_w < 1 || out.rank != 3 || out.c != in.c ||
                out.h != in.h * op.up_h || out.w != in.w * op.up_w)
                fail(i, op, "Upsample output must be (C, H*sh, W*sw) for integer scales >= 1");
            break;
        case OpKind::ChannelShuffle:
            if (in != out || op.groups < 1 || in.c % op.groups) fail(i, op, "ChannelShuffle: groups must divide C");
            break;
        default:
            break;
    }
}

}  // namespace

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
    plan->values.assign(1, input);
    plan->consumers.assign(L + 1, {});
    std::vector<char> nonneg(L + 1, 0);  // value >= 0 by construction (unknown at the input)
    const bool rules = mode == Mode::Rules;
    plan->need_in.assign(L, 0);
    plan->need_out.assign(L, 0);
    const int64_t cap = max_plan_bytes();
    double consts = 0.0;
    for (size_t i = 0; i < L; ++i) {
      OpSpec& op = plan->ops[i];
      try {
        if (op.inputs.empty()) {  // chain spec
            op.inputs = {static_cast<int64_t>(i)};
            if (op.in_shapes.empty()) op.in_shapes = {op.in};
        }
        if (op.in_shapes.empty()) fail(i, op, "in_shapes missing");
        op.in = op.in_shapes[0];
        check_inputs(i, op, plan->values);
        for (size_t k = 0; k < op.inputs.size(); ++k) {
            plan->consumers[static_cast<size_t>(op.inputs[k])].emplace_back(static_cast<int64_t>(i), static_cast<int>(k));
            if (op.inputs[k] != static_cast<int64_t>(i)) plan->chain = false;
        }
        if (op.out.size() < 1) fail(i, op, "empty output");
        const int64_t v0 = op.inputs[0];
        plan->nonneg_in[i] = nonneg[v0];
        bool nn = false;  // the output is >= 0 by construction
        Geom& g = op.g;
        auto window = [&]() {
            g.C = g.O = op.in.c;
            g.H = op.in.h;
            g.W = op.in.w;
            g.OH = op.out.h;
            g.OW = op.out.w;
        };
        switch (op.kind) {
            case OpKind::Dense:
            case OpKind::Conv2d:
            case OpKind::ConvTranspose2d:
                if (op.kind == OpKind::Dense && op.in.rank != 1) fail(i, op, "Dense needs a rank-1 sample");
                if (op.kind != OpKind::Dense && (op.in.rank != 3 || op.out.rank != 3)) fail(i, op, "needs (C, H, W)");
                g.C = op.in.c;
                g.H = op.in.h;
                g.W = op.in.w;
                g.O = op.out.c;
                g.OH = op.out.h;
                g.OW = op.out.w;
                if (op.rule.kind == RuleKind::None && rules) fail(i, op, "no rule assigned");
                check_value(i, op, op.out);
                {
                    const double b = const_bytes(op, mode);
                    consts += b;
                    if (consts > double(cap))
                        limit(i, op, "the plan's rule constants would need " + gib(consts) +
                                         " (this op " + gib(b) + "), beyond the limit of " + gib(double(cap)) +
                                         " per plan (DEEPTAYLOR_MAX_PLAN_BYTES; docs/engine.md \"Limits and failure modes\")");
                }
                if (generic_op(op)) {
                    // the generic module validates and prepares it (make_generic_linear); op.weight stays
                    plan->need_in[i] = plan->need_out[i] = rules;
                } else {
                    prepare_linear(i, op, plan->lin[i]);
                    std::vector<float>().swap(op.weight);  // Wm (channels-last) is the plan's copy now
                    const RuleKind rk = op.rule.kind;
                    plan->need_in[i] = rules && rk != RuleKind::WSquare && rk != RuleKind::Flat;
                    plan->need_out[i] = rules && (rk == RuleKind::Z || rk == RuleKind::Epsilon ||
                                                  rk == RuleKind::Gamma || rk == RuleKind::ZBox);
                }
                break;
            case OpKind::MaxPool:
                if (op.in.rank != 3) fail(i, op, "pooling needs (C, H, W)");
                window();
                nn = nonneg[v0];
                break;
            case OpKind::AvgPool:
            case OpKind::SumPool:
                if (op.in.rank != 3) fail(i, op, "pooling needs (C, H, W)");
                window();
                if (!op.inv_count.empty() && static_cast<int64_t>(op.inv_count.size()) != op.out.h * op.out.w)
                    fail(i, op, "inv_count must hold OH * OW values");
                plan->need_in[i] = rules;
                nn = nonneg[v0];
                break;
            case OpKind::LpPool:
                if (!(op.p >= 1.0f)) fail(i, op, "p must be >= 1");
                if (!std::isfinite(op.p))
                    limit(i, op, "p is beyond float32's range (3.4e38): the cpu backend computes in float32 "
                                 "(use a smaller p, or backend='numpy')");
                if (!op.global) {
                    if (op.in.rank != 3) fail(i, op, "LpPool with a kernel needs (C, H, W)");
                    window();
                }
                plan->need_in[i] = 1;
                plan->need_out[i] = !rules;
                nn = true;
                break;
            case OpKind::ReLU:
                plan->need_out[i] = !rules;  // gradient mask y > 0 (= a > 0)
                nn = true;
                break;
            case OpKind::GlobalSum:
                plan->need_in[i] = rules;
                nn = nonneg[v0];
                break;
            case OpKind::Flatten:
            case OpKind::Upsample:
            case OpKind::ChannelShuffle:
            case OpKind::Slice:
                nn = nonneg[v0];
                break;
            case OpKind::Concat:
            case OpKind::Add:
                nn = true;
                for (int64_t v : op.inputs) nn = nn && nonneg[v];
                plan->need_in[i] = rules && op.kind == OpKind::Add;
                break;
            case OpKind::Mul:
                nn = nonneg[op.inputs[0]] && nonneg[op.inputs[1]];
                plan->need_in[i] = !rules;
                break;
            case OpKind::BatchNorm:
                plan->need_in[i] = rules && op.rule.kind != RuleKind::None;
                break;
            case OpKind::Activation:
                plan->need_in[i] = !rules;
                nn = op.act == ActFn::ReLU6 || op.act == ActFn::Sigmoid || op.act == ActFn::Hardsigmoid;
                break;
            case OpKind::AdaptiveAvgPool:
            case OpKind::GlobalAvgPool:
                plan->need_in[i] = rules;
                nn = nonneg[v0];
                break;
        }
        const bool windowed = (op.kind == OpKind::Conv2d && !generic_op(op)) || op.kind == OpKind::MaxPool ||
                              op.kind == OpKind::AvgPool || op.kind == OpKind::SumPool ||
                              (op.kind == OpKind::LpPool && !op.global);
        if (windowed) check_geometry(i, op);
        if (op.kind == OpKind::Conv2d && generic_op(op)) {
            if (op.groups < 1 || op.in.c % op.groups || op.out.c % op.groups)
                fail(i, op, "groups must divide the input and output channels");
        }
        if (op.kind == OpKind::Dense && (!g.identity() || g.O != op.out.c || op.out.rank != 1))
            fail(i, op, "Dense geometry must be 1x1");
        if (op.kind == OpKind::ReLU && op.out != op.in) fail(i, op, "ReLU keeps its input shape");
        if (op.kind == OpKind::Flatten && (op.out.rank != 1 || op.out.size() != op.in.size()))
            fail(i, op, "Flatten gives (C*H*W)");
        if ((op.kind == OpKind::GlobalSum || (op.kind == OpKind::LpPool && op.global)) &&
            (op.out.rank != 1 || op.out.size() != 1))
            fail(i, op, "global pooling gives (1)");
        check_graph_op(i, op);
        check_value(i, op, op.out);
        plan->max_size = std::max(plan->max_size, op.out.size());
        nonneg[i + 1] = nn;
        plan->values.push_back(op.out);
      } catch (const std::bad_alloc&) {
        throw OutOfMemory("plan: " + op_where(i, op) + ": out of memory while preparing it (the plan's "
                          "constants so far: about " + gib(consts) + ")");
      }
    }
    plan->const_bytes = static_cast<int64_t>(consts);
    // the output may have any rank: targets and seeds index it in the user's C-order (engine_cpu.cpp)
    // relevance writers: the consumer with the highest index (lowest slot) writes, the rest accumulate
    plan->first_write.assign(L, {});
    for (size_t i = 0; i < L; ++i) plan->first_write[i].assign(plan->ops[i].inputs.size(), 0);
    for (size_t v = 0; v <= L; ++v) {
        const auto& cs = plan->consumers[v];
        if (cs.empty()) continue;
        // the last consumer in op order runs first backward; among its slots the lowest writes
        int64_t c = cs.back().first;
        int slot = cs.back().second;
        for (const auto& [cc, k] : cs)
            if (cc == c) slot = std::min(slot, k);
        plan->first_write[static_cast<size_t>(c)][static_cast<size_t>(slot)] = 1;
    }
    // fusions: a linear op (or Add) whose output only feeds the next op, a ReLU
    plan->fuse_relu.assign(L, 0);
    plan->skip.assign(L, 0);
    for (size_t i = 0; i + 1 < L; ++i) {
        const OpSpec& op = plan->ops[i];
        const bool fusable = (is_linear(op) && !generic_op(op)) || op.kind == OpKind::Add;
        if (!fusable || plan->skip[i]) continue;
        const OpSpec& nx = plan->ops[i + 1];
        const auto& cs = plan->consumers[i + 1];
        if (nx.kind == OpKind::ReLU && cs.size() == 1 && cs[0].first == static_cast<int64_t>(i + 1)) {
            plan->fuse_relu[i] = 1;
            plan->skip[i + 1] = 1;
        }
    }
    // Largest tile (<= kMaxTile) whose arena fits the budget; never depends on the thread count.
    plan->head = L;  // no head groups while the tile is chosen
    int64_t T = kMaxTile;
    while (T > 1 && arena_sizes(*plan, T, T).bytes() > kArenaBudgetBytes) --T;
    // A tile cut by the budget is rounded down to whole GEMM micro-panels: T = 13 images made every
    // Dense product 12 + 1 rows, and the 1-row panel streamed the whole weight matrix again.
    if (T < kMaxTile && T > kRowMultiple) T -= T % kRowMultiple;
    if (T == 1) {  // one image's working memory exceeds the budget: it must at least be bounded
        const double arena = double(arena_sizes(*plan, 1, 1).bytes());
        if (arena + consts > double(cap)) {
            size_t big = 0;
            for (size_t i = 1; i < L; ++i)
                if (plan->ops[i].out.size() > plan->ops[big].out.size()) big = i;
            const Shape& sh = plan->ops[big].out;
            std::ostringstream os;
 os << "plan: the working memory of one image (" << gib(arena) << ", plus " << gib(consts)
               << " of rule constants) is beyond the limit of " << gib(double(cap))
               << " per plan (DEEPTAYLOR_MAX_PLAN_BYTES; docs/engine.md \"Limits and failure modes\"); the largest "
               << "value is the output of " << op_where(big, plan->ops[big]) << ", shape (" << sh.c;
            if (sh.rank == 3) os << ", " << sh.h << ", " << sh.w;
            os << ") per sample: check its padding / kernel / upsampling, or the input size";
            throw LimitError(os.str());
        }
    }
    plan->tile = T;
    plan->group = T;
    // Head groups (chain plans): the trailing rank-1 ops (after the last op with a 3-D input or
    // output), if their weights are large enough to be worth streaming once per group rather than
    // once per tile.
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
    if (plan->chain && h > 0 && h < L && T <= kMaxGroupTile && head_weight_bytes >= kHeadGroupMinWeightBytes) {
        plan->head = h;
        int64_t G = kMaxGroup / T * T;
        while (G > T && arena_sizes(*plan, T, G).bytes() > kGroupBudgetBytes) G -= T;
        plan->group = G;
        if (G == T) plan->head = L;
    }
    return plan;
}

}  // namespace deeptaylor
