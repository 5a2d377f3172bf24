"""zrouter's benchmark suite: ``python -m bench`` (or ``make bench``).

Every section starts its own processes on free loopback ports (broker, each worker, the client
that measures), compares zrouter with a ``zmq.proxy`` broker and with majortomo (MDP) in the
same run, and stops everything it started. See ``python -m bench --help``.
"""
