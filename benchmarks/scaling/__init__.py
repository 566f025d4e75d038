"""Multi-node scaling model of the training engines (comm_model) and its check against gloo runs (measure_comm)."""
