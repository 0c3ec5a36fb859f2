"""docs/config.md and pyproject.toml's [tool.flwr.app.config] are generated from the config dataclasses (field help
and defaults), and docs/architecture.md's protocol catalogue from the message declarations: all three are current."""

from __future__ import annotations

import dataclasses
import math
import tomllib

from conftest import REPO
from test_config import method_option_sections, pyproject_run_config

from fedbridge import config_reference
from fedbridge.config import ExperimentConfig
from fedbridge.config_reference import (
    ARCHITECTURE,
    CATALOGUE_BEGIN,
    COMMAND,
    DOC,
    PYPROJECT,
    main,
    pyproject_block,
    reference_markdown,
    sections,
    with_catalogue,
    with_pyproject_block,
)
from fedbridge.protocol import catalogue


def reference_rows() -> dict:
    rows = {}
    for section in sections():
        for row in section.rows:
            assert row.key not in rows, f"{row.key} is in two sections"
            rows[row.key] = row
    return rows


def same_value(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isinf(a) and math.isinf(b) and (a > 0) == (b > 0))
    return type(a) is type(b) and a == b


def test_docs_config_md_is_the_generated_reference():
    assert DOC == REPO / "docs" / "config.md"
    assert DOC.read_text(encoding="utf-8") == reference_markdown(), f"docs/config.md is stale: run {COMMAND}"


def test_pyproject_run_config_is_the_generated_block():
    text = PYPROJECT.read_text(encoding="utf-8")
    assert text == with_pyproject_block(text), f"pyproject.toml's [tool.flwr.app.config] is stale: run {COMMAND}"


def test_architecture_protocol_catalogue_is_current():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    assert text == with_catalogue(text), f"docs/architecture.md's protocol catalogue is stale: run {COMMAND}"
    assert all(f"| `{message_type}` |" in text for message_type in catalogue())


def test_generator_writes_and_checks(tmp_path):
    out, pyproject, architecture = tmp_path / "config.md", tmp_path / "pyproject.toml", tmp_path / "architecture.md"
    pyproject.write_text('[project]\nname = "x"\n\n[tool.flwr.app.config]\nmethod = "fedavg"\nold-key = 1\n\n\n'
                         '[tool.ruff]\nline-length = 120\n', encoding="utf-8")
    architecture.write_text(f"# A\n\n{CATALOGUE_BEGIN}\nold\n<!-- End of the generated protocol catalogue. -->\n",
                            encoding="utf-8")
    paths = ["--output", str(out), "--pyproject", str(pyproject), "--architecture", str(architecture)]
    assert main(["--check", *paths]) == 1  # missing is stale
    assert main(paths) == 0
    assert out.read_text(encoding="utf-8") == reference_markdown()
    written = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    assert written["project"] == {"name": "x"} and written["tool"]["ruff"] == {"line-length": 120}
    assert pyproject_block() in pyproject.read_text(encoding="utf-8") and "old-key" not in pyproject.read_text()
    assert "\n\n\n[tool.ruff]" in pyproject.read_text(encoding="utf-8")  # the spacing before the next table is kept
    assert "| `query.info` | core |" in architecture.read_text(encoding="utf-8") and "\nold\n" not in architecture.read_text()
    assert main(["--check", *paths]) == 0


def test_every_pyproject_key_is_in_the_reference_with_its_default():
    declared, rows = pyproject_run_config(), reference_rows()
    assert not (missing := sorted(set(declared) - set(rows))), f"keys in pyproject.toml, not in docs/config.md: {missing}"
    assert not (extra := sorted(set(rows) - set(declared))), f"fields with help, not in pyproject.toml: {extra}"
    for key, row in rows.items():
        shown = tomllib.loads(f"v = {row.default}")["v"]  # the default column is TOML, as pyproject.toml writes it
        assert same_value(shown, declared[key]), (key, row.default, declared[key])


def test_the_reference_covers_every_section_the_code_parses():
    """Every ``from_flat(XConfig, ...method_options, "prefix")`` in fedbridge is a section of the reference, so a
    new method's options cannot be left out of it."""
    documented = {s.prefix: s.cls for s in sections()}
    for prefix, cls in method_option_sections().items():
        assert documented.get(prefix) is cls, f"'{prefix}.*' ({cls.__name__}) is not in {config_reference.__name__}"
    core = {f.name: type(f.default) for f in dataclasses.fields(ExperimentConfig) if dataclasses.is_dataclass(f.default)}
    assert {p: documented[p] for p in core} == core


def test_every_config_field_has_help():
    classes = {s.cls for s in sections()} | {ExperimentConfig}
    for cls in classes:
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help")
            assert isinstance(text, str) and text.strip(), f"{cls.__name__}.{f.name} has no help"
    assert all(row.help for row in reference_rows().values())


def test_cells_escape_pipes_and_tags():
    assert config_reference._cell("S(y|x), <run-name>, `a<b`") == "S(y\\|x), \\<run-name>, `a<b`"
    assert config_reference.toml_value(math.inf) == "inf" and config_reference.toml_value(5e-4) == "0.0005"
    assert config_reference.toml_value(("a", "b")) == '"a,b"' and config_reference.toml_value(True) == "true"
