"""The answer-losing TCP proxy (chaos/proxy.py), which the chaos run uses too."""

from chaos.proxy import CuttingProxy, cutting_proxy

__all__ = ["CuttingProxy", "cutting_proxy"]
