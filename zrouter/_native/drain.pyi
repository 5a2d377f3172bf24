from zrouter._drain import drain_replies as drain_replies
from zrouter._drain import drain_requests as drain_requests

__all__ = ["drain_replies", "drain_requests"]
