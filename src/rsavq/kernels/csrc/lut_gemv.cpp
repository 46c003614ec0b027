// CPU kernels for RSAVQ codes: a lookup-table GEMV for decode (a few tokens), a GEMM that decodes
// the weight as it multiplies for prefill, and a dequantizer (bf16 inputs, autograd); and a GEMV
// for the unquantized weights a checkpoint stores in bfloat16 (`stored_gemv`, at the end).
//
// x      [T, n]        float32 inputs in the original channel order.
// perm   [n]           int16/int32: permuted column i of the codes is input channel perm[i].
// codes  per group g:  [m, W_g] int32, per output row J_g = n_vec_g * P codes of widths[g] bits,
//                      packed little-endian (rsavq.packing), possibly straddling two words.
// books  per group g:  [P, K_g, d] float16 codebooks (d = v / P).
// out    [T, m]        float32.
//
// GEMV: per group, the table lut[t, j, k] = <x sub-vector j of token t, codeword k of position
// j % P> is built once (x read through perm; padding past the group's columns counts as zero);
// every output row then
// sums the J_g entries its codes pick. With AVX-512 (compiled with -march=native), 64 rows are
// done at once: the packed words of 16 rows are loaded a cache line per row and transposed so
// that one register holds a word of 16 rows, the codes of all 16 cut out with one double shift
// (VBMI2; two shifts without), and tables of <= 64 entries are
// looked up from registers with permutes (larger ones with gathers). The j axis is cut into
// chunks whose tables fit in L2.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && \
    defined(__AVX512BF16__)
#define RSAVQ_AMX 1  // prefill on the AMX tile unit (prefill_amx)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kMinTable = 16;        // tables padded to a whole register of floats
constexpr int64_t kTileRows = 64;        // rows per AVX-512 tile (4 registers of 16)
constexpr int64_t kChunkFloats = 1 << 17;  // 512 KiB of tables per j chunk (L2-sized)
// Rows of the weight dequantized per block by the prefill without AVX-512: 1024 measured best
// (AMD Zen 3, 512 tokens, MKL: 0.92-0.99x of dense against 0.89-0.97x for 512 or 2048 rows and
// 0.91-0.95x for the whole weight at once, in a probe outside the repository).
constexpr int64_t kPrefillRows = 1024;

struct Group {
  const uint32_t* codes;  // [m, W]
  int64_t W, J, K, Kp, width;
};

// dst[t * token_stride + j * Kp + k] = <sub-vector j of token t, codeword k of position j % P>
// (codebooks fp16 [P, K, d]; entries k >= K zero).
void build_table(const float* x, const int32_t* perm, int64_t n, int64_t T, int64_t start,
                 int64_t cols, int64_t v, const at::Half* book, int64_t P, int64_t K, int64_t J,
                 int64_t Kp, float* dst, int64_t token_stride) {
  const int64_t d = v / P;
  std::vector<float> bt(P * d * Kp, 0.f);  // [P, d, Kp] float32, transposed for k-contiguity
  for (int64_t p = 0; p < P; ++p)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t e = 0; e < d; ++e)
        bt[(p * d + e) * Kp + k] = static_cast<float>(book[(p * K + k) * d + e]);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < J; ++j) {
      const int64_t col = (j / P) * v + (j % P) * d;
      float* row = dst + t * token_stride + j * Kp;
      for (int64_t e = 0; e < d && col + e < cols; ++e) {
        const float s = x[t * n + perm[start + col + e]];
        const float* b = bt.data() + ((j % P) * d + e) * Kp;
        for (int64_t k = 0; k < Kp; ++k) row[k] += s * b[k];
      }
    }
}

inline int64_t code_at(const uint32_t* row, uint64_t bit, int64_t width, uint64_t mask) {
  const uint64_t w = bit >> 5, off = bit & 31;
  const uint64_t both = row[w] | (off + width > 32 ? uint64_t{row[w + 1]} << 32 : 0);
  return static_cast<int64_t>((both >> off) & mask);
}

// Rows [r0, r1), all codes: one row at a time (any CPU; the AVX-512 tiles' leftovers).
void rows_scalar(const float* L, int64_t T, const Group& G, int64_t r0, int64_t r1, float* out,
                 int64_t m) {
  const uint64_t mask = (uint64_t{1} << G.width) - 1;
  for (int64_t r = r0; r < r1; ++r) {
    const uint32_t* row = G.codes + r * G.W;
    for (int64_t t = 0; t < T; ++t) {
      const float* Lt = L + t * G.J * G.Kp;
      float acc = 0.f;
      for (int64_t j = 0; j < G.J; ++j) acc += Lt[j * G.Kp + code_at(row, j * G.width, G.width, mask)];
      out[t * m + r] += acc;
    }
  }
}

#if defined(__AVX512F__)
// In place: r[i] lane j <- r[j] lane i (a 16 x 16 transpose of 32-bit words).
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// Words [w0, w0 + 16) of the 16 rows from `row`, transposed into dst[w - w0][row lane] (zero
// past the rows' end): one cache line per row instead of a gather per word.
inline void stage16(const Group& G, int64_t row, int64_t w0, uint32_t* dst) {
  const int64_t n = std::min<int64_t>(16, G.W - w0);
  const __mmask16 k = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << std::max<int64_t>(n, 0)) - 1);
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_epi32(k, G.codes + (row + i) * G.W + w0);
  transpose16(r);
  for (int i = 0; i < 16; ++i) _mm512_store_si512(dst + 16 * i, r[i]);
}

// A token's table for one j, held in registers when it has 16, 32 or 64 entries (KP; else
// KP = 0: looked up with gathers).
template <int KP>
struct Table {
  __m512 t[KP ? KP / 16 : 1];
  const float* tab;
  explicit Table(const float* p) : tab(p) {
    for (int i = 0; i < KP / 16; ++i) t[i] = _mm512_loadu_ps(p + 16 * i);
  }
  // 16 entries picked by the low bits of `idx` (permutes read only the bits they need).
  __m512 operator()(__m512i idx) const {
    if constexpr (KP == 16) return _mm512_permutexvar_ps(idx, t[0]);
    if constexpr (KP == 32) return _mm512_permutex2var_ps(t[0], idx, t[1]);
    if constexpr (KP == 64) {
      const __m512 lo = _mm512_permutex2var_ps(t[0], idx, t[1]);
      const __m512 hi = _mm512_permutex2var_ps(t[2], idx, t[3]);
      return _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), lo, hi);
    }
    return _mm512_i32gather_ps(idx, tab, 4);  // idx already masked to the code width
  }
};

// The code starting `off` bits into `cur` (continuing into `nxt`), in every lane; unmasked.
inline __m512i cut(__m512i cur, __m512i nxt, int off) {
#if defined(__AVX512VBMI2__)
  return _mm512_shrdv_epi32(cur, nxt, _mm512_set1_epi32(off));
#else
  return _mm512_or_si512(_mm512_srl_epi32(cur, _mm_cvtsi32_si128(off)),
                         _mm512_sll_epi32(nxt, _mm_cvtsi32_si128(32 - off)));  // 32 -> zeros
#endif
}

// Rows [r0, r0 + 64), codes [ja, jb), NT tokens, accumulated into out. The words of the 4
// blocks of 16 rows are staged 16 at a time, transposed, in a ring of 32 words per block.
template <int NT, int KP>
void tile_avx512(const float* L, const Group& G, int64_t r0, int64_t ja, int64_t jb, float* out,
                 int64_t m) {
  constexpr int B = kTileRows / 16;
  alignas(64) uint32_t ring[B][32 * 16];
  const __m512i mask = _mm512_set1_epi32(static_cast<int>((uint64_t{1} << G.width) - 1));
  __m512 acc[NT][B];
  __m512i cur[B], nxt[B], idx[B];
  for (int t = 0; t < NT; ++t)
    for (int b = 0; b < B; ++b) acc[t][b] = _mm512_loadu_ps(out + t * m + r0 + 16 * b);
  int64_t lw = (ja * G.width) >> 5, staged = lw & ~int64_t{15};  // words [.., staged) are in
  auto word = [&](int b, int64_t w) {
    return _mm512_load_si512(ring[b] + (w & 31) * 16);
  };
  auto stage = [&]() {  // the next 16 words of every block
    for (int b = 0; b < B; ++b) stage16(G, r0 + 16 * b, staged, ring[b] + (staged & 31) * 16);
    staged += 16;
  };
  stage();
  if (lw + 1 >= staged) stage();
  for (int b = 0; b < B; ++b) cur[b] = word(b, lw), nxt[b] = word(b, lw + 1);
  for (int64_t j = ja; j < jb; ++j) {
    const int64_t bit = j * G.width;
    if ((bit >> 5) != lw) {  // codes are <= 16 bits: the next word at most
      ++lw;
      if (lw + 1 >= staged) stage();
      for (int b = 0; b < B; ++b) cur[b] = nxt[b], nxt[b] = word(b, lw + 1);
    }
    for (int b = 0; b < B; ++b) {
      idx[b] = cut(cur[b], nxt[b], static_cast<int>(bit & 31));
      if constexpr (KP == 0) idx[b] = _mm512_and_si512(idx[b], mask);
    }
    for (int t = 0; t < NT; ++t) {
      const Table<KP> table(L + (t * G.J + j) * G.Kp);
      for (int b = 0; b < B; ++b) acc[t][b] = _mm512_add_ps(acc[t][b], table(idx[b]));
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int b = 0; b < B; ++b) _mm512_storeu_ps(out + t * m + r0 + 16 * b, acc[t][b]);
}

template <int NT, int KP>
void tiles_avx512(const float* L, const Group& G, int64_t tile0, int64_t tile1, int64_t ja,
                  int64_t jb, float* out, int64_t m) {
  for (int64_t tile = tile0; tile < tile1; ++tile)
    tile_avx512<NT, KP>(L, G, tile * kTileRows, ja, jb, out, m);
}

template <int NT>
void tiles_nt(const float* L, const Group& G, int64_t tile0, int64_t tile1, int64_t ja,
              int64_t jb, float* out, int64_t m) {
  switch (G.K) {  // permutes when the table is exactly 16, 32 or 64 entries
    case 16: return tiles_avx512<NT, 16>(L, G, tile0, tile1, ja, jb, out, m);
    case 32: return tiles_avx512<NT, 32>(L, G, tile0, tile1, ja, jb, out, m);
    case 64: return tiles_avx512<NT, 64>(L, G, tile0, tile1, ja, jb, out, m);
    default: return tiles_avx512<NT, 0>(L, G, tile0, tile1, ja, jb, out, m);
  }
}

void tiles(const float* L, int64_t T, const Group& G, int64_t tile0, int64_t tile1, int64_t ja,
           int64_t jb, float* out, int64_t m) {
  switch (T) {
    case 1: return tiles_nt<1>(L, G, tile0, tile1, ja, jb, out, m);
    case 2: return tiles_nt<2>(L, G, tile0, tile1, ja, jb, out, m);
    case 3: return tiles_nt<3>(L, G, tile0, tile1, ja, jb, out, m);
    case 4: return tiles_nt<4>(L, G, tile0, tile1, ja, jb, out, m);
    default:
      for (int64_t t = 0; t < T; ++t)  // one token at a time: its table, its output row
        tiles_nt<1>(L + t * G.J * G.Kp, G, tile0, tile1, ja, jb, out + t * m, m);
  }
}
constexpr bool kVector = true;
#else
void tiles(const float*, int64_t, const Group&, int64_t, int64_t, int64_t, int64_t, float*,
           int64_t) {}
constexpr bool kVector = false;
#endif

// All rows of one group: AVX-512 tiles where it is compiled, rows one by one otherwise.
void gather_sum(const std::vector<float>& lut, int64_t T, const Group& G, float* out, int64_t m) {
  const float* L = lut.data();
  const int64_t tiles_n = kVector ? m / kTileRows : 0, done = tiles_n * kTileRows;
  const int64_t chunk = std::max<int64_t>(1, kChunkFloats / (T * G.Kp));
  at::parallel_for(0, std::max<int64_t>(tiles_n, 1), 1, [&](int64_t a, int64_t b) {
    for (int64_t ja = 0; ja < G.J; ja += chunk) {
      const int64_t jb = std::min(G.J, ja + chunk);
      if (tiles_n) tiles(L, T, G, a, std::min(b, tiles_n), ja, jb, out, m);
    }
  });
  at::parallel_for(done, m, 16, [&](int64_t a, int64_t b) {
    rows_scalar(L, T, G, a, b, out, m);
  });
}

Group group_of(const torch::Tensor& codes, const torch::Tensor& book, int64_t size, int64_t width,
               int64_t v, int64_t m) {
  TORCH_CHECK((book.scalar_type() == torch::kHalf || book.scalar_type() == torch::kFloat) &&
                  book.is_contiguous(),
              "fp16 or float32 codebooks");
  TORCH_CHECK(codes.scalar_type() == torch::kInt && codes.is_contiguous(), "int32 codes");
  const int64_t P = book.size(0), K = book.size(1), d = book.size(2);
  TORCH_CHECK(d * P == v && K == (int64_t{1} << width) && width <= 16, "codebook shape");
  const int64_t J = (size + v - 1) / v * P;
  TORCH_CHECK(codes.size(0) == m && codes.size(1) * 32 >= J * width, "codes shape");
  const auto* C = reinterpret_cast<const uint32_t*>(codes.data_ptr<int32_t>());
  return Group{C, codes.size(1), J, K, std::max(K, kMinTable), width};
}


// ---- Decode of codes of at most 8 bits: bytes repacked per tile of 64 rows, int16 tables ----
// A layer's codes repacked (vq_repack): uint8, row r of tile r / 64 at byte slot(r % 64) of each
// j's 64 bytes (placed so that the sums below come out in row order), in chunks of 64 js. Per
// chunk, each thread builds the chunk's tables (every token's, entries padded to Kp = 64, 128
// or 256) straight into int16, one step per token: a bound on the chunk's entries (the longest
// sub-vector of x times the longest codeword) over kSteps, each entry within half a step; they
// are stored per j as two byte planes (low bytes, then high bytes, Kp each), and each row's
// entries are summed exactly in int32 before step * sum is added to the row's float total.
// Threads split the chunks. AVX-512: the 64 codes of a j are one load; each plane is looked up
// for all 64 rows from Kp / 64 registers (vpermb / vpermi2b, a blend on code bit 7 at 256
// entries), the planes are interleaved back into int16 (vpunpck*bw) and summed by vpdpwssd.
constexpr int64_t kChunkJ = 64;
constexpr int64_t kMaxSubDim = 64;  // weights per sub-vector served by vq_gemv16
constexpr float kSteps = 32000.f;  // the table bound maps to this many steps (< 32767: margin)
constexpr int64_t kTokenBlock = 4;  // tokens per pass over the codes
constexpr int64_t kPrefetchJ = 256;  // codes fetched this many js (16 KiB) ahead
constexpr int kSharedTiles = 3;  // tiles sharing each table load for one token

constexpr int64_t slot(int64_t r) {
  constexpr int64_t quarter[4] = {0, 1, 8, 9};
  const int64_t k = r & 15;
  return 16 * (k >> 2) + 2 * (k & 3) + quarter[(r >> 4) & 3];
}

// Which look-up the build has: AVX-512 byte permutes (VBMI; sums by VNNI), AVX2 byte shuffles
// (vpshufb, 16 entries per register), or plain loads.
#if defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define RSAVQ_LUT16 512
#elif defined(__AVX2__) && defined(__FMA__)
#define RSAVQ_LUT16 256
#else
#define RSAVQ_LUT16 0
#endif

// How a table of Kp int16 entries is stored (2 Kp bytes either way): as two byte planes (the Kp
// low bytes, then the Kp high bytes) where a vector look-up serves it, else as int16 entries.
// With AVX2 the shuffles serve up to 128 entries: 256 would need 32 table registers per j, and
// plain loads of int16 entries measured faster (0.37 against 0.68 ns a look-up, AMD Zen 3, in a
// microbenchmark outside the repository).
constexpr bool in_planes(int64_t Kp) {
  return RSAVQ_LUT16 == 512 || (RSAVQ_LUT16 == 256 && Kp <= 128);
}

// Where a tile's totals keep the row whose code is at byte slot s (slot(r) for row r): at r for
// the AVX-512 look-up, whose sums come out in row order; elsewhere at the lane of tile16_avx2's
// accumulators that sums slot s (register 4 h + q, lane e sums slot 32 h + 16 (e / 4) +
// 8 (q / 2) + 2 (e % 4) + q % 2), so that its totals are added as whole registers.
struct TotalAt {
  int8_t of_slot[kTileRows] = {}, of_row[kTileRows] = {};
  constexpr TotalAt() {
    for (int64_t r = 0; r < kTileRows; ++r) {
      const int64_t s = slot(r), h = s / 32, b = s % 16;
      const int64_t q = 2 * (b / 8) + b % 2, e = 4 * ((s % 32) / 16) + (b % 8) / 2;
      of_row[r] = static_cast<int8_t>(RSAVQ_LUT16 == 512 ? r : 32 * h + 8 * q + e);
      of_slot[s] = of_row[r];
    }
  }
};
constexpr TotalAt kTotalAt{};

// total[t * 64 + r] += step[t] * (sum over j < J of table j's entry code(r, j) for token t), the
// tables of token t at lut + t * ts (Kp int16 entries per j: the look-ups without a vector form
// are those of tables not in_planes), the codes at codes (64 bytes per j): four rows' codes per
// 4-byte read, into kTotalAt's order.
void tile16_scalar(const uint8_t* lut, int64_t ts, int64_t Kp, const uint8_t* codes, int64_t J,
                   int64_t T, const float* step, float* total) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t s0 = 0; s0 < kTileRows; s0 += 4) {
      int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (int64_t j = 0; j < J; ++j) {
        const auto* L = reinterpret_cast<const int16_t*>(lut + t * ts + j * 2 * Kp);
        uint32_t c;
        std::memcpy(&c, codes + j * 64 + s0, 4);
        a0 += L[c & 0xFF];
        a1 += L[(c >> 8) & 0xFF];
        a2 += L[(c >> 16) & 0xFF];
        a3 += L[c >> 24];
        asm("" : "+r"(a0), "+r"(a1), "+r"(a2), "+r"(a3));  // (gcc packed them into a vector)
      }
      float* f = total + t * kTileRows;
      f[kTotalAt.of_slot[s0]] += step[t] * static_cast<float>(a0);
      f[kTotalAt.of_slot[s0 + 1]] += step[t] * static_cast<float>(a1);
      f[kTotalAt.of_slot[s0 + 2]] += step[t] * static_cast<float>(a2);
      f[kTotalAt.of_slot[s0 + 3]] += step[t] * static_cast<float>(a3);
    }
}

