"""A dict `type:` (`UserDefinedFormat`): an instruction format described by field names and format strings.

    type:
      field_system: system          # optional column; falls back to `system_prompt`
      field_instruction: question   # default: instruction
      field_input: context          # optional column (default: input)
      field_output: answer          # default: output
      system_prompt: "You are ..."
      system_format: "{system}\\n"  # default: {system}
      format: "{instruction}\\n{input}\\nAnswer: "   # used when the row has an input
      no_input_format: "{instruction}\\nAnswer: "   # used when it has none

The prompt is system_format (when there is a system text) followed by format or no_input_format; it
is masked unless `train_on_inputs`. The output and an appended EOS are trained. Prompt and output are
tokenized apart, as in `alpaca`. Without `no_input_format`, `format` is used with `{input}` removed.
"""

from __future__ import annotations

from typing import Any

from tuneforge.config.data import UserDefinedFormat
from tuneforge.errors import DataError

from .alpaca import bos_ids, encode_pair, eos_ids, text_field
from .registry import FormatContext, RowError, RowFn, register

DEFAULT_FORMAT = "{instruction} {input} "
DEFAULT_NO_INPUT_FORMAT = "{instruction} "


def _check_template(where: str, key: str, template: str, allowed: tuple[str, ...]) -> None:
    """Fail at load time, not at row 0, when a format string names an unknown placeholder."""
    try:
        template.format(**dict.fromkeys(allowed, ""))
    except (KeyError, IndexError, ValueError) as exc:
        names = ", ".join("{" + a + "}" for a in allowed)
        raise DataError(
            f"{where}: `type.{key}` is not a valid format string ({type(exc).__name__}: {exc}); "
            f"it may use {names} (write {{{{ and }}}} for literal braces)."
        ) from None


@register("user_defined", version="1")
def build(ctx: FormatContext) -> RowFn:
    spec = ctx.entry.type
    assert isinstance(spec, UserDefinedFormat)
    where = f"dataset {ctx.entry.path}"
    turn = spec.format or DEFAULT_FORMAT
    if spec.no_input_format:
        turn_no_input = spec.no_input_format
    else:
        turn_no_input = turn.replace("{input}", "") if spec.format else DEFAULT_NO_INPUT_FORMAT
    system_format = spec.system_format or "{system}"
    _check_template(where, "format", turn, ("instruction", "input"))
    _check_template(where, "no_input_format", turn_no_input, ("instruction",))
    _check_template(where, "system_format", system_format, ("system",))

    f_instruction = spec.field_instruction or "instruction"
    f_output = spec.field_output or "output"
    f_input = spec.field_input or "input"
    f_system = spec.field_system or "system"
    tokenizer = ctx.tokenizer
    prefix, suffix = bos_ids(tokenizer), eos_ids(tokenizer, where)
    train_on_inputs = ctx.cfg.train_on_inputs

    def optional_field(row: dict[str, Any], key: str, named: bool) -> str:
        # A column the user named must exist (a typo would otherwise silently drop it); the
        # default-named optional columns may be absent.
        if named and key not in row:
            raise RowError(f"missing field `{key}` (the row has: {', '.join(sorted(row))})")
        return text_field(row, key, required=False)

    def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
        instruction = text_field(row, f_instruction)
        output = text_field(row, f_output, allow_empty=False)
        inp = optional_field(row, f_input, spec.field_input is not None)
        system = optional_field(row, f_system, spec.field_system is not None) or spec.system_prompt or ""
        prompt = system_format.format(system=system) if system else ""
        if inp.strip():
            prompt += turn.format(instruction=instruction, input=inp)
        else:
            prompt += turn_no_input.format(instruction=instruction, input="")
        return [encode_pair(prefix, prompt, output, suffix, tokenizer, train_on_inputs)]

    return row_fn
