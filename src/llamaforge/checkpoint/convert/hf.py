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
    INDEX_FILE,
    CheckpointError,
    checked,
    iter_tensors,
    load_pickled_tensors,
    open_checkpoint,
    read_chat_template,
    read_index,
    write_safetensors,
)
from llamaforge.files import atomic_dir, read_json_object
from llamaforge.model import MAX_FFN_HIDDEN, ModelArgs
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


# Config keys that would change the computation, and the values that leave it LLaMA's: a
# key absent or at one of these values is fine; anything else is refused by name.
_ARCHITECTURE = {
    "hidden_act": ("silu", "swish"),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "rope_scaling": (None, {}),
    "quantization_config": (None, {}),
    "partial_rotary_factor": (None, 1, 1.0),
    "use_qk_norm": (None, False),
    "sliding_window": (None,),
}
_ARCHITECTURES = ("LlamaForCausalLM", "LlamaModel")
# ModelArgs' fields by the names a Hugging Face config gives them (for error messages)
_HF_NAMES = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "max_seq_len": "max_position_embeddings",
}


def _check_architecture(config: dict[str, Any], where: str) -> None:
    """Refuse, by name, every config option that makes the model something other than
    LLaMA (another model type or head, an activation, biases, RoPE scaling, quantisation)."""
    if config.get("model_type") not in ("llama", None):
        raise CheckpointError(
            f"{where}: model_type={config.get('model_type')!r}; only 'llama' is supported"
        )
    arch = config.get("architectures")
    if arch is not None and (
        not isinstance(arch, list) or not arch or any(a not in _ARCHITECTURES for a in arch)
    ):
        raise CheckpointError(
            f"{where}: architectures={arch!r}: expected a list of {' or '.join(_ARCHITECTURES)}"
        )
    for key, allowed in _ARCHITECTURE.items():
        value = config.get(key, allowed[0])
        if not any(value == ok and type(value) is type(ok) for ok in allowed):
            shown = " or ".join(repr(v) for v in allowed)
            raise CheckpointError(f"{where}: {key}={value!r} is not supported (LLaMA's is {shown})")
    rope = config.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
        raise CheckpointError(
            f"{where}: rope_parameters={rope!r} is not supported (only LLaMA's default RoPE)"
        )


