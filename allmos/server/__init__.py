"""``allmos serve``: an OpenAI-compatible HTTP server over the engine.

Two processes. The engine core (``core_process``) runs the engine core's step loop and nothing else; the
front end (``api_server``: FastAPI under uvicorn) tokenizes, applies chat templates, detokenizes, matches
stop strings and assembles OpenAI responses. They exchange typed msgpack messages over the core's stdin
and stdout pipes, one message per engine step carrying every request's new tokens (``protocol``).

Needs the ``serve`` extra (``pip install "allmos[serve]"``); nothing outside this package imports it.
"""
