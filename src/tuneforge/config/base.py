"""The base class every config section derives from."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A strict block of keys: unknown keys are rejected (the loader adds did-you-mean hints)."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        protected_namespaces=(),
        use_attribute_docstrings=False,
    )
