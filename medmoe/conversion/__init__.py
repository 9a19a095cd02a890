"""Loading other people's checkpoints: the official Med-MoE / MoE-LLaVA releases and their routers."""

from .official import Report, convert_checkpoint, is_official_config, is_official_folder, load_official, report_lines
from .router import convert_router, load_router, read_router

__all__ = ["Report", "convert_checkpoint", "convert_router", "is_official_config", "is_official_folder", "load_official",
           "load_router", "read_router", "report_lines"]
