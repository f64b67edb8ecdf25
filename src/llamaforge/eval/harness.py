"""lm-evaluation-harness backend: ``lm_eval --model llamaforge --model_args ckpt=DIR``.

Importing this module registers the model under the name "llamaforge". lm-eval 0.4.13
discovers models only through its own table (``lm_eval.models.MODEL_MAPPING``) and
``register_model`` calls made by code that has been imported: it reads no entry points and
has no plugin flag. So, from the shell, run lm-eval through this module, which registers the
backend and then hands the command line to lm-eval's own CLI::

    python -m llamaforge.eval.harness --model llamaforge \
        --model_args ckpt=DIR,device=cuda,dtype=bfloat16,batch_tokens=65536 --tasks hellaswag

(or the ``llamaforge-lm-eval`` script when the package declares it); from Python,
``import llamaforge.eval.harness`` before ``lm_eval.simple_evaluate(model="llamaforge", ...)``.
Every request goes to `LlamaforgeLM`, so lm-eval's numbers and ours come from one engine.
"""

from __future__ import annotations

import sys
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llamaforge.eval.base import Generate, Loglikelihood, Rolling
from llamaforge.eval.lm import LlamaforgeLM

_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _as_bool(x: Any) -> bool:
    if isinstance(x, bool):
        return x
    return _BOOL[str(x).lower()]


def _opt_int(x: Any) -> int | None:
    return None if x in (None, "", "None", "auto") else int(x)


class LlamaforgeHarnessLM(LM):
    """lm-eval's ``LM`` interface over `LlamaforgeLM` (model_args: ckpt, device, dtype,
    batch_tokens, batch_size, max_length, seed, sample_mode, progress).

    lm-eval's own ``--device`` applies when model_args has no device; its ``--batch_size``
    (rows, default 1) is ignored: batches are sized by ``batch_tokens``.
    """

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        args = dict(arg_dict)
        device = (additional_config or {}).get("device")
        if device is not None and "device" not in args:
            args["device"] = device
        return cls(**args)

    def __init__(
        self,
        ckpt: str | None = None,
        device: str | None = "auto",
        dtype: str | None = None,
        batch_tokens: int | str | None = None,
        batch_size: int | str | None = None,
        max_length: int | str | None = None,
        seed: int | str = 1234,
        sample_mode: str = "per_sample",
        progress: bool | str = True,
        lm: LlamaforgeLM | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if lm is None:
            if not ckpt:
                raise ValueError("llamaforge: pass model_args ckpt=<native checkpoint directory>")
            lm = LlamaforgeLM.from_checkpoint(
                ckpt,
                device=device or "auto",
                dtype=dtype or None,
                batch_size=_opt_int(batch_size),
                max_length=_opt_int(max_length),
                batch_tokens=_opt_int(batch_tokens),
                progress=_as_bool(progress),
                sample_mode=sample_mode,
            )
        self.lm = lm
        self.seed = int(seed)
        self._device = lm.device
        # lm-eval passes its own settings (max_batch_size, …) through additional_config
        self.ignored_args = sorted(k for k, v in unused.items() if v is not None)

    @property
    def max_length(self) -> int:
        return self.lm.max_length

    @property
    def tokenizer_name(self) -> str:
        return f"llamaforge-sp-{self.lm.tokenizer.sha256()[:16]}"

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        reqs = [Loglikelihood(*r.args) for r in requests]
        out = []
        for req, res in zip(reqs, self.lm.loglikelihood(reqs)):
            self.cache_hook.add_partial(
                "loglikelihood", (req.context, req.continuation), (res.logprob, res.is_greedy)
            )
            out.append((res.logprob, res.is_greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        reqs = [Rolling(r.args[0]) for r in requests]
        out = self.lm.loglikelihood_rolling(reqs)
        for req, lp in zip(reqs, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.text,), lp)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.lm.tokenizer.decode([self.lm.tokenizer.eos_id])
        reqs = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            until = [u for u in until if u] or ([eos] if eos else [])
            do_sample = _as_bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if not do_sample:
                temperature = 0.0
            top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", 256)))
            reqs.append(
                Generate(
                    context,
                    until=tuple(until),
                    max_new_tokens=max_new,
                    temperature=temperature,
                    top_p=top_p if temperature > 0 else 1.0,
                    num_samples=1,
                    seed=self.seed,
                )
            )
        out = [samples[0] for samples in self.lm.generate(reqs)]
        for r, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", r.args, text)
        return out

    def get_model_info(self) -> dict[str, Any]:
        return {"llamaforge_ckpt": str(self.lm.ckpt_dir), **self.lm.describe()}


def cli_main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the "llamaforge" model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    # run as a script: register the importable class, not this __main__ copy of it
    from llamaforge.eval.harness import cli_main as _cli_main

    _cli_main()
else:
    register_model("llamaforge")(LlamaforgeHarnessLM)
