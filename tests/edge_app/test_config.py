from pathlib import Path

import pytest

from edge_app.cli import main
from edge_app.config import ConfigError, load_config

EXAMPLE = Path(__file__).parents[2] / "deploy" / "config.example.yaml"


def test_the_documented_example_is_valid(capsys):
    cfg = load_config(EXAMPLE)
    assert cfg.station.station == "press3" and cfg.cameras[0].type == "pylon"
    assert main(["check-config", "--schema-only", str(EXAMPLE)]) == 0
    assert "OK" in capsys.readouterr().out


def test_every_field_is_described():
    from pydantic import BaseModel

    from edge_app.config import ServiceConfig

    seen = set()

    def walk(model):
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            for arg in getattr(ann, "__args__", ()) or (ann,):
                for inner in getattr(arg, "__args__", ()) or (arg,):
                    if isinstance(inner, type) and issubclass(inner, BaseModel):
                        walk(inner)

    walk(ServiceConfig)
    assert len(seen) > 10


def test_errors_name_path_line_and_value(tmp_path, capsys):
    text = EXAMPLE.read_text()
    text = text.replace("exposure_us: 800", "exposure_us: -5").replace("queue_size: 8 ", "queue_sise: 8 ")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    msg = str(exc.value)
    exp_line = next(i for i, line in enumerate(text.splitlines(), 1) if "exposure_us: -5" in line)
    q_line = next(i for i, line in enumerate(text.splitlines(), 1) if "queue_sise" in line)
    assert f"cameras.0.exposure_us (line {exp_line})" in msg and "(value: -5)" in msg
    assert f"decision.queue_sise (line {q_line})" in msg and "Extra inputs are not permitted" in msg
    assert main(["check-config", str(bad)]) == 1
    assert "exposure_us" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("station: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "mapping of sections"),
        ("station: {line: L1, station: S1}\n", "cameras.*Field required"),
    ],
)
def test_broken_files(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def test_missing_file_and_conflicting_secrets(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    text = EXAMPLE.read_text().replace("password_file: null", "password_file: /tmp/pw")
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="password_file or password_credential, not both"):
        load_config(p)


def test_duplicate_camera_ids(tmp_path):
    import yaml

    data = yaml.safe_load(EXAMPLE.read_text())
    data["cameras"].append(dict(data["cameras"][0]))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="repeated: top"):
        load_config(p)


def test_readme_config_reference_is_current():
    from edge_app.configdoc import markdown

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("<!-- config-reference:start -->\n")[1].split("<!-- config-reference:end -->")[0]
    assert block == markdown(), "README config reference is stale: regenerate with python -m edge_app.configdoc"
