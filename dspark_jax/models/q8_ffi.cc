// Few-row matrix products with int8 block weights on CPU, as XLA FFI custom calls (built and loaded by q8_ffi.py):
// the output head over the GGUF's Q8_0 embedding and the layers' projections over their GGUF blocks.
//
// out [R, V] = hidden [R, d] · W [V, d]ᵀ with W[v, j] = scale[v, j / B] · q[v, j] (- offset[v, j / B]): values q
// int8 [V, d], scales (and offsets) float32 [V, d / B], computed as a product then a difference, as gguf-py
// dequantizes (built with -ffp-contract=off, so W is bit for bit the dequantized tensor). XLA:CPU fuses such a
// dequantization into its matrix-vector loop only for one row; for several rows it materializes the float32
// matrix. This loop dequantizes each row of W once into vector registers and multiplies it into every hidden row:
// it streams the int8 blocks once, whatever R is. Work is split over XLA's intra-op thread pool in chunks of rows
// of W that the calling thread also takes, so the call finishes even when no pool thread is free.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // floats per vector register
constexpr int kGroup = 8;   // hidden rows per pass: 2 x 8 accumulators + 3 temporaries of 32 registers
typedef __m512 Vec;
inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec MulAdd(Vec a, Vec b, Vec acc) { return _mm512_fmadd_ps(a, b, acc); }
inline float Sum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec Sub(Vec a, float b) { return _mm512_sub_ps(a, _mm512_set1_ps(b)); }
inline Vec Dequant(const int8_t* p, float scale) {
  const __m512i ints = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(ints), _mm512_set1_ps(scale));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
constexpr int kGroup = 4;   // 2 x 4 accumulators + 3 temporaries of 16 registers
typedef __m256 Vec;
inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec MulAdd(Vec a, Vec b, Vec acc) { return _mm256_fmadd_ps(a, b, acc); }
inline float Sum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline Vec Sub(Vec a, float b) { return _mm256_sub_ps(a, _mm256_set1_ps(b)); }
inline Vec Dequant(const int8_t* p, float scale) {
  const __m256i ints = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(ints), _mm256_set1_ps(scale));
}
#else
#error "q8_ffi.cc needs AVX2 and FMA (q8_ffi.py builds it only where the CPU has them)"
#endif
constexpr int64_t kMaxChunk = 2048;  // rows of W per unit of work, at most
constexpr int64_t kPrefetchRows = 8;  // how far ahead the blocks are prefetched: 1.3x at 1-4 rows (measured)

struct Problem {
  const float* hidden;  // [R, d]
  const int8_t* q;      // [V, d]
  const float* scale;   // [V, d / block]
  const float* offset;  // [V, d / block], or nullptr
  float* out;           // [R, V]
  int64_t rows, d, vocab, block;
};

// Rows r0..r0+G-1 of the output at the C rows of W from v (v + C <= vocab).
template <int G, int C, bool kOffset>
void Columns(const Problem& p, int64_t r0, int64_t v) {
  const int64_t blocks = p.d / p.block;
  const int8_t* q = p.q + v * p.d;
  const float* s = p.scale + v * blocks;
  const float* o = kOffset ? p.offset + v * blocks : nullptr;
  const float* h = p.hidden + r0 * p.d;
  // the rows kPrefetchRows ahead, or these rows again near the end (no address past the blocks)
  const int8_t* ahead = v + C + kPrefetchRows <= p.vocab ? q + kPrefetchRows * p.d : q;
  Vec acc[C][G];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < G; ++r) acc[c][r] = Zero();
  for (int64_t b = 0, j = 0; b < blocks; ++b) {
    for (const int64_t block_end = j + p.block; j < block_end; j += kLanes) {
      if (j % 64 == 0)  // one cache line of each vocabulary row kPrefetchRows ahead
        for (int c = 0; c < C; ++c)
          _mm_prefetch(reinterpret_cast<const char*>(ahead + c * p.d + j), _MM_HINT_T0);
      Vec t[C];
      for (int c = 0; c < C; ++c) {
        t[c] = Dequant(q + c * p.d + j, s[c * blocks + b]);
        if (kOffset) t[c] = Sub(t[c], o[c * blocks + b]);
      }
      for (int r = 0; r < G; ++r) {
        const Vec x = Load(h + r * p.d + j);
        for (int c = 0; c < C; ++c) acc[c][r] = MulAdd(t[c], x, acc[c][r]);
      }
    }
  }
  for (int r = 0; r < G; ++r)
    for (int c = 0; c < C; ++c) p.out[(r0 + r) * p.vocab + v + c] = Sum(acc[c][r]);
}

// Rows r0..r0+G-1 of the output at rows begin..end-1 of W.
template <int G, bool kOffset>
void Span(const Problem& p, int64_t r0, int64_t begin, int64_t end) {
  constexpr int kWide = G <= kGroup / 2 ? 4 : 2;  // rows of W per pass, within the vector registers
  int64_t v = begin;
  for (; v + kWide <= end; v += kWide) Columns<G, kWide, kOffset>(p, r0, v);
  for (; v < end; ++v) Columns<G, 1, kOffset>(p, r0, v);
}

