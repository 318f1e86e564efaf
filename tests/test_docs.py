"""The docs stay true: generated pages match the code, every key is described, and every command,
option, config snippet and link the docs mention exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from script_support import load_script

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "docs" / "agents").glob("*.md")) + [ROOT / "AGENTS.md"]


def _generator():
    return load_script("scripts/gen_config_docs.py")


gen = _generator()
STALE = "out of date: run `python scripts/gen_config_docs.py` and commit the result"


# ---------------------------------------------------------------- configuration.md
def test_every_config_key_has_a_description():
    from tuneforge.config import Config

    assert gen.missing_descriptions(Config) == []


def test_a_key_without_description_is_reported():
    class Inner(BaseModel):
        ok: int = Field(1, description="fine")
        bare: int = 2

    class Outer(BaseModel):
        described: str = Field("x", description="fine")
        undocumented: bool = False
        block: list[Inner] | None = Field(None, description="nested")

    assert gen.missing_descriptions(Outer) == ["Outer.undocumented", "Inner.bare"]


def test_configuration_md_is_up_to_date():
    assert (ROOT / "docs" / "configuration.md").read_text() == gen.render(), STALE


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\| `([^`]+)` \| (.*) \|$", line)
        if m:
            rows.setdefault(m.group(1), re.split(r"(?<!\\)\|", m.group(2)))
    return rows


def test_configuration_md_lists_every_key_with_its_default():
    from pydantic_core import PydanticUndefined

    from tuneforge.config import Config

    text = gen.render()
    for model in gen.all_models(Config):
        section = text if model is Config else text[text.index(f'<a id="{gen.anchor(model)}">'):]
        rows = _table_rows(section)
        for name, field in model.model_fields.items():
            key = field.alias or name
            assert key in rows, f"{model.__name__}.{key} missing from configuration.md"
            _, default, description = (c.strip() for c in rows[key][:3])
            assert description == field.description.replace("|", "\\|")
            value = field.default_factory() if field.default is PydanticUndefined and field.default_factory else field.default
            if field.is_required():
                assert default == "**required**"
            elif value is None:
                assert default == "—"
            else:
                value = value.model_dump() if isinstance(value, BaseModel) else value
                assert json.loads(default.strip("`")) == value, key


# ---------------------------------------------------------------- dataset-formats.md
def test_dataset_formats_md_is_up_to_date():
    assert (ROOT / "docs" / "dataset-formats.md").read_text() == gen.render_formats(), STALE


def test_dataset_formats_md_covers_every_registered_type():
    """Every type name is listed, and every format module has a worked sample with its mask."""
    from tuneforge.data.formats import registered

    text = (ROOT / "docs" / "dataset-formats.md").read_text()
    headings = re.findall(r"^## (.*)$", text, re.M)
    by_module: dict[str, list[str]] = {}
    for name, fmt in registered().items():
        if name in ("pretokenized", "user_defined"):  # no `type:` / a mapping, not names a user writes
            continue
        assert f"`{name}`" in text, f"dataset type `{name}` is missing from docs/dataset-formats.md"
        by_module.setdefault(fmt.builder.__module__, []).append(name)
    for module, names in by_module.items():
        assert any(f"`{n}`" in h for h in headings for n in names), f"no worked sample for the types of {module}"
    assert any("pre-tokenized" in h for h in headings) and any("user-defined" in h for h in headings)


def test_mask_rendering_marks_untrained_spans(tiny_tokenizer):
    ids = tiny_tokenizer("Q: cat A: tac", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    n = len(tiny_tokenizer("Q: cat A:", add_special_tokens=False)["input_ids"])
    labels = [-100] * n + ids[n:]
    assert gen._mask_text(tiny_tokenizer, ids, labels) == "[[Q: cat A:]] tac</s>"
    assert gen._mask_text(tiny_tokenizer, ids, ids) == "Q: cat A: tac</s>"


# ---------------------------------------------------------------- cli.md and commands used anywhere in the docs
def _cli():
    import typer

    from tuneforge.cli import app

    return typer.main.get_command(app)


def test_cli_md_documents_every_command_and_option():
    text = (ROOT / "docs" / "cli.md").read_text()
    for name, command in _cli().commands.items():
        assert f"\n## {name}\n" in text, f"command {name} has no section in docs/cli.md"
        section = text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--") and opt != "--help":
                    assert opt in section, f"option {opt} of `{name}` is not documented in docs/cli.md"


def _config_keys() -> set[str]:
    from tuneforge.config import Config

    keys = set()
    for model in gen.all_models(Config):
        keys |= {f.alias or n for n, f in model.model_fields.items()}
    return keys


def _command_lines(text: str) -> list[str]:
    """`tuneforge ...` in inline code, and lines of fenced (non-YAML) code blocks that run tuneforge."""
    found = re.findall(r"`(tuneforge [^`]+)`", text)
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang != "yaml":
            code = [line.split("#")[0] for line in body.splitlines()]
            found += [line for line in code if re.search(r"(^|[\s/])tuneforge ", line)]
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_and_options_in_docs_exist(doc):
    cli = _cli()
    keys = _config_keys()
    lines = _command_lines(doc.read_text())
    for line in lines:
        m = re.search(r"tuneforge (--help|[a-z<][a-z|-]*>?)(.*)", line)
        name, rest = m.group(1), m.group(2)
        if name in ("--help", "<command>"):
            continue
        assert name in cli.commands, f"{doc.name}: unknown command `tuneforge {name}`"
        options = {o for p in cli.commands[name].params for o in p.opts}
        for opt in re.findall(r"(?<![\w-])--([a-z][a-z0-9._-]*)", rest):
            if opt in ("key", "any-config-key"):  # placeholders in the synopsis
                continue
            as_key = opt.split(".")[0].replace("-", "_")
            assert f"--{opt}" in options or as_key in keys, (
                f"{doc.name}: `--{opt}` is neither an option of `tuneforge {name}` nor a config key"
            )
    if doc.name in ("cli.md", "AGENTS.md", "getting-started.md"):
        assert len(lines) >= 5  # the check really ran over this page's commands


# Every YAML block of the docs is validated in test_docs_snippets.py (fragments merged onto the config they
# extend).


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, fragment = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: broken link {target}"
        if fragment and file.suffix == ".md":
            page = file.read_text()
            headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                        for h in re.findall(r"^#+ (.*)$", page, re.M)}
            assert f'id="{fragment}"' in page or fragment in headings, f"{doc.name}: broken anchor {target}"
