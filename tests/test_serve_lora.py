"""LoRA adapters served by name (serve/adapters.py) over a real trained model (llama2.c's
aidreams260K): greedy text through an adapter equals the ``lora merge`` checkpoint's, alone
and in one batched forward mixing two adapters (different ranks and targets, the output
layer among them) and the base; the prefix cache never crosses from the base to an
adapter; an adapter for another base is refused naming both hashes; unloading waits for no
one (409 while in use); client paths stay inside --lora-dir; an int8 base keeps working;
and the HTTP side (a real ``llamaforge serve`` process and the ``openai`` client): /v1/models
with ``parent``, 404s, and the load/unload endpoints behind the API key."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import openai
import pytest
import torch
from torch import nn

import llamaforge
from llamaforge.checkpoint.native import read_params, recorded_weights_sha256
from llamaforge.finetune.lora import (
    LoraConfig,
    LoraError,
    apply_lora,
    lora_modules,
    save_adapter,
)
from llamaforge.finetune.merge import merge_adapter
from llamaforge.inference.generate import generate_completions
from llamaforge.inference.quantize import quantize_int8
from llamaforge.model import Transformer
from llamaforge.serve.adapters import (
    AdapterForbidden,
    AdapterInUse,
    AdapterNotFound,
    AdapterRegistry,
    MultiLoraLinear,
)
from llamaforge.serve.engine import Engine, SamplingParams

from .test_serve import ServerProcess
from .test_serve_engine import _one_thread, l2c_ckpt  # noqa: F401  (fixtures)

PROMPTS = ["Once upon a time", "The little dog", "In a land far away, there lived a king"]
N = 24  # tokens generated per request
KEY = "sk-test-lora"


def make_adapter(base: Path, out: Path, cfg: LoraConfig, seed: int, scale: float = 0.1) -> Path:
    """A PEFT adapter for ``base`` as ``finetune`` saves one, with random non-zero A and B."""
    with torch.device("meta"):
        model = Transformer(read_params(base)[0])
    apply_lora(model, cfg)
    g = torch.Generator().manual_seed(seed)
    for _, m in lora_modules(model):
        for lin in (m.lora_A, m.lora_B):
            lin.weight = nn.Parameter(torch.randn(lin.weight.shape, generator=g) * scale)
    return save_adapter(model, out, cfg, base=base)


@pytest.fixture(scope="module")
def made(l2c_ckpt, tmp_path_factory):  # noqa: F811
    """Two adapters of the base (rank 4 on every block layer; rank 8 on wq, wv and the
    output layer) in an allowed folder, their merged checkpoints, and an adapter made for
    another base (the same architecture, other weights)."""
    root = tmp_path_factory.mktemp("lora")
    allowed = root / "allowed"
    a1 = make_adapter(l2c_ckpt, allowed / "a1", LoraConfig(rank=4, targets="all"), seed=1)
    cfg2 = LoraConfig(rank=8, alpha=8.0, targets=["wq", "wv", "output"])
    a2 = make_adapter(l2c_ckpt, allowed / "a2", cfg2, seed=2)
    model, tok = llamaforge.load(l2c_ckpt)
    with torch.no_grad():
        model.layers[0].attention.wq.weight.add_(0.01)
    other = llamaforge.save(model, tok, root / "other_base")
    foreign = make_adapter(other, allowed / "foreign", LoraConfig(rank=4), seed=3)
    return {
        "allowed": allowed,
        "a1": a1,
        "a2": a2,
        "foreign": foreign,
        "other": other,
        "m1": merge_adapter(l2c_ckpt, a1, root / "m1"),
        "m2": merge_adapter(l2c_ckpt, a2, root / "m2"),
    }


@pytest.fixture(scope="module")
def expected(l2c_ckpt, made):  # noqa: F811
    """Greedy text of every prompt by the base and by each merged checkpoint, generated
    alone (``generate_completions``)."""
    out = {}
    for name, path in (("base", l2c_ckpt), ("a1", made["m1"]), ("a2", made["m2"])):
        model, tok = llamaforge.load(path)
        done = generate_completions(model, tok, PROMPTS, max_new_tokens=N, temperature=0.0)
        out[name] = [c.text for c in done]
    assert out["a1"] != out["base"] and out["a2"] != out["base"]  # the adapters matter
    return out


def served(ckpt: Path, made: dict, *names: str, **engine_kw) -> tuple[Engine, AdapterRegistry]:
    """An engine over ``ckpt`` with the adapters ``names`` loaded (as --lora does)."""
    model, tok = llamaforge.load(ckpt)
    registry = AdapterRegistry(model, base_dir=ckpt, allowed_dirs=[made["allowed"]])
    for name in names:
        registry.load(name, made[name], confined=False)
    return Engine(model, tok, adapters=registry, **engine_kw), registry


def run(engine: Engine, jobs: list[tuple[str, str | None]]) -> list[str]:
    """Greedy text of each (prompt, adapter) job, all submitted at once, the engine stepped
    in this thread until every one has finished."""
    outs: list[list] = [[] for _ in jobs]
    params = SamplingParams(max_tokens=N, temperature=0.0)
    for i, (prompt, adapter) in enumerate(jobs):
        ids = engine.tokenizer.encode(prompt, bos=True)
        engine.submit(ids, params, outs[i].append, adapter=adapter)
    for _ in range(10_000):
        engine._drain()
        if all(o and o[-1].finished for o in outs):
            break
        engine.step()
    assert all(o and o[-1].finished and o[-1].error is None for o in outs), outs
    return ["".join(x.text for x in o) for o in outs]


def test_adapter_text_equals_the_merged_checkpoint_alone(l2c_ckpt, made, expected):  # noqa: F811
    engine, _ = served(l2c_ckpt, made, "a1", "a2")
    for name in ("a1", "a2"):
        for i, prompt in enumerate(PROMPTS):
            assert run(engine, [(prompt, name)]) == [expected[name][i]]
    assert run(engine, [(PROMPTS[0], None)]) == [expected["base"][0]]
    assert engine.blocks.used == 0


def test_one_batch_mixes_two_adapters_and_the_base(l2c_ckpt, made, expected):  # noqa: F811
    engine, registry = served(l2c_ckpt, made, "a1", "a2", max_batch=9, block_size=4)
    seen: list[tuple[int, list[int]]] = []  # each forward: its rows, and the adapted rows' slots

    def record(_module, args) -> None:
        b = registry.batch
        seen.append((args[0].shape[0], b.slots.tolist() if b.slots is not None else []))

    engine.model.register_forward_pre_hook(record)
    jobs = [(p, name) for p in PROMPTS for name in (None, "a1", "a2")]
    texts = run(engine, jobs)
    for (prompt, name), text in zip(jobs, texts):
        assert text == expected[name or "base"][PROMPTS.index(prompt)], (prompt, name)
    slots = {n: a.slot for n, a in ((a.name, a) for a in registry.adapters())}
    mixed = sorted([slots["a1"]] * 3 + [slots["a2"]] * 3)
    assert (9, mixed) in [(n, sorted(s)) for n, s in seen]  # 9 rows, 3 of them the base
    # the layers the adapters target are wrapped, the others left as they were
    assert isinstance(engine.model.layers[0].feed_forward.w2, MultiLoraLinear)
    assert isinstance(engine.model.output, MultiLoraLinear)
    assert registry.rank == 8  # rank 4 padded to 8 in the stacks


def test_speculative_decoding_with_a_base_draft_keeps_the_adapters_text(
    l2c_ckpt,  # noqa: F811
    made,
    expected,
):
    """The draft (no adapter) proposes, the adapted model verifies k+1 positions per row."""
    draft, _ = llamaforge.load(l2c_ckpt)
    engine, _ = served(l2c_ckpt, made, "a1", "a2", draft=draft, draft_k=3, max_batch=6)
    jobs = [(p, name) for p in PROMPTS[:2] for name in (None, "a1", "a2")]
    texts = run(engine, jobs)
    for (prompt, name), text in zip(jobs, texts):
        assert text == expected[name or "base"][PROMPTS.index(prompt)], (prompt, name)
    assert engine.stats.spec_drafted > 0


def test_the_prefix_cache_is_not_shared_across_adapters(l2c_ckpt, made, expected):  # noqa: F811
    engine, registry = served(l2c_ckpt, made, "a1", block_size=4)
    long = PROMPTS[2]  # 10 tokens: two full blocks to share
    i = PROMPTS.index(long)
    assert run(engine, [(long, None)]) == [expected["base"][i]]
    hits = engine.blocks.hits
    assert run(engine, [(long, "a1")]) == [expected["a1"][i]]
    assert engine.blocks.hits == hits  # nothing taken from the base's blocks
    assert run(engine, [(long, "a1")]) == [expected["a1"][i]]
    assert engine.blocks.hits > hits  # but an adapter shares its own
    # the same name loaded again with other weights: a new key, none of the old blocks
    registry.unload("a1")
    registry.load("a1", made["a2"], confined=False)
    hits = engine.blocks.hits
    assert run(engine, [(long, "a1")]) == [expected["a2"][i]]
    assert engine.blocks.hits == hits


def test_loading_while_requests_run_changes_none_of_them(l2c_ckpt, made, expected):  # noqa: F811
    """a2 loads (wrapping the output layer, which a1 leaves alone, and growing every stack
    to rank 8) while the engine's thread decodes a1 and base requests: none fails or
    changes; a2's requests then run as its merged checkpoint."""
    import threading

    engine, registry = served(l2c_ckpt, made, "a1", max_batch=6)
    engine.start()
    try:
        outs: list[list] = [[] for _ in range(6)]
        done = threading.Event()
        params = SamplingParams(max_tokens=N, temperature=0.0)

        def emit(i: int):
            def put(out) -> None:
                outs[i].append(out)
                if all(o and o[-1].finished for o in outs):
                    done.set()

            return put

        jobs = [(p, name) for p in PROMPTS[:3] for name in (None, "a1")]
        for i, (prompt, name) in enumerate(jobs):
            ids = engine.tokenizer.encode(prompt, bos=True)
            engine.submit(ids, params, emit(i), adapter=name)
        registry.load("a2", made["a2"], confined=False)
        assert done.wait(120)
        for (prompt, name), o in zip(jobs, outs):
            assert o[-1].error is None, o[-1].error
            text = "".join(x.text for x in o)
            assert text == expected[name or "base"][PROMPTS.index(prompt)], (prompt, name)
    finally:
        engine.stop()
    again = Engine(engine.model, engine.tokenizer, adapters=registry)
    assert run(again, [(PROMPTS[1], "a2")]) == [expected["a2"][1]]