#if RSAVQ_LUT16 == 256
// One byte plane of a table of 16 NS entries (T[s]: entries 16 s.. in both 128-bit lanes), looked
// up by 32 codes c: each register by the low four bits, then a tree of blends on bits 4.. .
template <int NS>
inline __m256i plane_avx2(const __m256i* T, __m256i c) {
  __m256i v[NS];
  for (int s = 0; s < NS; ++s) v[s] = _mm256_shuffle_epi8(T[s], c);
  int bit = 4;
  for (int n = NS; n > 1; n /= 2, ++bit) {
    const __m256i sel = _mm256_slli_epi16(c, 7 - bit);  // code bit `bit` to each byte's top
    for (int s = 0; s < n / 2; ++s) v[s] = _mm256_blendv_epi8(v[2 * s], v[2 * s + 1], sel);
  }
  return v[0];
}

// One tile (64 rows), one token, tables of 16 NS <= 128 entries in byte planes: the two halves
// of 32 codes in turn (four accumulators each: with both, they and the 2 NS table registers
// spilled), per j the table's registers looked up by the half's codes, the planes interleaved
// back into int16 and widened to int32 by vpmaddwd (one parity of the pairs each), summed
// exactly; the totals (in kTotalAt's order) gain step times the sums.
template <int NS>
void tile16_avx2(const uint8_t* lut, const uint8_t* codes, int64_t J, float step, float* total) {
  constexpr int64_t Kp = 16 * NS;
  const __m256i even = _mm256_set1_epi32(1), odd = _mm256_set1_epi32(1 << 16);
  for (int h = 0; h < 2; ++h) {
    __m256i A[4];
    for (auto& a : A) a = _mm256_setzero_si256();
    for (int64_t j = 0; j < J; ++j) {
      const uint8_t* L = lut + j * 2 * Kp;
      __m256i lo[NS], hi[NS];
      for (int s = 0; s < NS; ++s) {
        lo[s] = _mm256_broadcastsi128_si256(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(L + 16 * s)));
        hi[s] = _mm256_broadcastsi128_si256(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(L + Kp + 16 * s)));
      }
      const __m256i c =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + j * 64 + 32 * h));
      const __m256i a = plane_avx2<NS>(lo, c), b = plane_avx2<NS>(hi, c);
      const __m256i u0 = _mm256_unpacklo_epi8(a, b), u1 = _mm256_unpackhi_epi8(a, b);
      A[0] = _mm256_add_epi32(A[0], _mm256_madd_epi16(u0, even));
      A[1] = _mm256_add_epi32(A[1], _mm256_madd_epi16(u0, odd));
      A[2] = _mm256_add_epi32(A[2], _mm256_madd_epi16(u1, even));
      A[3] = _mm256_add_epi32(A[3], _mm256_madd_epi16(u1, odd));
    }
    const __m256 s = _mm256_set1_ps(step);
    for (int q = 0; q < 4; ++q) {
      float* f = total + 32 * h + 8 * q;
      _mm256_storeu_ps(f, _mm256_fmadd_ps(_mm256_cvtepi32_ps(A[q]), s, _mm256_loadu_ps(f)));
    }
  }
}
#endif

#if RSAVQ_LUT16 == 512
// One byte plane of a table held in R registers (64 R entries), looked up by the 64 codes c.
template <int R>
inline __m512i plane(const __m512i* P, __m512i c, __mmask64 bit7) {
  if constexpr (R == 1) return _mm512_permutexvar_epi8(c, P[0]);
  const __m512i a = _mm512_permutex2var_epi8(P[0], c, P[1]);
  if constexpr (R == 2) return a;
  return _mm512_mask_blend_epi8(bit7, a, _mm512_permutex2var_epi8(P[2], c, P[3]));
}

// RT tiles side by side (their codes `stride` bytes apart), NT tokens: each token's table is
// loaded into registers once per j and serves 64 RT rows.
template <int R, int NT, int RT>
void tile16(const uint8_t* lut, int64_t ts, const uint8_t* codes, int64_t stride, int64_t J,
            const float* step, float* total, int64_t tstride) {
  constexpr int64_t Kp = 64 * R;
  const __m512i even = _mm512_set1_epi32(1), odd = _mm512_set1_epi32(1 << 16);
  __m512i A[NT][RT][4];
  for (int t = 0; t < NT; ++t)
    for (int i = 0; i < RT; ++i)
      for (int q = 0; q < 4; ++q) A[t][i][q] = _mm512_setzero_si512();
  for (int64_t j = 0; j < J; ++j) {
    __m512i c[RT];
    __mmask64 bit7[RT];
    for (int i = 0; i < RT; ++i) {
      const uint8_t* at = codes + i * stride + j * 64;
      _mm_prefetch(reinterpret_cast<const char*>(at + kPrefetchJ * 64), _MM_HINT_T0);
      c[i] = _mm512_loadu_si512(at);
      bit7[i] = R == 4 ? _mm512_movepi8_mask(c[i]) : 0;
    }
    for (int t = 0; t < NT; ++t) {
      const uint8_t* L = lut + t * ts + j * 2 * Kp;
      __m512i lo[R], hi[R];
      for (int k = 0; k < R; ++k) {
        lo[k] = _mm512_loadu_si512(L + 64 * k);
        hi[k] = _mm512_loadu_si512(L + Kp + 64 * k);
      }
      for (int i = 0; i < RT; ++i) {
        const __m512i a = plane<R>(lo, c[i], bit7[i]), b = plane<R>(hi, c[i], bit7[i]);
        const __m512i u0 = _mm512_unpacklo_epi8(a, b), u1 = _mm512_unpackhi_epi8(a, b);
        A[t][i][0] = _mm512_dpwssd_epi32(A[t][i][0], u0, even);  // rows 0-15
        A[t][i][1] = _mm512_dpwssd_epi32(A[t][i][1], u0, odd);   // rows 16-31
        A[t][i][2] = _mm512_dpwssd_epi32(A[t][i][2], u1, even);  // rows 32-47
        A[t][i][3] = _mm512_dpwssd_epi32(A[t][i][3], u1, odd);   // rows 48-63
      }
    }
  }
  for (int t = 0; t < NT; ++t) {
    const __m512 s = _mm512_set1_ps(step[t]);
    for (int i = 0; i < RT; ++i)
      for (int q = 0; q < 4; ++q) {
        float* f = total + i * tstride + t * kTileRows + 16 * q;
        _mm512_storeu_ps(f, _mm512_fmadd_ps(_mm512_cvtepi32_ps(A[t][i][q]), s, _mm512_loadu_ps(f)));
      }
  }
}
#endif

// Tiles [0, tiles) of a run (codes `stride` bytes apart, totals `tstride` floats apart), J codes,
// tokens [0, T) (T <= kTokenBlock).
template <int R>
void tiles16(const uint8_t* lut, int64_t ts, const uint8_t* codes, int64_t stride, int64_t tiles,
             int64_t J, int64_t T, const float* step, float* total, int64_t tstride) {
#if RSAVQ_LUT16 == 512
  int64_t i = 0;
  auto run = [&](auto nt, auto rt) {  // tiles i.. by rt, while rt of them are left
    for (; i + rt.value <= tiles; i += rt.value)
      tile16<R, nt.value, rt.value>(lut, ts, codes + i * stride, stride, J, step,
                                    total + i * tstride, tstride);
  };
  using std::integral_constant;
  switch (T) {
    case 1:  // tiles three at a time, then the one or two left
      run(integral_constant<int, 1>{}, integral_constant<int, kSharedTiles>{});
      run(integral_constant<int, 1>{}, integral_constant<int, 2>{});
      return run(integral_constant<int, 1>{}, integral_constant<int, 1>{});
    case 2: return run(integral_constant<int, 2>{}, integral_constant<int, 1>{});
    case 3: return run(integral_constant<int, 3>{}, integral_constant<int, 1>{});
    default: return run(integral_constant<int, 4>{}, integral_constant<int, 1>{});
  }
#else
#if RSAVQ_LUT16 == 256
  if constexpr (R <= 2) {  // tables in byte planes: a token at a time
    for (int64_t i = 0; i < tiles; ++i)
      for (int64_t t = 0; t < T; ++t)
        tile16_avx2<4 * R>(lut + t * ts, codes + i * stride, J, step[t],
                           total + i * tstride + t * kTileRows);
    return;
  }
#endif
  for (int64_t i = 0; i < tiles; ++i)
    tile16_scalar(lut, ts, 64 * R, codes + i * stride, J, T, step, total + i * tstride);
#endif
}

