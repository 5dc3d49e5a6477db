"""The cost model: the bytes a step must move, and the ceilings they are divided by.

A floor is the larger of bytes / copy bandwidth and FLOPs / matmul rate, with both ceilings
measured on the GPU in hand (``measure_ceilings``), never taken from another GPU's datasheet.
The copy bandwidth is what a device-to-device copy achieves (bytes read + bytes written), below
the datasheet's peak; a kernel that streams with few writes can beat it slightly.
"""
import statistics

import torch

from minivllm.config import ModelConfig

COPY_BYTES = 2 << 30  # 2 GiB each way: far past the L2 of any GPU we use
MATMUL_SIZE = 8192


def weight_bytes(cfg: ModelConfig, itemsize: int) -> int:
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    biases = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d + h if cfg.attention_bias else 0
    per_layer = attn + biases + 3 * h * i + 2 * h + (2 * d if cfg.qk_norm else 0)
    embed = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return itemsize * (cfg.num_hidden_layers * per_layer + embed + h)


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize


def decode_op_bytes(op: str, *, hidden_size: int, intermediate_size: int, num_attention_heads: int,
                    num_key_value_heads: int, head_dim: int, vocab_size: int, layers: int, batch: int, context: int,
                    itemsize: int) -> int | None:
    """The fewest bytes ``op`` of a decode step must move, over all its layers (a profile's op name: a
    projection, ``paged_attention``, ``store_kvcache``, a norm, ``lm_head``; ``a+b`` for a fused pair,
    which also reads the residual and writes h): weights, activations in and out, the KV cache read at
    ``context`` tokens. None for ops without a byte model (RoPE, sampling, elementwise)."""
    e, b, h = itemsize, batch, hidden_size
    q_n, kv_n = num_attention_heads * head_dim, num_key_value_heads * head_dim

    def linear(n, k):
        return e * (n * k + b * k + b * n)

    name, fused = op.split("+")[-1], "+" in op
    if name == "lm_head":
        return linear(vocab_size, h) + (e * 2 * b * h if fused else 0)
    if name == "norm":
        return e * 3 * b * h
    per_layer = {"qkv_proj": linear(q_n + 2 * kv_n, h), "o_proj": linear(h, q_n),
                 "gate_up_proj": linear(2 * intermediate_size, h), "down_proj": linear(h, intermediate_size),
                 "paged_attention": e * (2 * b * context * kv_n + 2 * b * q_n),
                 "store_kvcache": e * 4 * b * kv_n,
                 "input_layernorm": e * 4 * b * h, "post_attention_layernorm": e * 4 * b * h}.get(name)
    if per_layer is None:
        return None
    return layers * (per_layer + (e * 2 * b * h if fused else 0))


def decode_floor_ms(cfg: ModelConfig, itemsize: int, batch: int, context: int, tensor_parallel_size: int,
                    bandwidth: float) -> float:
    """One decode step must read every weight once and each sequence's KV cache once; with
    tensor parallelism each GPU reads its share at the same time (the all-reduces are extra)."""
    step_bytes = weight_bytes(cfg, itemsize) + batch * context * kv_bytes_per_token(cfg, itemsize)
    return 1e3 * step_bytes / tensor_parallel_size / bandwidth


def throughput_floor_parts_s(cfg: ModelConfig, itemsize: int, prompt_lens: list[int], max_tokens: list[int],
                             tensor_parallel_size: int, bandwidth: float) -> dict:
    """Workload 1's floor in its two parts, seconds: ``weights`` (each decode step reads the weights once, as
    many steps as the longest request) and ``kv`` (every token's K and V are read at every later step of its
    request)."""
    steps = max(max_tokens)
    kv_reads = sum(p * n + n * (n - 1) // 2 for p, n in zip(prompt_lens, max_tokens))
    per_gpu = tensor_parallel_size * bandwidth
    return dict(weights=steps * weight_bytes(cfg, itemsize) / per_gpu,
                kv=kv_reads * kv_bytes_per_token(cfg, itemsize) / per_gpu)


def measure_ceilings(reps: int = 5) -> dict:
    """The GPU's copy bandwidth (a device-to-device copy, bytes read + written) and bf16 matmul rate
    (8192^3 on random data): medians of ``reps`` CUDA-event timings each, with their samples."""
    copy_s = _copy_seconds(reps)  # each timing's tensors are freed when its function returns
    mm_s = _matmul_seconds(reps)
    torch.cuda.empty_cache()
    copy = [2 * COPY_BYTES / s for s in copy_s]
    flops = [2 * MATMUL_SIZE ** 3 / s for s in mm_s]
    return {"gpu": torch.cuda.get_device_name(),
            "copy_bytes_per_s": statistics.median(copy), "copy_samples": copy,
            "bf16_matmul_flops_per_s": statistics.median(flops), "bf16_matmul_samples": flops,
            "method": f"device-to-device copy of {COPY_BYTES >> 30} GiB (read + write); bf16 "
                      f"{MATMUL_SIZE}^3 matmul on random data; medians of do_bench medians"}


def _median_seconds(fn, reps: int) -> list[float]:
    from triton.testing import do_bench
    return [do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3 for _ in range(reps)]


def _copy_seconds(reps: int) -> list[float]:
    src = torch.randn(COPY_BYTES // 4, device="cuda")
    dst = torch.empty_like(src)
    return _median_seconds(lambda: dst.copy_(src), reps)


def _matmul_seconds(reps: int) -> list[float]:
    a, b = (torch.randn(MATMUL_SIZE, MATMUL_SIZE, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return _median_seconds(lambda: a @ b, reps)
