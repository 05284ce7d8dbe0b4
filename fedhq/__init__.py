"""FedHQ federated layer (built on fedhq_kernels); filled in by the FL-layer work."""