void tiles16_any(const uint8_t* lut, int64_t ts, int64_t Kp, const uint8_t* codes,
                 int64_t stride, int64_t tiles, int64_t J, int64_t T, const float* step,
                 float* total, int64_t tstride) {
  switch (Kp) {
    case 64: return tiles16<1>(lut, ts, codes, stride, tiles, J, T, step, total, tstride);
    case 128: return tiles16<2>(lut, ts, codes, stride, tiles, J, T, step, total, tstride);
    default: return tiles16<4>(lut, ts, codes, stride, tiles, J, T, step, total, tstride);
  }
}

// A group's sub-vectors of x in the codes' order, vector by vector (J of d entries, sub-vector j
// = columns (j / P) v + (j % P) d.. of the group, zero past its `cols` columns), into s; each
// one's length times `norm` (a bound on its table's entries) into bound. Returns false when x
// holds an inf or a nan.
inline bool sub_vectors(const float* x, const int32_t* perm, int64_t start, int64_t cols,
                        int64_t v, int64_t P, int64_t J, float norm, float* s, float* bound) {
  const int64_t d = v / P;
  bool finite = true;
  for (int64_t u = 0, j = 0; j < J; ++u)
    for (int64_t p = 0; p < P && j < J; ++p, ++j, s += d) {
      const int64_t col = u * v + p * d;
      float sq = 0.f;
      for (int64_t e = 0; e < d; ++e) {
        s[e] = col + e < cols ? x[perm[start + col + e]] : 0.f;
        finite &= std::isfinite(s[e]);
        sq += s[e] * s[e];
      }
      bound[j] = std::sqrt(sq) * norm;
    }
  return finite;
}

#if RSAVQ_LUT16 == 512
// The byte of each of 64 int16 entries packed by _mm512_packs_epi32 from four registers of 16
// int32 (pairs (0, 1) and (2, 3): each 128-bit lane holds four entries of one, then four of
// the other): index e of the result picks byte `high` of entry e from (w01, w23).
inline __m512i plane_index(int high) {
  alignas(64) uint8_t idx[64];
  for (int e = 0; e < 64; ++e) {
    const int f = e & 31, word = f < 16 ? 8 * (f / 4) + f % 4 : 8 * ((f - 16) / 4) + 4 + f % 4;
    idx[e] = static_cast<uint8_t>((e >= 32 ? 64 : 0) + 2 * word + high);
  }
  return _mm512_load_si512(idx);
}

// 64 entries k.. of table j, round(<s, codeword>) (s already divided by the step), as their low
// bytes at lo and their high bytes at hi: four independent FMA chains (one would wait on its own
// latency), the int32s packed to int16 and split into byte planes with one permute each (the
// permutes' indices from plane_index). D > 0: the sub-vectors' length, known when compiled.
template <int D>
inline void planes64(const float* s, const float* b, int64_t d, int64_t Kp, __m512i lo_idx,
                     __m512i hi_idx, uint8_t* lo, uint8_t* hi) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                 _mm512_setzero_ps()};
  for (int64_t e = 0; e < (D > 0 ? D : d); ++e) {
    const __m512 se = _mm512_set1_ps(s[e]);
    for (int q = 0; q < 4; ++q) a[q] = _mm512_fmadd_ps(se, _mm512_loadu_ps(b + e * Kp + 16 * q), a[q]);
  }
  __m512i r[4];
  for (int q = 0; q < 4; ++q) r[q] = _mm512_cvtps_epi32(a[q]);  // to nearest even
  const __m512i w01 = _mm512_packs_epi32(r[0], r[1]), w23 = _mm512_packs_epi32(r[2], r[3]);
  _mm512_storeu_si512(lo, _mm512_permutex2var_epi8(w01, lo_idx, w23));
  _mm512_storeu_si512(hi, _mm512_permutex2var_epi8(w01, hi_idx, w23));
}
#elif RSAVQ_LUT16 == 256
// 16 entries k.. of table j (AVX2), as planes64 computes them, to the table at dst in its layout
// (in_planes): two FMA chains, the int32s packed to int16 in order, then stored as they are or
// split into their low and high bytes.
template <int D>
inline void entries16(const float* s, const float* b, int64_t d, int64_t Kp, int64_t k,
                      uint8_t* dst) {
  __m256 a[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t e = 0; e < (D > 0 ? D : d); ++e) {
    const __m256 se = _mm256_set1_ps(s[e]);
    for (int q = 0; q < 2; ++q) a[q] = _mm256_fmadd_ps(se, _mm256_loadu_ps(b + e * Kp + 8 * q), a[q]);
  }
  const __m256i w = _mm256_permute4x64_epi64(
      _mm256_packs_epi32(_mm256_cvtps_epi32(a[0]), _mm256_cvtps_epi32(a[1])), 0xD8);
  if (!in_planes(Kp)) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * k), w);
    return;
  }
  const __m256i bytes = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0,
                                         2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i split = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(w, bytes), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), _mm256_castsi256_si128(split));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + Kp + k), _mm256_extracti128_si256(split, 1));
}
#endif

// The tables of js [j0, j1) of a group for one token, rounded to int16 entry by entry,
// round(<x_j, codeword k> / step) (inv = 1 / step; xs: the js' sub-vectors, d each), at dst
// (2 Kp bytes per j, laid out as in_planes says); bt: the codebooks transposed, float32
// [P, d, Kp]. No float table is written. (|entries| stay below 32767: the step bounds them, so
// packing to int16 never saturates.) D: d when it is known when compiled, else 0.
template <int D>
void build_planes(const float* xs, int64_t d, const float* bt, int64_t P, int64_t j0, int64_t j1,
                  int64_t Kp, float inv, uint8_t* dst) {
#if RSAVQ_LUT16 == 512
  const __m512i lo_idx = plane_index(0), hi_idx = plane_index(1);
#endif
  float s[kMaxSubDim];
  for (int64_t j = j0, p = j0 % P; j < j1; ++j, xs += d, dst += 2 * Kp, p = p + 1 == P ? 0 : p + 1) {
    for (int64_t e = 0; e < d; ++e) s[e] = xs[e] * inv;
    const float* b = bt + p * d * Kp;
    int64_t k = 0;
#if RSAVQ_LUT16 == 512
    for (; k + 64 <= Kp; k += 64)
      planes64<D>(s, b + k, d, Kp, lo_idx, hi_idx, dst + k, dst + Kp + k);
#elif RSAVQ_LUT16 == 256
    for (; k + 16 <= Kp; k += 16) entries16<D>(s, b + k, d, Kp, k, dst);
#endif
    for (; k < Kp; ++k) {
      float acc = 0.f;
      for (int64_t e = 0; e < d; ++e) acc = std::fma(s[e], b[e * Kp + k], acc);
      const auto q = static_cast<int32_t>(std::nearbyint(acc));
      if (!in_planes(Kp)) {
        const auto e = static_cast<int16_t>(q);
        std::memcpy(dst + 2 * k, &e, 2);
        continue;
      }
      dst[k] = static_cast<uint8_t>(q & 0xFF);
      dst[Kp + k] = static_cast<uint8_t>((q >> 8) & 0xFF);
    }
  }
}

// build_planes with the sub-vectors' length compiled in where it is 1, 2, 4 or 8.
void build_planes_any(const float* xs, int64_t d, const float* bt, int64_t P, int64_t j0,
                      int64_t j1, int64_t Kp, float inv, uint8_t* dst) {
  switch (d) {
    case 1: return build_planes<1>(xs, d, bt, P, j0, j1, Kp, inv, dst);
    case 2: return build_planes<2>(xs, d, bt, P, j0, j1, Kp, inv, dst);
    case 4: return build_planes<4>(xs, d, bt, P, j0, j1, Kp, inv, dst);
    case 8: return build_planes<8>(xs, d, bt, P, j0, j1, Kp, inv, dst);
    default: return build_planes<0>(xs, d, bt, P, j0, j1, Kp, inv, dst);
  }
}


}  // namespace

torch::Tensor vq_gemv(torch::Tensor x, torch::Tensor perm, std::vector<torch::Tensor> codes,
                      std::vector<torch::Tensor> books, std::vector<int64_t> sizes,
                      std::vector<int64_t> widths, int64_t v, int64_t m) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x");
  const int64_t T = x.size(0), n = x.size(1);
  TORCH_CHECK(perm.dim() == 1 && perm.size(0) == n, "perm must have one entry per input");
  const auto order = perm.to(torch::kInt).contiguous();
  for (const auto& book : books) TORCH_CHECK(book.scalar_type() == torch::kHalf, "fp16 codebooks");
  auto out = torch::zeros({T, m}, x.options());
  static thread_local std::vector<float> lut;  // kept between calls: no page faults per call
  int64_t start = 0;
  for (size_t g = 0; g < sizes.size(); ++g) {
    const Group G = group_of(codes[g], books[g], sizes[g], widths[g], v, m);
    lut.assign(T * G.J * G.Kp, 0.f);
    build_table(x.data_ptr<float>(), order.data_ptr<int32_t>(), n, T, start, sizes[g], v,
                books[g].data_ptr<at::Half>(), books[g].size(0), G.K, G.J, G.Kp, lut.data(),
                G.J * G.Kp);
    gather_sum(lut, T, G, out.data_ptr<float>(), m);
    start += sizes[g];
  }
  TORCH_CHECK(start == n, "group sizes must add up to the input features");
  return out;
}

// ---- Prefill: the weight dequantized a block of rows at a time, each block multiplied at once --

// The first codes of a row (`width` <= 14 bits each, packed little-endian from `row`, `end`
// bytes readable from there) as whole vectors of D floats at out (vector j = entry code(j) of C,
// float32 [K, D]), four codes per 8-byte read; returns how many were written (at most J, all
// ending within `cols`; the caller does the rest).
template <int D>
int64_t copy_vectors(const uint32_t* row, int64_t end, int64_t width, int64_t J, int64_t cols,
                     const float* C, float* out) {
  const int64_t whole = std::min(J, cols / D);
  const auto* bytes = reinterpret_cast<const uint8_t*>(row);
  const uint64_t mask = (uint64_t{1} << width) - 1;
  int64_t j = 0;
  for (; j + 4 <= whole && ((j * width) >> 3) + 8 <= end; j += 4) {
    uint64_t bits;
    std::memcpy(&bits, bytes + ((j * width) >> 3), 8);
    bits >>= (j * width) & 7;
    for (int i = 0; i < 4; ++i) {
      const float* w = C + ((bits >> (i * width)) & mask) * D;
      std::memcpy(out + (j + i) * D, w, D * sizeof(float));  // one 8- or 16-byte move
    }
  }
  return j;
}

// A group as the dequantizers read it.
struct Block {
  Group G;
  const float* C;  // float32 codebook [P, K, d]
  int64_t P, d, cols, rows;
};

// Each group's Block (rows x cols of the group's block); `floats` keeps the float32 codebooks.
std::vector<Block> blocks_of(const std::vector<torch::Tensor>& codes,
                             const std::vector<torch::Tensor>& books,
                             const std::vector<int64_t>& sizes, const std::vector<int64_t>& widths,
                             int64_t v, int64_t m, std::vector<torch::Tensor>& floats) {
  std::vector<Block> blocks;
  for (size_t g = 0; g < sizes.size(); ++g) {
    const int64_t rows = m, cols = sizes[g];
    floats.push_back(books[g].to(torch::kFloat).contiguous());
    const int64_t P = books[g].size(0);
    blocks.push_back({group_of(codes[g], books[g], cols, widths[g], v, rows),
                      floats.back().data_ptr<float>(), P, v / P, cols, rows});
  }
  return blocks;
}

// Row r of a group's block into out[0, cols).
void decode_row(const Block& B, int64_t r, int64_t v, float* out) {
  const Group& G = B.G;
  const uint32_t* row = G.codes + r * G.W;
  const int64_t end = (B.rows - r) * G.W * 4;  // bytes to the end of the codes
  int64_t j = 0;
  if (B.P == 1 && B.d == 4 && G.width <= 14)
    j = copy_vectors<4>(row, end, G.width, G.J, B.cols, B.C, out);
  if (B.P == 1 && B.d == 2 && G.width <= 14)
    j = copy_vectors<2>(row, end, G.width, G.J, B.cols, B.C, out);
  const uint64_t mask = (uint64_t{1} << G.width) - 1;
  for (; j < G.J; ++j) {  // any layout: each code read from the packed words
    const int64_t p = j % B.P, c0 = (j / B.P) * v + p * B.d, c1 = std::min(c0 + B.d, B.cols);
    const float* w = B.C + (p * G.K + code_at(row, j * G.width, G.width, mask)) * B.d;
    for (int64_t c = c0; c < c1; ++c) out[c] = w[c - c0];
  }
}

