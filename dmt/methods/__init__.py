"""Distillation methods; a method turns a dual-view batch into a dict of losses."""
from dmt.methods.dmt import DMT

METHODS = {"dmt": DMT}

__all__ = ["DMT", "METHODS"]
