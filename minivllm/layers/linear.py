"""Linear layers that know how to take their shard of a checkpoint tensor.

Column-parallel layers split the output features across tensor-parallel ranks,
row-parallel layers split the input features and all-reduce their output. With one rank
they are plain linears. ``weight_loader(param, tensor, shard_id)`` copies a checkpoint
tensor (possibly one of several merged into this layer) into this rank's slice, once it has
checked that the tensor has the whole (unsharded) shape.
"""
import torch
import torch.nn.functional as F
from torch import nn

import kernels

from minivllm.distributed import all_reduce, tp_rank, tp_size
from minivllm.loader import expect_shape


class ColumnParallelLinear(nn.Module):
    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        super().__init__()
        tp = tp_size()
        for size in output_sizes:
            if size % tp:
                raise ValueError(f"output size {size} does not divide over {tp} tensor-parallel ranks")
        self.output_sizes = [s // tp for s in output_sizes]  # this rank's share of each part
        self.weight = nn.Parameter(torch.empty(sum(self.output_sizes), input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(sum(self.output_sizes)), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0):
        size = self.output_sizes[shard_id]
        offset = sum(self.output_sizes[:shard_id])
        expect_shape(loaded, (size * tp_size(), *param.shape[1:]))  # a weight [out, in] or a bias [out]
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, tp_rank() * size, size))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix; ranks split the heads."""

    SHARDS = {"q": 0, "k": 1, "v": 2}

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = tp_size()
        if num_heads % tp or num_kv_heads % tp:
            raise ValueError(f"{num_heads} attention heads and {num_kv_heads} KV heads must both divide over "
                             f"tensor_parallel_size={tp}")
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim,
                                       num_kv_heads * head_dim], bias)

    def weight_loader(self, param, loaded, shard_id: str):
        super().weight_loader(param, loaded, self.SHARDS[shard_id])


class RowParallelLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        tp = tp_size()
        if input_size % tp:
            raise ValueError(f"input size {input_size} does not divide over {tp} tensor-parallel ranks")
        self.weight = nn.Parameter(torch.empty(output_size, input_size // tp), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        # The bias is added once, on rank 0, before the all-reduce sums the partial products.
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None
        if bias:
            self.bias.weight_loader = self.bias_loader

        self.gemv = False  # fusion="full": kernels.linear (a one-kernel GEMV at one row) instead of F.linear

    def weight_loader(self, param, loaded):
        size = param.shape[1]
        expect_shape(loaded, (param.shape[0], size * tp_size()))
        param.data.copy_(loaded.narrow(1, tp_rank() * size, size))

    def bias_loader(self, param, loaded):
        expect_shape(loaded, param.shape)
        param.data.copy_(loaded)

    def forward(self, x):
        if self.gemv and self.bias is None:
            return all_reduce(kernels.linear(x, self.weight))
        return all_reduce(F.linear(x, self.weight, self.bias if tp_rank() == 0 else None))
