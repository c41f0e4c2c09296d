"""Experiment config: every shipped YAML loads, every validation rule raises a message naming the field,
round trips, ``--set`` overrides, ``flatten`` and ``field_exists``."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import annotated_types
import pytest
import yaml
from pydantic import BaseModel

from ray_jobs.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    field_exists,
    flatten,
    load_config,
    load_yaml,
    parse_override,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for ext in ("*.yaml", "*.yml") for p in (REPO / "configs").rglob(ext))


def base() -> dict[str, Any]:
    """A small valid experiment dict (3 domains, one of them no evaluation target)."""
    return {
        "name": "t",
        "data": {
            "domains": [
                {"name": "code", "source": {"paths": ["a.jsonl"]}},
                {"name": "prose", "source": {"paths": ["b/*.txt"]}},
                {"name": "junk", "target": False, "source": {"paths": ["c.jsonl"]}},
            ]
        },
    }


def build(*overrides: str, data: dict[str, Any] | None = None) -> ExperimentConfig:
    return ExperimentConfig.from_dict(apply_overrides(data or base(), list(overrides)))


def raises(*overrides: str, match: str, data: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        build(*overrides, data=data)
    return str(info.value)


# ------------------------------------------------------------------------------------------------ presets
def test_configs_directory_has_presets():
    assert any(p.name == "demo.yaml" for p in SHIPPED), SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert cfg.data.num_domains == len(cfg.data.domain_names) >= 2
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


def test_round_trip_with_non_default_sections(tmp_path):
    data = base()
    data["data"]["domains"][1]["source"] = {
        "kind": "hf",
        "hf_path": "parquet",
        "hf_data_files": ["pile.parquet"],
        "filter_column": "meta.pile_set_name",
        "filter_value": "Pile-CC",
    }
    cfg = build(
        "agent.kind=fixed",
        "agent.weights={code: 2, prose: 1, junk: 0}",
        "optim.betas=[0.8, 0.99]",
        "tune.param_space={agent.gamma: {type: uniform, lower: 0.9, upper: 0.99}}",
        "lm.num_layers=3",
        data=data,
    )
    assert cfg.optim.betas == (0.8, 0.99)
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]  # no temp file left behind


def test_dimensions_derive_from_the_domain_list():
    cfg = build()
    assert cfg.data.domain_names == ["code", "prose", "junk"] and cfg.data.num_domains == 3
    data = base()
    data["data"]["domains"] = [{"name": f"d{i}", "source": {"paths": [f"{i}.txt"]}} for i in range(22)]
    assert build(data=data).data.num_domains == 22


# ------------------------------------------------------------------------------------------------ strictness
@pytest.mark.parametrize(
    ("override", "dotted"),
    [
        ("bogus=1", "bogus"),
        ("agent.gama=0.9", "agent.gama"),
        ("agent.exploration.sigma=0.1", "agent.exploration.sigma"),
        ("lm.layers=2", "lm.layers"),
        ("proxy.lm.width=3", "proxy.lm.width"),
    ],
)
def test_unknown_key_names_the_dotted_field(override, dotted):
    msg = raises(override, match="unknown key")
    assert f"  {dotted}: unknown key" in msg


def test_unknown_key_inside_a_domain_names_the_list_position():
    data = base()
    data["data"]["domains"][2]["source"]["colum"] = "text"
    raises(data=data, match=r"data\.domains\.2\.source\.colum: unknown key")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("lm.seq_len=abc", r"lm\.seq_len = 'abc': Input should be a valid integer"),
        ("lm.compile=maybe", r"lm\.compile = 'maybe': Input should be a valid boolean"),
        ("optim.lr=fast", r"optim\.lr = 'fast': Input should be a valid number"),
        ("optim.betas=[0.9]", r"optim\.betas\.1 .*Field required"),
        ("data.domains=3", r"data\.domains = 3: Input should be a valid list"),
        ("agent=3", r"agent = 3: Input should be a valid dictionary"),
        ("seed=1.5", r"seed = 1\.5: Input should be a valid integer"),
    ],
)
def test_wrong_type_names_field_value_and_expected_type(override, match):
    raises(override, match=match)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("agent.gamma=1.0", r"agent\.gamma = 1\.0: Input should be less than 1"),
        ("agent.tau=0", r"agent\.tau = 0: Input should be greater than 0"),
        ("agent.hidden_width=0", r"agent\.hidden_width = 0: Input should be greater than 0"),
        ("seed=-1", r"seed = -1: Input should be greater than or equal to 0"),
        ("data.val_fraction=0.5", r"data\.val_fraction = 0\.5: Input should be less than 0\.5"),
    ],
)
def test_out_of_range_names_field_value_and_bound(override, match):
    raises(override, match=match)


def _constrained_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted name, annotation, constraint) for every bounded field of every nested section."""
    out = []
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += _constrained_fields(info.annotation, f"{dotted}.")
        for c in info.metadata:
            if isinstance(
                c, annotated_types.Gt | annotated_types.Ge | annotated_types.Lt | annotated_types.Le
            ):
                out.append((dotted, info.annotation, c))
            elif isinstance(c, annotated_types.MinLen) and info.annotation is str:
                out.append((dotted, info.annotation, c))
    return out


