"""The command line: mostly `llamaforge.cli.main([...])` in-process (fast), plus one real
``python -m llamaforge`` subprocess per command group."""

import json
import os
import re
import subprocess
import sys

import pytest

from llamaforge.cli.main import main

from .conftest import REPO


def run(*args, input=None, check=True):
    """A real subprocess, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "llamaforge", *map(str, args)],
        input=input,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli(capsys, *args, code=0):
    """`main` in this process; returns (stdout, stderr) after checking the exit status."""
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert status == code, f"exit {status}\n{out}\n{err}"
    return out, err


# ----------------------------------------------------------------------------- one subprocess
# per command group


def test_smoke_info():
    out = run("info", "--preset", "7B").stdout
    assert "6,738,415,616" in out and "11008" in out


def test_smoke_tokenizer_reads_stdin(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: the quick brown fox" for i in range(500)))
    model = tmp_path / "t.model"
    run("tokenizer", "train", corpus, "--out", model, "--vocab-size", "300")
    piped = run("tokenizer", "encode", "--model", model, "--bos", input="fox").stdout.split()
    assert piped[0] == "1"


def test_smoke_eval_usage_error():
    r = run("eval", "--tasks", "boolq", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "llamaforge eval: error: --ckpt DIR is required"


def test_smoke_data_help():
    out = run("data", "prepare", "--help").stdout
    assert "val_fraction = 0.005" in out


# ----------------------------------------------------------------------------- a fast CLI

# the commands that must answer without importing torch (target < 0.5 s; BENCHMARKS.md)
NO_TORCH = (
    ["--help"],
    ["--version"],
    ["no-such-command"],
    ["eval", "--help"],
    ["eval", "--list-tasks"],
    ["generate", "--help"],
    ["info", "--help"],
    ["chat", "--help"],
    ["convert", "--help"],
    ["data", "stats", "--help"],
    ["tokenizer", "encode", "--help"],
    ["data", "prepare", "--help"],
    ["data", "show", "--help"],
    ["lora", "merge", "--help"],
    ["plot", "--help"],
    ["generate"],  # a usage error: --ckpt is required
)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), **env},
        timeout=120,
    )


def test_building_the_parser_imports_no_torch():
    code = "import sys, llamaforge.cli.main as c; c.build_parser(); print('torch' in sys.modules)"
    assert _python(code).stdout.strip() == "False"


def test_help_version_and_usage_errors_import_no_torch():
    code = (
        "import contextlib, io, json, sys\n"
        "from llamaforge.cli.main import main\n"
        "out = []\n"
        f"for argv in {NO_TORCH!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), "
        "contextlib.redirect_stderr(io.StringIO()):\n"
        "        status = main(argv)\n"
        "    out.append([argv, status, 'torch' in sys.modules])\n"
        "print(json.dumps(out))\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    for argv, status, torch_loaded in json.loads(proc.stdout):
        assert not torch_loaded, f"llamaforge {' '.join(argv)} imported torch"
        assert status == (2 if argv in (["no-such-command"], ["generate"]) else 0), argv


def test_the_program_itself_imports_no_torch_for_help():
    """The real entry point (`python -m llamaforge`, as the console script runs `main()`),
    checked with -X importtime: torch is not among the imported modules."""
    for args in (["--help"], ["--version"], ["pretrain", "--no-such-flag"]):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "llamaforge", *args],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO / "src")},
            timeout=120,
        )
        imported = {ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if "|" in ln}
        assert "llamaforge.cli.main" in imported, proc.stderr[-2000:]
        if args[0] != "pretrain":  # pretrain's --help needs its config class (torch)
            assert "torch" not in imported, args
        assert proc.returncode == (0 if args[0].startswith("--") else 2), proc.stderr[-500:]


def test_lazy_api_names_are_the_functions():
    code = (
        "import sys, llamaforge\n"
        "assert 'torch' not in sys.modules\n"
        "import llamaforge.inference.chat, llamaforge.inference.generate\n"
        "import llamaforge.checkpoint.native\n"
        "from llamaforge.inference.generate import generate_completions\n"
        "assert llamaforge.chat is llamaforge.inference.chat.chat\n"
        "assert llamaforge.generate is sys.modules['llamaforge.inference.generate'].generate\n"
        "assert callable(llamaforge.load) and llamaforge.Tokenizer.__name__ == 'Tokenizer'\n"
        "from llamaforge import ChatSession, ModelArgs, save\n"
        "print('ok')\n"
    )
    proc = _python(code)
    assert proc.stdout.strip() == "ok", proc.stderr
    import llamaforge

    with pytest.raises(AttributeError, match="no_such_name"):
        llamaforge.no_such_name  # noqa: B018


# ----------------------------------------------------------------------------- threads


def test_thread_count_rules():
    from llamaforge.threads import choose_threads

    assert choose_threads({}, cores=8) == 8
    assert choose_threads({"LOCAL_WORLD_SIZE": "4"}, cores=8) == 2
    assert choose_threads({"LOCAL_WORLD_SIZE": "16"}, cores=8) == 1
    assert choose_threads({"OMP_NUM_THREADS": "3"}, cores=8) == 3  # the user's
    # torchrun sets OMP_NUM_THREADS=1 itself: the cores per process win
    assert choose_threads({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, cores=8) == 4
    assert choose_threads({"LLAMAFORGE_THREADS": "5", "OMP_NUM_THREADS": "3"}, cores=8) == 5
    assert choose_threads({"LLAMAFORGE_THREADS": "5", "LOCAL_WORLD_SIZE": "2"}, cores=8) == 5
    with pytest.raises(ValueError, match="LLAMAFORGE_THREADS='0'"):
        choose_threads({"LLAMAFORGE_THREADS": "0"}, cores=8)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity")
def test_threads_follow_the_affinity_mask_and_the_override():
    """In a fresh process restricted to one core: torch gets 1 intra-op thread and the
    passive wait policy; LLAMAFORGE_THREADS overrides the count; a user's OMP_WAIT_POLICY
    is kept."""
    code = (
        "import os\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from llamaforge.threads import configure_threads\n"
        "n = configure_threads()\n"
        "import torch\n"
        "print(n, torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(REPO / "src")
    env.pop("LLAMAFORGE_THREADS", None)

    def go(**extra: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**env, **extra},
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert go() == "1 1 PASSIVE"
    assert go(LLAMAFORGE_THREADS="2", OMP_WAIT_POLICY="ACTIVE") == "2 2 ACTIVE"


# ----------------------------------------------------------------------------- in-process


def test_info_65b_json(capsys):
    info = json.loads(cli(capsys, "info", "--preset", "65B", "--json")[0])
    assert info["params"]["total"] == 65_285_660_672
    n = info["params"]["non_embedding"]
    assert info["flops_per_token"] == 6 * n + 12 * 80 * 8192 * 2048
    assert info["memory_bytes"]["training_total"] == 16 * 65_285_660_672


def test_init_generate_and_info_from_ckpt(tmp_path, small_tokenizer_path, capsys):
    ckpt = tmp_path / "ckpt"
    init = ("init", "--preset", "1M", "--tokenizer", small_tokenizer_path, "--out", ckpt)
    cli(capsys, *init, "max_seq_len=64")
    info = json.loads(cli(capsys, "info", "--ckpt", ckpt, "--json")[0])
    assert info["args"]["vocab_size"] == 512 and info["args"]["max_seq_len"] == 64
    gen = ("generate", "--ckpt", ckpt, "--prompt", "The", "--max-new-tokens")
    assert cli(capsys, *gen, "8", "--temperature", "0", "--seed", "1")[0].strip()
    out, _ = cli(capsys, *gen, "5", "--prompt", "def x", "--temperature", "0.7", "--seed", "1")
    assert out.count("=== ") == 2
    _, err = cli(capsys, *init, code=2)
    assert "already exists" in err
    _, err = cli(capsys, "generate", "--ckpt", ckpt, "--prompt", "word " * 200, code=2)
    assert "context is 64" in err


def test_generate_output_for_a_person(tmp_path, small_tokenizer_path, capsys):
    ckpt = tmp_path / "ckpt"
    cli(capsys, "init", "--preset", "1M", "--tokenizer", small_tokenizer_path, "--out", ckpt)
    gen = ("generate", "--ckpt", ckpt, "--max-new-tokens", "24", "--seed", "3", "--echo")
    out, _ = cli(capsys, *gen, "--prompt", "The", "--prompt", "def x")
    assert "=== [1/2] " in out and "=== [2/2] " in out
    assert out.split("=== [2/2] ", 1)[1].split("\n", 1)[1].startswith("def x")
    assert "\n\n\n" not in out and out.endswith("\n") and not out.endswith("\n\n\n")
    out, _ = cli(capsys, *gen, "--prompt", "The")
    assert out.startswith("The") and "\n\n\n" not in out
    out, _ = cli(capsys, "generate", "--help")
    text = " ".join(out.split())
    assert "(default 128)" in text and "unseeded" in text and "--no-echo" in text


def test_a_folder_with_tokenizer_model_stands_for_it(tmp_path, small_tokenizer_path, capsys):
    """As a Hugging Face LLaMA repository or Meta's download lays it out."""
    import shutil

    repo = tmp_path / "Llama-2-7b-hf"
    repo.mkdir()
    shutil.copy(small_tokenizer_path, repo / "tokenizer.model")
    (repo / "config.json").write_text("{}")
    direct, _ = cli(capsys, "tokenizer", "encode", "--model", small_tokenizer_path, "hello")
    via_dir, _ = cli(capsys, "tokenizer", "encode", "--model", repo, "hello")
    assert direct == via_dir and direct.strip()
    _, err = cli(capsys, "tokenizer", "encode", "--model", tmp_path, "hello", code=2)
    assert "a folder without tokenizer.model" in err
    ckpt = tmp_path / "ckpt"
    cli(capsys, "init", "--preset", "1M", "--tokenizer", repo, "--out", ckpt, "max_seq_len=32")
    assert (ckpt / "tokenizer.model").read_bytes() == small_tokenizer_path.read_bytes()


