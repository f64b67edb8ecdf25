"""The native checkpoint: a directory anyone can read without llamaforge.

    params.json                    Meta's fields (dim, n_layers, …) plus a "llamaforge" block
    model.safetensors              Meta's tensor names; or, above ``max_shard_size``,
    model-00001-of-0000N.safetensors + model.safetensors.index.json (HF's index layout)
    tokenizer.model                the SentencePiece model
    chat_template.jinja            the chat template, when the model has one (HF's file name)

Saving writes everything into a hidden sibling directory and renames it into place, so a
crash never leaves a directory that loads as if complete. Loading builds the model on the
meta device and assigns tensors read one at a time from the memory-mapped files, each cast
(``dtype``) or converted to int8 (``quantize``) as it is read, so the weights are never
held twice.

The checkpoint's identity is ``weights_sha256``: the sha256 of each weight file's bytes,
combined over the files. It is computed once, when the checkpoint is written, and recorded
in params.json's "llamaforge" block; readers take the recorded value (a checkpoint written
before it was recorded is hashed from its files, streamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llamaforge.files import atomic_dir, read_json_object, sha256_file
from llamaforge.inference.quantize import int8_converter
from llamaforge.model import ModelArgs, Transformer
from llamaforge.tokenizer import Tokenizer

FORMAT_VERSION = 1
PARAMS_FILE = "params.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read or written; the message names the path."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def read_params(ckpt_dir: str | os.PathLike) -> tuple[ModelArgs, dict[str, Any]]:
    """ModelArgs and the extra "llamaforge" block from ``ckpt_dir/params.json``."""
    path = Path(ckpt_dir) / PARAMS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint directory needs {PARAMS_FILE}")
    params = read_json_object(path, CheckpointError)
    try:
        args = ModelArgs.from_dict(params, source=str(path))
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    extra = params.get("llamaforge", {})
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: llamaforge={extra!r}: expected a JSON object")
    return args, extra


def load_pickled_tensors(path: Path, *, mmap: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch pickle (Meta's ``consolidated.*.pth``, HF's
    ``pytorch_model.bin``, PEFT's ``adapter_model.bin``), read with ``weights_only`` so no
    code in it runs. A pickle that holds anything but a name -> tensor mapping, or that
    cannot be read, is a one-line CheckpointError naming the file."""
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": harmless
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                state = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
            except RuntimeError as e:
                if "mmap can only be used" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as e:  # UnpicklingError, a damaged zip's RuntimeError, EOFError, ...
        raise CheckpointError(
            f"{path}: refused: {_pickle_reason(e)} (a .pth/.bin pickle is read only when it "
            "holds plain tensors; safetensors is the safe format)"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not named tensors")
    for name, t in state.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor (refused)"
            )
    return state


def _pickle_reason(e: BaseException) -> str:
    """The line of torch.load's (many-line) error that says what is wrong."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
    useful = [line for line in lines if not line.startswith(boiler)]
    return (useful or lines or [type(e).__name__])[0]


def write_safetensors(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    where: str = "",
) -> torch.dtype | None:
    """Stream ``(name, tensor)`` pairs into ``model.safetensors``, or into
    ``model-0000i-of-0000N.safetensors`` shards with HF's index once they exceed
    ``max_shard_size``. Holds at most one shard in memory; refuses non-finite tensors.
    Returns the dtype written (of the first tensor)."""
    meta = {"format": "pt", "producer": "llamaforge"}
    shard: dict[str, torch.Tensor] = {}
    size, files, weight_map, total = 0, [], {}, 0
    first_dtype = None

    def flush() -> None:
        nonlocal shard, size
        name = out_dir / f"model-{len(files) + 1:05d}.safetensors.partial"
        save_file(shard, name, metadata=meta)
        files.append((name, list(shard)))
        shard, size = {}, 0

    for name, t in tensors:
        t = t.detach().to("cpu", dtype or t.dtype).contiguous()
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{where}: refusing to save, tensor {name} has non-finite values")
        first_dtype = first_dtype or t.dtype
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_size:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
    if not files:
        save_file(shard, out_dir / WEIGHTS_FILE, metadata=meta)
        return first_dtype
    if shard:
        flush()
    for i, (path, names) in enumerate(files, 1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        os.replace(path, out_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return first_dtype


def save_state(
    tensors: Iterable[tuple[str, torch.Tensor]],
    args: ModelArgs,
    tokenizer: Tokenizer | None,
    ckpt_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write a native checkpoint from a stream of Meta-named tensors, atomically: every
    file goes to a hidden sibling directory that is renamed into place when complete.
    ``chat_template`` (Jinja source) is written as ``chat_template.jinja``."""
    out = Path(ckpt_dir)
    target_dtype = parse_dtype(dtype)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists; pass overwrite=True (--force) to replace it")
    if chat_template is not None:
        _check_chat_template(chat_template, str(out))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        written = write_safetensors(
            checked(tensors, args, str(out)),
            tmp,
            dtype=target_dtype,
            max_shard_size=max_shard_size,
            where=str(out),
        )
        write_metadata(
            tmp, args, tokenizer, dtype=written, extra=extra, chat_template=chat_template
        )
    return out