// Rows [r0, r1) of a layer's weight, columns in the codes' permuted order, into dst [r1 - r0, n];
// each row times scale[r] where `scale` is given (row scales applied while the row is in L1).
void dequantize_rows(const std::vector<Block>& blocks, int64_t v, int64_t n, int64_t r0,
                     int64_t r1, float* dst, const float* scale = nullptr) {
  at::parallel_for(r0, r1, 16, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      float* row = dst + (r - r0) * n;
      float* out = row;
      for (const Block& B : blocks) {
        decode_row(B, r, v, out);
        out += B.cols;
      }
      if (scale)
        for (int64_t c = 0; c < n; ++c) row[c] *= scale[r];
    }
  });
}

// The weight [m, n] as float32 (dequantize once, then one dense matmul), columns in the permuted
// order of the codes (W[:, perm]; multiply x[:, perm], cheaper than scattering the columns of W).
// Written into `workspace` when given and large enough (a buffer reused across calls: a fresh
// 64 MiB tensor costs as much in page faults as the dequantization itself).
torch::Tensor vq_dequantize(std::vector<torch::Tensor> codes, std::vector<torch::Tensor> books,
                            std::vector<int64_t> sizes, std::vector<int64_t> widths, int64_t v,
                            int64_t m, int64_t n, std::optional<torch::Tensor> workspace) {
  int64_t total = 0;
  for (int64_t size : sizes) total += size;
  TORCH_CHECK(total == n, "group sizes must add up to the input features");
  const bool reuse = workspace && workspace->scalar_type() == torch::kFloat &&
                     workspace->is_contiguous() && workspace->numel() >= m * n;
  auto W = reuse ? workspace->flatten().narrow(0, 0, m * n).view({m, n})
                 : torch::empty({m, n}, torch::kFloat);
  float* out = W.data_ptr<float>();
  std::vector<torch::Tensor> floats;
  const auto blocks = blocks_of(codes, books, sizes, widths, v, m, floats);
  dequantize_rows(blocks, v, n, 0, m, out);
  return W;
}

#if !defined(__AVX512F__)
// XP [T, n] = X[:, perm] (O: perm).
void permute_columns(const float* X, const int32_t* O, int64_t T, int64_t n, float* XP) {
  at::parallel_for(0, T, 16, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t)
      for (int64_t i = 0; i < n; ++i) XP[t * n + i] = X[t * n + O[i]];
  });
}
#endif

// The first `numel` floats of `buffer`, grown (float32, contiguous) when too small.
torch::Tensor reusable(torch::Tensor& buffer, int64_t numel) {
  if (!buffer.defined() || buffer.numel() < numel) buffer = torch::empty({numel}, torch::kFloat);
  return buffer.narrow(0, 0, numel);
}

#if defined(__AVX512F__)
// ---- Prefill on AVX-512: the weight decoded 12 rows at a time straight into the multiply ----
// out [T, m] = x W^T as a GEMM whose weight side is never written out whole: the columns (in the
// codes' order) are cut into chunks of about kChunkCols; per chunk, x[:, perm] is packed once as
// panels of 32 tokens [k][32] (the vector side, L2-resident), and each thread decodes 12 rows of
// the chunk at a time into an L1 buffer (the broadcast side) and multiplies them by every token
// panel, 12 x 32 accumulators in registers. Partial sums between chunks go to out^T [m, T]; the
// last chunk applies row scales and bias and writes out [T, m].
constexpr int kPanelTokens = 32;    // tokens per micro-tile (two registers)
constexpr int kPanelRows = 12;      // weight rows per micro-tile
constexpr int64_t kChunkCols = 512;  // columns per chunk, about
constexpr int64_t kPanelBytes = 2 << 20;  // token panels multiplied per decode (2 MiB, L2)

// Whole vectors [a, b) of block `block`, columns from `col` within the chunk.
struct Segment {
  int64_t block, a, b, col, cols;
};
struct Chunk {
  int64_t c0, cols;
  std::vector<Segment> segments;
};

// A mask of the first `count` of 16 lanes (none when count <= 0, all when count >= 16).
inline __mmask16 first_lanes(int64_t count) {
  return count <= 0 ? 0 : count >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << count) - 1);
}

// The chunks of a layer: each block's vectors in order, at most `width` columns per chunk (at
// least one vector).
std::vector<Chunk> chunks_of(const std::vector<Block>& blocks, int64_t v, int64_t width) {
  std::vector<Chunk> chunks(1, Chunk{0, 0, {}});
  for (int64_t g = 0; g < static_cast<int64_t>(blocks.size()); ++g) {
    const int64_t vectors = (blocks[g].cols + v - 1) / v;
    for (int64_t a = 0; a < vectors;) {
      Chunk* c = &chunks.back();
      if (c->cols > 0 && c->cols + v > width) {
        chunks.push_back(Chunk{c->c0 + c->cols, 0, {}});
        c = &chunks.back();
      }
      const int64_t b = std::min(vectors, a + std::max<int64_t>(1, (width - c->cols) / v));
      const int64_t cols = std::min(b * v, blocks[g].cols) - a * v;
      c->segments.push_back({g, a, b, c->cols, cols});
      c->cols += cols;
      a = b;
    }
  }
  return chunks;
}

// Codes [j, end) of a row, vectors of D floats (one code each) to out + j * D, eight codes
// (one 8-byte read, widths <= 8 bits, j a multiple of 8) per gather; returns where it stopped.
template <int D>
int64_t gather_vectors(const uint8_t* bytes, int64_t readable, int64_t width, int64_t j,
                       int64_t end, const float* C, float* out) {
  const __m512i shifts = _mm512_setr_epi64(0, width, 2 * width, 3 * width, 4 * width,
                                           5 * width, 6 * width, 7 * width);
  const __m512i mask = _mm512_set1_epi64((int64_t{1} << width) - 1);
  const auto* book = reinterpret_cast<const long long*>(C);
  for (; j + 8 <= end && ((j * width) >> 3) + 8 <= readable; j += 8) {
    uint64_t bits;
    std::memcpy(&bits, bytes + ((j * width) >> 3), 8);
    const __m512i c = _mm512_and_si512(
        _mm512_srlv_epi64(_mm512_set1_epi64(static_cast<int64_t>(bits)), shifts), mask);
    if constexpr (D == 2) {  // a codeword is one 8-byte word
      _mm512_storeu_si512(out + j * 2, _mm512_i32gather_epi64(_mm512_cvtepi64_epi32(c), book, 8));
    } else {  // D == 4: two words per codeword, four codewords per gather
      const __m512i c2 = _mm512_slli_epi64(c, 1), odd = _mm512_setr_epi64(0, 1, 0, 1, 0, 1, 0, 1);
      const __m512i lo = _mm512_add_epi64(
          _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 0, 1, 1, 2, 2, 3, 3), c2), odd);
      const __m512i hi = _mm512_add_epi64(
          _mm512_permutexvar_epi64(_mm512_setr_epi64(4, 4, 5, 5, 6, 6, 7, 7), c2), odd);
      _mm512_storeu_si512(out + j * 4, _mm512_i64gather_epi64(lo, book, 8));
      _mm512_storeu_si512(out + j * 4 + 16, _mm512_i64gather_epi64(hi, book, 8));
    }
  }
  return j;
}

// Rows [r0, r0 + rows) of a segment's columns into W (row i at W + i * ldw + s.col).
void decode_rows(const Block& B, const Segment& s, int64_t r0, int64_t rows, int64_t v,
                 float* W, int64_t ldw) {
  const Group& G = B.G;
  const uint64_t mask = (uint64_t{1} << G.width) - 1;
  const bool fast = B.P == 1 && (B.d == 2 || B.d == 4) && G.width <= 8;
  const int64_t whole = std::min(s.b, B.cols / v);  // vectors all inside the block (P == 1)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = r0 + i;
    const uint32_t* row = G.codes + r * G.W;
    float* out = W + i * ldw + s.col - s.a * v;  // column c of the block at out + c
    int64_t j = s.a * B.P;
    if (fast) {
      for (; j < whole && (j & 7); ++j)
        std::memcpy(out + j * B.d, B.C + code_at(row, j * G.width, G.width, mask) * B.d,
                    B.d * sizeof(float));
      const auto* bytes = reinterpret_cast<const uint8_t*>(row);
      const int64_t readable = (B.rows - r) * G.W * 4;
      j = B.d == 2 ? gather_vectors<2>(bytes, readable, G.width, j, whole, B.C, out)
                   : gather_vectors<4>(bytes, readable, G.width, j, whole, B.C, out);
    }
    for (; j < s.b * B.P; ++j) {  // any layout: each code read from the packed words
      const int64_t p = j % B.P, c0 = (j / B.P) * v + p * B.d;
      const int64_t c1 = std::min(c0 + B.d, B.cols);
      const float* w = B.C + (p * G.K + code_at(row, j * G.width, G.width, mask)) * B.d;
      for (int64_t c = c0; c < c1; ++c) out[c] = w[c - c0];
    }
  }
}

// 16 x 16 floats transposed in registers: row i of r in, column i of the block out.
inline void transpose16(__m512 r[16]) {
  __m512 a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // b[4i + q]: in each 128-bit lane l, column 4l + q of rows 4i..
    b[4 * i + 0] = _mm512_shuffle_ps(a[4 * i], a[4 * i + 2], 0x44);
    b[4 * i + 1] = _mm512_shuffle_ps(a[4 * i], a[4 * i + 2], 0xEE);
    b[4 * i + 2] = _mm512_shuffle_ps(a[4 * i + 1], a[4 * i + 3], 0x44);
    b[4 * i + 3] = _mm512_shuffle_ps(a[4 * i + 1], a[4 * i + 3], 0xEE);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512 c0 = _mm512_shuffle_f32x4(b[q], b[4 + q], 0x88);  // lanes 0, 2 of rows 0-7
    const __m512 c1 = _mm512_shuffle_f32x4(b[q], b[4 + q], 0xDD);  // lanes 1, 3
    const __m512 c2 = _mm512_shuffle_f32x4(b[8 + q], b[12 + q], 0x88);  // rows 8-15
    const __m512 c3 = _mm512_shuffle_f32x4(b[8 + q], b[12 + q], 0xDD);
    r[q] = _mm512_shuffle_f32x4(c0, c2, 0x88);
    r[8 + q] = _mm512_shuffle_f32x4(c0, c2, 0xDD);
    r[4 + q] = _mm512_shuffle_f32x4(c1, c3, 0x88);
    r[12 + q] = _mm512_shuffle_f32x4(c1, c3, 0xDD);
  }
}

// acc[i] (+)= sum over k of W[i, k] * X[k, 32 tokens] for R rows; then either kept in Ct (rows
// of out^T, stride ldc) or, on the last chunk, scaled, shifted and written to out [T, m].
template <int R>
void micro_tile(const float* X, const float* W, int64_t ldw, int64_t kc, float* Ct, int64_t ldc,
                bool load, __mmask16 m0, __mmask16 m1, float* out, int64_t m, int64_t tokens,
                const float* scale, const float* shift) {
  __m512 c0[R], c1[R];
  for (int i = 0; i < R; ++i) {
    c0[i] = load ? _mm512_maskz_loadu_ps(m0, Ct + i * ldc) : _mm512_setzero_ps();
    c1[i] = load ? _mm512_maskz_loadu_ps(m1, Ct + i * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 x0 = _mm512_loadu_ps(X + k * kPanelTokens);
    const __m512 x1 = _mm512_loadu_ps(X + k * kPanelTokens + 16);
    _mm_prefetch(reinterpret_cast<const char*>(X + (k + 8) * kPanelTokens), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(X + (k + 8) * kPanelTokens + 16), _MM_HINT_T0);
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i) {
      const __m512 w = _mm512_set1_ps(W[i * ldw + k]);
      c0[i] = _mm512_fmadd_ps(w, x0, c0[i]);
      c1[i] = _mm512_fmadd_ps(w, x1, c1[i]);
    }
  }
  if (!out) {
    for (int i = 0; i < R; ++i) {
      _mm512_mask_storeu_ps(Ct + i * ldc, m0, c0[i]);
      _mm512_mask_storeu_ps(Ct + i * ldc + 16, m1, c1[i]);
    }
    return;
  }
  // scaled and shifted, then transposed 16 tokens at a time: token t's R values are one masked
  // store to out + t * m (R scalar stores m floats apart cost 7% of a 576x1536 prefill)
  for (int half = 0; half < 2; ++half) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_setzero_ps();
    for (int i = 0; i < R; ++i)
      r[i] = _mm512_fmadd_ps(half ? c1[i] : c0[i], _mm512_set1_ps(scale ? scale[i] : 1.f),
                             _mm512_set1_ps(shift ? shift[i] : 0.f));
    transpose16(r);
    const int64_t t0 = 16 * half, t1 = std::min<int64_t>(tokens, t0 + 16);
    for (int64_t t = t0; t < t1; ++t)
      _mm512_mask_storeu_ps(out + t * m, first_lanes(R), r[t - t0]);
  }
}

