"""`torch_compile`: the `auto` rule, the one log line that states it, and the lasting compile cache."""

from __future__ import annotations

import logging

import pytest
import torch

from tuneforge.models import compile_setup
from tuneforge.models.compile_setup import MIN_PARAMETERS, MIN_STEPS, choose

BIG = 1_240_000_000  # Llama-3.2-1B


@pytest.mark.parametrize("want,cuda,params,steps,strided,compiled,reason", [
    (False, True, BIG, None, False, False, "torch_compile: false"),
    (True, False, BIG, None, False, False, "no CUDA device"),
    ("auto", False, BIG, None, False, False, "no CUDA device"),
    (True, True, 1000, 5, False, True, "torch_compile: true"),  # asked for: no size or length rule
    ("auto", True, BIG, None, False, True, "CUDA and 1.24B parameters"),
    ("auto", True, BIG, MIN_STEPS, False, True, "CUDA and 1.24B parameters"),
    ("auto", True, MIN_PARAMETERS - 1, None, False, False, "400M parameters, under the 400M"),
    ("auto", True, 135_000_000, None, False, False, "135M parameters"),
    ("auto", True, BIG, MIN_STEPS - 1, False, False, "max_steps 99 is under the 100 steps"),
    ("auto", True, BIG, None, True, False, "EBFT strided mode"),
])
def test_auto_compiles_only_where_it_pays(want, cuda, params, steps, strided, compiled, reason):
    choice = choose(want, cuda=cuda, parameters=params, max_steps=steps, strided_ebft=strided)
    assert choice.compile is compiled
    assert reason in choice.reason


