"""Networks of pretraining: timm backbones with single-channel input, projection head, prototypes."""

from medssl.models.backbone import create_backbone
from medssl.models.heads import ProjectionHead, Prototypes
from medssl.models.ssl_model import SSLModel

__all__ = ["create_backbone", "ProjectionHead", "Prototypes", "SSLModel"]
