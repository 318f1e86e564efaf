"""The docs' snippets work: every YAML config validates (fragments merged onto the example config their
`<!-- extends: PATH -->` comment names), every command that can run on a CPU runs, the generated memory
table is fresh, and the agent references' CPU rehearsals (`<!-- transcript: ... -->` blocks) configure,
train and pass their own health checks, as a coding agent following only those pages would."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from script_support import load_script
from test_engine_support import one_thread  # noqa: F401  (tiny models train faster on one thread)

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "docs" / "agents").glob("*.md")) + [
    ROOT / "AGENTS.md", ROOT / "README.md"]
GENERATED = {"configuration.md", "dataset-formats.md"}  # written by scripts/gen_config_docs.py: no markers
AGENT_PAGES = ["sft.md", "preference_tuning.md", "grpo.md", "reward_modelling.md", "pretraining.md"]
BLOCK = re.compile(r"(?:<!--\s*(?P<marker>[^>]*?)\s*-->\n)?^(?P<indent> *)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```",
                   re.M | re.S)


def _name(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


def blocks(text: str) -> list[tuple[str, str, str]]:
    """(marker, language, body) of every fenced block; marker is the HTML comment right above it, or ''."""
    found = []
    for m in BLOCK.finditer(text):
        body = re.sub(rf"(?m)^{m['indent']}", "", m["body"]) if m["indent"] else m["body"]
        found.append((m["marker"] or "", m["lang"], body))
    return found


def _config_keys() -> set[str]:
    from tuneforge.config import Config

    gen = load_script("scripts/gen_config_docs.py")
    return {f.alias or n for model in gen.all_models(Config) for n, f in model.model_fields.items()}


def check_yaml(marker: str, data: dict, keys: set[str]) -> str:
    """Validate one YAML block as `tuneforge validate` would (no model loads); returns what was checked."""
    from tuneforge.config import load
    from tuneforge.data.validate_rows import check_without_model
    from tuneforge.methods import get_objective
    from tuneforge.methods.rewards import without_importing

    if marker.startswith("needs-key:"):
        key = marker.split(":", 1)[1].strip()
        if key not in keys:
            return f"skipped: `{key}` is not a config key yet"
    if marker.startswith("extends:"):
        cfg = load(ROOT / marker.split(":", 1)[1].strip(), overrides=data)
        check_without_model(cfg)
        with without_importing():  # the method's own checks (batch geometry, reward modules located)
            get_objective(cfg).close()
        return "merged"
    if "base_model" in data:
        load(data=data)
        return "full"
    unknown = set(data) - keys
    assert not unknown, f"unknown keys {unknown}"
    return "keys"


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_yaml_in_docs_validates(doc):
    keys = _config_keys()
    for marker, lang, body in blocks(doc.read_text()):
        if lang != "yaml":
            continue
        data = yaml.safe_load(body)
        assert isinstance(data, dict), f"{_name(doc)}: a YAML block that is not a mapping:\n{body}"
        how = check_yaml(marker, data, keys)
        # a fragment in a hand-written page names the config it extends, so it is checked merged onto it
        assert how != "keys" or doc.name in GENERATED, (
            f"{_name(doc)}: the fragment {sorted(data)} needs `<!-- extends: examples/NAME.yaml -->` above it")


def test_a_bad_fragment_fails_against_the_config_it_extends():
    """The merge check can fail: a wrong value, an unknown key and a method-level rule are each caught."""
    from tuneforge.config import ConfigError

    keys = _config_keys()
    for fragment in ({"rl_beta": "high"}, {"rl_bta": 0.1}):
        with pytest.raises(ConfigError):
            check_yaml("extends: examples/dpo-tiny.yaml", fragment, keys)
    with pytest.raises(ConfigError, match="multiple"):  # 64 completions per step, groups of 7
        check_yaml("extends: examples/grpo-tiny.yaml", {"trl": {"num_generations": 7}}, keys)
    with pytest.raises(AssertionError):
        check_yaml("", {"profiler_stepz": 3}, keys)
    assert check_yaml("needs-key: no_such_key", {"no_such_key": 1}, keys).startswith("skipped")


def test_block_parser_reads_markers_and_indented_fences():
    text = "<!-- extends: a.yml -->\n```yaml\nx: 1\n```\n\n1. step\n\n   ```bash\n   tuneforge validate c.yaml\n   ```\n"
    assert blocks(text) == [("extends: a.yml", "yaml", "x: 1\n"), ("", "bash", "tuneforge validate c.yaml\n")]


# ---------------------------------------------------------------- generated pieces of hand-written pages
def test_memory_table_in_choosing_method_is_up_to_date():
    gen = load_script("scripts/gen_memory_table.py")
    page = gen.PAGE.read_text()
    assert gen.updated(page) == page, "docs/choosing-method.md is stale: run scripts/gen_memory_table.py"
    table = page.split(gen.START)[1].split(gen.END)[0]
    assert "| Llama-3.1-8B | LoRA r=16, every linear layer |" in table


def test_stability_pictures_replot_from_the_kept_runs(tmp_path, monkeypatch):
    """Each picture of training-stability.md is drawn from a kept metrics.jsonl of our own runs, and every
    metric a picture shows is in that run's records."""
    plot = load_script("scripts/plot_stability_curves.py")
    page = (ROOT / "docs" / "training-stability.md").read_text()
    monkeypatch.setattr(plot, "IMG", tmp_path)
    for name, panels in plot.PANELS.items():
        assert f"img/stability-{name}.png" in page
        train, evals = plot.records(name)
        for source, metrics, _ in panels:
            rows = evals if source == "eval" else train
            for metric in metrics:
                assert any(metric in r for r in rows), f"{name}: no `{metric}` in docs/img/runs/{name}.jsonl"
        assert plot.plot(name, panels).stat().st_size > 10_000


