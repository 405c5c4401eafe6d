"""Deep optimizers (§4 of the paper): optimizers as associative memories that compress gradients, as
`torch.optim` drop-ins, and the routing of a model's parameters between a matrix optimizer and AdamW."""

from .adam_memory import AssociativeAdam
from .deep import DeepMomentum
from .dgd import DeltaGD
from .momentum import DeltaMomentum, PreconditionedMomentum
from .muon import M3, Muon
from .newton_schulz import muon_scale, newton_schulz
from .routing import MultiOptimizer, route, split_parameters

__all__ = [
    "M3",
    "AssociativeAdam",
    "DeepMomentum",
    "DeltaGD",
    "DeltaMomentum",
    "MultiOptimizer",
    "Muon",
    "PreconditionedMomentum",
    "muon_scale",
    "newton_schulz",
    "route",
    "split_parameters",
]
