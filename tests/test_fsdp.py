"""FSDP2, run for real on CPU processes (torchrun, gloo): two sharded processes train exactly like one process
accumulating the same micro-batches, checkpoints are sharded and resume on 2 and on 1 process, the final
folder is a plain Hugging Face model (or PEFT adapter), and each process holds about half the state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_engine_support import grpo_task, losses, make_config, make_rows, sigterm_one_worker, train
from tuneforge.config import load
from tuneforge.config.errors import ConfigError

RUN = {"micro_batch_size": 2, "max_steps": 4, "learning_rate": 1e-3, "lr_scheduler": "constant",
       "optimizer": "adamw_torch", "save_steps": 2, "save_strategy": "steps", "logging_steps": 1}
NO_SAVES = {**{k: v for k, v in RUN.items() if k != "save_steps"}, "save_strategy": "no"}  # save_steps would contradict
FSDP = {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}}
TOL = 1e-4  # fp32, as the issue states; observed differences are ~1e-7


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def _script_reports(tmp_path: Path, script_text: str, *args: str) -> list[dict]:
    """Run a script on 2 processes; the JSON lines it prints, one per process."""
    script = tmp_path / "script.py"
    script.write_text(script_text)
    done = _torchrun(str(script), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [obj for line in done.stdout.splitlines() if line.startswith("{") for obj in _objects(line)]
    assert len(reports) == 2
    return reports


def _objects(line: str) -> list[dict]:
    """The JSON objects of one line: unbuffered, two processes' prints can meet on one line ({..}{..})."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while at < len(line):
        obj, at = decoder.raw_decode(line, at)
        found.append(obj)
    return found


def _train_records(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "train"]
    assert len({r["step"] for r in steps}) == len(steps)  # one writer
    return {r["step"]: r["loss"] for r in steps}


def _close(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b), (a, b)
    for step in a:
        assert abs(a[step] - b[step]) <= TOL, (step, a, b)


