// The CPU executor: fused forward + relevance (or gradient) passes over batch tiles.
//
// Every linear rule is run as im2col blocks + GEMMs on weights packed once (PackedB):
//   z    = sum_t L(inmod_t(a); W_t) (+ bias)         forward GEMM(s), or a stored/constant map
//   s    = R / stab(z)                               element-wise (rule's zero-denominator policy)
//   c_t  = L^T(s; W_t)                               one transpose GEMM per weight variant
//   Rin  = sum_t coef_t * inmod_t(a) (.) c_t          combined in column space, then col2im
// Using a (.) col2im(c) = col2im(im2col(a) (.) c), the input modifiers are applied to the im2col
// block that the denominator GEMM already read, so no input-sized temporaries are needed.
//
// Threads: OpenMP over tiles when there are at least as many tiles as threads (each thread owns an
// arena, no sharing, no atomics); otherwise the tiles run one after another with the threads inside
// the GEMM. Tile boundaries depend only on the plan, so results do not depend on the thread count
// beyond the GEMM's own float rounding.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "deeptaylor/engine.hpp"
#include "deeptaylor/gemm.hpp"
#include "deeptaylor/ops.hpp"
#include "deeptaylor/parallel.hpp"
#include "deeptaylor/plan.hpp"

// The generic linear module (grouped / transposed convolutions) when it is part of the build.
#if __has_include("deeptaylor/linear_generic.hpp") && __has_include("linear_generic.cpp")
#include "deeptaylor/linear_generic.hpp"
#define DT_HAVE_GENERIC 1
#else
#define DT_HAVE_GENERIC 0
#endif

namespace deeptaylor {

int default_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

namespace {

using PB = std::unique_ptr<PackedB>;

// (R, Kc) rows of output units -> forward operand (Kc, R): z = col @ M^T
PB pack_fwd(const std::vector<float>& M, int64_t R, int64_t Kc) {
    return std::make_unique<PackedB>(M.data(), Kc, R, Kc, true);
}
// (R, Kc) -> transpose operand (R, Kc): c = s @ M
PB pack_bwd(const std::vector<float>& M, int64_t R, int64_t Kc) {
    return std::make_unique<PackedB>(M.data(), R, Kc, Kc, false);
}
std::vector<float> vstack(const std::vector<float>& A, const std::vector<float>& B) {
    std::vector<float> out(A);
    out.insert(out.end(), B.begin(), B.end());
    return out;
}

// A packed matrix with the filter the micro-kernel applies to it (W, W+ = max(W, 0), W- = min(W, 0)).
struct Operand {
    const PackedB* p = nullptr;
    BFilter f = BFilter::None;
    explicit operator bool() const { return p != nullptr; }
};

struct Packs {
    PB fwd, bwd;     // W: forward (Kc, O) and transpose (O, Kc)
    PB own_f, own_b, own_fq, own_bq;  // rule matrices that are no filter of W: Gamma's and
                                      // AlphaBeta's stacks (a+ and a- variants), w², ones
    // denominator GEMMs on a+ / a- (Kc, wO) and transpose GEMMs for a+ / a- (wO, Kc); WSquare/Flat:
    // V in tP. z+ and zB use W's own packs through the B filter: no copy of W+ or W- is packed.
    Operand dP, dQ, tP, tQ;
    int width = 1;   // w: 1, or 2 for the two-denominator rules (Gamma, AlphaBeta)
};


// True when any of p[0, n) is NaN or +-Inf (exponent bits all set). Integer max over the magnitudes:
// vectorises, and stays correct under -ffast-math, unlike std::isfinite.
inline bool has_nonfinite(const float* p, int64_t n) {
    uint32_t mx = 0;
    for (int64_t k = 0; k < n; ++k) {
        uint32_t u;
        std::memcpy(&u, p + k, sizeof u);
        u &= 0x7fffffffu;
        mx = u > mx ? u : mx;
    }
    return mx >= 0x7f800000u;
}

// Shared state of one run: the non-finite flags (first op / value over all tiles), the stop flag
// (an interrupt or an exception in another thread), and the interrupt poll of the calling thread.
struct RunState {
    std::atomic<int64_t> fwd{-1}, rel{-1};
    std::atomic<bool> stop{false};
    bool interrupted = false;          // written by the calling thread only
    std::thread::id caller = std::this_thread::get_id();
    std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
    const std::function<bool()>* poll_fn = nullptr;
    std::mutex mu;
    std::exception_ptr error;

    void flag_fwd(int64_t i) {  // keep the lowest op index
        int64_t cur = fwd.load();
        while ((cur < 0 || i < cur) && !fwd.compare_exchange_weak(cur, i)) {
        }
    }
    void flag_rel(int64_t v) {  // keep the highest value id (the first reached backward)
        int64_t cur = rel.load();
        while (v > cur && !rel.compare_exchange_weak(cur, v)) {
        }
    }
    // On the calling thread, at most every 20 ms: ask whether to stop (a pending Ctrl-C).
    bool stopped() {
        if (stop.load(std::memory_order_relaxed)) return true;
        if (!poll_fn || std::this_thread::get_id() != caller) return false;
        const auto now = std::chrono::steady_clock::now();
        if (now - last < std::chrono::milliseconds(20)) return false;
        last = now;
        if ((*poll_fn)()) {
            interrupted = true;
            stop.store(true);
            return true;
        }
        return false;
    }
    void fail(std::exception_ptr e) {
        std::lock_guard<std::mutex> lock(mu);
        if (!error) error = e;
        stop.store(true);
    }
};

// One thread's working memory: the slab that holds every live activation, relevance and max-pool
// winner buffer at the offsets of the plan's liveness layout, and the per-step scratch buffers.
struct Arena {
    std::vector<float> slab, tmp, tmp2, acc;
    std::vector<float> col, colP, colN, comb, den, s, ccol, gscr;
    // Row reuse (forward_only + reuse_rows): per linear op, the input and output of the last sample it
    // computed in this arena, the "previous sample" of the next tile's first one. Always a consistent
    // pair, so a stale one (another call, another tile order) is harmless: reuse compares bits.
    std::vector<std::vector<float>> last_in, last_out;
    Arena(const ArenaSizes& z, int64_t gscr_floats) {
        slab.resize(static_cast<size_t>(z.slab));
        for (auto* v : {&tmp, &tmp2}) v->resize(static_cast<size_t>(z.work));
        acc.resize(static_cast<size_t>(z.acc));
        for (auto* v : {&col, &colP, &colN, &comb}) v->resize(static_cast<size_t>(z.col));
        den.resize(static_cast<size_t>(z.den));
        s.resize(static_cast<size_t>(z.s));
        ccol.resize(static_cast<size_t>(z.ccol));
        gscr.resize(static_cast<size_t>(gscr_floats));
    }
};

class CpuExecutor final : public Executor {
public:
    // Packs every matrix the passes multiply by, layer by layer, and releases the Plan's own copy of
    // each layer's weights (Wm) once packed: the plan then holds each weight matrix twice (forward
    // and transpose layouts) for Z, Epsilon, z+, zB and the gradient methods.
    explicit CpuExecutor(std::shared_ptr<Plan> plan) {
        Plan& pl = *plan;
        packs_.resize(pl.ops.size());
#if DT_HAVE_GENERIC
        gen_.resize(pl.ops.size());
#endif
        for (size_t i = 0; i < pl.ops.size(); ++i) {
          const OpSpec& op = pl.ops[i];
          try {
            if (generic_op(op)) {
#if DT_HAVE_GENERIC
                gen_[i] = make_generic_linear(op, pl.nonneg_in[i], pl.mode);
                gscr_ = std::max(gscr_, generic_scratch_floats(*gen_[i], pl.tile));
                continue;
#else
                throw std::invalid_argument(std::string("plan: op ") + std::to_string(i) + " (" + op_name(op.kind) +
                                            "): grouped and transposed convolutions are not built into this core");
#endif
            }
            if (op.kind != OpKind::Dense && op.kind != OpKind::Conv2d) continue;
            auto& Wm = pl.lin[i].Wm;
            const int64_t O = op.g.O, Kc = op.g.Kc();
            Packs& pk = packs_[i];
            pk.fwd = pack_fwd(Wm, O, Kc);
            const bool need_q = !pl.nonneg_in[i];  // a- terms vanish on inputs known to be >= 0
            const RuleKind rk = pl.mode == Mode::Rules ? op.rule.kind : RuleKind::None;
            // the plain transpose layout: gradients, Z/Epsilon, and the filtered z+ / zB transposes
            if (pl.mode != Mode::Rules || rk == RuleKind::Z || rk == RuleKind::Epsilon ||
                rk == RuleKind::ZPlus || rk == RuleKind::ZBox)
                pk.bwd = pack_bwd(Wm, O, Kc);
            auto two = [&](const std::vector<float>& P, const std::vector<float>& Q, int w) {
                pk.width = w;
                pk.own_f = pack_fwd(P, w * O, Kc);
                pk.own_b = pack_bwd(P, w * O, Kc);
                pk.dP = {pk.own_f.get(), BFilter::None};
                pk.tP = {pk.own_b.get(), BFilter::None};
                if (need_q) {
                    pk.own_fq = pack_fwd(Q, w * O, Kc);
                    pk.own_bq = pack_bwd(Q, w * O, Kc);
                    pk.dQ = {pk.own_fq.get(), BFilter::None};
                    pk.tQ = {pk.own_bq.get(), BFilter::None};
                }
            };
            switch (rk) {
                case RuleKind::ZPlus:
                    pk.dP = {pk.fwd.get(), BFilter::Pos};
                    pk.tP = {pk.bwd.get(), BFilter::Pos};
                    if (need_q) {
                        pk.dQ = {pk.fwd.get(), BFilter::Neg};
                        pk.tQ = {pk.bwd.get(), BFilter::Neg};
                    }
                    break;
                case RuleKind::Gamma: {
                    const auto up = derive(Wm, Derived::GammaUp, op.rule.gamma);
                    const auto dn = derive(Wm, Derived::GammaDown, op.rule.gamma);
                    two(vstack(up, dn), vstack(dn, up), 2);
                    break;
                }
                case RuleKind::AlphaBeta: {
                    const auto wp = derive(Wm, Derived::Wplus), wn = derive(Wm, Derived::Wminus);
                    two(vstack(wp, wn), vstack(wn, wp), 2);
                    break;
                }
                case RuleKind::WSquare:
                    pk.own_b = pack_bwd(derive(Wm, Derived::WSquare), O, Kc);
                    pk.tP = {pk.own_b.get(), BFilter::None};
                    break;
                case RuleKind::Flat:
                    pk.own_b = pack_bwd(derive(Wm, Derived::Ones), O, Kc);
                    pk.tP = {pk.own_b.get(), BFilter::None};
                    break;
                case RuleKind::ZBox:  // transposes s W+^T and s W-^T: W's transpose pack, filtered
                    pk.tP = {pk.bwd.get(), BFilter::Pos};
                    pk.tQ = {pk.bwd.get(), BFilter::Neg};
                    break;
                case RuleKind::Z:
                case RuleKind::Epsilon:
                case RuleKind::None:
                    break;
            }
            std::vector<float>().swap(Wm);  // packed: the executor owns the weights from here
          } catch (const std::bad_alloc&) {
            throw OutOfMemory("plan: " + op_where(i, op) + ": out of memory while packing its weights");
          }
        }
        plan_ = plan;  // layouts are computed from it
        const Layout& l0 = layout(0, 1, false);
        if (pl.mode == Mode::GradientXInput) layout(1, 1, false);
        // the generic module's scratch is known only now: the plan's limit again, with it
        const int64_t cap = max_plan_bytes();
        if (gscr_ > 0 && pl.tile == 1 && double(l0.bytes) + double(pl.const_bytes) > double(cap))
            throw LimitError("plan: the working memory of one image (" + gib(double(l0.bytes)) +
                             ", with the grouped/transposed convolutions' scratch) is beyond the limit of " +
                             gib(double(cap)) + " per plan (DEEPTAYLOR_MAX_PLAN_BYTES)");
    }

