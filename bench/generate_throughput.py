"""Decoding throughput: llamaforge's generate against HF transformers' generate.

Same random weights (the 15M preset unless --preset), same prompts, greedy, fp32 on CPU
(or bf16 on GPU with --device cuda). Prints new tokens/s for each and the ratio.

    python bench/generate_throughput.py --preset 15M --batch 1 4 --new-tokens 128
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import transformers

from llamaforge.convert.hf import hf_config, to_hf_state_dict
from llamaforge.model import build_model
from llamaforge.presets import get_preset


class _IdsOnly:
    """The few tokenizer fields generate needs, for prompts given as ids."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = vocab_size, 1, 2, -1

    def decode(self, ids):
        return " ".join(map(str, ids))

    def encode(self, text, bos=True, eos=False):
        raise NotImplementedError


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="15M")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()

    from llamaforge.generate import generate_completions

    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = get_preset(a.preset)
    torch.manual_seed(0)
    ours = build_model(args, device=device).to(dtype).eval()
    cfg = transformers.LlamaConfig(**hf_config(args), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), args), strict=False)
    tok = _IdsOnly(args.vocab_size)
    print(
        f"# {a.preset} ({ours.num_params() / 1e6:.1f}M params), {dtype}, device {device} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print("| batch | prompt | new tokens | llamaforge tok/s | HF tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    for bsz in a.batch:
        gen = torch.Generator().manual_seed(bsz)
        prompts = torch.randint(3, args.vocab_size, (bsz, a.prompt_len), generator=gen)

        def run_ours(prompts=prompts):
            generate_completions(
                ours,
                tok,
                prompts.tolist(),
                max_new_tokens=a.new_tokens,
                temperature=0.0,
                stop_at_eos=False,
            )

        def run_hf(prompts=prompts):
            with torch.inference_mode():
                hf.generate(
                    prompts.to(device),
                    max_new_tokens=a.new_tokens,
                    min_new_tokens=a.new_tokens,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )

        t_ours, t_hf = _time(run_ours, a.repeats), _time(run_hf, a.repeats)
        n = bsz * a.new_tokens
        print(
            f"| {bsz} | {a.prompt_len} | {a.new_tokens} | {n / t_ours:,.0f} | "
            f"{n / t_hf:,.0f} | {t_hf / t_ours:.2f}x |"
        )


if __name__ == "__main__":
    main()
