"""zrouter's broker daemon: ROUTER front end for clients, ROUTER back end for workers."""

from zrouter.broker.server import Broker, BrokerConfig
from zrouter.broker.router import Router

__all__ = ["Broker", "BrokerConfig", "Router"]