template <int G>
void Span(const Problem& p, int64_t r0, int64_t begin, int64_t end) {
  if (p.offset) Span<G, true>(p, r0, begin, end);
  else Span<G, false>(p, r0, begin, end);
}

void Chunk(const Problem& p, int64_t begin, int64_t end) {
  for (int64_t r0 = 0; r0 < p.rows; r0 += kGroup) {
    switch (std::min<int64_t>(kGroup, p.rows - r0)) {
      case 1: Span<1>(p, r0, begin, end); break;
      case 2: Span<2>(p, r0, begin, end); break;
      case 3: Span<3>(p, r0, begin, end); break;
      case 4: Span<4>(p, r0, begin, end); break;
#if defined(__AVX512F__)
      case 5: Span<5>(p, r0, begin, end); break;
      case 6: Span<6>(p, r0, begin, end); break;
      case 7: Span<7>(p, r0, begin, end); break;
      case 8: Span<8>(p, r0, begin, end); break;
#endif
    }
  }
}

struct Shared {
  Problem problem;
  int64_t chunk, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Takes chunks until none is left; every chunk taken is finished by the thread that took it.
void Work(Shared& s) {
  for (int64_t c = s.next.fetch_add(1); c < s.chunks; c = s.next.fetch_add(1)) {
    const int64_t begin = c * s.chunk;
    Chunk(s.problem, begin, std::min(begin + s.chunk, s.problem.vocab));
    s.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error Run(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& hidden, ffi::Buffer<ffi::S8>& q,
               ffi::Buffer<ffi::F32>& scale, const float* offset, ffi::Result<ffi::Buffer<ffi::F32>>& out) {
  const auto hd = hidden.dimensions();
  const auto qd = q.dimensions();
  const auto sd = scale.dimensions();
  const auto od = out->dimensions();
  if (hd.size() != 2 || qd.size() != 2 || sd.size() != 2 || od.size() != 2)
    return ffi::Error::InvalidArgument("int8 block matmul takes hidden [R, d], q [V, d], scale [V, d / B] and "
                                       "returns [R, V]");
  const int64_t rows = hd[0], d = hd[1], vocab = qd[0];
  if (d <= 0 || qd[1] != d || sd[0] != vocab || sd[1] <= 0 || d % sd[1] != 0 || od[0] != rows || od[1] != vocab)
    return ffi::Error::InvalidArgument("int8 block matmul: hidden [" + std::to_string(rows) + ", " +
                                       std::to_string(d) + "], q [" + std::to_string(qd[0]) + ", " +
                                       std::to_string(qd[1]) + "] and scale [" + std::to_string(sd[0]) + ", " +
                                       std::to_string(sd[1]) + "] do not fit");
  const int64_t block = d / sd[1];
  if (block % kLanes != 0)
    return ffi::Error::InvalidArgument("int8 block matmul: the block size " + std::to_string(block) +
                                       " is not a multiple of " + std::to_string(kLanes));
  auto shared = std::make_shared<Shared>();
  shared->problem = Problem{hidden.typed_data(), q.typed_data(), scale.typed_data(), offset, out->typed_data(),
                            rows, d, vocab, block};
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // about 8 chunks per thread (a multiple of 4 rows, 16 to kMaxChunk), so small matrices still spread out
  shared->chunk = std::clamp<int64_t>((vocab / (8 * threads) + 3) / 4 * 4, 16, kMaxChunk);
  shared->chunks = (vocab + shared->chunk - 1) / shared->chunk;
  const int64_t helpers = std::min(threads, shared->chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { Work(*shared); });
  Work(*shared);
  while (shared->done.load(std::memory_order_acquire) < shared->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

ffi::Error Scaled(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hidden, ffi::Buffer<ffi::S8> q,
                  ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> out) {
  return Run(pool, hidden, q, scale, nullptr, out);
}

ffi::Error Affine(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hidden, ffi::Buffer<ffi::S8> q,
                  ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset, ffi::ResultBuffer<ffi::F32> out) {
  const auto sd = scale.dimensions();
  const auto od = offset.dimensions();
  if (od.size() != sd.size() || (od.size() == 2 && (od[0] != sd[0] || od[1] != sd[1])))
    return ffi::Error::InvalidArgument("int8 block matmul: the offsets' shape differs from the scales'");
  return Run(pool, hidden, q, scale, offset.typed_data(), out);
}

}  // namespace

// out = hidden · (scale · q)ᵀ
XLA_FFI_DEFINE_HANDLER_SYMBOL(DsparkInt8Scaled, Scaled,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// out = hidden · (scale · q - offset)ᵀ
XLA_FFI_DEFINE_HANDLER_SYMBOL(DsparkInt8Affine, Affine,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