    int64_t arena_bytes() const override { return layout(0, 1, false).bytes; }
    int64_t passes(int64_t K) const override { return passes_for(K, 0); }
    int64_t arena_bytes(int64_t K) const override {
        const int64_t P = passes_for(K, 0);
        return layout(0, P, P < K).bytes;
    }

    const char* name() const override { return "cpu"; }

    RunStatus run(const RunArgs& args) const override {
        const Plan& pl = *plan_;
        const int64_t N = args.N;
        RunStatus status;
        if (N <= 0) return status;
        const int threads = args.threads > 0 ? args.threads : default_threads();
        const int64_t Ts = std::min(pl.tile, N);
        const int64_t G = group_rows(N, threads);
        const int64_t ngroups = (N + G - 1) / G;
        // the larger layout only where it differs: GradientXInput with per-layer outputs
        const int lk = pl.mode == Mode::GradientXInput && !args.layers.empty() ? 1 : 0;
        // K passes per sample in rounds of P (one forward pass per group for all of them)
        const int64_t K = args.forward_only ? 1 : std::max<int64_t>(1, args.K);
        const int64_t P = passes_for(K, lk);
        const Layout& lo = layout(lk, P, P < K);
        RunState st;
        if (args.interrupted) st.poll_fn = &args.interrupted;
        const bool par = ngroups >= threads && threads > 1;
        try {
            // Arenas are taken here, before any parallel region, so a failed allocation raises
            // normally; whatever throws inside the region is caught there and rethrown below.
            Arenas arenas(*this, lo, par ? threads : 1);
            if (par) {
                // Enough groups for every thread: parallelise over them, single-threaded GEMMs.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
                for (int64_t k = 0; k < ngroups; ++k) {
                    if (st.stopped()) continue;
                    int tid = 0;
#ifdef _OPENMP
                    tid = omp_get_thread_num();
#endif
                    try {
                        run_group(args, k * G, std::min(G, N - k * G), Ts, arenas[tid], lo.lay, P, 1, st);
                    } catch (...) {
                        st.fail(std::current_exception());
                    }
                }
            } else {
                // Few groups: one at a time, the threads work inside each GEMM.
                for (int64_t k = 0; k < ngroups && !st.stopped(); ++k)
                    run_group(args, k * G, std::min(G, N - k * G), Ts, arenas[0], lo.lay, P, threads, st);
            }
            if (st.error) std::rethrow_exception(st.error);
        } catch (const std::bad_alloc&) {
            throw OutOfMemory("cpu engine: out of memory running " + std::to_string(N) + " image(s) on " +
                              std::to_string(par ? threads : 1) + " arena(s) of " +
                              gib(double(lo.bytes)) + " each (pass batch_size=... or fewer threads)");
        }
        status.nonfinite_op = st.fwd.load();
        status.nonfinite_rel = st.rel.load();
        status.interrupted = st.interrupted;
        return status;
    }

    // Images per group for a call: whole tiles, at most the plan's group, and as evenly spread over
    // the threads as the tiles allow (the groups of a thread hold about as many tiles as the plain
    // tiles would give it). Tile boundaries are multiples of the tile whatever the group, and a
    // head product's rows do not depend on how many rows it has, so results do not depend on the
    // group size (nor on the thread count).
    int64_t group_rows(int64_t N, int threads) const {
        const Plan& pl = *plan_;
        const int64_t T = pl.tile;
        if (pl.group <= T || N <= T) return std::min(T, N);
        const int64_t tiles = (N + T - 1) / T;
        const int64_t per_thread = (tiles + threads - 1) / threads;  // tiles per thread
        const int64_t gmax = pl.group / T;                              // tiles per group at most
        const int64_t rounds = (per_thread + gmax - 1) / gmax;         // groups per thread
        return T * ((per_thread + rounds - 1) / rounds);
    }

private:
    std::shared_ptr<const Plan> plan_;
    std::vector<Packs> packs_;
#if DT_HAVE_GENERIC
    std::vector<std::unique_ptr<GenericLinear>> gen_;
#endif
    int64_t gscr_ = 0;     // generic-linear scratch floats per arena

    // Liveness layouts, made on first use and kept: by (kind, passes per round, several rounds);
    // kind 1 is GradientXInput with per-layer outputs. Each keeps a pool of arenas of its layout.
    //
    // Arenas (one full tile each) are kept for the next call instead of being allocated, page-
    // faulted and zeroed on every call: for a small network that was ~10 % of a 256-image call, for
    // VGG-16 (183 MiB per arena) ~0.1 s. Concurrent calls take different arenas; the pool holds at
    // most (concurrent calls x threads) of them. Every pass writes what it reads (outputs are
    // written or zeroed first), so a reused arena gives the same results as a fresh one (tested).
    struct Layout {
        ArenaSizes lay;
        int64_t bytes = 0;  // one arena: the layout + the generic module's scratch
        std::vector<std::unique_ptr<Arena>> pool;
    };
    mutable std::mutex pool_mu_;
    mutable std::map<std::tuple<int, int64_t, bool>, std::unique_ptr<Layout>> layouts_;
    mutable std::map<std::pair<int, int64_t>, int64_t> passes_;  // (kind, K) -> passes per round

    int64_t layout_bytes(const ArenaSizes& z) const { return z.bytes() + gscr_ * static_cast<int64_t>(sizeof(float)); }

    const Layout& layout(int lk, int64_t P, bool rounds) const {
        const auto key = std::make_tuple(lk, P, rounds);
        {
            std::lock_guard<std::mutex> lock(pool_mu_);
            auto it = layouts_.find(key);
            if (it != layouts_.end()) return *it->second;
        }
        const Plan& pl = *plan_;
        auto l = std::make_unique<Layout>();
        l->lay = arena_sizes(pl, pl.tile, pl.group, lk == 1, P, rounds);
        l->bytes = layout_bytes(l->lay);
        std::lock_guard<std::mutex> lock(pool_mu_);
        auto& slot = layouts_[key];
        if (!slot) slot = std::move(l);  // a concurrent call may have made it first
        return *slot;
    }

    // Passes per round for K passes per sample: at most kMaxPasses, and as many as keep one arena
    // within pass_budget_bytes() or twice the single-pass arena, whichever is larger. Depends on the
    // plan, K and the budget only, never on the thread count or the batch.
    int64_t passes_for(int64_t K, int lk) const {
        if (K <= 1) return 1;
        const auto key = std::make_pair(lk, K);
        {
            std::lock_guard<std::mutex> lock(pool_mu_);
            auto it = passes_.find(key);
            if (it != passes_.end()) return it->second;
        }
        const Plan& pl = *plan_;
        const int64_t budget = std::max(pass_budget_bytes(), 2 * layout(lk, 1, false).bytes);
        int64_t P = std::min(K, kMaxPasses);
        while (P > 1 && layout_bytes(arena_sizes(pl, pl.tile, pl.group, lk == 1, P, P < K)) > budget) --P;
        std::lock_guard<std::mutex> lock(pool_mu_);
        passes_[key] = P;
        return P;
    }

    class Arenas {
    public:
        Arenas(const CpuExecutor& ex, const Layout& lo, int n) : ex_(ex), lo_(const_cast<Layout&>(lo)) {
            auto& pool = lo_.pool;
            {
                std::lock_guard<std::mutex> lock(ex_.pool_mu_);
                while (static_cast<int>(a_.size()) < n && !pool.empty()) {
                    a_.push_back(std::move(pool.back()));
                    pool.pop_back();
                }
            }
            // new arenas are zero-filled at once: more than the machine has available would meet the
            // OOM killer rather than std::bad_alloc (overcommit), so that is refused up front
            const int64_t fresh = n - static_cast<int>(a_.size());
            const int64_t bytes = lo_.bytes;
            const int64_t avail = available_memory_bytes();
            if (fresh > 0 && avail >= 0 && double(fresh) * double(bytes) > double(avail)) {
                std::lock_guard<std::mutex> lock(ex_.pool_mu_);
                for (auto& a : a_) pool.push_back(std::move(a));
                throw OutOfMemory("cpu engine: " + std::to_string(fresh) + " working arena(s) of " +
                                  gib(double(bytes)) + " each (one per thread) exceed the " + gib(double(avail)) +
                                  " of memory available: use fewer threads or a smaller input");
            }
            while (static_cast<int>(a_.size()) < n) a_.push_back(std::make_unique<Arena>(lo_.lay, ex_.gscr_));
        }
        ~Arenas() {
            std::lock_guard<std::mutex> lock(ex_.pool_mu_);
            for (auto& a : a_) lo_.pool.push_back(std::move(a));
        }
        Arenas(const Arenas&) = delete;
        Arenas& operator=(const Arenas&) = delete;
        Arena& operator[](int i) { return *a_[static_cast<size_t>(i)]; }

    private:
        const CpuExecutor& ex_;
        Layout& lo_;
        std::vector<std::unique_ptr<Arena>> a_;
    };

