// Saten CPU kernels: y = x (A B + S) + b for a low-rank + bitmask-sparse layer, accumulated in fp32.
//
// S is the layer's stored layout read as is: a bitmask over S (in, out) flattened row-major (bit b of byte k is
// entry 8k+b) and the kept values in that order, plus per-row value offsets. Batch-1 decode reads every weight
// byte once, so it is bound by memory bandwidth: the kernel streams the rows of S (and of B) once, expands the
// kept 16-bit values of each input row into vector lanes (AVX-512 VBMI2 expand-load, or an AVX2 byte-shuffle
// table, or a scalar bit loop) and adds x[i] * row into an fp32 output accumulator that stays in L1/L2.
// Threads split the rows (balanced by bytes) and own a partial output each; the partials are summed at the end.
// Prefill (many tokens) is compute bound: expand_rows() writes rows of S into a small dense scratch and the
// caller runs a dense GEMM on it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <omp.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define SATEN_X86 1
#endif

namespace {

enum ValueKind { kBF16 = 0, kF16 = 1, kF32 = 2 };
enum Isa { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

inline float to_float(const void* p, int64_t k, ValueKind kind) {
  if (kind == kBF16) return static_cast<float>(static_cast<const c10::BFloat16*>(p)[k]);
  if (kind == kF16) return static_cast<float>(static_cast<const c10::Half*>(p)[k]);
  return static_cast<const float*>(p)[k];
}

inline int elem_size(ValueKind kind) { return kind == kF32 ? 4 : 2; }

// ---- scalar reference loops (any CPU) -------------------------------------------------------------------
// y[t][0:n] += coef[t] * row[0:n] for a dense row of n values.
void dense_row_scalar(const void* row, int64_t n, ValueKind kind, const float* coef, int64_t T, float* y,
                      int64_t ystride) {
  for (int64_t j = 0; j < n; ++j) {
    const float w = to_float(row, j, kind);
    for (int64_t t = 0; t < T; ++t) y[t * ystride + j] += coef[t] * w;
  }
}

// y[t][0:n] += coef[t] * S[i][0:n] for one bitmask row (n bits starting at `bits`, byte aligned).
void sparse_row_scalar(const uint8_t* bits, const void* vals, int64_t n, ValueKind kind, const float* coef,
                       int64_t T, float* y, int64_t ystride) {
  int64_t p = 0;
  for (int64_t jb = 0; jb < n / 8; ++jb) {
    unsigned m = bits[jb];
    while (m) {
      const int b = __builtin_ctz(m);
      const float w = to_float(vals, p++, kind);
      for (int64_t t = 0; t < T; ++t) y[t * ystride + jb * 8 + b] += coef[t] * w;
      m &= m - 1;
    }
  }
}

#ifdef SATEN_X86
// ---- AVX2: 8 entries per mask byte; a 256-entry shuffle table expands 8 packed 16-bit values ----------------
struct Avx2Tables {
  alignas(16) uint8_t shuf16[256][16];  // byte-shuffle control placing the k-th kept 16-bit value in its lane
  alignas(32) int32_t perm32[256][8];   // lane permutation for 32-bit values
  Avx2Tables() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int lane = 0; lane < 8; ++lane) {
        const bool on = (m >> lane) & 1;
        shuf16[m][2 * lane] = on ? static_cast<uint8_t>(2 * k) : 0x80;
        shuf16[m][2 * lane + 1] = on ? static_cast<uint8_t>(2 * k + 1) : 0x80;
        perm32[m][lane] = on ? k : 0;
        k += on;
      }
    }
  }
};
const Avx2Tables& tables() {
  static const Avx2Tables t;
  return t;
}