def _violation(annotation: Any, c: Any) -> Any:
    integer = annotation is int or int in typing.get_args(annotation)
    step = 1 if integer else 0.5
    if isinstance(c, annotated_types.Gt):
        return c.gt
    if isinstance(c, annotated_types.Ge):
        return c.ge - step
    if isinstance(c, annotated_types.Lt):
        return c.lt
    if isinstance(c, annotated_types.Le):
        return c.le + step
    return ""  # MinLen on a string


CONSTRAINED = [(d, a, c) for d, a, c in _constrained_fields(ExperimentConfig)]


def test_constraint_walk_covers_every_section():
    sections = {d.split(".")[0] for d, _, _ in CONSTRAINED}
    assert {
        "seed",
        "name",
        "lm",
        "optim",
        "sampler",
        "train",
        "eval",
        "checkpoint",
        "env",
        "agent",
    } <= sections
    assert {"ray", "proxy", "tune", "data"} <= sections


@pytest.mark.parametrize(
    ("dotted", "annotation", "constraint"), CONSTRAINED, ids=[f"{d}:{c}" for d, _, c in CONSTRAINED]
)
def test_every_bounded_field_rejects_a_value_past_its_bound(dotted, annotation, constraint):
    value = _violation(annotation, constraint)
    data = apply_overrides(base(), [])
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict(data)
    assert f"  {dotted} = {value!r}: " in str(info.value)


def _literal_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += _literal_fields(info.annotation, f"{prefix}{name}.")
        elif typing.get_origin(info.annotation) is typing.Literal:
            out.append((f"{prefix}{name}", typing.get_args(info.annotation)))
    return out


@pytest.mark.parametrize(("dotted", "choices"), _literal_fields(ExperimentConfig))
def test_every_choice_field_lists_the_allowed_values(dotted, choices):
    msg = raises(f"{dotted}=not-a-choice", match=re.escape(f"{dotted} = 'not-a-choice'"))
    for choice in choices:
        assert repr(choice) in msg


# ------------------------------------------------------------------------------------------------ model rules
def _domains(*domains: dict[str, Any]) -> dict[str, Any]:
    data = base()
    data["data"]["domains"] = list(domains)
    return data


