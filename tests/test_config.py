from dataclasses import dataclass, field
from typing import Literal

import pytest

from llamaforge.config import (
    ConfigError,
    apply_overrides,
    describe,
    from_dict,
    help_text,
    load_config,
    setting,
    to_dict,
)


@dataclass
class Inner:
    dim: int = 64
    eps: float = 1e-6
    kv: int | None = None


@dataclass
class Outer:
    name: str = "run"
    lr: float = 3e-4
    compile: bool = False
    model: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_toml_then_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "x"\nlr = 1\ntags = ["a"]\n[model]\ndim = 128\n')
    cfg = load_config(Outer, p, ["model.eps=1e-5", "compile=true", "name=runs/a", "model.kv=2"])
    assert cfg.name == "runs/a" and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.model == Inner(dim=128, eps=1e-5, kv=2) and cfg.compile is True
    assert to_dict(cfg)["model"]["dim"] == 128


def test_errors_name_the_key_and_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[model]\ndimm = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml.model: unknown key\(s\) \['dimm'\]"):
        load_config(Outer, p)
    with pytest.raises(ConfigError, match="model.dim"):
        apply_overrides(Outer(), ["model.dim=abc"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(Outer(), ["lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.toml")
    (tmp_path / "broken.toml").write_text("lr = = 3")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(Outer, tmp_path / "broken.toml")
    with pytest.raises(ConfigError, match="compile"):
        apply_overrides(Outer(), ["compile=3"])


@dataclass
class Choices:
    dtype: Literal["auto", "fp32", "bf16"] = setting("auto", "compute precision")
    level: Literal[1, 2] = setting(1, "a numeric choice")
    modes: list[Literal["a", "b"]] = setting(doc="several choices", factory=lambda: ["a"])
    note: str | None = None


def test_literal_coercion():
    cfg = apply_overrides(Choices(), ["dtype=bf16", "level=2", 'modes=["b", "a"]'])
    assert (cfg.dtype, cfg.level, cfg.modes) == ("bf16", 2, ["b", "a"])
    with pytest.raises(ConfigError) as err:
        apply_overrides(Choices(), ["dtype=fp16"])
    assert "dtype" in str(err.value) and "'fp16'" in str(err.value)
    assert "'auto', 'fp32', 'bf16'" in str(err.value)
    with pytest.raises(ConfigError, match="level: True is not one of"):
        from_dict(Choices, {"level": True}, where="c.toml")
    with pytest.raises(ConfigError, match=r"modes\[1\]: 'c' is not one of"):
        from_dict(Choices, {"modes": ["a", "c"]})


def test_unknown_keys_list_the_allowed_ones():
    with pytest.raises(ConfigError, match="src: unknown key.*'dtyp'.*allowed: dtype, level"):
        from_dict(Choices, {"dtyp": "x"}, where="src")


def test_describe_and_help_text_show_docs_next_to_defaults():
    lines = describe(Choices())
    assert any(
        ln.startswith('dtype = "auto"') and ln.endswith("# compute precision") for ln in lines
    )
    assert "note = null" in lines  # no doc: no comment
    assert describe(Outer())[3] == "model.dim = 64"  # nested keys dotted
    text = help_text(Choices, intro="Settings:")
    assert text.splitlines()[0] == "Settings:"
    assert '  modes = ["a"]' in text and "# several choices" in text
