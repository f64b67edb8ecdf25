"""Decoding throughput: llamaforge's generate against HF transformers' and llama.cpp's.

Same random weights (the 15M preset unless --preset), same prompt of random ids, greedy,
the same number of new tokens; fp32 on CPU, bf16 on a GPU (--device cuda). Prints new
tokens/s for each variant and its ratio to HF transformers and to llama.cpp.

Variants (--variants):
  ours           generate_completions (the batch path: dynamic KV cache, eager)
  ours-static    FastGenerator: static KV cache, eager                  (batch 1 only)
  ours-compile   FastGenerator with torch.compile (CUDA graphs on a GPU) (batch 1 only)
  ours-int8      FastGenerator on int8 weight-only layers (compiled on a GPU)
  ours-int8-bf16 the same, fp32 activations entering the CPU's int8 kernel as bf16
  ours-int8-bf16-compile   the same, compiled
  ours-spec      FastGenerator with a draft (--draft): "int8", the model's own int8 copy
                 (bf16 compute on the CPU; cheaper, and it agrees with the model, so the
                 acceptance rate is meaningful even for random weights), or "layers", its
                 first --draft-layers layers (sharing embedding, final norm and output;
                 random weights make their proposals near-useless). Acceptance is printed.
  ours-spec-compile        the same, compiled
  hf             transformers' LlamaForCausalLM.generate (sdpa attention)
  llama.cpp      llama-cpp-python on the same weights exported with llamaforge's GGUF
                 converter (--gguf-type f32 by default, to match fp32); CPU only

    python bench/generate_throughput.py --preset 15M --batch 1 --new-tokens 128
    python bench/generate_throughput.py --preset 110M --batch 1 --variants ours ours-int8 hf
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from llamaforge.checkpoint.convert.hf import hf_config, to_hf_state_dict
from llamaforge.model import build_model
from llamaforge.presets import get_preset

ALL = [
    "ours",
    "ours-static",
    "ours-compile",
    "ours-int8",
    "ours-int8-bf16",
    "ours-int8-bf16-compile",
    "ours-spec",
    "ours-spec-compile",
    "hf",
    "llama.cpp",
]
FAST = {v for v in ALL if v.startswith("ours-")}  # FastGenerator variants
SINGLE_STREAM = FAST | {"llama.cpp"}


class _IdsOnly:
    """The few tokenizer fields generate needs, for prompts given as ids."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = vocab_size, 1, 2, -1

    def decode(self, ids):
        return " ".join(map(str, ids))

    def encode(self, text, bos=True, eos=False):
        raise NotImplementedError


def _time(fn, repeats: int, sync) -> float:
    fn()  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _draft_from_layers(model, n_layers: int):
    """The model's first ``n_layers`` layers as a draft, sharing all their weights."""
    draft = copy.copy(model)  # a new module whose submodule table is its own
    draft._modules = dict(model._modules)
    draft.layers = torch.nn.ModuleList(list(model.layers)[:n_layers])
    draft.args = dataclasses.replace(model.args, n_layers=n_layers)
    return draft


