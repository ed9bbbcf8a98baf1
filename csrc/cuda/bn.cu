// CUDA driver of the fused BN + add + ReLU: the four native ops (csrc/bn_schemas.h) for CUDA tensors.
// The host side is csrc/bn_cuda_driver.h and the kernels' bodies csrc/bn_cuda_kernels.h, both also
// compiled for the host by csrc/cpu/bn_cuda_on_host.cpp, where the CPU tests run them; this file only
// launches: one kernel template runs a body's phases with a block barrier between them.
// Only c10/cuda and the CUDA runtime, as csrc/cuda/optim.cu (no cuBLAS/cuSPARSE headers needed).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../bn_cuda_driver.h"
#include "../bn_schemas.h"

namespace resfast::bn {
namespace {

template <typename Kernel>
__global__ void __launch_bounds__(kBnThreads) bn_kernel(const Kernel kernel) {
  __shared__ typename Kernel::Shared shared;
  const int phases = kernel.phases();
  for (int phase = 0; phase < phases; ++phase) {
    if (phase > 0) __syncthreads();
    // false for every thread of the block alike (a value read from shared memory after a barrier)
    if (!kernel.run(phase, blockIdx.x, static_cast<int>(threadIdx.x), shared)) return;
  }
}

struct CudaLauncher {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  using Guard = c10::cuda::CUDAGuard;

  template <typename Kernel>
  static void launch(const Kernel& kernel, int64_t blocks, const at::Device& device) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
    bn_kernel<Kernel><<<static_cast<unsigned>(blocks), kBnThreads, 0, stream>>>(kernel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // An asynchronous memset on the current stream (a memset node under graph capture).
  static void zero(at::Tensor& counters) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(counters.device().index());
    C10_CUDA_CHECK(cudaMemsetAsync(counters.data_ptr(), 0, counters.nbytes(), stream));
  }
};

using Driver = CudaDriver<CudaLauncher>;

}  // namespace
}  // namespace resfast::bn

TORCH_LIBRARY_IMPL(resfast, CUDA, m) {
  RESFAST_REGISTER_BN_OPS(m, resfast::bn::Driver);
}
