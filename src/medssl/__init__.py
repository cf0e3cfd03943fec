"""medssl: self-supervised learning from very large medical image archives."""

__version__ = "0.1.0"

__all__ = ["load_encoder"]


def __getattr__(name: str):
    # Lazy: `import medssl` (and every ingest worker) must not pay for importing torch and timm.
    if name == "load_encoder":
        from medssl.models.export import load_encoder

        return load_encoder
    raise AttributeError(f"module 'medssl' has no attribute {name!r}")
