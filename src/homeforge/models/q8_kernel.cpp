// int8-block linear for homeforge (llama.cpp's q8_0 arithmetic): int8 weights and int8 activations,
// each with one fp32 scale per block of 32 values along the input. Built at first use by
// homeforge/models/q8.py (torch.utils.cpp_extension); only called on CPUs with AVX-512 VNNI.
//
// y[m, n] = sum_b xs[m, b] * ws[n, b] * sum_{k in block b} xq[m, k] * wq[n, k]
// Weights must lie in [-127, 127] (quantize_q8 guarantees it; Q8Linear checks): -w of -128 wraps.
//
// The block sums are exact in int32. Each output row is computed in the same order whatever the
// number of rows, so a request's logits do not depend on what it is batched with.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")
namespace {

constexpr int64_t QB = 32;   // values per quantization block (llama.cpp's q8_0)
constexpr int64_t ROWS = 4;  // weight rows per inner block: each activation block is reused 4 times

// Activations: per block of 32, scale = max|x| / 127 and q = round(x / scale) (half to even), as in
// torch: torch.round(x / s).clamp(-127, 127).
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* s) {
  const int64_t nb = K / QB;
  for (int64_t i = 0; i < M * nb; ++i) {
    const float* xb = x + i * QB;
    float amax = 0.f;
    for (int j = 0; j < QB; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.0f;
    s[i] = d;
    for (int j = 0; j < QB; ++j) {
      const float v = d > 0.f ? std::nearbyint(xb[j] / d) : 0.f;
      q[i * QB + j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
    }
  }
}

// One tile: MB activation rows x R weight rows. Two blocks per 512-bit step: vpdpbusd multiplies
// |x| (unsigned) by w with x's sign and sums groups of 4 bytes, so lanes 0-7 hold block b's partial
// sums and lanes 8-15 block b+1's, exact in int32; they are scaled by [s_b x8, s_b+1 x8] in fp32.
// An odd last block is loaded with its upper half masked to zero.
template <int MB, int R>
__attribute__((always_inline)) inline
void tile(const int8_t* xq, const float* xs, int64_t K, const int8_t* wq, const float* ws, float* y, int64_t ldy) {
  const int64_t nb = K / QB;
  const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i zero = _mm512_setzero_si512();
  __m512 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b += 2) {
    const bool two = b + 1 < nb;
    const __mmask64 bytes = two ? ~__mmask64(0) : __mmask64(0xFFFFFFFFull);
    __m512i w[R];
    __m512 sw[R];
    for (int r = 0; r < R; ++r) {
      w[r] = _mm512_maskz_loadu_epi8(bytes, wq + r * K + b * QB);
      const float* s = ws + r * nb + b;
      sw[r] = two ? _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64(
                        reinterpret_cast<const __m128i*>(s)))))
                  : _mm512_set1_ps(s[0]);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512i x = _mm512_maskz_loadu_epi8(bytes, xq + m * K + b * QB);
      const __m512i ax = _mm512_abs_epi8(x);
      const __mmask64 neg = _mm512_movepi8_mask(x);
      const float* s = xs + m * nb + b;
      const __m512 sx = two ? _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64(
                                  reinterpret_cast<const __m128i*>(s)))))
                            : _mm512_set1_ps(s[0]);
      for (int r = 0; r < R; ++r) {
        const __m512i sgn = _mm512_mask_sub_epi8(w[r], neg, zero, w[r]);
        const __m512i d = _mm512_dpbusd_epi32(zero, ax, sgn);
        acc[m][r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), sw[r]), sx, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) y[m * ldy + r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int MB>
void rows(const int8_t* xq, const float* xs, int64_t K, const int8_t* wq, const float* ws, float* y, int64_t ldy,
          int64_t n0, int64_t n1) {
  const int64_t nb = K / QB;
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS) {
    // ask for the next tile's weight rows now: one row of work is too short for the hardware
    // prefetcher to run ahead (SmolLM2-135M, one row, all matrices: 10.8 -> 7.9 ms)
    if (n + 2 * ROWS <= n1)
      for (int64_t o = 0; o < ROWS * K; o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(wq + (n + ROWS) * K + o), _MM_HINT_T0);
    tile<MB, ROWS>(xq, xs, K, wq + n * K, ws + n * nb, y + n, ldy);
  }
  for (; n < n1; ++n) tile<MB, 1>(xq, xs, K, wq + n * K, ws + n * nb, y + n, ldy);
}

}  // namespace
#pragma GCC pop_options

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2, "x: float32 [M, K]");
  TORCH_CHECK(wq.dtype() == at::kChar && wq.dim() == 2 && wq.is_contiguous(), "wq: contiguous int8 [N, K]");
  TORCH_CHECK(ws.dtype() == at::kFloat && ws.is_contiguous(), "ws: contiguous float32 [N, K / 32]");
  const int64_t M = x.size(0), K = x.size(1), N = wq.size(0);
  TORCH_CHECK(wq.size(1) == K && K % QB == 0 && ws.size(0) == N && ws.size(1) == K / QB, "shapes");
  auto xc = x.contiguous();
  auto xq = at::empty({M, K}, wq.options());
  auto xs = at::empty({M, K / QB}, ws.options());
  quantize_rows(xc.data_ptr<float>(), M, K, xq.data_ptr<int8_t>(), xs.data_ptr<float>());
  auto y = at::empty({M, N}, x.options());
  const int8_t* xqp = xq.data_ptr<int8_t>();
  const float* xsp = xs.data_ptr<float>();
  const int8_t* wp = wq.data_ptr<int8_t>();
  const float* sp = ws.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t nb = K / QB;
  const int64_t grain = std::max<int64_t>(ROWS, (1 << 15) / K);  // >= 32 KB of weights per task
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; m += 4) {
      const int64_t mb = std::min<int64_t>(4, M - m);
      const int8_t* xm = xqp + m * K;
      const float* sm = xsp + m * nb;
      float* ym = yp + m * N;
      switch (mb) {
        case 1: rows<1>(xm, sm, K, wp, sp, ym, N, n0, n1); break;
        case 2: rows<2>(xm, sm, K, wp, sp, ym, N, n0, n1); break;
        case 3: rows<3>(xm, sm, K, wp, sp, ym, N, n0, n1); break;
        default: rows<4>(xm, sm, K, wp, sp, ym, N, n0, n1); break;
      }
    }
  });
  return y;
}