def write_metadata(
    directory: Path,
    args: ModelArgs,
    tokenizer: Tokenizer | None,
    *,
    dtype: torch.dtype | str | None,
    extra: dict[str, Any] | None = None,
    chat_template: str | None = None,
    weights_sha256: str | None = None,
) -> None:
    """Complete a checkpoint directory whose weight files are written: params.json (Meta's
    fields and the "llamaforge" block: format version, dtype, ``extra``, the tokenizer's
    sha256 and the weights' ``weights_sha256``, computed from the files unless given),
    tokenizer.model and chat_template.jinja."""
    params = args.to_dict()
    block = params["llamaforge"] = {
        "format_version": FORMAT_VERSION,
        "dtype": str(dtype).removeprefix("torch."),
        **(extra or {}),
    }
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_FILE)
        block["tokenizer_sha256"] = tokenizer.sha256()
    if chat_template is not None:
        (directory / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
    block["weights_sha256"] = weights_sha256 or combine_sha256s(file_sha256s(directory))
    (directory / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")


def save(
    model: Transformer, tokenizer: Tokenizer | None, ckpt_dir: str | os.PathLike, **options: Any
) -> Path:
    """Write ``model`` (and ``tokenizer``) as a native checkpoint directory, atomically;
    ``options`` are ``save_state``'s (``dtype``, ``max_shard_size``, ``overwrite``, ``extra``,
    ``chat_template``)."""
    return save_state(model.state_dict().items(), model.args, tokenizer, ckpt_dir, **options)


def _check_chat_template(source: str, where: str) -> None:
    """Refuse a chat template that is not a string of valid Jinja before anything is written."""
    from llamaforge.chat_templates import ChatTemplate, ChatTemplateError

    if not isinstance(source, str) or not source.strip():
        raise CheckpointError(f"{where}: chat_template must be non-empty Jinja source text")
    try:
        ChatTemplate(CHAT_TEMPLATE_FILE, source)
    except ChatTemplateError as e:
        raise CheckpointError(f"{where}: {e}") from None


def read_chat_template(ckpt_dir: str | os.PathLike) -> str | None:
    """The Jinja source of ``ckpt_dir/chat_template.jinja``, or None when there is none."""
    path = Path(ckpt_dir) / CHAT_TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e})") from None