@pytest.mark.slow
def test_full_finetune_matches_one_process_and_resumes_on_2_and_1(tmp_path, tiny_model_dir):
    rows = make_rows(n=24, seed=3)
    single = train(make_config(tmp_path / "single", tiny_model_dir, rows, gradient_accumulation_steps=2, **RUN))
    make_config(tmp_path / "fsdp", tiny_model_dir, rows, gradient_accumulation_steps=1, **RUN, **FSDP)
    config = str(tmp_path / "fsdp" / "config.yaml")
    done = _torchrun("-m", "tuneforge.cli", "train", config)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "fsdp" / "out"
    whole = _train_records(out)
    _close(whole, losses(single))

    # The final folder is a plain transformers model equal to the single process's.
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "single" / "out" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    # Within 5e-5, 5% of one AdamW step (lr 1e-3): the reduction order moves near-zero-gradient weights by about
    # 1e-5 (AdamW divides by sqrt(v)); a lost or doubled micro-batch moves weights by whole steps.
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 5e-5
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))  # loads as is

    # Checkpoints hold each process's shards (DCP), no gathered weights.
    ckpt = out / "checkpoint-2"
    assert sorted(p.name for p in (ckpt / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "model.safetensors").exists() and not (ckpt / "optimizer.pt").exists()

    # Resume on 2 processes, and on 1 process accumulating both micro-batches: the same losses for steps 3-4.
    again = _torchrun("-m", "tuneforge.cli", "train", config, "--output-dir", str(tmp_path / "r2"),
                      "--resume-from-checkpoint", str(ckpt))
    assert again.returncode == 0, again.stderr[-3000:]
    _close(_train_records(tmp_path / "r2"), {s: v for s, v in whole.items() if s > 2})
    one = train(load(config, ["--output-dir", str(tmp_path / "r1"), "--gradient-accumulation-steps", "2",
                              "--resume-from-checkpoint", str(ckpt)]))
    _close(losses(one), {s: v for s, v in whole.items() if s > 2})


@pytest.mark.slow
def test_lora_matches_one_process_and_saves_a_peft_adapter(tmp_path, tiny_model_dir):
    rows = make_rows(n=24, seed=4)
    keys = {**NO_SAVES, "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}
    single = train(make_config(tmp_path / "single", tiny_model_dir, rows, gradient_accumulation_steps=2, **keys))
    make_config(tmp_path / "fsdp", tiny_model_dir, rows, gradient_accumulation_steps=1, **keys, **FSDP)
    done = _torchrun("-m", "tuneforge.cli", "train", str(tmp_path / "fsdp" / "config.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "fsdp" / "out"
    _close(_train_records(out), losses(single))
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "single" / "out" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and any("lora_B" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 0  # it trained (B starts at zero)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out))


@pytest.mark.slow
def test_generation_during_evaluation_matches_one_process(tmp_path, tiny_model_dir):
    """generate_samples and do_causal_lm_eval under FSDP2: each process generates from a whole copy of the model
    refreshed from the shards (the sharded model cannot generate: its forwards gather with every process). After
    two updates, the greedy samples and the corpus scores equal those of one process accumulating both
    micro-batches, whose model is the same; the untrained model's samples differ, so a copy that was not
    refreshed would show. The 6 evaluation rows make 3 batches, 2 on one process and 1 on the other: the
    uneven split must not leave one process waiting in a forward for the other."""
    rows = make_rows(n=24, seed=5)
    keys = {**NO_SAVES, "max_steps": 2, "val_set_size": 0.25, "eval_strategy": "steps", "eval_steps": 2,
            "generate_samples": True, "num_generation_samples": 3, "generation_do_sample": False,
            "generation_max_new_tokens": 6, "do_causal_lm_eval": True, "eval_causal_lm_metrics": ["sacrebleu", "chrf"],
            "learning_rate": 1e-2}
    single = tmp_path / "single"
    train(make_config(single, tiny_model_dir, rows, gradient_accumulation_steps=2, **keys))
    make_config(tmp_path / "fsdp", tiny_model_dir, rows, gradient_accumulation_steps=1, **keys, **FSDP)
    done = _torchrun("-m", "tuneforge.cli", "train", str(tmp_path / "fsdp" / "config.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {}
    for name, out in (("single", single / "out"), ("fsdp", tmp_path / "fsdp" / "out")):
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
        runs[name] = ([r for r in records if r["type"] == "eval"], samples)
    (evals, samples), (sharded_evals, sharded_samples) = runs["single"], runs["fsdp"]
    assert len(evals) == len(sharded_evals) == 1 and len(samples) == 3
    assert [(x["prompt"], x["completion"]) for x in sharded_samples] == [(x["prompt"], x["completion"]) for x in samples]
    for key in ("eval_sacrebleu", "eval_chrf", "eval_loss"):
        assert abs(sharded_evals[0][key] - evals[0][key]) <= TOL, (key, evals, sharded_evals)
    train(make_config(tmp_path / "still", tiny_model_dir, rows, gradient_accumulation_steps=2,
                      **{**keys, "learning_rate": 1e-12}))
    untrained = [json.loads(x) for x in (tmp_path / "still" / "out" / "samples.jsonl").read_text().splitlines()]
    assert [x["completion"] for x in untrained] != [x["completion"] for x in samples]


@pytest.mark.slow
def test_dpo_with_reference_matches_one_process(tmp_path, tiny_model_dir):
    pairs = [{"prompt": f"say {i}", "chosen": f"{i} yes", "rejected": f"{i + 1} no"} for i in range(16)]
    keys = {**NO_SAVES, "rl": "dpo"}
    single = train(make_config(tmp_path / "single", tiny_model_dir, pairs, gradient_accumulation_steps=2, **keys))
    make_config(tmp_path / "fsdp", tiny_model_dir, pairs, gradient_accumulation_steps=1, **keys, **FSDP)
    done = _torchrun("-m", "tuneforge.cli", "train", str(tmp_path / "fsdp" / "config.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    _close(_train_records(tmp_path / "fsdp" / "out"), losses(single))


@pytest.mark.slow
@pytest.mark.parametrize("trl", [{}, {"async_prefetch": True}], ids=["synchronous", "async_prefetch"])
def test_grpo_matches_one_process(tmp_path, tiny_model_dir, trl):
    """GRPO under FSDP2: each process generates from a whole copy of the model refreshed from the shards. On
    two processes it gives the same generations, rewards and losses as data parallelism (which replicates
    the model; sampling is seeded per process, so both runs draw the same completions). Step 3 generates
    anew after two updates (num_iterations 2), so a copy that was not refreshed would differ there. With
    trl.async_prefetch the next rollout is generated in a background thread from a snapshot of that whole
    copy (no collective runs there), one step behind, as under data parallelism."""
    import yaml

    base = grpo_task(tmp_path, tiny_model_dir, **trl)
    for name, extra in (("plain", {}), ("fsdp", FSDP)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**base, **extra, "output_dir": str(tmp_path / name)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)}
    runs = {}
    for name in ("plain", "fsdp"):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                               "tuneforge.cli", "train", str(tmp_path / f"{name}.yaml")], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = {r["step"]: r for r in records if r["type"] == "train"}
    assert sorted(runs["fsdp"]) == [1, 2, 3]
    for step in (1, 2, 3):  # the same generations (same seeds), rewards and updates as data parallelism
        for key in ("loss", "reward", "completions/mean_length"):
            assert abs(runs["fsdp"][step][key] - runs["plain"][step][key]) <= TOL, (step, key, runs)


SHARE_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from tuneforge.config.distributed import FsdpConfig
    from tuneforge.distributed import fsdp

    dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    total = sum(p.numel() for p in model.parameters())

    class Root(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, ids):  # the root's hooks gather its own parameters (embeddings, head) around this
            return self.model(input_ids=ids, labels=ids).loss

    root = Root(model)
    fsdp.shard(root, model, FsdpConfig())
    optimizer = torch.optim.AdamW(root.parameters(), lr=1e-3)
    ids = torch.randint(0, 900, (2, 16))
    root(ids).backward()
    optimizer.step()
    held = sum(p.to_local().numel() for p in root.parameters())
    states = sum(v.to_local().numel() for s in optimizer.state.values() for k, v in s.items() if k != "step")
    print(json.dumps({"rank": dist.get_rank(), "total": total, "held": held, "states": states}), flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_each_process_holds_half_the_parameters_and_optimizer_state(tmp_path, tiny_model_dir):
    reports = _script_reports(tmp_path, SHARE_SCRIPT, str(tiny_model_dir))
    for r in reports:
        assert abs(r["held"] - r["total"] / 2) <= 0.1 * r["total"] / 2, r  # dim-0 shards: rows split evenly
        assert abs(r["states"] - 2 * r["total"] / 2) <= 0.1 * r["total"], r  # AdamW: two moments per held value
    assert sum(r["held"] for r in reports) == reports[0]["total"]


# ---------------------------------------------------------------- configuration
def _cfg(**keys):
    return load(data={"base_model": "x", "datasets": [{"path": "d.jsonl"}], **keys})


def test_axolotl_fsdp1_spellings_map_to_fsdp2(caplog):
    cfg = _cfg(fsdp=["full_shard", "auto_wrap", "offload"],
               fsdp_config={"fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                            "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_use_orig_params": False})
    assert cfg.fsdp_enabled and cfg.fsdp_version == 2
    fc = cfg.fsdp_config
    assert fc.offload_params and fc.reshard_after_forward and fc.transformer_layer_cls_to_wrap == ["LlamaDecoderLayer"]
    assert fc.state_dict_type == "FULL_STATE_DICT"
    assert _cfg(fsdp_version=1, fsdp_config={"reshard_after_forward": False}).fsdp_version == 2
    assert not _cfg(fsdp=["shard_grad_op"]).fsdp_config.reshard_after_forward
    assert _cfg(fsdp_config={"activation_checkpointing": True}).gradient_checkpointing
    assert not _cfg().fsdp_enabled


@pytest.mark.parametrize("keys, where, words", [
    ({"fsdp": ["hybrid_shard"]}, "fsdp", "not supported"),
    ({"fsdp_config": {"reshard_after_forwrd": True}}, "fsdp_config.reshard_after_forwrd", "reshard_after_forward"),
    ({"fsdp_version": 2, "deepspeed": "zero3.json"}, "deepspeed", "keep one"),
    ({"deepspeed": "missing.json"}, "deepspeed", "not found"),
    ({"fsdp_version": 2, "adapter": "lora", "load_in_8bit": True}, "load_in_8bit", "8-bit base"),
    ({"fsdp_version": 2, "dp_shard_size": 2, "dp_replicate_size": 2}, "dp_replicate_size", "HSDP"),
    ({"dp_shard_size": 2}, "dp_shard_size", "fsdp_version: 2"),
    ({"fsdp_version": 2, "dp_shard_size": 0}, "dp_shard_size", "-1 for all"),
])
def test_bad_sharding_configs_name_the_key(keys, where, words):
    with pytest.raises(ConfigError) as err:
        _cfg(**keys)
    text = str(err.value)
    assert where in text and words.lower() in text.lower(), text


def test_dp_shard_size_must_be_the_process_count():
    """Axolotl's N-D key, for the one layout FSDP2 runs here: every process holds one shard."""
    from tuneforge.config.distributed import check_shard_size

    cfg = _cfg(fsdp_version=2, dp_shard_size=4, dp_replicate_size=1)
    check_shard_size(cfg, 4)
    with pytest.raises(ConfigError, match=r"dp_shard_size.*is 4, but 2 process.*--num-processes 4"):
        check_shard_size(cfg, 2)
    check_shard_size(_cfg(fsdp_version=2, dp_shard_size=-1), 2)


def test_a_layer_class_not_in_the_model_lists_the_real_ones(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.distributed.fsdp import ShardingError, layer_classes

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert {c.__name__ for c in layer_classes(model, None)} == {"LlamaDecoderLayer"}
    with pytest.raises(ShardingError, match="MistralDecoderLayer is not a module of this model.*LlamaDecoderLayer"):
        layer_classes(model, ["MistralDecoderLayer"])


def test_deepspeed_json_maps_to_the_fsdp_equivalent(tmp_path):
    from tuneforge.config.distributed import deepspeed_settings, fsdp_equivalent

    (tmp_path / "z3.json").write_text(json.dumps({"zero_optimization": {
        "stage": 3, "offload_param": {"device": "cpu"}}}))
    (tmp_path / "bad.json").write_text("{not json")
    cfg = load(data={"base_model": "x", "datasets": [{"path": "d"}], "deepspeed": str(tmp_path / "z3.json")})
    assert fsdp_equivalent(deepspeed_settings(cfg)) == {"reshard_after_forward": True, "offload_params": True}
    assert fsdp_equivalent({"zero_optimization": {"stage": 2}}) == {"reshard_after_forward": False}
    with pytest.raises(ConfigError, match="not valid JSON"):
        load(data={"base_model": "x", "datasets": [{"path": "d"}], "deepspeed": str(tmp_path / "bad.json")})


# ---------------------------------------------------------------- launching
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_one_host_train_like_one_process(tmp_path, tiny_model_dir):
    """Two `tuneforge train --nnodes 2` commands (one process each) meet at a localhost rendezvous: the run
    equals one process accumulating both micro-batches, with one writer."""
    rows = make_rows(n=24, seed=5)
    keys = {**NO_SAVES}
    single = train(make_config(tmp_path / "single", tiny_model_dir, rows, gradient_accumulation_steps=2, **keys))
    make_config(tmp_path / "nodes", tiny_model_dir, rows, gradient_accumulation_steps=1, **keys, **FSDP)
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "train", str(tmp_path / "nodes" / "config.yaml"),
                               "--nnodes", "2", "--node-rank", str(rank), "--num-processes", "1",
                               "--rdzv-endpoint", endpoint], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for rank in (0, 1)]
    outputs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [o[1][-2000:] for o in outputs]
    _close(_train_records(tmp_path / "nodes" / "out"), losses(single))


def test_launcher_arguments():
    from tuneforge.distributed.launch import LaunchOptions, launcher_args
    from tuneforge.errors import TuneforgeError

    one_machine = launcher_args(LaunchOptions(num_processes=4), ["train", "c.yaml", "--max-steps", "3"])
    assert one_machine == ["--nproc_per_node=4", "--nnodes=1", "--standalone", "-m", "tuneforge.cli", "train",
                           "c.yaml", "--max-steps", "3"]
    two = launcher_args(LaunchOptions(2, nnodes=2, node_rank=1, rdzv_endpoint="n0:29500"), ["train", "c.yaml"])
    assert two[:5] == ["--nproc_per_node=2", "--nnodes=2", "--node_rank=1", "--rdzv_backend=c10d",
                       "--rdzv_endpoint=n0:29500"]
    with pytest.raises(TuneforgeError, match="--rdzv-endpoint"):
        launcher_args(LaunchOptions(1, nnodes=2), ["train", "c.yaml"])
    with pytest.raises(TuneforgeError, match="node rank"):
        launcher_args(LaunchOptions(1, nnodes=2, node_rank=2, rdzv_endpoint="n0:1"), ["train", "c.yaml"])


@pytest.mark.slow
def test_sigterm_to_one_sharded_process_leaves_one_complete_checkpoint(tmp_path, tiny_model_dir):
    rows = make_rows(n=24, seed=3)
    make_config(tmp_path / "run", tiny_model_dir, rows, max_steps=100000, logging_steps=1, save_strategy="no",
                lr_scheduler="constant", **FSDP)
    config = tmp_path / "run" / "config.yaml"
    metrics = tmp_path / "run" / "out" / "metrics.jsonl"
    err = sigterm_one_worker([sys.executable, "-m", "tuneforge.cli", "train", str(config), "--num-processes", "2"],
                             metrics, after_lines=4)
    checkpoints = sorted((tmp_path / "run" / "out").glob("checkpoint-*"))
    assert len(checkpoints) == 1, (checkpoints, err[-3000:])
    ckpt = checkpoints[0]
    assert sorted(p.name for p in (ckpt / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert "Resume with" in err
    step = int(ckpt.name.split("-")[1])
    # The uninterrupted run's next two losses, against a resume on one process accumulating two micro-batches.
    whole = train(load(str(config), ["--output-dir", str(tmp_path / "whole"), "--max-steps", str(step + 2),
                                     "--gradient-accumulation-steps", "2", "--fsdp-version", "2"]))
    one = train(load(str(config), ["--output-dir", str(tmp_path / "r1"), "--max-steps", str(step + 2),
                                   "--gradient-accumulation-steps", "2", "--resume-from-checkpoint", str(ckpt)]))
    _close(losses(one), {s: v for s, v in losses(whole).items() if s > step})


def test_shipped_deepspeed_configs_fetch_and_map(tmp_path):
    from tuneforge.config.distributed import fsdp_equivalent
    from tuneforge.fetch import run

    dest = run("deepspeed_configs", tmp_path / "ds")
    files = sorted(dest.glob("*.json"))
    assert {f.name for f in files} >= {"zero1.json", "zero2.json", "zero3.json", "zero3_bf16.json"}
    for f in files:
        stage = json.loads(f.read_text())["zero_optimization"]["stage"]
        block = fsdp_equivalent(json.loads(f.read_text()))
        assert block["reshard_after_forward"] == (stage == 3)
        assert block.get("offload_params", False) == ("cpuoffload" in f.name)
        cfg = load(data={"base_model": "x", "datasets": [{"path": "d"}], "deepspeed": str(f)})
        assert cfg.deepspeed == str(f)


@pytest.mark.slow
def test_resuming_a_sharded_checkpoint_of_another_model_is_one_clear_error(tmp_path, tiny_model_dir):
    from tuneforge.errors import TuneforgeError

    rows = make_rows(n=8, seed=1)
    lora = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj"]}
    train(make_config(tmp_path / "a", tiny_model_dir, rows, max_steps=1, save_steps=1, **lora, **FSDP))
    ckpt = tmp_path / "a" / "out" / "checkpoint-1"
    other = make_config(tmp_path / "b", tiny_model_dir, rows, max_steps=2, resume_from_checkpoint=str(ckpt),
                        **{**lora, "lora_target_modules": ["v_proj"]}, **FSDP)
    with pytest.raises(TuneforgeError, match="does not fit this run's model.*config that wrote it"):
        train(other)
    plain = make_config(tmp_path / "c", tiny_model_dir, rows, max_steps=2, resume_from_checkpoint=str(ckpt), **lora)
    with pytest.raises(TuneforgeError, match="FSDP2 checkpoint"):
        train(plain)


def test_bf16_mixed_precision_policy_trains_like_autocast(tmp_path, tiny_model_dir):
    """FSDP2 computes in bf16 through its mixed-precision policy (fp32 shards, bf16 gathers, fp32 reduction),
    not autocast: one process, bf16 on CPU, against plain training under bf16 autocast."""
    import torch

    rows = make_rows(n=16, seed=2)
    keys = {**RUN, "save_strategy": "no", "bf16": True, "max_steps": 3}
    keys.pop("save_steps")
    plain = train(make_config(tmp_path / "plain", tiny_model_dir, rows, **keys))
    sharded = train(make_config(tmp_path / "fsdp", tiny_model_dir, rows, **keys, **FSDP))
    a, b = losses(plain), losses(sharded)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step] - b[step]) <= 2e-2 * abs(a[step]), (a, b)  # bf16 rounding, not another model
    weights = next(p for p in sharded.model.parameters())
    assert getattr(weights, "to_local", lambda: weights)().dtype == torch.float32  # fp32 master shards