def test_printer_squeezes_blank_lines_and_dims():
    import io

    from llamaforge.cli.checkpoint import _Printer

    buf = io.StringIO()
    p = _Printer(buf)
    p.write("a\n\n\n\n")
    p.write("\n\nb")
    p.write("prompt", dim=True)
    p.end_line()
    assert buf.getvalue() == "a\n\nb\x1b[2mprompt\x1b[0m\n"


def test_data_stats_is_an_aligned_table():
    from llamaforge.data.report import format_table1

    rows = [
        {"source": "code", "kind": "code", "proportion": 0.7, "epochs": 252063.97,
         "disk_bytes": 18.8 * 2**20, "tokens": 5_550_000, "documents": 1234},
        {"source": "prose", "kind": "books", "proportion": 0.3, "epochs": 1.5,
         "disk_bytes": 2048, "tokens": 1000, "documents": 7},
    ]  # fmt: skip
    lines = format_table1(rows, 10**12).splitlines()
    assert lines[1].split() == [
        "Dataset", "Kind", "Sampling", "prop.", "Epochs", "Disk", "size", "Tokens", "Documents"
    ]  # fmt: skip
    assert set(lines[2]) == {"-", " "}
    assert "70.0%  252,063.97" in lines[3]
    # right-aligned numbers: every column ends where its header ends
    for header in ("Sampling prop.", "Epochs", "Disk size", "Tokens", "Documents"):
        end = lines[1].index(header) + len(header)
        assert all(line[end - 1] != " " and line[end : end + 1] in ("", " ") for line in lines[3:])


