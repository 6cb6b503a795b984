// deeptaylor kernels: plain reference loops (the fast engine lives in engine.hpp).
// Every kernel works on raw, C-contiguous float32 buffers; shapes are given in the comments.
#pragma once
#include <cstdint>

namespace deeptaylor {

// out (N, O) = x (N, I) @ w (O, I)^T + b (O)
void dense_forward(const float* x, const float* w, const float* b, float* out,
                   int64_t N, int64_t I, int64_t O);

// Deep Taylor z+ rule (Montavon et al. 2017), on positive contributions (a w)+ = a+ w+ + a- w-:
//   z_j = sum_i (a_i w_ji)+ ,  s_j = R_j / z_j (0 where z_j == 0),
//   Rin_i = a+_i sum_j w+_ji s_j + a-_i sum_j w-_ji s_j
// a (N, I), w (O, I), R (N, O) -> Rin (N, I)
void dense_zplus_relevance(const float* a, const float* w, const float* R, float* Rin,
                           int64_t N, int64_t I, int64_t O);

// Deep Taylor w² rule (Montavon et al. 2017): Rin_i = sum_j w_ji² / (sum_i' w_ji'²) R_j
// w (O, I), R (N, O) -> Rin (N, I)
void dense_wsquare_relevance(const float* w, const float* R, float* Rin,
                             int64_t N, int64_t I, int64_t O);

// Global sum pooling relevance (slide 003): Rin_i = a_i / sum_i' a_i' * R   (0 where the sum is 0)
// a (N, F), R (N) -> Rin (N, F)
void global_sum_relevance(const float* a, const float* R, float* Rin, int64_t N, int64_t F);

}  // namespace deeptaylor
