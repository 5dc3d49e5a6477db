"""Qwen3 for inference: GQA with per-head QK RMSNorm, RoPE, SwiGLU, merged qkv and gate_up.

With ``fuse_norms`` each RMSNorm that feeds a linear (input_layernorm -> qkv,
post_attention_layernorm -> gate_up, norm -> lm_head) is folded into that linear's weight
and computed by ``kernels.rmsnorm_linear`` with the matrix product (fusion "norm_linear").
Fusion "full" also folds what follows into those ops: QK-norm, RoPE and the KV-cache store
after qkv (``kernels.rmsnorm_qkv_rope_store``), SiLU(gate) * up after gate_up, and runs o_proj
and down_proj through ``kernels.linear``. Which kernels run depends on the number of rows
(``kernels.rmsnorm_linear.path_for``, chosen from H100 measurements in kernels/NOTES.md): one
(split-K) GEMV per op at a single row, else a row kernel, cuBLAS and an epilogue kernel.
"""
import torch
import torch.nn.functional as F
from torch import nn

import kernels

from minivllm.config import FUSION_MODES, ModelConfig
from minivllm.context import get_context
from minivllm.distributed import tp_size
from minivllm.layers.attention import Attention
from minivllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from minivllm.layers.layernorm import RMSNorm
from minivllm.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from minivllm.layers.rotary import RotaryEmbedding


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads // tp_size()
        self.num_kv_heads = cfg.num_key_value_heads // tp_size()
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, cfg.attention_bias)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads)

    def forward(self, positions, qkv):
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], -1)
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(-1, self.num_heads, self.head_dim)
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        o = self.attn(q, k, v.view(-1, self.num_kv_heads, self.head_dim))
        return self.o_proj(o.flatten(1))

    def forward_fused(self, positions, hidden, residual, input_layernorm: RMSNorm):
        """The whole block from the un-normalised residual stream: one kernel up to q and the
        cached K/V, then attention and o_proj. Returns the output and the new residual."""
        out = kernels.rmsnorm_qkv_rope_store(
            hidden, self.qkv_proj.weight, input_layernorm.eps, residual, self.q_norm.weight, self.k_norm.weight,
            self.q_norm.eps, self.rotary_emb.cos_sin, positions, self.attn.k_cache, self.attn.v_cache,
            get_context().slot_mapping)
        q, residual = (out, hidden) if residual is None else out
        return self.o_proj(self.attn(q).flatten(1)), residual


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, gate_up):
        gate, up = gate_up.chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = Qwen3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, hidden, residual, fusion: str):
        if fusion == "full":
            hidden, residual = self.self_attn.forward_fused(positions, hidden, residual, self.input_layernorm)
            norm = self.post_attention_layernorm
            act, residual = kernels.rmsnorm_linear(hidden, self.mlp.gate_up_proj.weight, norm.eps, residual,
                                                   silu_mul=True)
            return self.mlp.down_proj(act), residual
        fused = fusion == "norm_linear"
        attn = self.self_attn
        # Every column gets the 1/rms scale here although q and k's own RMSNorm cancels it: skipping it
        # saves nothing in a GEMV epilogue and would split the cuBLAS route's GEMM in two (NOTES.md).
        qkv, residual = norm_linear(self.input_layernorm, attn.qkv_proj, hidden, residual, fused)
        hidden = attn(positions, qkv)
        gate_up, residual = norm_linear(self.post_attention_layernorm, self.mlp.gate_up_proj, hidden, residual, fused)
        return self.mlp(gate_up), residual


class Qwen3Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.fusion = "off"

    def forward(self, input_ids, positions):
        """Returns the last layer's output and residual; the final norm is applied by
        ``compute_logits`` to the rows that are sampled."""
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, self.fusion)
        return hidden, residual


class Qwen3ForCausalLM(nn.Module):
    # checkpoint name part -> (our merged parameter's name part, shard id)
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.model = Qwen3Model(cfg)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions):
        return self.model(input_ids, positions)

    def compute_logits(self, hidden, residual):
        fused = self.model.fusion != "off"
        return self.lm_head.logits(norm_linear(self.model.norm, self.lm_head, hidden, residual, fused)[0])

    def fuse_norms(self, fusion: str = "norm_linear"):
        """Fold each RMSNorm weight into the linear it feeds (once, at load time) and run the
        fused kernels of ``fusion`` ("norm_linear" or "full") from now on."""
        if fusion not in FUSION_MODES[1:]:
            raise ValueError(f"fuse_norms: fusion must be one of {FUSION_MODES[1:]}, got {fusion!r}")
        if any(layer.self_attn.qkv_proj.bias is not None for layer in self.model.layers):
            raise ValueError("RMSNorm+linear fusion does not support a qkv bias")
        with torch.no_grad():
            for layer in self.model.layers:
                for norm, linear in ((layer.input_layernorm, layer.self_attn.qkv_proj),
                                     (layer.post_attention_layernorm, layer.mlp.gate_up_proj)):
                    linear.weight.copy_(kernels.fold_rmsnorm_weight(norm.weight, linear.weight))
            # A tied lm_head gets a weight of its own: the embedding must stay unscaled.
            self.lm_head.weight = nn.Parameter(kernels.fold_rmsnorm_weight(self.model.norm.weight, self.lm_head.weight),
                                               requires_grad=False)
        for layer in self.model.layers:
            layer.self_attn.o_proj.gemv = layer.mlp.down_proj.gemv = fusion == "full"
        self.model.fusion = fusion


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
