"""Moved to :mod:`testsupport.tcp_proxy` (shared with bench/); kept for importers not yet moved over."""

from testsupport.tcp_proxy import TcpProxy

__all__ = ["TcpProxy"]
