"""FedHQ on Flower (Message API, flwr 1.41): an adapter around the embedded engine's
client and server code, nothing re-implemented.

    records      quantized state dicts <-> ArrayRecord + ConfigRecord, strict decoding
    strategy     FedHQStrategy: query round, allocation, per-node training messages,
                 validated INT8 aggregation
    client_app   the ClientApp (query, train.ptq / train.qat / train.fp32)
    server_app   the ServerApp of a deployment and the run loop both engines share
    simulation   ``fedhq run --engine flower``: Flower's simulation engine in this process
    app/         the Flower app (pyproject.toml) that ``flwr run`` starts (docs/flower.md)

Needs the ``flower`` extra: ``pip install 'fedhq[flower]'``.
"""
