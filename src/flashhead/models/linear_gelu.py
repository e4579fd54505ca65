"""A linear layer with its bias and tanh-GELU applied in the GEMM's epilogue (the DiT's first FFN layer).

`gelu(x @ W.T + b, approximate="tanh")` as one cuBLASLt call on CUDA (`torch._addmm_activation`, epilogue
GELU_BIAS): the (tokens x 8960) activation is written once instead of written, read and written again by a
separate GELU kernel (Pro on one H200: 111 us per layer and step, ~13 ms per chunk). The epilogue applies the
GELU to the float32 accumulator before rounding to bfloat16, so results differ from the two-kernel path by the
rounding of the activation (the speed switch `fused_gelu` is checked against the plain path on the GPU).

It is a custom op so that torch.compile keeps it as one call: Inductor would otherwise split it back into a
GEMM and a separate pointwise GELU kernel. Off CUDA it is the plain composition (the CPU kernel of
`_addmm_activation` applies the exact, not the tanh, GELU). Inference only: it has no backward (training runs
the plain FFN; the switch is an inference speed switch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("flashhead::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(linear(x, weight, bias), approximate="tanh") for x (..., in), weight (out, in), bias (out,)."""
    if x.is_cuda:
        flat = x.reshape(-1, x.shape[-1])
        out = torch._addmm_activation(bias, flat, weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


@linear_gelu.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