    // Write a tile's per-sample values v (T, shape, channels-last) to dst (N, shape) at row n0; with
    // K > 1, dst is (N, K, shape) and the values go to pass k of rows n0 .. n0 + T.
    static void write_user(const float* v, const Shape& s, float* dst, int64_t n0, int64_t T, int64_t K = 1,
                           int64_t k = 0) {
        if (K > 1) {
            for (int64_t t = 0; t < T; ++t)
                write_user(v + t * s.size(), s, dst + ((n0 + t) * K + k) * s.size(), 0, 1);
            return;
        }
        float* d = dst + n0 * s.size();
        if (s.permuted())
            nhwc_to_nchw(v, d, T, s.c, s.h, s.w);
        else
            std::memcpy(d, v, sizeof(float) * static_cast<size_t>(T * s.size()));
    }

    // ---- linear ops ------------------------------------------------------------------------
    // On the one-tile-at-a-time path (gth > 1) the work around the GEMMs is split too, so it does
    // not become the serial part: im2col and element-wise loops by rows (disjoint writes), col2im
    // by channel ranges (overlapping windows write the same pixels, never the same channel).
    // a (T, H, W, C) -> z (T, OH, OW, O) = conv/dense(a) + bias, block by block. Fused per block
    // while it is in cache: the bias is the GEMM's initial C (accumulate), and when a ReLU follows,
    // its output relu_out = max(z, 0) is written in the same sweep (the ReLU op is then skipped).
    // Returns true when z holds NaN/Inf (checked per block while it is in cache, before the ReLU).
    bool linear_forward(size_t i, const float* a, float* z, int64_t T, Arena& ar, int gth,
                        float* relu_out, bool reuse = false) const {
        bool bad = false;
        const OpSpec& op = plan_->ops[i];
        const Geom& g = op.g;
        const int64_t O = g.O, Kc = g.Kc(), rows = T * g.P(), RB = plan_->lin[i].chunk_rows;
        if (reuse && reuse_forward(i, a, z, T, ar, gth, bad)) {
            if (relu_out)
                split(rows, gth, [&](int64_t b, int64_t e) {
                    for (int64_t k = b * O; k < e * O; ++k) relu_out[k] = z[k] > 0.0f ? z[k] : 0.0f;
                });
            return bad;
        }
        for (int64_t r0 = 0; r0 < rows; r0 += RB) {
            const int64_t m = std::min(RB, rows - r0);
            float* zb = z + r0 * O;
            for (int64_t r = 0; r < m; ++r) std::memcpy(zb + r * O, op.bias.data(), sizeof(float) * O);
            sgemm_packed(m, im2col(a, g, r0, m, ar, gth), Kc, *packs_[i].fwd, zb, O, true, gth);
            bad = bad || has_nonfinite(zb, m * O);
            if (relu_out) {
                float* yb = relu_out + r0 * O;
                split(m, gth, [&](int64_t b, int64_t e) {
                    for (int64_t k = b * O; k < e * O; ++k) yb[k] = zb[k] > 0.0f ? zb[k] : 0.0f;
                });
            }
        }
        return bad;
    }

    // Row reuse (RunArgs::reuse_rows): z (T, OH, OW, O) = linear(a) + bias where output row r of sample
    // t is copied from the previous sample's row when the receptive field of r holds bitwise the same
    // input in both; the other rows are computed as usual, gathered. The previous sample of t = 0 is the
    // last one this arena computed for the op (Arena::last_in / last_out; none: all of t = 0 computed).
    // Exact: a row is one FMA chain per element over its own inputs, so equal inputs give equal bits.
    // Returns false (z untouched) when too few rows could be copied to pay for the gather; bad |= NaN/Inf
    // in z.
    bool reuse_forward(size_t i, const float* a, float* z, int64_t T, Arena& ar, int gth, bool& bad) const {
        const OpSpec& op = plan_->ops[i];
        const Geom& g = op.g;
        const int64_t O = g.O, Kc = g.Kc(), P = g.P(), rows = T * P, RB = plan_->lin[i].chunk_rows;
        const int64_t HW = g.H * g.W, C = g.C, insz = g.in_size();
        thread_local std::vector<uint8_t> need, diff, colhit;
        thread_local std::vector<int64_t> list;
        thread_local std::vector<float> zc, colbuf;
        if (ar.last_in.size() < plan_->ops.size()) {
            ar.last_in.resize(plan_->ops.size());
            ar.last_out.resize(plan_->ops.size());
        }
        std::vector<float>& last_in = ar.last_in[i];
        std::vector<float>& last_out = ar.last_out[i];
        const bool have_last = static_cast<int64_t>(last_in.size()) == insz &&
                               static_cast<int64_t>(last_out.size()) == P * O;
        need.assign(static_cast<size_t>(rows), 0);
        diff.resize(static_cast<size_t>(HW));
        colhit.resize(static_cast<size_t>(g.H * g.OW));
        int64_t count = 0;
        if (!have_last) {
            std::fill(need.begin(), need.begin() + P, uint8_t(1));
            count = P;
        }
        for (int64_t t = have_last ? 0 : 1; t < T; ++t) {
            const uint32_t* cur = reinterpret_cast<const uint32_t*>(a + t * insz);
            const uint32_t* prev = t > 0 ? cur - insz : reinterpret_cast<const uint32_t*>(last_in.data());
            bool any = false;
            for (int64_t q = 0; q < HW; ++q) {
                uint32_t d = 0;
                for (int64_t ch = 0; ch < C; ++ch) d |= cur[q * C + ch] ^ prev[q * C + ch];
                diff[static_cast<size_t>(q)] = d != 0;
                any = any || d != 0;
            }
            if (!any) continue;
            // dilate the changed pixels to the output pixels whose window holds one, separably:
            // along x into colhit (H, OW), then along y
            uint8_t* nd = need.data() + t * P;
            for (int64_t iy = 0; iy < g.H; ++iy) {
                const uint8_t* drow = diff.data() + iy * g.W;
                uint8_t* crow = colhit.data() + iy * g.OW;
                for (int64_t ox = 0; ox < g.OW; ++ox) {
                    uint8_t hit = 0;
                    for (int64_t kj = 0; kj < g.kw; ++kj) {
                        const int64_t ix = ox * g.sw - g.pl + kj * g.dw;
                        if (ix >= 0 && ix < g.W) hit |= drow[ix];
                    }
                    crow[ox] = hit;
                }
            }
            for (int64_t oy = 0; oy < g.OH; ++oy) {
                uint8_t* nrow = nd + oy * g.OW;
                std::memset(nrow, 0, static_cast<size_t>(g.OW));
                for (int64_t ki = 0; ki < g.kh; ++ki) {
                    const int64_t iy = oy * g.sh - g.pt + ki * g.dh;
                    if (iy < 0 || iy >= g.H) continue;
                    const uint8_t* crow = colhit.data() + iy * g.OW;
                    for (int64_t ox = 0; ox < g.OW; ++ox) nrow[ox] |= crow[ox];
                }
                for (int64_t ox = 0; ox < g.OW; ++ox) count += nrow[ox];
            }
        }
        if (count * 10 > rows * 9) return false;  // almost everything changed: the plain path
        list.clear();
        for (int64_t r = 0; r < rows; ++r)
            if (need[static_cast<size_t>(r)]) list.push_back(r);
        zc.resize(static_cast<size_t>(std::max<int64_t>(1, std::min(RB, count)) * O));
        colbuf.resize(static_cast<size_t>(std::max<int64_t>(1, std::min(RB, count)) * Kc));
        for (int64_t j0 = 0; j0 < count; j0 += RB) {
            const int64_t m = std::min(RB, count - j0);
            float* col = colbuf.data();
            // im2col of the listed rows, run by run of consecutive rows
            for (int64_t j = 0; j < m;) {
                int64_t e = j + 1;
                while (e < m && list[static_cast<size_t>(j0 + e)] == list[static_cast<size_t>(j0 + e - 1)] + 1) ++e;
                const int64_t r = list[static_cast<size_t>(j0 + j)];
                if (g.identity())
                    std::memcpy(col + j * Kc, a + r * Kc, sizeof(float) * static_cast<size_t>((e - j) * Kc));
                else
                    im2col_rows(a, g, r, r + (e - j), col + j * Kc);
                j = e;
            }
            for (int64_t j = 0; j < m; ++j) std::memcpy(zc.data() + j * O, op.bias.data(), sizeof(float) * O);
            sgemm_packed(m, col, Kc, *packs_[i].fwd, zc.data(), O, true, gth);
            bad = bad || has_nonfinite(zc.data(), m * O);
            for (int64_t j = 0; j < m; ++j)
                std::memcpy(z + list[static_cast<size_t>(j0 + j)] * O, zc.data() + j * O, sizeof(float) * O);
        }
        // in order: the previous sample's row is final (computed or copied) by now
        for (int64_t r = 0; r < rows; ++r)
            if (!need[static_cast<size_t>(r)]) {
                std::memcpy(z + r * O, r >= P ? z + (r - P) * O : last_out.data() + r * O, sizeof(float) * O);
                if (r < P) bad = bad || has_nonfinite(z + r * O, O);  // not checked in this call yet
            }
        last_in.assign(a + (T - 1) * insz, a + T * insz);
        last_out.assign(z + (T - 1) * P * O, z + T * P * O);
        return true;
    }

    // Rows [r0, r0 + m) of im2col(a) (a pointer into a itself when im2col is the identity).
    static const float* im2col(const float* a, const Geom& g, int64_t r0, int64_t m, Arena& ar, int gth) {
        if (g.identity()) return a + r0 * g.Kc();
        float* col = ar.col.data();
        split(m, gth, [&](int64_t b, int64_t e) { im2col_rows(a, g, r0 + b, r0 + e, col + b * g.Kc()); });
        return col;
    }

    static void col2im(const float* c, const Geom& g, int64_t r0, int64_t m, float* img, int gth) {
        split(g.C, gth, [&](int64_t c0, int64_t c1) { col2im_add_rows(c, g, r0, r0 + m, img, c0, c1); });
    }

    // ---- linear backward, several passes at once ---------------------------------------------
    // np passes (targets or seeds of the same images) share the op's input a and its stored output z:
    // per block of rows, the im2col block, the sign-split input and the rule's denominator GEMMs are
    // computed once; the passes' s blocks are stacked (up to a full block of rows) into one transpose
    // GEMM, then each pass is combined and scattered into its own Rin. A GEMM row does not depend on
    // the other rows, so a pass's result does not depend on what it is stacked with.

    // Rows of s the arena holds for one stacked transpose GEMM of width wO with a 2 Kc-wide output.
    static int64_t stack_rows(const Arena& ar, int64_t wO, int64_t Kc) {
        return std::min<int64_t>(static_cast<int64_t>(ar.s.size()) / std::max<int64_t>(wO, 1),
                                 static_cast<int64_t>(ar.ccol.size()) / std::max<int64_t>(2 * Kc, 1));
    }