template <int R = kPanelRows>
void micro_rows(int rows, const float* X, const float* W, int64_t ldw, int64_t kc, float* Ct,
                int64_t ldc,
                bool load, __mmask16 m0, __mmask16 m1, float* out, int64_t m, int64_t tokens,
                const float* scale, const float* shift) {
  if constexpr (R > 0) {
    if (rows == R)
      micro_tile<R>(X, W, ldw, kc, Ct, ldc, load, m0, m1, out, m, tokens, scale, shift);
    else
      micro_rows<R - 1>(rows, X, W, ldw, kc, Ct, ldc, load, m0, m1, out, m, tokens, scale, shift);
  }
}

// x[t, perm[c]] for every chunk as panels of 32 tokens: chunk c's panel p [c.cols][32] at
// dst + c.c0 * ldc + p * c.cols * 32 (ldc: T rounded up to 32; tokens past T zero). Per panel,
// its 32 rows of x are transposed into an L2 buffer [n][32] (16 x 16 blocks in registers), whose
// rows are then copied in the codes' order (faster than gathering each column across 32 rows
// of x, sixteen cache lines per gather).
void pack_tokens(const float* X, const int32_t* O, int64_t T, int64_t n,
                 const std::vector<Chunk>& chunks, int64_t ldc, float* dst) {
  at::parallel_for(0, ldc / kPanelTokens, 1, [&](int64_t p0, int64_t p1) {
    static thread_local std::vector<float> xt;
    xt.resize((n + 15) / 16 * 16 * kPanelTokens);
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t t0 = p * kPanelTokens + 16 * half, tokens = std::min<int64_t>(16, T - t0);
        for (int64_t i0 = 0; i0 < n; i0 += 16) {
          const __mmask16 columns = first_lanes(n - i0);
          __m512 r[16];
          for (int64_t t = 0; t < 16; ++t)
            r[t] = t < tokens ? _mm512_maskz_loadu_ps(columns, X + (t0 + t) * n + i0)
                              : _mm512_setzero_ps();
          transpose16(r);
          for (int64_t c = 0; c < 16; ++c)
            _mm512_storeu_ps(xt.data() + (i0 + c) * kPanelTokens + 16 * half, r[c]);
        }
      }
      for (const Chunk& c : chunks) {
        float* panel = dst + c.c0 * ldc + p * c.cols * kPanelTokens;
        for (int64_t k = 0; k < c.cols; ++k) {
          const float* column = xt.data() + O[c.c0 + k] * kPanelTokens;
          _mm512_storeu_ps(panel + k * kPanelTokens, _mm512_loadu_ps(column));
          _mm512_storeu_ps(panel + k * kPanelTokens + 16, _mm512_loadu_ps(column + 16));
        }
      }
    }
  });
}

// The n columns in chunks of about `width` (whole vectors), all about as wide.
std::vector<Chunk> equal_chunks(const std::vector<Block>& blocks, int64_t v, int64_t n,
                                int64_t width) {
  const int64_t count = std::max<int64_t>(1, (n + width / 2) / width);
  return chunks_of(blocks, v, ((n + count - 1) / count + v - 1) / v * v);
}

torch::Tensor prefill_gemm(const float* X, const int32_t* O, int64_t T, int64_t n, int64_t m,
                           const std::vector<Block>& blocks, int64_t v, int64_t width,
                           const float* scale, const float* shift,
                           const torch::TensorOptions& options) {
  const auto chunks = equal_chunks(blocks, v, n, width);
  int64_t ldw = 0;  // the decoded rows' stride: the widest chunk and 16 (no 4 KiB aliasing)
  for (const Chunk& c : chunks) ldw = std::max(ldw, c.cols + 16);
  const int64_t panels = (T + kPanelTokens - 1) / kPanelTokens, ldc = panels * kPanelTokens;
  static thread_local torch::Tensor xbuf, cbuf;
  float* XP = reusable(xbuf, ldc * n).data_ptr<float>();
  float* Ct = chunks.size() > 1 ? reusable(cbuf, m * ldc).data_ptr<float>() : nullptr;
  pack_tokens(X, O, T, n, chunks, ldc, XP);
  auto out = torch::empty({T, m}, options);
  float* Y = out.data_ptr<float>();
  const int64_t tiles = (m + kPanelRows - 1) / kPanelRows;
  // One parallel region: each thread takes its rows through every chunk (no barrier between),
  // a block of token panels at a time (about kPanelBytes: L2-resident), decoding its rows anew
  // per block.
  at::parallel_for(0, tiles, 4, [&](int64_t a, int64_t b) {
    static thread_local std::vector<float> rows_buffer;
    rows_buffer.resize(kPanelRows * ldw);
    float* W = rows_buffer.data();
    for (size_t ci = 0; ci < chunks.size(); ++ci) {
      const Chunk& c = chunks[ci];
      const bool first = ci == 0, last = ci + 1 == chunks.size();
      const int64_t most = std::max<int64_t>(1, kPanelBytes / (4 * kPanelTokens * c.cols));
      const int64_t step = (panels + (panels + most - 1) / most - 1) / ((panels + most - 1) / most);
      for (int64_t p0 = 0; p0 < panels; p0 += step) {
        for (int64_t tile = a; tile < b; ++tile) {
          const int64_t r0 = tile * kPanelRows, rows = std::min<int64_t>(kPanelRows, m - r0);
          for (const Segment& s : c.segments)
            decode_rows(blocks[s.block], s, r0, rows, v, W, ldw);
          for (int64_t p = p0; p < std::min(panels, p0 + step); ++p) {
            const int64_t t0 = p * kPanelTokens, tokens = std::min<int64_t>(kPanelTokens, T - t0);
            const __mmask16 m0 = first_lanes(tokens), m1 = first_lanes(tokens - 16);
            const float* panel = XP + c.c0 * ldc + p * c.cols * kPanelTokens;
            micro_rows(static_cast<int>(rows), panel, W, ldw, c.cols,
                       Ct ? Ct + r0 * ldc + t0 : nullptr, ldc, !first, m0, m1,
                       last ? Y + t0 * m + r0 : nullptr, m, tokens,
                       scale ? scale + r0 : nullptr, shift ? shift + r0 : nullptr);
          }
        }
      }
    }
  });
  return out;
}

#if defined(RSAVQ_AMX)
// ---- Prefill on AMX: bfloat16 tiles, three products per multiply ("bf16x3") ----
// x and the decoded weight are each split into bfloat16 hi + lo (hi = x rounded, lo = the
// rest rounded): x W = xh Wh + xl Wh + xh Wl up to xl Wl and the roundings of the lo halves, at
// most 2^-16 of |x| |W| per product (float32: 2^-24; an fp16 codebook's entry is hi + lo
// exactly). The tile unit multiplies 16 tokens x 32 columns by 32 columns x 16 rows per
// instruction into float32 accumulators at 16x the float32 FMA units' rate, so even three
// products can beat one float32 multiply (measured: BENCHMARKS.md, Inference speed).
// Columns (in the codes' order) are cut into chunks of about kChunkCols (x of 512 tokens split:
// 1 MiB, L2); per chunk, x[:, perm] is split into hi and lo tiles of 16 tokens x 32 columns
// (zeros past T and the chunk), and each thread takes its rows kAmxGroup blocks of 16 at a
// time: decodes the chunk's columns of them, splits and transposes them into tiles of 16 pairs
// of columns x 16 rows (the layout the unit multiplies) and multiplies them by the tokens, 2
// token tiles x 2 row blocks per step. Partial sums between chunks wait in a float32 buffer
// [Tp][mp]; the last chunk scales, shifts and writes out [T, m].
constexpr int64_t kAmxGroup = 8;  // blocks of 16 rows multiplied per pass over the tokens

// Whether this process may use the tile registers: Linux hands out their state on request.
bool amx_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                        18 /* XFEATURE_XTILEDATA */) == 0;
  return permitted;
}

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
// Every tile 16 rows of 64 bytes. A constant (GCC's ldtilecfg asm tells the compiler of only 8
// bytes read, so the stores filling a local copy may be dropped).
constexpr TileConfig kTiles = {1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64},
                               {16, 16, 16, 16, 16, 16, 16, 16}};

// The tile shapes, loaded into this thread's tile unit.
void configure_tiles() { _tile_loadconfig(&kTiles); }

// 32 floats (a: the first 16, b: the next 16) as bfloat16 hi and lo, 32 of each, in order.
inline void split32(__m512 a, __m512 b, __m512i& hi, __m512i& lo) {
  const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(b, a);
  const __m512 ha = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
  const __m512 hb = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
  hi = h;
  lo = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hb), _mm512_sub_ps(a, ha));
}

struct AmxChunk {
  Chunk c;
  int64_t kc;      // columns rounded up to 32
  int64_t offset;  // where its tiles start in the split x ([kc / 32][Tp][32] from here)
};

// x[t, perm[c0 + k]] of every chunk, split: hi and lo [kc / 32][Tp][32] per chunk (zeros past
// T and the chunk's columns), so that a tile of 16 tokens x 32 columns is 1 KiB in one piece.
void split_tokens(const float* X, const int32_t* O, int64_t T, int64_t Tp, int64_t n,
                  const std::vector<AmxChunk>& chunks, uint16_t* hi, uint16_t* lo) {
  at::parallel_for(0, Tp, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (const AmxChunk& a : chunks)
        for (int64_t k = 0; k < a.kc; k += 32) {
          __m512 v[2];
          for (int half = 0; half < 2; ++half) {
            const int64_t k0 = k + 16 * half;
            const __mmask16 lanes = t < T ? first_lanes(a.c.cols - k0) : 0;
            const __m512i idx = _mm512_maskz_loadu_epi32(lanes, O + a.c.c0 + k0);
            v[half] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, idx, X + t * n, 4);
          }
          __m512i h, l;
          split32(v[0], v[1], h, l);
          _mm512_storeu_si512(hi + a.offset + (k / 32 * Tp + t) * 32, h);
          _mm512_storeu_si512(lo + a.offset + (k / 32 * Tp + t) * 32, l);
        }
  });
}

// 16 decoded rows W [16][ldw] (columns [0, kc)) as tiles: hi and lo [kc / 32][16][16 pairs].
void split_rows(const float* W, int64_t ldw, int64_t kc, uint16_t* hi, uint16_t* lo) {
  for (int64_t k = 0; k < kc; k += 32) {
    __m512i h[16], l[16];
    for (int r = 0; r < 16; ++r)
      split32(_mm512_loadu_ps(W + r * ldw + k), _mm512_loadu_ps(W + r * ldw + k + 16), h[r], l[r]);
    auto* hs = reinterpret_cast<__m512*>(h);
    auto* ls = reinterpret_cast<__m512*>(l);
    transpose16(hs);  // row i: pair i of columns of every row
    transpose16(ls);
    for (int i = 0; i < 16; ++i) {
      _mm512_storeu_ps(reinterpret_cast<float*>(hi + k * 16) + i * 16, hs[i]);
      _mm512_storeu_ps(reinterpret_cast<float*>(lo + k * 16) + i * 16, ls[i]);
    }
  }
}

// The tile instructions name their registers as literals (tiles 0-3: accumulators, 4-5: x,
// 6-7: weight). Their asm tells the compiler of no memory it reads or writes: `memory_fence`
// orders them against ordinary loads and stores of the same buffers.
inline void memory_fence() { __asm__ volatile("" ::: "memory"); }

// Accumulator tile C (0-3: token tile C / 2, row block C % 2) zeroed, loaded or stored.
#define RSAVQ_ACCUMULATOR(C, base, ld, load, store)                                  \
  if constexpr (C / 2 < NT && C % 2 < NR) {                                          \
    float* at = (base) + (C / 2) * 16 * (ld) + (C % 2) * 16;                         \
    if (store)                                                                       \
      _tile_stored(C, at, (ld) * 4);                                                 \
    else if (load)                                                                   \
      _tile_loadd(C, at, (ld) * 4);                                                  \
    else                                                                             \
      _tile_zero(C);                                                                 \
  }
#define RSAVQ_ACCUMULATORS(base, ld, load, store) \
  RSAVQ_ACCUMULATOR(0, base, ld, load, store)     \
  RSAVQ_ACCUMULATOR(1, base, ld, load, store)     \
  RSAVQ_ACCUMULATOR(2, base, ld, load, store)     \
  RSAVQ_ACCUMULATOR(3, base, ld, load, store)