def test_tokenizer_commands(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(2000))
    )
    model = tmp_path / "t.model"
    cli(capsys, "tokenizer", "train", corpus, "--out", model, "--vocab-size", "300")
    ids = cli(capsys, "tokenizer", "encode", "--model", model, "the lazy dog 42")[0].split()
    out = cli(capsys, "tokenizer", "decode", "--model", model, *ids)[0]
    assert out.strip() == "the lazy dog 42"
    pieces = cli(capsys, "tokenizer", "encode", "--model", model, "--pieces", "42")[0]
    assert ":4" in pieces and ":2" in pieces  # digits are split


def test_with_metas_tokenizer(tmp_path, meta_tokenizer_path, capsys):
    ids = cli(capsys, "tokenizer", "encode", "--model", meta_tokenizer_path, "Hello world")[0]
    assert ids.split() == ["15043", "3186"]
    out = cli(capsys, "tokenizer", "decode", "--model", meta_tokenizer_path, "15043", "3186")[0]
    assert out == "Hello world\n"
    ckpt = tmp_path / "meta-vocab"
    init = ("init", "--preset", "1M", "--tokenizer", meta_tokenizer_path, "--out", ckpt)
    cli(capsys, *init, "max_seq_len=32", "--dtype", "bfloat16")
    info = json.loads(cli(capsys, "info", "--ckpt", ckpt, "--json")[0])
    assert info["args"]["vocab_size"] == 32000


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "--ckpt", "/nonexistent", "--prompt", "x"], "generate: error: "),
        (["tokenizer", "encode", "--model", "/nonexistent.model", "x"], "nonexistent.model"),
        (["info", "--preset", "7.5B"], "unknown model preset"),
        (["init", "--preset", "1M", "--tokenizer", "/no.model", "--out", "x"], "no.model"),
        (["data", "stats", "/nonexistent", "--tokens", "1e9"], "llamaforge data stats: error:"),
        (["eval", "--ckpt", "/nonexistent", "--tasks", "boolq"], "no such checkpoint"),
        (["eval", "--shots", "many"], "invalid int value"),
        (["eval", "--list-tasks", "--task-option", "gsm8k.maj_k"], None),
        (["pretrain", "steps=x"], "steps"),
    ],
)
def test_usage_and_input_errors_exit_2_with_one_clear_line(args, needle, capsys):
    if args[-1] == "gsm8k.maj_k":  # --list-tasks runs first and ignores the options
        cli(capsys, *args)
        return
    _, err = cli(capsys, *args, code=2)
    assert needle in err and "Traceback" not in err


