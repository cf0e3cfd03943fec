"""The self-supervised objective: Sinkhorn-Knopp codes, SwAV swapped prediction, InfoNCE, their sum."""

from medssl.ssl.hybrid import HybridLoss
from medssl.ssl.infonce import InfoNCELoss
from medssl.ssl.queue import FeatureQueue
from medssl.ssl.sinkhorn import sinkhorn_knopp
from medssl.ssl.swav import SwAVLoss

__all__ = ["FeatureQueue", "HybridLoss", "InfoNCELoss", "SwAVLoss", "sinkhorn_knopp"]