def test_cache_dir_is_a_lasting_per_user_folder_unless_one_is_given(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert compile_setup.compile_cache_dir(env) == tmp_path / "xdg" / "tuneforge" / "inductor"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "tuneforge" / "inductor")
    assert (tmp_path / "xdg" / "tuneforge" / "inductor").is_dir()
    given = {"TORCHINDUCTOR_CACHE_DIR": "/somewhere/else", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert compile_setup.compile_cache_dir(given) == compile_setup.Path("/somewhere/else")
    assert given["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"
    (tmp_path / "file").write_text("")  # a cache home that cannot hold a folder: torch's default stays
    blocked = {"XDG_CACHE_HOME": str(tmp_path / "file")}
    assert compile_setup.compile_cache_dir(blocked) is None and "TORCHINDUCTOR_CACHE_DIR" not in blocked


def test_torch_caches_compiled_graphs_by_default():
    """Why tuneforge sets only the folder: the FX-graph and AOTAutograd caches are on in this torch."""
    import torch._functorch.config
    import torch._inductor.config

    assert torch._inductor.config.fx_graph_cache is True
    assert torch._functorch.config.enable_autograd_cache is True


@pytest.fixture(autouse=True)
def _torch_dynamic_sources_restored():
    """compile_blocks extends torch's process-wide dynamic allow list; later tests get it back as it was."""
    with torch.compiler.config.patch(dynamic_sources=torch.compiler.config.dynamic_sources):
        yield


def _blocks(tmp_path, tiny_model_dir, monkeypatch, **keys):
    from tuneforge.config import load
    from tuneforge.models.compile_setup import compile_blocks
    from tuneforge.models.load import load_model
    from tuneforge.models.tokenizer import load_tokenizer

    cfg = load(data={"base_model": str(tiny_model_dir), "output_dir": str(tmp_path / "out"), **keys})
    model = load_model(cfg, load_tokenizer(cfg))
    compiled = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the decision as on a GPU, nothing compiled
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(self))
    monkeypatch.setattr("tuneforge.models.losses.compile_loss", lambda **kw: None)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return compile_blocks(cfg, model), compiled


def test_auto_on_a_small_model_runs_eagerly_and_says_why(tmp_path, tiny_model_dir, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="tuneforge"):
        count, compiled = _blocks(tmp_path, tiny_model_dir, monkeypatch, torch_compile="auto")
    assert count == 0 and compiled == []
    lines = [r.getMessage() for r in caplog.records if "torch_compile" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("torch_compile: auto -> eager: 0M parameters, under the 400M")
    # the rollout engine may still compile its decode step: the lasting cache is set all the same
    assert compile_setup.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "tuneforge" / "inductor")


def test_auto_compiles_every_block_into_the_lasting_cache(tmp_path, tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setattr(compile_setup, "MIN_PARAMETERS", 0)
    with caplog.at_level(logging.INFO, logger="tuneforge"):
        count, compiled = _blocks(tmp_path, tiny_model_dir, monkeypatch, torch_compile="auto")
    assert count == len(compiled) == 2  # the tiny model's two decoder layers
    assert all(type(m).__name__.endswith("DecoderLayer") for m in compiled)
    cache = tmp_path / "xdg" / "tuneforge" / "inductor"
    assert compile_setup.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)
    lines = [r.getMessage() for r in caplog.records if "torch_compile" in r.getMessage()]
    assert lines == [f"torch_compile: auto -> compiling 2 blocks (CUDA and 0.00B parameters); compile cache: {cache}"]


def test_compiling_the_blocks_marks_the_packed_boundaries_dynamic_keeping_the_users_list(
        tmp_path, tiny_model_dir, monkeypatch):
    with torch.compiler.config.patch(dynamic_sources="L['x']"):
        _blocks(tmp_path, tiny_model_dir, monkeypatch, torch_compile=True)
        assert torch.compiler.config.dynamic_sources.split(",") == ["L['x']", *compile_setup.PACKED_BOUNDARY_SOURCES]


def test_ebft_strided_turns_true_off_and_runs_auto_eagerly(write_config, write_jsonl, monkeypatch):
    from tuneforge.config import load
    from tuneforge.methods.ebft.strided import StridedEBFTObjective

    write_jsonl([{"text": "a b c"}], "docs.jsonl")
    base = {"rl": "ebft", "datasets": [{"path": "docs.jsonl", "type": "completion"}], "ebft": {"mode": "strided"}}
    forced = load(write_config({**base, "torch_compile": True}))
    StridedEBFTObjective(forced)  # accepted with a note, and compile switched off
    assert forced.torch_compile is False
    cfg = load(write_config({**base, "torch_compile": "auto"}))
    StridedEBFTObjective(cfg)  # no note: auto decides eager for this mode
    assert cfg.torch_compile == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    choice = compile_setup.config_choice(cfg, torch.nn.Linear(2, 2))
    assert not choice.compile and choice.reason.startswith("EBFT strided mode")


def test_recompute_elementwise_switches_the_partitioner_only_while_its_blocks_compile():
    """torch_compile_recompute_elementwise: the backend sees the partitioner's three bans lifted while it
    compiles, and torch's defaults are back afterwards (other compiled code keeps them)."""
    import torch._functorch.config as functorch_config

    seen = []

    def inner(gm, example_inputs, **kwargs):
        seen.append({key: getattr(functorch_config, key) for key in compile_setup.RECOMPUTE_ELEMENTWISE} | kwargs)
        return gm.forward

    before = {key: getattr(functorch_config, key) for key in compile_setup.RECOMPUTE_ELEMENTWISE}
    fn = torch.compile(lambda x: torch.sin(x) * 2, backend=compile_setup.recomputing_backend(inner))
    assert torch.equal(fn(torch.ones(3)), torch.sin(torch.ones(3)) * 2)
    assert seen == [compile_setup.RECOMPUTE_ELEMENTWISE]
    # a mode reaches a backend other than inductor as torch.compile would hand it on: as a keyword
    torch._dynamo.reset()
    fn = torch.compile(lambda x: torch.cos(x), backend=compile_setup.recomputing_backend(inner, "max-autotune"))
    fn(torch.ones(3))
    assert seen[-1] == compile_setup.RECOMPUTE_ELEMENTWISE | {"mode": "max-autotune"}
    assert before == {key: getattr(functorch_config, key) for key in compile_setup.RECOMPUTE_ELEMENTWISE}
    assert all(before.values())  # torch bans these recomputations by default


def test_recompute_elementwise_needs_torch_compile():
    from tuneforge.config import ConfigError, load

    with pytest.raises(ConfigError, match="torch_compile_recompute_elementwise: it tells the compiler what to keep"):
        load(data={"base_model": "x", "torch_compile_recompute_elementwise": True})  # torch_compile is off by default
    on = {"base_model": "x", "torch_compile": "auto", "torch_compile_recompute_elementwise": True}
    assert load(data=on).torch_compile_recompute_elementwise is True


@pytest.mark.parametrize("keys, applied", [
    ({"torch_compile": True, "gradient_checkpointing_layers": "auto"}, True),  # the freed memory buys layers
    ({"torch_compile": "auto", "gradient_checkpointing_layers": "auto"}, True),
    ({"torch_compile": True, "gradient_checkpointing_layers": 20}, False),  # a fixed count: only slower
    ({"torch_compile": True}, False),
    ({"gradient_checkpointing_layers": "auto"}, False),  # not compiled
    ({"torch_compile": True, "gradient_checkpointing_layers": "auto", "torch_compile_recompute_elementwise": False},
     False),
    ({"torch_compile": True, "torch_compile_recompute_elementwise": True}, True),
])
def test_recompute_elementwise_is_on_by_default_where_checkpointing_is_chosen_for_speed(keys, applied):
    from tuneforge.config import load

    cfg = load(data={"base_model": "x", "gradient_checkpointing": True, **keys})
    assert cfg.recompute_elementwise is applied


@torch.library.custom_op("tuneforge_test::varlen", mutates_args=())
def _varlen_stand_in(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, max_k: int) -> torch.Tensor:
    """The CUDA varlen kernel's signature as an opaque op (it is a custom op too): what dynamo sees of it."""
    return q.clone()


@_varlen_stand_in.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k):
    return torch.empty_like(q)


@pytest.mark.parametrize("marked, graphs", [(True, 1), (False, 2)])
def test_packed_batches_compile_the_blocks_once(monkeypatch, marked, graphs):
    """Batches with other document counts and longest documents reuse the blocks' first compilation when
    the packed boundaries are marked dynamic; unmarked, dynamo compiles them a second time."""
    import torch._dynamo.utils
    import torch.nn.attention.varlen
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.models import attention

    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn",
                        lambda q, k, v, cq, ck, mq, mk, **kw: _varlen_stand_in(q, k, v, cq, ck, mq, mk))
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64, attn_implementation=attention.register())
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)  # the kernel's dtype, so the varlen path runs
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for layer in model.model.layers:
        layer.compile(backend="eager")  # dynamo's guards decide recompilation, whatever the backend
    with torch.compiler.config.patch(dynamic_sources=""):  # torch's allow list as this process found it, restored
        if marked:
            compile_setup.mark_packed_boundaries_dynamic()
            assert torch.compiler.config.dynamic_sources.split(",") == list(compile_setup.PACKED_BOUNDARY_SOURCES)
        for lengths in ([10, 22], [5, 7, 20], [8, 8, 8, 8], [30, 2]):
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
            batch = {"input_ids": torch.randint(0, 64, (1, sum(lengths))), "cu_seqlens": cu,
                     "max_seqlen": max(lengths)}
            positions = torch.cat([torch.arange(n) for n in lengths])[None]
            model(input_ids=batch["input_ids"], position_ids=positions, use_cache=False,
                  **attention.varlen_kwargs(batch))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()
