"""Large-batch LAMB that works on CPU and under ZeRO 0-3 (see docs/lamb.md)."""
from ds_pld.optim.config import LambConfig, build_lamb
from ds_pld.optim.lamb import Lamb, ShardLayout
from ds_pld.optim.zero_lamb import bind_lamb_to_engine, find_lamb

__all__ = ["Lamb", "LambConfig", "ShardLayout", "bind_lamb_to_engine", "build_lamb", "find_lamb"]
