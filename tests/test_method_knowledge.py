"""Method knowledge lives in `methods/` and `config/` (docs/architecture.md): other layers ask
`config.methods.method_facts(cfg)` instead of testing which method a config selects."""

import re
from pathlib import Path

import tuneforge

ROOT = Path(tuneforge.__file__).parent
# `cfg.rl in (...)`, `cfg.rl == "dpo"`, `cfg.reward_model or ...`: a lower layer deciding by method name.
METHOD_TEST = re.compile(r"\bcfg\.(rl|reward_model|process_reward_model)\b")


def test_no_method_name_tests_outside_methods_and_config():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        part = path.relative_to(ROOT).parts[0]
        if part in ("methods", "config"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if METHOD_TEST.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    # The planner copies the method fields into its settings to print them in its report: a copy, not a test.
    copies = ("rl=cfg.rl", "reward_model=bool(cfg.reward_model)")
    offenders = [o for o in offenders if not any(c in o for c in copies)]
    assert not offenders, "ask config.methods.method_facts(cfg) instead:\n" + "\n".join(offenders)
