"""`vllm.serve_module` (Axolotl's choice of vLLM server script): accepted with a note naming tuneforge's server."""

from __future__ import annotations

from config_support import issues_of, notes_of


def test_axolotls_lora_server_module_is_replaced_by_tuneforge_vllm_serve(tmp_path, caplog):
    cfg, notes = notes_of(tmp_path, caplog, "vllm:\n  gpu_memory_utilization: 0.7\n"
                          "  serve_module: axolotl.scripts.vllm_serve_lora\n  enforce_eager: true\n")
    assert (cfg.vllm.gpu_memory_utilization, cfg.vllm.enforce_eager) == (0.7, True)  # the rest of the block is kept
    [note] = [n for n in notes if "serve_module" in n]
    assert note == ("vllm.serve_module: axolotl.scripts.vllm_serve_lora is not used: it names Axolotl's LoRA-aware "
                    "vLLM server; `tuneforge vllm-serve cfg.yaml` is the generation server here "
                    "(docs/vllm-serving.md): with an adapter and trl.vllm_lora_sync: true it loads the adapter "
                    "natively, otherwise it receives the merged weights")


def test_another_module_gets_the_generic_note_and_an_empty_one_none(tmp_path, caplog):
    _, notes = notes_of(tmp_path, caplog, "vllm:\n  serve_module: trl.scripts.vllm_serve\n")
    assert [n for n in notes if "serve_module" in n] == [
        "vllm.serve_module: trl.scripts.vllm_serve is not used: it names a vLLM server script of Axolotl's; "
        "`tuneforge vllm-serve cfg.yaml` is the generation server here (docs/vllm-serving.md)"]
    caplog.clear()
    _, notes = notes_of(tmp_path, caplog, "vllm:\n  serve_module:\n")
    assert not [n for n in notes if "serve_module" in n]


def test_a_misspelt_key_of_the_block_is_still_an_error(tmp_path):
    [issue] = issues_of(tmp_path, "vllm:\n  serve_modul: axolotl.scripts.vllm_serve_lora\n")
    assert issue.path == "vllm.serve_modul"
