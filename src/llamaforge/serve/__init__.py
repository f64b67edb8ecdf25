"""``llamaforge serve``: an OpenAI-compatible HTTP server with continuous batching.

engine.py: the scheduler and its slot KV cache (torch); app.py: the FastAPI endpoints;
protocol.py: request bodies and OpenAI's error shape; net.py: connection limits (uvicorn's
h11 protocol with timeouts and a cap) and rate-limited logging; metrics.py: Prometheus
metrics.
The command itself: llamaforge/cli/serve.py. Nothing is imported here, so ``--help`` stays
light.
"""
