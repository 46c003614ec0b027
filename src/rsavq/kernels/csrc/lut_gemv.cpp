// Lookup-table GEMV for RSAVQ codes on the CPU (the decode path, a few tokens at a time).
//
// lut   [T, J, K] float32: for token t and code slot j (vector j / P, sub-vector j % P), the dot
//        product of the input sub-vector with each of the K codewords.
// codes [m, W]    int32:   per output row, J codes of `width` bits packed little-endian
//                           (rsavq.packing), possibly straddling two words.
// out   [T, m]    float32: accumulated into (out[t, r] += sum_j lut[t, j, code(r, j)]).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>

torch::Tensor lut_gemv_(torch::Tensor lut, torch::Tensor codes, int64_t width, torch::Tensor out) {
  TORCH_CHECK(lut.is_contiguous() && codes.is_contiguous() && out.is_contiguous(), "contiguous");
  TORCH_CHECK(lut.scalar_type() == torch::kFloat && out.scalar_type() == torch::kFloat, "float32");
  TORCH_CHECK(codes.scalar_type() == torch::kInt, "codes must be int32");
  const int64_t T = lut.size(0), J = lut.size(1), K = lut.size(2);
  const int64_t m = codes.size(0), W = codes.size(1);
  TORCH_CHECK(W * 32 >= J * width, "codes hold fewer than J codes");
  const float* L = lut.data_ptr<float>();
  const uint32_t* C = reinterpret_cast<const uint32_t*>(codes.data_ptr<int32_t>());
  float* O = out.data_ptr<float>();
  const uint64_t mask = (uint64_t{1} << width) - 1;
  if (T == 1) {  // decode: one token, the common case
    at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const uint32_t* row = C + r * W;
        float acc0 = 0.f, acc1 = 0.f;
        uint64_t bit = 0;
        int64_t j = 0;
        for (; j + 1 < J; j += 2, bit += 2 * width) {
          uint64_t w = bit >> 5, off = bit & 31;
          uint64_t both = row[w] | (off + width > 32 ? uint64_t{row[w + 1]} << 32 : 0);
          acc0 += L[j * K + static_cast<int64_t>((both >> off) & mask)];
          const uint64_t bit1 = bit + width;
          w = bit1 >> 5, off = bit1 & 31;
          both = row[w] | (off + width > 32 ? uint64_t{row[w + 1]} << 32 : 0);
          acc1 += L[(j + 1) * K + static_cast<int64_t>((both >> off) & mask)];
        }
        if (j < J) {
          const uint64_t w = bit >> 5, off = bit & 31;
          const uint64_t both = row[w] | (off + width > 32 ? uint64_t{row[w + 1]} << 32 : 0);
          acc0 += L[j * K + static_cast<int64_t>((both >> off) & mask)];
        }
        O[r] += acc0 + acc1;
      }
    });
    return out;
  }
  at::parallel_for(0, m, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t* row = C + r * W;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t t0 = 0; t0 < T; t0 += 8) {
        const int64_t tn = std::min<int64_t>(8, T - t0);
        for (int64_t t = 0; t < tn; ++t) acc[t] = 0.f;
        uint64_t bit = 0;
        for (int64_t j = 0; j < J; ++j, bit += width) {
          const uint64_t w = bit >> 5, off = bit & 31;
          uint64_t both = row[w];
          if (off + width > 32) both |= uint64_t{row[w + 1]} << 32;
          const int64_t idx = j * K + static_cast<int64_t>((both >> off) & mask);
          for (int64_t t = 0; t < tn; ++t) acc[t] += L[(t0 + t) * J * K + idx];
        }
        for (int64_t t = 0; t < tn; ++t) O[(t0 + t) * m + r] += acc[t];
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("lut_gemv_", &lut_gemv_, "LUT GEMV (in place)"); }
