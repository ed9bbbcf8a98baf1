// The CUDA BN driver (csrc/bn_cuda_driver.h) and its kernels' bodies (csrc/bn_cuda_kernels.h) compiled
// for the host, as the ops torch.ops.resfast_cuda_on_host.native_bn_* on CPU tensors: a verification
// aid, not a backend. Each launch runs its blocks one after another, and in a block every thread of a
// phase before the next phase (the GPU's barriers), over the same plan, vector/scalar choice, partial
// results and ticket counters as the GPU; tests/test_bn_native.py checks them against the
// specification on every case it runs the CPU driver on. The blocks run in reverse order, so the
// block that merges a group's partial results (the last to take a ticket) is its first chunk's,
// where on the GPU it is usually a late one: the merge must not depend on which block it is.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <memory>

// A slot's values are written and read under the same `ok[k]`, which GCC does not follow through the
// unrolled, flattened loops: it warns that they are or may be read uninitialised, where an invalid
// slot's values are at most computed and never stored or summed. Initialising them instead changed
// the GPU's register allocation enough to make ptxas spill (StatsKernel<float, 4, true>).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include "../bn_cuda_driver.h"
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#include "../bn_schemas.h"
#include "host_fma.h"

namespace resfast::bn {
namespace {

struct HostLauncher {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  struct Guard {
    explicit Guard(const at::Device&) {}
  };

  // flatten: the kernel body is inlined here, so it is compiled with the GPU's fused multiply-adds.
  template <typename Kernel>
  RESFAST_INLINE_CALLEES RESFAST_HOST_FMA static void run_blocks(const Kernel& kernel, int64_t blocks,
                                                                 typename Kernel::Shared& shared) {
    const int phases = kernel.phases();
    for (int64_t block = blocks - 1; block >= 0; --block) {
      for (int phase = 0; phase < phases; ++phase) {
        bool go = true;
        for (int t = 0; t < kBnThreads; ++t) go = kernel.run(phase, block, t, shared);
        if (!go) break;
      }
    }
  }

  template <typename Kernel>
  static void launch(const Kernel& kernel, int64_t blocks, const at::Device&) {
    TORCH_CHECK(host_has_fma(), "resfast_cuda_on_host: this CPU has no FMA instructions, which the GPU's "
                "arithmetic needs to be reproduced");
    const auto shared = std::make_unique<typename Kernel::Shared>();
    run_blocks(kernel, blocks, *shared);
  }

  static void zero(at::Tensor& counters) { counters.zero_(); }
};

using Driver = CudaDriver<HostLauncher>;

}  // namespace
}  // namespace resfast::bn

TORCH_LIBRARY_FRAGMENT(resfast_cuda_on_host, m) {
  RESFAST_DEFINE_BN_SCHEMAS(m);
}

TORCH_LIBRARY_IMPL(resfast_cuda_on_host, CPU, m) {
  RESFAST_REGISTER_BN_OPS(m, resfast::bn::Driver);
}
