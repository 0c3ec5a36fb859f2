"""Baseline ``llm-zero-shot``: the server LLM classifies by label likelihood, with no task data at all.

The global test set is scored on the server; each silo scores its own test split with the same public LLM.
"""

from __future__ import annotations

from fedbridge import protocol as p
from fedbridge.methods.base import Method, Session, mean_over_silos
from fedbridge.methods.zero_shot.messages import EVALUATE_LLM
from fedbridge.models.llm import load_server_llm
from fedbridge.tasks import classification_metrics


class LLMZeroShot(Method):
    name = "llm-zero-shot"
    description = "the server LLM answers by label likelihood, no training data"

    def run(self, session: Session) -> None:
        with session.phase("server-llm-load"):
            llm = load_server_llm(self.cfg.llm, session.device)
        with session.phase("server-llm-eval"):
            probs = llm.label_probabilities(session.global_test.texts, session.task.labels, session.task.instruction,
                                            batch_size=self.cfg.llm.batch_size, max_tokens=self.cfg.llm.max_length,
                                            progress="server llm", calibrate=self.cfg.llm.calibrate)
        session.record.global_metrics.update(classification_metrics(session.global_test.labels, probs))
        with session.phase("silo-llm-eval"):
            replies = session.broadcast(EVALUATE_LLM, p.request(), round_=1)
        session.record_silo_metrics(replies)
        mean_over_silos(session.record)
