"""Tiny random models of several HF families, built offline (for the generic model walk)."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "gpt2", "qwen2_moe", "opt", "phi3", "bloom")


def build_family(name: str, vocab: int = 64, seed: int = 0):
    import transformers as T

    small = {"vocab_size": vocab, "num_hidden_layers": 2, "num_attention_heads": 2}
    configs = {
        "llama": lambda: T.LlamaForCausalLM(
            T.LlamaConfig(hidden_size=32, intermediate_size=48, num_key_value_heads=1, **small)
        ),
        # Conv1D layers (weights stored [in, out])
        "gpt2": lambda: T.GPT2LMHeadModel(
            T.GPT2Config(
                vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                bos_token_id=0, eos_token_id=0,
            )
        ),
        # experts and the shared expert run on 2-D activations [tokens, hidden]
        "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(
            T.Qwen2MoeConfig(
                hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                shared_expert_intermediate_size=16, num_key_value_heads=1, num_experts=2,
                num_experts_per_tok=1, **small,
            )
        ),
        "opt": lambda: T.OPTForCausalLM(
            T.OPTConfig(hidden_size=32, ffn_dim=48, word_embed_proj_dim=32, **small)
        ),
        "phi3": lambda: T.Phi3ForCausalLM(
            T.Phi3Config(
                hidden_size=32, intermediate_size=48, num_key_value_heads=2, pad_token_id=0,
                bos_token_id=0, eos_token_id=0, **small,
            )
        ),
        # ALiBi: the blocks take an attention bias flattened with the heads, [batch * heads, 1, T]
        "bloom": lambda: T.BloomForCausalLM(
            T.BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=2, n_head=2)
        ),
    }  # fmt: skip
    torch.manual_seed(seed)
    return configs[name]().eval()
