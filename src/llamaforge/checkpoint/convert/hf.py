"""Meta ↔ Hugging Face transformers tensor names, the q/k permute, and the config.

HF's Llama applies RoPE to the two halves of each head (``rotate_half``), Meta's to
interleaved pairs. ``permute_to_hf`` reorders the rows of wq/wk within each head from
``[x0, x1, x2, x3, …]`` to ``[x0, x2, …, x1, x3, …]`` so both give identical attention
(SPEC §3.1); ``permute_from_hf`` is its inverse. No other tensor is permuted.

A native ``chat_template.jinja`` is exported as transformers 5 saves one, ``chat_template.jinja``
next to the tokenizer (which it prefers), and also as ``chat_template`` in
``tokenizer_config.json`` (which older transformers read); importing reads either back.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llamaforge.checkpoint.native import (
    CHAT_TEMPLATE_FILE,
    CheckpointError,
    checked,
    iter_tensors,
    read_chat_template,
    read_params,
    write_safetensors,
)
from llamaforge.files import atomic_dir
from llamaforge.model import ModelArgs
from llamaforge.tokenizer import Tokenizer

_GLOBAL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(w.shape)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(w.shape)


def meta_to_hf_name(name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _LAYER_RE.match(name)
    if not m or m.group(2) not in _LAYER:
        raise KeyError(f"no Hugging Face name for tensor {name!r}")
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"


def to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Meta-named tensors → HF ``LlamaForCausalLM`` tensors (q/k permuted)."""
    out = {}
    for name, t in state.items():
        if name.endswith("attention.wq.weight"):
            t = permute_to_hf(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_to_hf(t, args.kv_heads)
        out[meta_to_hf_name(name)] = t
    return out


def hf_config(args: ModelArgs, bos_id: int = 1, eos_id: int = 2) -> dict[str, Any]:
    """A ``config.json`` for transformers' ``LlamaConfig`` with the same architecture."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }


def meta_name_from_hf(name: str) -> str | None:
    """HF tensor name → Meta's; None for tensors to skip (rotary ``inv_freq`` buffers)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return _FROM_HF.get(name) or _from_hf_layer(name)


_FROM_HF = {v: k for k, v in _GLOBAL.items()}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_FROM_HF = {v: k for k, v in _LAYER.items()}


def _from_hf_layer(name: str) -> str:
    m = _HF_LAYER_RE.match(name)
    if not m or m.group(2) not in _LAYER_FROM_HF:
        raise CheckpointError(f"unexpected tensor {name!r} in a Hugging Face Llama checkpoint")
    return f"layers.{m.group(1)}.{_LAYER_FROM_HF[m.group(2)]}"


def fit_ffn(dim: int, hidden: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which ModelArgs reproduces ``hidden``."""
    base = int(2 * 4 * dim / 3)
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1, hidden):
        if multiple_of * ((base + multiple_of - 1) // multiple_of) == hidden:
            return multiple_of, None
    for multiple_of in (4096, 1024, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        for mult in (hidden / base, (hidden + 0.5) / base):
            h = int(mult * base)
            if multiple_of * ((h + multiple_of - 1) // multiple_of) == hidden:
                return multiple_of, mult
    raise CheckpointError(f"cannot express intermediate_size={hidden} for dim={dim}")


def args_from_hf_config(config: dict[str, Any], where: str) -> ModelArgs:
    if config.get("model_type") not in ("llama", None):
        raise CheckpointError(
            f"{where}: model_type={config.get('model_type')!r}; only 'llama' is supported"
        )
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise CheckpointError(f"{where}: {key}=true is not a LLaMA architecture")
    scaling = config.get("rope_scaling") or {}
    rope = config.get("rope_parameters") or {}
    if scaling or rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{where}: RoPE scaling ({scaling or rope}) is not supported")
    try:
        dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        hidden = int(config["intermediate_size"])
        multiple_of, mult = fit_ffn(dim, hidden)
        kv = int(config.get("num_key_value_heads") or heads)
        if config.get("head_dim") not in (None, dim // heads):
            raise CheckpointError(f"{where}: head_dim={config['head_dim']} != hidden/heads")
        return ModelArgs(
            dim=dim,
            n_layers=int(config["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=None if kv == heads else kv,
            vocab_size=int(config["vocab_size"]),
            multiple_of=multiple_of,
            ffn_dim_multiplier=mult,
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0),
            max_seq_len=int(config.get("max_position_embeddings", 2048)),
        ).validate()
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e}") from None


def _hf_weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [src / f for f in dict.fromkeys(weight_map.values())]
    files = sorted(src.glob("model*.safetensors"))
    if files:
        return files
    bins = sorted(src.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise CheckpointError(f"{src}: no model*.safetensors or pytorch_model*.bin weights")


def _iter_hf_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        yield from state.items()


def read_hf(
    src: str | os.PathLike, tokenizer: str | os.PathLike | None = None
) -> tuple[ModelArgs, Tokenizer | None, Iterator[tuple[str, torch.Tensor]]]:
    """ModelArgs, tokenizer and a stream of Meta-named tensors from an HF Llama directory."""
    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{src}: no config.json: not a Hugging Face checkpoint")
    config = json.loads(cfg_path.read_text())
    args = args_from_hf_config(config, str(cfg_path))
    tok_path = Path(tokenizer) if tokenizer else src / "tokenizer.model"
    tok = Tokenizer(tok_path) if tok_path.is_file() or tokenizer else None
    tied = bool(config.get("tie_word_embeddings", False))
    files = _hf_weight_files(src)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        seen = set()
        embedding = None
        for path in files:
            for hf_name, t in _iter_hf_file(path):
                name = meta_name_from_hf(hf_name)
                if name is None:
                    continue
                if name.endswith("attention.wq.weight"):
                    t = permute_from_hf(t, args.n_heads)
                elif name.endswith("attention.wk.weight"):
                    t = permute_from_hf(t, args.kv_heads)
                if name == "tok_embeddings.weight":
                    embedding = t
                seen.add(name)
                yield name, t
        if "output.weight" not in seen:
            if not tied or embedding is None:
                raise CheckpointError(f"{src}: no lm_head.weight and embeddings are not tied")
            yield "output.weight", embedding  # untie: LLaMA has a separate output layer

    return args, tok, tensors()


def read_hf_chat_template(src: str | os.PathLike) -> str | None:
    """The chat template of an HF folder: ``chat_template.jinja`` (transformers >= 4.43 saves
    it there), else ``chat_template`` in ``tokenizer_config.json`` (a string, or HF's list of
    named templates, of which the one named "default"); None when it has none."""
    src = Path(src)
    if (src / CHAT_TEMPLATE_FILE).is_file():
        return (src / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    cfg_path = src / "tokenizer_config.json"
    if not cfg_path.is_file():
        return None
    try:
        value = json.loads(cfg_path.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{cfg_path}: not a JSON object ({e})") from None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


def hf_tokenizer_json(tok: Tokenizer) -> str | None:
    """A ``tokenizer.json`` for HF's fast tokenizers that reproduces SentencePiece's ids
    exactly (None when the ``tokenizers`` package is not installed).

    SentencePiece BPE with whitespace splitting is: replace spaces by ▁ and prefix one;
    cut the text before every ▁ that follows another character; merge pairs by the score
    of the merged piece. HF's own converter splits differently on runs of spaces.
    """
    try:
        from tokenizers import (
            AddedToken,
            Regex,
            decoders,
            models,
            normalizers,
            pre_tokenizers,
            processors,
        )
        from tokenizers import Tokenizer as FastTokenizer
    except ImportError:
        return None
    vocab = {tok.id_to_piece(i): i for i in range(tok.vocab_size)}
    merges = []
    for piece, i in vocab.items():
        if tok.is_byte(i) or tok.is_control(i) or tok.is_unknown(i) or tok.is_unused(i):
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                merges.append((-tok.piece_score(i), i, vocab[a], a, b))
    merges.sort()
    bpe = models.BPE(
        vocab=vocab,
        merges=[(a, b) for *_, a, b in merges],
        unk_token=tok.id_to_piece(tok.unk_id),
        fuse_unk=True,
        byte_fallback=True,
    )
    fast = FastTokenizer(bpe)
    fast.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    fast.pre_tokenizer = pre_tokenizers.Split(Regex("▁*[^▁]+|▁+"), behavior="isolated")
    fast.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    specials = [i for i in range(tok.vocab_size) if tok.is_control(i) or tok.is_unknown(i)]
    fast.add_special_tokens(
        [AddedToken(tok.id_to_piece(i), special=True, normalized=False) for i in specials]
    )
    bos = tok.id_to_piece(tok.bos_id)
    fast.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0",
        pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, tok.bos_id)],
    )
    return fast.to_str()


def write_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
    max_shard_size: int = 5 * 1024**3,
    progress=None,
) -> Path:
    """Native checkpoint ``src`` → a transformers ``LlamaForCausalLM`` directory."""
    src, dst = Path(src), Path(dst)
    args, _ = read_params(src)
    tok = Tokenizer(src / "tokenizer.model") if (src / "tokenizer.model").is_file() else None
    if args.vocab_size <= 0:
        if tok is None:
            raise CheckpointError(f"{src}: vocab_size=-1 and no tokenizer.model")
        args.vocab_size = tok.vocab_size
    if dst.exists() and not force:
        raise CheckpointError(f"{dst}: already exists; pass --force to replace it")
    with atomic_dir(dst, overwrite=force) as tmp:
        stream = checked(iter_tensors(src), args, str(src))
        if progress:
            stream = progress(stream)

        def hf_tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for name, t in stream:
                if name.endswith("attention.wq.weight"):
                    t = permute_to_hf(t, args.n_heads)
                elif name.endswith("attention.wk.weight"):
                    t = permute_to_hf(t, args.kv_heads)
                yield meta_to_hf_name(name), t

        written = write_safetensors(
            hf_tensors(), tmp, dtype=dtype, max_shard_size=max_shard_size, where=str(dst)
        )
        bos, eos = (tok.bos_id, tok.eos_id) if tok else (1, 2)
        config = hf_config(args, bos, eos)
        config["torch_dtype"] = str(written).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {
            "bos_token_id": bos,
            "eos_token_id": eos,
            "do_sample": True,
            "temperature": 0.8,
            "top_p": 0.95,
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        chat_template = read_chat_template(src)
        if chat_template is not None:
            (tmp / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
        if tok is not None:
            _write_hf_tokenizer(tok, tmp, args.max_seq_len, chat_template)
    return dst


def _write_hf_tokenizer(
    tok: Tokenizer, out: Path, max_len: int, chat_template: str | None = None
) -> None:
    pieces = {
        "bos_token": tok.id_to_piece(tok.bos_id),
        "eos_token": tok.id_to_piece(tok.eos_id),
        "unk_token": tok.id_to_piece(tok.unk_id),
    }
    tok.save(out / "tokenizer.model")
    fast = hf_tokenizer_json(tok)
    if fast is not None:
        (out / "tokenizer.json").write_text(fast)
    config = {
        # transformers' LlamaTokenizer re-derives its own pipeline from tokenizer.model,
        # which splits runs of spaces differently from SentencePiece; the generic fast
        # class loads our tokenizer.json, whose ids are SentencePiece's.
        "tokenizer_class": "PreTrainedTokenizerFast" if fast is not None else "LlamaTokenizer",
        **pieces,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "add_prefix_space": True,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "sp_model_kwargs": {},
    }
    if chat_template is not None:
        # apply_chat_template renders bos_token/eos_token as the strings above, and its
        # tokenizer (add_special_tokens=False) maps them back to the ids: tokenizer.json
        # declares every control piece a special token.
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(pieces, indent=2) + "\n")