__attribute__((target("avx2,fma,f16c,popcnt"))) inline __m256 load8(const void* p, ValueKind kind) {
  if (kind == kF32) return _mm256_loadu_ps(static_cast<const float*>(p));
  const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
  if (kind == kF16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The 8 lanes of one mask byte: kept values in their lanes, zeros elsewhere. Reads 8 values at `v`.
__attribute__((target("avx2,fma,f16c,popcnt"))) inline __m256 expand8(const void* v, unsigned m, ValueKind kind) {
  const Avx2Tables& tb = tables();
  if (kind == kF32) {
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(tb.perm32[m]));
    const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(m), lanes), lanes);
    const __m256 e = _mm256_permutevar8x32_ps(_mm256_loadu_ps(static_cast<const float*>(v)), idx);
    return _mm256_and_ps(e, _mm256_castsi256_ps(on));
  }
  const __m128i h = _mm_shuffle_epi8(_mm_loadu_si128(static_cast<const __m128i*>(v)),
                                     _mm_load_si128(reinterpret_cast<const __m128i*>(tb.shuf16[m])));
  if (kind == kF16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,fma,f16c,popcnt"))) void dense_row_avx2(const void* row, int64_t n, ValueKind kind,
                                                              const float* coef, int64_t T, float* y,
                                                              int64_t ystride) {
  const int es = elem_size(kind);
  const auto* base = static_cast<const uint8_t*>(row);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 w = load8(base + j * es, kind);
    for (int64_t t = 0; t < T; ++t) {
      float* yp = y + t * ystride + j;
      _mm256_storeu_ps(yp, _mm256_fmadd_ps(_mm256_set1_ps(coef[t]), w, _mm256_loadu_ps(yp)));
    }
  }
  if (j < n) dense_row_scalar(base + j * es, n - j, kind, coef, T, y + j, ystride);
}

// `vend` bounds the values: the last chunks of the array are copied to a padded buffer instead of over-read.
__attribute__((target("avx2,fma,f16c,popcnt"))) void sparse_row_avx2(const uint8_t* bits, const void* vals,
                                                               const void* vend, int64_t n, ValueKind kind,
                                                               const float* coef, int64_t T, float* y,
                                                               int64_t ystride) {
  const int es = elem_size(kind);
  const auto* v = static_cast<const uint8_t*>(vals);
  const auto* end = static_cast<const uint8_t*>(vend);
  alignas(32) uint8_t pad[32];
  for (int64_t jb = 0; jb < n / 8; ++jb) {
    const unsigned m = bits[jb];
    if (!m) continue;
    const void* src = v;
    if (v + 8 * es > end) {
      std::memset(pad, 0, sizeof(pad));
      std::memcpy(pad, v, end - v);
      src = pad;
    }
    const __m256 w = expand8(src, m, kind);
    v += __builtin_popcount(m) * es;
    for (int64_t t = 0; t < T; ++t) {
      float* yp = y + t * ystride + jb * 8;
      _mm256_storeu_ps(yp, _mm256_fmadd_ps(_mm256_set1_ps(coef[t]), w, _mm256_loadu_ps(yp)));
    }
  }
}