def read_index(index: Path, *, links_out: bool = False) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a safetensors index, each shard
    named by a relative path that stays inside the index's folder (`shard_path`)."""
    weight_map = read_json_object(index, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{index}: not a safetensors index (expected weight_map: an object of tensor "
            "name -> shard file name)"
        )
    for name, fname in weight_map.items():
        shard_path(index.parent, fname, f"{index}: weight_map[{name!r}]", links_out=links_out)
    return weight_map


def shard_path(folder: Path, fname: str, where: str, *, links_out: bool = False) -> Path:
    """``folder/fname`` for a file that an index names: a relative path without ``..`` that,
    symbolic links followed, stays inside ``folder`` (``links_out``: a link may lead out,
    as a Hugging Face cache snapshot's links into ``blobs/`` do); anything else is a
    CheckpointError naming ``where`` (the index entry)."""
    rel = Path(fname)
    if not fname or rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(
            f"{where}: shard {fname!r} is not a file name inside {folder} (refused)"
        )
    path = folder / rel
    if not links_out and not path.resolve().is_relative_to(folder.resolve()):
        raise CheckpointError(
            f"{where}: shard {fname!r} is a link to {path.resolve()}, outside {folder} (refused)"
        )
    return path


def _weight_files(ckpt: Path) -> dict[str, list[str]]:
    """File name -> tensor names stored in it."""
    if (ckpt / INDEX_FILE).is_file():
        files: dict[str, list[str]] = {}
        for name, fname in read_index(ckpt / INDEX_FILE).items():
            files.setdefault(fname, []).append(name)
        return files
    if (ckpt / WEIGHTS_FILE).is_file():
        return {WEIGHTS_FILE: []}  # every tensor in the file
    raise CheckpointError(f"{ckpt}: no {WEIGHTS_FILE} or {INDEX_FILE}: not a native checkpoint")


def _open_files(ckpt: Path, device: str = "cpu") -> Iterator[tuple[Path, list[str], Any]]:
    """``(path, tensor names, open safetensors handle)`` of every weight file, in stored
    order; a missing or unreadable file is a CheckpointError naming it."""
    for fname, names in _weight_files(ckpt).items():
        path = ckpt / fname
        if not path.is_file():  # a FIFO or a device would block or never end: refused too
            what = "not a regular file" if path.exists() else "missing shard"
            raise CheckpointError(f"{path}: {what} listed in {INDEX_FILE}")
        with _open(path, device) as f:
            yield path, names or list(f.keys()), f


def _open(path: Path, device: str) -> Any:
    """``safe_open`` of one weight file; one that cannot be read is a CheckpointError."""
    try:
        return safe_open(str(path), framework="pt", device=device)
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def _stored(ckpt: Path, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every stored tensor, read one at a time onto ``device``.

    Each tensor comes through a handle of its own: a handle maps its whole file, and the
    pages a tensor was read from stay in the process (its resident memory) for as long as
    the mapping lives. So a tensor that is converted (another dtype, int8) and dropped takes
    its pages with it, and converting a checkpoint as it is read never holds the file."""
    for path, names, _ in _open_files(ckpt, "cpu"):
        for name in names:
            with _open(path, str(device)) as f:
                try:
                    t = f.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"{path}: cannot read tensor {name} ({e})") from None
            yield name, t
            del t  # not held while the next one is read


def weight_files(ckpt_dir: str | os.PathLike) -> list[str]:
    """The names of a checkpoint's weight files (one, or the shards of its index)."""
    return list(_weight_files(Path(ckpt_dir)))


def file_sha256s(
    ckpt_dir: str | os.PathLike, *, rank: int = 0, world_size: int = 1
) -> dict[str, str]:
    """Weight file name → sha256 of its bytes (streamed), for the files ``rank`` takes of
    ``world_size`` (every ``world_size``-th from the ``rank``-th): processes that share
    the work hash each file once between them."""
    ckpt = Path(ckpt_dir)
    out = {}
    for fname in weight_files(ckpt)[rank::world_size]:
        path = ckpt / fname
        if not path.is_file():
            raise CheckpointError(f"{path}: missing shard listed in {INDEX_FILE}")
        out[fname] = sha256_file(path)
    return out


def combine_sha256s(digests: dict[str, str]) -> str:
    """``weights_sha256`` from every weight file's sha256 (``file_sha256s``)."""
    lines = "".join(f"{name}\0{digest}\n" for name, digest in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def recorded_weights_sha256(ckpt_dir: str | os.PathLike) -> str | None:
    """The ``weights_sha256`` recorded in params.json when the checkpoint was written, or
    None (written before it was recorded)."""
    value = read_params(ckpt_dir)[1].get("weights_sha256")
    return value if isinstance(value, str) else None


def weights_sha256(ckpt_dir: str | os.PathLike) -> str:
    """A checkpoint's identity: the sha256 of its weight files' bytes, combined. The value
    recorded at saving is taken as it is (free); without one the files are hashed (streamed,
    seconds per GB). Same weights stored in another dtype or sharding hash differently."""
    return recorded_weights_sha256(ckpt_dir) or combine_sha256s(file_sha256s(ckpt_dir))


def tensor_shapes(ckpt_dir: str | os.PathLike, args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Name → shape of every stored tensor, read from the files' headers (no tensor data)
    and checked against ``args`` like ``load`` checks the tensors."""
    ckpt = Path(ckpt_dir)
    shapes = {}
    for _path, names, f in _open_files(ckpt):
        for name in names:
            shapes[name] = tuple(f.get_slice(name).get_shape())
    meta = ((n, torch.empty(shape, device="meta")) for n, shape in shapes.items())
    for _ in checked(meta, args, str(ckpt), params=str(ckpt / PARAMS_FILE)):
        pass
    return shapes


def read_parts(
    ckpt_dir: str | os.PathLike, parts: dict[str, tuple[slice, ...]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, part)`` for every tensor named in ``parts``: the block its slices select (one
    per dimension, step 1), read from the file in the stored dtype without reading the rest
    of the tensor (safetensors' ``get_slice``), files in stored order."""
    for path, names, f in _open_files(Path(ckpt_dir)):
        for name in names:
            if name in parts:
                try:
                    part = f.get_slice(name)[parts[name]]
                except Exception as e:
                    raise CheckpointError(f"{path}: cannot read tensor {name} ({e})") from None
                yield name, part


def open_checkpoint(
    ckpt_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    force: bool = False,
) -> tuple[Path, ModelArgs, Tokenizer | None]:
    """A native checkpoint's directory, its ``ModelArgs`` (vocab_size -1 resolved from the
    tokenizer) and its tokenizer (``tokenizer`` overrides ``ckpt_dir/tokenizer.model``; None
    when there is none), checked against each other (`check_tokenizer`: ``force`` uses a
    tokenizer other than the recorded one, with a warning); no tensor is read."""
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    args, extra = read_params(ckpt)
    tok_path = Path(tokenizer) if tokenizer is not None else ckpt / TOKENIZER_FILE
    tok = Tokenizer(tok_path) if tok_path.is_file() or tokenizer is not None else None
    if tok is not None:
        check_tokenizer(tok, tok_path, extra, ckpt / PARAMS_FILE, force=force)
    if args.vocab_size <= 0:
        if tok is None:
            raise CheckpointError(f"{ckpt}: params.json has vocab_size=-1 but no tokenizer.model")
        args.vocab_size = tok.vocab_size
    if tok is not None and tok.vocab_size > args.vocab_size:
        raise CheckpointError(
            f"{tok_path}: tokenizer has {tok.vocab_size} pieces but the model's vocab_size is "
            f"{args.vocab_size}"
        )
    return ckpt, args, tok


def check_tokenizer(
    tok: Tokenizer, tok_path: Path, extra: dict[str, Any], params: Path, *, force: bool = False
) -> None:
    """Refuse a tokenizer whose sha256 differs from the ``tokenizer_sha256`` that
    ``params``' llamaforge block records (another tokenizer's ids make the model's outputs
    garbage, or ids it cannot decode): a CheckpointError naming both files and both hashes,
    or with ``force`` a warning on stderr. Nothing is checked when no hash is recorded."""
    recorded = extra.get("tokenizer_sha256")
    if recorded is None:
        return
    if not isinstance(recorded, str):
        raise CheckpointError(f"{params}: tokenizer_sha256={recorded!r}: expected a hex string")
    actual = tok.sha256()
    if actual == recorded:
        return
    msg = (
        f"{tok_path}: tokenizer sha256 {actual} differs from the tokenizer_sha256 {recorded} "
        f"recorded in {params}"
    )
    if not force:
        raise CheckpointError(f"{msg}: not the model's tokenizer (--force uses it anyway)")
    print(f"warning: {msg}; using it anyway (--force)", file=sys.stderr)


def load(
    ckpt_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    tokenizer: str | os.PathLike | None = None,
    strict: bool = False,
    force: bool = False,
    quantize: str | None = None,
) -> tuple[Transformer, Tokenizer | None]:
    """Load a native checkpoint: ``(model, tokenizer)`` with the model in eval mode.

    ``dtype`` defaults to the stored one. ``tokenizer`` overrides ``ckpt_dir/tokenizer.model``;
    one whose sha256 differs from the recorded one is refused unless ``force`` (then a
    warning). Tensors with NaN or Inf values are named in a warning on stderr (its outputs
    mean nothing); ``strict`` makes them a CheckpointError instead. ``quantize`` ("int8" or
    "int8-bf16", `QUANTIZE_KINDS`): int8 linear layers, the same as `quantize_int8` on the
    loaded model.

    The model is filled one tensor at a time, each cast to ``dtype`` on ``device`` as it is
    read and each linear layer converted to int8 as soon as its weight is in, so memory
    peaks at the model as loaded plus about one tensor in its stored and its loaded dtype,
    never the full-precision model and the converted one together.
    """
    ckpt, args, tok = open_checkpoint(ckpt_dir, tokenizer, force=force)
    target_dtype = parse_dtype(dtype)
    convert = int8_converter(quantize) if quantize is not None else None
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    with torch.device("meta"):
        model = Transformer(args)
    bad: list[str] = []
    for name, t in checked(_stored(ckpt, dev), args, str(ckpt), params=str(ckpt / PARAMS_FILE)):
        t = t.to(target_dtype) if target_dtype is not None else t
        bad += non_finite([(name, t)])
        _put(model, name, t, convert)
        del t  # the last reference to a converted layer's full-precision weight
    if bad:
        shown = ", ".join(bad[:5]) + (" …" if len(bad) > 5 else "")
        msg = f"{ckpt}: {len(bad)} tensor(s) with NaN or Inf values: {shown}"
        if strict:
            raise CheckpointError(f"{msg} (refused: strict)")
        print(
            f"warning: {msg}; the model's outputs are not meaningful (--strict refuses it)",
            file=sys.stderr,
        )
    return model.eval(), tok


def _put(
    model: nn.Module,
    name: str,
    t: torch.Tensor,
    convert: Callable[[nn.Linear], nn.Module] | None,
) -> None:
    """Assign tensor ``name`` of a model built on the meta device (as ``load_state_dict``'s
    ``assign`` does); with ``convert``, an ``nn.Linear`` whose parameters are all in is
    replaced by ``convert(layer)`` at once."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    owner.load_state_dict({leaf: t}, strict=False, assign=True)
    if convert is None or type(owner) is not nn.Linear:
        return
    if any(p.is_meta for p in owner.parameters()):
        return
    parent_name, _, child = owner_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, convert(owner))


def non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an Inf: one reduction each (the
    minimum and maximum, which a NaN or an Inf reaches), no temporary of the tensor's size."""
    bad = []
    for name, t in tensors:
        if t.is_floating_point() and t.numel():
            if not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
                bad.append(name)
    return bad


def iter_tensors(ckpt_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of a native checkpoint, read lazily from the memory-mapped files
    in the order they are stored (for conversions that never build the model)."""
    yield from _stored(Path(ckpt_dir), torch.device("cpu"))


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of a model with ``args`` (built on the meta device: free)."""
    with torch.device("meta"):
        model = Transformer(args)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def checked(
    tensors: Iterable[tuple[str, torch.Tensor]],
    args: ModelArgs,
    where: str,
    *,
    params: str = "the model parameters",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass ``tensors`` through, raising on an unknown name, a wrong shape or, at the end,
    a missing tensor — each named, with the shape ``args`` (read from ``params``) implies.
    The one validation of a tensor stream: ``load``, ``save_state`` and the converters."""
    expected = expected_shapes(args)
    seen = set()
    for name, t in tensors:
        if name not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {name!r} for this model")
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {tuple(t.shape)}, but the shape implied "
                f"by {params} is {expected[name]}"
            )
        seen.add(name)
        yield name, t
        del t  # not held while the next one is read
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise CheckpointError(f"{where}: missing {len(missing)} tensor(s): {shown}")
