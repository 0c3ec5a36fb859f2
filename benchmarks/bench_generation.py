"""fedbridge's decoder against HF ``generate``, and DP few-shot synthesis against the code before it, in one run.

    python benchmarks/bench_generation.py                      # on this machine's device (CPU grid on a CPU)
    python benchmarks/bench_generation.py --device cuda --batches 1,16,64,256

Per model shape and batch size: tokens/s of fedbridge's decoder (``engine="fedbridge"``) and of HF ``generate``
(``engine="hf"``, the engine before this one, unchanged) on the same prompts (tweets as chat prompts, sampled at
temperature 0.8 / top-p 0.9 like FDKT's augmentation, 48 new tokens; twice as many prompts as slots from batch 16,
so rows end and are refilled; at batch 1, 2 prompts), their ratio, and the weight-read floor (the weights' bytes over the memory bandwidth
measured here: the fastest a batch-1 step can be). Shapes: SmolLM2-135M (the embedded weights when installed,
else random weights of its shape) and a 1B Llama-3.2 shape with SmolLM2's 49k vocabulary (0.97B parameters, random
weights). Greedy outputs of both engines (4 prompts, 2 slots, 16 tokens) are compared (``greedy equal``). On a CPU
the 1B shape runs at batch 1 only (minutes per engine).
DP few-shot: FDKT's mechanism (M = 4 groups of one shot, public top-100, σ = 0.8) writing one demonstration per
label from 300 tweets, by this tree and by ``fedbridge/privacy/dp_fewshot.py`` at ``--baseline`` (git), same seed.
Results: OUT.json and OUT.md (default benchmarks/results/generation).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedbridge.config import TaskConfig
from fedbridge.models.device import resolve_device
from fedbridge.models.generation import SamplingConfig, generate, render_prompt
from fedbridge.models.loading import load_llm
from fedbridge.privacy import dp_fewshot
from fedbridge.privacy.accounting import PrivacyLedger
from fedbridge.tasks import load_task

REPO = Path(__file__).resolve().parents[1]
BASELINE = "bff806f"  # the last commit with the one-prompt-at-a-time KV-cached DP few-shot
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=True)


def models(device: torch.device, names: list[str]):
    """(name, model, tokenizer, weights' source) for each shape, in the inference dtype of ``device``."""
    real, tok = load_llm("embedded", device=device)
    for name in names:
        if name == "smollm2-135m":
            yield name, real, tok, "embedded SmolLM2-135M-Instruct"
        else:
            torch.manual_seed(0)
            cfg = LlamaConfig(vocab_size=real.config.vocab_size, pad_token_id=tok.pad_token_id,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **LLAMA_1B)
            model = LlamaForCausalLM(cfg).to(device, real.dtype).eval()
            yield name, model, tok, "random weights"
            del model


def memory_bandwidth(device: torch.device, gib: float = 0.5) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    return 3 * 2 * src.numel() * 4 / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prompts(n: int) -> list[list[dict[str, str]]]:
    texts = load_task(TaskConfig(name="tweets", max_examples=max(n, 300)), 0).examples.texts
    return [[{"role": "user", "content": f"Write one more tweet like this one.\nTweet: {t}"}] for t in texts[:n]]


def time_engine(model, tok, chats, engine: str, batch: int, new_tokens: int) -> dict:
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0.8, top_p=0.9, batch_size=batch, engine=engine)
    generate(model, tok, chats[:batch], SamplingConfig(max_new_tokens=2, batch_size=batch, engine=engine), seed=1)
    sync(model.device)
    t0 = time.perf_counter()
    _, stats = generate(model, tok, chats, cfg, seed=0)
    sync(model.device)
    seconds = time.perf_counter() - t0
    return {"tokens": stats.generated_tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(stats.generated_tokens / seconds, 1)}


def greedy_equal(model, tok, chats) -> bool:
    cfg = SamplingConfig(max_new_tokens=16, temperature=0, batch_size=2)  # 4 prompts: rows refill
    ours, _ = generate(model, tok, chats, cfg)
    theirs, _ = generate(model, tok, chats, dataclasses.replace(cfg, engine="hf"))
    return ours == theirs