// ---- AVX-512 (VBMI2 expand-load): 32 entries per 32-bit mask word, masked loads never over-read ------------
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt,bmi2"))) inline void fma16(
    float* y, __m512 w, const float* coef, int64_t T, int64_t ystride, __mmask16 lanes) {
  for (int64_t t = 0; t < T; ++t) {
    float* yp = y + t * ystride;
    const __m512 acc = _mm512_maskz_loadu_ps(lanes, yp);
    _mm512_mask_storeu_ps(yp, lanes, _mm512_fmadd_ps(_mm512_set1_ps(coef[t]), w, acc));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt,bmi2"))) inline __m512 widen16(__m256i h, ValueKind kind) {
  if (kind == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The 32 lanes of one 32-bit mask word: a masked load of exactly the kept values (never past them), then the
// register form of VPEXPANDW (its memory form is microcoded and several times slower on AMD Zen 4).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt,bmi2"))) inline __m512i expand32(
    const uint8_t* v, uint32_t m, int cnt) {
  const __m512i packed = _mm512_maskz_loadu_epi16(_bzhi_u32(0xFFFFFFFFu, cnt), v);
  return _mm512_maskz_expand_epi16(m, packed);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt,bmi2"))) inline uint32_t mask_word(
    const uint8_t* bits, int64_t j, int64_t left) {
  uint32_t m = 0;
  if (left >= 32) std::memcpy(&m, bits + j / 8, 4);
  else std::memcpy(&m, bits + j / 8, left / 8);
  return m;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt,bmi2"))) void sparse_row_avx512(
    const uint8_t* bits, const void* vals, int64_t n, ValueKind kind, const float* coef, int64_t T, float* y,
    int64_t ystride) {
  const auto* v = static_cast<const uint8_t*>(vals);
  for (int64_t j = 0; j < n; j += 32) {
    const int64_t left = std::min<int64_t>(32, n - j);
    const uint32_t m = mask_word(bits, j, left);
    if (!m) continue;
    const int cnt = __builtin_popcount(m);
    const __mmask16 lo_lanes = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __mmask16 hi_lanes = left >= 32 ? 0xFFFF : left > 16 ? static_cast<__mmask16>((1u << (left - 16)) - 1) : 0;
    if (kind == kF32) {
      const auto* f = reinterpret_cast<const float*>(v);
      const __mmask16 mlo = m & 0xFFFF, mhi = m >> 16;
      const int clo = __builtin_popcount(mlo);
      const __m512 lo = _mm512_maskz_expand_ps(mlo, _mm512_maskz_loadu_ps(_bzhi_u32(0xFFFF, clo), f));
      const __m512 hi = _mm512_maskz_expand_ps(mhi, _mm512_maskz_loadu_ps(_bzhi_u32(0xFFFF, cnt - clo), f + clo));
      fma16(y + j, lo, coef, T, ystride, lo_lanes);
      if (hi_lanes) fma16(y + j + 16, hi, coef, T, ystride, hi_lanes);
      v += cnt * 4;
      continue;
    }
    const __m512i e = expand32(v, m, cnt);
    v += cnt * 2;
    fma16(y + j, widen16(_mm512_castsi512_si256(e), kind), coef, T, ystride, lo_lanes);
    if (hi_lanes) fma16(y + j + 16, widen16(_mm512_extracti64x4_epi64(e, 1), kind), coef, T, ystride, hi_lanes);
  }
}

// bf16 rows of S, eight at a time (bench: 2.8x faster than one row at a time at 576x1536, in cache, one core):
// the eight expands are independent, the accumulator is loaded and stored once per eight rows, and bf16 widens
// to fp32 by interleaving with zeros (one instruction). That interleave permutes columns inside each 32-wide
// chunk, so these rows accumulate into a permuted buffer `yp` (T, npad) that unpermute() puts back in order.
constexpr int kRowBlock = 8;
// Prefetch (bench: cold weights, one core, AMD EPYC): the R interleaved value streams of a block are too short
// for the hardware prefetchers at SmolLM2's widths, so the next block's values and mask (two contiguous regions)
// are requested spread over this block's columns: 576x1536 at 36% 108 -> 73 us, 1536x576 125 -> 69 us. On wide
// rows (next block > kAheadMaxBytes) that loses (2048x8192: 1338 -> 1770 us) and a per-stream prefetch
// kStreamAhead bytes ahead wins instead.
constexpr int kStreamAhead = 256;
constexpr int64_t kAheadMaxBytes = 24 << 10;

struct Ahead {  // the next block's regions, prefetched one slice of lines per 32-column step of this block
  const char* values = nullptr;
  int64_t value_lines = 0, value_per_step = 0;
  const char* mask = nullptr;
  int64_t mask_lines = 0, mask_per_step = 0;

  Ahead() = default;
  Ahead(const char* v, int64_t v_bytes, const char* m, int64_t m_bytes, int64_t steps)
      : values(v), value_lines((v_bytes + 63) / 64), value_per_step(value_lines / steps + 1), mask(m),
        mask_lines((m_bytes + 63) / 64), mask_per_step(mask_lines / steps + 1) {}
};

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt,bmi2"))) inline void prefetch_slice(
    const char* base, int64_t lines, int64_t per, int64_t step) {
  for (int64_t q = step * per, end = std::min(lines, q + per); q < end; ++q) _mm_prefetch(base + q * 64, _MM_HINT_T0);
}

// The R rows' 32 lanes at column j: expanded (sparse) or loaded (dense), widened to fp32 pairs by the caller.
template <bool kSparse>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt,bmi2"))) inline __m512i row_lanes(
    const uint8_t*& p, const uint8_t* row_bits, int64_t j, int64_t left, bool stream_prefetch) {
  if (!kSparse) return _mm512_maskz_loadu_epi16(_bzhi_u32(0xFFFFFFFFu, static_cast<unsigned>(left)), p + j * 2);
  if (stream_prefetch) {
    _mm_prefetch(reinterpret_cast<const char*>(p) + kStreamAhead, _MM_HINT_T0);
    if ((j & 255) == 0) _mm_prefetch(reinterpret_cast<const char*>(row_bits + j / 8) + 64, _MM_HINT_T0);
  }
  const uint32_t m = mask_word(row_bits, j, left);
  const int cnt = __builtin_popcount(m);
  const __m512i e = expand32(p, m, cnt);
  p += cnt * 2;
  return e;
}