# ----------------------------------------------------------------------------- eval


def test_eval_is_an_ordinary_subcommand(capsys):
    out, _ = cli(capsys, "eval", "--list-tasks")
    assert "gsm8k" in out and "gsm8k.maj_k = 0" in out and "maj1@k" in out
    assert 'mbpp.split = "test"' in out
    _, err = cli(capsys, "eval", "--tasks", "boolq", code=2)
    assert err.strip() == "llamaforge eval: error: --ckpt DIR is required"
    out, _ = cli(capsys, "--help")
    assert "eval" in out and "the paper's benchmarks" in out
    out, _ = cli(capsys, "eval", "--help")
    assert "--task-option TASK.KEY=VALUE" in out


def test_task_options_are_key_value_overrides(tmp_path, capsys):
    from llamaforge.cli.eval import parse_task_options
    from llamaforge.eval.tasks import get_task

    opts = parse_task_options(
        [
            "gsm8k.maj_k=8",
            "gsm8k.temperature=1",
            "mmlu.subjects=anatomy,virology",
            "humaneval.ks=[1, 10]",
            "humaneval.setting=pass@100",
            "realtoxicityprompts.variants=basic",
        ]
    )
    assert opts["gsm8k"] == {"maj_k": 8, "temperature": 1}
    assert opts["mmlu"] == {"subjects": "anatomy,virology"}
    gsm = get_task("gsm8k", **opts["gsm8k"])
    assert gsm.opt.maj_k == 8 and gsm.opt.temperature == 1.0
    assert isinstance(gsm.opt.temperature, float)
    assert get_task("mmlu", **opts["mmlu"]).opt.subjects == ["anatomy", "virology"]
    he = get_task("humaneval", **opts["humaneval"])
    assert he.opt.ks == [1, 10] and he.opt.n == 100
    assert get_task("realtoxicityprompts", **opts["realtoxicityprompts"]).opt.variants == ["basic"]
    from llamaforge.eval.base import EvalError

    with pytest.raises(EvalError, match=r"task humaneval.setting: expected 'pass@1' \| 'pass@100'"):
        get_task("humaneval", **parse_task_options(["humaneval.setting=pass@7"])["humaneval"])
    with pytest.raises(EvalError, match=r"task gsm8k: unknown key\(s\) \['k'\]"):
        get_task("gsm8k", **parse_task_options(["gsm8k.k=8"])["gsm8k"])
    with pytest.raises(ValueError, match="expected TASK.KEY=VALUE"):
        parse_task_options(["maj_k=8"])
    # on the command line: a bad option fails before any checkpoint is loaded
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    args = ("eval", "--ckpt", ckpt, "--tasks", "gsm8k", "--data-dir", tmp_path)
    _, err = cli(capsys, *args, "--task-option", "gsm8k.maj_k=many", code=2)
    assert "llamaforge eval: error: task gsm8k.maj_k: expected int, got 'many'" in err


