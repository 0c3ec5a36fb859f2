"""Every method reaches an LLM only through the LLM interface (``fedbridge/models/llm.py``), read statically from the
source: no module under fedbridge/methods, fedbridge/privacy or fedbridge/silo.py imports a model loader or a
function that runs a causal LM (``load_llm``, generation's ``generate``, its scorers, the decoder), so a new method
cannot bypass the interface. Where a step needs the model itself (DP few-shot's full distributions, training), it
asks the interface for it (``LLM.exact()``), which a grep for ``exact(`` shows.

Exempt: the internals of the two DP mechanisms that run the model themselves, ``privacy/dp_fewshot.py`` (its packed,
KV-cached forward over every prompt's full next-token distribution) and ``privacy/dp_sgd.py`` (it trains the
generator and samples it); their callers hand them the model from ``exact()``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedbridge"
CHECKED = [*sorted((PACKAGE / "methods").rglob("*.py")), *sorted((PACKAGE / "privacy").rglob("*.py")),
           PACKAGE / "silo.py"]
EXEMPT = {PACKAGE / "privacy" / "dp_fewshot.py", PACKAGE / "privacy" / "dp_sgd.py"}
# what runs or builds a causal LM outside the interface, by module
FORBIDDEN = {
    "fedbridge.models.loading": {"load_llm", "tiny_llm", "_load_llm_cached"},
    "fedbridge.models.generation": {"generate", "continuation_logprobs", "continuation_logprobs_shared",
                                    "next_token_logprobs", "prefix_cached_logprobs"},
    "fedbridge.models.llm_classifier": {"label_probabilities"},
    "fedbridge.models.engine": None,  # the decoder: any name
    "transformers": {"AutoModelForCausalLM"},
}


def bypasses(source: str, module: str = "fedbridge.methods.example.server") -> list[str]:
    """Where ``source`` reaches a model without the interface: forbidden imports (absolute or relative), and a
    forbidden name used on an imported module (``loading.load_llm``, ``generation.generate``)."""
    package = module.rpartition(".")[0]
    tree = ast.parse(source)
    found, modules = [], {}  # modules: local name -> a FORBIDDEN module imported whole
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in FORBIDDEN:  # ``from fedbridge.models import loading``
                    modules[alias.asname or alias.name] = f"{base}.{alias.name}"
                    if FORBIDDEN[f"{base}.{alias.name}"] is None:
                        found.append(f"line {node.lineno}: imports {base}.{alias.name}")
                elif base in FORBIDDEN and (FORBIDDEN[base] is None or alias.name in FORBIDDEN[base]):
                    found.append(f"line {node.lineno}: imports {alias.name} from {base}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in FORBIDDEN:
                    modules[alias.asname or alias.name] = alias.name
                    if FORBIDDEN[alias.name] is None:
                        found.append(f"line {node.lineno}: imports {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            owner = ast.unparse(node.value)
            target = modules.get(owner, owner if owner in FORBIDDEN else None)
            if target and FORBIDDEN[target] is not None and node.attr in FORBIDDEN[target]:
                found.append(f"line {node.lineno}: uses {owner}.{node.attr}")
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def test_no_method_reaches_an_llm_except_through_the_interface():
    offenders = {str(path.relative_to(PACKAGE.parent)): hits for path in CHECKED if path not in EXEMPT
                 if (hits := bypasses(path.read_text(), module_name(path)))}
    assert not offenders, ("these modules reach a model without fedbridge.models.llm (load it with "
                           f"load_server_llm / load_silo_llm / load_llm_interface and ask it): {offenders}")


def test_the_check_sees_every_way_around_the_interface():
    # guards the guard
    assert bypasses("from fedbridge.models.loading import load_llm, load_slm")
    assert not bypasses("from fedbridge.models.loading import load_slm, ModelSpecError")
    assert bypasses("from fedbridge.models.generation import Prompt, generate")
    assert not bypasses("from fedbridge.models.generation import Prompt, SamplingConfig, prompt_ids")
    assert bypasses("from fedbridge.models.generation import (\n    continuation_logprobs_shared,\n)")
    assert bypasses("from fedbridge.models.llm_classifier import label_probabilities")
    assert not bypasses("from fedbridge.models.llm_classifier import classification_prompt")
    assert bypasses("from fedbridge.models.engine import Decoder")
    assert bypasses("from fedbridge.models import engine")
    assert bypasses("from ...models.loading import load_llm", "fedbridge.methods.example.silo")
    assert bypasses("from fedbridge.models import loading\nloading.load_llm('x')")
    assert bypasses("import fedbridge.models.generation as generation\ngeneration.generate(m, t, p)")
    assert bypasses("import fedbridge.models.loading\nfedbridge.models.loading.load_llm('x')")
    assert not bypasses("llm.generate(prompts)\nllm.label_probabilities(texts)")  # the interface's own methods
    assert not bypasses("from fedbridge.models.llm import load_server_llm\nmodel, tok = llm.exact()")


def test_the_checked_modules_include_every_method_and_the_exempt_ones_exist():
    checked = {module_name(p) for p in CHECKED}
    assert {"fedbridge.methods.crosslm.llm", "fedbridge.methods.social.teaching", "fedbridge.methods.fdkt.silo",
            "fedbridge.privacy.canaries", "fedbridge.privacy.audit", "fedbridge.silo"} <= checked
    assert all(path.is_file() for path in EXEMPT)
