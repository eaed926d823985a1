"""Shared test helpers: tiny models, tokenizers, batches and checkpoint copies. Import with ``from helpers import ...``
(``tests/`` is on ``pythonpath`` in pyproject.toml); fixtures stay in conftest.py."""

import torch


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = 128):
    """A small random Llama: every code path of a real one, in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def char_tokenizer(vocab: int = 128):
    """A character-level fast tokenizer built offline (ids 0..vocab-1 are the ASCII characters)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = {chr(i): i for i in range(vocab)}
    tok = Tokenizer(models.BPE(vocab=chars, merges=[], unk_token=chr(0)))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=chr(3), pad_token=chr(3), unk_token=chr(0))


def copy_dir(src, dst):
    """A flat copy of a checkpoint directory (dst must not exist)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edited_copy(src, dst, edit):
    """A copy of a checkpoint directory whose model.safetensors tensors went through ``edit`` (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    copy_dir(src, dst)
    weights = str(dst / "model.safetensors")
    with safe_open(weights, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata=metadata)
    return dst


def anisotropic_moment(n: int = 256, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """``X^T X / n`` of LLM-like inputs: correlated channels whose scales span two decades."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, n)[torch.randperm(n, generator=g)]
    mix = torch.eye(n) + 2 * torch.randn(n, n, generator=g) / n**0.5
    x = (torch.randn(tokens, n, generator=g) @ mix) * scales
    return (x.T @ x).double() / tokens


def token_batches(n_batches=2, batch=4, seq=32, vocab=128, seed=0, pad_first=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        if pad_first:
            mask[0, seq - pad_first:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def tiny_causal_lm(architecture: str, seed: int = 0, layers: int = 2, vocab: int = 128):
    """A small random model of another architecture: "qwen3_moe", "mixtral", "deepseek_v3" (a dense first layer,
    then routed + shared experts) or "gpt_neox" (Pythia; its head is ``embed_out`` on disk)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=128)
    if architecture == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32,
                                num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                                norm_topk_prob=True)
        return tf.Qwen3MoeForCausalLM(cfg).eval()
    if architecture == "mixtral":
        cfg = tf.MixtralConfig(**common, num_key_value_heads=2, intermediate_size=32, num_local_experts=4,
                               num_experts_per_tok=2)
        return tf.MixtralForCausalLM(cfg).eval()
    if architecture == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**common, num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32,
                                  n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                  first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                                  qk_nope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1)
        return tf.DeepseekV3ForCausalLM(cfg).eval()
    if architecture == "gpt_neox":
        cfg = tf.GPTNeoXConfig(**common, intermediate_size=128)
        return tf.GPTNeoXForCausalLM(cfg).eval()
    raise ValueError(f"unknown architecture {architecture!r}")


class FromDisk:
    """A LayerIO that is not the in-memory one (options that need the whole model refuse it); loads nothing."""

    def load(self, index, layer, device):
        pass

    def done(self, index, layer):
        pass