def _dom(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "source": kw.pop("source", {"paths": [f"{name}.jsonl"]}), **kw}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            _domains(_dom("a"), _dom("b"), _dom("a")),
            r"data = .*domain names must be unique; repeated: \['a'\]",
        ),
        (
            _domains(_dom("a", target=False), _dom("b", target=False)),
            r"at least one domain must have target: true",
        ),
        (_domains(_dom("a")), r"data\.domains = .*List should have at least 2 items"),
        (_domains(_dom("a b"), _dom("c")), r"data\.domains\.0\.name = 'a b': .*domain name 'a b' must match"),
        (
            _domains(_dom("a", source={"kind": "hf"}), _dom("b")),
            r"data\.domains\.0\.source = .*kind 'hf' needs 'hf_path'",
        ),
        (
            _domains(_dom("a"), _dom("b", source={"paths": []})),
            r"data\.domains\.1\.source = .*needs at least one",
        ),
        (
            _domains(_dom("a", source={"paths": ["x"], "filter_column": "meta.pile_set_name"}), _dom("b")),
            r"'filter_column' and 'filter_value' must be given together",
        ),
        (_domains(_dom("a", source={"paths": ["x"], "text_field": ""}), _dom("b")), r"text_field = ''"),
    ],
)
def test_data_rules(data, match):
    raises(data=data, match=match)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["agent.kind=fixed", "agent.weights={code: 1, zzz: 1}"],
            r"agent\.weights names \['zzz'\] that are not domains",
        ),
        (
            ["agent.kind=fixed", "agent.weights={code: -1}"],
            r"agent\.weights must be finite and >= 0; got \{'code': -1\.0\}",
        ),
        (["agent.kind=fixed", "agent.weights={code: .nan}"], r"agent\.weights must be finite and >= 0"),
        (
            ["agent.kind=fixed", "agent.weights={code: 0, prose: 0}"],
            r"agent\.weights must have a positive sum",
        ),
        (["agent.kind=fixed"], r"kind 'fixed' needs 'weights'"),
        (["agent.weights={code: 1}"], r"'weights' is only used by kind 'fixed', not 'ac_odm'"),
        (["agent.mode=frozen"], r"mode 'frozen' needs 'policy'"),
        (
            ["agent.mode=frozen", "agent.kind=exp3", "agent.policy=p.pt"],
            r"mode 'frozen' applies to kind 'ac_odm'",
        ),
        (["agent.exploration.min_scale=0.5"], r"exploration\.min_scale must be <= exploration\.scale"),
        (["env.action_floor=0.34"], r"env\.action_floor=0\.34 must be < 1/K = 0\.3333 for K=3 domains"),
        (["sampler.weight_floor=0.4"], r"sampler\.weight_floor=0\.4 must be < 1/K = 0\.3333 for K=3"),
        (
            ["sampler.min_per_domain=1", "ray.num_workers=1", "sampler.grad_accum=2"],
            r"sampler\.min_per_domain=1 x K=3 domains exceeds the 2 micro-batches per step",
        ),
    ],
)
def test_agent_env_and_sampler_rules(overrides, match):
    raises(*overrides, match=match)


def test_rules_accept_their_boundary_cases():
    assert build("agent.kind=fixed", "agent.weights={code: 1}").agent.weights == {"code": 1.0}
    assert build("agent.mode=frozen", "agent.policy=runs/x/policy.pt").agent.mode == "frozen"
    assert build("env.action_floor=0.33").env.action_floor == 0.33
    assert (
        build("sampler.min_per_domain=1", "ray.num_workers=1", "sampler.grad_accum=3").sampler.min_per_domain
        == 1
    )
    assert (
        build("sampler.min_per_domain=1", "ray.num_workers=3", "sampler.grad_accum=1").sampler.min_per_domain
        == 1
    )


# ------------------------------------------------------------------------------------------------ files
def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("- a\n- b\n", r"must hold a mapping at the top level, got list"),
        ("just a string\n", r"must hold a mapping at the top level, got str"),
        ("", r"must hold a mapping at the top level, got NoneType"),
        ("data: [unclosed\n", r"is not valid YAML"),
    ],
)
def test_non_mapping_or_broken_yaml(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert "bad.yaml" in str(info.value)


def test_load_errors_name_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**base(), "lm": {"seq_len": 0}}))
    with pytest.raises(
        ConfigError, match=r"invalid config .*exp\.yaml:\n  lm\.seq_len = 0: Input should be greater"
    ):
        load_config(path)


