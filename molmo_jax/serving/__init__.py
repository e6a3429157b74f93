"""Serving a checkpoint: the FastAPI app (app.py), the continuous-batching engine (batcher.py),
the OpenAI chat format (openai_format.py) and the pointing page (page.html)."""
