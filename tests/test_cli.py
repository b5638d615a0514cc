"""The ``allmos`` command line: fast help without torch, generate / chat / bench on tiny models."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_reference import hf_greedy

from allmos import LLM, SamplingParams
from allmos.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
ENGINE_FLAGS = ["--device", "cpu", "--kvcache-block-size", "16", "--max-model-len", "256"]

HELP_PROBE = """
import runpy, sys
sys.argv = ["allmos", *sys.argv[1:]]
try:
    runpy.run_module("allmos.cli", run_name="__main__")
except SystemExit as exc:
    assert exc.code == 0, exc.code
print("IMPORTED:", sorted(m for m in ("torch", "transformers", "allmos.engine") if m in sys.modules))
"""


def _run(args: list[str], stdin: str = "", timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["chat", "--help"], ["bench", "--help"]])
def test_help_does_not_import_torch(argv):
    proc = _run(["-c", HELP_PROBE, *argv])
    assert proc.returncode == 0, proc.stderr
    assert "usage: allmos" in proc.stdout
    assert "IMPORTED: []" in proc.stdout, proc.stdout


def test_bench_help_names_the_model_it_builds():
    text = build_parser()._subparsers._group_actions[0].choices["bench"].format_help()
    assert "Qwen3-0.6B" in text and "random" in text
    assert "SmolLM2" not in text


def test_generate_matches_transformers_greedy(tiny_llama_real_tokenizer, capsys):
    folder = tiny_llama_real_tokenizer
    main(["generate", "--model", str(folder), "--max-tokens", "5", *ENGINE_FLAGS, "The weather today"])
    printed = capsys.readouterr().out

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.encode("The weather today")
    reference = hf_greedy(folder, [ids], 5)[0]  # EOS ignored: cut it where the engine stops
    eos = {2, tok.eos_token_id}
    cut = next((i + 1 for i, t in enumerate(reference) if t in eos), len(reference))
    expected = tok.decode(reference[:cut], skip_special_tokens=True)
    assert printed == expected + "\n"


def test_generate_reads_prompts_from_stdin(tiny_llama_real_tokenizer, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("first prompt\n\nsecond prompt\n"))
    main(["generate", "--model", str(tiny_llama_real_tokenizer), "--max-tokens", "3", *ENGINE_FLAGS])
    printed = capsys.readouterr().out
    assert printed.startswith("### first prompt\n") and "\n### second prompt\n" in printed
    assert printed.count("### ") == 2  # the blank line is not a prompt


def test_bad_option_is_a_message_not_a_traceback(qwen3_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(qwen3_dir), "--max-tokens", "0", *ENGINE_FLAGS, "hi"])
    assert exc.value.code == 2
    assert "max_tokens" in capsys.readouterr().err


def _expected_replies(folder: Path, turns: list[str], max_tokens: int) -> list[str]:
    """Greedy replies of the library's own chat() with the same growing history."""
    llm = LLM(str(folder), device="cpu", kvcache_block_size=16, max_model_len=256)
    history, replies = [], []
    for turn in turns:
        history.append({"role": "user", "content": turn})
        reply = llm.chat(history, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)[0].text
        history.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def test_chat_with_piped_stdin_prints_only_the_replies(tiny_llama_real_tokenizer):
    folder = tiny_llama_real_tokenizer
    turns = ["zebra quokka one", "zebra quokka two"]
    proc = _run(["-m", "allmos.cli", "chat", "--model", str(folder), "--max-tokens", "4", *ENGINE_FLAGS],
                stdin="\n".join(turns) + "\n")
    assert proc.returncode == 0, proc.stderr
    assert "you>" not in proc.stdout and "assistant>" not in proc.stdout
    assert "zebra quokka" not in proc.stdout  # the input is not echoed
    assert proc.stdout == "".join(r + "\n" for r in _expected_replies(folder, turns, 4))


def test_chat_on_a_terminal_prompts(tiny_llama_real_tokenizer, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("hello there\n/exit\n"))
    main(["chat", "--model", str(tiny_llama_real_tokenizer), "--max-tokens", "3", *ENGINE_FLAGS])
    printed = capsys.readouterr().out
    assert printed.startswith("you> assistant> ") and printed.endswith("you> ")


def test_bench_runs_a_tiny_workload(tiny_model_factory, capsys):
    folder = tiny_model_factory("qwen3", vocab_size=10_240)  # the workload's token ids go up to 10,000
    main(["bench", "--model", str(folder), "--num-seqs", "3", "--min-input-len", "4", "--max-input-len", "9",
          "--min-output-len", "2", "--max-output-len", "5", *ENGINE_FLAGS])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    from allmos.benchmark import standard_workload

    expected_tokens = standard_workload(3, 4, 9, 2, 5).num_output_tokens
    assert line.startswith(f"Total: {expected_tokens}tok, Time: ") and line.endswith("tok/s")


def test_quantization_flag_reaches_the_engine(tiny_llama_real_tokenizer, capsys, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="allmos"):
        main(["generate", "--model", str(tiny_llama_real_tokenizer), "--max-tokens", "3", "--quantization", "int8",
              "--dtype", "float32", *ENGINE_FLAGS, "hello"])
    assert any("quantization=int8" in r.getMessage() for r in caplog.records)
    serve = build_parser().parse_args(["serve", "--quantization", "int4"])
    from allmos.cli import serve_engine_kwargs

    assert serve_engine_kwargs(serve)["quantization"] == "int4"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--quantization", "fp4"])
    assert "invalid choice" in capsys.readouterr().err


def test_compilation_config_flag_reaches_the_engine_kwargs(capsys):
    from allmos.cli import serve_engine_kwargs

    assert serve_engine_kwargs(build_parser().parse_args(["serve"]))["compilation_config"] == 0
    assert serve_engine_kwargs(build_parser().parse_args(["serve", "-O", "3"]))["compilation_config"] == 3
    args = build_parser().parse_args(["generate", "--compilation-config", "2", "hello"])
    assert args.compilation_config == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "-O", "1"])
    assert "invalid choice" in capsys.readouterr().err