    // Plain backward (gradients): gin_k (T, H, W, C) = L^T(gout_k; W) for every pass k < np.
    void linear_gradient(size_t i, const float* const* gout, float* const* gin, int64_t np, int64_t T, Arena& ar,
                         int gth) const {
        const Geom& g = plan_->ops[i].g;
        const int64_t O = g.O, Kc = g.Kc(), rows = T * g.P(), RB = plan_->lin[i].chunk_rows;
        const bool id = g.identity();
        if (!id)
            for (int64_t k = 0; k < np; ++k)
                std::memset(gin[k], 0, sizeof(float) * static_cast<size_t>(T * g.in_size()));
        const int64_t cap = stack_rows(ar, O, Kc);
        for (int64_t r0 = 0; r0 < rows; r0 += RB) {
            const int64_t m = std::min(RB, rows - r0);
            const int64_t kb = std::max<int64_t>(1, std::min<int64_t>(np, cap / m));
            for (int64_t k0 = 0; k0 < np; k0 += kb) {
                const int64_t nb = std::min(kb, np - k0);
                if (nb == 1) {  // one pass: straight from gout into gin (or the column block)
                    float* c = id ? gin[k0] + r0 * Kc : ar.ccol.data();
                    sgemm_packed_sparse_a(m, gout[k0] + r0 * O, O, *packs_[i].bwd, c, Kc, false, gth);
                    if (!id) col2im(c, g, r0, m, gin[k0], gth);
                    continue;
                }
                float* s = ar.s.data();
                for (int64_t kk = 0; kk < nb; ++kk)
                    std::memcpy(s + kk * m * O, gout[k0 + kk] + r0 * O, sizeof(float) * static_cast<size_t>(m * O));
                float* c = ar.ccol.data();
                sgemm_packed_sparse_a(nb * m, s, O, *packs_[i].bwd, c, Kc, false, gth);
                for (int64_t kk = 0; kk < nb; ++kk) {
                    const float* ck = c + kk * m * Kc;
                    if (id)
                        std::memcpy(gin[k0 + kk] + r0 * Kc, ck, sizeof(float) * static_cast<size_t>(m * Kc));
                    else
                        col2im(ck, g, r0, m, gin[k0 + kk], gth);
                }
            }
        }
    }

    // Relevance of a linear op under its rule, np passes: a (T,H,W,C) input, z (T,OH,OW,O) stored
    // output, R_k (T,OH,OW,O) relevance of the outputs in pass k -> Rin_k (T,H,W,C).
    void linear_relevance(size_t i, const float* a, const float* z, const float* const* Rs, float* const* Rins,
                          int64_t np, int64_t T, bool nonneg, Arena& ar, int gth) const {
        const OpSpec& op = plan_->ops[i];
        const LinearPrep& lp = plan_->lin[i];
        const Packs& pk = packs_[i];
        const Geom& g = op.g;
        const RuleSpec& rule = op.rule;
        const int64_t O = g.O, Kc = g.Kc(), P = g.P(), rows = T * P, RB = lp.chunk_rows;
        const bool id = g.identity();
        // Single-term rules (Z, Epsilon; the sign-split rules on inputs >= 0) behind a real im2col:
        // R_in = col2im(im2col(a) (.) c) = a (.) col2im(c), so c is scattered as it is and the input
        // multiplied once in image space (Kc / C times fewer multiplies; Z and Epsilon then need no
        // im2col of a at all).
        const bool zeps = rule.kind == RuleKind::Z || rule.kind == RuleKind::Epsilon;
        const bool sign_split = rule.kind == RuleKind::ZPlus || rule.kind == RuleKind::Gamma ||
                                rule.kind == RuleKind::AlphaBeta;
        const bool flat = rule.kind == RuleKind::WSquare || rule.kind == RuleKind::Flat;
        const bool img = !id && (zeps || (sign_split && nonneg));
        if (rule.kind == RuleKind::None) throw std::logic_error("linear op without a rule");
        if (!id)
            for (int64_t k = 0; k < np; ++k)
                std::memset(Rins[k], 0, sizeof(float) * static_cast<size_t>(T * g.in_size()));
        const int64_t wO = pk.width * O;
        const int64_t cap = stack_rows(ar, wO, Kc);
        auto rows_do = [&](int64_t n, auto&& f) { split(n, gth, f); };  // element-wise loop over rows [b, e)
        for (int64_t r0 = 0; r0 < rows; r0 += RB) {
            const int64_t m = std::min(RB, rows - r0);
            const int64_t mK = m * Kc;
            const float* colA = img && zeps ? nullptr : im2col(a, g, r0, m, ar, gth);
            const float* zr = z + r0 * O;
            // shared by the passes: the sign-split input and the denominators of the sign-split rules
            const float *cp = colA, *cn = nullptr;
            const float* den = ar.den.data();
            if (sign_split) {
                if (!nonneg) {
                    float *P_ = ar.colP.data(), *N_ = ar.colN.data();
                    rows_do(m, [&](int64_t b, int64_t e) {
                        for (int64_t k = b * Kc; k < e * Kc; ++k) {
                            P_[k] = colA[k] > 0.0f ? colA[k] : 0.0f;
                            N_[k] = colA[k] < 0.0f ? colA[k] : 0.0f;
                        }
                    });
                    cp = P_;
                    cn = N_;
                }
                float* d = ar.den.data();
                const bool has_bias = !lp.bias2.empty();
                if (has_bias)
                    for (int64_t r = 0; r < m; ++r) std::memcpy(d + r * wO, lp.bias2.data(), sizeof(float) * wO);
                sgemm_packed(m, cp, Kc, *pk.dP.p, d, wO, has_bias, gth, pk.dP.f);
                if (cn) sgemm_packed(m, cn, Kc, *pk.dQ.p, d, wO, true, gth, pk.dQ.f);
            }
            const int64_t kb = std::max<int64_t>(1, std::min<int64_t>(np, cap / m));
            for (int64_t k0 = 0; k0 < np; k0 += kb) {
                const int64_t nb = std::min(kb, np - k0);
                const int64_t M = nb * m;  // stacked rows: row q is row q % m of pass k0 + q / m
                float* s = ar.s.data();
                float* cc = ar.ccol.data();
                // w², flat on a Dense layer, one pass: the GEMM writes Rin's rows itself
                const bool direct = flat && id && nb == 1;
                switch (rule.kind) {
                    case RuleKind::Z:  // LRP-0, Bach et al. 2015: s = R / z (0 where z = 0)
                    case RuleKind::Epsilon: {  // LRP-eps, Bach et al. 2015: s = R / (z + eps sign z)
                        const bool eps = rule.kind == RuleKind::Epsilon;
                        rows_do(M, [&](int64_t b, int64_t e) {
                            // safe division for both (as the reference): Epsilon(0) passes nothing where
                            // z = 0 instead of NaN; for eps > 0 the denominator is never 0 (same values)
                            for (int64_t q = b; q < e; ++q) {
                                const int64_t r = q % m;
                                const float* Rr = Rs[k0 + q / m] + (r0 + r) * O;
                                const float* zz = zr + r * O;
                                float* sr = s + q * O;
                                for (int64_t o = 0; o < O; ++o)
                                    sr[o] = eps ? safe_div(Rr[o], zz[o] + (zz[o] >= 0.0f ? rule.eps : -rule.eps))
                                                : safe_div(Rr[o], zz[o]);
                            }
                        });
                        sgemm_packed_sparse_a(M, s, O, *pk.bwd, cc, Kc, false, gth);
                        break;
                    }
                    case RuleKind::ZPlus:       // z+, Montavon et al. 2017 (positive contributions)
                    case RuleKind::Gamma:       // LRP-gamma, Montavon et al. 2019 (Zennit's generalised form)
                    case RuleKind::AlphaBeta: {  // LRP-alpha-beta, Bach et al. 2015
                        rows_do(M, [&](int64_t b, int64_t e) {
                            for (int64_t q = b; q < e; ++q) {
                                const int64_t r = q % m;
                                const float* Rr = Rs[k0 + q / m] + (r0 + r) * O;
                                const float* d = den + r * wO;
                                float* sr = s + q * wO;
                                if (rule.kind == RuleKind::ZPlus) {
                                    safe_div_n(Rr, d, sr, O);
                                    continue;
                                }
                                for (int64_t o = 0; o < O; ++o) {
                                    const float rr = Rr[o];
                                    if (rule.kind == RuleKind::Gamma) {
                                        // z > 0: up-weighted positive contributions; z < 0: the negative
                                        const float zz = zr[r * O + o];
                                        sr[o] = safe_div(zz > 0.0f ? rr : 0.0f, d[o]);
                                        sr[O + o] = safe_div(zz < 0.0f ? rr : 0.0f, d[O + o]);
                                    } else {
                                        sr[o] = rule.alpha * safe_div(rr, d[o]);
                                        sr[O + o] = -rule.beta * safe_div(rr, d[O + o]);
                                    }
                                }
                            }
                        });
                        sgemm_packed_sparse_a(M, s, wO, *pk.tP.p, cc, Kc, false, gth, pk.tP.f);
                        if (cn) sgemm_packed_sparse_a(M, s, wO, *pk.tQ.p, cc + M * Kc, Kc, false, gth, pk.tQ.f);
                        break;
                    }
                    case RuleKind::WSquare:  // w², Montavon et al. 2017: s = R / L(1; W²) (constant)
                    case RuleKind::Flat: {   // flat, Lapuschkin et al. 2019: s = R / L(1; 1)
                        rows_do(M, [&](int64_t b, int64_t e) {
                            for (int64_t q = b; q < e; ++q) {
                                const int64_t r = q % m;
                                const float* Rr = Rs[k0 + q / m] + (r0 + r) * O;
                                const float* inv = lp.inv_den.data() + ((r0 + r) % P) * O;
                                for (int64_t o = 0; o < O; ++o) s[q * O + o] = Rr[o] * inv[o];
                            }
                        });
                        sgemm_packed_sparse_a(M, s, O, *pk.tP.p, direct ? Rins[k0] + r0 * Kc : cc, Kc, false, gth);
                        break;
                    }
                    case RuleKind::ZBox: {  // zB, Montavon et al. 2017: z = L(a;W) - L(l;W+) - L(h;W-)
                        rows_do(M, [&](int64_t b, int64_t e) {
                            for (int64_t q = b; q < e; ++q) {
                                const int64_t r = q % m;
                                const float* Rr = Rs[k0 + q / m] + (r0 + r) * O;
                                const float* cb = lp.zb_const.data() + ((r0 + r) % P) * O;
                                safe_div_diff_n(Rr, zr + r * O, cb, s + q * O, O);
                            }
                        });
                        // R_in = a (.) (s W^T) - l (.) (s W+^T) - h (.) (s W-^T)
                        //      = (a - l) (.) (s W+^T) + (a - h) (.) (s W-^T)   (W = W+ + W-)
                        sgemm_packed_sparse_a(M, s, O, *pk.tP.p, cc, 2 * Kc, false, gth, BFilter::Pos);
                        sgemm_packed_sparse_a(M, s, O, *pk.tQ.p, cc + Kc, 2 * Kc, false, gth, BFilter::Neg);
                        break;
                    }
                    case RuleKind::None:
                        break;
                }
                if (direct) continue;
                // per pass: combine in column space, scatter into its Rin
                for (int64_t kk = 0; kk < nb; ++kk) {
                    float* Rin = Rins[k0 + kk];
                    float* comb = id ? Rin + r0 * Kc : ar.comb.data();
                    const float* ck = cc + kk * mK;
                    const float* src = comb;
                    if (zeps) {
                        if (img)
                            src = ck;  // a (.) after col2im
                        else
                            rows_do(m, [&](int64_t b, int64_t e) {
                                for (int64_t k = b * Kc; k < e * Kc; ++k) comb[k] = colA[k] * ck[k];
                            });
                    } else if (sign_split) {
                        const float* ck2 = cc + M * Kc + kk * mK;
                        if (img)
                            src = ck;  // nonneg: cp is a itself; a (.) after col2im
                        else
                            rows_do(m, [&](int64_t b, int64_t e) {
                                if (cn)
                                    for (int64_t k = b * Kc; k < e * Kc; ++k) comb[k] = cp[k] * ck[k] + cn[k] * ck2[k];
                                else
                                    for (int64_t k = b * Kc; k < e * Kc; ++k) comb[k] = cp[k] * ck[k];
                            });
                    } else if (flat) {
                        src = ck;
                    } else {  // ZBox
                        const float* c2b = cc + kk * m * 2 * Kc;
                        rows_do(m, [&](int64_t b, int64_t e) {
                            for (int64_t r = b; r < e; ++r) {
                                const int64_t p = (r0 + r) % P;
                                const float* lo = lp.lo_col.data() + p * Kc;
                                const float* hi = lp.hi_col.data() + p * Kc;
                                const float* c2 = c2b + r * 2 * Kc;
                                const float* ar_ = colA + r * Kc;
                                float* out = comb + r * Kc;
                                for (int64_t k = 0; k < Kc; ++k)
                                    out[k] = (ar_[k] - lo[k]) * c2[k] + (ar_[k] - hi[k]) * c2[Kc + k];
                            }
                        });
                    }
                    if (id) {
                        if (src != comb) std::memcpy(comb, src, sizeof(float) * static_cast<size_t>(mK));
                    } else {
                        col2im(src, g, r0, m, Rin, gth);
                    }
                }
            }
        }
        if (img)
            for (int64_t k = 0; k < np; ++k) {
                float* Rin = Rins[k];
                split(T * g.in_size(), gth, [&](int64_t b, int64_t e) {
                    for (int64_t q = b; q < e; ++q) Rin[q] *= a[q];
                });
            }
    }