template <int R, bool kSparse>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt,bmi2"))) void bf16_rows_avx512(
    const uint8_t* bits, const uint8_t* vals, const int64_t* off, int64_t i0, int64_t n, const float* coef,
    int64_t cstride, int64_t T, float* yp, int64_t npad, const Ahead& ahead) {
  const __m512i zero = _mm512_setzero_si512();
  const uint8_t* p[R];
  const uint8_t* rb[R];
  for (int k = 0; k < R; ++k) {
    p[k] = kSparse ? vals + off[i0 + k] * 2 : vals + (i0 + k) * n * 2;
    rb[k] = kSparse ? bits + (i0 + k) * n / 8 : nullptr;
  }
  const bool ahead_on = kSparse && ahead.values != nullptr, per_stream = kSparse && !ahead_on;
  __m512 c1[R];  // one token (decode): coefficients in registers, lanes consumed as soon as they are built
  for (int k = 0; k < R; ++k) c1[k] = _mm512_set1_ps(coef[i0 + k]);
  for (int64_t j = 0; j < n; j += 32) {
    const int64_t left = std::min<int64_t>(32, n - j);
    if (ahead_on) {
      prefetch_slice(ahead.values, ahead.value_lines, ahead.value_per_step, j / 32);
      prefetch_slice(ahead.mask, ahead.mask_lines, ahead.mask_per_step, j / 32);
    }
    if (T == 1) {
      __m512 lo = _mm512_loadu_ps(yp + j), hi = _mm512_loadu_ps(yp + j + 16);
      for (int k = 0; k < R; ++k) {
        const __m512i e = row_lanes<kSparse>(p[k], rb[k], j, left, per_stream);
        lo = _mm512_fmadd_ps(c1[k], _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, e)), lo);
        hi = _mm512_fmadd_ps(c1[k], _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, e)), hi);
      }
      _mm512_storeu_ps(yp + j, lo);
      _mm512_storeu_ps(yp + j + 16, hi);
      continue;
    }
    __m512i lanes[R];  // several tokens: each row's lanes are built once and used by every token
    for (int k = 0; k < R; ++k) lanes[k] = row_lanes<kSparse>(p[k], rb[k], j, left, per_stream);
    for (int64_t t = 0; t < T; ++t) {
      float* y = yp + t * npad + j;
      __m512 lo = _mm512_loadu_ps(y), hi = _mm512_loadu_ps(y + 16);
      for (int k = 0; k < R; ++k) {
        const __m512 c = _mm512_set1_ps(coef[t * cstride + i0 + k]);
        lo = _mm512_fmadd_ps(c, _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, lanes[k])), lo);
        hi = _mm512_fmadd_ps(c, _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, lanes[k])), hi);
      }
      _mm512_storeu_ps(y, lo);
      _mm512_storeu_ps(y + 16, hi);
    }
  }
}

// Rows [i0, i1) of a bf16 matrix (sparse S, or dense (rows, n) when kSparse is false) times their coefficients
// coef[t * cstride + i], added into the permuted accumulator yp (T, npad).
template <bool kSparse>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt,bmi2"))) void bf16_block_avx512(
    const uint8_t* bits, const uint8_t* vals, const int64_t* off, int64_t i0, int64_t i1, int64_t n,
    const float* coef, int64_t cstride, int64_t T, float* yp, int64_t npad) {
  int64_t i = i0;
  for (; i + kRowBlock <= i1; i += kRowBlock) {
    Ahead ahead;
    const int64_t a0 = i + kRowBlock, a1 = std::min(i1, i + 2 * kRowBlock);
    const int64_t value_bytes = kSparse && a0 < a1 ? (off[a1] - off[a0]) * 2 : 0, mask_bytes = (a1 - a0) * n / 8;
    if (kSparse && a0 < a1 && value_bytes + mask_bytes <= kAheadMaxBytes)  // else wide rows: per-stream prefetch
      ahead = Ahead(reinterpret_cast<const char*>(vals + off[a0] * 2), value_bytes,
                    reinterpret_cast<const char*>(bits + a0 * n / 8), mask_bytes, (n + 31) / 32);
    bf16_rows_avx512<kRowBlock, kSparse>(bits, vals, off, i, n, coef, cstride, T, yp, npad, ahead);
  }
  for (; i < i1; ++i) bf16_rows_avx512<1, kSparse>(bits, vals, off, i, n, coef, cstride, T, yp, npad, Ahead{});
}

