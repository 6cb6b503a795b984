// Grouped / depthwise convolutions and transposed convolutions ("generic linear" ops), with every
// relevance rule of plan.hpp's RuleKind and the plain gradient.
//
// One machinery serves both directions. A Conv2d op is the underlying convolution
//     conv: X (Hx, Wx, Cx) -> Y (Hy, Wy, Cy), groups G, torch weight (Cy, Cx/G, kh, kw)
// with L = conv and L^T = its transpose (the backward-data pass). A ConvTranspose2d op with torch
// weight (C, O/G, kh, kw) is the transpose of the convolution with the SAME weight, stride, padding
// and dilation taking X = the ConvT output (O channels) to Y = the ConvT input (C channels), so for
// it L = conv^T and L^T = conv (output_padding only adds X rows/columns no tap reaches).
//
// conv is computed as a group-major im2col (columns ordered (group, i, j, c_local), so each group's
// block is contiguous) + one packed GEMM per group (A = the group's column block with the full row
// stride, C = the group's channel sub-block of Y); conv^T as per-group GEMMs into a column block +
// col2im. 1x1 stride-1 unpadded convolutions skip im2col/col2im (channel sub-blocks of the images
// themselves). Depthwise convolutions (groups == Cx == Cy) use a direct channels-last kernel
// vectorised over channels (forward as a window gather, transpose as a gather over the output
// positions that see an input pixel), compiled for AVX-512 / AVX2 / baseline and picked at run
// time; docs/engine.md ("Grouped and transposed convolutions") has the measurement behind the choice.
//
// Rules follow python/deeptaylor/reference/relevance.py exactly (L, L^T with substituted weights,
// safe division (0 where the denominator is 0), Epsilon's s = R / (z + eps sign z), sign(0) = +1),
// computed image-space on whole calls of T images with the scratch buffer the caller provides.
//
// Layouts: every activation is channels-last per sample, a (T, H, W, C), z and R (T, OH, OW, O),
// Rin and gin (T, H, W, C) (written, not accumulated).
#pragma once
#include <cstdint>
#include <memory>

#include "deeptaylor/plan.hpp"

namespace deeptaylor {

// Prepared once per op: per-group packed weights (or depthwise tap arrays) of every weight variant
// the rule needs, the rule's bias vectors and constant maps. A complete type with an out-of-line
// destructor (the state lives in Impl, defined in linear_generic.cpp), so unique_ptr<GenericLinear>
// can be created and destroyed in any translation unit.
struct GenericLinear {
    struct Impl;
    std::unique_ptr<Impl> impl;
    explicit GenericLinear(std::unique_ptr<Impl> p);
    ~GenericLinear();
    GenericLinear(const GenericLinear&) = delete;
    GenericLinear& operator=(const GenericLinear&) = delete;
};

// generic_op(op) (plan.hpp) says which ops this module runs: grouped Conv2d and ConvTranspose2d.

// Validate op (kind Conv2d or ConvTranspose2d; op.in / op.out rank 3 with the channels divisible by
// groups; output size following from the geometry; weight (Conv2d: (O, C/groups, kh, kw);
// ConvTranspose2d: (C, O/groups, kh, kw)), bias (O) or empty; ZBox bounds of the input size) and
// prepare it. op.g's C, H, W, O, OH, OW are taken from op.in / op.out. nonneg_in: the op's input is
// >= 0 by construction (the a- terms of the sign-split rules are then skipped; they are also
// skipped on any call whose input happens to be >= 0). mode != Rules: only the gradient is
// prepared. Throws std::invalid_argument ("generic linear (Conv2d, groups 4): ...") on bad specs.
std::unique_ptr<GenericLinear> make_generic_linear(const OpSpec& op, bool nonneg_in, Mode mode);

// Floats of scratch that a call (forward, relevance or gradient) with T images needs.
int64_t generic_scratch_floats(const GenericLinear& gl, int64_t T);

// z (T, OH, OW, O) = L(a) + bias for a (T, H, W, C). gth: threads to use inside (1 when the caller
// already parallelises over tiles: no OpenMP region is opened then).
void generic_forward(const GenericLinear& gl, const float* a, float* z, int64_t T, float* scratch, int gth);

// Rin (T, H, W, C) = the rule's relevance of the inputs, from a (T, H, W, C), the stored forward
// output z (T, OH, OW, O) (bias included) and the output relevance R (T, OH, OW, O).
void generic_relevance(const GenericLinear& gl, const float* a, const float* z, const float* R, float* Rin,
                       int64_t T, float* scratch, int gth);

// gin (T, H, W, C) = L^T(g) for g (T, OH, OW, O) (the gradient of the input).
void generic_gradient(const GenericLinear& gl, const float* g, float* gin, int64_t T, float* scratch, int gth);

// --- tests and benchmarks ---
// Force (1) or forbid (0) the direct depthwise kernel, or leave the choice to the module (-1, the
// default: direct where it applies). Takes effect for GenericLinears made afterwards.
void generic_set_depthwise_direct(int mode);
// Whether gl uses the direct depthwise kernel.
bool generic_uses_direct(const GenericLinear& gl);

}  // namespace deeptaylor
