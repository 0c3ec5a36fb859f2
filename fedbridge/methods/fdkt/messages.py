"""The message types FDKT adds to the protocol (``fedbridge.protocol.catalogue``); it also sends the core's
``train.augmented`` and ``query.dp_vote``."""

SYNTHESIZE = "query.synthesize"

# the run-config sections its silo side reads (the option-channel rule in fedbridge.protocol): a strategy cannot
# change their keys in Python, since the silos would not see the change
SILO_SECTIONS = ("fdkt",)

CATALOGUE = {  # message type -> request -> reply
    SYNTHESIZE: "config -> examples (DP synthetic demonstrations), privacy, metrics: synth.* (the options of the "
                "silo's mechanism are fdkt.* of the run config)",
}
