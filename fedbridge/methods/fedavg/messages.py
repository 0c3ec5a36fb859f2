"""The message types the ``fedavg`` baseline adds to the protocol (``fedbridge.protocol.catalogue``)."""

TRAIN_FEDAVG = "train"  # Flower's default train action

CATALOGUE = {  # message type -> request -> reply
    TRAIN_FEDAVG: "arrays (SLM weights), config (epochs, proximal-mu) -> arrays, metrics: num-examples, train.* "
                  "(one round: start from the server's weights, train locally, send the weights back)",
}