# ----------------------------------------------------------------------------- the mapping


def test_one_error_mapping(monkeypatch, capsys):
    import llamaforge.training.metrics as metrics
    from llamaforge.config import ConfigError
    from llamaforge.data.base import DataError

    class TrainingError(RuntimeError):
        exit_code = 1

    raised: list[BaseException] = []

    def fake_plot(run_dir, out=None):
        raise raised[0]

    monkeypatch.setattr(metrics, "plot_run", fake_plot)
    for exc, code in [
        (ConfigError("bad key"), 2),
        (DataError("bad data"), 2),
        (FileNotFoundError("x: missing"), 2),
        (PermissionError("x: denied"), 2),
        (TrainingError("loss diverged"), 1),
        (KeyboardInterrupt(), 130),
    ]:
        raised[:] = [exc]
        _, err = cli(capsys, "plot", "run", code=code)
        assert err.count("\n") == 1 and err.startswith("llamaforge plot: ")
        assert "interrupted" in err if code == 130 else f"error: {exc}" in err
    raised[:] = [RuntimeError("a bug")]  # not a usage error: a traceback, not an exit code
    with pytest.raises(RuntimeError, match="a bug"):
        main(["plot", "run"])


def test_help_shows_field_docs(capsys):
    import argparse
    from dataclasses import dataclass
    from typing import Literal

    from llamaforge.cli.help import add_config_help
    from llamaforge.config import setting

    @dataclass
    class Demo:
        dtype: Literal["fp32", "bf16"] = setting("fp32", "compute precision")
        steps: int = setting(100, "optimizer steps")

    p = argparse.ArgumentParser(prog="demo", description="A demo.", add_help=False)
    add_config_help(p, lambda: Demo)
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    out = capsys.readouterr().out
    assert 'dtype = "fp32"  # compute precision' in out and "steps = 100     # optimizer" in out
    # the real commands: the settings of their config class, with docs where fields have them
    out, _ = cli(capsys, "init", "--help")
    assert "ModelArgs" in out and "max_seq_len = 2048" in out
    out, _ = cli(capsys, "pretrain", "--help")
    assert "Settings and defaults" in out and "model.preset" in out
    assert "--resume" in out and "same as resume=" in out
    out, _ = cli(capsys, "eval", "--list-tasks")
    assert re.search(r"mmlu.subjects = null +# evaluate only these subjects", out)


def test_pretrain_without_prepared_data_says_how_to_prepare_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "data").mkdir(parents=True)
    (tmp_path / "configs" / "data" / "mine.toml").write_text('output = "data/mine"\n')
    _, err = cli(capsys, "pretrain", "data.dir=data/mine", "data.tokenizer=data/mine/t.model",
                 "device=cpu", code=2)  # fmt: skip
    assert len(err.strip().splitlines()) == 1, err
    assert "data/mine/mixture.json: not found (the prepared data)" in err
    assert "`llamaforge data prepare configs/data/mine.toml`" in err
    (tmp_path / "data" / "mine").mkdir(parents=True)
    (tmp_path / "data" / "mine" / "mixture.json").write_text("{}")
    _, err = cli(capsys, "pretrain", "data.dir=data/mine", "data.tokenizer=data/mine/t.model",
                 "device=cpu", code=2)  # fmt: skip
    assert "data/mine/t.model: not found (the tokenizer)" in err
    assert "llamaforge data prepare configs/data/mine.toml" in err


