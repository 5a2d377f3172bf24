"""zrouter's broker daemon: ROUTER front end for clients, ROUTER back end for workers."""

from broker.core import Broker, BrokerConfig
from broker.router import Router

__all__ = ["Broker", "BrokerConfig", "Router"]
