"""The decoder of the Llama family, shared by every model of ``minivllm.models.ARCHITECTURES``:
GQA, RoPE (rotate-half), SwiGLU, RMSNorm, merged qkv and gate_up. What differs between families is
read from ``ModelConfig``: per-head QK RMSNorm (Qwen3: ``qk_norm``), attention biases, the RoPE
inv_freq table (``rope_scaling``) and tied embeddings.

Each layer runs the ops of its ``Fusion`` (``minivllm.config.FUSION_MODES``), chosen once at load
by ``set_fusion``. Unfused ("off"), a layer runs what nano-vLLM runs: (add+)RMSNorm, cuBLAS qkv,
QK-norm (Qwen3), RoPE (one Triton kernel for q and k), the KV store, attention, o_proj, add+RMSNorm,
gate_up, SiLU*up (one kernel), down. Each rung of the ladder folds one more op into a
projection: the RMSNorms into the linears they feed (``kernels.rmsnorm_linear``, the norm weight
folded into W), (QK-norm +) RoPE + KV store into qkv (``kernels.rmsnorm_qkv_rope_store``), SiLU*up
into gate_up, and o_proj/down onto ``kernels.linear``. Which kernels run depends on the number of
rows (``kernels.rmsnorm_linear.path_for``, from measurements in kernels/NOTES.md): one (split-K)
GEMV per op at a single row, else a row kernel, cuBLAS and an epilogue kernel.
"""
import torch
from torch import nn

import kernels

from minivllm.config import FUSION_MODES, Fusion, ModelConfig
from minivllm.context import get_context
from minivllm.distributed import tp_size
from minivllm.layers.attention import Attention
from minivllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from minivllm.layers.layernorm import RMSNorm
from minivllm.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from minivllm.layers.rotary import RotaryEmbedding


class DecoderAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.num_heads = cfg.num_attention_heads // tp_size()
        self.num_kv_heads = cfg.num_key_value_heads // tp_size()
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, cfg.attention_bias)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, cfg.attention_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary_emb = rotary_emb  # shared: one fp32 [max_position, head_dim] table for all layers
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads)
        self.fusion = Fusion()

    def forward(self, positions, hidden, residual, input_layernorm: RMSNorm):
        """The block from the un-normalised residual stream (``hidden`` + ``residual``) to o_proj's
        output; returns that and the new residual."""
        if self.fusion.qkv_epilogue:
            qk_norm = self.q_norm is not None
            out = kernels.rmsnorm_qkv_rope_store(
                hidden, self.qkv_proj.weight, input_layernorm.eps, residual,
                self.q_norm.weight if qk_norm else None, self.k_norm.weight if qk_norm else None,
                self.q_norm.eps if qk_norm else None, self.rotary_emb.cos_sin, positions, self.attn.k_cache,
                self.attn.v_cache, get_context().slot_mapping)
            q, residual = (out, hidden) if residual is None else out
            o = self.attn(q)
        else:
            # Every column gets the 1/rms scale although q and k's own RMSNorm (Qwen3) cancels it: skipping
            # it saves nothing in a GEMV epilogue and would split the cuBLAS route's GEMM in two (NOTES.md).
            qkv, residual = norm_linear(input_layernorm, self.qkv_proj, hidden, residual, self.fusion.norm_linear)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], -1)
            q = q.view(-1, self.num_heads, self.head_dim)
            k = k.view(-1, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary_emb(positions, q, k)
            o = self.attn(q, k, v.view(-1, self.num_kv_heads, self.head_dim))
        return self.o_proj(o.flatten(1)), residual


class DecoderMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)
        self.fusion = Fusion()

    def forward(self, hidden, residual, norm: RMSNorm):
        """down(SiLU(gate) * up) of ``norm(hidden + residual)``; returns that and the new residual."""
        if self.fusion.mlp_epilogue:
            act, residual = kernels.rmsnorm_linear(hidden, self.gate_up_proj.weight, norm.eps, residual,
                                                   silu_mul=True)
        else:
            gate_up, residual = norm_linear(norm, self.gate_up_proj, hidden, residual, self.fusion.norm_linear)
            act = kernels.silu_mul_ref(gate_up) if self.fusion.eager_elementwise else kernels.silu_mul(gate_up)
        return self.down_proj(act), residual


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.self_attn = DecoderAttention(cfg, rotary_emb)
        self.mlp = DecoderMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, hidden, residual):
        hidden, residual = self.self_attn(positions, hidden, residual, self.input_layernorm)
        return self.mlp(hidden, residual, self.post_attention_layernorm)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions):
        """Returns the last layer's output and residual; the final norm is applied by
        ``compute_logits`` to the rows that are sampled."""
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return hidden, residual


