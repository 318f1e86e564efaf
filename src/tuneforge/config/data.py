"""Dataset keys: the `datasets:` entries and the top-level data/sequence-length keys."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .base import Section


class UserDefinedFormat(Section):
    """A dict `type:` describing an instruction format from field names and format strings."""

    field_system: str | None = Field(None, description="Column holding the system prompt.")
    field_instruction: str | None = Field(None, description="Column holding the instruction.")
    field_input: str | None = Field(None, description="Column holding the optional input.")
    field_output: str | None = Field(None, description="Column holding the response (the trained part).")
    field_prompt: str | None = Field(None, description="Preference data: column holding the prompt.")
    field_chosen: str | None = Field(None, description="Preference data: column holding the chosen answer.")
    field_rejected: str | None = Field(None, description="Preference data: column holding the rejected answer.")
    field_completion: str | None = Field(None, description="KTO data: column holding the completion.")
    field_label: str | None = Field(None, description="KTO data: column holding the boolean label.")
    system_prompt: str | None = Field(None, description="Default system prompt when the row has none.")
    system_format: str | None = Field("{system}", description="Format of the system part; `{system}` is replaced.")
    format: str | None = Field(
        None, description="Prompt format with `{instruction}` and `{input}` placeholders, used when input is present."
    )
    no_input_format: str | None = Field(None, description="Prompt format with `{instruction}`, used when input is empty.")
    prompt_format: str | None = Field(None, description="Preference data: prompt format with `{prompt}`.")
    chosen_format: str | None = Field(None, description="Preference data: format of the chosen answer.")
    rejected_format: str | None = Field(None, description="Preference data: format of the rejected answer.")
    completion_format: str | None = Field(None, description="KTO data: format of the completion.")


TrainOnEos = Literal["turn", "all", "last", "none"]


class DatasetEntry(Section):
    path: str = Field(..., description="Local file or folder, or a Hugging Face dataset id.")
    type: str | UserDefinedFormat | None = Field(
        None,
        description="Format of the rows: chat_template, alpaca, alpaca:chatml, input_output, completion, "
        "a dict of field_* keys, `module.function` for user code, or empty for pre-tokenized rows.",
    )
    split: str | None = Field(None, description="Split to use (default: train).")
    name: str | None = Field(None, description="Dataset configuration name (hub datasets).")
    data_files: str | list[str] | None = Field(None, description="Files inside `path` to load.")
    ds_type: Literal["json", "jsonl", "parquet", "csv", "arrow", "text"] | None = Field(
        None, description="File format, when it cannot be inferred from the extension."
    )
    revision: str | None = Field(None, description="Hub revision of the dataset.")
    trust_remote_code: bool = Field(False, description="Allow dataset loading scripts from the hub.")
    shards: int | None = Field(None, ge=1, description="Split the dataset into this many shards and keep one.")
    shards_idx: int | None = Field(None, ge=0, description="Index of the shard to keep (default 0).")
    field: str | None = Field(None, description="Text column for `completion` data (default: text).")
    # chat_template keys
    field_messages: str | None = Field(None, description="Column holding the conversation (default: messages).")
    message_property_mappings: dict[str, str] | None = Field(
        None, description="Map of our message keys to the row's, e.g. {role: from, content: value}."
    )
    message_field_role: str | None = Field(None, description="Deprecated: use message_property_mappings.role.")
    message_field_content: str | None = Field(None, description="Deprecated: use message_property_mappings.content.")
    roles: dict[str, list[str]] | None = Field(
        None, description="Map of canonical roles to the role names used in the data, e.g. {user: [human]}."
    )
    roles_to_train: list[str] | None = Field(
        None, description="Roles whose turns are trained (default: [assistant]; all roles with train_on_inputs)."
    )
    train_on_eos: TrainOnEos | None = Field(
        None,
        description="Which EOS tokens are trained: turn (after each trained turn, default), all, last, none.",
    )
    train_on_eot: TrainOnEos | None = Field(
        None, description="Which end-of-turn tokens (eot_tokens) are trained; defaults to train_on_eos."
    )
    message_field_training: str | None = Field(
        None, description="Message key holding a per-turn boolean that overrides whether the turn is trained."
    )
    drop_system_message: bool = Field(False, description="Remove system messages before rendering.")
    field_tools: str | None = Field(None, description="Column holding the tool definitions (default: tools).")
    chat_template: str | None = Field(None, description="Per-dataset chat template (same values as the top-level key).")
    chat_template_jinja: str | None = Field(None, description="Per-dataset inline Jinja template or .jinja path.")
    # preference / reward keys
    field_chosen: str | None = Field(None, description="chat_template preference data: key of the chosen message.")
    field_rejected: str | None = Field(None, description="chat_template preference data: key of the rejected message.")
    step_separator: str | None = Field(None, description="stepwise_supervised: text placed after each step.")
    max_completion_length: int | None = Field(None, description="stepwise_supervised: cap on completion tokens.")
    train_on_last_step_only: bool | None = Field(None, description="stepwise_supervised: label only the last step.")


class PretrainingDataset(Section):
    """One `pretraining_dataset:` entry: raw text streamed, tokenized and packed while training."""

    path: str = Field(..., description="Local file or folder, `json`/`text`/`parquet`/`csv` with `data_files`, "
                      "or a Hugging Face dataset id (streamed).")
    name: str | None = Field(None, description="Dataset configuration name (hub datasets).")
    split: str = Field("train", description="Split to stream.")
    text_column: str = Field("text", description="Column holding each document's text.")
    type: Literal["pretrain"] = Field("pretrain", description="`pretrain`: every token trained, no masking.")
    data_files: str | list[str] | None = Field(None, description="Files to read (relative to the config's folder).")
    skip: int = Field(0, ge=0, description="Source rows to skip at the start of the stream.")
    ds_type: Literal["json", "jsonl", "parquet", "csv", "text"] | None = Field(
        None, description="File format, when it cannot be inferred from the extension."
    )


class DataKeys(Section):
    datasets: list[DatasetEntry] | None = Field(None, description="Training datasets, mixed together.")
    test_datasets: list[DatasetEntry] | None = Field(
        None, description="Evaluation datasets (exclusive with val_set_size)."
    )
    val_set_size: float = Field(
        0.0, ge=0.0, description="Fraction (<1) or number (>=1) of training rows held out for evaluation."
    )
    dataset_prepared_path: str | None = Field(
        None, description="Folder of the prepared-data cache (default: last_run_prepared in the working directory)."
    )
    dataset_num_proc: int | None = Field(
        None, ge=1, description="Worker processes for tokenisation (default: the usable CPU cores, fewer on a busy "
        "machine).")
    skip_prepare_dataset: bool = Field(False, description="Do not cache the prepared dataset.")
    shuffle_merged_datasets: bool = Field(True, description="Shuffle rows after mixing the datasets (streamed data: "
                                          "within windows of streaming_multipack_buffer_size rows).")
    shuffle_before_merging_datasets: bool = Field(
        False, description="Shuffle each dataset's rows before they are put together (with "
        "shuffle_merged_datasets: false, the datasets then follow each other, each in random order)."
    )
    dataset_exact_deduplication: bool = Field(False, description="Drop rows whose tokens exactly repeat another row.")
    train_on_inputs: bool = Field(False, description="Train on prompt/user tokens too (no prompt masking).")
    sequence_len: int = Field(512, ge=8, le=2**24, description="Maximum tokens per sample, and per packed row.")
    eval_sequence_len: int | None = Field(None, ge=8, description="Maximum tokens per evaluation sample.")
    excess_length_strategy: Literal["drop", "truncate", "raise"] = Field(
        "drop", description="What to do with rows longer than sequence_len: drop, truncate, or raise an error."
    )
    min_sample_len: int | None = Field(None, ge=1, description="Drop rows with fewer tokens than this.")
    sample_packing: bool = Field(
        False, description="Pack several rows into each sequence_len row (documents never attend to each other)."
    )
    eval_sample_packing: bool | None = Field(None, description="Pack evaluation rows (default: same as sample_packing).")
    pad_to_sequence_len: bool | None = Field(
        None, description="Pad every batch to sequence_len (constant shapes; default: on with packing)."
    )
    pad_to_multiple_of: int | None = Field(None, ge=1, description="Pad batch lengths to a multiple of this.")
    sample_packing_group_size: int = Field(100_000, ge=1, description="Rows considered together by the packer.")
    sample_packing_bin_size: int = Field(200, ge=1, description="Maximum documents per packed row.")
    sample_packing_sequentially: bool = Field(
        False, description="Pack rows in dataset order (no reordering), at some cost in efficiency."
    )
    batch_flattening: bool = Field(
        False, description="SFT without sample_packing: put each micro-batch's rows back to back in one row "
        "(no padding; documents still attend only to themselves)."
    )
    group_by_length: bool = Field(
        False, description="Unpacked batches: put rows of similar length together (less padding); the batch "
        "with the longest row runs first."
    )
    curriculum_sampling: bool = Field(
        False, description="Train on the rows in dataset order every epoch (no shuffling; packed: packed in order)."
    )
    remove_unused_columns: bool | None = Field(None, description="Accepted for Axolotl compatibility; no effect.")
    pretraining_dataset: list[PretrainingDataset] | None = Field(
        None, description="Continual pretraining: text corpora streamed entry after entry, then again (shuffled "
        "within windows: shuffle_merged_datasets), tokenized and packed into sequence_len rows while training; "
        "needs max_steps."
    )
    streaming: bool = Field(
        False, description="Stream `datasets:` instead of preparing them beforehand: rows are read, formatted and "
        "packed while training (needs max_steps; evaluation data from test_datasets)."
    )
    pretrain_multipack_attn: bool = Field(
        True, description="Streamed rows: documents packed into one row do not attend to each other (false: the "
        "row is one sequence)."
    )
    pretraining_sample_concatenation: bool | None = Field(
        None, description="pretraining_dataset: fill every row to sequence_len, continuing a document that does not "
        "fit in the next row (default: a document that does not fit starts the next row; the rest is padding)."
    )
    streaming_multipack_buffer_size: int = Field(
        10_000, ge=1, description="Streamed data with shuffle_merged_datasets: source rows are read this many at a "
        "time and each window is trained in a seeded random order (memory holds one window; checkpoints resume "
        "exactly)."
    )
    max_prompt_len: int | None = Field(None, ge=1, description="RL: maximum prompt tokens.")
    extra: dict[str, Any] | None = Field(None, description="Free-form values for user-defined formats and rewards.")
