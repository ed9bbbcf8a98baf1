// How the native BN drivers walk a tensor of shape (N, C, *spatial): plain data and index arithmetic,
// C10_HOST_DEVICE so that a CUDA driver can split its work the same way (and the CPU tests exercise
// that indexing). csrc/cpu/bn.cpp builds a plan from tensors; the kernels only read it.
//
// Every tensor of a pass is seen as (N, C, S), S = prod(spatial), through its own element strides,
// with ONE memory-contiguous inner axis shared by all of them:
// - channels-first (NCHW, and channel slices of it): the spatial axis, stride 1. A "run" is the S
//   values of one (sample, channel).
// - channels-last (channels_last, (N, C) and (N, C, L) with channels innermost): the channel axis,
//   stride 1. A "position" (sample, spatial index) holds the C channels contiguously.
// The outer index q = n * S + s enumerates the M = N * S values of each channel.
//
// Work is split into items, each a range of q small enough for its data to stay in cache between a
// kernel's two passes over it (the statistics' mean, then the squared deviations):
// - channels-first: item = (channel c, chunk j of `chunk` consecutive q), items = C * chunks,
//   numbered c * chunks + j, so one channel's partial results are consecutive.
// - channels-first where one sample's C * S values fit an item ("sample-major", CIFAR's shapes): item =
//   chunk j of whole samples, every channel; items = chunks. Its data is then one contiguous span, read
//   in memory order, where one channel's runs of S values lie C * S apart (a stride that defeats the
//   CPU's prefetchers when the runs are short).
// - channels-last: item = chunk j of `chunk` consecutive positions, every channel; items = chunks.
// Either way a reduction writes one partial result per (item, channel), at index
// `partial_index(plan, j, c)`, and each channel's partials are merged in the order of j: the result
// depends on the shape alone, never on how many threads ran the items.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace resfast::bn {

// One tensor of a pass: its data and element strides along the batch, the flattened spatial dims and
// the channels. The stride of the plan's inner axis is 1.
struct Operand {
  void* data;
  int64_t stride_n, stride_s, stride_c;
};

struct Plan {
  int64_t N, C, S;
  int64_t M;             // values per channel, N * S
  bool channels_last;    // inner axis: channels (true) or spatial positions (false)
  int64_t chunk;         // q values (channels-first) or positions (channels-last) per item
  int64_t chunks;        // chunks along q: items per channel (channels-first) or items (channels-last)
  int64_t items;         // work items in all
  bool sample_major = false;  // channels-first items of whole samples, every channel (see above)
};

// Does an item hold every channel (channels-last, or sample-major), rather than one?
C10_HOST_DEVICE inline bool items_span_channels(const Plan& p) { return p.channels_last || p.sample_major; }

// Elements an item aims for: its passes over them stay in L1/L2 (64 KiB of fp32), and there are
// enough items to spread over the cores at ResNet sizes.
constexpr int64_t kItemElements = 16384;
constexpr int64_t kMinItems = 4;

C10_HOST_DEVICE inline Plan make_plan(int64_t N, int64_t C, int64_t S, bool channels_last) {
  Plan p{N, C, S, N * S, channels_last, 0, 0, 0};
  if (channels_last) {
    p.chunk = C >= kItemElements ? 1 : kItemElements / C;
  } else if (C * S > 0 && C * S <= kItemElements) {
    p.sample_major = true;
    // Whole samples per item, at most kItemElements values, and few enough for kMinItems items where
    // the batch allows (a small layer is then spread over the threads instead of one item on one).
    const int64_t fit = kItemElements / (C * S), spread = (N + kMinItems - 1) / kMinItems;
    p.chunk = (fit < spread ? fit : spread) * S;
  } else {
    p.chunk = kItemElements;
  }
  if (p.chunk > p.M) p.chunk = p.M > 0 ? p.M : 1;
  p.chunks = (p.M + p.chunk - 1) / p.chunk;
  p.items = items_span_channels(p) ? p.chunks : C * p.chunks;
  return p;
}

// The chunk along q of an item, and its channels [c, c_end) (channels-first: one, or every one when
// sample-major; channels-last: c = 0, c_end = C).
struct ItemRange {
  int64_t j;         // chunk index
  int64_t c, c_end;  // channels
  int64_t q0, q1;    // outer indices [q0, q1)
};

C10_HOST_DEVICE inline ItemRange item_range(const Plan& p, int64_t item) {
  ItemRange r;
  const bool all = items_span_channels(p);
  r.c = all ? 0 : item / p.chunks;
  r.c_end = all ? p.C : r.c + 1;
  r.j = all ? item : item % p.chunks;
  r.q0 = r.j * p.chunk;
  r.q1 = r.q0 + p.chunk < p.M ? r.q0 + p.chunk : p.M;
  return r;
}

// Values per channel in chunk j.
C10_HOST_DEVICE inline int64_t chunk_count(const Plan& p, int64_t j) {
  const int64_t q0 = j * p.chunk;
  return (q0 + p.chunk < p.M ? q0 + p.chunk : p.M) - q0;
}

// Where the partial result of chunk j for channel c is stored (C * chunks of them).
C10_HOST_DEVICE inline int64_t partial_index(const Plan& p, int64_t j, int64_t c) {
  return items_span_channels(p) ? j * p.C + c : c * p.chunks + j;
}

// Element offset of (n, s, c) in an operand.
C10_HOST_DEVICE inline int64_t offset(const Operand& o, int64_t n, int64_t s, int64_t c) {
  return n * o.stride_n + s * o.stride_s + c * o.stride_c;
}

}  // namespace resfast::bn