    // ---- buffers of a call ------------------------------------------------------------------
    // A group of Tg images from n0; a value's buffers are at the layout's offsets in the slab, each
    // tile at its image offset `off` when the buffer is sized for the group (else at 0). A round of
    // np relevance passes (passes k0 .. k0 + np of the call's K) holds np copies of every relevance
    // buffer, pass kk at kk times the rows of the call (Tg for a group-sized buffer, else the tile's).
    struct Ctx {
        const RunArgs& args;
        int64_t n0;
        Arena& ar;
        const ArenaSizes& lay;
        int gth;
        RunState& st;
        int64_t Tg = 0;  // images of the group
        int64_t k0 = 0;  // first pass of the round
        int64_t np = 1;  // passes in the round
    };

    int64_t vsize(int64_t v) const { return plan_->values[static_cast<size_t>(v)].size(); }

    float* act(const Ctx& c, int64_t v, int64_t off) const {
        if (c.lay.act_off[v] < 0)  // the network input, read in place from the caller's array
            return const_cast<float*>(c.args.x) + (c.n0 + off) * plan_->input.size();
        return c.ar.slab.data() + c.lay.act_off[v] + (c.lay.act_g[v] ? off : 0) * vsize(v);
    }
    // relevance of value v for pass kk of the round, tile of T images at offset off
    float* rel(const Ctx& c, int64_t v, int64_t off, int64_t T, int64_t kk) const {
        const bool g = c.lay.rel_g[v];
        return c.ar.slab.data() + c.lay.rel_off[v] + (kk * (g ? c.Tg : T) + (g ? off : 0)) * vsize(v);
    }
    int32_t* argp(const Ctx& c, size_t i, int64_t off) const {
        return reinterpret_cast<int32_t*>(c.ar.slab.data() + c.lay.arg_off[i]) +
               (c.lay.arg_g[i] ? off : 0) * plan_->ops[i].out.size();
    }

    // ---- one group of tiles ----------------------------------------------------------------
    // Tg images from n0: the ops before the head run tile by tile (Ts images each), each tile's
    // activations kept at its offset in the group-sized buffers; the head (ops [head, L)) runs once
    // on all Tg images, forward and backward; then each tile runs its backward pass from the head's
    // input relevance. Without a head (head == L) a group is one tile.
    void run_group(const RunArgs& args, int64_t n0, int64_t Tg, int64_t Ts, Arena& ar, const ArenaSizes& lay,
                   int64_t P, int gth, RunState& st) const {
        const Plan& pl = *plan_;
        const size_t L = pl.ops.size();
        const size_t h = std::min(pl.head, L);
        Ctx c{args, n0, ar, lay, gth, st, Tg, 0, 1};
        const int64_t ntile = (Tg + Ts - 1) / Ts;
        if (h >= L && ntile > 1) throw std::logic_error("a group of several tiles without a head");
        const Shape& in = pl.input;
        for (int64_t j = 0; j < ntile; ++j) {
            const int64_t off = j * Ts, nT = std::min(Ts, Tg - off);
            if (lay.act_off[0] >= 0) nchw_to_nhwc(args.x + (n0 + off) * in.size(), act(c, 0, off), nT, in.c, in.h, in.w);
            forward_range(0, h, off, nT, c);
        }
        if (h < L) forward_range(h, L, 0, Tg, c);
        if (st.stopped()) return;
        const float* y = act(c, static_cast<int64_t>(L), 0);
        write_user(y, pl.values[L], args.output, n0, Tg);
        if (args.forward_only) return;
        const int64_t K = std::max<int64_t>(1, args.K);
        const size_t top = h < L ? h : 0;
        // the relevance pass is skipped once the forward is known to be non-finite (an error follows)
        const bool check_rel = st.fwd.load(std::memory_order_relaxed) < 0;
        // rounds of up to P passes, each one backward pass over the activations of the forward above
        for (int64_t k0 = 0; k0 < K; k0 += P) {
            c.k0 = k0;
            c.np = std::min(P, K - k0);
            seed_round(c, y);
            for (int64_t kk = 0; kk < c.np; ++kk)
                for (size_t v = 0; v < L; ++v)  // values nothing reads (dead branches) get no relevance
                    if (pl.consumers[v].empty())
                        std::memset(rel(c, static_cast<int64_t>(v), 0, Tg, kk), 0,
                                    sizeof(float) * static_cast<size_t>(Tg * vsize(static_cast<int64_t>(v))));
            for (size_t i = L; i-- > top;) {
                if (st.stopped()) return;
                backward_step(i, 0, Tg, c, check_rel);
            }
            if (top == 0) {
                finish(0, Tg, c, check_rel);
                continue;
            }
            for (int64_t j = 0; j < ntile; ++j) {
                const int64_t off = j * Ts, nT = std::min(Ts, Tg - off);
                for (size_t i = h; i-- > 0;) {
                    if (st.stopped()) return;
                    backward_step(i, off, nT, c, check_rel);
                }
                finish(off, nT, c, check_rel);
            }
        }
    }

    // The starting relevance (or gradient) of the round's passes at the network output: one-hot at
    // the pass's target (times the output for the rules), or the caller's seed (times the output
    // with seed_times_output). Targets and seeds index the output in the user's C-order.
    void seed_round(const Ctx& c, const float* y) const {
        const Plan& pl = *plan_;
        const RunArgs& args = c.args;
        const int64_t L = static_cast<int64_t>(pl.ops.size());
        const Shape& os = pl.values[static_cast<size_t>(L)];
        const int64_t F = os.size(), K = std::max<int64_t>(1, args.K), Tg = c.Tg;
        const bool perm = os.permuted();
        const int64_t HW = os.pixels(), C = os.c;
        auto cl = [&](int64_t j) { return perm ? (j % HW) * C + j / HW : j; };  // user index -> channels-last
        std::vector<int64_t> order;
        for (int64_t n = 0; n < Tg; ++n) {
            const int64_t gn = c.n0 + n;
            const float* yn = y + n * F;
            if (!args.seed && !args.targets && K > 1) {
                // the K largest outputs, largest first, ties to the lower index (a stable sort). NaN
                // (a non-finite forward, reported after the run) counts as -inf: a strict total order.
                order.resize(static_cast<size_t>(F));
                for (int64_t j = 0; j < F; ++j) order[static_cast<size_t>(j)] = j;
                auto key = [&](int64_t j) {
                    const float v = yn[cl(j)];
                    return v != v ? -std::numeric_limits<float>::infinity() : v;
                };
                std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int64_t p, int64_t q) {
                    const float a = key(p), b = key(q);
                    return a > b || (a == b && p < q);
                });
            }
            for (int64_t kk = 0; kk < c.np; ++kk) {
                const int64_t kg = c.k0 + kk;
                float* R = rel(c, L, 0, Tg, kk) + n * F;
                if (args.seed) {
                    const float* sd = args.seed + (gn * K + kg) * F;
                    for (int64_t j = 0; j < F; ++j) {
                        const int64_t q = cl(j);
                        R[q] = args.seed_times_output ? sd[j] * yn[q] : sd[j];
                    }
                    continue;
                }
                std::memset(R, 0, sizeof(float) * static_cast<size_t>(F));
                int64_t t = 0;
                if (args.targets) {
                    t = args.targets[gn * K + kg];
                } else if (K > 1) {
                    t = order[static_cast<size_t>(kg)];
                } else {
                    for (int64_t j = 1; j < F; ++j)
                        if (yn[cl(j)] > yn[cl(t)]) t = j;  // first maximum, as np.argmax
                }
                const int64_t q = cl(t);
                R[q] = pl.mode == Mode::Rules ? yn[q] : 1.0f;
            }
        }
    }