def baseline_module(commit: str):
    """``fedbridge/privacy/dp_fewshot.py`` as it was at ``commit``, imported beside today's package."""
    source = subprocess.run(["git", "show", f"{commit}:fedbridge/privacy/dp_fewshot.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"dp_fewshot_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def time_fewshot(module, model, tok, max_tokens: int) -> dict:
    task = load_task(TaskConfig(name="tweets", max_examples=300), 0)
    cfg = module.DPFewShotConfig(num_groups=4, shots_per_group=1, sigma=0.8, max_tokens=max_tokens, num_per_label=1,
                                 noise_seed=0, max_text_chars=200)
    t0 = time.perf_counter()
    result = module.dp_fewshot_synthesize(model, tok, task.examples.texts, task.examples.labels, task.labels, cfg,
                                          PrivacyLedger(1e9, 1e-5))
    seconds = time.perf_counter() - t0
    return {"tokens": result.tokens["generated"], "prompt_tokens_read": result.local["private-prompt-tokens"],
            "seconds": round(seconds, 1), "tokens_per_s": round(result.tokens["generated"] / seconds, 2),
            "epsilon": round(result.epsilon, 3), "examples": len(result.examples)}


def markdown(out: dict) -> str:
    lines = [f"Device: {out['device']}; memory bandwidth {out['bandwidth_gbs']} GB/s. "
             f"{out['new_tokens']} sampled tokens per prompt.", "",
             "| shape | weights | batch | prompts | HF generate tok/s | fedbridge tok/s | ratio | weight-read floor, "
             "batch-1 tok/s | greedy equal |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in out["engine"]:
        lines.append(f"| {r['shape']} | {r['weights']} | {r['batch']} | {r['prompts']} | {r['hf']['tokens_per_s']} | "
                     f"{r['fedbridge']['tokens_per_s']} | {r['ratio']}x | {r['floor_tokens_per_s']} | "
                     f"{r['greedy_equal']} |")
    few = out.get("fewshot")
    if few:
        lines += ["", f"DP few-shot ({few['settings']}):", "",
                  "| code | tokens | private prompt tokens read | seconds | tokens/s | ε |", "|---|---:|---:|---:|---:|---:|"]
        for key in ("baseline", "fedbridge"):
            r = few[key]
            lines.append(f"| {few['labels'][key]} | {r['tokens']} | {r['prompt_tokens_read']} | {r['seconds']} | "
                         f"{r['tokens_per_s']} | {r['epsilon']} |")
        lines.append(f"\nRatio of tokens/s: {few['ratio']}x.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shapes", default="smollm2-135m,llama-1b")
    parser.add_argument("--batches", default="", help="default: 1,16,64,256 on a GPU; 1,16,64 on a CPU")
    parser.add_argument("--big-batches", default="", help="batches for the 1B shape (default: 1 on a CPU)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--fewshot-tokens", type=int, default=24, help="T_max of the DP few-shot comparison; 0 skips")
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "generation")
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    batches = [int(b) for b in (args.batches or ("1,16,64,256" if gpu else "1,16,64")).split(",")]
    big = [int(b) for b in (args.big_batches or args.batches or ("1,16,64,256" if gpu else "1")).split(",")]
    bandwidth = memory_bandwidth(device)
    out = {"device": torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads",
           "bandwidth_gbs": round(bandwidth / 1e9, 1), "new_tokens": args.new_tokens, "engine": []}
    chats = prompts(2 * max(batches + big))
    for name, model, tok, weights in models(device, args.shapes.split(",")):
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        equal = greedy_equal(model, tok, chats[:4])
        for batch in (batches if name == "smollm2-135m" else big):
            n = max(batch, 2) if batch < 16 else 2 * batch
            row = {"shape": name, "weights": weights, "batch": batch, "prompts": n,
                   "prompt_tokens": sum(len(tok(render_prompt(tok, c))["input_ids"]) for c in chats[:n]),
                   "floor_tokens_per_s": round(bandwidth / weight_bytes, 1), "greedy_equal": equal}
            for engine in ("hf", "fedbridge"):
                row[engine] = time_engine(model, tok, chats[:n], engine, batch, args.new_tokens)
                print(name, batch, engine, row[engine], flush=True)
            row["ratio"] = round(row["fedbridge"]["tokens_per_s"] / row["hf"]["tokens_per_s"], 2)
            out["engine"].append(row)
    if args.fewshot_tokens:
        model, tok = load_llm("embedded", device=device)
        few = {"settings": f"M = 4, N = 1, top-100, σ = 0.8, T_max = {args.fewshot_tokens}, one demonstration per "
                           "label, 300 tweets, max 200 characters per example",
               "labels": {"baseline": f"one prompt per forward (git {args.baseline})",
                          "fedbridge": "all labels' prompts packed in one forward"}}
        few["baseline"] = time_fewshot(baseline_module(args.baseline), model, tok, args.fewshot_tokens)
        print("fewshot baseline", few["baseline"], flush=True)
        few["fedbridge"] = time_fewshot(dp_fewshot, model, tok, args.fewshot_tokens)
        print("fewshot fedbridge", few["fedbridge"], flush=True)
        few["ratio"] = round(few["fedbridge"]["tokens_per_s"] / few["baseline"]["tokens_per_s"], 2)
        out["fewshot"] = few
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    sys.exit(main())