# ---------------------------------------------------------------- a sandbox where `tuneforge` is this checkout
class Sandbox:
    """A working folder holding a copy of examples/, where doc command lines run as a reader would type
    them: `tuneforge ...` through the CLI app in this process (no interpreter start per command; lines
    with an environment prefix in a subprocess, since main() reads the variable), `python FILE` as a
    script, anything else in bash."""

    def __init__(self, folder: Path, monkeypatch):
        self.dir, self.monkeypatch = folder, monkeypatch
        shutil.copytree(ROOT / "examples", folder / "examples", ignore=shutil.ignore_patterns("outputs"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def __call__(self, line: str, expect: int = 0) -> str:
        line = re.sub(r"\s*>\s*/dev/null\s*$", "", line.strip())
        folder = re.match(r"cd (\S+) && (.*)", line)
        cwd, line = (self.dir / folder[1], folder[2]) if folder else (self.dir, line)
        args = shlex.split(line)
        if args[0] == "tuneforge" and "=" not in args[0]:
            return self._cli(args[1:], cwd, expect)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                            os.environ.get("PYTHONPATH")]))}
        if re.match(r"[A-Z_]+=\S+ tuneforge ", line):
            line = re.sub(r"(^| )tuneforge ", rf"\1{shlex.quote(sys.executable)} -m tuneforge.cli ", line, count=1)
        elif args[0] == "python":
            line = shlex.quote(sys.executable) + line[len("python"):]
        done = subprocess.run(["bash", "-e", "-c", line], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600)
        out = done.stdout + done.stderr
        assert done.returncode == expect, f"`{line}` exited {done.returncode}, expected {expect}:\n{out[-3000:]}"
        return out

    def _cli(self, args: list[str], cwd: Path, expect: int) -> str:
        from typer.testing import CliRunner

        from tuneforge.cli import app

        self.monkeypatch.chdir(cwd)
        result = CliRunner().invoke(app, args)
        self.monkeypatch.chdir(self.dir)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            import traceback

            trace = "".join(traceback.format_exception(result.exception))
            raise AssertionError(f"`tuneforge {shlex.join(args)}` raised:\n{trace}\n{result.output[-2000:]}")
        assert result.exit_code == expect, f"`tuneforge {shlex.join(args)}` exited {result.exit_code}:\n{result.output[-3000:]}"
        return result.output


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    yield Sandbox(tmp_path, monkeypatch)
    # The in-process runs imported the sandbox's modules (my_rewards, grpo_toy): forget them, so that a later
    # test importing a module of the same name gets its own.
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def test_sandbox_runs_a_failing_command_as_a_failure(sandbox):
    with pytest.raises(AssertionError, match="validate"):
        sandbox("tuneforge validate examples/sft-tiny.yaml --learning-rate 0")
    assert "valid" in sandbox("tuneforge validate examples/sft-tiny.yaml > /dev/null")


