"""The base class every config section derives from."""

import functools
import types
import typing

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


@functools.cache
def _numbers_only(annotation) -> bool:
    """Whether a field takes int/float but not bool (`micro_batch_size: true` must not become 1)."""
    args = set(typing.get_args(annotation)) if isinstance(annotation, types.UnionType) or typing.get_origin(
        annotation) is typing.Union else {annotation}
    return bool(args & {int, float}) and bool not in args


class Section(BaseModel):
    """A strict block of keys: unknown keys are rejected (the loader adds did-you-mean hints)."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        protected_namespaces=(),
        use_attribute_docstrings=False,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value, info: ValidationInfo):
        if isinstance(value, bool) and info.field_name and _numbers_only(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"must be a number, not {str(value).lower()}")
        return value
