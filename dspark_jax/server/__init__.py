"""`dspark serve`: an OpenAI-compatible HTTP server (FastAPI, run by uvicorn) on the serving engine.

Modules, bottom up: `chat` (messages → prompt ids with the model's turn format), `text` (incremental
detokenisation with stop strings), `auth` (API keys → tenants), `errors` (OpenAI-shaped errors), `protocol`
(validated request bodies), `backend` (the engine, governed or open, behind one submit/stream API), `app`
(the routes).
"""