class DecoderForCausalLM(nn.Module):
    """What the engine needs of a model: ``forward``/``compute_logits``, ``kv_cache_layout`` and
    ``bind_kv_cache`` (the runner), ``packed_modules`` (the loader), ``norm_linear_pairs`` and
    ``set_fusion`` (the fusion ladder)."""

    # checkpoint name part -> (our merged parameter's name part, shard id)
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.model = DecoderModel(cfg)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.fusion_mode = "off"
        self.fusion = FUSION_MODES["off"]

    def forward(self, input_ids, positions):
        return self.model(input_ids, positions)

    def kv_cache_layout(self) -> tuple[int, int, int]:
        """(layers, this rank's KV heads, head size) of the KV cache the model attends over."""
        attn = self.model.layers[0].self_attn
        return len(self.model.layers), attn.num_kv_heads, attn.head_dim

    def bind_kv_cache(self, k_caches, v_caches):
        """Gives each layer its [blocks, block_size, KV heads, head size] K and V caches (None: unbinds)."""
        for layer, k_cache, v_cache in zip(self.model.layers, k_caches, v_caches, strict=True):
            layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache = k_cache, v_cache

    def norm_linear_pairs(self):
        """The (RMSNorm, linear) pairs that ``fusion="norm_linear"`` folds into one op, the final
        norm and lm_head last."""
        for layer in self.model.layers:
            yield layer.input_layernorm, layer.self_attn.qkv_proj
            yield layer.post_attention_layernorm, layer.mlp.gate_up_proj
        yield self.model.norm, self.lm_head

    def compute_logits(self, hidden, residual):
        return self.lm_head.logits(norm_linear(self.model.norm, self.lm_head, hidden, residual,
                                               self.fusion.norm_linear)[0])

    def set_fusion(self, mode: str):
        """Chooses every layer's ops once, at load (``FUSION_MODES[mode]``); a mode that fuses the
        norms folds each RMSNorm weight into the linear it feeds, so it can be set only once."""
        if mode not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {tuple(FUSION_MODES)}, got {mode!r}")
        if self.fusion_mode != "off":
            raise RuntimeError(f"the fusion mode is chosen once per model; it is already {self.fusion_mode!r}")
        fusion = FUSION_MODES[mode]
        if fusion.norm_linear:
            self._fold_norms(mode)
        for layer in self.model.layers:
            layer.self_attn.fusion = layer.mlp.fusion = fusion
            layer.self_attn.rotary_emb.eager = fusion.eager_elementwise
            layer.self_attn.o_proj.gemv = layer.mlp.down_proj.gemv = fusion.gemv_projections
        self.fusion_mode, self.fusion = mode, fusion

    def _fold_norms(self, mode: str):
        if any(layer.self_attn.qkv_proj.bias is not None for layer in self.model.layers):
            raise ValueError(f"fusion={mode!r} folds each RMSNorm into the linear after it, whose kernels take no "
                             "qkv bias (attention_bias=True in config.json): use fusion='off'")
        with torch.no_grad():
            for norm, linear in self.norm_linear_pairs():
                if linear is self.lm_head:
                    # A tied lm_head gets a weight of its own: the embedding must stay unscaled.
                    linear.weight = nn.Parameter(kernels.fold_rmsnorm_weight(norm.weight, linear.weight),
                                                 requires_grad=False)
                else:
                    linear.weight.copy_(kernels.fold_rmsnorm_weight(norm.weight, linear.weight))


def norm_linear(norm: RMSNorm, linear: nn.Module, x, residual, fused: bool):
    """``linear(norm(x + residual))`` and the new residual ``x + residual`` (``x`` when there is
    none yet): as two kernels, or as one when the norm weight is folded into ``linear``."""
    if fused:
        if residual is None:
            return kernels.rmsnorm_linear(x, linear.weight, norm.eps), x
        return kernels.rmsnorm_linear(x, linear.weight, norm.eps, residual)
    if residual is None:
        return linear(norm(x)), x
    y, residual = norm(x, residual)
    return linear(y), residual