// Position of column j in the permuted accumulator (unpacklo/hi interleave within each 32-wide chunk).
inline int64_t permuted(int64_t j) {
  const int64_t w = j % 32, q = w / 8, r = w % 8;
  return j - w + (r < 4 ? q * 4 + r : 16 + q * 4 + r - 4);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt,bmi2"))) void expand_row_avx512_16(
    const uint8_t* bits, const uint16_t* v, int64_t n, uint16_t* out) {
  for (int64_t j = 0; j < n; j += 32) {
    const int64_t left = std::min<int64_t>(32, n - j);
    const uint32_t m = mask_word(bits, j, left);
    const int cnt = __builtin_popcount(m);
    const __m512i e = expand32(reinterpret_cast<const uint8_t*>(v), m, cnt);
    v += cnt;
    _mm512_mask_storeu_epi16(out + j, left >= 32 ? 0xFFFFFFFFu : ((1u << left) - 1), e);
  }
}
#endif  // SATEN_X86

bool has_avx2() {
#ifdef SATEN_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool has_avx512() {
#ifdef SATEN_X86
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2");
#else
  return false;
#endif
}

int resolve_isa(int64_t isa) {
  if (isa == kAuto) return has_avx512() ? kAvx512 : has_avx2() ? kAvx2 : kScalar;
  TORCH_CHECK(isa >= kScalar && isa <= kAvx512, "unknown isa ", isa);
  TORCH_CHECK(isa != kAvx2 || has_avx2(), "this CPU lacks AVX2/FMA/F16C");
  TORCH_CHECK(isa != kAvx512 || has_avx512(), "this CPU lacks AVX-512 VBMI2");
  return static_cast<int>(isa);
}

ValueKind kind_of(const at::Tensor& t) {
  if (t.scalar_type() == at::kBFloat16) return kBF16;
  if (t.scalar_type() == at::kHalf) return kF16;
  TORCH_CHECK(t.scalar_type() == at::kFloat, "values must be bfloat16, float16 or float32, got ", t.scalar_type());
  return kF32;
}

// One row update of S (input row i) or of a dense matrix, with the chosen instruction set.
struct RowOps {
  int isa;
  ValueKind kind;
  void dense(const void* row, int64_t n, const float* coef, int64_t T, float* y, int64_t ys) const {
#ifdef SATEN_X86
    if (isa >= kAvx2) return dense_row_avx2(row, n, kind, coef, T, y, ys);
#endif
    dense_row_scalar(row, n, kind, coef, T, y, ys);
  }
  void sparse(const uint8_t* bits, const void* v, const void* vend, int64_t n, const float* coef, int64_t T,
              float* y, int64_t ys) const {
#ifdef SATEN_X86
    if (isa == kAvx512) return sparse_row_avx512(bits, v, n, kind, coef, T, y, ys);
    if (isa == kAvx2) return sparse_row_avx2(bits, v, vend, n, kind, coef, T, y, ys);
#endif
    sparse_row_scalar(bits, v, n, kind, coef, T, y, ys);
  }
};

// Row ranges [bounds[k], bounds[k+1]) of about equal cost for `parts` threads (cost = prefix sums).
std::vector<int64_t> split_rows(const std::vector<int64_t>& cost_prefix, int64_t parts) {
  const int64_t rows = static_cast<int64_t>(cost_prefix.size()) - 1;
  std::vector<int64_t> bounds(parts + 1, rows);
  bounds[0] = 0;
  for (int64_t k = 1; k < parts; ++k) {
    const int64_t goal = cost_prefix[rows] * k / parts;
    bounds[k] = std::lower_bound(cost_prefix.begin(), cost_prefix.end(), goal) - cost_prefix.begin();
    bounds[k] = std::max(bounds[k], bounds[k - 1]);
  }
  return bounds;
}

void check_inputs(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                  const at::Tensor& row_off, int64_t out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be contiguous (T, in)");
  kind_of(x);
  TORCH_CHECK(out % 8 == 0, "out_features must be a multiple of 8, got ", out);
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.is_contiguous(), "mask must be contiguous uint8");
  TORCH_CHECK(mask.numel() * 8 >= x.size(1) * out, "mask too short for (", x.size(1), ", ", out, ")");
  TORCH_CHECK(values.is_contiguous() && row_off.scalar_type() == at::kLong && row_off.numel() == x.size(1) + 1,
              "values must be contiguous and row_offsets int64 of in + 1 entries");
}

}  // namespace

