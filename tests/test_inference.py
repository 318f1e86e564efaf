"""inference: the trained adapter generates exactly like the merged model in plain transformers, with the
training-time chat template, stops at end-of-turn tokens, streams, and drives a small chat REPL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tuneforge.errors import ModelError

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def make_run(base: Path, out: Path, template: str | None = CHATML) -> Path:
    """What an adapter run leaves in output_dir: the adapter (perturbed LoRA) and the tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    torch.manual_seed(0)  # LoRA's A matrices are drawn from the global RNG: the same adapter in any test order
    model = get_peft_model(_load(base), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.chat_template = template
    tok.save_pretrained(str(out))
    return out


@pytest.fixture
def run_cfg(tiny_model_dir, tmp_path, write_config):
    from tuneforge.config import load

    make_run(tiny_model_dir, tmp_path / "out")
    return load(write_config({"adapter": "lora", "lora_target_modules": ["q_proj", "v_proj", "up_proj"]}))


def test_adapter_generation_equals_merged_model_in_plain_transformers(run_cfg, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from tuneforge.inference import generate, load_for_generation, stop_token_ids
    from tuneforge.merge import run as merge

    model, tok = load_for_generation(run_cfg)
    messages = [{"role": "user", "content": "reverse the word hello"}]
    ours = generate(model, tok, messages, max_new_tokens=24)

    merged_dir = merge(run_cfg)
    merged, mtok = _load(merged_dir), AutoTokenizer.from_pretrained(str(merged_dir))
    prompt = mtok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = mtok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    stop = [mtok.eos_token_id, mtok.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        out = merged.generate(ids, do_sample=False, max_new_tokens=24, eos_token_id=stop, pad_token_id=0)
    new = out[0, ids.shape[1]:].tolist()
    theirs = mtok.decode([t for t in new if t not in stop], skip_special_tokens=True)
    assert len(new) >= 5 and ours == theirs
    assert stop_token_ids(tok) == stop
    # The adapter must change the generation, or the comparison proves little.
    base = generate(_load(tiny_model_dir), tok, messages, max_new_tokens=24)
    assert base != ours


def test_prompt_is_rendered_with_the_training_template(run_cfg):
    from tuneforge.inference import load_for_generation, render

    _, tok = load_for_generation(run_cfg)
    ids = render(tok, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert tok.decode(ids) == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_raw_text_prompt_without_template(tiny_model_dir, tiny_tokenizer):
    from tuneforge.inference import render

    assert tiny_tokenizer.chat_template is None
    ids = render(tiny_tokenizer, [{"role": "user", "content": "hello world"}])
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "hello world"


def test_generation_stops_at_an_end_of_turn_token(run_cfg):
    from tuneforge.inference import generate, load_for_generation, render

    model, tok = load_for_generation(run_cfg)
    messages = [{"role": "user", "content": "count"}]
    prompt = torch.tensor([render(tok, messages)])
    with torch.no_grad():
        out = model.generate(input_ids=prompt, do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    ids = out[0, prompt.shape[1]:].tolist()
    # Declare a generated token (its first occurrence, after a few others) an end-of-turn token:
    # generation must end right before it, and the stop token is not part of the reply.
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    cut = generate(model, tok, messages, max_new_tokens=12, stop_ids=[ids[k]])
    assert cut == tok.decode(ids[:k], skip_special_tokens=True)
    assert generate(model, tok, messages, max_new_tokens=12, stop_ids=[999_999]) == tok.decode(ids, skip_special_tokens=True)


def test_config_eot_tokens_override_the_template(run_cfg):
    from tuneforge.inference import load_for_generation, stop_token_ids

    _, tok = load_for_generation(run_cfg)
    assert stop_token_ids(tok, ["<|eot_id|>"]) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")]
    with pytest.raises(ModelError, match="not a single token"):
        stop_token_ids(tok, ["no such token"])


def test_streamed_text_equals_returned_text(run_cfg):
    from tuneforge.inference import generate, load_for_generation

    model, tok = load_for_generation(run_cfg)
    chunks: list[str] = []
    text = generate(model, tok, [{"role": "user", "content": "hello"}], max_new_tokens=16, on_text=chunks.append)
    assert len(chunks) > 1 and "".join(chunks) == text


def test_sampling_with_top_k_1_is_greedy(run_cfg):
    from tuneforge.inference import generate, load_for_generation

    model, tok = load_for_generation(run_cfg)
    messages = [{"role": "user", "content": "hello"}]
    greedy = generate(model, tok, messages, max_new_tokens=12)
    torch.manual_seed(0)
    assert generate(model, tok, messages, max_new_tokens=12, temperature=0.8, top_k=1) == greedy
    torch.manual_seed(0)
    sampled = [generate(model, tok, messages, max_new_tokens=12, temperature=1.5) for _ in range(3)]
    assert any(s != greedy for s in sampled)


def test_chat_loop_commands():
    from tuneforge.inference import chat_loop

    seen: list[list[dict]] = []

    def reply(messages):
        seen.append([dict(m) for m in messages])
        return f"answer{len(seen)}"

    script = iter(["hi", "/system be brief", "again", "/undo", "/bogus", "", "/reset", "last", "/exit", "never"])
    out: list[str] = []
    history = chat_loop(reply, read=lambda _: next(script), write=out.append)
    assert seen[0] == [{"role": "user", "content": "hi"}]
    assert seen[1] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "answer1"},
        {"role": "user", "content": "again"},
    ]
    assert seen[2] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "last"}]
    assert history == seen[2] + [{"role": "assistant", "content": "answer3"}]
    assert any("unknown command /bogus" in line for line in out)


def test_chat_loop_undo_and_eof():
    from tuneforge.inference import chat_loop

    def read(_):
        if not script:
            raise EOFError
        return script.pop(0)

    script = ["one", "two", "/undo"]
    history = chat_loop(lambda m: "ok", read=read, write=lambda _: None, system="sys")
    assert history == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "ok"},
    ]