    // What a backward step hands out for value v, pass kk of the round: R itself, or g^2 / g (.) a
    // for the gradient methods; into dst (N, K, shape of v) at pass k0 + kk.
    void emit(int64_t v, int64_t off, int64_t T, float* dst, const Ctx& c, int64_t kk) const {
        const Plan& pl = *plan_;
        const Shape& s = pl.values[static_cast<size_t>(v)];
        const float* gr = rel(c, v, off, T, kk);
        const int64_t n = c.n0 + off;
        const int64_t K = std::max<int64_t>(1, c.args.K), kg = c.k0 + kk;
        if (pl.mode == Mode::Rules || pl.mode == Mode::Gradient) {
            write_user(gr, s, dst, n, T, K, kg);
            return;
        }
        // straight into the caller's array when no layout permutation is needed
        const bool direct = !s.permuted() && K == 1;
        float* out = direct ? dst + n * s.size() : c.ar.tmp2.data();
        if (pl.mode == Mode::Sensitivity) {
            for (int64_t k = 0; k < T * s.size(); ++k) out[k] = gr[k] * gr[k];
        } else {
            const float* a = act(c, v, off);
            for (int64_t k = 0; k < T * s.size(); ++k) out[k] = gr[k] * a[k];
        }
        if (!direct) write_user(out, s, dst, n, T, K, kg);
    }

    void finish(int64_t off, int64_t T, const Ctx& c, bool check_rel) const {
        for (int64_t kk = 0; kk < c.np; ++kk) {
            if (check_rel && has_nonfinite(rel(c, 0, off, T, kk), T * vsize(0))) c.st.flag_rel(0);
            emit(0, off, T, c.args.relevance, c, kk);
            if (!c.args.layers.empty()) emit(0, off, T, c.args.layers[0], c, kk);
        }
    }

    // Forward ops [i0, i1) on T images at image offset off. A linear op (or Add) followed by a ReLU
    // that alone reads it (within the range) writes both outputs in one sweep.
    void forward_range(size_t i0, size_t i1, int64_t off, int64_t T, const Ctx& c) const {
        const Plan& pl = *plan_;
        for (size_t i = i0; i < i1; ++i) {
            if (c.st.stopped()) return;
            const bool fuse = pl.fuse_relu[i] && i + 1 < i1;
            if (forward_op(i, off, T, c, fuse ? act(c, static_cast<int64_t>(i + 2), off) : nullptr))
                c.st.flag_fwd(static_cast<int64_t>(i));
            if (fuse) ++i;
        }
    }

    // Returns true when the op's output (before a fused ReLU) holds NaN/Inf. Ops that only move or
    // select values (Flatten, Concat, Slice, Upsample, ChannelShuffle, max pooling, ReLU) cannot
    // create them from finite inputs and are not checked.
    bool forward_op(size_t i, int64_t off, int64_t T, const Ctx& c, float* relu_out) const {
        const OpSpec& op = plan_->ops[i];
        const Geom& g = op.g;
        Arena& ar = c.ar;
        const int gth = c.gth;
        float* out = act(c, static_cast<int64_t>(i + 1), off);
        const float* a = act(c, op.inputs[0], off);
        const int64_t nin = T * op.in.size(), nout = T * op.out.size();
        switch (op.kind) {
            case OpKind::Dense:
            case OpKind::Conv2d:
            case OpKind::ConvTranspose2d:
                if (generic_op(op)) {
#if DT_HAVE_GENERIC
                    generic_forward(*gen_[i], a, out, T, ar.gscr.data(), gth);
#endif
                    break;
                }
                return linear_forward(i, a, out, T, ar, gth, relu_out, c.args.forward_only && c.args.reuse_rows);
            case OpKind::ReLU:
                for (int64_t k = 0; k < nin; ++k) out[k] = a[k] > 0.0f ? a[k] : 0.0f;
                return false;
            case OpKind::MaxPool:
                maxpool_forward(a, g, T, out, argp(c, i, off));
                break;
            case OpKind::AvgPool: {
                window_sum(a, g, T, out);
                if (op.inv_count.empty()) {
                    const float inv = 1.0f / static_cast<float>(g.kh * g.kw);
                    for (int64_t k = 0; k < nout; ++k) out[k] *= inv;
                } else {
                    const int64_t P = g.P(), C = g.C;
                    for (int64_t r = 0; r < T * P; ++r) {
                        const float inv = op.inv_count[static_cast<size_t>(r % P)];
                        for (int64_t ch = 0; ch < C; ++ch) out[r * C + ch] *= inv;
                    }
                }
                break;
            }
            case OpKind::SumPool:
                window_sum(a, g, T, out);
                break;
            case OpKind::GlobalSum: {
                const int64_t F = op.in.size();
                for (int64_t n = 0; n < T; ++n) {
                    double acc = 0.0;
                    for (int64_t k = 0; k < F; ++k) acc += a[n * F + k];
                    out[n] = static_cast<float>(acc);
                }
                break;
            }
            case OpKind::LpPool:
                lp_forward(op, a, T, out);
                break;
            case OpKind::Flatten:
                if (op.in.permuted())
                    nhwc_to_nchw(a, out, T, op.in.c, op.in.h, op.in.w);
                else if (out != a)
                    std::memcpy(out, a, sizeof(float) * static_cast<size_t>(nin));
                break;
            case OpKind::Add: {
                const size_t m = op.inputs.size();
                const float* b = act(c, op.inputs[1], off);
                for (int64_t k = 0; k < nout; ++k) out[k] = a[k] + b[k];
                for (size_t q = 2; q < m; ++q) {
                    const float* e = act(c, op.inputs[q], off);
                    for (int64_t k = 0; k < nout; ++k) out[k] += e[k];
                }
                const bool bad = has_nonfinite(out, nout);  // before the fused ReLU hides it
                if (relu_out)
                    for (int64_t k = 0; k < nout; ++k) relu_out[k] = out[k] > 0.0f ? out[k] : 0.0f;
                return bad;
            }
            case OpKind::Concat: {
                const int64_t P = op.out.pixels(), OC = op.out.c;
                int64_t c0 = 0;
                for (size_t q = 0; q < op.inputs.size(); ++q) {
                    const int64_t C = op.in_shapes[q].c;
                    channel_copy(act(c, op.inputs[q], off), C, 0, out, OC, c0, C, T * P, false);
                    c0 += C;
                }
                break;
            }
            case OpKind::Slice:
                channel_copy(a, op.in.c, op.start, out, op.out.c, 0, op.out.c, T * op.in.pixels(), false);
                break;
            case OpKind::Mul: {
                const float* gate = act(c, op.inputs[1], off);
                if (op.in_shapes[1] == op.out) {
                    for (int64_t k = 0; k < nout; ++k) out[k] = a[k] * gate[k];
                } else {  // (C, 1, 1) gate broadcast over the pixels
                    const int64_t C = op.out.c, P = op.out.pixels();
                    for (int64_t n = 0; n < T; ++n)
                        for (int64_t p = 0; p < P; ++p)
                            for (int64_t ch = 0; ch < C; ++ch)
                                out[(n * P + p) * C + ch] = a[(n * P + p) * C + ch] * gate[n * C + ch];
                }
                break;
            }
            case OpKind::BatchNorm: {
                const int64_t C = op.in.c;
                for (int64_t k = 0; k < nin; ++k) out[k] = bn(op, a[k], k % C);
                break;
            }
            case OpKind::Activation:
                act_forward(op.act, op.param, a, out, nin);
                break;
            case OpKind::AdaptiveAvgPool:
                adaptive_sum(a, op.in, op.out, op.rows.data(), op.cols.data(), T, out, true);
                break;
            case OpKind::GlobalAvgPool:
                global_sum(a, op.in, T, out, true);
                break;
            case OpKind::Upsample:
                upsample_forward(a, op.in, op.up_h, op.up_w, T, out);
                break;
            case OpKind::ChannelShuffle:
                shuffle_forward(a, op.in.c, op.groups, T * op.in.pixels(), out);
                break;
        }
        switch (op.kind) {
            case OpKind::Flatten:
            case OpKind::Concat:
            case OpKind::Slice:
            case OpKind::Upsample:
            case OpKind::ChannelShuffle:
            case OpKind::MaxPool:
                return false;
            default:
                return has_nonfinite(out, nout);
        }
    }

    // LpPool, y = (sum_window |a|^p)^(1/p), computed as m (sum (|a| / m)^p)^(1/p) with m the window's
    // largest |a| (in double): no term overflows and the largest is 1, so a large p neither
    // underflows to 0 nor overflows (LpPool(200) on 0.5 was 0). Channels-last, no padding.
    static void lp_forward(const OpSpec& op, const float* a, int64_t T, float* out) {
        const double p = op.p, ip = 1.0 / p;
        if (op.global) {
            const int64_t F = op.in.size();
            for (int64_t n = 0; n < T; ++n) {
                const float* x = a + n * F;
                double m = 0.0;
                for (int64_t k = 0; k < F; ++k) m = std::max(m, static_cast<double>(std::fabs(x[k])));
                double acc = 0.0;
                if (m > 0.0)
                    for (int64_t k = 0; k < F; ++k) acc += std::pow(std::fabs(x[k]) / m, p);
                out[n] = static_cast<float>(m > 0.0 ? m * std::pow(acc, ip) : 0.0);
            }
            return;
        }
        const Geom& g = op.g;
        const int64_t C = g.C;
        std::vector<double> m(static_cast<size_t>(C)), acc(static_cast<size_t>(C));
        for (int64_t n = 0; n < T; ++n)
            for (int64_t oh = 0; oh < g.OH; ++oh)
                for (int64_t ow = 0; ow < g.OW; ++ow) {
                    std::fill(m.begin(), m.end(), 0.0);
                    std::fill(acc.begin(), acc.end(), 0.0);
                    for (int pass = 0; pass < 2; ++pass)
                        for (int64_t i = 0; i < g.kh; ++i)
                            for (int64_t j = 0; j < g.kw; ++j) {
                                const float* x = a + ((n * g.H + oh * g.sh + i) * g.W + ow * g.sw + j) * C;
                                if (pass == 0)
                                    for (int64_t ch = 0; ch < C; ++ch)
                                        m[ch] = std::max(m[ch], static_cast<double>(std::fabs(x[ch])));
                                else
                                    for (int64_t ch = 0; ch < C; ++ch)
                                        if (m[ch] > 0.0) acc[ch] += std::pow(std::fabs(x[ch]) / m[ch], p);
                            }
                    float* y = out + ((n * g.OH + oh) * g.OW + ow) * C;
                    for (int64_t ch = 0; ch < C; ++ch)
                        y[ch] = static_cast<float>(m[ch] > 0.0 ? m[ch] * std::pow(acc[ch], ip) : 0.0);
                }
    }