def test_an_adapter_for_another_base_is_refused_naming_both_hashes(l2c_ckpt, made):  # noqa: F811
    _, registry = served(l2c_ckpt, made)
    with pytest.raises(LoraError) as e:
        registry.load("foreign", made["foreign"], confined=False)
    assert recorded_weights_sha256(made["other"]) in str(e.value)
    assert recorded_weights_sha256(l2c_ckpt) in str(e.value)
    assert "foreign" not in registry and not registry.adapters()


def test_unloading_an_adapter_in_use_is_refused_until_its_requests_end(l2c_ckpt, made):  # noqa: F811
    engine, registry = served(l2c_ckpt, made, "a1")
    outs: list = []
    ids = engine.tokenizer.encode(PROMPTS[0], bos=True)
    engine.submit(ids, SamplingParams(max_tokens=N, temperature=0.0), outs.append, adapter="a1")
    with pytest.raises(AdapterInUse, match="in use by 1 request"):
        registry.unload("a1")
    while not (outs and outs[-1].finished):
        engine._drain()
        engine.step()
    slot = registry.unload("a1").slot
    with pytest.raises(AdapterNotFound):
        engine.submit(ids, SamplingParams(max_tokens=1), outs.append, adapter="a1")
    assert registry.load("again", made["a2"], confined=False).slot == slot  # slot reused
    # a cancelled request lets go of its adapter too
    rid = engine.submit(ids, SamplingParams(max_tokens=N), outs.append, adapter="again")
    engine._drain()
    engine.step()
    engine.cancel(rid)
    engine._drain()
    registry.unload("again")