// NT tiles of 16 tokens (from t0) x NR blocks of 16 rows (from r0; their tiles at B[0], B[1],
// hi then lo `lo_at` further) through one chunk: the three products (x's hi by the weight's
// hi, x's lo by its hi, x's hi by its lo) run as one multiply three times as long, each tile
// loaded serving two products. Partial sums from and to acc [Tp][mp] (`first`: from zero),
// or, on the last chunk, scaled, shifted and written to out.
template <int NT, int NR>
void amx_block(const AmxChunk& a, const uint16_t* hi, const uint16_t* lo,
               const uint16_t* const B[2], int64_t lo_at, int64_t t0, int64_t r0, float* acc,
               int64_t mp, bool first, bool last, float* out, int64_t T, int64_t Tp, int64_t m,
               const float* scale, const float* shift) {
  memory_fence();  // the weight's tiles are written
  float* partial = acc ? acc + t0 * mp + r0 : nullptr;
  RSAVQ_ACCUMULATORS(partial, mp, !first, false)
  for (int product = 0; product < 3; ++product) {
    const uint16_t* A = (product == 1 ? lo : hi) + a.offset + t0 * 32;
    const uint16_t* B0 = B[0] + (product == 2 ? lo_at : 0);
    const uint16_t* B1 = B[NR - 1] + (product == 2 ? lo_at : 0);
    for (int64_t k = 0; k < a.kc; k += 32, A += Tp * 32) {
      _tile_loadd(4, A, 64);
      if constexpr (NT > 1) _tile_loadd(5, A + 512, 64);
      _tile_loadd(6, B0 + k * 16, 64);
      if constexpr (NR > 1) _tile_loadd(7, B1 + k * 16, 64);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (NR > 1) _tile_dpbf16ps(1, 4, 7);
      if constexpr (NT > 1) _tile_dpbf16ps(2, 5, 6);
      if constexpr (NT > 1 && NR > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  if (!last) {
    RSAVQ_ACCUMULATORS(partial, mp, false, true)
    memory_fence();
    return;
  }
  alignas(64) float c[32][32];
  RSAVQ_ACCUMULATORS(&c[0][0], 32, false, true)
  memory_fence();
  for (int j = 0; j < NR; ++j) {
    const int64_t rj = r0 + 16 * j;
    const __mmask16 lanes = first_lanes(m - rj);
    const __m512 s = scale ? _mm512_maskz_loadu_ps(lanes, scale + rj) : _mm512_set1_ps(1.f);
    const __m512 b = shift ? _mm512_maskz_loadu_ps(lanes, shift + rj) : _mm512_setzero_ps();
    for (int64_t t = 0; t < std::min<int64_t>(NT * 16, T - t0); ++t)
      _mm512_mask_storeu_ps(out + (t0 + t) * m + rj, lanes,
                            _mm512_fmadd_ps(_mm512_load_ps(c[t] + 16 * j), s, b));
  }
}

torch::Tensor prefill_amx(const float* X, const int32_t* O, int64_t T, int64_t n, int64_t m,
                          const std::vector<Block>& blocks, int64_t v, int64_t width,
                          const float* scale, const float* shift,
                          const torch::TensorOptions& options) {
  std::vector<AmxChunk> chunks;
  int64_t offset = 0, widest = 0;
  const int64_t Tp = (T + 15) / 16 * 16, mp = (m + 15) / 16 * 16;
  for (Chunk& c : equal_chunks(blocks, v, n, width)) {
    const int64_t kc = (c.cols + 31) / 32 * 32;
    chunks.push_back({std::move(c), kc, offset});
    offset += Tp * kc;
    widest = std::max(widest, kc);
  }
  static thread_local torch::Tensor xbuf, cbuf;
  auto* hi = reinterpret_cast<uint16_t*>(reusable(xbuf, offset).data_ptr<float>());
  uint16_t* lo = hi + offset;  // the buffer holds 2 * offset bfloat16 values
  float* acc = chunks.size() > 1 ? reusable(cbuf, Tp * mp).data_ptr<float>() : nullptr;
  split_tokens(X, O, T, Tp, n, chunks, hi, lo);
  memory_fence();
  auto out = torch::empty({T, m}, options);
  float* Y = out.data_ptr<float>();
  const int64_t ldw = widest + 16;  // decoded rows' stride (+16 floats: no 4 KiB aliasing)
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const AmxChunk& a = chunks[ci];
    const bool first = ci == 0, last = ci + 1 == chunks.size();
    at::parallel_for(0, mp / 16, 1, [&](int64_t b0, int64_t b1) {
      static thread_local std::vector<float> rows;
      static thread_local std::vector<uint16_t> tiles;
      rows.assign(16 * ldw, 0.f);
      tiles.resize(kAmxGroup * 2 * 16 * widest);
      configure_tiles();
      for (int64_t g0 = b0; g0 < b1; g0 += kAmxGroup) {
        const int64_t g1 = std::min(b1, g0 + kAmxGroup);
        for (int64_t b = g0; b < g1; ++b) {
          const int64_t r0 = b * 16, count_rows = std::min<int64_t>(16, m - r0);
          for (const Segment& s : a.c.segments)
            decode_rows(blocks[s.block], s, r0, count_rows, v, rows.data(), ldw);
          for (int64_t i = 0; i < 16; ++i)  // rows past m and columns past the chunk's: zeros
            std::fill(rows.data() + i * ldw + (i < count_rows ? a.c.cols : 0),
                      rows.data() + i * ldw + a.kc, 0.f);
          uint16_t* Bh = tiles.data() + (b - g0) * 2 * 16 * widest;
          split_rows(rows.data(), ldw, a.kc, Bh, Bh + 16 * widest);
        }
        for (int64_t t0 = 0; t0 < Tp; t0 += 32) {
          const bool two_tokens = Tp - t0 > 16;
          for (int64_t b = g0; b < g1; b += 2) {
            const bool two_rows = g1 - b > 1;
            const uint16_t* B[2] = {tiles.data() + (b - g0) * 2 * 16 * widest,
                                    tiles.data() + (b + two_rows - g0) * 2 * 16 * widest};
            auto run = [&](auto nt, auto nr) {
              amx_block<decltype(nt)::value, decltype(nr)::value>(
                  a, hi, lo, B, 16 * widest, t0, b * 16, acc, mp, first, last, Y, T, Tp, m,
                  scale, shift);
            };
            using One = std::integral_constant<int, 1>;
            using Two = std::integral_constant<int, 2>;
            if (two_tokens && two_rows) run(Two(), Two());
            else if (two_tokens) run(Two(), One());
            else if (two_rows) run(One(), Two());
            else run(One(), One());
          }
        }
      }
      _tile_release();
    });
  }
  return out;
}
#undef RSAVQ_ACCUMULATOR
#undef RSAVQ_ACCUMULATORS
#endif
#endif

// Whether vq_prefill (amx = true) multiplies on the AMX tile unit here.
bool prefill_amx_available() {
#if defined(RSAVQ_AMX)
  return amx_permitted();
#else
  return false;
#endif
}

// Prefill: out [T, m] = x W^T (times the row scales, plus the bias), x float32 [T, n]. With
// AVX-512, prefill_gemm (the weight decoded into the multiply; `block` > 0: columns per chunk,
// tests), or prefill_amx where `amx` and the CPU and kernel allow it. Elsewhere the weight is
// dequantized kPrefillRows rows at a time (`block` > 0: rows per block), each row times its
// scale, and each block multiplied by x[:, perm].
torch::Tensor vq_prefill(torch::Tensor x, torch::Tensor perm, std::vector<torch::Tensor> codes,
                         std::vector<torch::Tensor> books, std::vector<int64_t> sizes,
                         std::vector<int64_t> widths, int64_t v, int64_t m,
                         std::optional<torch::Tensor> scales, std::optional<torch::Tensor> bias,
                         int64_t block, bool amx) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x");
  TORCH_CHECK(perm.scalar_type() == torch::kInt && perm.numel() == x.size(1), "int32 perm");
  const int64_t T = x.size(0), n = x.size(1);
  int64_t total = 0;
  for (int64_t size : sizes) total += size;
  TORCH_CHECK(total == n, "group sizes must add up to the input features");
  std::vector<torch::Tensor> floats;
  const auto blocks = blocks_of(codes, books, sizes, widths, v, m, floats);
#if defined(__AVX512F__)
  torch::Tensor scale32 = scales ? scales->to(torch::kFloat).contiguous() : torch::Tensor();
  torch::Tensor shift32 = bias ? bias->to(torch::kFloat).contiguous() : torch::Tensor();
  auto* gemm = &prefill_gemm;
#if defined(RSAVQ_AMX)
  if (amx && amx_permitted()) gemm = &prefill_amx;
#endif
  return gemm(x.data_ptr<float>(), perm.data_ptr<int32_t>(), T, n, m, blocks, v,
              block > 0 ? block : kChunkCols, scales ? scale32.data_ptr<float>() : nullptr,
              bias ? shift32.data_ptr<float>() : nullptr, x.options());
#else
  // buffers kept between calls (fresh ones cost page faults each call: as much as the work)
  static thread_local torch::Tensor xbuf, wbuf;
  const int64_t rows = std::min(m, block > 0 ? block : kPrefillRows);
  auto xp = reusable(xbuf, T * n).view({T, n});
  permute_columns(x.data_ptr<float>(), perm.data_ptr<int32_t>(), T, n, xp.data_ptr<float>());
  auto W = reusable(wbuf, rows * n).view({rows, n});
  torch::Tensor scale32 = scales ? scales->to(torch::kFloat).contiguous() : torch::Tensor();
  auto out = torch::empty({T, m}, x.options());
  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t r1 = std::min(m, r0 + rows);
    dequantize_rows(blocks, v, n, r0, r1, W.data_ptr<float>(),
                    scales ? scale32.data_ptr<float>() : nullptr);
    auto y = out.narrow(1, r0, r1 - r0);
    at::mm_out(y, xp, W.narrow(0, 0, r1 - r0).t());
  }
  if (bias) out.add_(*bias);
  return out;
#endif
}

// A layer's codes of <= 8 bits repacked for vq_gemv16, the groups' codes one after another along
// j (codes[g]: [m, W_g] int32 of widths[g] bits, J[g] per row), in chunks of 64 js read in turn:
// chunk c holds [tiles, jc, 64] bytes (jc = 64 but in the last), so one call reads the codes
// front to back.
torch::Tensor vq_repack(std::vector<torch::Tensor> codes, std::vector<int64_t> widths,
                        std::vector<int64_t> J) {
  const int64_t m = codes.at(0).size(0), tiles = (m + kTileRows - 1) / kTileRows;
  int64_t total = 0;
  for (size_t g = 0; g < codes.size(); ++g) {
    TORCH_CHECK(codes[g].scalar_type() == torch::kInt && codes[g].is_contiguous(), "int32 codes");
    TORCH_CHECK(widths[g] >= 1 && widths[g] <= 8 && codes[g].size(0) == m &&
                    codes[g].size(1) * 32 >= J[g] * widths[g], "codes shape");
    total += J[g];
  }
  auto out = torch::zeros({tiles * total * kTileRows}, torch::kUInt8);
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, m, kTileRows, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const int64_t tile = r / kTileRows, s = slot(r % kTileRows);
      for (size_t g = 0, j = 0; g < codes.size(); ++g) {
        const auto* row = reinterpret_cast<const uint32_t*>(codes[g].data_ptr<int32_t>()) +
                          r * codes[g].size(1);
        const uint64_t mask = (uint64_t{1} << widths[g]) - 1;
        for (int64_t i = 0; i < J[g]; ++i, ++j) {
          const int64_t ja = j / kChunkJ * kChunkJ, jc = std::min(kChunkJ, total - ja);
          o[ja * tiles * kTileRows + (tile * jc + j - ja) * kTileRows + s] =
              static_cast<uint8_t>(code_at(row, i * widths[g], widths[g], mask));
        }
      }
    }
  });
  return out.view({tiles, total, kTileRows});
}

// The tokens of a decode input x [..., n] (contiguous float32): T = x.numel() / n.
int64_t tokens_of(const torch::Tensor& x, int64_t n) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == n && x.scalar_type() == torch::kFloat &&
                  x.is_contiguous(),
              "x: [..., n] contiguous float32");
  return x.numel() / n;
}

// The output [..., m] of a decode input x [..., n].
torch::Tensor output_of(const torch::Tensor& x, int64_t m) {
  auto sizes = x.sizes().vec();
  sizes.back() = m;
  return torch::empty(sizes, x.options());
}