def _hf_int(config: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    """``config[key]`` as a positive integer (``default`` when absent or null)."""
    value = config.get(key)
    if value is None and default is not None:
        return default
    if value is None:
        raise CheckpointError(f"{where}: missing field {key!r}")
    if type(value) is not int or value < 1:
        raise CheckpointError(f"{where}: {key}={value!r}: expected a positive integer")
    return value


def _hf_float(config: dict[str, Any], key: str, where: str, default: float) -> float:
    """``config[key]`` as a number (``default`` when absent or null); its range is
    `ModelArgs.validate`'s."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{where}: {key}={value!r}: expected a number")
    return float(value)


def args_from_hf_config(config: dict[str, Any], where: str) -> ModelArgs:
    """The ModelArgs of a Hugging Face Llama ``config.json`` (``where``): an option that
    changes the architecture is refused by name, a field out of ModelArgs' range names
    the config's field, its value and the range."""
    _check_architecture(config, where)
    dim = _hf_int(config, "hidden_size", where)
    heads = _hf_int(config, "num_attention_heads", where)
    hidden = _hf_int(config, "intermediate_size", where)
    if hidden > MAX_FFN_HIDDEN:
        raise CheckpointError(
            f"{where}: intermediate_size={hidden}: expected at most {MAX_FFN_HIDDEN}"
        )
    kv = _hf_int(config, "num_key_value_heads", where, default=heads)
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != dim // heads:
        raise CheckpointError(
            f"{where}: head_dim={head_dim!r}, but hidden_size/num_attention_heads is "
            f"{dim // heads}: only LLaMA's head size is supported"
        )
    try:
        multiple_of, mult = fit_ffn(dim, hidden)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    theta = _hf_float(config, "rope_theta", where, 10000.0)
    args = ModelArgs(
        dim=dim,
        n_layers=_hf_int(config, "num_hidden_layers", where),
        n_heads=heads,
        n_kv_heads=None if kv == heads else kv,
        vocab_size=_hf_int(config, "vocab_size", where),
        multiple_of=multiple_of,
        ffn_dim_multiplier=mult,
        norm_eps=_hf_float(config, "rms_norm_eps", where, 1e-6),
        rope_theta=_hf_float(config.get("rope_parameters") or {}, "rope_theta", where, theta),
        max_seq_len=_hf_int(config, "max_position_embeddings", where, default=2048),
    )
    try:
        return args.validate(where, names=_HF_NAMES)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _hf_weight_files(src: Path) -> list[Path]:
    """The weight files of an HF folder: the index's shards, else ``model*.safetensors``,
    else ``pytorch_model*.bin`` (read as plain tensors only); each a regular file."""
    index = src / INDEX_FILE
    if index.is_file():
        # a hub snapshot's files are links into the cache's blobs/: links may lead out
        weight_map = read_index(index, links_out=True)
        files = [src / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(src.glob("model*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{src}: no model*.safetensors or pytorch_model*.bin weights")
    for f in files:
        if not f.is_file():
            what = "not a regular file" if f.exists() else "missing"
            raise CheckpointError(f"{f}: {what} (a weight file of {src})")
    return files


def _iter_hf_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix != ".safetensors":
        yield from load_pickled_tensors(path).items()
        return
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    with handle as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def read_hf(
    src: str | os.PathLike, tokenizer: str | os.PathLike | None = None
) -> tuple[ModelArgs, Tokenizer | None, Iterator[tuple[str, torch.Tensor]]]:
    """ModelArgs, tokenizer and a stream of Meta-named tensors from an HF Llama directory.
    Tied embeddings (``tie_word_embeddings``) are untied: the output layer is a copy of the
    embedding, which computes what HF computes (a stored ``lm_head.weight`` that differs
    from the embedding is refused: transformers would ignore it)."""
    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{src}: no config.json: not a Hugging Face checkpoint")
    config = read_json_object(cfg_path, CheckpointError)
    args = args_from_hf_config(config, str(cfg_path))
    tok_path = Path(tokenizer) if tokenizer else src / "tokenizer.model"
    tok = Tokenizer(tok_path) if tok_path.is_file() or tokenizer else None
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise CheckpointError(f"{cfg_path}: tie_word_embeddings={tied!r}: expected true or false")
    files = _hf_weight_files(src)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        embedding = output = None
        for path in files:
            for hf_name, t in _iter_hf_file(path):
                name = meta_name_from_hf(hf_name)
                if name is None:
                    continue
                if name.endswith("attention.wq.weight"):
                    t = permute_from_hf(t, args.n_heads)
                elif name.endswith("attention.wk.weight"):
                    t = permute_from_hf(t, args.kv_heads)
                elif name == "tok_embeddings.weight":
                    embedding = t
                elif name == "output.weight":
                    output = t
                    if tied:
                        continue  # the embedding is the output layer: yielded at the end
                yield name, t
        if tied:
            yield "output.weight", _untied_output(embedding, output, cfg_path)
        elif output is None:
            raise CheckpointError(f"{src}: no lm_head.weight and embeddings are not tied")

    return args, tok, tensors()


def _untied_output(
    embedding: torch.Tensor | None, output: torch.Tensor | None, where: Path
) -> torch.Tensor:
    """The output layer of a tied checkpoint: its embedding (a stored lm_head that differs
    is refused, since transformers would silently replace it by the embedding)."""
    if embedding is None:
        raise CheckpointError(
            f"{where}: tie_word_embeddings is true but there is no model.embed_tokens.weight"
        )
    if output is not None and not torch.equal(output, embedding):
        raise CheckpointError(
            f"{where}: tie_word_embeddings is true but the stored lm_head.weight differs from "
            "model.embed_tokens.weight (refused: which of them is the model's is unclear)"
        )
    return embedding.clone()  # its own storage: safetensors refuses tensors that share it


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
    # --force also takes a tokenizer that differs from the one params.json records
    src, args, tok = open_checkpoint(src, force=force)
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