def test_cli_one_shot_from_option_and_stdin(run_cfg, tmp_path):
    from typer.testing import CliRunner

    from tuneforge.cli import app
    from tuneforge.inference import generate, load_for_generation

    model, tok = load_for_generation(run_cfg)
    expected = generate(model, tok, [{"role": "user", "content": "hello"}], max_new_tokens=10)
    assert expected.strip()
    config = str(tmp_path / "config.yaml")
    runner = CliRunner()
    by_option = runner.invoke(app, ["inference", config, "--prompt", "hello", "--max-new-tokens", "10"])
    assert by_option.exit_code == 0, by_option.output
    by_stdin = runner.invoke(app, ["inference", config, "--max-new-tokens", "10"], input="hello\n")
    assert by_stdin.exit_code == 0, by_stdin.output
    assert by_option.stdout.strip() == by_stdin.stdout.strip() == expected.strip()


def test_full_model_in_output_dir_is_loaded_directly(tiny_model_dir, tmp_path, write_config):
    from tuneforge.config import load
    from tuneforge.inference import find_sources

    model = _load(tiny_model_dir)
    model.save_pretrained(str(tmp_path / "out"))
    cfg = load(write_config({}))
    sources = find_sources(cfg)
    assert sources.model == str(tmp_path / "out") and sources.adapter is None


def test_lora_model_dir_without_adapter_is_a_clear_error(run_cfg, tmp_path):
    from tuneforge.inference import load_for_generation

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="adapter_config.json"):
        load_for_generation(run_cfg, lora_model_dir=str(tmp_path / "empty"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_qlora_run_on_cpu_is_a_clear_error(tiny_model_dir, tmp_path, write_config):
    from tuneforge.config import load
    from tuneforge.inference import load_for_generation

    make_run(tiny_model_dir, tmp_path / "out")
    cfg = load(write_config({"adapter": "qlora", "load_in_4bit": True, "lora_target_linear": True}))
    with pytest.raises(ModelError, match="CUDA GPU and the bitsandbytes"):
        load_for_generation(cfg)