    // LpPool gradient: d y_j / d a_i = sign(a_i) (|a_i| / y_j)^(p-1) over the windows j holding i
    // (0 where y_j = 0), the ratio taken first so that neither power underflows.
    static void lp_gradient(const OpSpec& op, const float* a, const float* y, const float* G, int64_t T,
                            float* out) {
        const double pm1 = static_cast<double>(op.p) - 1.0;
        auto term = [&](float x, double yy, double gy) {
            if (yy == 0.0 || x == 0.0f) return 0.0;
            const double r = std::pow(std::fabs(static_cast<double>(x)) / yy, pm1) * gy;
            return x > 0.0f ? r : -r;
        };
        if (op.global) {
            const int64_t F = op.in.size();
            for (int64_t n = 0; n < T; ++n)
                for (int64_t k = 0; k < F; ++k) out[n * F + k] = static_cast<float>(term(a[n * F + k], y[n], G[n]));
            return;
        }
        const Geom& g = op.g;
        const int64_t C = g.C;
        std::memset(out, 0, sizeof(float) * static_cast<size_t>(T * g.in_size()));
        for (int64_t n = 0; n < T; ++n)
            for (int64_t oh = 0; oh < g.OH; ++oh)
                for (int64_t ow = 0; ow < g.OW; ++ow) {
                    const int64_t o = ((n * g.OH + oh) * g.OW + ow) * C;
                    for (int64_t i = 0; i < g.kh; ++i)
                        for (int64_t j = 0; j < g.kw; ++j) {
                            const int64_t q = ((n * g.H + oh * g.sh + i) * g.W + ow * g.sw + j) * C;
                            for (int64_t ch = 0; ch < C; ++ch)
                                out[q + ch] += static_cast<float>(term(a[q + ch], y[o + ch], G[o + ch]));
                        }
                }
    }

    static inline float bn(const OpSpec& op, float x, int64_t ch) { return x * op.scale[ch] + op.shift[ch]; }

