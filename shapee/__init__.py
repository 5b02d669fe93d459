"""shapee: a training framework for Shap-E-style conditional 3D generation."""

__version__ = "0.1.0"
