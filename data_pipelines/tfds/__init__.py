"""Prepared PixMo: a TFDS builder writing ArrayRecord (`builders`, read by grain without TensorFlow)
and seqio tasks/mixtures over it (`seqio_tasks`, needs the optional `seqio` extra)."""