// Everything one decode call needs, shared by its threads.
struct DecodeJob {
  int64_t T, in, out, r, npad, rpad, parts;
  const float* x;
  const uint8_t *bits, *vals, *a, *b;
  const void* vend;
  const int64_t* off;
  RowOps sops, aops, bops;
  bool blocked;  // bf16 rows of S through bf16_block_avx512 (permuted accumulator)
  std::vector<int64_t> bounds;          // rows of [S; B] per thread, balanced by bytes
  std::vector<float> upart, u, ypart, yperm;
};

// Thread p: its share of u = x A (partial), of S's and B's rows (partial y), then its columns of the sum.
void decode_thread(DecodeJob& job, int64_t p, float* y, const float* bias) {
  const int64_t T = job.T, in = job.in, out = job.out, r = job.r;
  std::vector<float> c(T);
  const int64_t a0 = in * p / job.parts, a1 = in * (p + 1) / job.parts;
  float* up = job.upart.data() + p * T * job.rpad;
#ifdef SATEN_X86
  if (job.blocked && job.aops.kind == kBF16 && r) {
    bf16_block_avx512<false>(nullptr, job.a, nullptr, a0, a1, r, job.x, in, T, up, job.rpad);
  } else
#endif
  for (int64_t k = a0; k < a1 && r; ++k) {
    for (int64_t t = 0; t < T; ++t) c[t] = job.x[t * in + k];
    job.aops.dense(job.a + k * r * elem_size(job.aops.kind), r, c.data(), T, up, job.rpad);
  }
#pragma omp barrier
  const bool uperm = job.blocked && job.aops.kind == kBF16;
  for (int64_t k = 0; k < T * r; ++k) {  // every thread sums the (tiny) u itself: no second barrier
    const int64_t pos = (k / r) * job.rpad + (uperm ? permuted(k % r) : k % r);
    float s = 0.f;
    for (int64_t q = 0; q < job.parts; ++q) s += job.upart[q * T * job.rpad + pos];
    job.u[p * T * r + k] = s;
  }
  const float* u = job.u.data() + p * T * r;
  float* yp = job.ypart.data() + p * T * out;
  const int64_t s_end = std::min(job.bounds[p + 1], in);
  int64_t i = job.bounds[p];
#ifdef SATEN_X86
  if (job.blocked && i < s_end) {
    bf16_block_avx512<true>(job.bits, job.vals, job.off, i, s_end, out, job.x, in, T, job.yperm.data() + p * T * job.npad,
                      job.npad);
    i = s_end;
  }
#endif
  const int64_t es = elem_size(job.sops.kind);
  for (; i < s_end; ++i) {
    for (int64_t t = 0; t < T; ++t) c[t] = job.x[t * in + i];
    job.sops.sparse(job.bits + i * out / 8, job.vals + job.off[i] * es, job.vend, out, c.data(), T, yp, out);
  }
  const int64_t b0 = std::max(job.bounds[p], in) - in, b1 = job.bounds[p + 1] - in;
#ifdef SATEN_X86
  if (job.blocked && job.bops.kind == kBF16 && b0 < b1) {
    bf16_block_avx512<false>(nullptr, job.b, nullptr, b0, b1, out, u, r, T, job.yperm.data() + p * T * job.npad,
                             job.npad);
  } else
#endif
  for (int64_t k = b0; k < b1; ++k) {
    for (int64_t t = 0; t < T; ++t) c[t] = u[t * r + k];
    job.bops.dense(job.b + k * out * elem_size(job.bops.kind), out, c.data(), T, yp, out);
  }
#pragma omp barrier
  // this thread's 32-aligned columns of the sum (no division per element: it cost ~10% of a 576x1536 call)
  const int64_t chunks = (out + 31) / 32;
  const int64_t j0 = std::min(out, chunks * p / job.parts * 32), j1 = std::min(out, chunks * (p + 1) / job.parts * 32);
  static const std::array<int, 32> kPos = [] {
    std::array<int, 32> pos{};
    for (int w = 0; w < 32; ++w) pos[w] = w % 8 < 4 ? (w / 8) * 4 + w % 8 : 16 + (w / 8) * 4 + w % 8 - 4;
    return pos;
  }();
  for (int64_t t = 0; t < T; ++t) {
    float* yt = y + t * out;
    for (int64_t j = j0; j < j1; ++j) yt[j] = bias ? bias[j] : 0.f;
    for (int64_t q = 0; q < job.parts; ++q) {
      const float* src = job.ypart.data() + (q * T + t) * out;
      for (int64_t j = j0; j < j1; ++j) yt[j] += src[j];
      if (!job.blocked) continue;
      const float* perm = job.yperm.data() + (q * T + t) * job.npad;
      for (int64_t c = j0; c < j1; c += 32)
        for (int64_t w = 0; w < std::min<int64_t>(32, out - c); ++w) yt[c + w] += perm[c + kPos[w]];
    }
  }
}

