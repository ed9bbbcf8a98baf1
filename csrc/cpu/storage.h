// The storage dtypes of the CPU kernels' tensors, as plain data for the per-instruction-set builds
// (which include nothing from ATen but its SIMD vector headers). The arithmetic is fp32 for all.
#pragma once

namespace resfast::cpu {

enum class Storage { Float, BFloat16, Half };

}  // namespace resfast::cpu
