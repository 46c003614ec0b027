// CPU kernels for RSAVQ codes: a lookup-table GEMV for decode (a few tokens) and a dequantizer
// for prefill (dequantize once per call, then one dense matmul).
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
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMinTable = 16;        // tables padded to a whole register of floats
constexpr int64_t kTileRows = 64;        // rows per AVX-512 tile (4 registers of 16)
constexpr int64_t kChunkFloats = 1 << 17;  // 512 KiB of tables per j chunk (L2-sized)

struct Group {
  const uint32_t* codes;  // [m, W]
  int64_t W, J, K, Kp, width;
};

// lut [T, J, Kp]: dot products of every input sub-vector with every codeword (zero-padded to Kp).
void build_table(const float* x, const int32_t* perm, int64_t n, int64_t T, int64_t start,
                 int64_t cols, int64_t v, const at::Half* book, int64_t P, const Group& G,
                 std::vector<float>& lut) {
  const int64_t d = v / P, K = G.K, Kp = G.Kp;
  std::vector<float> bt(P * d * Kp, 0.f);  // [P, d, Kp] float32, transposed for k-contiguity
  for (int64_t p = 0; p < P; ++p)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t e = 0; e < d; ++e)
        bt[(p * d + e) * Kp + k] = static_cast<float>(book[(p * K + k) * d + e]);
  lut.assign(T * G.J * Kp, 0.f);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < G.J; ++j) {
      const int64_t col = (j / P) * v + (j % P) * d;
      float* row = lut.data() + (t * G.J + j) * Kp;
      for (int64_t e = 0; e < d && col + e < cols; ++e) {
        const float s = x[t * n + perm[start + col + e]];
        const float* b = bt.data() + ((j % P) * d + e) * Kp;
        for (int64_t k = 0; k < Kp; ++k) row[k] += s * b[k];
      }
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
  TORCH_CHECK(book.scalar_type() == torch::kHalf && book.is_contiguous(), "fp16 codebooks");
  TORCH_CHECK(codes.scalar_type() == torch::kInt && codes.is_contiguous(), "int32 codes");
  const int64_t P = book.size(0), K = book.size(1), d = book.size(2);
  TORCH_CHECK(d * P == v && K == (int64_t{1} << width) && width <= 16, "codebook shape");
  const int64_t J = (size + v - 1) / v * P;
  TORCH_CHECK(codes.size(0) == m && codes.size(1) * 32 >= J * width, "codes shape");
  const auto* C = reinterpret_cast<const uint32_t*>(codes.data_ptr<int32_t>());
  return Group{C, codes.size(1), J, K, std::max(K, kMinTable), width};
}

}  // namespace

torch::Tensor vq_gemv(torch::Tensor x, torch::Tensor perm, std::vector<torch::Tensor> codes,
                      std::vector<torch::Tensor> books, std::vector<int64_t> sizes,
                      std::vector<int64_t> widths, int64_t v, int64_t m) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x");
  const int64_t T = x.size(0), n = x.size(1);
  TORCH_CHECK(perm.dim() == 1 && perm.size(0) == n, "perm must have one entry per input");
  const auto order = perm.to(torch::kInt).contiguous();
  auto out = torch::zeros({T, m}, x.options());
  static thread_local std::vector<float> lut;  // kept between calls: no page faults per call
  int64_t start = 0;
  for (size_t g = 0; g < sizes.size(); ++g) {
    const Group G = group_of(codes[g], books[g], sizes[g], widths[g], v, m);
    build_table(x.data_ptr<float>(), order.data_ptr<int32_t>(), n, T, start, sizes[g], v,
                books[g].data_ptr<at::Half>(), books[g].size(0), G, lut);
    gather_sum(lut, T, G, out.data_ptr<float>(), m);
    start += sizes[g];
  }
  TORCH_CHECK(start == n, "group sizes must add up to the input features");
  return out;
}

// The weight [m, n] as float32 for prefill (dequantize once, then one dense matmul): rows in the
// original order (output-axis groups scatter their rows through perm), columns in the permuted
// order of the codes (input-axis layers: W[:, perm]; multiply x[:, perm], cheaper than scattering
// the columns of W). Written into `workspace` when given and large enough (a buffer reused across
// calls: a fresh 64 MiB tensor costs as much in page faults as the dequantization itself).
torch::Tensor vq_dequantize(std::vector<torch::Tensor> codes, std::vector<torch::Tensor> books,
                            torch::Tensor perm, std::vector<int64_t> sizes,
                            std::vector<int64_t> widths, int64_t v, int64_t m, int64_t n,
                            bool input_axis, std::optional<torch::Tensor> workspace) {
  const auto order = perm.to(torch::kInt).contiguous();
  TORCH_CHECK(order.dim() == 1 && order.size(0) == (input_axis ? n : m), "perm size");  // rows
  const int32_t* O = order.data_ptr<int32_t>();
  const bool reuse = workspace && workspace->scalar_type() == torch::kFloat &&
                     workspace->is_contiguous() && workspace->numel() >= m * n;
  auto W = reuse ? workspace->flatten().narrow(0, 0, m * n).view({m, n})
                 : torch::empty({m, n}, torch::kFloat);
  float* out = W.data_ptr<float>();
  int64_t start = 0;
  for (size_t g = 0; g < sizes.size(); ++g) {
    const int64_t rows = input_axis ? m : sizes[g], cols = input_axis ? sizes[g] : n;
    const Group G = group_of(codes[g], books[g], cols, widths[g], v, rows);
    const int64_t P = books[g].size(0), d = v / P;
    const auto cb = books[g].to(torch::kFloat);  // [P, K, d]
    const float* C = cb.data_ptr<float>();
    const uint64_t mask = (uint64_t{1} << G.width) - 1;
    at::parallel_for(0, rows, 16, [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) {
        float* dst = out + (input_axis ? r * n + start : O[start + r] * n);
        const uint32_t* row = G.codes + r * G.W;
        for (int64_t j = 0, col = 0; j < G.J; col += v) {
          for (int64_t p = 0; p < P; ++p, ++j) {
            const float* w = C + (p * G.K + code_at(row, j * G.width, G.width, mask)) * d;
            const int64_t c0 = col + p * d, c1 = std::min(c0 + d, cols);
            for (int64_t c = c0; c < c1; ++c) dst[c] = w[c - c0];
          }
        }
      }
    });
    start += sizes[g];
  }
  TORCH_CHECK(start == (input_axis ? n : m), "group sizes must add up to the grouped axis");
  return W;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vq_gemv", &vq_gemv, "RSAVQ LUT GEMV");
  m.def("vq_dequantize", &vq_dequantize, "RSAVQ dequantize into the original channel order");
}
