"""Generation backends: token ids in, sampled token ids and their logprobs out."""

from turnrl.engines.base import Completion, Engine, SamplingParams
from turnrl.engines.hf import HFEngine

__all__ = ["Completion", "Engine", "HFEngine", "SamplingParams"]
