"""Serving through failures: a continuous-batching engine over a paged KV cache (``engine``), ranks that
serve collocated (attention data-parallel, MoE expert-parallel) and take a lost rank's requests over
from their KV checkpoints (``worker``), and the front door that streams every token once (``cluster``)."""