// Decode with repacked codes (vq_repack) and int16 tables: out [T, m] = x W^T, times the row
// scales (fp16) and plus the bias (float32) when given. perm int32 [n]; books: every group's
// codebook as float32 [P, d, Kp] (transposed, entries past K zero), one after another; norms
// float32 [G]: each group's longest codeword; meta int64 [G, 5]: per group its columns, P, J, Kp
// and offset into books.
torch::Tensor vq_gemv16(torch::Tensor x, torch::Tensor perm, torch::Tensor packed,
                        torch::Tensor books, torch::Tensor norms, torch::Tensor meta, int64_t v,
                        int64_t m,
                        std::optional<torch::Tensor> scales, std::optional<torch::Tensor> bias) {
  TORCH_CHECK(perm.scalar_type() == torch::kInt && perm.dim() == 1, "int32 perm");
  TORCH_CHECK(meta.scalar_type() == torch::kLong && meta.dim() == 2 && meta.size(1) == 5, "meta");
  const int64_t n = perm.numel(), T = tokens_of(x, n), tiles = (m + kTileRows - 1) / kTileRows;
  const int64_t Jtot = packed.size(1);
  TORCH_CHECK(packed.size(0) == tiles, "repacked codes");
  TORCH_CHECK(norms.scalar_type() == torch::kFloat && norms.numel() == meta.size(0), "norms");
  struct Group { int64_t start, cols, P, j0, J, Kp, book; float norm; int64_t d, xs; };
  std::vector<Group> groups;
  const int64_t* M = meta.data_ptr<int64_t>();
  const float* N = norms.data_ptr<float>();
  int64_t XS = 0;  // floats of one token's sub-vectors
  for (int64_t g = 0, start = 0, j0 = 0; g < meta.size(0); ++g) {
    const int64_t* r = M + 5 * g;
    TORCH_CHECK(r[1] >= 1 && v % r[1] == 0 && v / r[1] <= kMaxSubDim,
                "vq_gemv16: each group's P must split the vector evenly into sub-vectors of at "
                "most 64 weights");
    groups.push_back({start, r[0], r[1], j0, r[2], r[3], r[4], N[g], v / r[1], XS});
    start += r[0];
    j0 += r[2];
    XS += r[2] * (v / r[1]);
  }
  TORCH_CHECK(groups.back().start + groups.back().cols == n && groups.back().j0 + groups.back().J == Jtot,
              "group sizes must add up to the input features");
  const float* X = x.data_ptr<float>();  // (data_ptr checks the tensor: never in a loop)
  const int32_t* O = perm.data_ptr<int32_t>();
  // Every token's sub-vectors in the codes' order, once per call ([T, XS]), and a bound on each
  // one's table entries ([T, Jtot]); a token with an inf or a nan is not finite.
  static thread_local std::vector<float> subs, bounds;
  subs.resize(T * XS);
  bounds.resize(T * Jtot);
  std::vector<uint8_t> finite(T, 1);
  for (int64_t t = 0; t < T; ++t)
    for (const Group& g : groups)
      finite[t] &= sub_vectors(X + t * n, O, g.start, g.cols, v, g.P, g.J, g.norm,
                               subs.data() + t * XS + g.xs, bounds.data() + t * Jtot + g.j0);
  const float* Sub = subs.data();
  const float* Bound = bounds.data();
  // Threads split the chunks of codes (each builds only its chunks' tables and reads one stretch
  // of the codes), each summing into totals of its own [tiles, T, 64], added up at the end.
  const int64_t size = tiles * T * kTileRows, chunks = (Jtot + kChunkJ - 1) / kChunkJ;
  static thread_local std::vector<float> totals;  // (the calling thread's)
  totals.assign(size * at::get_num_threads(), 0.f);
  float* totals0 = totals.data();  // (a thread_local named in the lambda would be the worker's)
  const float* Bk = books.data_ptr<float>();
  const uint8_t* C = packed.data_ptr<uint8_t>();
  const int64_t work = tiles * kTileRows * kChunkJ * T;  // look-ups per chunk
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(work, 1));
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    float* total = totals0 + at::get_thread_num() * size;
    struct Run { int64_t lo, hi, Kp, at; };  // js [lo, hi) of one table size, tables at `at`
    static thread_local std::vector<float> step;
    static thread_local std::vector<uint8_t> lut;
    std::vector<Run> runs;
    for (int64_t ja = c0 * kChunkJ; ja < std::min(Jtot, c1 * kChunkJ); ja += kChunkJ) {
      const int64_t jb = std::min(Jtot, ja + kChunkJ);
      runs.clear();
      int64_t ts = 0;  // table entries per token in this chunk
      for (const Group& g : groups) {
        const int64_t lo = std::max(ja, g.j0), hi = std::min(jb, g.j0 + g.J);
        if (lo >= hi) continue;
        if (runs.empty() || runs.back().Kp != g.Kp) runs.push_back({lo, lo, g.Kp, ts});
        runs.back().hi = hi;
        ts += (hi - lo) * g.Kp;
      }
      step.assign(T, 0.f);
      for (int64_t t = 0; t < T; ++t) {  // |entry| <= |x_j| * the group's longest codeword
        const float* bound = Bound + t * Jtot;
        for (int64_t j = ja; j < jb; ++j) step[t] = std::max(step[t], bound[j]);
        step[t] = step[t] > 0.f && std::isfinite(step[t]) ? step[t] / kSteps : 1.f;
      }
      lut.resize(T * 2 * ts);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t at = 0; const Group& g : groups) {
          const int64_t lo = std::max(ja, g.j0), hi = std::min(jb, g.j0 + g.J);
          if (lo >= hi) continue;
          build_planes_any(Sub + t * XS + g.xs + (lo - g.j0) * g.d, g.d, Bk + g.book, g.P,
                           lo - g.j0, hi - g.j0, g.Kp, 1.f / step[t],
                           lut.data() + t * 2 * ts + 2 * at);
          at += (hi - lo) * g.Kp;
        }
      const uint8_t* block = C + ja * tiles * kTileRows;  // the chunk: [tiles, jb - ja, 64]
      for (const Run& run : runs)
        for (int64_t t0 = 0; t0 < T; t0 += kTokenBlock)
          tiles16_any(lut.data() + t0 * 2 * ts + 2 * run.at, 2 * ts, run.Kp,
                      block + (run.lo - ja) * kTileRows, (jb - ja) * kTileRows, tiles,
                      run.hi - run.lo, std::min(kTokenBlock, T - t0), step.data() + t0,
                      total + t0 * kTileRows, T * kTileRows);
    }
  });
  const int used = std::min<int64_t>(at::get_num_threads(), chunks);
  for (int i = 1; i < used; ++i)
    for (int64_t k = 0; k < size; ++k) totals0[k] += totals0[i * size + k];
  const float* total = totals0;
  auto out = output_of(x, m);
  float* Y = out.data_ptr<float>();
  const at::Half* S = scales ? scales->data_ptr<at::Half>() : nullptr;
  const float* B = bias ? bias->data_ptr<float>() : nullptr;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < m; ++r) {
      if (!finite[t]) {  // inf or nan in x: the float sum would not be finite either
        Y[t * m + r] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      float y = total[((r / kTileRows) * T + t) * kTileRows + kTotalAt.of_row[r % kTileRows]];
      if (S) y *= static_cast<float>(S[r]);
      Y[t * m + r] = B ? y + B[r] : y;
    }
  return out;
}

// A float32 input times a weight kept in bfloat16, as a checkpoint stored it (the embeddings that
// serve as the output head): y [T, m] = x [T, n] w [m, n]^T, T small. The weight is read once,
// row by row in order, and widened to float32 in registers (bf16 -> fp32 is a 16-bit shift), so a
// token reads 2 bytes per weight where an fp32 copy reads 4; sums are float32, as F.linear's on
// the widened weight.
constexpr int64_t kStoredAhead = 4096;  // bytes of the weight prefetched ahead of the row read

// How far ahead stored_gemv prefetches: kStoredAhead on Intel CPUs, whose hardware prefetcher
// alone did not keep one core's stream at memory speed; nothing elsewhere (on an AMD Zen 4 the
// software prefetches made the head's read 20-30% slower than the hardware's own).
inline int64_t stored_ahead() {
#if defined(__x86_64__) || defined(__i386__)
  static const int64_t ahead = __builtin_cpu_is("intel") ? kStoredAhead : 0;
  return ahead;
#else
  return 0;
#endif
}

inline float widen(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
inline __m512 widen16(const uint16_t* w, __mmask16 mask) {
  __m256i h = _mm256_maskz_loadu_epi16(mask, w);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// <x, w> for one row w of n weights: four accumulators over blocks of 64, a masked tail
inline float stored_dot(const float* x, const uint16_t* w, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 64 <= n; k += 64) {
    a0 = _mm512_fmadd_ps(widen16(w + k, 0xFFFF), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(widen16(w + k + 16, 0xFFFF), _mm512_loadu_ps(x + k + 16), a1);
    a2 = _mm512_fmadd_ps(widen16(w + k + 32, 0xFFFF), _mm512_loadu_ps(x + k + 32), a2);
    a3 = _mm512_fmadd_ps(widen16(w + k + 48, 0xFFFF), _mm512_loadu_ps(x + k + 48), a3);
  }
  for (; k < n; k += 16) {
    __mmask16 mask = n - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - k)) - 1);
    a0 = _mm512_fmadd_ps(widen16(w + k, mask), _mm512_maskz_loadu_ps(mask, x + k), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
#elif defined(__AVX2__) && defined(__FMA__)
inline float sum8(__m256 a) {  // the sum of a's eight floats
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

inline __m256 widen8(const uint16_t* w) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// <x, w> (AVX2): four accumulators over blocks of 32, then blocks of 8, then one weight at a time
inline float stored_dot(const float* x, const uint16_t* w, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    a0 = _mm256_fmadd_ps(widen8(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(widen8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(widen8(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(widen8(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  for (; k + 8 <= n; k += 8) a0 = _mm256_fmadd_ps(widen8(w + k), _mm256_loadu_ps(x + k), a0);
  float y = sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < n; ++k) y += widen(w[k]) * x[k];
  return y;
}
#else
// <x, w>: four partial sums (one would wait on its own latency at every weight)
inline float stored_dot(const float* x, const uint16_t* w, int64_t n) {
  float a[4] = {0.f, 0.f, 0.f, 0.f};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4)
    for (int i = 0; i < 4; ++i) a[i] += widen(w[k + i]) * x[k + i];
  for (; k < n; ++k) a[0] += widen(w[k]) * x[k];
  return (a[0] + a[1]) + (a[2] + a[3]);
}
#endif

torch::Tensor stored_gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x: [T, n] float32");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.size(1) == x.size(1),
              "w: [m, n] bfloat16");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t T = x.size(0), n = x.size(1), m = w.size(0);
  auto out = torch::empty({T, m}, x.options());
  const float* X = x.data_ptr<float>();
  const auto* W = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* Y = out.data_ptr<float>();
  // rows in order, one at a time (one stream through memory); a row stays in L1 across tokens.
  // The weight is read from memory, not cache (it is read once per token, between the whole
  // model's other work): on Intel CPUs lines are prefetched stored_ahead() bytes ahead of the row
  // being read.
  const char* end = reinterpret_cast<const char*>(W + m * n);
  const int64_t ahead_bytes = stored_ahead();
  at::parallel_for(0, m, 256, [&](int64_t a, int64_t b) {
    const char* ahead = reinterpret_cast<const char*>(W + a * n) + ahead_bytes;
    for (int64_t r = a; r < b; ++r) {
      if (ahead_bytes > 0) {
        const char* row_end = reinterpret_cast<const char*>(W + (r + 1) * n);
        const char* upto = std::min(end, row_end + ahead_bytes);
        for (; ahead < upto; ahead += 64) __builtin_prefetch(ahead);
      }
      for (int64_t t = 0; t < T; ++t) Y[t * m + r] = stored_dot(X + t * n, W + r * n, n);
    }
  });
  return out;
}

// Decode for codes wider than a byte with pairs of weights per code (P = 1, d = 2: the 5-bit key
// and value layers of the 4-bit default). A table of K >= 512 codewords per sub-vector costs
// n K multiply-adds per token, more than the layer's own n m when m < K; here each row instead
// gathers its codewords, 8 pairs per instruction, and dots them with x[perm] directly.
// codes16: per group [m, J_g] int16 codes; books32: per group [K_g, 2] float32.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
inline float wide_dot(const int16_t* c, const float* book, const float* x, int64_t J) {
  const auto* pairs = reinterpret_cast<const double*>(book);
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  int64_t j = 0;
  for (; j + 16 <= J; j += 16) {
    __m512i i0 = _mm512_cvtepi16_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j)));
    __m512i i1 =
        _mm512_cvtepi16_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j + 8)));
    __m512 w0 = _mm512_castpd_ps(_mm512_i64gather_pd(i0, pairs, 8));
    __m512 w1 = _mm512_castpd_ps(_mm512_i64gather_pd(i1, pairs, 8));
    a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + 2 * j), a0);
    a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 2 * j + 16), a1);
  }
  for (; j < J; j += 8) {
    const int64_t left = std::min<int64_t>(8, J - j);
    const __mmask8 codes = static_cast<__mmask8>((1u << left) - 1);
    const __mmask16 floats = static_cast<__mmask16>((1u << (2 * left)) - 1);
    __m512i idx = _mm512_cvtepi16_epi64(_mm_maskz_loadu_epi16(codes, c + j));
    __m512d w = _mm512_mask_i64gather_pd(_mm512_setzero_pd(), codes, idx, pairs, 8);
    a0 = _mm512_fmadd_ps(_mm512_castpd_ps(w), _mm512_maskz_loadu_ps(floats, x + 2 * j), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#elif defined(__AVX2__) && defined(__FMA__)
// The same in registers of 8 (AVX2): 4 pairs per gather, two accumulators, the tail one by one
inline float wide_dot(const int16_t* c, const float* book, const float* x, int64_t J) {
  const auto* pairs = reinterpret_cast<const double*>(book);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  int64_t j = 0;
  for (; j + 8 <= J; j += 8) {
    const __m128i c8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j));
    const __m256i i = _mm256_cvtepi16_epi32(c8);
    const __m128i lo = _mm256_castsi256_si128(i), hi = _mm256_extracti128_si256(i, 1);
    const __m256 w0 = _mm256_castpd_ps(_mm256_i32gather_pd(pairs, lo, 8));
    const __m256 w1 = _mm256_castpd_ps(_mm256_i32gather_pd(pairs, hi, 8));
    a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + 2 * j), a0);
    a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 2 * j + 8), a1);
  }
  float acc = sum8(_mm256_add_ps(a0, a1));
  for (; j < J; ++j) acc += book[2 * c[j]] * x[2 * j] + book[2 * c[j] + 1] * x[2 * j + 1];
  return acc;
}
#else
inline float wide_dot(const int16_t* c, const float* book, const float* x, int64_t J) {
  float a[2] = {0.f, 0.f};  // two partial sums: one waited on its own latency at every code
  int64_t j = 0;
  for (; j + 2 <= J; j += 2)
    for (int i = 0; i < 2; ++i)
      a[i] += book[2 * c[j + i]] * x[2 * (j + i)] + book[2 * c[j + i] + 1] * x[2 * (j + i) + 1];
  for (; j < J; ++j) a[0] += book[2 * c[j]] * x[2 * j] + book[2 * c[j] + 1] * x[2 * j + 1];
  return a[0] + a[1];
}
#endif

