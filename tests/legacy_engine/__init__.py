"""The reference copy of the engine before it was split into input processing, engine core and output
processing, kept only for ``tests/test_engine_core_equivalence.py``.

``llm_engine.py``, ``scheduler.py`` and ``request.py`` are frozen copies of ``allmos/engine/llm_engine.py``,
``allmos/engine/scheduler.py`` and ``allmos/engine/request.py`` as they were before the split, with only
their imports changed (they import each other from here; the runner and block manager come wrapped from
``sentinel.py``). That old design wrote a ``PENDING_TOKEN`` (-1) into token lists for tokens sampled but
not read back. ``sentinel.py`` keeps that contract at the two places it met shared code: the block
manager's old hashing rule (a block holding -1 is not hashed) and a runner wrapper that translates a -1
last input into ``ScheduledSeq.input_from_previous_sample``. The model runner, model, sampler, detokenizer
and block manager otherwise are the current ones: the equivalence test checks the engine loop, request
accounting, scheduling, seeds, stop checks and output assembly, not the model numerics.

Do not edit these copies to follow changes in ``allmos``: they are the reference.
"""