def test_pretrain_flags_are_override_aliases(monkeypatch, tmp_path):
    import llamaforge.training.pretrain as pretrain

    seen = []
    monkeypatch.setattr(pretrain, "run_pretrain", lambda cfg: seen.append(cfg) or {})
    config = tmp_path / "c.toml"
    config.write_text("steps = 2\nout = 'runs/c'\n")
    argv = ["pretrain", str(config), "steps=3", "--resume", "none", "--out", "runs/x"]
    assert main(argv) == 0
    assert main(["pretrain", "--out", "runs/y", "out=runs/z", "steps=4"]) == 0
    assert [(c.steps, c.resume, c.out) for c in seen] == [
        (3, "none", "runs/x"),
        (4, "auto", "runs/y"),
    ]


# ----------------------------------------------------------------------------- README numbers


def test_readme_info_example_is_the_commands_output(capsys):
    readme = (REPO / "README.md").read_text()
    block = readme.split("```console\n$ llamaforge info --preset 7B\n", 1)[1].split("```", 1)[0]
    out, _ = cli(capsys, "info", "--preset", "7B")
    assert out == block


def test_tiny_cpu_config_size_as_documented():
    """README and configs/pretrain/tiny-cpu.toml: 737,856 parameters (0.74M)."""
    from llamaforge.config import load_config
    from llamaforge.training.flops import count_params
    from llamaforge.training.pretrain import PretrainConfig
    from llamaforge.training.trainer import model_args

    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "tiny-cpu.toml", [])
    args = model_args(cfg, 4096, cfg.data.seq_len)  # configs/data/stdlib.toml: 4096 pieces
    assert count_params(args)["total"] == 737_856
    assert "737,856" in (REPO / "configs" / "pretrain" / "tiny-cpu.toml").read_text()
    assert "737,856 parameters" in (REPO / "README.md").read_text()


# ----------------------------------------------------------------------------- missing extras

# (the module made unimportable, the program, its arguments, the extra to name)
EXTRA_CASES = [
    ("uvicorn", "llamaforge serve", "--ckpt {ckpt}", "serve"),  # imported before fastapi
    ("fastapi", "llamaforge serve", "--ckpt {ckpt}", "serve"),
    ("gguf", "llamaforge convert", "--from native --to gguf {ckpt} {tmp}/m.gguf", "convert"),
    ("datatrove", "llamaforge data prepare", "{data} --tasks 1 --quiet", "data"),
    ("ray", "llamaforge data prepare", "{data} --executor ray --tasks 1", "ray"),
    ("lm_eval", "llamaforge-lm-eval", "--help", "eval"),
]

# run in a fresh interpreter: a meta-path finder makes one module unimportable (as if its
# package were not installed), then the real command runs; prints [status, stderr] per case
BLOCKED_RUN = """
import contextlib, io, json, sys
from llamaforge.cli.main import lm_eval_main, main

class Missing:
    name = None
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] == self.name:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None

finder = Missing()
sys.meta_path.insert(0, finder)
results = []
for module, program, args in json.loads(sys.argv[1]):
    finder.name, err = module, io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        if program == "llamaforge-lm-eval":
            status = lm_eval_main(args)
        else:
            status = main(program.split()[1:] + args)
    results.append([status, err.getvalue()])
print(json.dumps(results))
"""