torch::Tensor vq_gemv_wide(torch::Tensor x, torch::Tensor perm, std::vector<torch::Tensor> codes,
                           std::vector<torch::Tensor> books, std::vector<int64_t> sizes,
                           std::optional<torch::Tensor> scales, std::optional<torch::Tensor> bias) {
  TORCH_CHECK(perm.scalar_type() == torch::kInt32 && perm.dim() == 1, "perm: int32");
  const int64_t n = perm.numel(), T = tokens_of(x, n), m = codes.at(0).size(0);
  const int64_t G = static_cast<int64_t>(codes.size());
  TORCH_CHECK(static_cast<int64_t>(books.size()) == G && static_cast<int64_t>(sizes.size()) == G,
              "one codebook and size per group");
  // x[perm] per group, each padded with zeros to whole pairs
  std::vector<int64_t> offset(G + 1, 0);
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(codes[g].scalar_type() == torch::kInt16 && codes[g].size(0) == m &&
                    2 * codes[g].size(1) >= sizes[g],
                "codes: [m, J_g] int16 covering the group");
    TORCH_CHECK(books[g].scalar_type() == torch::kFloat32 && books[g].size(-1) == 2,
                "books: [K_g, 2] float32");
    offset[g + 1] = offset[g] + 2 * codes[g].size(1);
  }
  const float* X = x.data_ptr<float>();
  const int32_t* O = perm.data_ptr<int32_t>();
  std::vector<float> xp(T * offset[G], 0.f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0, col = 0; g < G; col += sizes[g], ++g)
      for (int64_t j = 0; j < sizes[g]; ++j)
        xp[t * offset[G] + offset[g] + j] = X[t * n + O[col + j]];
  auto out = output_of(x, m);
  float* Y = out.data_ptr<float>();
  const at::Half* S = scales ? scales->data_ptr<at::Half>() : nullptr;
  const float* B = bias ? bias->data_ptr<float>() : nullptr;
  std::vector<const int16_t*> codes_of(G);
  std::vector<const float*> book_of(G);
  for (int64_t g = 0; g < G; ++g) {
    codes_of[g] = codes[g].data_ptr<int16_t>();
    book_of[g] = books[g].data_ptr<float>();
  }
  at::parallel_for(0, m, 16, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r)
      for (int64_t t = 0; t < T; ++t) {
        float y = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t J = offset[g + 1] / 2 - offset[g] / 2;
          y += wide_dot(codes_of[g] + r * J, book_of[g], xp.data() + t * offset[G] + offset[g], J);
        }
        if (S) y *= static_cast<float>(S[r]);
        Y[t * m + r] = B ? y + B[r] : y;
      }
  });
  return out;
}

// Nearest codeword for k-means and its assignments: for each row i of lhs [n, D], the k that
// minimizes lhs[i] . rhs[:, k] over rhs [D, K] (the weighted distance less a constant per point,
// `algorithms.kmeans`), without writing the [n, K] products out: 4 rows at a time, 16 codewords
// per vector, a running minimum and its index per lane. Ties go to the lowest k.
#if defined(__AVX512F__)
static void nearest_rows(const float* L, const float* R, int64_t D, int64_t K, int64_t Kp,
                         int64_t i0, int64_t i1, int64_t* idx, float* best) {
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  const __m512i step = _mm512_set1_epi32(16);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t i = i0; i < i1; i += 4) {
    const int64_t rows = std::min<int64_t>(4, i1 - i);
    __m512 bv[4] = {inf, inf, inf, inf};
    __m512i bi[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                     _mm512_setzero_si512()};
    __m512i k_ids = lanes;
    for (int64_t kb = 0; kb < Kp; kb += 16) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                       _mm512_setzero_ps()};
      for (int64_t j = 0; j < D; ++j) {
        const __m512 r = _mm512_loadu_ps(R + j * Kp + kb);
        for (int64_t t = 0; t < rows; ++t)
          acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(L[(i + t) * D + j]), r, acc[t]);
      }
      const __mmask16 live = kb + 16 <= K ? 0xFFFF : static_cast<__mmask16>((1u << (K - kb)) - 1);
      for (int64_t t = 0; t < rows; ++t) {
        const __mmask16 lt = _mm512_mask_cmp_ps_mask(live, acc[t], bv[t], _CMP_LT_OQ);
        bv[t] = _mm512_mask_mov_ps(bv[t], lt, acc[t]);
        bi[t] = _mm512_mask_mov_epi32(bi[t], lt, k_ids);
      }
      k_ids = _mm512_add_epi32(k_ids, step);
    }
    for (int64_t t = 0; t < rows; ++t) {
      const float v = _mm512_reduce_min_ps(bv[t]);
      const __mmask16 at = _mm512_cmp_ps_mask(bv[t], _mm512_set1_ps(v), _CMP_EQ_OQ);
      const __m512i big = _mm512_set1_epi32(std::numeric_limits<int32_t>::max());
      best[i + t] = v;
      idx[i + t] = _mm512_reduce_min_epi32(_mm512_mask_mov_epi32(big, at, bi[t]));
    }
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// The AVX-512 form above in registers of 8: four rows at a time, each lane keeping the least of
// its codewords (the first on ties), then the least lane (the lowest codeword on ties).
static void nearest_rows(const float* L, const float* R, int64_t D, int64_t K, int64_t Kp,
                         int64_t i0, int64_t i1, int64_t* idx, float* best) {
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256i step = _mm256_set1_epi32(8), count = _mm256_set1_epi32(static_cast<int>(K));
  for (int64_t i = i0; i < i1; i += 4) {
    const int64_t rows = std::min<int64_t>(4, i1 - i);
    __m256 bv[4] = {inf, inf, inf, inf};
    __m256i bi[4] = {};
    __m256i k_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t kb = 0; kb < K; kb += 8) {  // R's rows hold Kp >= kb + 8 entries
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                       _mm256_setzero_ps()};
      for (int64_t j = 0; j < D; ++j) {
        const __m256 r = _mm256_loadu_ps(R + j * Kp + kb);
        for (int64_t t = 0; t < rows; ++t)
          acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(L[(i + t) * D + j]), r, acc[t]);
      }
      const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(count, k_ids));
      for (int64_t t = 0; t < rows; ++t) {
        const __m256 lt = _mm256_and_ps(live, _mm256_cmp_ps(acc[t], bv[t], _CMP_LT_OQ));
        bv[t] = _mm256_blendv_ps(bv[t], acc[t], lt);
        bi[t] = _mm256_castps_si256(
            _mm256_blendv_ps(_mm256_castsi256_ps(bi[t]), _mm256_castsi256_ps(k_ids), lt));
      }
      k_ids = _mm256_add_epi32(k_ids, step);
    }
    for (int64_t t = 0; t < rows; ++t) {  // in registers (a loop over the lanes branched)
      __m256 v = _mm256_min_ps(bv[t], _mm256_permute2f128_ps(bv[t], bv[t], 1));
      v = _mm256_min_ps(v, _mm256_shuffle_ps(v, v, 0x4E));
      v = _mm256_min_ps(v, _mm256_shuffle_ps(v, v, 0xB1));  // the least in every lane
      const __m256i big = _mm256_set1_epi32(std::numeric_limits<int32_t>::max());
      const __m256 at = _mm256_cmp_ps(bv[t], v, _CMP_EQ_OQ);
      __m256i k = _mm256_castps_si256(
          _mm256_blendv_ps(_mm256_castsi256_ps(big), _mm256_castsi256_ps(bi[t]), at));
      k = _mm256_min_epi32(k, _mm256_permute2x128_si256(k, k, 1));
      k = _mm256_min_epi32(k, _mm256_shuffle_epi32(k, 0x4E));
      k = _mm256_min_epi32(k, _mm256_shuffle_epi32(k, 0xB1));
      best[i + t] = _mm256_cvtss_f32(v);
      idx[i + t] = _mm256_cvtsi256_si32(k);
    }
  }
}
#else
static void nearest_rows(const float* L, const float* R, int64_t D, int64_t K, int64_t Kp,
                         int64_t i0, int64_t i1, int64_t* idx, float* best) {
  std::vector<float> dist(K);
  for (int64_t i = i0; i < i1; ++i) {
    std::fill(dist.begin(), dist.end(), 0.f);
    for (int64_t j = 0; j < D; ++j)
      for (int64_t k = 0; k < K; ++k) dist[k] += L[i * D + j] * R[j * Kp + k];
    int64_t b = 0;
    for (int64_t k = 1; k < K; ++k)
      if (dist[k] < dist[b]) b = k;
    idx[i] = b;
    best[i] = dist[b];
  }
}
#endif

std::vector<torch::Tensor> nearest(torch::Tensor lhs, torch::Tensor rhs) {
  TORCH_CHECK(lhs.dim() == 2 && lhs.scalar_type() == torch::kFloat32, "lhs: [n, D] float32");
  TORCH_CHECK(rhs.dim() == 2 && rhs.scalar_type() == torch::kFloat32 && rhs.size(0) == lhs.size(1),
              "rhs: [D, K] float32");
  TORCH_CHECK(rhs.size(1) > 0, "rhs: no codewords");
  const int64_t n = lhs.size(0), D = lhs.size(1), K = rhs.size(1), Kp = (K + 15) / 16 * 16;
  lhs = lhs.contiguous();
  auto padded = torch::zeros({D, Kp}, rhs.options());
  padded.narrow(1, 0, K).copy_(rhs);
  auto idx = torch::empty({n}, lhs.options().dtype(torch::kInt64));
  auto best = torch::empty({n}, lhs.options());
  const float* L = lhs.data_ptr<float>();
  const float* R = padded.data_ptr<float>();
  int64_t* I = idx.data_ptr<int64_t>();
  float* B = best.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(64, (1 << 16) / Kp), [&](int64_t a, int64_t b) {
    nearest_rows(L, R, D, K, Kp, a, b, I, B);
  });
  return {idx, best};
}

// VQLinear's bound decode function (kernels.cpu.decoder) calls a decode kernel through this:
// x [..., n] of at most `limit` tokens, contiguous float32 on the CPU, gets the kernel's output;
// any other x gets None (the caller falls back to the kernel contract). The check is made here,
// not in Python: once a large layer has run through the caches, every Python-side tensor
// attribute or view costs a few microseconds of cold code, together as much as a small layer's
// whole decode (BENCHMARKS.md, Inference speed).
bool decode_serves(const torch::Tensor& x, int64_t n, int64_t limit) {
  return x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() >= 1 &&
         x.size(-1) == n && x.numel() <= limit * n && x.is_contiguous();
}

template <typename F, F kernel>
struct OrNone;
template <typename... A, torch::Tensor (*kernel)(torch::Tensor, torch::Tensor, A...)>
struct OrNone<torch::Tensor (*)(torch::Tensor, torch::Tensor, A...), kernel> {
  static std::optional<torch::Tensor> call(torch::Tensor x, int64_t limit, torch::Tensor perm,
                                           A... args) {
    if (!decode_serves(x, perm.numel(), limit)) return std::nullopt;
    return kernel(std::move(x), std::move(perm), std::move(args)...);
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vq_gemv", &vq_gemv, "RSAVQ LUT GEMV");
  m.def("vq_repack", &vq_repack, "RSAVQ codes repacked for vq_gemv16");
  m.def("vq_gemv16", &vq_gemv16, "RSAVQ decode with int16 tables");
  m.def("vq_prefill", &vq_prefill, "RSAVQ prefill: dequantize blocks of rows, multiply each");
  m.def("prefill_amx", &prefill_amx_available, "whether vq_prefill can use AMX tiles here");
  m.def("vq_dequantize", &vq_dequantize, "RSAVQ dequantize into the original channel order");
  m.def("vq_gemv_wide", &vq_gemv_wide, "RSAVQ decode of codes wider than a byte, pairs per code");
  m.def("decode16", &OrNone<decltype(&vq_gemv16), &vq_gemv16>::call,
        "vq_gemv16 for x [..., n] of at most `limit` tokens, else None");
  m.def("decode_wide", &OrNone<decltype(&vq_gemv_wide), &vq_gemv_wide>::call,
        "vq_gemv_wide for x [..., n] of at most `limit` tokens, else None");
  m.def("nearest", &nearest, "k-means: nearest codeword of every row, no [n, K] products");
  m.def("stored_gemv", &stored_gemv, "float32 inputs times a bfloat16 weight, widened in registers");
}
