"""Host-data-parallel sampling with Levanter's InferenceEngine on multi-host TPU slices.

Every host loads the model onto its own chips, samples its shard of the prompts, and sends its rows to the
leader through the JAX distributed key-value store; the leader writes one merged, ordered output.
"""