    // (T, H, W, C) -> (T, C): per-channel sums over the pixels (mean: divided by H W)
    static void global_sum(const float* a, const Shape& in, int64_t T, float* out, bool mean) {
        const int64_t C = in.c, P = in.pixels();
        std::vector<double> acc(static_cast<size_t>(C));
        for (int64_t n = 0; n < T; ++n) {
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t p = 0; p < P; ++p)
                for (int64_t ch = 0; ch < C; ++ch) acc[ch] += a[(n * P + p) * C + ch];
            for (int64_t ch = 0; ch < C; ++ch)
                out[n * C + ch] = static_cast<float>(mean ? acc[ch] / static_cast<double>(P) : acc[ch]);
        }
    }

    static void add_into(float* dst, const float* src, int64_t n) {
        for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
    }
    // dst (=|+=) src: a relevance (or gradient) passed through unchanged
    static void pass_into(float* dst, const float* src, int64_t n, bool first) {
        if (!first)
            add_into(dst, src, n);
        else if (dst != src)
            std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
    }

    // Backward of op i on T images at offset off: emits the (now complete) relevance of its output
    // when asked, then writes (first writer) or adds its inputs' relevances (gradients).
    // All passes of the round: a (non-generic) linear op runs them together, sharing its im2col
    // blocks and denominators (linear_relevance); every other op runs them one after another.
    void backward_step(size_t i, int64_t off, int64_t T, const Ctx& c, bool check_rel) const {
        const Plan& pl = *plan_;
        const OpSpec& op = pl.ops[i];
        const int64_t vo = static_cast<int64_t>(i + 1);
        // the relevance of op i's output is complete here. Checked only when it is handed out (per-
        // layer outputs): inside the pass NaN/Inf propagates to the input (every backward step
        // multiplies or adds it) except where a selection by forward values (a ReLU's gradient mask,
        // Gamma's sign of z, max-pool losers) zeroes it, and the float64 reference zeroes the same
        // positions, so only the input's relevance (finish) needs the check.
        for (int64_t kk = 0; kk < c.np && !c.args.layers.empty(); ++kk) {
            if (check_rel && has_nonfinite(rel(c, vo, off, T, kk), T * op.out.size())) c.st.flag_rel(vo);
            emit(vo, off, T, c.args.layers[i + 1], c, kk);
        }
        if ((op.kind == OpKind::Dense || op.kind == OpKind::Conv2d) && !generic_op(op)) {
            const int64_t v = op.inputs[0];
            const bool first = pl.first_write[i][0];
            const int64_t nin = T * op.in.size();
            const float* a = act(c, v, off);
            const float* Rs[kMaxPasses];
            float* outs[kMaxPasses];
            for (int64_t kk = 0; kk < c.np; ++kk) {
                Rs[kk] = rel(c, vo, off, T, kk);
                outs[kk] = first ? rel(c, v, off, T, kk) : c.ar.acc.data() + kk * nin;
            }
            if (pl.mode == Mode::Rules) {
                bool nonneg = pl.nonneg_in[i];
                if (!nonneg && packs_[i].dP) {
                    // sign-split rules: when this tile's input happens to be >= 0 the a- terms are
                    // exactly zero, so skip them (same result, half the GEMMs)
                    nonneg = true;
                    for (int64_t k = 0; k < nin && nonneg; ++k) nonneg = a[k] >= 0.0f;
                }
                linear_relevance(i, a, act(c, vo, off), Rs, outs, c.np, T, nonneg, c.ar, c.gth);
            } else {
                linear_gradient(i, Rs, outs, c.np, T, c.ar, c.gth);
            }
            if (!first)
                for (int64_t kk = 0; kk < c.np; ++kk) add_into(rel(c, v, off, T, kk), outs[kk], nin);
            return;
        }
        for (int64_t kk = 0; kk < c.np; ++kk) backward_one(i, off, T, c, kk);
    }

    // Backward of op i for pass kk of the round: writes (first writer) or adds its inputs'
    // relevances (gradients).
    void backward_one(size_t i, int64_t off, int64_t T, const Ctx& c, int64_t kk) const {
        const Plan& pl = *plan_;
        const OpSpec& op = pl.ops[i];
        const bool rules = pl.mode == Mode::Rules;
        const float* R = rel(c, static_cast<int64_t>(i + 1), off, T, kk);
        const int64_t nout = T * op.out.size();
        switch (op.kind) {  // multi-input ops write / add per input
            case OpKind::Add: {
                const size_t m = op.inputs.size();
                if (!rules) {  // gradient: passed to every input
                    for (size_t q = 0; q < m; ++q)
                        pass_into(rel(c, op.inputs[q], off, T, kk), R, nout, pl.first_write[i][q]);
                    return;
                }
                // Zennit's Norm rule: s = R / (z + eps sgn z), sgn(0) = +1; R_k = a_k s
                float* sv = c.ar.tmp.data();
                const float* a0 = act(c, op.inputs[0], off);
                const float* a1 = act(c, op.inputs[1], off);
                for (int64_t k = 0; k < nout; ++k) sv[k] = a0[k] + a1[k];  // z, summed as the forward
                for (size_t q = 2; q < m; ++q) add_into(sv, act(c, op.inputs[q], off), nout);
                for (int64_t k = 0; k < nout; ++k) sv[k] = safe_div(R[k], sv[k] + (sv[k] >= 0.0f ? 1e-6f : -1e-6f));
                for (size_t q = 0; q < m; ++q) {
                    const float* a = act(c, op.inputs[q], off);
                    float* d = rel(c, op.inputs[q], off, T, kk);
                    if (pl.first_write[i][q])
                        for (int64_t k = 0; k < nout; ++k) d[k] = a[k] * sv[k];
                    else
                        for (int64_t k = 0; k < nout; ++k) d[k] += a[k] * sv[k];
                }
                return;
            }
            case OpKind::Concat: {
                const int64_t P = op.out.pixels(), OC = op.out.c;
                int64_t c0 = 0;
                for (size_t q = 0; q < op.inputs.size(); ++q) {
                    const int64_t C = op.in_shapes[q].c;
                    channel_copy(R, OC, c0, rel(c, op.inputs[q], off, T, kk), C, 0, C, T * P, !pl.first_write[i][q]);
                    c0 += C;
                }
                return;
            }
            case OpKind::Mul: {
                float* ds = rel(c, op.inputs[0], off, T, kk);
                float* dg = rel(c, op.inputs[1], off, T, kk);
                const bool fs = pl.first_write[i][0], fg = pl.first_write[i][1];
                const int64_t ng = T * op.in_shapes[1].size();
                const bool same = op.in_shapes[1] == op.out;
                if (rules) {  // the signal takes all of R, the gate none
                    pass_into(ds, R, nout, fs);
                    if (fg) std::memset(dg, 0, sizeof(float) * static_cast<size_t>(ng));
                    return;
                }
                const float* s = act(c, op.inputs[0], off);
                const float* gt = act(c, op.inputs[1], off);
                // the gate's gradient first: ds may be the buffer of an input the gate's formula reads
                // only if the values differ, so no aliasing concerns (relevances never alias activations)
                if (same) {
                    for (int64_t k = 0; k < nout; ++k) {
                        if (fg) dg[k] = R[k] * s[k]; else dg[k] += R[k] * s[k];
                    }
                    for (int64_t k = 0; k < nout; ++k) {
                        if (fs) ds[k] = R[k] * gt[k]; else ds[k] += R[k] * gt[k];
                    }
                } else {
                    const int64_t C = op.out.c, P = op.out.pixels();
                    std::vector<double> acc(static_cast<size_t>(C));
                    for (int64_t n = 0; n < T; ++n) {
                        std::fill(acc.begin(), acc.end(), 0.0);
                        for (int64_t p = 0; p < P; ++p)
                            for (int64_t ch = 0; ch < C; ++ch) {
                                const int64_t k = (n * P + p) * C + ch;
                                acc[ch] += static_cast<double>(R[k]) * s[k];
                            }
                        for (int64_t ch = 0; ch < C; ++ch) {
                            const float v = static_cast<float>(acc[ch]);
                            if (fg) dg[n * C + ch] = v; else dg[n * C + ch] += v;
                        }
                    }
                    for (int64_t n = 0; n < T; ++n)
                        for (int64_t p = 0; p < P; ++p)
                            for (int64_t ch = 0; ch < C; ++ch) {
                                const int64_t k = (n * P + p) * C + ch;
                                const float v = R[k] * gt[n * C + ch];
                                if (fs) ds[k] = v; else ds[k] += v;
                            }
                }
                return;
            }
            default:
                break;
        }
        // single-input ops
        const int64_t v = op.inputs[0];
        float* dst = rel(c, v, off, T, kk);
        const bool first = pl.first_write[i][0];
        const int64_t nin = T * op.in.size();
        const bool pass = (rules && (op.kind == OpKind::ReLU || op.kind == OpKind::Activation ||
                                     (op.kind == OpKind::BatchNorm && op.rule.kind == RuleKind::None))) ||
                          (op.kind == OpKind::Flatten && !op.in.permuted());
        if (pass) {  // relevance (or, for Flatten, the gradient) unchanged
            pass_into(dst, R, nin, first);
            return;
        }
        float* out = first ? dst : c.ar.acc.data();
        const float* a = act(c, v, off);
        const float* y = act(c, static_cast<int64_t>(i + 1), off);
        if (rules)
            relevance_op(i, a, y, R, out, T, c, off);
        else
            gradient_op(i, a, y, R, out, T, c, off);
        if (!first) add_into(dst, out, nin);
    }

    // Relevance through single-input op i: R (output relevance) -> out (input relevance, written).
    // out may be R itself for the element-wise ops.
    void relevance_op(size_t i, const float* a, const float* y, const float* R, float* out, int64_t T,
                      const Ctx& c, int64_t off) const {
        const OpSpec& op = plan_->ops[i];
        const Geom& g = op.g;
        Arena& ar = c.ar;
        const int gth = c.gth;
        const int64_t nin = T * op.in.size(), nout = T * op.out.size();
        switch (op.kind) {
            case OpKind::Dense:
            case OpKind::Conv2d:
            case OpKind::ConvTranspose2d: {
                if (generic_op(op)) {
#if DT_HAVE_GENERIC
                    generic_relevance(*gen_[i], a, y, R, out, T, ar.gscr.data(), gth);
#endif
                    return;
                }
                throw std::logic_error("relevance_op: linear ops run in backward_step");
            }
            case OpKind::MaxPool:  // winner-take-all
                maxpool_scatter(R, argp(c, i, off), g, T, out);
                return;
            case OpKind::AvgPool:
            case OpKind::SumPool:
            case OpKind::LpPool:
            case OpKind::GlobalSum: {
                // in proportion to the inputs: R_i = a_i sum_j R_j / (sum_{i' in j} a_i')
                if (op.kind == OpKind::GlobalSum || (op.kind == OpKind::LpPool && op.global)) {
                    const int64_t F = op.in.size();
                    for (int64_t n = 0; n < T; ++n) {
                        double acc = 0.0;
                        for (int64_t k = 0; k < F; ++k) acc += a[n * F + k];
                        const float sv = safe_div(R[n], static_cast<float>(acc));
                        for (int64_t k = 0; k < F; ++k) out[n * F + k] = a[n * F + k] * sv;
                    }
                } else {
                    float* z = ar.tmp.data();
                    window_sum(a, g, T, z);
                    for (int64_t k = 0; k < nout; ++k) z[k] = safe_div(R[k], z[k]);
                    window_scatter(z, g, T, out);
                    for (int64_t k = 0; k < nin; ++k) out[k] *= a[k];
                }
                return;
            }
            case OpKind::AdaptiveAvgPool: {
                float* z = ar.tmp.data();
                adaptive_sum(a, op.in, op.out, op.rows.data(), op.cols.data(), T, z, false);
                for (int64_t k = 0; k < nout; ++k) z[k] = safe_div(R[k], z[k]);
                adaptive_scatter(z, op.in, op.out, op.rows.data(), op.cols.data(), T, out, false);
                for (int64_t k = 0; k < nin; ++k) out[k] *= a[k];
                return;
            }
            case OpKind::GlobalAvgPool: {
                const int64_t C = op.in.c, P = op.in.pixels();
                float* z = ar.tmp.data();
                global_sum(a, op.in, T, z, false);
                for (int64_t k = 0; k < T * C; ++k) z[k] = safe_div(R[k], z[k]);
                for (int64_t n = 0; n < T; ++n)
                    for (int64_t p = 0; p < P; ++p)
                        for (int64_t ch = 0; ch < C; ++ch) {
                            const int64_t k = (n * P + p) * C + ch;
                            out[k] = a[k] * z[n * C + ch];
                        }
                return;
            }
            case OpKind::BatchNorm: {  // Epsilon / Z: a diagonal linear layer
                const int64_t C = op.in.c;
                const bool eps = op.rule.kind == RuleKind::Epsilon;
                const float e = op.rule.eps;
                for (int64_t k = 0; k < nin; ++k) {
                    const int64_t ch = k % C;
                    const float yy = bn(op, a[k], ch);
                    const float sv = safe_div(R[k], eps ? yy + (yy >= 0.0f ? e : -e) : yy);  // 0 where 0
                    out[k] = a[k] * op.scale[ch] * sv;
                }
                return;
            }
            case OpKind::Flatten:  // permuted (the unpermuted case passes through)
                nchw_to_nhwc(R, out, T, op.in.c, op.in.h, op.in.w);
                return;
            case OpKind::Upsample:  // each input gets the sum of its copies' relevances
                upsample_sum(R, op.in, op.up_h, op.up_w, T, out, false);
                return;
            case OpKind::ChannelShuffle:
                shuffle_backward(R, op.in.c, op.groups, T * op.in.pixels(), out, false);
                return;
            case OpKind::Slice: {  // scattered into zeros
                std::memset(out, 0, sizeof(float) * static_cast<size_t>(nin));
                channel_copy(R, op.out.c, 0, out, op.in.c, op.start, op.out.c, T * op.in.pixels(), false);
                return;
            }
            case OpKind::ReLU:
            case OpKind::Activation:
            case OpKind::Add:
            case OpKind::Concat:
            case OpKind::Mul:
                throw std::logic_error("relevance_op: handled by backward_step");
        }
    }

    // Gradient through single-input op i (PyTorch conventions: ReLU'(0) = 0, max pooling to the
    // first maximum). out may be G itself for the element-wise ops.
    void gradient_op(size_t i, const float* a, const float* y, const float* G, float* out, int64_t T,
                     const Ctx& c, int64_t off) const {
        const OpSpec& op = plan_->ops[i];
        const Geom& g = op.g;
        Arena& ar = c.ar;
        const int gth = c.gth;
        const int64_t nin = T * op.in.size(), nout = T * op.out.size();
        switch (op.kind) {
            case OpKind::Dense:
            case OpKind::Conv2d:
            case OpKind::ConvTranspose2d:
                if (generic_op(op)) {
#if DT_HAVE_GENERIC
                    generic_gradient(*gen_[i], G, out, T, ar.gscr.data(), gth);
#endif
                    return;
                }
                throw std::logic_error("gradient_op: linear ops run in backward_step");
            case OpKind::ReLU:  // y > 0 exactly where a > 0
                // G read unconditionally: a select of two loaded values vectorises, a conditional load
                // does not (the compiler may not speculate it)
                for (int64_t k = 0; k < nin; ++k) {
                    const float gk = G[k];
                    out[k] = y[k] > 0.0f ? gk : 0.0f;
                }
                return;
            case OpKind::Activation:
                act_gradient(op.act, op.param, a, G, out, nin);
                return;
            case OpKind::BatchNorm: {
                const int64_t C = op.in.c;
                for (int64_t k = 0; k < nin; ++k) out[k] = G[k] * op.scale[k % C];
                return;
            }
            case OpKind::MaxPool:
                maxpool_scatter(G, argp(c, i, off), g, T, out);
                return;
            case OpKind::AvgPool: {
                float* t = ar.tmp.data();
                if (op.inv_count.empty()) {
                    const float inv = 1.0f / static_cast<float>(g.kh * g.kw);
                    for (int64_t k = 0; k < nout; ++k) t[k] = G[k] * inv;
                } else {
                    const int64_t P = g.P(), C = g.C;
                    for (int64_t r = 0; r < T * P; ++r) {
                        const float inv = op.inv_count[static_cast<size_t>(r % P)];
                        for (int64_t ch = 0; ch < C; ++ch) t[r * C + ch] = G[r * C + ch] * inv;
                    }
                }
                window_scatter(t, g, T, out);
                return;
            }
            case OpKind::SumPool:
                window_scatter(G, g, T, out);
                return;
            case OpKind::GlobalSum: {
                const int64_t F = op.in.size();
                for (int64_t n = 0; n < T; ++n)
                    for (int64_t k = 0; k < F; ++k) out[n * F + k] = G[n];
                return;
            }
            case OpKind::LpPool:
                lp_gradient(op, a, y, G, T, out);
                return;
            case OpKind::AdaptiveAvgPool:
                adaptive_scatter(G, op.in, op.out, op.rows.data(), op.cols.data(), T, out, true);
                return;
            case OpKind::GlobalAvgPool: {
                const int64_t C = op.in.c, P = op.in.pixels();
                const float inv = 1.0f / static_cast<float>(P);
                for (int64_t n = 0; n < T; ++n)
                    for (int64_t p = 0; p < P; ++p)
                        for (int64_t ch = 0; ch < C; ++ch) out[(n * P + p) * C + ch] = G[n * C + ch] * inv;
                return;
            }
            case OpKind::Flatten:  // permuted
                nchw_to_nhwc(G, out, T, op.in.c, op.in.h, op.in.w);
                return;
            case OpKind::Upsample:
                upsample_sum(G, op.in, op.up_h, op.up_w, T, out, false);
                return;
            case OpKind::ChannelShuffle:
                shuffle_backward(G, op.in.c, op.groups, T * op.in.pixels(), out, false);
                return;
            case OpKind::Slice:
                std::memset(out, 0, sizeof(float) * static_cast<size_t>(nin));
                channel_copy(G, op.out.c, 0, out, op.in.c, op.start, op.out.c, T * op.in.pixels(), false);
                return;
            case OpKind::Add:
            case OpKind::Concat:
            case OpKind::Mul:
                throw std::logic_error("gradient_op: handled by backward_step");
        }
    }
};

}  // namespace

std::unique_ptr<Executor> make_cpu_executor(std::shared_ptr<Plan> plan) {
    return std::make_unique<CpuExecutor>(std::move(plan));
}

}  // namespace deeptaylor