// y (T, out) = x (A B + S) + bias for x (T, in), returned at x's dtype (bf16, fp16 or fp32), accumulated in fp32.
// A (in, r), B (r, out) may be empty (r = 0). x is widened and y narrowed here, not by two more torch calls.
// One OpenMP region with two barriers (a parallel region costs several microseconds; a layer takes ~50).
at::Tensor decode(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values, const at::Tensor& row_off,
                  const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& bias, int64_t out,
                  int64_t isa) {
  check_inputs(x, mask, values, row_off, out);
  DecodeJob job;
  job.T = x.size(0), job.in = x.size(1), job.out = out, job.r = a.numel() ? a.size(1) : 0;
  const int use = resolve_isa(isa);
  job.sops = {use, kind_of(values)};
  job.aops = {use, job.r ? kind_of(a) : kF32};
  job.bops = {use, job.r ? kind_of(b) : kF32};
  TORCH_CHECK(!job.r || (b.size(0) == job.r && b.size(1) == out && a.size(0) == job.in && a.is_contiguous() &&
                         b.is_contiguous()), "A must be (in, r) and B (r, out), contiguous");
  const int64_t n_x = x.numel();
  std::vector<float> xf(n_x);
  const void* xraw = x.data_ptr();  // hoisted: data_ptr() and the dtype check cost ~20 ns a call
  const ValueKind xk = kind_of(x);
  for (int64_t k = 0; k < n_x; ++k) xf[k] = to_float(xraw, k, xk);
  job.x = xf.data(), job.off = row_off.data_ptr<int64_t>();
  job.bits = mask.data_ptr<uint8_t>(), job.vals = static_cast<const uint8_t*>(values.data_ptr());
  job.vend = job.vals + values.numel() * values.element_size();
  job.a = static_cast<const uint8_t*>(job.r ? a.data_ptr() : nullptr);
  job.b = static_cast<const uint8_t*>(job.r ? b.data_ptr() : nullptr);
  job.blocked = use == kAvx512 && job.sops.kind == kBF16;
  job.npad = (out + 31) / 32 * 32, job.rpad = (job.r + 31) / 32 * 32;
  const int64_t in = job.in, r = job.r, T = job.T;
  std::vector<int64_t> cost(in + r + 1, 0);  // rows 0..in-1 are S's, in..in+r-1 are B's; cost = bytes read
  for (int64_t i = 0; i < in; ++i) cost[i + 1] = cost[i] + (job.off[i + 1] - job.off[i]) * values.element_size() + out / 8;
  for (int64_t k = 0; k < r; ++k) cost[in + k + 1] = cost[in + k] + out * b.element_size();
  job.parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (in + r) / 64));
  job.bounds = split_rows(cost, job.parts);
  job.upart.assign(job.parts * T * job.rpad, 0.f), job.u.assign(job.parts * T * r, 0.f);
  job.ypart.assign(job.parts * T * out, 0.f), job.yperm.assign(job.blocked ? job.parts * T * job.npad : 0, 0.f);
  std::vector<float> yf(T * out);
  at::Tensor bf = bias && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  float* yp = yf.data();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
#pragma omp parallel num_threads(job.parts)
  {
    // a runtime that grants fewer threads than asked would deadlock the barriers: checked, then run serially
    if (omp_get_num_threads() == job.parts) decode_thread(job, omp_get_thread_num(), yp, bp);
  }
  if (omp_get_max_threads() < job.parts) TORCH_CHECK(false, "OpenMP granted fewer threads than requested");
  at::Tensor y = at::empty({T, out}, x.options());
  const ValueKind yk = kind_of(x);
  if (yk == kF32) {
    std::memcpy(y.data_ptr(), yf.data(), yf.size() * 4);
  } else if (yk == kBF16) {
    auto* yo = y.data_ptr<at::BFloat16>();
    for (int64_t k = 0; k < T * out; ++k) yo[k] = c10::BFloat16(yf[k]);
  } else {
    auto* yo = y.data_ptr<at::Half>();
    for (int64_t k = 0; k < T * out; ++k) yo[k] = c10::Half(yf[k]);
  }
  return y;
}

