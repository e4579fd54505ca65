// One 3-D convolution (cross-correlation, NDHWC activations, KTRSC filters, bf16, float32 accumulation) as a
// CUTLASS 3 implicit GEMM for Hopper: TMA's im2col mode gathers the activation tiles, WGMMA multiplies them, and the
// epilogue adds the per-channel bias and stores bf16 NDHWC.
//
// Why: cuDNN's fastest kernels for the Wan2.1 decoder's 96-channel layers use 128-wide output tiles, so a quarter
// of every tensor-core product is padding; here the tile's N extent is a template parameter (96, 192, ...).
// Measured (docs/performance-log.md, H200): inside the compiled decode the 96-wide tiles alone ran those layers no faster
// than cuDNN (session 28); in clusters of two along the pixels, sharing the filter tiles, they take 0.94 against
// 1.09 ms a call, and the compiled Pro chunk decode 161.4 against cuDNN's 171.6 ms (session 29).
//
// This file is compiled once per tile shape (FH_TILE_M / FH_TILE_N / FH_TILE_K, FH_NAME) and linked with a small
// registry that flashhead/models/vae/cutlass_conv.py generates. Each exports one C function, so the library needs
// neither torch headers nor a matching CUDA runtime: Python passes raw pointers and the current stream.

#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.hpp"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"

#ifndef FH_TILE_M
#define FH_TILE_M 128
#define FH_TILE_N 96
#define FH_TILE_K 64
#define FH_NAME m128n96k64
#endif
#ifndef FH_STAGES
#define FH_STAGES 0  // 0: as many pipeline stages as shared memory holds
#endif
#ifndef FH_CLUSTER_M
#define FH_CLUSTER_M 1  // CTAs per cluster along the pixels: they share (TMA-multicast) the filter tiles
#endif
#ifndef FH_CLUSTER_N
#define FH_CLUSTER_N 1  // ... along the output channels: they share the activation tiles
#endif

#define FH_CAT2(a, b) a##b
#define FH_CAT(a, b) FH_CAT2(a, b)

namespace {
using namespace cute;

using Element = cutlass::bfloat16_t;
using TileShape = Shape<Int<FH_TILE_M>, Int<FH_TILE_N>, Shape<Int<FH_TILE_K>>>;
// A cluster of CTAs loads each tile that its members share once from L2 and multicasts it: the 96-channel layers'
// loads (27 taps of every pixel, the filter per tile) come near what L2 delivers at their tensor-core rate.
using ClusterShape = Shape<Int<FH_CLUSTER_M>, Int<FH_CLUSTER_N>, _1>;
// CUTLASS has no persistent (cooperative / ping-pong) schedule for convolutions: one producer and one consumer
// warp group per tile. Fewer stages leave shared memory for a second resident tile, whose mainloop then overlaps
// this one's epilogue.
using MainloopSchedule = cutlass::conv::KernelImplicitTmaWarpSpecializedSm90;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
// out = acc + bias[channel], rounded once to bf16; no source tensor is read.
using Fusion = cutlass::epilogue::fusion::LinCombPerColBias<Element, float, Element, Element, float>;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float,
    void, cutlass::layout::TensorNDHWC, 8,
    Element, cutlass::layout::TensorNDHWC, 8,
    EpilogueSchedule, Fusion>::CollectiveOp;

using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop,
    Element, cutlass::layout::TensorNDHWC, 8,
    Element, cutlass::layout::TensorNDHWC, 8,
    float, TileShape, ClusterShape,
    cute::conditional_t<FH_STAGES == 0,
        cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
        cutlass::conv::collective::StageCount<(FH_STAGES > 0 ? FH_STAGES : 1)>>,
    MainloopSchedule>::CollectiveOp;

using Problem = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, 3>;
using Kernel = cutlass::conv::kernel::ConvUniversal<Problem, Mainloop, Epilogue>;
using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
}  // namespace

// Status: 0 launched; 1 this tile shape cannot run the problem (alignment, padding limits); 2 it needs a
// workspace (not supported); 3 initialisation or launch failed.
extern "C" int FH_CAT(fh_conv3d_fprop_, FH_NAME)(
    const void* act, const void* flt, const void* bias, void* out,
    int n, int d, int h, int w, int c, int k, int t, int r, int s,
    int pad_front, int pad_back, int pad_h, int pad_w, int sm_count, void* stream) {
  // Time padding per side: the Wan decoder's causal convolutions pad only in front (TMA's im2col reads the
  // missing frames as zeros, so no padded copy of the input is made).
  Problem problem(cutlass::conv::Mode::kCrossCorrelation,
                  {n, d, h, w, c}, {k, t, r, s, c},
                  {pad_front, pad_h, pad_w}, {pad_back, pad_h, pad_w},
                  {1, 1, 1}, {1, 1, 1}, 1);
  typename Kernel::StrideD stride_d{};
  // The epilogue's M mode is (q, p, z, n); problem.stride_C lists [n, z, p, q, k].
  cute::get<0, 0>(stride_d) = problem.stride_C[3];
  cute::get<0, 1>(stride_d) = problem.stride_C[2];
  cute::get<0, 2>(stride_d) = problem.stride_C[1];
  cute::get<0, 3>(stride_d) = problem.stride_C[0];

  typename Conv::Arguments args{};
  args.problem_shape = problem;
  args.mainloop.ptr_A = static_cast<Element const*>(act);
  args.mainloop.ptr_B = static_cast<Element const*>(flt);
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = stride_d;
  args.epilogue.ptr_D = static_cast<Element*>(out);
  args.epilogue.dD = stride_d;
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.thread.bias_ptr = static_cast<Element const*>(bias);
  args.hw_info.sm_count = sm_count;

  Conv conv;
  if (conv.can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (Conv::get_workspace_size(args) != 0) return 2;
  auto cu_stream = static_cast<cudaStream_t>(stream);
  if (conv.initialize(args, nullptr, cu_stream) != cutlass::Status::kSuccess) return 3;
  if (conv.run(cu_stream) != cutlass::Status::kSuccess) return 3;
  return 0;
}
