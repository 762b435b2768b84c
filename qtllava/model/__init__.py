"""Model parts: vision tower, connector and LLM builders; the layout of a batch; ClientPart and ServerPart."""

from qtllava.model.connector import build_connector, connector_names, register_connector
from qtllava.model.generate import greedy_generate
from qtllava.model.layout import IMAGE, PAD, TEXT, Layout
from qtllava.model.llm import LLM_KINDS, build_llm, llm_hf_config
from qtllava.model.parts import (IGNORE_INDEX, ClientOutput, ClientPart, NoTokenEmbedding, ServerOutput, ServerPart,
                                 build_parts)
from qtllava.model.vision import VISION_KINDS, VisionTower, build_vision_tower

__all__ = ["build_connector", "connector_names", "register_connector", "greedy_generate", "Layout", "PAD", "TEXT",
           "IMAGE", "LLM_KINDS", "build_llm", "llm_hf_config", "IGNORE_INDEX", "ClientOutput", "ClientPart",
           "NoTokenEmbedding", "ServerOutput", "ServerPart", "build_parts", "VISION_KINDS", "VisionTower",
           "build_vision_tower"]