# ---------------------------------------------------------------- commands in the docs
def _doc_commands() -> list[tuple[str, str, int]]:
    """(doc, command line, expected exit status) for every `tuneforge` command of the docs whose config
    file is shipped (the others name the reader's own config: test_docs.py checks their options)."""
    found, seen = [], set()
    for doc in DOCS + [ROOT / "examples" / "README.md"]:
        text = doc.read_text()
        lines = re.findall(r"`((?:cd \S+ && )?tuneforge [^`]+)`", text)
        for _, lang, body in blocks(text):
            if lang not in ("yaml", "python", "json", "text", ""):
                lines += [line for line in body.splitlines() if re.search(r"(^|\s)tuneforge ", line)]
        for line in lines:
            code, comment = ([*re.split(r"\s#\s", line + " ", maxsplit=1), ""])[:2]  # a shell comment
            code = code.strip()
            m = re.search(r"(?:^|&& |\s)tuneforge ([a-z-]+) (\S+)", code)
            if not m:
                continue
            folder = re.match(r"cd (\S+) && ", code)
            config = ROOT / (folder[1] if folder else "") / m[2]
            key = (m[1], config.resolve(), code[m.end():].strip())  # one run per command, config and options
            if not config.is_file() or key in seen:
                continue
            seen.add(key)
            exits = re.search(r"exits (\d+)", comment)
            found.append((_name(doc), code, int(exits[1]) if exits else 0))
    order = {"validate": 0, "preprocess": 1, "plan": 2, "train": 3}  # inference reads what train wrote
    return sorted(found, key=lambda f: order.get(re.search(r"tuneforge ([a-z-]+)", f[1])[1], 4))


def _short(command: str) -> str:
    """A training command capped at a few steps: the point is that every flag and file still exists."""
    if re.search(r"tuneforge train ", command) and "--max-steps" not in command:
        command += " --max-steps 3" + ("" if "--warmup-steps" in command else " --warmup-steps 0")
    return command


def test_the_docs_name_runnable_commands():
    commands = [c for _, c, _ in _doc_commands()]
    assert len(commands) >= 12, commands
    for sub in ("validate", "preprocess", "train", "plan", "inference"):
        assert any(f"tuneforge {sub} " in c for c in commands), sub


@pytest.mark.slow
def test_every_shipped_command_in_the_docs_runs(sandbox):
    import json

    def losses(path: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if r["type"] == "train"}

    repro, first = sandbox.dir / "outputs" / "repro" / "metrics.jsonl", None
    for doc, command, expect in _doc_commands():
        out = sandbox(_short(command), expect=expect)
        if "TUNEFORGE_DEBUG=1" in command:
            assert "Traceback" in out, f"{doc}: `{command}` should print the traceback"
        if "outputs/repro" in command:  # debugging.md: the resumed run logs the first run's losses again
            if "--resume-from-checkpoint" not in command:
                first = losses(repro)
            else:
                again = losses(repro)
                assert [again[k] for k in range(11, 21)] == [first[k] for k in range(11, 21)]
    assert first is not None


# ---------------------------------------------------------------- the agent transcript
def transcript(page: Path) -> list[tuple[str, str]]:
    """The steps of a page's CPU rehearsal, in order: ('write NAME', text), ('run', bash), ('check', python)."""
    steps = []
    for marker, _, body in blocks(page.read_text()):
        if marker.startswith("transcript:"):
            steps.append((marker.split(":", 1)[1].strip(), body))
    return steps


def test_each_agent_reference_has_a_full_rehearsal():
    """Configure (a written config), check the data (validate, preprocess --debug), train, decide health."""
    for name in AGENT_PAGES:
        steps = transcript(ROOT / "docs" / "agents" / name)
        kinds = [kind.split()[0] for kind, _ in steps]
        assert kinds[-1] == "check" and "run" in kinds and "write" in kinds, (name, kinds)
        commands = "\n".join(body for kind, body in steps if kind == "run")
        for needed in ("tuneforge validate", "tuneforge train"):
            assert needed in commands, (name, needed)
    grpo = dict(transcript(ROOT / "docs" / "agents" / "grpo.md"))
    assert "def correct(" in grpo["write my_rewards.py"] and "my_rewards.correct" in grpo["write grpo.yaml"]


@pytest.mark.slow
@pytest.mark.parametrize("page", AGENT_PAGES)
def test_agent_transcript(page, sandbox):
    """Only what the page says: write its files, run its commands, run its health check (asserts)."""
    log = []
    for kind, body in transcript(ROOT / "docs" / "agents" / page):
        if kind.startswith("write "):
            (sandbox.dir / kind.split()[1]).write_text(body)
        elif kind == "run":
            for line in body.splitlines():
                if line.strip():
                    sandbox(line)
        else:
            (sandbox.dir / "check.py").write_text(body)
            log.append(sandbox("python check.py"))
        log.append(f"$ {kind}")
    assert "healthy" in log[-2], log


def test_short_caps_only_uncapped_training():
    assert _short("tuneforge train a.yaml") == "tuneforge train a.yaml --max-steps 3 --warmup-steps 0"
    assert _short("tuneforge train a.yaml --max-steps 5") == "tuneforge train a.yaml --max-steps 5"
    assert _short("tuneforge validate a.yaml") == "tuneforge validate a.yaml"
