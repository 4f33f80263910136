"""Sampling speed: crslight's decoding engine beside Hugging Face ``generate``, same model, prompts and settings.

Both sample ``--new-tokens`` tokens for each of ``--batch`` chat prompts (temperature 1, no top-k / top-p, the
end-of-turn token ignored so that every row decodes exactly as many tokens), with the KV cache, in one process, in
each precision: float32, and bf16 autocast (float32 weights, as ``trainer.precision: bf16-mixed`` runs them; the
engine then decodes in bfloat16 without per-step casts). Three samplers: ``generate``, the engine on the Hugging
Face body (``lean=False``) and the engine's lean forward (``crslight.models.decoder``, the default for Llama bodies);
and the arithmetic floor: the same steps' matmuls alone. Each timing is the best of ``--repeats`` runs after one
warm-up. Prints tokens/s and the engine's speed-up, and with ``--out`` writes them as JSON.

    python benchmarks/decoding.py                      # SmolLM2-135M-Instruct, 8 x 32 tokens
    python benchmarks/decoding.py --model tiny --batch 4 --new-tokens 8 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch


def build(model_name: str):
    from crslight.models.loading import load_causal_lm, load_tokenizer, tiny_causal_lm

    tokenizer = load_tokenizer("smollm2", item_token=False)
    model = tiny_causal_lm(tokenizer, seed=0) if model_name == "tiny" else load_causal_lm(model_name)
    return model.eval(), tokenizer


def prompts_for(tokenizer, batch: int) -> list[list[int]]:
    from crslight.data.synthetic import USER_MOODS
    from crslight.models.tokenize import encode_prompt

    openers = [f"Hi! {opener}. Can you recommend a movie?" for _, _, opener in USER_MOODS.values()]
    return [encode_prompt(tokenizer, [{"role": "seeker", "text": openers[i % len(openers)], "items": []}])
            for i in range(batch)]


def time_generate(model, tokenizer, prompts, new_tokens: int) -> float:
    from crslight.modules.rollout import pack

    batch = pack(prompts, [[] for _ in prompts], tokenizer.pad_token_id)
    ids, mask = batch.input_ids[:, : batch.start], batch.attention_mask[:, : batch.start]
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - batch.start == new_tokens
    return elapsed


def time_engine(model, tokenizer, prompts, new_tokens: int, lean: bool = True) -> float:
    from crslight.models.engine import Engine

    engine = _engines.get((id(model), lean, torch.is_autocast_enabled("cpu")))
    if engine is None:  # one engine per setting, as a PPO rollout or a test keeps one: its weights are read once
        engine = Engine(model, tokenizer, max_new_tokens=new_tokens, temperature=1.0, lean=lean)
        engine.eos = set()  # as generate above: every row decodes new_tokens tokens
        _engines[(id(model), lean, torch.is_autocast_enabled("cpu"))] = engine
    start = time.perf_counter()
    generations = engine.generate(prompts)
    elapsed = time.perf_counter() - start
    assert all(len(g.tokens) == new_tokens for g in generations)
    return elapsed


_engines: dict = {}


def time_matmuls(model, batch: int, new_tokens: int, dtype: torch.dtype) -> float:
    """The arithmetic floor of decoding: the matmuls of ``new_tokens`` one-token steps of ``batch`` rows alone (each
    layer's fused projections and the LM head, the weights in ``dtype``), nothing else."""
    from crslight.models.decoder import lean_decoder

    weights = lean_decoder(model).weights(dtype)
    x = torch.randn(batch, model.config.hidden_size, dtype=dtype)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(new_tokens):
            for _, qkv, o, _, gate_up, down in weights["layers"]:
                torch.nn.functional.linear(x, qkv)
                torch.nn.functional.linear(x, o)
                torch.nn.functional.linear(torch.nn.functional.linear(x, gate_up)[:, : down.shape[1]], down)
            torch.nn.functional.linear(x, weights["embed"])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a folder")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = build(args.model)
    prompts = prompts_for(tokenizer, args.batch)
    results = {}
    samplers = (("generate", time_generate),
                ("engine_hf", lambda *a: time_engine(*a, lean=False)),
                ("engine", lambda *a: time_engine(*a, lean=True)))
    for precision in ("float32", "bf16-autocast"):
        context = torch.autocast("cpu", dtype=torch.bfloat16) if precision != "float32" else contextlib.nullcontext()
        with context:
            row = {}
            for name, fn in samplers:
                fn(model, tokenizer, prompts, args.new_tokens)  # warm-up
                best = min(fn(model, tokenizer, prompts, args.new_tokens) for _ in range(args.repeats))
                seconds = max(round(best, 6), 1e-6)  # the rates below are computed from what is reported
                row[name] = {"seconds": seconds, "tokens_per_s": round(args.batch * args.new_tokens / seconds, 1)}
            row["speedup"] = round(row["generate"]["seconds"] / row["engine"]["seconds"], 3)
        dtype = torch.float32 if precision == "float32" else torch.bfloat16
        floor = min(time_matmuls(model, args.batch, args.new_tokens, dtype) for _ in range(args.repeats + 1))
        row["matmul_floor"] = {"seconds": round(floor, 6),
                               "tokens_per_s": round(args.batch * args.new_tokens / max(floor, 1e-6), 1)}
        row["engine_of_floor"] = round(floor / row["engine"]["seconds"], 3)
        results[precision] = row
        print(f"{precision}: generate {row['generate']['tokens_per_s']} tokens/s, engine on the Hugging Face body "
              f"{row['engine_hf']['tokens_per_s']}, engine (lean) {row['engine']['tokens_per_s']}; engine / generate "
              f"{row['speedup']}x; the step's matmuls alone {row['matmul_floor']['tokens_per_s']} tokens/s (the lean "
              f"engine at {row['engine_of_floor']:.0%} of that)", flush=True)
    generate_fp32 = results["float32"]["generate"]["seconds"]
    fastest = min(r["engine"]["seconds"] for r in results.values())
    results["engine_best_vs_generate_float32"] = round(generate_fp32 / fastest, 2)
    print(f"fastest engine setting against generate in float32: {results['engine_best_vs_generate_float32']}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