def test_a_missing_extra_is_one_line_naming_it(tmp_path, small_tokenizer_path):
    """Each command whose optional package is not installed says which extra to install,
    in one line (exit 2), whichever module of the extra is missing."""
    import llamaforge
    from llamaforge.model import ModelArgs, build_model
    from llamaforge.tokenizer import Tokenizer

    tok = Tokenizer(small_tokenizer_path)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, max_seq_len=32)
    ckpt = llamaforge.save(build_model(args), tok, tmp_path / "ckpt")
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"text": f"Note {i}: the quick brown fox."}) + "\n" for i in range(50))
    )
    data = tmp_path / "data.toml"
    data.write_text(
        f'tokenizer = "{small_tokenizer_path}"\noutput = "{tmp_path / "out"}"\n'
        f'[[sources]]\nname = "notes"\nkind = "generic"\npaths = ["{tmp_path / "docs.jsonl"}"]\n'
    )
    fill = {"ckpt": ckpt, "tmp": tmp_path, "data": data}
    results = []
    for module, program, argv, _ in EXTRA_CASES:
        # one process per case: a module another case imported stays in sys.modules, where
        # the blocking finder cannot hide it (the server would then start and serve)
        case = [[module, program, argv.format(**fill).split()]]
        proc = subprocess.run(
            [sys.executable, "-c", BLOCKED_RUN, json.dumps(case)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO / "src")},
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results += json.loads(proc.stdout)
    for (module, program, _, extra), (status, err) in zip(EXTRA_CASES, results, strict=True):
        assert status == 2 and "Traceback" not in err, (module, err)
        assert err.strip().splitlines()[-1] == (
            f"{program}: error: this command needs the '{extra}' extra (no module named "
            f"{module}): pip install 'llamaforge[{extra}]'"
        ), err


def test_the_extras_come_from_pyproject():
    """The module → extra table is pyproject.toml's [project.optional-dependencies]; a module
    in several extras goes with the command's own."""
    from llamaforge.cli.main import missing_extra, optional_dependencies
    from llamaforge.config import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = optional_dependencies()
    assert set(extras) == set(project["optional-dependencies"])
    assert "llamaforge" not in {d.lower() for dists in extras.values() for d in dists}

    def extra(module: str, command: str = "") -> str | None:
        return missing_extra(ModuleNotFoundError(f"No module named {module!r}", name=module),
                             command)  # fmt: skip

    assert [extra(m) for m in ("fastapi", "uvicorn", "prometheus_client")] == ["serve"] * 3
    assert [extra(m) for m in ("gguf", "google.protobuf", "tokenizers")] == ["convert"] * 3
    assert [extra(m) for m in ("datatrove", "datasketch", "sklearn.utils")] == ["data"] * 3
    assert (extra("ray"), extra("lm_eval"), extra("llama_cpp")) == ("ray", "eval", "bench-serve")
    assert extra("datasets", "eval") == "eval" and extra("datasets", "data prepare") == "data"
    assert extra("no_such_package") is None and extra("llamaforge.nothing") is None
    assert missing_extra(ImportError("cannot import name 'x'", name="fastapi")) is None


# ----------------------------------------------------------------------------- the next step


def test_pretrain_command_is_the_quickest_config_beside_the_data_config():
    from llamaforge.cli.train import pretrain_command

    stdlib = pretrain_command(
        "data/stdlib", "data/stdlib/tokenizer.model", REPO / "configs/data/stdlib.toml"
    )
    assert stdlib == f"llamaforge pretrain {(REPO / 'configs/pretrain/tiny-cpu.toml').as_posix()}"
    shared = pretrain_command(
        "data/shared", "../shared/data/tokenizer/llama/tokenizer.model", "configs/data/shared.toml"
    )
    assert shared == "llamaforge pretrain configs/pretrain/llama-110M-1gpu.toml"  # of 5 configs
    mine = pretrain_command("my data", "my data/t.model", "elsewhere/data.toml")
    assert mine.startswith("llamaforge pretrain 'data.dir=my data' 'data.tokenizer=my data/t.")


