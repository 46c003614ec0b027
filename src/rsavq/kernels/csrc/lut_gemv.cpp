// Lookup-table GEMV for RSAVQ codes on the CPU (the decode path: a few tokens at a time).
//
// x      [T, n]        float32, input channels already in permuted order (x[..., perm]).
// codes  per group g:  [m, W_g] int32, per output row J_g = n_vec_g * P codes of widths[g] bits,
//                      packed little-endian (rsavq.packing), possibly straddling two words.
// books  per group g:  [P, K_g, d] float16 codebooks (d = v / P).
// out    [T, m]        float32.
// Per group, the table lut[t, j, k] = <x sub-vector j of token t, codeword k of position j % P>
// is built once (padding past the group's columns counts as zero); then every output row sums
// the J_g entries its codes pick.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

void build_table(const float* x, int64_t n, int64_t T, int64_t start, int64_t cols, int64_t v,
                 const at::Half* book, int64_t P, int64_t K, std::vector<float>& lut) {
  const int64_t d = v / P, n_vec = (cols + v - 1) / v, J = n_vec * P;
  lut.assign(T * J * K, 0.f);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < J; ++j) {
      const int64_t col = (j / P) * v + (j % P) * d;
      float sub[16];
      for (int64_t e = 0; e < d; ++e) sub[e] = col + e < cols ? x[t * n + start + col + e] : 0.f;
      const at::Half* cb = book + (j % P) * K * d;
      float* row = lut.data() + (t * J + j) * K;
      for (int64_t k = 0; k < K; ++k) {
        float acc = 0.f;
        for (int64_t e = 0; e < d; ++e) acc += sub[e] * static_cast<float>(cb[k * d + e]);
        row[k] = acc;
      }
    }
  }
}

inline int64_t code_at(const uint32_t* row, uint64_t bit, int64_t width, uint64_t mask) {
  const uint64_t w = bit >> 5, off = bit & 31;
  const uint64_t both = row[w] | (off + width > 32 ? uint64_t{row[w + 1]} << 32 : 0);
  return static_cast<int64_t>((both >> off) & mask);
}

void gather_sum(const std::vector<float>& lut, int64_t T, int64_t J, int64_t K,
                const torch::Tensor& codes, int64_t width, float* out, int64_t m) {
  const uint32_t* C = reinterpret_cast<const uint32_t*>(codes.data_ptr<int32_t>());
  const int64_t W = codes.size(1);
  const uint64_t mask = (uint64_t{1} << width) - 1;
  const float* L = lut.data();
  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t* row = C + r * W;
      for (int64_t t = 0; t < T; ++t) {
        const float* Lt = L + t * J * K;
        float acc0 = 0.f, acc1 = 0.f;
        int64_t j = 0;
        for (; j + 1 < J; j += 2) {
          acc0 += Lt[j * K + code_at(row, j * width, width, mask)];
          acc1 += Lt[(j + 1) * K + code_at(row, (j + 1) * width, width, mask)];
        }
        if (j < J) acc0 += Lt[j * K + code_at(row, j * width, width, mask)];
        out[t * m + r] += acc0 + acc1;
      }
    }
  });
}

}  // namespace

torch::Tensor vq_gemv(torch::Tensor x, std::vector<torch::Tensor> codes,
                      std::vector<torch::Tensor> books, std::vector<int64_t> sizes,
                      std::vector<int64_t> widths, int64_t v, int64_t m) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x");
  const int64_t T = x.size(0), n = x.size(1);
  auto out = torch::zeros({T, m}, x.options());
  std::vector<float> lut;
  int64_t start = 0;
  for (size_t g = 0; g < sizes.size(); ++g) {
    const auto& book = books[g];
    TORCH_CHECK(book.scalar_type() == torch::kHalf && book.is_contiguous(), "fp16 codebooks");
    TORCH_CHECK(codes[g].scalar_type() == torch::kInt && codes[g].is_contiguous(), "int32 codes");
    const int64_t P = book.size(0), K = book.size(1), d = book.size(2);
    TORCH_CHECK(d * P == v && d <= 16, "codebook shape");
    const int64_t J = (sizes[g] + v - 1) / v * P;
    TORCH_CHECK(codes[g].size(0) == m && codes[g].size(1) * 32 >= J * widths[g], "codes shape");
    build_table(x.data_ptr<float>(), n, T, start, sizes[g], v, book.data_ptr<at::Half>(), P, K,
                lut);
    gather_sum(lut, T, J, K, codes[g], widths[g], out.data_ptr<float>(), m);
    start += sizes[g];
  }
  TORCH_CHECK(start == n, "group sizes must add up to the input features");
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("vq_gemv", &vq_gemv, "RSAVQ LUT GEMV"); }
