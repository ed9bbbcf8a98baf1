// The work table of the native multi-tensor updates, shared by the CPU driver (csrc/cpu/optim.cpp),
// the CUDA driver (csrc/cuda/optim.cu) and the CUDA kernel body compiled for the host
// (csrc/cpu/cuda_kernel_on_host.cpp), so that the CPU tests run the indexing the GPU runs.
//
// One row per non-empty tensor of a call: the addresses of its N tensors (param, grad, states), its
// element count, the index of its first chunk and its index in the call, which is its row of the
// coefficient table (rows of empty tensors are skipped, so a row's position is NOT its tensor
// index). A chunk finds its row by binary search over the first-chunk column, so one pass (one
// CUDA launch) covers any number of tensors of any sizes with no kernel-argument limit.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <vector>

namespace resfast {

template <int N>
struct WorkRow {
  static constexpr int kNumel = N;           // columns 0..N-1: addresses
  static constexpr int kFirstChunk = N + 1;  // column N: element count
  static constexpr int kTensor = N + 2;      // the tensor's index in the call = its coefficient row
  static constexpr int kWidth = N + 3;
};

struct WorkTable {
  std::vector<int64_t> rows;  // n_rows * WorkRow<N>::kWidth values
  int64_t n_rows = 0;
  int64_t n_chunks = 0;
};

// The table for lists = [params, grads, states...] in chunks of `chunk` elements.
template <int N>
WorkTable build_work_table(const std::vector<at::TensorList>& lists, int64_t chunk) {
  using Row = WorkRow<N>;
  const at::TensorList params = lists[0];
  WorkTable table;
  table.rows.reserve(params.size() * Row::kWidth);
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t numel = params[t].numel();
    if (numel == 0) continue;  // no chunk, so no row: the binary search never lands on it
    for (int k = 0; k < N; ++k) table.rows.push_back(reinterpret_cast<int64_t>(lists[k][t].data_ptr()));
    table.rows.push_back(numel);
    table.rows.push_back(table.n_chunks);
    table.rows.push_back(static_cast<int64_t>(t));
    table.n_chunks += (numel + chunk - 1) / chunk;
    ++table.n_rows;
  }
  return table;
}

// Elements [begin, end) of the tensor whose table row starts at `row`.
struct ChunkSpan {
  const int64_t* row;
  int64_t begin, end;
};

// The row that chunk `index` (< the table's n_chunks) belongs to, and its elements: the last row
// whose first chunk is <= index.
template <int N>
C10_HOST_DEVICE inline ChunkSpan locate_chunk(const int64_t* table, int64_t n_rows, int64_t index, int64_t chunk) {
  using Row = WorkRow<N>;
  int64_t lo = 0, hi = n_rows - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (table[mid * Row::kWidth + Row::kFirstChunk] <= index) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t* row = table + lo * Row::kWidth;
  const int64_t begin = (index - row[Row::kFirstChunk]) * chunk;
  const int64_t end = begin + chunk < row[Row::kNumel] ? begin + chunk : row[Row::kNumel];
  return {row, begin, end};
}

}  // namespace resfast
