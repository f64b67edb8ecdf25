from dataclasses import dataclass, field

import pytest

from llamaforge.config import ConfigError, apply_overrides, load_config, to_dict


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