# ------------------------------------------------------------------------------------------------ overrides
def test_set_overrides_nested_fields_with_yaml_typed_values(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(base()))
    cfg = load_config(
        path,
        [
            "agent.gamma=0.9",
            "agent.exploration.kind=dirichlet",
            "lm.compile=true",
            "optim.lr=1e-3",  # YAML 1.1 reads this as a string; the float field parses it
            "optim.betas=[0.8, 0.9]",
            "ray.resources_per_worker={CPU: 2, GPU: 1}",
            "tracking.mlflow_uri=null",
            "name=my run",
        ],
    )
    assert cfg.agent.gamma == 0.9 and cfg.agent.exploration.kind == "dirichlet"
    assert cfg.lm.compile is True and cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.ray.resources_per_worker == {"CPU": 2.0, "GPU": 1.0}
    assert cfg.tracking.mlflow_uri is None and cfg.name == "my run"
    assert load_yaml(path) == base()  # the file is untouched


def test_overrides_leave_the_input_untouched_and_last_one_wins():
    data = base()
    out = apply_overrides(data, ["seed=1", "seed=2"])
    assert out["seed"] == 2 and "seed" not in data


def test_set_unknown_key_is_an_error_naming_it():
    raises("agent.gama=0.9", match=r"agent\.gama: unknown key")


def test_set_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match=r"override 'name\.x': name is a value, not a section"):
        apply_overrides(base(), ["name.x=1"])
    # a field absent from the file gets a mapping, which validation rejects, naming the field
    raises("agent.gamma.x=1", match=r"agent\.gamma = \{\.\.\.\}: Input should be a valid number")


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ("agent.gamma", r"must look like dotted\.key=value"),
        ("agent..gamma=1", r"has an empty key part"),
        ("=1", r"has an empty key part"),
        ("agent.gamma=[1,", r"value is not valid YAML"),
    ],
)
def test_malformed_override(item, match):
    with pytest.raises(ConfigError, match=match):
        parse_override(item)


def test_parse_override_types():
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=[1, x]") == ("a", [1, "x"])
    assert parse_override("a=") == ("a", "")
    assert parse_override("a=x=y") == ("a", "x=y")


# ------------------------------------------------------------------------------------------------ flatten
def test_flatten_gives_dotted_names():
    cfg = build("agent.kind=fixed", "agent.weights={code: 1, prose: 2}")
    flat = flatten(cfg)
    assert flat["agent.gamma"] == cfg.agent.gamma
    assert flat["agent.exploration.scale"] == cfg.agent.exploration.scale
    assert flat["proxy.lm.preset"] == "tiny"
    assert flat["agent.weights"] == {"code": 1.0, "prose": 2.0}  # a per-domain mapping stays one value
    assert isinstance(flat["data.domains"], list) and len(flat["data.domains"]) == 3
    nested = {k for k, v in flat.items() if isinstance(v, dict) and v}
    assert nested == {"agent.weights", "ray.resources_per_worker"}  # mappings kept whole on purpose
    assert all(
        field_exists(k) for k in flat if not k.startswith(("ray.agent_resources.", "tune.trial_resources."))
    )
    assert flatten({"a": {"b": {"c": 1}}, "d": 2}) == {"a.b.c": 1, "d": 2}


def test_field_exists():
    for name in (
        "seed",
        "agent.gamma",
        "agent.exploration.scale",
        "data.domains",
        "proxy.lm.seq_len",
        "tune",
    ):
        assert field_exists(name), name
    for name in ("agent.gama", "agent.gamma.x", "data.domains.name", "nope", "lm.seq_len.value"):
        assert not field_exists(name), name
