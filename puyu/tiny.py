"""Tiny checkpoints built offline: the built-in `puyu-tiny` model and the test fixtures.

Everything here is deterministic: a byte-level BPE tokenizer trained with `tokenizers` on a fixed corpus (with
InternLM2's special tokens and chat template), and random weights from a seeded generator, written in the Hugging Face
layouts of InternLM2 (fused grouped `wqkv`), Llama and Qwen2 (q/k/v biases) as sharded safetensors with an index.
The replies of such a model are noise; it exists so that every command runs without a network.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .chat_templates import INTERNLM2_CHAT_TEMPLATE, PROTOCOL_TOKENS
from .convert.archs import Heads, layout
from .paths import cache_root

BASE_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

_CORPUS = """
InternLM2 is a family of open chat models. puyu serves them with a paged KV cache and continuous batching.
The quick brown fox jumps over the lazy dog. Hello, how are you today? I am fine, thank you, and you?
Please write a Python function that adds two numbers. def add(a, b): return a + b
import pandas as pd; df = pd.read_csv("data.csv"); print(df.describe()); df.plot(); plt.savefig("figure.png")
The weather in Shanghai is sunny. The temperature is 25 degrees. What is the capital of France? Paris.
Large language models predict the next token. Attention, rotary embeddings, RMS norm, SwiGLU feed-forward.
{"name": "get_weather", "parameters": {"city": "Shanghai"}} [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] 0123456789
你好，我是书生·浦语，很高兴为你服务。今天天气很好，我们去公园散步吧。
俺老猪是天蓬元帅下凡，跟着师父去西天取经。猴哥，师父被妖怪抓走了！散伙吧，俺回高老庄。
人工智能是计算机科学的一个分支。大语言模型可以回答问题、写代码、做数据分析。
上海是中国的一个大城市。北京是中国的首都。请帮我分析这份数据，并画出图表。
"""
CORPUS = _CORPUS  # the tokenizer's training text (also the vocabulary of the bench's remote-tokenizer prompts)


@dataclass(frozen=True)
class TinyShape:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PUYU_TINY_SHAPE = TinyShape(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                            intermediate_size=688, max_position_embeddings=4096)
TOKENIZER_VOCAB = 1024
ARCHITECTURES = {"internlm2": "InternLM2ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def build_tokenizer(out_dir: Path, vocab_size: int = TOKENIZER_VOCAB) -> int:
    """Train a byte-level BPE on the fixed corpus and write tokenizer.json + tokenizer_config.json.

    The special tokens get ids 0..2 (<unk>, <s>, </s>) and the protocol tokens the last six ids, as in InternLM2.
    Returns the vocabulary size (the number of embedding rows the model needs).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers import processors

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(PROTOCOL_TOKENS), special_tokens=BASE_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer=trainer)
    tok.add_special_tokens(PROTOCOL_TOKENS)
    size = tok.get_vocab_size()
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                       "normalized": False, "single_word": False}
             for t in BASE_SPECIAL_TOKENS + PROTOCOL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000, "added_tokens_decoder": added,
        "chat_template": INTERNLM2_CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}, indent=2))
    return size


def _hf_config(arch: str, shape: TinyShape, vocab: int, dtype: torch.dtype, eos_ids: list[int]) -> dict:
    common = {
        "architectures": [ARCHITECTURES[arch]], "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_hidden_layers, "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads, "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings, "rope_theta": shape.rope_theta,
        "rms_norm_eps": shape.rms_norm_eps, "vocab_size": vocab, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": eos_ids[0] if arch != "internlm2" else 2, "pad_token_id": 2,
        "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."), "rope_scaling": None,
    }
    if arch == "internlm2":
        common.update(model_type="internlm2", bias=False, attn_implementation="eager")
    elif arch == "llama":
        common.update(model_type="llama", attention_bias=False, mlp_bias=False, head_dim=shape.head_dim)
    else:
        common.update(model_type="qwen2", use_sliding_window=False, sliding_window=None)
    return common


def _random_weights(arch: str, shape: TinyShape, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights, scaled so that logits are peaked (greedy decoding is then stable across engines)."""
    gen = torch.Generator().manual_seed(seed)
    h, i, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    hq, hkv = shape.num_attention_heads, shape.num_key_value_heads

    def lin(out_f: int, in_f: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=gen) * (gain / math.sqrt(in_f))

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=gen)

    def bias(n: int) -> torch.Tensor:
        return 0.1 * torch.randn(n, generator=gen)

    names = layout(arch)
    spec = Heads(hq, hkv, d)
    w: dict[str, torch.Tensor] = {names.embed: torch.randn(vocab, h, generator=gen)}
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}."
        q, k, v = lin(hq * d, h, 2.0), lin(hkv * d, h, 2.0), lin(hkv * d, h)
        o, gate, up, down = lin(h, hq * d), lin(i, h), lin(i, h), lin(h, i)
        for name, t in names.join_qkv(q, k, v, spec).items():
            w[f"{p}{name}.weight"] = t
        if arch == "qwen2":  # q/k/v biases
            for name, t in names.join_qkv(bias(hq * d), bias(hkv * d), bias(hkv * d), spec).items():
                w[f"{p}{name}.bias"] = t
        for name, t in ((names.o, o), (names.gate, gate), (names.up, up), (names.down, down),
                        (names.attn_norm, norm(h)), (names.ffn_norm, norm(h))):
            w[f"{p}{name}.weight"] = t
    w[names.final_norm] = norm(h)
    w[names.lm_head] = lin(vocab, h, 4.0)
    return w


def write_sharded_safetensors(weights: dict[str, torch.Tensor], out_dir: Path, num_shards: int) -> None:
    """Write `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json`."""
    from safetensors.torch import save_file

    names = list(weights)
    per_shard = math.ceil(len(names) / num_shards)
    weight_map, total = {}, 0
    for s in range(num_shards):
        fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: weights[n].contiguous() for n in names[s * per_shard:(s + 1) * per_shard]}
        save_file(part, str(out_dir / fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_checkpoint(out_dir: Path | str, arch: str = "internlm2", dtype: torch.dtype = torch.float16,
                     shape: TinyShape = TinyShape(), seed: int = 0, num_shards: int = 2) -> Path:
    """Write a complete HF checkpoint directory (config, generation config, tokenizer, sharded weights)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out_dir)
    im_end = vocab - 2  # <|im_end|> is the second to last token, as in InternLM2
    eos_ids = [2, im_end]
    config = _hf_config(arch, shape, vocab, dtype, eos_ids)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    gen_cfg = {"bos_token_id": 1, "eos_token_id": eos_ids, "pad_token_id": 2}
    (out_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    weights = {k: v.to(dtype) for k, v in _random_weights(arch, shape, vocab, seed).items()}
    write_sharded_safetensors(weights, out_dir, num_shards)
    (out_dir / "puyu_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed, "shape": asdict(shape)}))
    return out_dir


def puyu_tiny_path(root: Optional[Path] = None) -> Path:
    """The built-in default model; built into the cache folder on first use (atomically)."""
    target = (root or cache_root() / "models") / "puyu-tiny"
    if (target / "model.safetensors.index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".puyu-tiny-", dir=target.parent))
    try:
        build_checkpoint(tmp, "internlm2", torch.bfloat16, PUYU_TINY_SHAPE, seed=20240117, num_shards=2)
        readme = ("# puyu-tiny\n\nAn InternLM2-shaped model with random weights, built offline by puyu. "
                  "Its replies are noise. Use `puyu download internlm2-chat-1_8b` for a real model.\n")
        (tmp / "README.md").write_text(readme)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
