"""The message types Social Learning adds to the protocol (``fedbridge.protocol.catalogue``); its records
``instructions``, ``provenance`` and ``votes`` are documented in ``fedbridge.protocol``."""

TEACH = "query.teach"
VOTE = "query.vote"
SHARE_RAW = "query.share_raw"

# the run-config sections its silo side reads (the option-channel rule in fedbridge.protocol): a strategy cannot
# change their keys in Python, since the silos would not see the change
SILO_SECTIONS = ("social",)

CATALOGUE = {  # message type -> request -> reply
    TEACH: "config (mode: examples | instructions) -> examples (synthetic) or instructions, provenance, privacy, "
           "metrics: teach.* (the silo as a teacher; nothing else leaves it)",
    VOTE: "config (mode), examples or instructions (the candidates) -> votes, metrics: vote.* (the teacher's score "
          "of every candidate against its held-out examples)",
    SHARE_RAW: "config (n) -> examples (n RAW private examples), privacy, metrics (the NON-PRIVATE upper bound "
               "only; never part of a private method)",
}