@pytest.mark.slow
def test_data_prepare_then_pretrain_then_generate_as_printed(
    tmp_path, small_tokenizer_path, capsys
):
    """Each command ends with `next: COMMAND` for what it made, and that command runs:
    data prepare → pretrain (here with a tiny model and 2 steps added) → generate."""
    from .conftest import run_next

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(
        json.dumps({"text": f"Note {i}: the quick brown fox jumps over the lazy dog {i % 7}."})
        + "\n" for i in range(400)
    ))  # fmt: skip
    data = tmp_path / "data.toml"
    data.write_text(
        f'tokenizer = "{small_tokenizer_path}"\noutput = "{tmp_path / "out"}"\n'
        f'[[sources]]\nname = "notes"\nkind = "generic"\npaths = ["{docs}"]\n'
    )
    out, _ = cli(capsys, "data", "prepare", data, "--quiet")
    assert out.strip().splitlines()[-1].startswith("next: llamaforge pretrain data.dir=")
    tiny = ["steps=2", "batch_tokens=256", "micro_batch=4", "data.seq_len=64", "model.dim=32",
            "model.n_layers=1", "model.n_heads=2", "eval_batches=0", "device=cpu", "plot=false",
            f"out={tmp_path / 'run'}"]  # fmt: skip
    pretrained = run_next(out, *tiny).stderr  # the run's summary goes to stderr
    last = pretrained.strip().splitlines()[-1]
    assert last == f"next: llamaforge generate --ckpt {tmp_path / 'run' / 'model'} --prompt The"
    generated = run_next(pretrained, "--max-new-tokens", "8", "--device", "cpu").stdout
    assert generated.strip()


@pytest.mark.slow
def test_convert_prints_a_command_that_runs_the_result(tmp_path, small_tokenizer, capsys):
    import llamaforge
    from llamaforge.chat_templates import LLAMA2
    from llamaforge.model import ModelArgs, build_model

    from .conftest import run_next

    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=small_tokenizer.vocab_size,
                     multiple_of=16, max_seq_len=128)  # fmt: skip
    model = build_model(args)
    src = llamaforge.save(model, small_tokenizer, tmp_path / "src", chat_template=LLAMA2)
    out, _ = cli(capsys, "convert", "--from", "native", "--to", "native", src, tmp_path / "n")
    assert out.strip().splitlines()[-1] == f"next: llamaforge chat --ckpt {tmp_path / 'n'}"
    assert run_next(out, "--device", "cpu", input="hello\n").stdout.strip()
    out, _ = cli(capsys, "convert", "--from", "native", "--to", "hf", src, tmp_path / "hf")
    assert out.strip().splitlines()[-1].startswith("next: python -c 'from transformers import")
    assert run_next(out).stdout.strip()
    out, _ = cli(capsys, "convert", "--from", "native", "--to", "gguf", src, tmp_path / "m.gguf")
    assert out.strip().splitlines()[-1] == (
        f"next: llama-cli -m {tmp_path / 'm.gguf'} -p The -n 32  # llama.cpp"
    )


@pytest.mark.slow
def test_finetune_with_an_unmerged_adapter_prints_merge_then_chat(
    tmp_path, small_tokenizer_path, capsys
):
    """LoRA without lora.merge leaves an adapter: the printed next step merges it into the
    base, then chats with the template it was trained with; both commands run."""
    from .conftest import run_next

    base = tmp_path / "base"
    cli(capsys, "init", "--preset", "1M", "--tokenizer", small_tokenizer_path, "--out", base,
        "dim=32", "n_layers=1", "n_heads=2", "max_seq_len=128")  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("".join(
        json.dumps({"instruction": f"Say {w}.", "input": "", "output": w}) + "\n"
        for w in "red green blue black white yellow brown pink".split() * 3
    ))  # fmt: skip
    _, err = cli(capsys, "finetune", f"init={base}", f"data.paths=['{data}']", "data.max_len=128",
                 "batch_size=4", "micro_batch=4", "steps=2", "gen_eval=0", "eval_batches=0",
                 "lora.enabled=true", "lora.rank=2", "device=cpu", "progress=false",
                 f"--out={tmp_path / 'ft'}")  # fmt: skip
    merged, adapter = tmp_path / "ft" / "merged", tmp_path / "ft" / "adapter"
    last = err.strip().splitlines()[-1]
    assert last == (
        f"next: llamaforge lora merge {base} {adapter} {merged} && "
        f"llamaforge chat --ckpt {merged} --template alpaca"
    )
    merge, chat = last.split(" && ")
    run_next(merge)
    assert run_next("next: " + chat, "--device", "cpu", input="Say red.\n").stdout.strip()
