"""medssl: self-supervised learning from very large medical image archives."""

__version__ = "0.1.0"
