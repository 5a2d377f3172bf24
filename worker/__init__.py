"""zrouter worker: serve one service for one or more zrouter brokers.

Quick start::

    from zrouter.worker import Worker

    def handler(payload):
        return payload

    Worker("echo", handler, broker="tcp://127.0.0.1:5556", capacity=4).run()

or from the shell: ``zrouter-worker --service echo --capacity 4 zrouter.worker.examples:echo``
(also ``python -m zrouter.worker``). :func:`current_request` gives a handler its request's id,
service, attempt, deadline and the worker's instance id.
"""

from ._context import RequestInfo, current_request
from ._worker import DEFAULT_BROKER, Worker, run_worker

__all__ = ["DEFAULT_BROKER", "RequestInfo", "Worker", "current_request", "run_worker"]
