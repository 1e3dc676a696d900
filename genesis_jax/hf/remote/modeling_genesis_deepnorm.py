"""A genesis-jax deepnorm model for transformers (loaded with trust_remote_code=True).

It is a Llama whose blocks are post-norm DeepNet blocks: x = LN1(alpha x + attn(x)), then
x = LN2(alpha x + mlp(x)), with LayerNorms that carry a bias; the final norm is an RMSNorm and
the output layer is tied to the embedding, as in the Llama. Query and key rows are stored in
transformers' rotary order."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


class GenesisDeepnormConfig(LlamaConfig):
    model_type = "genesis_deepnorm"

    def __init__(self, deepnorm_alpha: float = 1.0, layer_norm_eps: float = 1e-5, **kwargs):
        self.deepnorm_alpha = deepnorm_alpha
        self.layer_norm_eps = layer_norm_eps
        super().__init__(**kwargs)


class GenesisDeepnormDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: GenesisDeepnormConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.alpha = config.deepnorm_alpha

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        attended, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
        x = self.input_layernorm(self.alpha * hidden_states + attended)
        return self.post_attention_layernorm(self.alpha * x + self.mlp(x))


class GenesisDeepnormForCausalLM(LlamaForCausalLM):
    config_class = GenesisDeepnormConfig

    def __init__(self, config: GenesisDeepnormConfig):
        super().__init__(config)
        self.model.layers = nn.ModuleList(
            GenesisDeepnormDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.post_init()
