"""The message types CrossLM adds to the protocol (``fedbridge.protocol.catalogue``); its records ``scores``,
``targets`` and ``slm`` are documented in ``fedbridge.protocol``."""

TRAIN_PRIVATE = "train.private"
SCORE = "query.score"
UPLOAD = "query.upload"
ENHANCE = "train.enhance"

CATALOGUE = {  # message type -> request -> reply
    TRAIN_PRIVATE: "config, global-test -> metrics: silo-test.*, global-test.*, train.* (train a fresh SLM on the "
                   "private split and keep it in the node state for the messages below)",
    SCORE: "config (round [+ epsilon, releases, k, noise-seed: DP votes]), examples (texts, intended labels) -> "
           "scores [+ privacy], metrics: score.* (the DP vote shares, or the kept SLM's class probabilities, of the "
           "server's examples; no weights leave the silo)",
    UPLOAD: "config (round) -> arrays (the kept SLM), slm, metrics (score-on=server only: opt-in, weaker privacy)",
    ENHANCE: "config (round, final, epochs, synthetic-weight, with-private), examples [+ targets], global-test -> "
             "metrics: silo-test.*, global-test.*, train.* (fine-tune the kept SLM on selected examples, hard labels "
             "or soft targets); or arrays (weights the server enhanced), global-test -> metrics: silo-test.*, "
             "global-test.* (the silo keeps them)",
}
