"""The message types the ``llm-zero-shot`` baseline adds to the protocol (``fedbridge.protocol.catalogue``)."""

EVALUATE_LLM = "evaluate.llm"

CATALOGUE = {  # message type -> request -> reply
    EVALUATE_LLM: "config -> metrics: silo-test.* (the public LLM on the silo's test split)",
}
