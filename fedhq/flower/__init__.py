"""FedHQ on Flower (Message API, flwr 1.41): a transport of the run driver
(``fedhq.fl.engine.run``) around the same client and server code (docs/flower.md).

    records      quantized state dicts <-> ArrayRecord + ConfigRecord, strict decoding
    strategy     FedHQStrategy: the Flower transport (query and training messages, replies)
    client_app   the ClientApp (query, train.ptq / train.qat / train.fp32)
    server_app   the ServerApp of a deployment: the driver with FedHQStrategy
    simulation   ``fedhq run --engine flower``: Flower's simulation engine in this process
    quantized    quantize_mod + QuantizedStrategy: quantized transport for any Flower app
    app/         the Flower app (pyproject.toml) that ``flwr run`` starts

Needs the ``flower`` extra: ``pip install 'fedhq[flower]'``.
"""

_QUANTIZED = ("QuantizedStrategy", "make_quantize_mod", "quantize_mod")


def __getattr__(name: str):
    """``from fedhq.flower import QuantizedStrategy, quantize_mod`` (loaded on first use)."""
    if name in _QUANTIZED:
        from fedhq.flower import quantized

        return getattr(quantized, name)
    raise AttributeError(f"module 'fedhq.flower' has no attribute {name!r}")