def test_client_paths_stay_inside_the_allowed_folders(l2c_ckpt, made, tmp_path):  # noqa: F811
    _, registry = served(l2c_ckpt, made)
    outside = tmp_path / "outside"
    shutil.copytree(made["a1"], outside)
    allowed = made["allowed"]
    for path in (str(outside), "../outside", str(allowed / ".." / "m1"), "/etc"):
        with pytest.raises(AdapterForbidden, match="outside the directories"):
            registry.load("x", path)
    link = allowed / "link"
    link.symlink_to(outside, target_is_directory=True)  # a symlink out of the folder
    sneaky = allowed / "sneaky"
    sneaky.mkdir()
    (sneaky / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    try:
        for path in ("link", str(sneaky)):
            with pytest.raises(AdapterForbidden):
                registry.load("x", path)
    finally:
        link.unlink()
        shutil.rmtree(sneaky)
    with pytest.raises(AdapterNotFound, match="no such adapter directory"):
        registry.load("x", "missing")
    assert registry.load("x", "a1").path == made["a1"].resolve()  # relative to --lora-dir
    closed = AdapterRegistry(registry.model)  # no --lora-dir: nothing loads at run time
    with pytest.raises(AdapterForbidden, match="--lora-dir"):
        closed.load("y", str(made["a1"]))


def test_an_int8_base_serves_adapters_and_leaves_base_rows_alone(l2c_ckpt, made):  # noqa: F811
    model, tok = llamaforge.load(l2c_ckpt)
    quantize_int8(model)
    alone = run(Engine(model, tok), [(p, None) for p in PROMPTS])
    registry = AdapterRegistry(model, base_dir=l2c_ckpt)
    registry.load("a1", made["a1"], confined=False)
    engine = Engine(model, tok, adapters=registry)
    texts = run(engine, [(p, name) for p in PROMPTS for name in (None, "a1")])
    assert texts[0::2] == alone
    assert texts[1::2] != alone


# -- over HTTP ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(l2c_ckpt, made):  # noqa: F811
    srv = ServerProcess(
        "--ckpt",
        str(l2c_ckpt),
        "--lora",
        f"a1={made['a1']}",
        "--lora-dir",
        str(made["allowed"]),
        "--api-key",
        KEY,
    )
    yield srv
    srv.stop()


def test_http_models_names_and_the_load_endpoints(server, made, expected):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    base = "aidreams260K"
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {base, "a1"}
    assert models["a1"].parent == base and models[base].parent is None  # type: ignore[attr-defined]
    assert client.models.retrieve("a1").parent == base  # type: ignore[attr-defined]

    def greedy(model: str, i: int = 0) -> openai.types.Completion:
        return client.completions.create(
            model=model, prompt=PROMPTS[i], max_tokens=N, temperature=0.0
        )

    answer = greedy("a1", 1)
    assert answer.choices[0].text == expected["a1"][1] and answer.model == "a1"
    assert greedy(base, 1).choices[0].text == expected["base"][1]
    with pytest.raises(openai.NotFoundError) as e:
        greedy("nope")
    assert e.value.body["code"] == "model_not_found" and "'a1'" in e.value.body["message"]

    url = f"{server.url}/v1"
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"lora_name": "a2", "lora_path": "a2"}
    assert httpx.post(f"{url}/load_lora_adapter", json=body).status_code == 401
    r = httpx.post(f"{url}/load_lora_adapter", json=body, headers=auth, timeout=60)
    assert r.status_code == 200 and r.json()["parent"] == base
    assert greedy("a2", 2).choices[0].text == expected["a2"][2]
    refusals = [
        ({"lora_name": "a2", "lora_path": "a1"}, 409, "already loaded"),
        ({"lora_name": "a3", "lora_path": str(made["m1"])}, 403, "outside the directories"),
        ({"lora_name": "a3", "lora_path": "foreign"}, 400, recorded_weights_sha256(made["other"])),
        ({"lora_name": "a/3", "lora_path": "a1"}, 400, "adapter name"),
        ({"lora_name": "a3"}, 400, "lora_path"),
    ]
    for req, status, text in refusals:
        r = httpx.post(f"{url}/load_lora_adapter", json=req, headers=auth, timeout=60)
        assert r.status_code == status and text in r.json()["error"]["message"], (req, r.text)
    assert httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 401
    r = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "a2"}, headers=auth)
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        greedy("a2")
    r = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "a2"}, headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert {m.id for m in client.models.list().data} == {base, "a1"}
    assert greedy("a1", 1).choices[0].text == expected["a1"][1]  # still serving
    assert os.path.isdir(made["a2"])  # nothing a client did touched the files
