"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers reading the same file."""

import math
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxinfer as ji
from jaxinfer.chat import render_chat
from jaxinfer.checkpoint import default_model_path
from jaxinfer.perplexity import windows

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village, there lived",
]
TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
    "Locally nicknamed \"La dame de fer\" (French for \"Iron Lady\"), it was constructed as the centrepiece "
    "of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution. Although "
    "initially criticised by some of France's leading artists and intellectuals for its design, it has "
    "since become a global cultural icon of France and one of the most recognisable structures in the world.\n"
)


@pytest.fixture(scope="module")
def ours():
    return ji.load("smollm2-135m-instruct", dtype=jnp.float32)


@pytest.fixture(scope="module")
def theirs():
    import transformers

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def test_logits_match(ours, theirs):
    hf, tok = theirs
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        assert ours.encode(prompt) == ids
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        cache = ji.init_cache(ours.config, 1, 64, jnp.float32)
        got, _ = ji.forward(ours.params, cache, jnp.asarray([ids]), config=ours.config)
        err = np.linalg.norm(np.asarray(got[0]) - ref) / np.linalg.norm(ref)
        assert err < 1e-3, (prompt, err)


def test_greedy_48_tokens_match(ours, theirs):
    hf, tok = theirs
    messages = [{"role": "user", "content": "Name three primary colours."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(ids):].tolist()
    got = ji.generate(ours, [ids], max_new_tokens=48, stop_ids=[], max_len=256)
    # Our eos stops are off only if the reference ran all 48 tokens; compare up to our stop otherwise.
    got_ids = got.token_ids[0]
    assert got_ids == ref[: len(got_ids)]
    assert len(got_ids) == 48 or got_ids[-1] in ours.eos_ids


def test_chat_template_renders_identically(ours, theirs):
    _, tok = theirs
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    for add in (True, False):
        expected = tok.apply_chat_template(conversation, add_generation_prompt=add, tokenize=False)
        assert render_chat(ours, conversation, add_generation_prompt=add) == expected


def test_chat_is_coherent(ours):
    reply = ji.chat(ours, [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert "Paris" in reply


def hf_perplexity(hf, ids, window, stride):
    total, count = 0.0, 0
    for begin, end, first in windows(len(ids), window, stride):
        with torch.no_grad():
            logits = hf(torch.tensor([ids[begin:end]])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(ids[begin + 1 : end])
        nll = -logp.gather(1, targets[:, None])[:, 0]
        scored = nll[first - begin - 1 :]
        total, count = total + float(scored.sum()), count + len(scored)
    return math.exp(total / count)


def test_perplexity_cli_matches_transformers(ours, theirs, tmp_path):
    hf, tok = theirs
    path = tmp_path / "text.txt"
    path.write_text(TEXT * 2)
    out = subprocess.run(
        [sys.executable, "-m", "jaxinfer", "perplexity", "--file", str(path), "--window", "96", "--stride", "64"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("perplexity: ")
    ours_ppl = float(last.split()[-1])
    ref = hf_perplexity(hf, tok(TEXT * 2)["input_ids"], 96, 64)
    assert abs(ours_ppl - ref) / ref < 0.005, (ours_ppl, ref)
    assert 1.0 < ref < 100.0


def test_windows_cover_every_token_once():
    spans = windows(1000, 128, 50)
    scored = [p for _, end, first in spans for p in range(first, end)]
    assert scored == list(range(1, 1000))
    # Without overlap each window's first token has no context in that window and is not scored.
    assert windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "jaxinfer", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_generate_streams_and_reports_speed():
    out = _cli("generate", "What is the capital of France?", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "tok/s" in out.stderr
    assert "(contraction-last, q/k/v packed)" in out.stderr  # float weights get the default decode layout


def test_cli_chat_multi_turn():
    out = subprocess.run(
        [sys.executable, "-m", "jaxinfer", "chat", "--max-new-tokens", "16"],
        input="What is the capital of France?\nAnd of Italy?\n", capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "Rome" in out.stdout


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda d: ["generate", "hi", "--model", str(d / "missing.gguf")], "not found"),
        (lambda d: ["generate", "hi", "--model", str(d / "corrupt.gguf")], "corrupt.gguf"),
        (lambda d: ["perplexity", "--file", str(d / "empty.txt")], "empty"),
        (lambda d: ["perplexity", "--file", str(d / "nope.txt")], "no such text file"),
    ],
)
def test_cli_bad_inputs_one_line_error(tmp_path, make_args, message):
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    (tmp_path / "empty.txt").write_text("  \n")
    out = _cli(*make_args(tmp_path))
    assert out.returncode != 0
    lines = [l for l in out.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_cli_quantized_runs(tmp_path):
    """The CLI's quantization switches end to end on the default model: GGUF blocks kept quantized with an
    int8 KV cache, calibrated int8 quantization with an fp8 KV cache, and fp8 after the contraction-last
    layout, still answer correctly; the first two keep the stored order (the default layout only takes
    float trees), the third is contraction-last."""
    text = tmp_path / "calib.txt"
    text.write_text("Paris is the capital and largest city of France. " * 40)
    for extra, layout in ((["--keep-quantized", "--kv-cache", "int8"], False),
                          (["--quant", "int8", "--calibrate", str(text), "--kv-cache", "fp8"], False),
                          (["--weight-layout", "contract-last", "--quant", "fp8"], True)):
        out = _cli("generate", "What is the capital of France?", "--max-new-tokens", "12", *extra)
        assert out.returncode == 0, out.stderr
        assert "Paris" in out.stdout, (extra, out.stdout)
        assert ("contraction-last" in out.stderr) == layout, (extra, out.stderr)
        assert "q/k/v packed" not in out.stderr  # quantized trees stay unpacked
    out = _cli("generate", "hi", "--calibrate", str(text))
    assert out.returncode != 0 and "--calibrate needs --quant" in out.stderr
    out = _cli("generate", "hi", "--weight-layout", "contract-last", "--keep-quantized")
    assert out.returncode != 0 and "takes float weights" in out.stderr
