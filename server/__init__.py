"""pipetwin's OpenAI-compatible server over runtime.online.AsyncLLM.

  protocol.py  request/response models, OpenAI error objects
  tokens.py    tokenizer or byte fallback, chat template, incremental detokenizer, stop strings
  metrics.py   Prometheus /metrics
  access.py    ASGI gate: Host check, API key, status counting
  intake.py    a request's checks before the engine: body, model name, prompt length, sampling
  app.py       OpenAIServer / build_app(engine, model_name=..., options=ServerOptions(...)) -> FastAPI
  serve.py     `pipetwin serve`, ServerThread (the app on a loopback port in a thread)

Importing this package imports neither torch nor fastapi; the modules do what they need.
"""