def _llama_cpp_runner(model, args, a, tmp: Path):
    """A function that decodes with llama.cpp, or None (with the reason on stderr)."""
    try:
        import llama_cpp
    except ImportError:
        print("# llama.cpp skipped: llama-cpp-python is not installed", file=sys.stderr)
        return None
    from llamaforge.checkpoint.convert.gguf import export_gguf
    from llamaforge.checkpoint.native import save
    from llamaforge.data.stdlib import docs_documents
    from llamaforge.tokenizer import Tokenizer, train_tokenizer

    # GGUF carries a vocabulary: a small real one, padded by the exporter to vocab_size.
    tok_file = tmp / "tokenizer.model"
    train_tokenizer(docs_documents(max_bytes=300_000), tok_file, vocab_size=512)
    ckpt = save(model, Tokenizer(tok_file), tmp / "ckpt", dtype="float32")
    gguf = export_gguf(ckpt, tmp / "model.gguf", outtype=a.gguf_type, progress=False)
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=a.prompt_len + a.new_tokens + 8,
        n_batch=max(a.prompt_len, 8),
        n_threads=torch.get_num_threads(),
        verbose=False,
    )

    def run(prompt: list[int]) -> None:
        n = 0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            n += 1
            if n == a.new_tokens:
                break

    def run_rows(prompts: list[list[int]]) -> None:
        run(prompts[0])

    run_rows.close = llm.close  # its threads and memory go before the next variant
    return run_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="15M")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="+", default=ALL, choices=ALL)
    p.add_argument("--draft", default="int8", choices=["int8", "layers"], help="ours-spec draft")
    p.add_argument("--draft-layers", type=int, default=2, help="layers of --draft layers")
    p.add_argument("--draft-k", type=int, default=4, help="tokens the draft proposes per step")
    p.add_argument("--gguf-type", default="f32", choices=["f32", "f16", "q8_0"])
    a = p.parse_args()

    from llamaforge.inference.generate import FastGenerator, generate_completions
    from llamaforge.inference.quantize import quantize_int8

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    args = get_preset(a.preset)
    torch.manual_seed(0)
    ours = build_model(args, device=device).to(dtype).eval()
    tok = _IdsOnly(args.vocab_size)
    print(
        f"# {a.preset} ({ours.num_params() / 1e6:.1f}M params), {dtype}, device {device} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, transformers {transformers.__version__}; greedy, "
        f"prompt {a.prompt_len} tokens, {a.new_tokens} new tokens, best of {a.repeats}"
    )
    greedy = dict(max_new_tokens=a.new_tokens, temperature=0.0, stop_at_eos=False)
    notes = []

    def make_runner(v: str):
        """The function that decodes for variant ``v`` (built just before it is timed, so
        that no variant's threads or compiler workers run while another is timed)."""
        if v == "ours":
            return lambda prompts: generate_completions(ours, tok, prompts, **greedy)
        if v in FAST:
            model, kw = ours, {}
            if v == "ours-compile":
                kw["compile"] = True
            elif v.startswith("ours-int8"):
                bf16 = v.startswith("ours-int8-bf16")
                model = quantize_int8(copy.deepcopy(ours), cpu_bf16_compute=bf16)
                # on a GPU int8 pays only once compile fuses the dequantisation
                kw["compile"] = cuda or v.endswith("-compile")
            elif v.startswith("ours-spec"):
                if a.draft == "int8":
                    draft = quantize_int8(copy.deepcopy(ours), cpu_bf16_compute=True)
                else:
                    draft = _draft_from_layers(ours, a.draft_layers)
                kw.update(draft=draft, draft_k=a.draft_k, compile=cuda or v.endswith("-compile"))
            fast = FastGenerator(model, tok, **kw)
            if v.startswith("ours-spec"):
                notes.append((v, fast))
            return lambda prompts: fast.generate(prompts[0], **greedy)
        if v == "hf":
            cfg = transformers.LlamaConfig(**hf_config(args), attn_implementation="sdpa")
            hf = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
            hf.load_state_dict(to_hf_state_dict(ours.state_dict(), args), strict=False)

            def run_hf(prompts):
                with torch.inference_mode():
                    hf.generate(
                        torch.tensor(prompts, device=device),
                        max_new_tokens=a.new_tokens,
                        min_new_tokens=a.new_tokens,
                        do_sample=False,
                        eos_token_id=None,
                        pad_token_id=0,
                    )

            return run_hf
        if cuda:  # llama.cpp
            print("# llama.cpp skipped: this build runs on the CPU", file=sys.stderr)
            return None
        return _llama_cpp_runner(ours, args, a, Path(tempfile.mkdtemp(prefix="gen-bench-")))

    prompts = {
        bsz: torch.randint(
            3, args.vocab_size, (bsz, a.prompt_len), generator=torch.Generator().manual_seed(bsz)
        ).tolist()
        for bsz in a.batch
    }
    rates: dict[tuple[int, str], float] = {}
    for v in a.variants:
        fn = make_runner(v)
        if fn is None:
            continue
        for bsz in a.batch:
            if bsz == 1 or v not in SINGLE_STREAM:
                t = _time(lambda f=fn, p=prompts[bsz]: f(p), a.repeats, sync)
                rates[bsz, v] = bsz * a.new_tokens / t
        getattr(fn, "close", lambda: None)()
        del fn
        gc.collect()

    print("| batch | variant | tok/s | vs HF | vs llama.cpp |")
    print("|---|---|---|---|---|")
    for (bsz, v), r in sorted(rates.items(), key=lambda item: item[0][0]):
        hf, cpp = rates.get((bsz, "hf")), rates.get((bsz, "llama.cpp"))
        hf_ratio = f"{r / hf:.2f}x" if hf else "-"
        cpp_ratio = f"{r / cpp:.2f}x" if cpp else "-"
        print(f"| {bsz} | {v} | {r:,.0f} | {hf_ratio} | {cpp_ratio} |")
    for v, fast in notes:
        what = (
            "the model's int8 copy" if a.draft == "int8" else f"its first {a.draft_layers} layers"
        )
        print(
            f"# {v}: draft = {what}, draft_k={a.draft_k}, acceptance "
            f"{fast.stats.acceptance_rate:.1%} on the last run ({fast.stats.target_forwards} "
            f"model forwards for {fast.stats.new_tokens} tokens)"
        )


if __name__ == "__main__":
    main()