// Rows [i0, i1) of S as a dense (i1 - i0, out) tensor at `dtype` (the values' dtype or float32).
// With `dest` ((i1 - i0, out), contiguous, of `dtype`) the rows are written there (the caller's larger scratch).
at::Tensor expand_rows(const at::Tensor& mask, const at::Tensor& values, const at::Tensor& row_off, int64_t i0,
                       int64_t i1, int64_t out, at::ScalarType dtype, int64_t isa,
                       const c10::optional<at::Tensor>& dest) {
  TORCH_CHECK(0 <= i0 && i0 <= i1 && i1 < row_off.numel(), "bad row range [", i0, ", ", i1, ")");
  TORCH_CHECK(out % 8 == 0, "out_features must be a multiple of 8, got ", out);
  TORCH_CHECK(dtype == values.scalar_type() || dtype == at::kFloat, "dtype must be the values' or float32");
  const int use = resolve_isa(isa);
  const ValueKind kind = kind_of(values);
  // the AVX-512 16-bit expansion writes every lane (zeros included); the other routes add into zeros
  const bool writes_all = use == kAvx512 && kind != kF32 && dtype != at::kFloat;
  at::Tensor dense;
  if (dest && dest->defined()) {
    dense = *dest;
    TORCH_CHECK(dense.is_contiguous() && dense.scalar_type() == dtype && dense.dim() == 2 &&
                dense.size(0) == i1 - i0 && dense.size(1) == out, "dest must be contiguous (", i1 - i0, ", ", out, ")");
    if (!writes_all) dense.zero_();
  } else {
    dense = writes_all ? at::empty({i1 - i0, out}, values.options().dtype(dtype))
                       : at::zeros({i1 - i0, out}, values.options().dtype(dtype));
  }
  const int64_t* off = row_off.data_ptr<int64_t>();
  const auto* bits = mask.data_ptr<uint8_t>();
  const auto* vals = static_cast<const uint8_t*>(values.data_ptr());
  const int64_t es = values.element_size(), ds = dense.element_size();
  auto* dst = static_cast<uint8_t*>(dense.data_ptr());
  at::parallel_for(i0, i1, 16, [&](int64_t b, int64_t e) {
    const float one = 1.f;
    for (int64_t i = b; i < e; ++i) {
      const uint8_t* row_bits = bits + i * out / 8;
      const uint8_t* v = vals + off[i] * es;
      uint8_t* d = dst + (i - i0) * out * ds;
#ifdef SATEN_X86
      if (use == kAvx512 && kind != kF32 && dtype != at::kFloat) {
        expand_row_avx512_16(row_bits, reinterpret_cast<const uint16_t*>(v), out, reinterpret_cast<uint16_t*>(d));
        continue;
      }
#endif
      if (dtype == at::kFloat) {
        RowOps{use, kind}.sparse(row_bits, v, vals + values.numel() * es, out, &one, 1,
                                 reinterpret_cast<float*>(d), out);
        continue;
      }
      int64_t p = 0;  // same dtype, scalar copy of the kept values into their lanes
      for (int64_t j = 0; j < out; ++j)
        if ((row_bits[j / 8] >> (j % 8)) & 1) std::memcpy(d + j * ds, v + (p++) * es, es);
    }
  });
  return dense;
}

std::string best_isa() { return has_avx512() ? "avx512" : has_avx2() ? "avx2" : "scalar"; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "y = x (A B + S) + bias, fp32 accumulation, for few tokens");
  m.def("expand_rows", &expand_rows, "rows [i0, i1) of the bitmask-sparse S as a dense tensor", py::arg("mask"),
        py::arg("values"), py::arg("row_offsets"), py::arg("i0"), py::arg("i1"), py::arg("out_features"),
        py::arg("dtype"), py::arg("isa"), py::arg("dest") = py::none());
  m.def("best_isa", &best_isa, "the instruction set the automatic choice uses on this CPU");
}
